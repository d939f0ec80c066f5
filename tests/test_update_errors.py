"""Bad input to the update ops raises a clear exception naming the argument, the expected and the
actual shape/dtype/device; nothing is broadcast silently and inputs are never modified."""
import pytest
import torch

import metakernels as mk

P = 37


def _ok(**overrides):
    args = dict(params=torch.randn(4, P), grads=torch.randn(4, P), m=torch.randn(4, P), v=torch.rand(4, P), step=1, lr=0.1)
    args.update(overrides)
    return args


def _adam(args):
    return mk.ops.adam_update(args["params"], args["grads"], args["m"], args["v"], args["step"], args["lr"])


@pytest.mark.parametrize("bad,exc,words", [
    (dict(grads=torch.randn(4, P + 1)), ValueError, ["'grads'", "[4, 38]", f"[{P}] or [4, {P}]"]),
    (dict(grads=torch.randn(5, P)), ValueError, ["'grads'", "[5, 37]", "T from 'params'"]),
    (dict(m=torch.randn(4, 1, P)), ValueError, ["'m'", "[4, 1, 37]"]),
    (dict(v=torch.randn(1, P)), ValueError, ["'v'", "[1, 37]"]),
    (dict(lr=torch.rand(3, P)), ValueError, ["'lr'", "[3, 37]"]),
    (dict(lr=torch.rand(P + 2)), ValueError, ["'lr'", "[39]"]),
    (dict(lr=torch.rand(2, 2, 2)), ValueError, ["'lr'", "[2, 2, 2]"]),
    (dict(grads=torch.randn(4, P, dtype=torch.float64)), TypeError, ["'grads'", "torch.float64", "torch.float32"]),
    (dict(lr=torch.rand(P, dtype=torch.float64)), TypeError, ["'lr'", "torch.float64"]),
    (dict(grads=torch.randint(0, 3, (4, P))), TypeError, ["'grads'", "floating-point", "torch.int64"]),
    (dict(params=torch.ones(4, P, dtype=torch.int32)), TypeError, ["'params'", "torch.int32"]),
    (dict(m=torch.randn(4, P, device="meta")), ValueError, ["'m'", "meta", "cpu"]),
    (dict(grads=[1.0] * P), TypeError, ["'grads'", "torch.Tensor", "list"]),
    (dict(lr="0.1"), TypeError, ["'lr'", "str"]),
    (dict(lr=True), TypeError, ["'lr'", "bool"]),
    (dict(lr=float("nan")), ValueError, ["'lr'", "finite"]),
    (dict(step=0), ValueError, ["'step'", "0"]),
    (dict(step=1.5), ValueError, ["'step'", "1.5"]),
])
def test_adam_bad_arguments(backend, bad, exc, words):
    args = _ok(**bad)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc) as info:
        _adam(args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    for k, v in before.items():
        assert torch.equal(args[k], v)


@pytest.mark.parametrize("kwargs,words", [
    (dict(beta1=1.0), ["'beta1'", "[0.0, 1.0)", "1.0"]),
    (dict(beta2=-0.1), ["'beta2'", "-0.1"]),
    (dict(eps=-1e-8), ["'eps'"]),
])
def test_adam_bad_hyperparameters(kwargs, words):
    x = torch.randn(P)
    with pytest.raises(ValueError) as info:
        mk.ops.adam_update(x, x, x, x.abs(), 1, 0.1, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_momentum_and_sgd_name_their_arguments():
    x = torch.randn(3, P)
    with pytest.raises(ValueError, match="'buf'.*\\[3, 36\\]"):
        mk.ops.momentum_update(x, x, torch.randn(3, P - 1), 0.1, 0.9)
    with pytest.raises(ValueError, match="'momentum'"):
        mk.ops.momentum_update(x, x, x, 0.1, -0.5)
    with pytest.raises(ValueError, match="'grads'.*\\[37, 3\\]"):
        mk.ops.sgd_update(x, x.t(), 0.1)
    with pytest.raises(ValueError, match="'params'.*\\[\\]"):
        mk.ops.sgd_update(torch.tensor(1.0), torch.tensor(1.0), 0.1)


def test_compiled_binding_rejects_bad_calls_without_crashing():
    """A direct call of metakernels._C with inconsistent operands raises, it does not crash."""
    ext = mk._backend.extension()
    if ext is None:
        pytest.skip("metakernels._C is not built")
    x = torch.randn(3, P)
    with pytest.raises(RuntimeError, match="parameters"):
        ext.update_forward(0, x, torch.randn(3, P + 1), [], None, [0.1, 0, 0, 0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="task count"):
        ext.update_forward(0, x, torch.randn(2, P), [], None, [0.1, 0, 0, 0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="state"):
        ext.update_forward(2, x, x, [x], None, [0.1, 0, 0, 0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.update_forward(0, x, torch.randn(P, 3).t(), [], None, [0.1, 0, 0, 0, 0, 1, 1])
    with pytest.raises(TypeError, match="float32, float64, bfloat16 or float16, got Long"):
        ext.update_forward(0, x.long(), x.long(), [], None, [0.1, 0, 0, 0, 0, 1, 1])


def test_zero_size_inputs_return_empty_results(backend):
    _, device = backend
    x = torch.randn(0, P, device=device, requires_grad=True)
    out = mk.ops.sgd_update(x, x, 0.1)
    assert out.shape == (0, P)
    out.sum().backward()
    assert x.grad.shape == (0, P)
