"""The fused, twice-differentiable LayerNorm / RMSNorm / bias + GELU / causal softmax: every backend's
three kernels against the float64 reference over odd shapes and dtypes, the reference against PyTorch's own layers
(values, gradients and gradients of gradients), gradcheck / gradgradcheck of the public ops on every
backend, the vmap rule, bad input."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import metakernels as mk
from conftest import triton_interpreted
from metakernels.ops import gelu, norm, softmax

SHAPES = [(1, 1, 1), (3, 37, 5), (2, 33, 129), (1, 3, 1037)]


def _dtypes(backend_name):
    if triton_interpreted(backend_name):
        return [torch.float64, torch.float32]  # the interpreter has no bf16
    return [torch.float64, torch.float32, torch.bfloat16]


def _tol(dtype):
    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]


def _close(got, want, dtype, what):
    """|got - want| <= tol (|want|_max + 1): scaled to the tensor, not to each element (norms of rows of one
    element, or gelu'' near its zeros, have outputs that are rounding noise around 0)."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= _tol(dtype) * (want.abs().max().item() + 1.0), (what, err)


def _run(backend_name, fn):
    """The kernel function ``fn`` of the forced backend (the extension, the Triton module, the reference)."""
    if backend_name in ("cpu", "cuda"):
        return getattr(mk._backend.extension(), fn)
    family, what = fn.split("_", 1)
    if backend_name == "triton":
        return getattr(importlib.import_module(f"metakernels.ops.{family}_triton"), fn)
    return getattr(importlib.import_module(f"metakernels.ops.{family}"), "reference_" + what)


