"""The fused causal attention core's CPU kernels (metakernels._C.attention_*, csrc/cpu/attention.cpp), called
directly: forward, backward and double backward against the composition of the reference backend (batched
products and the reference causal softmax) in float64 over odd shapes, which reach every register-block
and tile remainder of the kernels; float32, bfloat16 and float16 against float64; G's causal zeros; the
backward without G and dZ; bad arguments.  Outputs are poisoned with NaN before the kernels write them
(tests/conftest.py), so an element left unwritten fails."""
from __future__ import annotations

import pytest
import torch

import metakernels as mk
from metakernels import _backend
from metakernels.ops.attention import _CausalAttention, _CausalAttentionBackward

C = _backend.extension()
pytestmark = pytest.mark.skipif(C is None, reason="the compiled extension is not loaded")

# (M sequences, S positions, H heads, d features per head): S around the 4-key blocks and 8/16-query
# tiles, d around the 8/16-feature tiles (float64 / float32), one position, one feature.
SHAPES = [(1, 1, 1, 1), (2, 5, 3, 7), (1, 16, 2, 16), (3, 17, 1, 20), (2, 33, 2, 8), (1, 12, 1, 33)]


def _operands(M, S, H, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = H * d
    shapes = {"qkv": (M, S, 3 * D), "do": (M, S, D), "a": (M, S, 3 * D)}
    return {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in shapes.items()}


def _reference(M, S, H, d, ops, scale):
    """(o, P, dqkv, G, dZ, d(do), dqkv of the double backward) by the reference backend's composition."""
    class Ctx:
        pass

    with mk.use_backend("reference"), torch.no_grad():
        o, p = _CausalAttention.apply(ops["qkv"], H, scale)
        dqkv, g, dz = _CausalAttentionBackward.apply(ops["do"], ops["qkv"], p, H, scale)
        ctx = Ctx()
        ctx.saved_tensors, ctx.n_heads, ctx.scale = (ops["do"], ops["qkv"], p, g, dz), H, scale
        ddo, ddqkv = _CausalAttentionBackward.backward.__wrapped__(ctx, ops["a"], None, None)[:2]
    return o, p, dqkv, g, dz, ddo, ddqkv


def _kernels(H, ops, scale):
    o, p = C.attention_forward(ops["qkv"], H, scale)
    dqkv, g, dz = C.attention_backward(ops["do"], ops["qkv"], p, H, scale, True)
    ddo, ddqkv = C.attention_double_backward(ops["a"], ops["do"], ops["qkv"], p, g, dz, H, scale)
    return o, p, dqkv, g, dz, ddo, ddqkv


NAMES = ("o", "P", "dqkv", "G", "dZ", "d(do)", "double backward dqkv")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernels_equal_the_reference_composition_in_float64(shape):
    M, S, H, d = shape
    ops, scale = _operands(*shape, seed=sum(shape)), 0.7
    want = _reference(M, S, H, d, ops, scale)
    got = _kernels(H, ops, scale)
    below = torch.ones(S, S, dtype=torch.bool).tril()  # G is compared where P can be non-zero
    for name, a, b in zip(NAMES, got, want):
        if name == "G":
            assert (a[..., ~below] == 0).all(), "G above the diagonal must be written as 0"
            a, b = a[..., below], b[..., below]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_cpu_kernels_in_lower_precision_against_float64(dtype, tol):
    M, S, H, d = 2, 19, 2, 24
    ops = _operands(M, S, H, d)
    want = _kernels(H, ops, 0.5)
    got = _kernels(H, {k: v.to(dtype) for k, v in ops.items()}, 0.5)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == dtype
        err = (a.double() - b).abs().max().item()
        assert err <= tol * (b.abs().max().item() + 1), (name, err)


def test_cpu_backward_without_the_double_backwards_operands():
    ops = _operands(3, 9, 2, 5)
    o, p = C.attention_forward(ops["qkv"], 2, 0.3)
    dqkv, g, dz = C.attention_backward(ops["do"], ops["qkv"], p, 2, 0.3, False)
    assert g is None and dz is None
    torch.testing.assert_close(dqkv, C.attention_backward(ops["do"], ops["qkv"], p, 2, 0.3, True)[0], rtol=0, atol=0)


@pytest.mark.parametrize("call,words", [
    (lambda q, p: C.attention_forward(q.transpose(0, 1), 2, 1.0), ["qkv", "contiguous"]),
    (lambda q, p: C.attention_forward(q[..., :-1].contiguous(), 2, 1.0), ["qkv", "3 * n_heads"]),
    (lambda q, p: C.attention_forward(q, 0, 1.0), ["n_heads", "0"]),
    (lambda q, p: C.attention_backward(torch.zeros(2, 5, 4), q, p, 2, 1.0, True), ["grad_out", "shape"]),
    (lambda q, p: C.attention_backward(torch.zeros(2, 5, 6), q, p[:, :1].contiguous(), 2, 1.0, True), ["p", "shape"]),
    (lambda q, p: C.attention_backward(torch.zeros(2, 5, 6), q, p.double(), 2, 1.0, True), ["p", "dtype"]),
    (lambda q, p: C.attention_double_backward(q, torch.zeros(2, 5, 6), q, p, p, p[:, :, :4].contiguous(), 2, 1.0),
     ["dz", "shape"]),
], ids=["strided", "width", "heads", "grad-shape", "p-shape", "p-dtype", "dz-shape"])
def test_cpu_kernels_reject_bad_arguments_naming_them(call, words):
    qkv = torch.randn(2, 5, 18)
    _, p = C.attention_forward(qkv, 2, 1.0)
    with pytest.raises((RuntimeError, TypeError, ValueError)) as info:
        call(qkv, p)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
