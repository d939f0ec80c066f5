"""Each backend's fused update against the float64 reference: forward values and first-order
cotangents, over odd shapes, operand layouts, float32 and float64 (bf16 on its own rule)."""
import pytest
import torch

import metakernels as mk
from conftest import triton_interpreted
from update_cases import LAYOUTS, OPS, assert_close, call, call_reference_f64, differentiable_inputs, make_inputs

SHAPES = [(T, P) for P in (1, 37, 1037, 100003) for T in (1, 3, 16)]


def _skip_slow_interpreter(backend_name, T, P):
    if triton_interpreted(backend_name) and T * P > 20000:
        pytest.skip("the Triton CPU interpreter runs only the small shapes (T*P <= 20000) to keep the suite fast")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
@pytest.mark.parametrize("T,P", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_forward_and_backward_match_float64_reference(backend, op, layout, T, P, dtype):
    name, device = backend
    _skip_slow_interpreter(name, T, P)
    tensors, lr = make_inputs(op, layout, T, P, dtype, device, requires_grad=True)
    before = {k: v.detach().clone() for k, v in tensors.items()}
    outs = call(op, tensors, lr)
    expected, t64, lr64 = call_reference_f64(op, tensors, lr)
    assert len(outs) == len(expected)
    for i, (o, e) in enumerate(zip(outs, expected)):
        assert o.shape == e.shape and o.dtype == dtype and o.device.type == device.type, f"output {i}"
        assert_close(o, e, dtype, f"output {i}")

    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in expected]
    got = torch.autograd.grad(outs, differentiable_inputs(tensors, lr), [c.to(device, dtype) for c in cotangents])
    want = torch.autograd.grad(expected, differentiable_inputs(t64, lr64), cotangents)
    names = list(tensors) + (["lr"] if isinstance(lr, torch.Tensor) else [])
    for n, g, w in zip(names, got, want):
        assert g.shape == w.shape, n
        assert_close(g, w, dtype, f"d{n}")
    for k, v in tensors.items():
        assert torch.equal(v.detach(), before[k]), f"input {k} was modified"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_float32_sums_over_65537_tasks_stay_within_tolerance(backend, op, layout):
    """A task-shared operand's cotangent is a sum over the T tasks.  Summed in float32, its error grew with T: at
    65,537 tasks momentum's lr cotangent was 7.6 times the float32 tolerance off.  Summed in double (the note in
    csrc/update_kernels.h), the worst cotangent is about a tenth of it there."""
    name, _ = backend
    if triton_interpreted(name):
        pytest.skip("the Triton CPU interpreter takes ~7 minutes per op and layout at 65,537 tasks")
    test_forward_and_backward_match_float64_reference(backend, op, layout, 65537, 3, torch.float32)


@pytest.mark.parametrize("op", OPS)
def test_unused_outputs_get_no_gradient_and_non_contiguous_inputs_work(backend, op):
    name, device = backend
    T, P = 5, 37
    tensors, lr = make_inputs(op, LAYOUTS[0], T, 2 * P, torch.float64, device)
    tensors = {k: v[:, ::2].requires_grad_() for k, v in ((k, v.detach()) for k, v in tensors.items())}
    assert not tensors["grads"].is_contiguous()
    outs = call(op, tensors, lr)
    expected, t64, _ = call_reference_f64(op, tensors, lr)
    for o, e in zip(outs, expected):
        assert_close(o, e, torch.float64, "non-contiguous forward")
    # Only the last output is used: the others' cotangents are zero.
    got = torch.autograd.grad(outs[-1].sum(), list(tensors.values()), allow_unused=True)
    want = torch.autograd.grad(expected[-1].sum(), list(t64.values()), allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            assert_close(g, w, torch.float64, "partial cotangent")


@pytest.mark.parametrize("op", OPS)
def test_bf16_error_at_most_twice_a_bf16_pytorch_composition(backend, op):
    """FlashAttention's rule: the kernel's error against float64 is at most 2x that of the same math
    composed of PyTorch ops in bf16."""
    name, device = backend
    if triton_interpreted(name):
        pytest.skip("the Triton CPU interpreter has no bf16")
    T, P = 16, 1037
    tensors, lr = make_inputs(op, LAYOUTS[1], T, P, torch.bfloat16, device, requires_grad=True)
    outs = call(op, tensors, lr)
    with mk.use_backend("reference"):
        composed = call(op, tensors, lr)
    expected, t64, lr64 = call_reference_f64(op, tensors, lr)
    cot = [torch.randn(e.shape, dtype=torch.float64) for e in expected]
    got = torch.autograd.grad(outs, differentiable_inputs(tensors, lr), [c.to(device, torch.bfloat16) for c in cot])
    ref = torch.autograd.grad(composed, differentiable_inputs(tensors, lr), [c.to(device, torch.bfloat16) for c in cot])
    want = torch.autograd.grad(expected, differentiable_inputs(t64, lr64), cot)
    for i, (k, c, e) in enumerate(zip(list(outs) + list(got), list(composed) + list(ref), list(expected) + list(want))):
        err_kernel = (k.double().cpu() - e.detach()).abs().max().item()
        err_composed = (c.double().cpu() - e.detach()).abs().max().item()
        assert err_kernel <= 2 * err_composed + 1e-6 * e.abs().max().item(), (i, err_kernel, err_composed)


@pytest.mark.parametrize("op", OPS)
def test_backward_is_deterministic(backend, op):
    name, device = backend
    T, P = (16, 1037) if not triton_interpreted(name) else (4, 300)
    tensors, lr = make_inputs(op, LAYOUTS[1], T, P, torch.float32, device, requires_grad=True)
    runs = []
    for _ in range(2):
        outs = call(op, tensors, lr)
        runs.append(torch.autograd.grad([o.sum() for o in outs], differentiable_inputs(tensors, lr)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
