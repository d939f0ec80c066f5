"""The chunked, twice-differentiable vocabulary head with cross-entropy (metakernels.ops.
linear_cross_entropy): values, gradients and gradients of gradients against PyTorch's linear +
cross_entropy, gradcheck / gradgradcheck, chunking, ignore_index, vmap, bad input, and MAML through it
against the sequential create_graph oracle."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import metakernels as mk
from conftest import ops_run
from maml_reference import sequential_meta_loss
from metakernels.models import lm_loss, lm_loss_chunked_head
from metakernels.ops import vocab_head
from test_maml import _assert_grads_close, _grads, _model, _tasks

N, R, D, V = 3, 7, 5, 11


def _inputs(seed=0, bias=True, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, R, D, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(N, V, D, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(N, V, generator=gen, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N, R), generator=gen)
    targets[0, 2] = targets[2, 6] = -100
    return h, w, b, targets


def _torch_head(h, w, b, targets):
    return torch.stack([F.cross_entropy(h[n] @ w[n].T + (0 if b is None else b[n]), targets[n]) for n in range(N)])


@pytest.mark.parametrize("chunk_rows,budget", [(1, None), (3, None), (None, None), (None, 2 * R * V), (None, 3 * V)],
                         ids=["1-row", "3-rows", "auto", "auto-2-tasks", "auto-3-rows-of-1-task"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_values_and_two_derivatives_equal_pytorch(chunk_rows, budget, bias, monkeypatch):
    if budget is not None:  # the automatic chunks' size (the default fits all N tasks here)
        monkeypatch.setattr(vocab_head, "DEFAULT_CHUNK_ELEMENTS", budget)
    h, w, b, targets = _inputs(bias=bias)
    inputs = [t for t in (h, w, b) if t is not None]
    y = mk.ops.linear_cross_entropy(h, w, b, targets, chunk_rows=chunk_rows)
    y0 = _torch_head(h, w, b, targets)
    torch.testing.assert_close(y, y0, rtol=1e-13, atol=1e-13)
    g = torch.randn(N, dtype=torch.float64, requires_grad=True)
    first = torch.autograd.grad(y, inputs, g, create_graph=True)
    first0 = torch.autograd.grad(y0, inputs, g, create_graph=True)
    probes = [torch.randn_like(t) for t in first]
    second = torch.autograd.grad(sum((f * p).sum() for f, p in zip(first, probes)), inputs + [g])
    second0 = torch.autograd.grad(sum((f * p).sum() for f, p in zip(first0, probes)), inputs + [g])
    for got, want in zip(first + second, first0 + second0):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_chunks_hold_whole_tasks_where_they_fit(monkeypatch):
    every = slice(0, 7)
    assert vocab_head._chunks(3, 7, 11, 0) == [(slice(0, 3), every)]
    assert vocab_head._chunks(3, 7, 11, 3) == [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(3, 6)),
                                               (slice(0, 3), slice(6, 7))]
    monkeypatch.setattr(vocab_head, "DEFAULT_CHUNK_ELEMENTS", 2 * 7 * 11)
    assert vocab_head._chunks(3, 7, 11, 0) == [(slice(0, 2), every), (slice(2, 3), every)]
    monkeypatch.setattr(vocab_head, "DEFAULT_CHUNK_ELEMENTS", 3 * 11)
    pieces = [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert vocab_head._chunks(2, 7, 11, 0) == [(slice(t, t + 1), rows) for t in range(2) for rows in pieces]


def test_gradcheck_and_gradgradcheck():
    h, w, b, targets = _inputs(seed=1)
    fn = lambda h, w, b: mk.ops.linear_cross_entropy(h, w, b, targets, chunk_rows=2)  # noqa: E731
    assert gradcheck(fn, (h, w, b))
    assert gradgradcheck(fn, (h, w, b))


def test_shared_weight_gives_a_scalar_and_float32_is_close():
    h, w, b, targets = _inputs(seed=2)
    loss = mk.ops.linear_cross_entropy(h[0], w[0], b[0], targets[0])
    assert loss.shape == ()
    torch.testing.assert_close(loss, F.cross_entropy(h[0] @ w[0].T + b[0], targets[0]))
    h32, w32, b32 = (t.detach().float() for t in (h, w, b))
    torch.testing.assert_close(mk.ops.linear_cross_entropy(h32, w32, b32, targets).double(),
                               _torch_head(h, w, b, targets).detach(), rtol=1e-5, atol=1e-5)


def test_vmap_over_per_task_weights_equals_a_loop():
    h, w, b, targets = (t.detach() if t.dtype.is_floating_point else t for t in _inputs(seed=3))
    got = torch.vmap(mk.ops.linear_cross_entropy)(h, w, b, targets)
    want = torch.stack([mk.ops.linear_cross_entropy(h[n], w[n], b[n], targets[n]) for n in range(N)])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("T,K", [(1, 1), (3, 2)])
@pytest.mark.parametrize("fused_layers", [False, True], ids=["torch-layers", "fused-layers"])
def test_maml_through_the_chunked_head_matches_the_sequential_reference(T, K, fused_layers):
    reference_model = _model()
    model = _model()
    support, query = _tasks(T)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=K, fused_layers=fused_layers)
    got = _grads(maml(lm_loss_chunked_head, support, query), list(model.parameters()))
    names = [n for n, _ in reference_model.named_parameters()]
    want = _grads(sequential_meta_loss(reference_model, lm_loss, support, query, names=names,
                                       lrs={n: 0.3 for n in names}, steps=K), list(reference_model.parameters()))
    _assert_grads_close(got, want)


@pytest.mark.parametrize("call,exc,words", [
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w[:, :, :4], None, t), ValueError, ["'weight'", "[3, 11, 4]"]),
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w, torch.zeros(3, 10, dtype=torch.float64), t), ValueError,
     ["'bias'", "[3, 11]", "[3, 10]"]),
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w, None, t.float()), TypeError, ["'targets'", "int64"]),
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w, None, t[:, :3]), ValueError, ["'targets'", "[3, 7]", "[3, 3]"]),
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w, None, t + 11), ValueError, ["'targets'", "[0, 11)"]),
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w, None, t, chunk_rows=0), ValueError, ["'chunk_rows'"]),
    (lambda h, w, t: mk.ops.linear_cross_entropy(h, w.float(), None, t), TypeError, ["'weight'", "float32"]),
])
def test_bad_input_names_the_argument(call, exc, words):
    h, w, _, targets = _inputs()
    with pytest.raises(exc) as info:
        call(h.detach(), w.detach(), targets.clamp_min(0))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_task_with_every_target_ignored_has_a_nan_loss_as_in_pytorch():
    h, w, b, targets = _inputs(seed=4)
    targets[1] = -100
    loss = mk.ops.linear_cross_entropy(h, w, b, targets)
    assert torch.isnan(loss[1]) and torch.isnan(_torch_head(h, w, b, targets)[1])
    torch.testing.assert_close(loss[[0, 2]], _torch_head(h, w, b, targets)[[0, 2]], rtol=1e-13, atol=1e-13)


def _new_tensors_of(numel, fn):
    """fn's result, and the names of the ops fn ran that allocated a new tensor of ``numel`` elements (in-place
    ops and views excluded)."""
    result, ran = ops_run(fn)
    return result, [name for name, func, outputs in ran for o in outputs
                    if o.numel() == numel and not name.endswith("_") and not func.is_view]


def test_each_pass_allocates_at_most_two_logit_sized_buffers_per_chunk():
    h, w, b, targets = _inputs(seed=5)
    logits = N * R * V  # one chunk covers every row here
    y, forward = _new_tensors_of(logits, lambda: mk.ops.linear_cross_entropy(h, w, b, targets))
    first, backward = _new_tensors_of(logits, lambda: torch.autograd.grad(y.sum(), (h, w, b), create_graph=True))
    _, double_backward = _new_tensors_of(logits, lambda: torch.autograd.grad(sum(f.sum() for f in first), (h, w, b)))
    assert forward == ["baddbmm"] and backward == ["baddbmm"]  # the logits, the bias added by the product
    assert double_backward == ["baddbmm", "bmm"]  # p and u; <p, u> without a p * u temporary


def test_vmap_reads_per_task_weights_in_place():
    """Fast weights are views into the flat [T, P] layout; the head must not copy them (at V = 32k each copy
    is [T, V, D], kept for the backward)."""
    h, w, b, targets = (t.detach() if t.dtype.is_floating_point else t for t in _inputs(seed=6))
    flat = torch.cat([w.reshape(N, -1), b, torch.zeros(N, 3, dtype=w.dtype)], 1).requires_grad_()
    w_view, b_view = flat[:, :V * D].view(N, V, D), flat[:, V * D:V * D + V]
    loss, made = _new_tensors_of(N * V * D, lambda: torch.vmap(mk.ops.linear_cross_entropy)(h, w_view, b_view, targets))
    assert made == []
    torch.testing.assert_close(loss, _torch_head(h, w, b, targets), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("used", ["dh", "dw", "db", "dw+db"])
def test_second_derivative_through_some_of_the_gradients_equals_pytorch(used):
    """Only the used gradients have a cotangent (with only the head adapted, dh is unused)."""
    h, w, b, targets = _inputs(seed=7)
    probes = {k: torch.randn_like(t) for k, t in zip(("dh", "dw", "db"), (h, w, b))}
    results = []
    for head in (mk.ops.linear_cross_entropy, _torch_head):
        first = dict(zip(("dh", "dw", "db"), torch.autograd.grad(head(h, w, b, targets).sum(), (h, w, b),
                                                                  create_graph=True)))
        seed = sum((first[k] * probes[k]).sum() for k in used.split("+"))
        results.append(torch.autograd.grad(seed, (h, w, b), allow_unused=True, materialize_grads=True))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_double_backward_skips_the_products_of_unused_gradients():
    def products_of_double_backward(used):
        h, w, b, targets = _inputs(seed=8)
        first = torch.autograd.grad(mk.ops.linear_cross_entropy(h, w, b, targets).sum(), (h, w, b), create_graph=True)
        _, ran = ops_run(lambda: torch.autograd.grad(sum(first[i].sum() for i in used), (h, w, b), allow_unused=True))
        return [name for name, _, outputs in ran  # not <p, u>, the per-row product
                if name in ("bmm", "baddbmm", "baddbmm_") and outputs[0].numel() != N * R]

    assert len(products_of_double_backward([0, 1, 2])) == 7  # logits; u: 2; dh: 2; dW: 2
    assert len(products_of_double_backward([1])) == 5  # dh unused: no W A_h in u, no delta A_h^T in dW
    assert len(products_of_double_backward([0])) == 5  # dW unused: no A_W h in u, no delta A_W in dh
    assert len(products_of_double_backward([2])) == 3  # only db: logits, s W, s^T h
