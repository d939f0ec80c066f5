"""Property-based tests of the fused layer ops (hypothesis): random task and row counts (T = 1 and one
row included), widths, dtypes, strides (non-contiguous and expanded x), shared or per-task weights,
NaN/Inf in x, and mismatched weights.  Every case matches the float64 reference formulas on the same
inputs, to first order as well (NaN where they have NaN), or raises a clear error; inputs are never
modified."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metakernels as mk
from metakernels import _backend

# The interpreted Triton backend takes ~1 s per launch; its kernels are covered by test_fused_layers.
BACKENDS = [b for b in ("cpu", "reference") if _backend._why_unavailable(b, torch.device("cpu")) is None]
OPS = ("layer_norm", "rms_norm", "bias_gelu", "causal_softmax")


@st.composite
def cases(draw):
    return dict(op=draw(st.sampled_from(OPS)), T=draw(st.integers(1, 3)), R=draw(st.integers(1, 40)),
                D=draw(st.integers(1, 70)), per_task=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                layout=draw(st.sampled_from(["contiguous", "strided", "expanded"])),
                poison=draw(st.sampled_from([None, None, "nan", "inf"])),
                mismatch=draw(st.sampled_from([None] * 6 + ["width", "tasks"])),
                backend=draw(st.sampled_from(BACKENDS)), seed=draw(st.integers(0, 2**16)))


def _call(op, x, w, b):
    if op == "layer_norm":
        return mk.ops.layer_norm(x, w, b)
    if op == "rms_norm":
        return mk.ops.rms_norm(x, w)
    if op == "causal_softmax":  # x [T, R, D] read as T blocks of R queries over D keys (D >= R required)
        return mk.ops.causal_softmax(x, 0.5)
    return mk.ops.bias_gelu(x, b)


def _oracle(op, x, w, b):
    """The same layer from PyTorch's ops in float64 (weights broadcast over x's rows)."""
    x, w, b = (t.double() for t in (x, w, b))
    if w.dim() == 2:
        w, b = w.unsqueeze(1), b.unsqueeze(1)
    if op == "layer_norm":
        return torch.nn.functional.layer_norm(x, x.shape[-1:]) * w + b
    if op == "rms_norm":
        return torch.nn.functional.rms_norm(x, x.shape[-1:], eps=1e-6) * w
    if op == "causal_softmax":
        S_q, S_k = x.shape[-2:]
        hidden = torch.ones(S_q, S_k, dtype=torch.bool).triu(S_k - S_q + 1)
        return torch.softmax((x * 0.5).masked_fill(hidden, float("-inf")), -1)
    return torch.nn.functional.gelu(x + b)


def _inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    T, R, D, dtype = case["T"], case["R"], case["D"], case["dtype"]
    x = (2 * torch.randn(T, R, 2 * D, generator=gen, dtype=torch.float64)).to(dtype)
    x = x[..., ::2] if case["layout"] == "strided" else x[..., :D].contiguous()
    if case["layout"] == "expanded":
        x = x[:, :1].expand(T, R, D)
    wshape = (T, D) if case["per_task"] else (D,)
    w = torch.randn(wshape, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(wshape, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fused_layers_match_pytorch_or_raise(case):
    x, w, b = _inputs(case)
    if case["poison"]:
        x = x.clone()
        x[0, 0, case["seed"] % x.shape[-1]] = float(case["poison"])
    if case["mismatch"] == "width":
        w, b = w[..., :-1], b[..., :-1]
    elif case["mismatch"] == "tasks" and case["per_task"]:
        w, b = torch.cat([w, w]), torch.cat([b, b])
    before = [t.clone() for t in (x, w, b)]
    x_grad, w_grad, b_grad = (t.detach().requires_grad_() for t in (x, w, b))
    bad = case["mismatch"] == "width" or (case["mismatch"] == "tasks" and case["per_task"])
    if case["op"] == "causal_softmax":  # no weights; too few keys is its bad input
        bad = x.shape[-1] < x.shape[-2]
    with mk.use_backend(case["backend"]):
        if bad:
            with pytest.raises(ValueError, match="argument '(weight|bias|scores)'"):
                _call(case["op"], x_grad, w_grad, b_grad)
            return
        y = _call(case["op"], x_grad, w_grad, b_grad)
        g = torch.ones_like(y)
        grads = torch.autograd.grad(y, (x_grad, w_grad, b_grad), g, allow_unused=True)
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t, t0) or (t.isnan() == t0.isnan()).all(), "an input was modified"
    x64, w64, b64 = (t.double().detach().requires_grad_() for t in (x, w, b))
    y0 = _oracle(case["op"], x64, w64, b64)
    grads0 = torch.autograd.grad(y0, (x64, w64, b64), torch.ones_like(y0), allow_unused=True)
    tol = 1e-9 if case["dtype"] == torch.float64 else 1e-4
    assert y.shape == x.shape
    for got, want in zip((y,) + grads, (y0,) + grads0):
        if want is None:
            continue
        if case["op"] == "causal_softmax":
            # Hidden keys: PyTorch's row of NaN spreads into them (and masked_fill's backward zeroes them);
            # ours keeps p = 0 there.  Compare the visible keys.
            S_q, S_k = x.shape[-2:]
            visible = ~torch.ones(S_q, S_k, dtype=torch.bool).triu(S_k - S_q + 1).expand(x.shape)
            got, want = got[visible], want[visible]
        assert (got.isnan() == want.isnan()).all(), "NaN where the oracle has none, or the reverse"
        finite = want.isfinite()
        scale = want[finite].abs().max().item() if finite.any() else 0.0
        torch.testing.assert_close(got.double()[finite], want[finite], rtol=0, atol=tol * (scale + 1))
