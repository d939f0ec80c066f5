"""The fused causal attention core (metakernels.ops.causal_attention): values, first and second derivatives
against PyTorch's composition on every backend of its softmax kernels, gradcheck / gradgradcheck, the vmap
rule and the graph it records, the module that uses it, bad input."""
import copy

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import metakernels as mk
from conftest import triton_interpreted
from test_fused_layers import _graph_node_names
from metakernels.models import CausalSelfAttention


def _attention_torch(qkv, n_heads, scale=None):
    """PyTorch's composition: split, heads, scores, causal mask, softmax, weighted sum, merge."""
    *lead, S, width = qkv.shape
    D = width // 3
    d = D // n_heads
    q, k, v = (t.reshape(*lead, S, n_heads, d).transpose(-3, -2) for t in qkv.split(D, -1))
    scores = q @ k.transpose(-2, -1) * (d ** -0.5 if scale is None else scale)
    hidden = torch.ones(S, S, dtype=torch.bool, device=qkv.device).triu(1)
    weights = scores.masked_fill(hidden, float("-inf")).softmax(-1)
    return (weights @ v).transpose(-3, -2).reshape(*lead, S, D)


# (qkv shape, heads): no leading dimension, one, two; one position; odd sizes everywhere
CASES = [((1, 6), 1), ((5, 12), 2), ((3, 7, 18), 3), ((2, 3, 17, 9), 1)]