@pytest.mark.parametrize("centered", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_norm_kernels_match_the_float64_reference(backend, centered, shape):
    name, device = backend
    gen = torch.Generator().manual_seed(sum(shape))
    N, R, D = shape
    for dtype in _dtypes(name):
        def rand(*s, scale=1.0, shift=0.0):
            return (torch.randn(s, generator=gen, dtype=torch.float64) * scale + shift).to(dtype=dtype, device=device)
        x, w, g, a = rand(N, R, D, scale=3.0, shift=1.0), rand(N, D), rand(N, R, D), rand(N, R, D)
        b = rand(N, D) if centered else None
        aw, ab = rand(N, D), rand(N, D)
        inputs = [x.clone(), w.clone(), g.clone(), a.clone(), aw.clone()]
        d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
        y, mean, rstd = _run(name, "norm_forward")(x, w, b, 1e-5, centered)
        y0, mean0, rstd0 = norm.reference_forward(d(x), d(w), d(b), 1e-5, centered)
        for got, want, what in ((y, y0, "y"), (mean, mean0, "mean"), (rstd, rstd0, "rstd")):
            _close(got.cpu(), want, dtype, what)
        got = _run(name, "norm_backward")(g, x, w, mean, rstd, centered)
        want = norm.reference_backward(d(g), d(x), d(w), mean0, rstd0, centered)
        for gt, wt, what in zip(got, want, ("dx", "dw", "db")):
            _close(gt.cpu(), wt, dtype, what)
        got = _run(name, "norm_double_backward")(a, aw, ab if centered else None, g, x, w, mean, rstd, centered)
        want = norm.reference_double_backward(d(a), d(aw), d(ab) if centered else None, d(g), d(x), d(w), mean0, rstd0,
                                              centered)
        for gt, wt, what in zip(got, want, ("dg", "ddx", "ddw")):
            _close(gt.cpu(), wt, dtype, what)
        for before, after in zip(inputs, [x, w, g, a, aw]):
            assert torch.equal(before, after), "an input was modified"


@pytest.mark.parametrize("tanh_form", [False, True], ids=["erf", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gelu_kernels_match_the_float64_reference(backend, tanh_form, shape):
    name, device = backend
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    N, R, C = shape
    for dtype in _dtypes(name):
        def rand(*s):
            return (2 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)
        x, b, g, a = rand(N, R, C), rand(N, C), rand(N, R, C), rand(N, R, C)
        inputs = [x.clone(), b.clone(), g.clone(), a.clone()]
        d = lambda t: t.double().cpu()  # noqa: E731
        _close(_run(name, "gelu_forward")(x, b, tanh_form).cpu(), gelu.reference_forward(d(x), d(b), tanh_form), dtype, "y")
        _close(_run(name, "gelu_backward")(g, x, b, tanh_form).cpu(), gelu.reference_backward(d(g), d(x), d(b), tanh_form),
               dtype, "dx")
        got = _run(name, "gelu_double_backward")(a, g, x, b, tanh_form)
        want = gelu.reference_double_backward(d(a), d(g), d(x), d(b), tanh_form)
        for gt, wt, what in zip(got, want, ("dg", "ddx")):
            _close(gt.cpu(), wt, dtype, what)
        for before, after in zip(inputs, [x, b, g, a]):
            assert torch.equal(before, after), "an input was modified"


def _torch_layer(kind):
    """PyTorch's own layer with a per-task affine, as the oracle of the formulas."""
    if kind == "layernorm":
        return lambda x, w, b: F.layer_norm(x, x.shape[-1:], eps=1e-5) * w.unsqueeze(1) + b.unsqueeze(1)
    if kind == "rmsnorm":
        return lambda x, w, b: F.rms_norm(x, x.shape[-1:], eps=1e-6) * w.unsqueeze(1)
    approximate = "tanh" if kind == "gelu-tanh" else "none"
    return lambda x, w, b: F.gelu(x + b.unsqueeze(1), approximate=approximate)


def _ours(kind):
    if kind == "layernorm":
        return lambda x, w, b: mk.ops.layer_norm(x, w, b)
    if kind == "rmsnorm":
        return lambda x, w, b: mk.ops.rms_norm(x, w)
    approximate = "tanh" if kind == "gelu-tanh" else "none"
    return lambda x, w, b: mk.ops.bias_gelu(x, b, approximate)


KINDS = ["layernorm", "rmsnorm", "gelu-erf", "gelu-tanh"]


def _inputs(device, seed=0, requires_grad=True, shape=(2, 3, 5)):
    gen = torch.Generator().manual_seed(seed)
    N, R, D = shape
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * k).to(device).requires_grad_(requires_grad)
            for s, k in (((N, R, D), 2.0), ((N, D), 1.0), ((N, D), 1.0))]


@pytest.mark.parametrize("kind", KINDS)
def test_first_and_second_derivatives_equal_pytorch_layers(backend, kind):
    _, device = backend
    x, w, b = _inputs(device)
    ours, theirs = _ours(kind), _torch_layer(kind)
    y, y0 = ours(x, w, b), theirs(x, w, b)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y).requires_grad_()
    first = torch.autograd.grad(y, (x, w, b), g, create_graph=True, allow_unused=True)
    first0 = torch.autograd.grad(y0, (x, w, b), g, create_graph=True, allow_unused=True)
    probe = [torch.randn_like(t) for t in (x, w, b)]
    s = sum((f * p).sum() for f, p in zip(first, probe) if f is not None)
    s0 = sum((f * p).sum() for f, p in zip(first0, probe) if f is not None)
    second = torch.autograd.grad(s, (x, w, g), allow_unused=True)
    second0 = torch.autograd.grad(s0, (x, w, g), allow_unused=True)
    for got, want in zip(first + second, first0 + second0):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_and_gradgradcheck(backend, kind):
    name, device = backend
    shape = (2, 3, 5) if triton_interpreted(name) else (2, 4, 7)
    x, w, b = _inputs(device, seed=3, shape=shape)
    fn = _ours(kind)
    if kind == "rmsnorm":
        args, f = (x, w), (lambda x, w: fn(x, w, None))
    else:
        args, f = (x, w, b), fn
    assert gradcheck(f, args)
    assert gradgradcheck(f, args)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_weight_over_any_leading_shape(kind):
    """weight [D] normalises every row; a 4-D x keeps its shape."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=torch.float64)
    w, b = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    got = _ours(kind)(x, w, b)
    want = _torch_layer(kind)(x.reshape(1, -1, 6), w[None], b[None]).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_per_task_weights_equals_a_loop(kind):
    """The vmap rule folds the vmapped dimension into one task-batched launch."""
    x, w, b = _inputs("cpu", seed=7, requires_grad=False, shape=(4, 3, 6))
    fn = _ours(kind)
    got = torch.vmap(lambda xt, wt, bt: fn(xt, wt, bt))(x, w, b)
    want = torch.stack([fn(x[t], w[t], b[t]) for t in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    shared = torch.vmap(lambda xt: fn(xt, w[0], b[0]))(x)  # unbatched weight inside vmap
    torch.testing.assert_close(shared, torch.stack([fn(x[t], w[0], b[0]) for t in range(4)]), rtol=1e-13, atol=1e-13)


_LAYERS = {kind: (_ours(kind), (6,), (6,)) for kind in KINDS}
_LAYERS["linear"] = (mk.ops.task_linear, (5, 6), (5,))
_LAYERS["softmax"] = (lambda s, w, b: mk.ops.causal_softmax(s * w.sum() + b.sum(), 0.5), (6,), (6,))


def _derivatives(fn, x, w, b, vmapped_fn=None):
    """fn's output and its first and second derivatives (along fixed probes) with respect to x, w, b."""
    y = (vmapped_fn or fn)(x, w, b)
    probe = torch.linspace(-1.0, 1.0, y.numel(), dtype=y.dtype).reshape(y.shape)
    first = torch.autograd.grad(y, (x, w, b), probe, create_graph=True, materialize_grads=True)
    second = torch.autograd.grad(sum((d * d.detach().cos()).sum() for d in first), (x, w, b), materialize_grads=True)
    return (y, *first, *second)


