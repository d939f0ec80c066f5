"""mk.additive_attention_mask: a transformers padding mask as a 4D additive mask, which transformers uses
as given, so that MAML's vmap over tasks traces the model instead of falling back to a loop over tasks
(transformers tests a 2D mask with padding_mask.all(), which vmap cannot trace)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import metakernels as mk
from maml_reference import sequential_meta_loss

MIN64 = torch.finfo(torch.float64).min


def test_bidirectional_mask_values_and_shape():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    got = mk.additive_attention_mask(mask, dtype=torch.float64)
    assert got.shape == (2, 1, 1, 3) and got.dtype == torch.float64
    torch.testing.assert_close(got[:, 0, 0], torch.tensor([[0, 0, MIN64], [MIN64, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(mk.additive_attention_mask(mask.bool(), dtype=torch.float64), got, rtol=0, atol=0)


def test_causal_mask_values_and_shape_and_default_dtype():
    mask = torch.tensor([[[0, 1, 1]]])  # leading task and batch dimensions are kept
    got = mk.additive_attention_mask(mask, causal=True)
    assert got.shape == (1, 1, 1, 3, 3) and got.dtype == torch.get_default_dtype()
    low = torch.finfo(got.dtype).min
    want = torch.tensor([[low, low, low], [low, 0, low], [low, 0, 0]])
    torch.testing.assert_close(got[0, 0, 0], want, rtol=0, atol=0)


@pytest.mark.parametrize("mask,dtype,message", [
    ([1, 0], None, r"'attention_mask' must be a tensor, got list"),
    (torch.ones(3), None, r"integer or bool tensor \[\.\.\., L\] of 0/1, got dtype torch.float32 and shape \[3\]"),
    (torch.tensor(1), None, r"got dtype torch.int64 and shape \[\]"),
    (torch.ones(3, dtype=torch.long), torch.int32, r"'dtype' must be a floating-point dtype, got torch.int32"),
])
def test_bad_arguments_are_named(mask, dtype, message):
    with pytest.raises(TypeError, match=message):
        mk.additive_attention_mask(mask, dtype=dtype)


T, N, L, VOCAB = 3, 3, 7, 31


def _padded_ids(side):
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (T, N, L), generator=gen)
    mask = torch.ones(T, N, L, dtype=torch.long)
    if side == "right":
        mask[:, 1:, 5:] = 0
    else:
        mask[:, 1:, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask  # 0 is the models' pad token


def _bert(attn_implementation):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (.ci/setup installs it)")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double()


def _gpt2(attn_implementation):
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (.ci/setup installs it)")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                     attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def _bert_batches(side):
    ids, mask = _padded_ids(side)
    labels = torch.randint(0, 3, (T, N), generator=torch.Generator().manual_seed(8))
    return (ids, mask, labels), (ids.flip(0), mask.flip(0), labels.flip(0))


def _gpt2_batches(side):
    ids, mask = _padded_ids(side)
    batch = (ids, mask, ids.masked_fill(mask == 0, -100))
    return batch, tuple(x.flip(0) for x in batch)


def _classification_loss(mask_of):
    return lambda f, b: f(input_ids=b[0], attention_mask=mask_of(b[1]), labels=b[2]).loss


def _logits_loss(mask_of):
    """Next-token cross entropy in float64 (transformers' own loss casts the logits to float32)."""
    def loss(f, b):
        logits = f(input_ids=b[0], attention_mask=mask_of(b[1])).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b[2][:, 1:].reshape(-1))
    return loss


CASES = {
    "bert": (_bert, _bert_batches, _classification_loss, False),
    "gpt2": (_gpt2, _gpt2_batches, _logits_loss, True),
}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_maml_with_the_4d_mask_vmaps_and_matches_the_sequential_reference_with_the_2d_mask(name, attn_implementation,
                                                                                          side):
    """A causal model's positions left of every token (left padding) see no key: torch's SDPA, which
    transformers' sdpa path calls with its boolean mask, gives them zeros, while the additive mask gives
    them an average of the values, as transformers' eager path does; there the reference is the eager
    model's (the same weights)."""
    build, batches, loss_of, causal = CASES[name]
    model = build(attn_implementation)
    reference = build("eager") if causal and side == "left" else model
    support, query = batches(side)
    loss_4d = loss_of(lambda m: mk.additive_attention_mask(m, causal=causal, dtype=torch.float64))
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "torch.vmap could not trace this model" fallback
        got = torch.autograd.grad(mk.MAML(model, inner_lr=0.3, inner_steps=2)(loss_4d, support, query), params)
    names = [n for n, _ in model.named_parameters()]
    with sdpa_kernel([SDPBackend.MATH]):  # the reference's second order through transformers' sdpa attention
        want = torch.autograd.grad(sequential_meta_loss(reference, loss_of(lambda m: m), support, query, names=names,
                                                        lrs={n: 0.3 for n in names}, steps=2),
                                   list(reference.parameters()), allow_unused=True)
    for n, g, w in zip(names, got, want):
        torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w, rtol=1e-9, atol=1e-13, msg=n)


def test_the_2d_mask_still_falls_back_to_the_loop_with_a_warning():
    """What the helper is for: without it, transformers' mask test stops torch.vmap, and the warning
    says what to pass instead (only then: another untraceable model gets no such advice)."""
    model = _bert("sdpa")
    support, query = _bert_batches("right")
    with pytest.warns(RuntimeWarning, match=r"torch.vmap could not trace this model .* It failed in transformers' "
                                            r"test of a 2D attention_mask: pass metakernels.additive_attention_mask"):
        mk.MAML(model, inner_lr=0.3)(_classification_loss(lambda m: m), support, query)

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x) if bool(x.sum() > 0) else -self.lin(x)

    x = torch.randn(2, 4, 3)
    with pytest.warns(RuntimeWarning) as caught:
        mk.MAML(DataDependent())(lambda f, b: f(b).pow(2).mean(), x, x)
    assert len(caught) == 1 and "could not trace" in str(caught[0].message)
    assert "attention_mask" not in str(caught[0].message)


def test_left_padded_causal_sdpa_differs_from_the_2d_mask_only_where_no_key_is_seen():
    """The difference the reference above steps around, pinned down: the logits of positions that see a
    token agree with transformers' own sdpa masking; those left of every token do not."""
    model = _gpt2("sdpa").eval()
    ids, mask = _padded_ids("left")
    ids, mask = ids[0], mask[0]
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).logits
        additive = model(input_ids=ids, attention_mask=mk.additive_attention_mask(mask, causal=True,
                                                                                  dtype=torch.float64)).logits
    sees_a_token = mask.cumsum(-1) > 0
    torch.testing.assert_close(additive[sees_a_token], own[sees_a_token], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(additive[~sees_a_token], own[~sees_a_token])


def test_padding_mask_benchmark_runs():
    """benchmarks/hf_padding_mask.py --quick: both masks, both orders, in the table (a smoke run)."""
    pytest.importorskip("transformers", reason="transformers is a test dependency (.ci/setup installs it)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "hf_padding_mask.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": repo})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.lstrip().startswith(("second", "first"))]
    assert [(row[0], row[1]) for row in rows] == [("second", "2D"), ("second", "additive_attention_mask,"),
                                                  ("first", "2D"), ("first", "additive_attention_mask,")]