def _qkv(shape, device, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()


@pytest.mark.parametrize("shape,heads", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_values_and_two_derivatives_equal_pytorch(backend, shape, heads):
    name, device = backend
    qkv = _qkv(shape, device, sum(shape) + heads)
    y, y0 = mk.ops.causal_attention(qkv, heads, 0.7), _attention_torch(qkv, heads, 0.7)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y).requires_grad_()
    (d,), (d0,) = (torch.autograd.grad(out, qkv, g, create_graph=True) for out in (y, y0))
    torch.testing.assert_close(d, d0, rtol=1e-11, atol=1e-12)
    probe = torch.randn_like(d)
    got = torch.autograd.grad((d * probe).sum() + (y * y).sum(), (qkv, g))
    want = torch.autograd.grad((d0 * probe).sum() + (y0 * y0).sum(), (qkv, g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def _two_derivatives(fn, qkv, g, probe):
    y = fn(qkv)
    (d,) = torch.autograd.grad(y, qkv, g.to(y.dtype), create_graph=True)
    (dd,) = torch.autograd.grad((d * probe.to(d.dtype)).sum(), qkv)
    return y, d, dd


def test_float32_and_bfloat16_against_float64_to_second_order(backend):
    name, device = backend
    dtypes = [torch.float32] if triton_interpreted(name) else [torch.float32, torch.bfloat16]
    qkv = _qkv((2, 3, 33, 24), device, 5)
    g, probe = _qkv((2, 3, 33, 8), device, 6).detach(), _qkv((2, 3, 33, 24), device, 7).detach()
    want = _two_derivatives(lambda t: _attention_torch(t, 2), qkv, g, probe)
    for dtype, tol in zip(dtypes, (1e-5, 2e-2)):
        got = _two_derivatives(lambda t: mk.ops.causal_attention(t, 2), qkv.detach().to(dtype).requires_grad_(),
                               g, probe)
        for what, a, b in zip(("values", "first derivative", "second derivative"), got, want):
            assert a.dtype == dtype
            err = (a.double() - b).abs().max().item()
            assert err <= tol * (b.abs().max().item() + 1), (dtype, what, err)


def test_gradcheck_and_gradgradcheck(backend):
    name, device = backend
    qkv = _qkv((2, 4, 6) if triton_interpreted(name) else (2, 2, 5, 12), device, 3)
    f = lambda t: mk.ops.causal_attention(t, 2 if t.shape[-1] == 12 else 1)  # noqa: E731
    assert gradcheck(f, (qkv,)) and gradgradcheck(f, (qkv,))


def test_default_scale_is_one_over_sqrt_d_head():
    qkv = _qkv((2, 5, 24), "cpu", 1)
    torch.testing.assert_close(mk.ops.causal_attention(qkv, 2), _attention_torch(qkv, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mk.ops.causal_attention(qkv, 2), mk.ops.causal_attention(qkv, 2, 0.5))  # d_head = 24 / 3 / 2 = 4


def test_vmap_over_tasks_equals_each_task_alone_to_second_order():
    qkv = _qkv((4, 3, 5, 12), "cpu", 2)
    y = torch.vmap(lambda t: mk.ops.causal_attention(t, 2))(qkv)
    torch.testing.assert_close(y, _attention_torch(qkv, 2), rtol=1e-12, atol=1e-12)
    g, probe = torch.randn_like(y), torch.randn_like(qkv)
    (d,) = torch.autograd.grad(y, qkv, g, create_graph=True)
    (dd,) = torch.autograd.grad((d * probe).sum(), qkv)
    for t in range(4):
        one = qkv[t].detach().requires_grad_()
        (d1,) = torch.autograd.grad(_attention_torch(one, 2), one, g[t], create_graph=True)
        (dd1,) = torch.autograd.grad((d1 * probe[t]).sum(), one)
        torch.testing.assert_close(d[t], d1, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(dd[t], dd1, rtol=1e-10, atol=1e-11)


def test_one_graph_node_per_pass_under_vmap():
    """The head split and merge happen inside: the forward and the create_graph backward record one node
    each (PyTorch's composition records ~15 view, transpose, matmul and copy nodes per pass)."""
    qkv = _qkv((3, 2, 5, 12), "cpu", 4)
    y = torch.vmap(lambda t: mk.ops.causal_attention(t, 2))(qkv)
    (d,) = torch.autograd.grad(y, qkv, torch.ones_like(y), create_graph=True)
    assert _graph_node_names(y, d) == {"AccumulateGrad", "_CausalAttentionBackward", "_CausalAttentionBackwardBackward"}


def test_inputs_are_not_modified_and_strided_inputs_work():
    base = _qkv((2, 5, 30), "cpu", 7).detach()
    qkv = base[..., 3:21]  # a strided view: [2, 5, 18]
    before = base.clone()
    torch.testing.assert_close(mk.ops.causal_attention(qkv, 3), _attention_torch(qkv, 3), rtol=1e-12, atol=1e-12)
    assert torch.equal(base, before)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: mk.ops.causal_attention(torch.randn(5, 12), 3), ValueError, ["'qkv'", "[5, 12]", "3 heads"]),
    (lambda: mk.ops.causal_attention(torch.randn(12), 1), ValueError, ["'qkv'", "[12]"]),
    (lambda: mk.ops.causal_attention(torch.randn(5, 12), 0), ValueError, ["'n_heads'", "0"]),
    (lambda: mk.ops.causal_attention(torch.randn(5, 12), 2.0), ValueError, ["'n_heads'", "2.0"]),
    (lambda: mk.ops.causal_attention(torch.randn(5, 12), True), ValueError, ["'n_heads'", "True"]),
    (lambda: mk.ops.causal_attention(torch.ones(5, 12, dtype=torch.int64), 2), TypeError, ["'qkv'", "int64"]),
    (lambda: mk.ops.causal_attention(torch.randn(5, 12), 2, float("nan")), ValueError, ["'scale'"]),
    (lambda: mk.ops.causal_attention([1.0] * 12, 2), TypeError, ["'qkv'", "list"]),
])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_empty_input_gives_an_empty_output():
    assert mk.ops.causal_attention(torch.randn(0, 4, 12), 2).shape == (0, 4, 4)
    assert mk.ops.causal_attention(torch.randn(3, 0, 12), 2).shape == (3, 0, 4)


def test_fused_module_equals_the_model_module_and_keeps_attention_dropout():
    torch.manual_seed(0)
    plain = CausalSelfAttention(12, 3, dropout=0.25).double()
    fused = copy.deepcopy(plain)
    mk.nn.fuse_layers(nn_wrapper := torch.nn.Sequential(fused))
    fused = nn_wrapper[0]
    assert type(fused) is mk.nn.CausalSelfAttention
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    for module in (plain, fused):
        module.eval()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-12)
    for module in (plain, fused):
        module.train()
    outs = []
    for module in (plain, fused):  # same seed, same dropout mask on the attention weights
        torch.manual_seed(1)
        outs.append(module(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(outs[0], fused.eval()(x))  # dropout did act
