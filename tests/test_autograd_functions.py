"""What metakernels._autograd gives every torch.autograd.Function of the package: a cached forward
signature (Function.apply binds each call's arguments to it, and deriving it anew costs ~70 us a call),
and the direct path to the ops' vmap rules under one torch.vmap (functorch's own costs ~150-200 us a
call), which must give what functorch's path gives and step aside for any other transform stack."""
import importlib
import inspect
import pkgutil

import pytest
import torch
import torch._functorch.autograd_function as functorch_function

import metakernels
import metakernels as mk


def _package_functions():
    for info in pkgutil.walk_packages(metakernels.__path__, "metakernels."):
        if info.name.endswith(("_triton", "__main__")):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, torch.autograd.Function) \
                    and value.__module__ == module.__name__:
                yield value


def test_every_function_caches_its_forward_signature():
    functions = list(_package_functions())
    assert len(functions) >= 15  # the fused layers, the update ops, the layout's, MAML's
    for function in functions:
        assert "__signature__" in vars(function.forward), f"{function.__qualname__} lacks @cached_signature"
        assert function.forward.__signature__ == inspect.Signature.from_callable(function.forward, follow_wrapped=False)


def test_the_cached_signature_binds_like_inspect():
    """Function.apply binds through torch.autograd.function._bind_default_args: the cached signature's
    shortcut for all-positional calls gives inspect's result, and every other call is inspect's."""
    from torch.autograd.function import _bind_default_args

    from metakernels.ops import norm, vocab_head

    forward = norm._Norm.forward
    plain = inspect.Signature(list(inspect.signature(forward).parameters.values()))
    for args, kwargs in [((1, 2, 3, 4, 5), None), ((1, 2), {"b": 3, "eps": 4, "centered": 5})]:
        bound = plain.bind(*args, **(kwargs or {}))
        assert _bind_default_args(forward, args, kwargs) == (bound.args, bound.kwargs)
    assert type(inspect.signature(forward).bind(1, 2, 3, 4, 5)).__name__ == "_Positional"
    with pytest.raises(TypeError):
        inspect.signature(forward).bind(1, 2, 3)
    with pytest.raises(TypeError):
        inspect.signature(forward).bind(1, 2, 3, 4, 5, 6)
    assert inspect.signature(vocab_head._LinearCrossEntropy.forward).bind(*range(6)).args == tuple(range(6))


def _gen():
    return torch.Generator().manual_seed(0)


def _randn(*shape):
    return torch.randn(shape, generator=_gen(), dtype=torch.float64)


# op(x, w) with x [B, ...] and w [B, ...] vmapped over B; a w of rank 2 inside the vmap is per-task
# weights, which the rules fold into the task dimension.
_OPS = {
    "task_linear": (lambda x, w: mk.ops.task_linear(x, w), (3, 2, 5, 4), (3, 6, 4)),
    "task_linear per-task weights": (lambda x, w: mk.ops.task_linear(x, w), (3, 2, 5, 4), (3, 2, 6, 4)),
    "layer_norm": (lambda x, w: mk.ops.layer_norm(x, w, w), (3, 2, 5, 4), (3, 4)),
    "rms_norm per-task weights": (lambda x, w: mk.ops.rms_norm(x, w), (3, 2, 5, 4), (3, 2, 4)),
    "bias_gelu": (lambda x, w: mk.ops.bias_gelu(x, w), (3, 2, 5, 4), (3, 4)),
    "causal_softmax": (lambda x, w: mk.ops.causal_softmax(x * w.sum(), 0.5), (3, 2, 5, 5), (3, 4)),
    "causal_attention": (lambda x, w: mk.ops.causal_attention(x * w.sum(), 2), (3, 2, 5, 12), (3, 4)),
    "linear_cross_entropy": (lambda x, w: mk.ops.linear_cross_entropy(x, w, None, torch.arange(10).reshape(2, 5) % 6),
                             (3, 2, 5, 4), (3, 6, 4)),
}


def _vmapped_derivatives(op, x_shape, w_shape):
    x, w = _randn(*x_shape).requires_grad_(), _randn(*w_shape).requires_grad_()
    y = torch.vmap(op)(x, w)
    g = _randn(*y.shape)
    dx, dw = torch.autograd.grad(y, (x, w), g, create_graph=True)
    second = torch.autograd.grad((dx * dx).sum() + (dw * dw).sum(), (x, w))
    return [y, dx, dw, *second]


def _functorch_helper_calls(monkeypatch):
    calls = []
    helper = functorch_function.custom_function_call_vmap_helper
    monkeypatch.setattr(functorch_function, "custom_function_call_vmap_helper",
                        lambda *a, **k: calls.append(a[2]) or helper(*a, **k))
    return calls


@pytest.mark.parametrize("name", list(_OPS))
def test_direct_vmap_path_equals_functorchs_and_skips_its_dispatch(name, monkeypatch):
    op, x_shape, w_shape = _OPS[name]
    calls = _functorch_helper_calls(monkeypatch)
    direct = _vmapped_derivatives(op, x_shape, w_shape)
    assert calls == []
    for module in ("attention", "gelu", "linear", "norm", "softmax", "vocab_head"):
        monkeypatch.setattr(f"metakernels.ops.{module}.apply", lambda function, *args: function.apply(*args))
    through_functorch = _vmapped_derivatives(op, x_shape, w_shape)
    assert calls, "the reference run did not go through functorch's dispatch"
    for got, want in zip(direct, through_functorch):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_other_transform_stacks_go_through_functorch(monkeypatch):
    calls = _functorch_helper_calls(monkeypatch)
    x, w = _randn(2, 3, 5, 4), _randn(2, 3, 4)
    nested = torch.vmap(torch.vmap(lambda x, w: mk.ops.layer_norm(x, w)))(x, w)
    assert calls
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(nested[i, j], mk.ops.layer_norm(x[i, j], w[i, j]))
    grad = torch.func.grad(lambda w: torch.vmap(lambda x, w: mk.ops.layer_norm(x, w))(x[0], w).pow(2).sum())(w[0])
    w0 = w[0].clone().requires_grad_()
    (want,) = torch.autograd.grad(torch.vmap(lambda x, w: mk.ops.layer_norm(x, w))(x[0], w0).pow(2).sum(), w0)
    torch.testing.assert_close(grad, want)


def test_the_direct_path_hides_an_ops_internals_from_torch_function_modes():
    """The inner loop runs its vmap under a torch function mode (TaskLinearMode); the rule's own products
    and reshapes do not go through it (each would cost ~1.4 us), the user's calls still do."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, w = _randn(3, 5, 4), _randn(3, 6, 4)
    with Record():
        torch.vmap(lambda x, w: mk.ops.task_linear(x, w).sin())(x, w)
    assert torch.Tensor.sin in seen
    assert torch.bmm not in seen and torch.baddbmm not in seen, seen
