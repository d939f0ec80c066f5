"""The task-batched linear op (metakernels/ops/linear.py): values against F.linear per task in float64 over
odd shapes and every dtype, gradcheck / gradgradcheck / a third derivative, the weight cotangents' [O, I]
layout, the vmap rule, the mode that routes the inner loop's F.linear calls to it, bad input."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import metakernels as mk
from conftest import ops_run
from metakernels.inner_loop import TaskBatchedModel
from metakernels.layout import ParamLayout
from metakernels.ops import linear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (task dims, rows dims, O, I)
SHAPES = [((1,), (1,), 1, 1), ((3,), (7,), 5, 9), ((2,), (3, 11), 17, 13), ((2, 3), (5,), 4, 6), ((), (4, 3), 7, 5)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _operands(task, rows, O, I, bias, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*task, *rows, I, generator=g, dtype=torch.float64)
    w = torch.randn(*task, O, I, generator=g, dtype=torch.float64)
    b = torch.randn(*task, O, generator=g, dtype=torch.float64) if bias else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return x, w, b, to(x), to(w), to(b)


def _per_task_linear(x, w, b, task):
    """The reference: F.linear for each task's own weight, in float64."""
    xs, ws = x.reshape(-1, *x.shape[len(task):]), w.reshape(-1, *w.shape[len(task):])
    bs = [None] * ws.shape[0] if b is None else b.reshape(-1, b.shape[-1])
    return torch.stack([F.linear(xi, wi, bi) for xi, wi, bi in zip(xs, ws, bs)]).reshape(*x.shape[:-1], w.shape[-2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("task,rows,O,I", SHAPES)
def test_values_against_per_task_linear(task, rows, O, I, bias, dtype, device):
    x64, w64, b64, x, w, b = _operands(task, rows, O, I, bias, dtype, device)
    got = mk.ops.task_linear(x, w, b)
    want = _per_task_linear(x64, w64, b64, task)
    assert got.shape == want.shape and got.dtype == dtype
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= TOL[dtype] * (want.abs().max().item() + 1.0) * I


def test_shared_weight_is_f_linear():
    x, w, b = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(mk.ops.task_linear(x, w, b), F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_empty_rows_and_tasks():
    assert mk.ops.task_linear(torch.zeros(2, 0, 3), torch.zeros(2, 4, 3)).shape == (2, 0, 4)
    assert mk.ops.task_linear(torch.zeros(0, 5, 3), torch.zeros(0, 4, 3)).shape == (0, 5, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_gradgradcheck(bias, device):
    _, _, _, x, w, b = _operands((2,), (3,), 4, 5, bias, torch.float64, device)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)
    fn = (lambda x, w, b: mk.ops.task_linear(x, w, b)) if bias else (lambda x, w: mk.ops.task_linear(x, w))
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_third_derivative_matches_plain_products():
    """The double backward is made of differentiable products: a third derivative exists and is exact."""
    _, _, _, x, w, b = _operands((2,), (3,), 4, 5, True, torch.float64, "cpu")

    def third(fn):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        (gw,) = torch.autograd.grad((y.sin()).sum(), ws, create_graph=True)
        (gx,) = torch.autograd.grad((gw * gw).sum(), xs, create_graph=True)
        return torch.autograd.grad(gx.pow(3).sum(), (xs, ws, bs))

    plain = lambda x, w, b: torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # noqa: E731
    for got, want in zip(third(mk.ops.task_linear), third(plain)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_weight_cotangents_come_in_the_weights_layout():
    """dW of the backward and of the double backward are [N, O, I] contiguous (plain bmm gives a transposed
    [N, I, O] view): what makes the inner loop's copies into the flat fast weights contiguous."""
    _, _, _, x, w, b = _operands((3,), (6,), 5, 7, True, torch.float32, "cpu")
    x.requires_grad_(), w.requires_grad_()
    y = mk.ops.task_linear(x, w, b)
    gx, gw = torch.autograd.grad((y * y).sum(), (x, w), create_graph=True)
    assert gw.is_contiguous()
    (ggw,) = torch.autograd.grad((gx * gx).sum(), w)
    assert ggw.is_contiguous()
    w2 = w.detach().requires_grad_()
    (plain,) = torch.autograd.grad((torch.bmm(x, w2.transpose(1, 2)) ** 2).sum(), w2)
    assert not plain.is_contiguous()  # the layout this op exists to avoid


@pytest.mark.parametrize("x_batched,b_mode", [(True, "batched"), (True, "shared"), (False, "batched"), (True, None)])
def test_vmap_rule_values_and_second_derivatives(x_batched, b_mode):
    B, R, O, I = 4, 3, 5, 6
    g = torch.Generator().manual_seed(1)
    X = torch.randn(B, R, I, generator=g, dtype=torch.float64) if x_batched else torch.randn(R, I, generator=g, dtype=torch.float64)
    W = torch.randn(B, O, I, generator=g, dtype=torch.float64)
    Bias = {"batched": torch.randn(B, O, generator=g, dtype=torch.float64),
            "shared": torch.randn(O, generator=g, dtype=torch.float64), None: None}[b_mode]
    in_dims = (0 if x_batched else None, 0, {"batched": 0, "shared": None, None: None}[b_mode])

    def second(fn):
        xs, ws = X.clone().requires_grad_(), W.clone().requires_grad_()
        y = torch.vmap(fn, in_dims=in_dims)(xs, ws, Bias)
        gx, gw = torch.autograd.grad(y.tanh().sum(), (xs, ws), create_graph=True)
        return (y,) + torch.autograd.grad((gx * gx).sum() + (gw ** 3).sum(), (xs, ws))

    for got, want in zip(second(mk.ops.task_linear), second(F.linear)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _vmapped_linear(x, w, weight_in_dim, autocast=False):
    """F.linear(x[i], w[i] or w) under TaskLinearMode inside a vmap: (output, number of task_linear calls)."""
    with mock.patch.object(linear, "task_linear", wraps=linear.task_linear) as routed, linear.TaskLinearMode(), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = torch.vmap(F.linear, in_dims=(0, weight_in_dim))(x, w)
    return y, routed.call_count


def test_mode_routes_only_vmapped_weights():
    x = torch.randn(3, 2, 5)
    y, calls = _vmapped_linear(x, torch.randn(3, 4, 5), 0)
    assert calls == 1 and y.shape == (3, 2, 4)
    _, calls = _vmapped_linear(x, torch.randn(4, 5), None)
    assert calls == 0


def test_mode_leaves_casting_calls_to_f_linear():
    y, calls = _vmapped_linear(torch.randn(3, 2, 5), torch.randn(3, 4, 5), 0, autocast=True)
    assert calls == 0 and y.dtype == torch.bfloat16
    with mock.patch.object(linear, "task_linear", wraps=linear.task_linear) as routed, linear.TaskLinearMode(), \
            pytest.raises(RuntimeError, match="scalar type"):
        torch.vmap(F.linear)(torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 4, 5))
    assert routed.call_count == 0


def test_inner_loop_routes_linear_layers():
    """The engine's vmapped forward reaches nn.Linear through task_linear (what the benchmark's speed needs)."""
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    layout = ParamLayout(model)
    fast = layout.flatten().detach().expand(3, -1).clone().requires_grad_()
    batch = (torch.randn(3, 6, 5), torch.randn(3, 6, 1))
    loss_fn = lambda f, b: F.mse_loss(f(b[0]), b[1])  # noqa: E731
    with mock.patch.object(linear, "task_linear", wraps=linear.task_linear) as routed:
        vmapped = TaskBatchedModel(model, layout, vectorize=True).losses(loss_fn, fast, batch, 3)
    assert routed.call_count == 2
    looped = TaskBatchedModel(model, layout, vectorize=False).losses(loss_fn, fast, batch, 3)
    torch.testing.assert_close(vmapped, looped)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 3, 5), torch.randn(4, 6)), r"'weight' must be \[O, I\] or \[\*task, O, I\].*\[4, 6\] for x \[2, 3, 5\]"),
    ((torch.randn(2, 3, 5), torch.randn(3, 4, 5)), r"'weight' must be .*\[3, 4, 5\] for x \[2, 3, 5\]"),
    ((torch.randn(2, 3, 5), torch.randn(5)), r"'weight' must be .*\[5\]"),
    ((torch.randn(2, 3, 5), torch.randn(2, 4, 5), torch.randn(4)), r"'bias' must have shape \[2, 4\].*got \[4\]"),
])
def test_bad_shapes_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        mk.ops.task_linear(*args)