@pytest.mark.parametrize("layer", list(_LAYERS))
def test_vmap_over_tasks_of_per_task_weights_folds_them(layer):
    """vmap over a function that itself takes per-task weights [N, ...] (the rule's fold path: B * N tasks in
    one launch): values and two derivatives equal the same B * N tasks called without vmap."""
    fn, w_shape, b_shape = _LAYERS[layer]
    gen = torch.Generator().manual_seed(3)
    B, N, R = 3, 2, 4
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
               for s in ((B, N, R, 6), (B, N, *w_shape), (B, N, *b_shape)))
    got = _derivatives(fn, x, w, b, torch.vmap(fn))
    if layer == "softmax":  # its "weights" are scalars per slice: the loop is the oracle
        want = _derivatives(fn, x, w, b, lambda x, w, b: torch.stack([fn(x[i], w[i], b[i]) for i in range(B)]))
    else:
        flat = lambda t: t.reshape(B * N, *t.shape[2:])  # noqa: E731
        want = _derivatives(fn, x, w, b, lambda x, w, b: fn(flat(x), flat(w), flat(b)).reshape(B, N, R, -1))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


_VIEW_NODES = {"ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "PermuteBackward0",
               "TransposeBackward0", "ExpandBackward0", "CloneBackward0", "UnsqueezeBackward0", "SqueezeBackward0"}


def _graph_node_names(*tensors):
    seen, names, stack = set(), set(), [t.grad_fn for t in tensors]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("layer", [k for k in _LAYERS if k != "softmax"])
def test_vmap_over_per_task_weights_records_no_views(layer):
    """Under vmap over per-task weights (the inner loop's case), the op's forward and create_graph backward
    put no view, reshape or copy node in the graph: each would cost an autograd node in the forward,
    another in the inner backward, and their evaluations in the meta-backward."""
    fn, w_shape, b_shape = _LAYERS[layer]
    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
               for s in ((3, 2, 4, 6), (3, *w_shape), (3, *b_shape)))
    y = torch.vmap(fn)(x, w, b)
    first = [d for d in torch.autograd.grad(y, (x, w, b), torch.ones_like(y), create_graph=True, allow_unused=True)
             if d is not None]
    assert not _graph_node_names(y, *first) & _VIEW_NODES, _graph_node_names(y, *first)


def test_causal_softmax_under_vmap_records_no_views():
    s = torch.randn(3, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    p = torch.vmap(lambda x: mk.ops.causal_softmax(x, 0.5), in_dims=1)(s)
    (ds,) = torch.autograd.grad(p, s, torch.ones_like(p), create_graph=True)
    assert _graph_node_names(p, ds) & _VIEW_NODES == {"PermuteBackward0"}  # the one move of dim 1 to the front


_TWICE_DIFFERENTIABLE = {
    "layer_norm": lambda x: mk.ops.layer_norm(x, torch.ones(x.shape[-1], dtype=x.dtype)),
    "bias_gelu": lambda x: mk.ops.bias_gelu(x, None),
    "causal_softmax": lambda x: mk.ops.causal_softmax(x, 0.7),
    "causal_attention": lambda x: mk.ops.causal_attention(x, 1),
    "linear_cross_entropy": lambda x: mk.ops.linear_cross_entropy(
        x, torch.linspace(-1, 1, 42, dtype=x.dtype).reshape(7, 6), None, torch.arange(10).reshape(2, 5) % 7),
}


@pytest.mark.parametrize("op", list(_TWICE_DIFFERENTIABLE))
def test_triple_derivative_is_refused_not_wrong(op):
    """A third derivative through the double backward raises, also where the second derivative reaches the
    input by another path too (here the squared output): torch's once_differentiable would drop the
    double backward's part there and return a wrong number."""
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    y = _TWICE_DIFFERENTIABLE[op](x)
    (d,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    (dd,) = torch.autograd.grad((d * d).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{op}.* is twice differentiable, not three times"):
        torch.autograd.grad(dd.sum(), x)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: mk.ops.layer_norm(torch.randn(2, 5), torch.randn(4)), ValueError, ["'weight'", "[4]", "[2, 5]"]),
    (lambda: mk.ops.layer_norm(torch.randn(3, 2, 5), torch.randn(2, 5)), ValueError, ["'weight'", "[2, 5]"]),
    (lambda: mk.ops.layer_norm(torch.randn(2, 5), torch.randn(5), torch.randn(4)), ValueError, ["'bias'", "[5]", "[4]"]),
    (lambda: mk.ops.layer_norm(torch.randn(2, 5), torch.randn(5, dtype=torch.float64)), TypeError, ["'weight'", "float64"]),
    (lambda: mk.ops.layer_norm(torch.randn(2, 5), torch.randn(5), eps=0.0), ValueError, ["'eps'"]),
    (lambda: mk.ops.rms_norm(torch.arange(5), torch.randn(5)), TypeError, ["'x'", "int64"]),
    (lambda: mk.ops.bias_gelu(torch.randn(2, 5), torch.randn(3)), ValueError, ["'bias'", "[3]", "[2, 5]"]),
    (lambda: mk.ops.bias_gelu(torch.randn(2, 5), None, "fast"), ValueError, ["'approximate'", "'fast'"]),
    (lambda: mk.ops.bias_gelu(torch.randn(2, 5), torch.randn(5, dtype=torch.float64)), TypeError, ["'bias'"]),
])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_inputs(kind):
    x, w, b = torch.randn(0, 5), torch.randn(5), torch.randn(5)
    assert _ours(kind)(x, w, b).shape == (0, 5)


