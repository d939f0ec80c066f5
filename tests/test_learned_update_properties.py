"""Property-based tests of the learned-optimizer step (hypothesis): random task counts (T = 1 included),
tensor segmentations (one-element tensors, tails shorter than a lane block), MLP sizes, dtypes, strides
(non-contiguous and expanded operands), NaN/Inf in the gradients, and mismatched shapes.  Every case
matches the float64 reference (NaN where it has NaN) or raises a clear error; inputs are never
modified."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metakernels as mk
from metakernels import _backend
from metakernels.ops.learned_update import num_weights

# The interpreted Triton backend takes ~1 s per launch; its kernels are covered by test_learned_update.
BACKENDS = [b for b in ("cpu", "reference") if _backend._why_unavailable(b, torch.device("cpu")) is None]
HYPER = mk.ops.LoptHyper(step_mult=0.1, exp_mult=0.5)


@st.composite
def cases(draw):
    T = draw(st.integers(1, 3))
    segments = draw(st.lists(st.integers(1, 70), min_size=1, max_size=3))
    hidden, layers = draw(st.integers(1, 9)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    layout = draw(st.sampled_from(["contiguous", "strided", "expanded"]))
    poison = draw(st.sampled_from([None, None, "nan", "inf"]))
    mismatch = draw(st.sampled_from([None] * 5 + ["grads", "state"]))
    return T, segments, hidden, layers, dtype, layout, poison, mismatch, draw(st.sampled_from(BACKENDS)), draw(st.integers(0, 2**16))


def _inputs(T, P, hidden, layers, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(T, P, generator=gen, dtype=torch.float64).to(dtype)
    grads = (0.1 * torch.randn(T, P, generator=gen, dtype=torch.float64)).to(dtype)
    if layout == "strided":
        params = torch.randn(T, 2 * P, generator=gen, dtype=torch.float64).to(dtype)[:, ::2]
    elif layout == "expanded":
        params = params[:1].expand(T, P)
    state = torch.cat([0.1 * torch.randn(3, T, P, generator=gen, dtype=torch.float64),
                       0.01 + 0.01 * torch.rand(1, T, P, generator=gen, dtype=torch.float64)]).to(dtype)
    weights = (0.5 * torch.randn(num_weights(hidden, layers), generator=gen, dtype=torch.float64))
    return params, grads, state, weights.to(torch.float64 if dtype == torch.float64 else torch.float32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_learned_update_matches_reference_or_raises(case):
    T, segments, hidden, layers, dtype, layout, poison, mismatch, backend, seed = case
    P = sum(segments)
    params, grads, state, weights = _inputs(T, P, hidden, layers, dtype, layout, seed)
    if poison:
        grads[0, seed % P] = float(poison)
    if mismatch == "grads":
        grads = grads[:, :-1] if P > 1 else grads[:, :0]
    elif mismatch == "state":
        state = state[:3]
    before = [x.clone() for x in (params, grads, state, weights)]
    kwargs = dict(hidden=hidden, layers=layers, segments=segments, hyper=HYPER)
    try:
        with mk.use_backend(backend):
            got = mk.ops.learned_update(params, grads, state, weights, **kwargs)
    except (ValueError, TypeError) as exc:
        assert mismatch is not None, f"unexpected error: {exc}"
        assert mismatch in str(exc)
        return
    assert mismatch is None, "a mismatched operand was accepted"
    with mk.use_backend("reference"):
        want = mk.ops.learned_update(*(x.double() for x in (params, grads, state, weights)), **kwargs)
    tol = 1e-10 if dtype == torch.float64 else 2e-3
    for g, w in zip(got, want):
        assert g.dtype == dtype
        finite = torch.isfinite(w)
        assert torch.equal(torch.isfinite(g), finite)
        scale = float(w[finite].abs().max()) if finite.any() else 1.0
        torch.testing.assert_close(g.double()[finite], w[finite], rtol=tol, atol=tol * max(scale, 1.0))
    for x, b in zip((params, grads, state, weights), before):
        assert torch.equal(x, b) or (x.isnan() == b.isnan()).all() and torch.equal(x.nan_to_num(), b.nan_to_num())