def test_bad_dtypes_name_the_argument():
    with pytest.raises(TypeError, match="'weight' has dtype torch.float64 but 'x' has torch.float32"):
        mk.ops.task_linear(torch.randn(2, 3, 5), torch.randn(2, 4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="'x' must be a floating-point tensor"):
        mk.ops.task_linear(torch.ones(2, 3, 5, dtype=torch.long), torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="'bias' must be a torch.Tensor"):
        mk.ops.task_linear(torch.randn(2, 3, 5), torch.randn(2, 4, 5), [0.0] * 4)


def test_backward_computes_only_the_gradients_asked_for():
    _, _, _, x, w, b = _operands((3,), (6,), 5, 7, True, torch.float32, "cpu")
    w.requires_grad_()
    loss = mk.ops.task_linear(x, w, b).sum()
    (gw,), ran = ops_run(lambda: torch.autograd.grad(loss, w))
    assert [name for name, _, _ in ran if name in ("bmm", "baddbmm", "sum")] == ["bmm"]  # dW only: x and b need no gradient
    torch.testing.assert_close(gw, torch.ones(3, 6, 5).transpose(1, 2) @ x)


def test_double_backward_skips_the_products_of_unused_gradients():
    """With only the weight's gradient differentiated again (an adapted layer whose dx the inner step does not
    use), the double backward runs dg = x A^T and dx = g A, not the products of zero cotangents."""
    _, _, _, x, w, b = _operands((3,), (6,), 5, 7, True, torch.float64, "cpu")
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    _, gw, _ = torch.autograd.grad(mk.ops.task_linear(x, w, b).square().sum(), (x, w, b), create_graph=True)
    probe = torch.randn_like(gw)
    second, ran = ops_run(lambda: torch.autograd.grad((gw * probe).sum(), (x, w, b)))
    assert len([name for name, _, _ in ran if name in ("bmm", "baddbmm")]) == 4  # x A^T and g A, then dx and dW of the forward's backward (6 with zero cotangents)
    xd, wd, bd = (t.detach().requires_grad_() for t in (x, w, b))
    y = xd @ wd.transpose(-1, -2) + bd.unsqueeze(-2)
    _, gw0, _ = torch.autograd.grad(y.square().sum(), (xd, wd, bd), create_graph=True)
    for got, want in zip(second, torch.autograd.grad((gw0 * probe).sum(), (xd, wd, bd))):
        torch.testing.assert_close(got, want)


def test_gradients_are_returned_as_tensors_not_views():
    """Every product the op returns (x's gradients shaped [N, *rows, I], weight-shaped ones) is a tensor of
    its own rather than a reshaped view of one: autograd adds a further gradient into a tensor in place
    only when it is not a view (in the meta-backward, each weight gets two)."""
    gen = torch.Generator().manual_seed(8)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in ((3, 2, 4, 6), (3, 5, 6), (3, 5)))
    g = torch.randn(3, 2, 4, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        returned = [linear._TaskLinear.apply(x, w, b), *linear._TaskLinearBackward.apply(g, x, w, True, True, True)]
    arrived = []
    for leaf in (x, w):
        leaf.register_hook(lambda grad: arrived.append(grad))
    gx, gw, _ = torch.autograd.grad(linear._TaskLinear.apply(x, w, b), (x, w, b), g, create_graph=True)
    arrived.clear()
    torch.autograd.backward([gx, gw], [torch.randn_like(gx), torch.randn_like(gw)])  # double backward: dx, dw
    assert len(arrived) == 2 and len(returned) == 4
    assert all(t._base is None for t in returned + arrived), [t._base is not None for t in returned + arrived]
