"""The vocabulary head's cross-entropy row kernels (metakernels.ops.xent): every backend's three kernels
against the float64 reference over odd shapes and dtypes (in place where they say so), non-finite rows,
the head through each backend to the second derivative, and bad input to the compiled kernels."""
import pytest
import torch
import torch.nn.functional as F

import metakernels as mk
from conftest import triton_interpreted
from metakernels.ops import xent
from test_fused_layers import _close, _dtypes, _run

SHAPES = [(1, 1), (3, 37), (2, 5, 129), (1, 1037)]


def _operands(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    M, V = torch.Size(shape[:-1]).numel(), shape[-1]
    z = 3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    u, c = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(M, generator=gen, dtype=torch.float64)
    lse = torch.logsumexp(z, -1).reshape(-1)
    y = torch.randint(0, V, (M,), generator=gen)
    return [t.to(dtype=dtype, device=device) for t in (z, u, lse)] + [y.to(device), c.to(dtype=dtype, device=device)]


@pytest.mark.parametrize("shape", SHAPES + [(2, 33000)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_the_float64_reference(backend, shape):
    name, device = backend
    if triton_interpreted(name) and shape[-1] > 2000:
        pytest.skip("the Triton interpreter is slow; the 1037-wide rows already cross its blocks")
    for dtype in _dtypes(name):
        z, u, lse, y, c = _operands(shape, dtype, device, seed=sum(shape))
        z64, u64, lse64, c64 = (t.double().cpu() for t in (z, u, lse, c))
        _close(_run(name, "xent_forward")(z).cpu(), xent.reference_forward(z64), dtype, "lse")
        d, want_d = z.clone(), xent.reference_backward_(z64.clone(), lse64, y.cpu(), c64)
        assert _run(name, "xent_backward_")(d, lse, y, c).data_ptr() == d.data_ptr()
        _close(d.cpu(), want_d, dtype, "delta (in place)")
        d, s = z.clone(), u.clone()
        want_d, want_s = z64.clone(), u64.clone()
        r = _run(name, "xent_double_backward_")(d, s, lse, y, c)
        want_r = xent.reference_double_backward_(want_d, want_s, lse64, y.cpu(), c64)
        _close(r.cpu(), want_r, dtype, "<p, u> - u_y")
        _close(s.cpu(), want_s, dtype, "s (in place of u)")
        _close(d.cpu(), want_d, dtype, "delta (in place of z)")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's inf - inf
def test_logsumexp_of_infinite_rows_is_torchs(backend):
    name, device = backend
    z = torch.tensor([[float("-inf")] * 3, [0.0, float("inf"), 1.0], [1.0, 2.0, float("nan")]], dtype=torch.float64)
    got = _run(name, "xent_forward")(z.to(device)).cpu()
    torch.testing.assert_close(got, torch.logsumexp(z, -1), equal_nan=True)


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_the_head_on_each_backend_equals_pytorch_to_second_order(backend, chunk_rows):
    name, device = backend
    gen = torch.Generator().manual_seed(3)
    N, R, D, V = 2, 5, 3, 7
    h, w, b = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device).requires_grad_()
               for s in ((N, R, D), (N, V, D), (N, V)))
    targets = torch.randint(0, V, (N, R), generator=gen).to(device)
    targets[1, 2] = -100
    ours = mk.ops.linear_cross_entropy(h, w, b, targets, chunk_rows=chunk_rows)
    torch_ = torch.stack([F.cross_entropy(h[n] @ w[n].T + b[n], targets[n]) for n in range(N)])
    torch.testing.assert_close(ours, torch_, rtol=1e-12, atol=1e-12)
    firsts = [torch.autograd.grad(y.sum(), (h, w, b), create_graph=True) for y in (ours, torch_)]
    probes = [torch.randn_like(t) for t in firsts[0]]
    seconds = [torch.autograd.grad(sum((f * p).sum() for f, p in zip(first, probes)), (h, w, b)) for first in firsts]
    for got, want in zip(firsts[0] + seconds[0], firsts[1] + seconds[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(mk._backend.extension() is None, reason="the compiled extension is not built")
@pytest.mark.parametrize("call,words", [
    (lambda C, z, u, lse, y, c: C.xent_forward(z.t()), ["z", "contiguous"]),
    (lambda C, z, u, lse, y, c: C.xent_backward_(z, lse[:-1], y, c), ["lse", "shape"]),
    (lambda C, z, u, lse, y, c: C.xent_backward_(z, lse, y.int(), c), ["y", "dtype"]),
    (lambda C, z, u, lse, y, c: C.xent_backward_(z, lse, y + 7, c), ["y", "outside [0, 7)"]),
    (lambda C, z, u, lse, y, c: C.xent_backward_(z, lse, y - 1 - y, c), ["y", "outside"]),
    (lambda C, z, u, lse, y, c: C.xent_double_backward_(z, u.float(), lse, y, c), ["u", "dtype"]),
    (lambda C, z, u, lse, y, c: C.xent_double_backward_(z, z, lse, y, c), ["distinct"]),
])
def test_compiled_kernels_reject_bad_operands(call, words):
    z, u, lse, y, c = _operands((5, 7), torch.float64, "cpu", seed=0)
    with pytest.raises((RuntimeError, TypeError)) as info:
        call(mk._backend.extension(), z, u, lse, y, c)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
