"""Property-based tests of the update ops (hypothesis): random shapes (zero-size and T=1 included),
dtypes, operand layouts and strides (contiguous, non-contiguous, expanded), scalar or tensor learning
rates, NaN/Inf in the inputs, and deliberately mismatched shapes.  Every case either matches the
float64 reference (NaN where it has NaN) or raises a clear error; inputs are never modified."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metakernels as mk
from metakernels import _backend
from update_cases import STATE_NAMES, call

BACKENDS = [b for b in ("cpu", "triton", "reference") if _backend._why_unavailable(b, torch.device("cpu")) is None]


@st.composite
def update_cases(draw):
    op = draw(st.sampled_from(["sgd", "momentum", "adam"]))
    T, P = draw(st.integers(0, 4)), draw(st.integers(0, 33))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**16))
    names = ["params", "grads", *STATE_NAMES[op]]
    layouts = {n: draw(st.sampled_from(["shared", "rows", "rows_strided", "rows_expanded"])) for n in names}
    lr_kind = draw(st.sampled_from(["float", "scalar_tensor", "shared", "rows"]))
    poison = draw(st.sampled_from([None, "nan", "inf"]))
    mismatch = draw(st.sampled_from([None] * 4 + ["P", "T"]))
    backend = draw(st.sampled_from(BACKENDS))
    return op, T, P, dtype, seed, layouts, lr_kind, poison, mismatch, backend


def _operand(kind, T, P, dtype, gen, positive):
    """(tensor passed to the op, leaf that receives its gradient)."""
    def rand(*shape):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5 if positive else torch.randn(shape, generator=gen, dtype=torch.float64)
        return x.to(dtype).requires_grad_()

    if kind == "shared":
        leaf = rand(P)
        return leaf, leaf
    if kind == "rows":
        leaf = rand(T, P)
        return leaf, leaf
    if kind == "rows_strided":
        leaf = rand(T, 2 * P)
        return leaf[:, ::2], leaf
    leaf = rand(P)
    return leaf.expand(T, P), leaf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update_cases())
def test_update_matches_reference_or_raises_clearly(case):
    op, T, P, dtype, seed, layouts, lr_kind, poison, mismatch, backend = case
    gen = torch.Generator().manual_seed(seed)
    operands, leaves = {}, {}
    for name, kind in layouts.items():
        operands[name], leaves[name] = _operand(kind, T, P, dtype, gen, positive=(name == "v"))
    if poison and leaves["grads"].numel():
        with torch.no_grad():
            leaves["grads"].view(-1)[0] = float(poison)
    lr = {"float": 0.1, "scalar_tensor": torch.tensor(0.1, dtype=dtype),
          "shared": torch.full((P,), 0.1, dtype=dtype), "rows": torch.full((T, P), 0.1, dtype=dtype)}[lr_kind]
    if mismatch == "P":
        operands["grads"] = torch.randn(operands["grads"].shape[:-1] + (P + 1,), dtype=dtype)
    elif mismatch == "T":
        operands["grads"] = torch.randn(T + 1, P, dtype=dtype)
    before = {n: t.detach().clone() for n, t in operands.items()}
    others_have_rows = any(t.dim() == 2 for n, t in operands.items() if n != "grads") or (
        isinstance(lr, torch.Tensor) and lr.dim() == 2)

    with mk.use_backend(backend):
        if mismatch == "P" or (mismatch == "T" and others_have_rows):
            with pytest.raises(ValueError, match="must have shape"):
                call(op, operands, lr)
            return
        outs = call(op, operands, lr)

    with mk.use_backend("reference"):
        expected = call(op, {n: t.detach().double() for n, t in operands.items()},
                        lr.double() if isinstance(lr, torch.Tensor) else lr)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for o, e in zip(outs, expected):
        assert o.shape == e.shape and o.dtype == dtype
        torch.testing.assert_close(o.detach().double(), e, rtol=tol, atol=tol, equal_nan=True)
    if mismatch is None:  # cotangents equal those autograd derives from the reference composition
        got = torch.autograd.grad([o.sum() for o in outs], list(leaves.values()), allow_unused=True)
        with mk.use_backend("reference"):
            ref_outs = call(op, operands, lr)
        want = torch.autograd.grad([o.sum() for o in ref_outs], list(leaves.values()), allow_unused=True)
        for name, g, w in zip(leaves, got, want):
            if g is None or w is None:
                assert g is None or w is None or torch.count_nonzero(torch.nan_to_num(g if w is None else w)) == 0, name
                continue
            torch.testing.assert_close(g, w, rtol=10 * tol, atol=10 * tol, equal_nan=True, msg=name)
    for name, t in operands.items():
        torch.testing.assert_close(t.detach(), before[name], rtol=0, atol=0, equal_nan=True)
