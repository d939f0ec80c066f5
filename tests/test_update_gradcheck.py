"""gradcheck and gradgradcheck (float64) of the fused update ops on every backend, Adam's finite
backward where v = 0, and what the ops keep for their backward."""
import pytest
import torch

import metakernels as mk
from update_cases import LAYOUTS, OPS, call, differentiable_inputs, make_inputs


def _as_function(op, tensors, lr):
    names = list(tensors)

    def fn(*args):
        t = dict(zip(names, args[: len(names)]))
        return call(op, t, args[len(names)] if len(args) > len(names) else lr)

    return fn


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_gradcheck_and_gradgradcheck(backend, op, layout):
    _, device = backend
    tensors, lr = make_inputs(op, layout, 3, 5, torch.float64, device, requires_grad=True)
    fn = _as_function(op, tensors, lr)
    inputs = tuple(differentiable_inputs(tensors, lr))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_adam_backward_is_finite_where_v_is_zero(backend):
    """g = v = 0 makes v' = 0, where d sqrt(v')/dv' is infinite: the backward uses 0 there and stays
    finite; elsewhere it is the exact derivative."""
    _, device = backend
    P = 7
    p = torch.randn(2, P, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.randn(2, P, dtype=torch.float64, device=device)
    g[:, :3] = 0.0
    g.requires_grad_()
    m = torch.randn(2, P, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.rand(2, P, dtype=torch.float64, device=device)
    v[:, :3] = 0.0
    v.requires_grad_()
    outs = mk.ops.adam_update(p, g, m, v, 1, 0.1)
    grads = torch.autograd.grad([o.sum() for o in outs], [p, g, m, v])
    for x in grads:
        assert torch.isfinite(x).all()
    # With v' = 0 the update is p - lr * (m'/c1) / eps: its derivative in m is -lr*(1-b1)... via m' only.
    c1 = 1 - 0.9
    expected_dm = 0.9 * (1.0 - 0.1 / (c1 * 1e-8))  # dm = b1 * (gm + du/(c1 d)), gm = 1, du = -lr, d = eps
    torch.testing.assert_close(grads[2][:, :3].cpu(), torch.full((2, 3), expected_dm, dtype=torch.float64))
    # Where v' > 0, the cotangents equal the reference backend's, which autograd derives.
    with mk.use_backend("reference"):
        ref = torch.autograd.grad([o.sum() for o in mk.ops.adam_update(p, g, m, v, 1, 0.1)], [p, g, m, v])
    for x, r in zip(grads, ref):
        torch.testing.assert_close(x, r)


def test_second_order_path_matches_reference(backend):
    """The backward recorded under create_graph=True (differentiable formulas) gives the reference's
    Hessian-vector products."""
    _, device = backend
    tensors, lr = make_inputs("adam", LAYOUTS[1], 4, 9, torch.float64, device, requires_grad=True)
    inputs = differentiable_inputs(tensors, lr)
    results = []
    for name in (None, "reference"):
        ctx = mk.use_backend(name) if name else torch.enable_grad()
        with ctx:
            outs = call("adam", tensors, lr)
            first = torch.autograd.grad(sum((o * o).sum() for o in outs), inputs, create_graph=True)
            results.append(torch.autograd.grad(sum(f.pow(3).sum() for f in first), inputs))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_linear_updates_keep_nothing_for_backward(backend, op, layout):
    """SGD and momentum with a number as the rate are linear: their backward needs no input, so an
    unrolled inner loop does not keep its inner gradients alive through them.  The others keep theirs."""
    _, device = backend
    tensors, lr = make_inputs(op, layout, 3, 5, torch.float64, device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        call(op, tensors, lr)
    linear = op != "adam" and not isinstance(lr, torch.Tensor)
    assert (len(saved) == 0) == linear, [tuple(t.shape) for t in saved]
