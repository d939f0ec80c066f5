"""The task-batched float32 product kernel (csrc/cpu/matmul.cpp) against a float64 reference, and the
policy that decides where it replaces torch.bmm / torch.baddbmm (metakernels/ops/matmul.py)."""
import contextlib
import itertools

import pytest
import torch

import metakernels as mk
from metakernels import _backend
from metakernels.models import TransformerLM, lm_loss
from metakernels.ops import matmul

ext = _backend.extension()
needs_kernel = pytest.mark.skipif(ext is None or not ext.task_matmul_available(),
                                  reason="the task_matmul kernel needs AVX-512 and the compiled extension")


def _operand(B, rows, cols, transposed, gen):
    """[B, rows, cols] float32, stored transposed (column-major per item) when asked."""
    if transposed:
        return torch.randn(B, cols, rows, generator=gen).transpose(1, 2)
    return torch.randn(B, rows, cols, generator=gen)


def _reference(a, b, start):
    out = torch.bmm(a.double(), b.double())
    return out if start is None else out + start.double()


@needs_kernel
@pytest.mark.parametrize("B,M,K,N", [(1, 1, 1, 1), (3, 7, 5, 31), (2, 8, 33, 32), (2, 9, 16, 33), (1, 17, 64, 70),
                                     (2, 128, 128, 96), (1, 3, 0, 5)])
@pytest.mark.parametrize("a_t,b_t", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("start_rows", [None, 1, "M"])
def test_kernel_matches_a_float64_product_over_odd_shapes_and_strides(B, M, K, N, a_t, b_t, start_rows):
    gen = torch.Generator().manual_seed(B * 1000 + M * 100 + K * 10 + N)
    a, b = _operand(B, M, K, a_t, gen), _operand(B, K, N, b_t, gen)
    start = None if start_rows is None else torch.randn(B, M if start_rows == "M" else 1, N, generator=gen)
    out = torch.full((B, M, N), float("nan"))
    ext.task_matmul(a, b, start, out)
    want = _reference(a, b, start)
    scale = (a.double().abs() @ b.double().abs()).amax().item() + 1.0
    assert torch.isfinite(out).all()
    assert (out.double() - want).abs().max().item() <= 2e-6 * scale


@needs_kernel
def test_kernel_reads_a_shared_operand_and_writes_strided_rows():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 10, 12, generator=gen)
    shared = torch.randn(12, 40, generator=gen).expand(4, 12, 40)  # batch stride 0: one weight for all items
    out_base = torch.full((4, 10, 50), float("nan"))
    out = out_base[:, :, 5:45]  # rows of 40 inside rows of 50
    ext.task_matmul(a, shared, None, out)
    assert (out.double() - _reference(a, shared, None)).abs().max().item() <= 1e-5
    assert torch.isnan(out_base[:, :, :5]).all() and torch.isnan(out_base[:, :, 45:]).all()


@needs_kernel
@pytest.mark.parametrize("bad,words", [
    (lambda a, b, s, o: (a.double(), b, s, o), "a must be a 3-d float32 CPU tensor"),
    (lambda a, b, s, o: (a, b[:, :-1], s, o), "b must be [2, 6, N]"),
    (lambda a, b, s, o: (a, b, s, o.transpose(1, 2).contiguous().transpose(1, 2)), "out must be [2, 5, 7] with contiguous rows"),
    (lambda a, b, s, o: (a, b, torch.zeros(2, 3, 7), o), "start must be [2, 5 or 1, 7]"),
    (lambda a, b, s, o: (a[0], b, s, o), "a must be a 3-d"),
])
def test_kernel_arguments_are_checked(bad, words):
    a, b, out = torch.randn(2, 5, 6), torch.randn(2, 6, 7), torch.empty(2, 5, 7)
    with pytest.raises(RuntimeError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ext.task_matmul(*bad(a, b, None, out))


@needs_kernel
def test_kernel_refuses_to_run_without_avx512_allowed():
    ext.set_cpu_avx512(False)
    try:
        assert not ext.task_matmul_available()
        with pytest.raises(RuntimeError, match="needs AVX-512"):
            ext.task_matmul(torch.randn(1, 2, 3), torch.randn(1, 3, 4), None, torch.empty(1, 2, 4))
    finally:
        ext.set_cpu_avx512(True)


@pytest.fixture
def policy():
    """Enters matmul.use_policy(value) for the rest of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda value: stack.enter_context(matmul.use_policy(value))


def test_blas_policy_runs_torch_s_products_bit_for_bit(policy):
    policy("blas")
    gen = torch.Generator().manual_seed(0)
    a, b, start = torch.randn(3, 9, 20, generator=gen), torch.randn(3, 20, 11, generator=gen), torch.randn(3, 1, 11, generator=gen)
    assert not matmul.kernel_chosen()
    assert torch.equal(matmul.task_bmm(a, b), torch.bmm(a, b))
    assert torch.equal(matmul.task_bmm(a, b, start), torch.baddbmm(start, a, b))


@needs_kernel
def test_kernel_policy_runs_the_kernel_except_where_autograd_or_a_forced_backend_needs_torch(policy, monkeypatch):
    policy("kernel")
    assert matmul.kernel_chosen()
    calls = []
    real = ext.task_matmul
    monkeypatch.setattr(ext, "task_matmul", lambda *args: calls.append(1) or real(*args))
    a, b = torch.randn(2, 4, 6), torch.randn(2, 6, 3)
    out = matmul.task_bmm(a, b)
    assert calls == [1] and (out - torch.bmm(a, b)).abs().max() < 1e-5
    matmul.task_bmm(a.double(), b.double())  # float64: the BLAS
    with _backend.use_backend("reference"):
        matmul.task_bmm(a, b)
    recorded = matmul.task_bmm(a.requires_grad_(), b)
    assert calls == [1] and recorded.grad_fn is not None
    with torch.no_grad():
        matmul.task_bmm(a, b)
    assert calls == [1, 1]


def test_auto_policy_decides_once_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("METAKERNELS_CPU_MATMUL", "auto")
    matmul.reset_choice()
    try:
        first = matmul.kernel_chosen()
        monkeypatch.setattr(matmul, "_kernel_is_faster", lambda: pytest.fail("timed twice"))
        assert matmul.kernel_chosen() == first
    finally:
        matmul.reset_choice()
    monkeypatch.setenv("METAKERNELS_CPU_MATMUL", "fastest")
    with pytest.raises(ValueError, match="METAKERNELS_CPU_MATMUL must be one of"):
        matmul.kernel_chosen()
    with pytest.raises(ValueError, match="policy must be one of"):
        with matmul.use_policy("fastest"):
            pass


@needs_kernel
def test_float32_meta_gradients_with_the_kernel_match_the_blas_s(policy):
    """Both paths sum in float32 in another order: the meta-gradients agree to float32 rounding."""
    def meta_gradients(value):
        policy(value)
        torch.manual_seed(0)
        model = TransformerLM(vocab=19, d_model=32, n_heads=2, n_layers=2, max_len=12)
        gen = torch.Generator().manual_seed(1)
        support, query = (torch.randint(0, 19, (3, 2, 13), generator=gen) for _ in range(2))
        loss = mk.MAML(model, inner_lr=0.3, inner_steps=2, fused_layers=True)(lm_loss, support, query)
        return torch.autograd.grad(loss, list(model.parameters()))

    for got, want in zip(meta_gradients("kernel"), meta_gradients("blas")):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7
