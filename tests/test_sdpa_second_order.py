"""Second order through torch's scaled_dot_product_attention (metakernels.attention_backend): its fused
kernels have no double backward, so nn.TransformerEncoderLayer (nn.MultiheadAttention) failed
second-order MAML and learned-optimizer training, with or without a padding mask, in every mode
(measured on the old code: MAML refused it, naming the NotImplemented node).  A second-order meta-step
now runs SDPA on its math backend and gives the sequential reference's meta-gradient."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import metakernels as mk
from maml_reference import sequential_meta_loss

T, N, S, D = 3, 4, 5, 8


class Encoder(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        self.embed = nn.Embedding(11, D)
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                                activation="gelu")
        self.head = nn.Linear(D, 3)

    def forward(self, tokens, padding=None):
        return self.head(self.layer(self.embed(tokens), src_key_padding_mask=padding).mean(1))


def _encoder(norm_first=False):
    torch.manual_seed(1)
    return Encoder(norm_first).double()


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    padding = torch.zeros(T, N, S, dtype=torch.bool)
    padding[:, :, 4:] = True
    return torch.randint(0, 11, (T, N, S), generator=gen), torch.randint(0, 3, (T, N), generator=gen), padding


def _loss(f, batch):
    return nn.functional.cross_entropy(f(batch[0]), batch[1])


def _masked_loss(f, batch):
    return nn.functional.cross_entropy(f(batch[0], batch[2]), batch[1])


@pytest.mark.parametrize("loss_fn", [_loss, _masked_loss], ids=["unmasked", "padding-mask"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("mode", [dict(), dict(vectorize=False), dict(memory="low"), dict(task_chunk=2),
                                  dict(fused_layers=True)], ids=["fast", "loop", "low", "chunk", "fused"])
def test_maml_through_a_transformer_encoder_layer_matches_the_sequential_reference(loss_fn, norm_first, mode):
    support, query = _batch(1), _batch(2)
    model = _encoder(norm_first)
    reference = copy.deepcopy(model)
    loss = mk.MAML(model, inner_lr=0.3, inner_steps=2, **mode)(loss_fn, support, query)
    got = torch.autograd.grad(loss, list(model.parameters()))
    names = [n for n, _ in reference.named_parameters()]
    with sdpa_kernel([SDPBackend.MATH]):  # the reference needs the twice-differentiable backend too
        want_loss = sequential_meta_loss(reference, loss_fn, support, query, names=names,
                                         lrs={n: 0.3 for n in names}, steps=2)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(got, torch.autograd.grad(want_loss, list(reference.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_only_second_order_restricts_attention_to_the_math_backend(monkeypatch):
    """First-order steps keep the fused kernels (the caller's SDPA settings as they are): the fused-kernel
    switch is seen on at each of their attention calls, and off at each of a second-order step's."""
    seen = []
    original = nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", recording)
    gen = torch.Generator().manual_seed(0)
    support, query = (torch.randn(T, N, S, D, dtype=torch.float64, generator=gen) for _ in range(2))
    attention = nn.MultiheadAttention(D, 2, batch_first=True).double()

    def loss_fn(f, x):
        return f(x, x, x, need_weights=False)[0].pow(2).mean()

    for first_order in (True, False):
        seen.clear()
        mk.MAML(attention, inner_lr=0.3, first_order=first_order, vectorize=False)(loss_fn, support, query)
        assert seen == [first_order] * (2 * T)  # one inner step and the query, T tasks each


@pytest.mark.parametrize("first_order", [False, True])
def test_the_learned_optimizer_unroll_through_attention_matches_the_math_backend_run(first_order):
    support, query = _batch(1), _batch(2)
    gradients = []
    for user_context in (False, True):
        torch.manual_seed(2)
        lopt = mk.LearnedOptimizer(hidden=4).double()
        trainer = mk.LearnedOptimizerTrainer(lopt, _encoder(), first_order=first_order)
        context = sdpa_kernel([SDPBackend.MATH]) if user_context else torch.enable_grad()
        with context:
            result = trainer.unroll(_masked_loss, [support, support], 2, meta_loss="query", query=query)
        gradients.append(torch.autograd.grad(result.meta_loss, list(lopt.parameters()), allow_unused=True))
    for g, w in zip(*gradients):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


def test_a_second_order_compat_clone_adapts_through_attention_as_maml_does():
    """metakernels.compat: the clone's forward runs attention twice differentiable when the clone is second
    order, so its adapt() can differentiate it (before: torch's "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented")."""
    from metakernels import compat

    support, query = _batch(1), _batch(2)
    model = _encoder()
    maml = compat.MAML(model, lr=0.3)
    total = 0.0
    for t in range(T):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(_masked_loss(learner, tuple(x[t] for x in support)))
        total = total + _masked_loss(learner, tuple(x[t] for x in query)) / T
    got = torch.autograd.grad(total, list(model.parameters()))
    want = torch.autograd.grad(mk.MAML(model, inner_lr=0.3, inner_steps=2)(_masked_loss, support, query),
                               list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
