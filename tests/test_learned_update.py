"""The fused learned-optimizer step on every backend against the float64 reference: values, the fused
backward, gradcheck / gradgradcheck, determinism, the [P] form, and bad input."""
import re

import pytest
import torch

import metakernels as mk
from conftest import triton_interpreted
from metakernels.ops.learned_update import LoptHyper, num_weights

# (T, segments, hidden, layers): odd sizes, a one-element tensor, tails shorter than a lane block.  The CPU
# backward's element-major MLP (hidden a multiple of the vector width) in both register tiles: 32 (two
# vectors per tile), 48 and 24 (a one-vector tile left over with 512-bit and 256-bit vectors).
CASES = [
    (1, [37], 4, 1),
    (3, [185, 1037, 1], 32, 2),
    (2, [5, 70], 8, 3),
    (1, [70], 48, 2),
    (2, [45, 19], 24, 1),
    # hidden=32 has its own compiled instance of the CPU jobs: every layer count through it
    (1, [70], 32, 1),
    (2, [33, 64], 32, 3),
]
# Larger multipliers than the defaults so the step is not negligible next to p (the test sees errors).
HYPER = LoptHyper(step_mult=0.1, exp_mult=0.5)


def make(T, segments, hidden, layers, dtype, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    P = sum(segments)

    def rand(*shape, scale=1.0, positive=False):
        x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1 if positive else torch.randn(shape, generator=gen, dtype=torch.float64)
        return (scale * x).to(dtype=dtype, device=device).requires_grad_(requires_grad)

    params, grads = rand(T, P), rand(T, P, scale=0.1)
    state = torch.cat([0.1 * torch.randn(3, T, P, generator=gen, dtype=torch.float64),
                       0.01 * (torch.rand(1, T, P, generator=gen, dtype=torch.float64) + 0.1)])
    state = state.to(dtype=dtype, device=device).requires_grad_(requires_grad)
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    weights = (torch.randn(num_weights(hidden, layers), generator=gen, dtype=torch.float64) * 0.5)
    weights = weights.to(dtype=wdtype, device=device).requires_grad_(requires_grad)
    return params, grads, state, weights


def step(params, grads, state, weights, segments, hidden, layers, hyper=HYPER):
    return mk.ops.learned_update(params, grads, state, weights, hidden=hidden, layers=layers, segments=segments,
                                 hyper=hyper)


def reference64(inputs, segments, hidden, layers):
    leaves = [x.detach().to("cpu", torch.float64).requires_grad_() for x in inputs]
    with mk.use_backend("reference"):
        return step(*leaves, segments, hidden, layers), leaves


# (rtol, atol as a fraction of the largest |expected|): the cotangents span orders of magnitude (r^3
# with a small second moment), so low precision is judged against the tensor's scale.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-3, 1e-5), torch.bfloat16: (2e-2, 1e-2)}


def close(actual, expected, dtype, what):
    rtol, scale = TOL[dtype]
    expected = expected.detach()
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected, rtol=rtol,
                               atol=scale * float(expected.abs().max().clamp_min(1.0)), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("T,segments,hidden,layers", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_forward_and_backward_match_reference(backend, T, segments, hidden, layers, dtype):
    check_against_reference(backend[1], T, segments, hidden, layers, dtype)


@pytest.mark.parametrize("T,segments,hidden,layers", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cpu_avx2_instance_matches_reference(T, segments, hidden, layers, dtype):
    """The CPU kernel's MLP has a 256-bit (AVX2 / baseline) and a 512-bit (AVX-512) instance; the
    backend tests run the one this machine picks, this one the 256-bit one on any machine."""
    ext = pytest.importorskip("metakernels._C")
    ext.set_cpu_avx512(False)
    try:
        assert not ext.cpu_uses_avx512()
        with mk.use_backend("cpu"):
            check_against_reference(torch.device("cpu"), T, segments, hidden, layers, dtype)
    finally:
        ext.set_cpu_avx512(True)


def check_against_reference(device, T, segments, hidden, layers, dtype):
    inputs = make(T, segments, hidden, layers, dtype, device, requires_grad=True)
    before = [x.detach().clone() for x in inputs]
    outs = step(*inputs, segments, hidden, layers)
    (ref_p, ref_s), leaves = reference64(inputs, segments, hidden, layers)
    # bf16 storage rounds the inputs; the oracle sees the same rounded values.
    close(outs[0], ref_p, dtype, "params'")
    close(outs[1], ref_s, dtype, "state'")
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    got = torch.autograd.grad(outs, inputs, [c.to(o.dtype).to(device) for c, o in zip(cot, outs)])
    want = torch.autograd.grad((ref_p, ref_s), leaves, [c.to(o.dtype).double() for c, o in zip(cot, outs)])
    for g, w, what in zip(got, want, ("params", "grads", "state", "weights")):
        tol_dtype = torch.float32 if dtype == torch.bfloat16 and what == "weights" else dtype
        if dtype == torch.bfloat16 and what != "weights":
            continue  # bf16 cotangents are stored rounded; their values are covered by float32
        close(g, w, tol_dtype, f"d {what}")
    for x, b in zip(inputs, before):
        assert torch.equal(x.detach(), b), "an input was modified"


def test_only_params_cotangent_and_unneeded_inputs(backend):
    """Backward with the state' output unused, and grads/state not requiring a gradient (first order)."""
    _, device = backend
    params, grads, state, weights = make(2, [33, 9], 8, 2, torch.float64, device)
    params.requires_grad_()
    weights.requires_grad_()
    new_p, _ = step(params, grads, state, weights, [33, 9], 8, 2)
    got = torch.autograd.grad(new_p.sum(), (params, weights))
    (ref_p, _), leaves = reference64((params, grads, state, weights), [33, 9], 8, 2)
    want = torch.autograd.grad(ref_p.sum(), (leaves[0], leaves[3]))
    for g, w in zip(got, want):
        close(g, w, torch.float64, "grad")


def test_gradcheck_and_gradgradcheck(backend):
    name, device = backend
    segments = [3, 4]
    inputs = make(2, segments, 3, 2, torch.float64, device, seed=3, requires_grad=True)

    def fn(*args):
        return step(*args, segments, 3, 2)

    # NOTE: the Triton interpreter takes ~1 s per launch; fast mode (random projections) keeps this
    # test at seconds instead of minutes, and still checks every input's Jacobian.
    fast = triton_interpreted(name)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


def test_single_task_form_matches_batched(backend):
    _, device = backend
    params, grads, state, weights = make(1, [50], 4, 2, torch.float64, device)
    p1, s1 = step(params[0], grads[0], state[:, 0], weights, None, 4, 2)
    p2, s2 = step(params, grads, state, weights, None, 4, 2)
    assert p1.shape == (50,) and s1.shape == (4, 50)
    torch.testing.assert_close(p1, p2[0])
    torch.testing.assert_close(s1, s2[:, 0])


@pytest.mark.parametrize("hidden", [4, 32])
def test_weights_not_on_a_16_byte_boundary(backend, hidden):
    """Weights that start 4 bytes into their allocation (a view of a larger buffer) give the same step as
    aligned ones: the CUDA kernels compiled for hidden 4 and 32 load the weights 16 bytes at a time and
    are used only for aligned weights (on a GPU a misaligned 16-byte load faults)."""
    _, device = backend
    params, grads, state, weights = make(2, [37, 91], hidden, 2, torch.float32, device)
    shifted = torch.zeros(weights.numel() + 1, device=device)[1:]
    shifted.copy_(weights)
    assert shifted.data_ptr() % 16 != 0
    want = step(params, grads, state, weights, [37, 91], hidden, 2)
    got = step(params, grads, state, shifted, [37, 91], hidden, 2)
    for g, w in zip(got, want):  # close, not equal: a kernel for any hidden size may contract differently
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_weight_gradient_is_deterministic(backend):
    name, device = backend
    segments = [300, 77] if triton_interpreted(name) else [3000, 517]
    params, grads, state, weights = make(4, segments, 16, 2, torch.float32, device)
    weights.requires_grad_()
    params.requires_grad_()
    runs = []
    for _ in range(2):
        new_p, new_s = step(params, grads, state, weights, segments, 16, 2)
        runs.append(torch.autograd.grad((new_p.sum() + new_s.sum()), (weights, params)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hidden", [4, 32])
def test_cpu_results_do_not_depend_on_the_thread_count(hidden):
    """The CPU jobs run under work stealing (csrc/cpu/work_stealing.h): with more threads than cores, threads
    are preempted mid-loop and others take over the back of their ranges.  Every output must be the same bits as
    on one thread (each job's sums are its own, reduced in job order), and match the float64 reference: a job
    run twice would add the normaliser's term twice, a job skipped would leave its cotangents unwritten."""
    pytest.importorskip("metakernels._C")
    segments = [20000, 13001, 7]
    inputs = make(2, segments, hidden, 2, torch.float32, "cpu")
    params, grads, state, weights = (x.clone().requires_grad_() for x in inputs)
    cotangents = (torch.randn(params.shape, generator=torch.Generator().manual_seed(1)),
                  torch.randn(state.shape, generator=torch.Generator().manual_seed(2)))
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 3, 7):
            torch.set_num_threads(threads)
            with mk.use_backend("cpu"):
                outs = step(params, grads, state, weights, segments, hidden, 2)
                results[threads] = [*outs, *torch.autograd.grad(outs, (params, grads, state, weights), cotangents)]
    finally:
        torch.set_num_threads(before)
    for threads in (3, 7):
        for one, many in zip(results[1], results[threads]):
            assert torch.equal(one, many), f"{threads} threads differ from one"
    (ref_p, ref_s), leaves = reference64(inputs, segments, hidden, 2)
    expected = [ref_p, ref_s, *torch.autograd.grad((ref_p, ref_s), leaves, [c.double() for c in cotangents])]
    rtol, atol = TOL[torch.float32]
    for got, want in zip(results[7], expected):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * want.abs().max().item())


def test_zero_gradients_stay_finite(backend):
    """A tensor whose gradient and state are all zero (unused parameters): features 0, no NaN."""
    _, device = backend
    params, grads, state, weights = make(2, [20, 30], 4, 1, torch.float64, device, requires_grad=False)
    grads[:, :20] = 0
    state[:, :, :20] = 0
    params.requires_grad_()
    weights.requires_grad_()
    new_p, new_s = step(params, grads, state, weights, [20, 30], 4, 1)
    assert torch.isfinite(new_p).all() and torch.isfinite(new_s).all()
    d = torch.autograd.grad(new_p.sum(), (params, weights))
    assert all(torch.isfinite(x).all() for x in d)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(grads=a["grads"][:, :-1]), "grads"),
    (lambda a: a.update(state=a["state"][:3]), "state"),
    (lambda a: a.update(weights=a["weights"][:-1]), "weights"),
    (lambda a: a.update(weights=a["weights"].to(torch.int64)), "weights"),
    (lambda a: a.update(grads=a["grads"].float()), "grads"),
    (lambda a: a.update(segments=[5, 5]), "segments"),
    (lambda a: a.update(segments=[20, 0]), "segments"),
    (lambda a: a.update(hidden=0), "hidden"),
    (lambda a: a.update(layers=9), "layers"),
    (lambda a: a.update(params=a["params"][None]), "params"),
])
@pytest.mark.parametrize("op", [mk.ops.learned_update, mk.ops.learned_update_], ids=["learned_update", "in_place"])
def test_bad_input_names_the_argument(change, match, op):
    params, grads, state, weights = make(2, [20], 4, 2, torch.float64, "cpu")
    args = dict(params=params, grads=grads, state=state, weights=weights, segments=[20], hidden=4, layers=2)
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        op(args.pop("params"), args.pop("grads"), args.pop("state"), args.pop("weights"), **args)