# ------------------------------------------------------------------------------------- causal softmax

SOFTMAX_SHAPES = [(1, 1, 1), (3, 5, 7), (2, 33, 33), (1, 4, 130)]


def _causal_softmax_torch(s, scale):
    S_q, S_k = s.shape[-2:]
    hidden = torch.ones(S_q, S_k, dtype=torch.bool, device=s.device).triu(S_k - S_q + 1)
    return torch.softmax((s * scale).masked_fill(hidden, float("-inf")), -1)


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_softmax_kernels_match_the_float64_reference(backend, shape):
    name, device = backend
    gen = torch.Generator().manual_seed(sum(shape) + 2)
    for dtype in _dtypes(name):
        s, g, a = ((3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)
                   for _ in range(3))
        inputs = [s.clone(), g.clone(), a.clone()]
        p = _run(name, "softmax_forward")(s, 0.7)
        p0 = softmax.reference_forward(s.double().cpu(), 0.7)
        _close(p.cpu(), p0, dtype, "p")
        _close(_run(name, "softmax_backward")(g, p, 0.7).cpu(),
               softmax.reference_backward(g.double().cpu(), p0, 0.7), dtype, "ds")
        got = _run(name, "softmax_double_backward")(a, g, p, 0.7)
        want = softmax.reference_double_backward(a.double().cpu(), g.double().cpu(), p0, 0.7)
        for gt, wt, what in zip(got, want, ("dg", "dp")):
            _close(gt.cpu(), wt, dtype, what)
        for before, after in zip(inputs, [s, g, a]):
            assert torch.equal(before, after), "an input was modified"


def _causal_scores(backend):
    name, device = backend
    shape = (2, 3, 5) if triton_interpreted(name) else (2, 2, 5, 7)
    gen = torch.Generator().manual_seed(11)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device).requires_grad_()


def test_causal_softmax_equals_pytorch_to_second_order(backend):
    s = _causal_scores(backend)
    y, y0 = mk.ops.causal_softmax(s, 0.7), _causal_softmax_torch(s, 0.7)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y).requires_grad_()
    (d,), (d0,) = torch.autograd.grad(y, s, g, create_graph=True), torch.autograd.grad(y0, s, g, create_graph=True)
    probe = torch.randn_like(d)
    for got, want in zip(torch.autograd.grad((d * probe).sum(), (s, g)), torch.autograd.grad((d0 * probe).sum(), (s, g))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_causal_softmax_passes_gradcheck_and_gradgradcheck(backend):
    f = lambda s: mk.ops.causal_softmax(s, 0.7)  # noqa: E731
    s = _causal_scores(backend)
    assert gradcheck(f, (s,)) and gradgradcheck(f, (s,))


def test_causal_softmax_under_vmap_and_bad_input():
    s = torch.randn(4, 2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(lambda x: mk.ops.causal_softmax(x, 0.5))(s), _causal_softmax_torch(s, 0.5),
                               rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="S_k=3 keys for S_q=4"):
        mk.ops.causal_softmax(torch.randn(4, 3))
    with pytest.raises(TypeError, match="'scores'"):
        mk.ops.causal_softmax(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="'scale'"):
        mk.ops.causal_softmax(torch.randn(2, 2), float("nan"))
