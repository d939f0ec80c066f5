"""The built-in models (metakernels.models): sizes are checked when a model is built, and token tensors
when it is called, each with a message that names the argument; a batch too short to have a next-token
target is refused by the LM losses instead of giving a NaN loss."""
import numpy as np
import pytest
import torch

from metakernels.models import TransformerClassifier, TransformerLM, lm_loss, lm_loss_chunked_head

SMALL = dict(vocab=50, d_model=8, n_heads=2, n_layers=1, max_len=8)


@pytest.mark.parametrize("change,error,message", [
    (dict(vocab=0), ValueError, "vocab must be an int >= 1, got 0"),
    (dict(vocab=2.5), ValueError, "vocab must be an int >= 1, got 2.5"),
    (dict(d_model=0), ValueError, "d_model must be an int >= 1, got 0"),
    (dict(d_model=True), ValueError, "d_model must be an int >= 1, got True"),
    (dict(n_heads=0), ValueError, "n_heads must be an int >= 1, got 0"),
    (dict(n_heads=3), ValueError, "d_model=8 must be divisible by n_heads=3"),
    (dict(n_layers=-1), ValueError, "n_layers must be an int >= 0, got -1"),
    (dict(max_len=0), ValueError, "max_len must be an int >= 1, got 0"),
    (dict(dropout=1.0), ValueError, "TransformerLM: argument 'dropout' must be in [0, 1), got 1.0"),
    (dict(dropout="0.1"), TypeError, "TransformerLM: argument 'dropout' must be a real number, got str"),
])
def test_transformer_lm_refuses_bad_sizes_naming_them(change, error, message):
    with pytest.raises(error) as info:
        TransformerLM(**{**SMALL, **change})
    assert str(info.value) == message


@pytest.mark.parametrize("change,message", [
    (dict(n_classes=0), "n_classes must be an int >= 1, got 0"),
    (dict(pad=50), "pad must be an int in [0, 49], got 50"),
    (dict(pad=-1), "pad must be an int in [0, 49], got -1"),
])
def test_transformer_classifier_refuses_bad_sizes_naming_them(change, message):
    with pytest.raises(ValueError) as info:
        TransformerClassifier(**{"n_classes": 3, **SMALL, **change})
    assert str(info.value) == message


def test_sizes_may_be_numpy_or_tensor_integers_and_zero_layers():
    model = TransformerLM(vocab=np.int64(50), d_model=torch.tensor(8), n_heads=np.int32(2), n_layers=0, max_len=8)
    assert model(torch.randint(0, 50, (3, 5))).shape == (3, 5, 50)


@pytest.mark.parametrize("tokens,error,message", [
    (torch.randint(0, 50, (5,)), ValueError, "TransformerLM: tokens must have shape [batch, sequence], got [5]"),
    (torch.randint(0, 50, (2, 3, 4)), ValueError, "TransformerLM: tokens must have shape [batch, sequence], got [2, 3, 4]"),
    (torch.rand(2, 5), TypeError, "TransformerLM: tokens must be an integer tensor of token ids, got torch.float32"),
    (torch.ones(2, 5, dtype=torch.bool), TypeError, "TransformerLM: tokens must be an integer tensor of token ids, got torch.bool"),
    ([[1, 2]], TypeError, "TransformerLM: tokens must be an integer tensor of token ids, got list"),
    (torch.randint(0, 50, (2, 9)), ValueError, "sequence length 9 exceeds max_len=8"),
])
def test_transformer_lm_refuses_bad_tokens_naming_them(tokens, error, message):
    with pytest.raises(error) as info:
        TransformerLM(**SMALL)(tokens)
    assert str(info.value) == message


def test_transformer_lm_takes_int32_tokens_and_an_empty_sequence():
    model = TransformerLM(**SMALL).double()
    tokens = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model(tokens.to(torch.int32)), model(tokens), rtol=0, atol=0)
    assert model(tokens[:, :0]).shape == (2, 0, 50)


@pytest.mark.parametrize("loss", [lm_loss, lm_loss_chunked_head])
def test_lm_losses_refuse_a_batch_without_next_token_targets(loss):
    """One token per sequence leaves nothing to predict: the mean over no targets was a NaN loss."""
    model = TransformerLM(**SMALL)
    with pytest.raises(ValueError) as info:
        loss(model, torch.randint(0, 50, (2, 1)))
    assert str(info.value) == (f"{loss.__name__}: the batch's tokens must hold sequences of at least 2 tokens "
                               "(the inputs and their next-token targets), got shape [2, 1]")
    with pytest.raises(TypeError, match=f"{loss.__name__}: the batch's tokens must be an integer tensor"):
        loss(model, torch.rand(2, 4))
    assert torch.isfinite(loss(model, torch.randint(0, 50, (2, 2))))