@pytest.mark.parametrize("fields,message", [
    ({"betas": (0.5, 0.9)}, "argument 'betas' must be three momentum decays, got (0.5, 0.9)"),
    ({"betas": (0.5, 0.9, 1.5)}, "argument 'betas[2]' must be in [0.0, 1.0), got 1.5"),
    ({"beta_v": 1.0}, "argument 'beta_v' must be in [0.0, 1.0), got 1.0"),
    ({"eps_v": float("nan")}, "argument 'eps_v' must be finite, got nan"),
    ({"eps_n": 0.0}, "argument 'eps_n' must be in (0.0, inf], got 0.0"),
    ({"eps_v": -1e-8}, "argument 'eps_v' must be in (0.0, inf], got -1e-08"),
    ({"step_mult": -1e-3}, "argument 'step_mult' must be in [0.0, inf], got -0.001"),
    ({"exp_mult": float("inf")}, "argument 'exp_mult' must be finite, got inf"),
    ({"step_mult": "0.1"}, "argument 'step_mult' must be a real number, got str"),
], ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_hyper_parameters_are_checked_where_they_are_given(fields, message):
    """Before, a NaN eps reached the parameters as NaN, a decay of 1 froze a moment at zero, and two betas
    failed inside the extension."""
    with pytest.raises((ValueError, TypeError), match=re.escape("LoptHyper: " + message)):
        LoptHyper(**fields)
    assert LoptHyper(betas=[0.5, 0.9, 0.99]).betas == (0.5, 0.9, 0.99)  # a list, as JSON gives it, is kept a tuple


def step_(params, grads, state, weights, segments, hidden, layers, hyper=HYPER):
    return mk.ops.learned_update_(params, grads, state, weights, hidden=hidden, layers=layers, segments=segments,
                                  hyper=hyper)


@pytest.mark.parametrize("T,segments,hidden,layers", [CASES[1], CASES[2], CASES[5]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_in_place_form_writes_the_step_over_its_operands(backend, T, segments, hidden, layers, dtype):
    """learned_update_ overwrites params and state with learned_update's result (bit for bit: the same
    kernel, or the reference copied back), returns those tensors, bumps their version counters and leaves
    grads and weights as they were."""
    _, device = backend
    params, grads, state, weights = make(T, segments, hidden, layers, dtype, device)
    want_p, want_s = step(params, grads, state, weights, segments, hidden, layers)
    grads0, weights0 = grads.clone(), weights.clone()
    ptrs, versions = (params.data_ptr(), state.data_ptr()), (params._version, state._version)
    got_p, got_s = step_(params, grads, state, weights, segments, hidden, layers)
    assert got_p is params and got_s is state and (params.data_ptr(), state.data_ptr()) == ptrs
    assert params._version > versions[0] and state._version > versions[1]
    assert torch.equal(params, want_p) and torch.equal(state, want_s)
    assert torch.equal(grads, grads0) and torch.equal(weights, weights0)


def test_in_place_form_of_one_task_and_of_nothing(backend):
    """The [P] form writes through its [1, P] view; an empty tensor is left as it is."""
    _, device = backend
    params, grads, state, weights = make(1, [50], 4, 2, torch.float64, device)
    want_p, want_s = step(params[0], grads[0], state[:, 0], weights, None, 4, 2)
    p, s = params[0].clone(), state[:, 0].clone()
    step_(p, grads[0], s, weights, None, 4, 2)
    assert torch.equal(p, want_p) and torch.equal(s, want_s)
    empty = torch.empty(0, dtype=torch.float64, device=device)
    got_p, got_s = step_(empty, empty.clone(), torch.empty(4, 0, dtype=torch.float64, device=device), weights,
                         None, 4, 2)
    assert got_p.shape == (0,) and got_s.shape == (4, 0)


def test_in_place_form_refuses_what_it_cannot_write():
    """Autograd would record it (an input requires grad), a non-contiguous params or state, and operands
    that share memory with what is written: a clear error, and nothing written."""
    params, grads, state, weights = make(2, [20], 4, 2, torch.float64, "cpu")
    kw = dict(segments=[20], hidden=4, layers=2)
    with pytest.raises(RuntimeError, match="requires grad"):
        step_(params, grads, state, weights.clone().requires_grad_(), **kw)
    with torch.no_grad():  # allowed without grad mode, as torch.optim's in-place steps are
        step_(params.clone().requires_grad_(), grads, state.clone(), weights.clone().requires_grad_(), **kw)
    wide = torch.zeros(2, 40, dtype=torch.float64)
    with pytest.raises(ValueError, match="'params' must be contiguous"):
        step_(wide[:, ::2], grads, state, weights, **kw)
    with pytest.raises(ValueError, match="'state' must be contiguous"):
        step_(params, grads, state.transpose(1, 2).contiguous().transpose(1, 2), weights, **kw)
    joined = torch.cat([params[0], grads[0]])
    with pytest.raises(ValueError, match="'grads' and 'params' share memory"):
        step_(joined[:20], joined[5:25], state[:, 0].contiguous(), weights, **kw)
    both = torch.cat([state, params[None]])
    with pytest.raises(ValueError, match="'params' and 'state' share memory"):
        step_(both[3], grads, both[:4], weights, **kw)
    before = (params.clone(), state.clone())
    with pytest.raises(ValueError, match="segments"):
        step_(params, grads, state, weights, segments=[5, 5], hidden=4, layers=2)
    assert torch.equal(params, before[0]) and torch.equal(state, before[1])
    assert torch.equal(joined[20:], grads[0]) and torch.equal(both[:4], state)
