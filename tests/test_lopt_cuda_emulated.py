"""The CUDA learned-optimizer kernels (csrc/cuda/lopt.cu) on the CPU, under the stand-in runtime of
tests/cuda_emulation: the op's autograd runs them in place of the CPU backend's and is checked against the
float64 reference as every backend is (tests/test_learned_update.py).  This proves their indexing (jobs,
segments, tasks), their block reductions and each compiled instance of the MLP where no GPU is; it cannot
see what only the hardware decides (register and shared-memory limits, timing)."""
import importlib
import os
import sys

import pytest
import torch

import metakernels as mk
import test_learned_update as lu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emulation"))

import emulate  # noqa: E402

learned_update_module = importlib.import_module("metakernels.ops.learned_update")  # (ops exports a function of that name)

# Every instance of the step kernel: hidden 32 and 4 at two layers are compiled with their shape fixed,
# other hidden sizes up to 32 share one instance and larger ones another.  Segments of exactly one job, one
# element past it, and a one-element tensor between them; one of 313 jobs, more than the 256 threads that
# sum a segment's job partials.
CASES = [(3, [64, 65, 1, 130], 32, 2), (2, [64, 65, 1, 130], 4, 2), (1, [300], 40, 1), (2, [20000, 3], 4, 1)] + lu.CASES


@pytest.fixture(scope="module")
def emulated_cuda():
    return emulate.build("mk_lopt_emulated", "lopt.cu", "lopt_binding.cpp")


@pytest.fixture
def cuda_kernels_on_cpu(emulated_cuda, monkeypatch):
    monkeypatch.setattr(learned_update_module, "_kernels", lambda backend: emulated_cuda)
    with mk.use_backend("cpu"):
        yield emulated_cuda


@pytest.mark.parametrize("T,segments,hidden,layers", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_cuda_kernels_match_reference(cuda_kernels_on_cpu, T, segments, hidden, layers, dtype):
    lu.check_against_reference(torch.device("cpu"), T, segments, hidden, layers, dtype)


def test_cuda_kernels_float16_match_the_cpu_backend(emulated_cuda):
    params, grads, state, weights = lu.make(2, [37, 91], 32, 2, torch.float16, "cpu")
    offsets, hyper = [0, 37, 128], lu.HYPER.values()
    want = mk._backend.extension().lopt_forward(params, grads, state, weights, offsets, 32, 2, hyper)
    got = emulated_cuda.lopt_forward(params, grads, state, weights, offsets, 32, 2, hyper)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


def test_cuda_backward_with_some_cotangents_and_inputs(cuda_kernels_on_cpu):
    lu.test_only_params_cotangent_and_unneeded_inputs((None, torch.device("cpu")))


@pytest.mark.parametrize("hidden", [4, 32])
def test_cuda_weights_not_on_a_16_byte_boundary(cuda_kernels_on_cpu, hidden):
    lu.test_weights_not_on_a_16_byte_boundary((None, torch.device("cpu")), hidden)


def test_cuda_kernels_are_deterministic(emulated_cuda):
    """Every reduction has a fixed order: two runs agree bit for bit (the backward's weight gradient
    over more jobs than it has blocks included)."""
    inputs = lu.make(2, [1000, 70000, 3], 4, 2, torch.float32, "cpu")
    offsets, hyper = [0, 1000, 71000, 71003], lu.HYPER.values()
    gen = torch.Generator().manual_seed(2)
    gp, gs = torch.randn(inputs[0].shape, generator=gen), torch.randn(inputs[2].shape, generator=gen)
    runs = []
    for _ in range(2):
        p_new, s_new, norms = emulated_cuda.lopt_forward(*inputs, offsets, 4, 2, hyper)
        runs.append([p_new, s_new, norms, *emulated_cuda.lopt_backward(*inputs, norms, offsets, 4, 2, hyper, gp, gs,
                                                                         [True, True, True])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_in_place_step(cuda_kernels_on_cpu):
    params, grads, state, weights = lu.make(2, [37, 91], 32, 2, torch.float32, "cpu")
    want_p, want_s = lu.step(params, grads, state, weights, [37, 91], 32, 2)
    got_p, got_s = mk.ops.learned_update_(params, grads, state, weights, hidden=32, layers=2, segments=[37, 91],
                                          hyper=lu.HYPER)
    assert got_p is params and got_s is state
    assert torch.equal(params, want_p) and torch.equal(state, want_s)


def test_launches_and_dynamic_shared_memory_are_rewritten():
    source = ("extern __shared__ unsigned char smem_raw[];\n"
              "step_kernel<scalar_t, 32, 32, 2><<<grid, kStepThreads, 0, stream>>>(h, a);\n"
              "k<<<static_cast<unsigned>(n), 64>>>(x);")
    assert emulate.host_source(source) == (
        "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(mk_emu::dynamic_shared);\n"
        "mk_emu::launch(step_kernel<scalar_t, 32, 32, 2>, grid, kStepThreads, 0, stream)(h, a);\n"
        "mk_emu::launch(k, static_cast<unsigned>(n), 64)(x);")
