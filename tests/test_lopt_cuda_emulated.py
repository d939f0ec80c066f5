"""The CUDA learned-optimizer kernels (csrc/cuda/lopt.cu) on the CPU, under the stand-in runtime of
tests/cuda_emulation, through the real binding (python/lopt_binding.cpp): the tests every backend passes
(tests/test_learned_update.py, and the meta-gradient of an unroll in tests/test_learned_optimizer.py), run with
the emulated CUDA kernels as the backend, and some of the emulation's own.  This proves the kernels' indexing
(jobs, segments, tasks), their block reductions and each compiled instance of the MLP where no GPU is; it cannot
see what only the hardware decides (register and shared-memory limits, timing).  The gradcheck test is left out
(25 s under the emulation): the float64 reference test checks the forward and backward kernels directly, and the
autograd wiring gradcheck adds is the same on every backend (see test_cuda_emulated.py)."""
import torch

import metakernels as mk
import test_learned_optimizer as lo
import test_learned_update as lu
from emulate import host_source, on_emulated_cuda

# Every instance of the step kernel: hidden 32 and 4 at two layers are compiled with their shape fixed,
# other hidden sizes up to 32 share one instance and larger ones another.  Segments of exactly one job, one
# element past it, and a one-element tensor between them; one of 313 jobs, more than the 256 threads that
# sum a segment's job partials.
CASES = [(3, [64, 65, 1, 130], 32, 2), (2, [64, 65, 1, 130], 4, 2), (1, [300], 40, 1), (2, [20000, 3], 4, 1)] + lu.CASES

test_forward_and_backward_match_reference = on_emulated_cuda(lu.test_forward_and_backward_match_reference,
                                                             {"T,segments,hidden,layers": CASES})
test_only_params_cotangent_and_unneeded_inputs = on_emulated_cuda(lu.test_only_params_cotangent_and_unneeded_inputs)
test_single_task_form_matches_batched = on_emulated_cuda(lu.test_single_task_form_matches_batched)
test_weights_not_on_a_16_byte_boundary = on_emulated_cuda(lu.test_weights_not_on_a_16_byte_boundary)
test_weight_gradient_is_deterministic = on_emulated_cuda(lu.test_weight_gradient_is_deterministic)
test_zero_gradients_stay_finite = on_emulated_cuda(lu.test_zero_gradients_stay_finite)
test_in_place_form_writes_the_step_over_its_operands = on_emulated_cuda(
    lu.test_in_place_form_writes_the_step_over_its_operands)
test_in_place_form_of_one_task_and_of_nothing = on_emulated_cuda(lu.test_in_place_form_of_one_task_and_of_nothing)
test_unroll_meta_gradient_matches_sequential_reference = on_emulated_cuda(
    lo.test_unroll_meta_gradient_matches_sequential_reference)


def test_float16_matches_the_cpu_backend(cuda_emulation):
    params, grads, state, weights = lu.make(2, [37, 91], 32, 2, torch.float16, "cpu")
    offsets, hyper = [0, 37, 128], lu.HYPER.values()
    want = mk._backend.extension().lopt_forward(params, grads, state, weights, offsets, 32, 2, hyper)
    got = cuda_emulation.lopt_forward(params, grads, state, weights, offsets, 32, 2, hyper)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


def test_backward_over_more_jobs_than_blocks_is_deterministic(cuda_emulation):
    """Every reduction has a fixed order: two runs agree bit for bit, the backward's weight gradient over more
    jobs than it has blocks included."""
    inputs = lu.make(2, [1000, 70000, 3], 4, 2, torch.float32, "cpu")
    offsets, hyper = [0, 1000, 71000, 71003], lu.HYPER.values()
    gen = torch.Generator().manual_seed(2)
    gp, gs = torch.randn(inputs[0].shape, generator=gen), torch.randn(inputs[2].shape, generator=gen)
    runs = []
    for _ in range(2):
        p_new, s_new, norms = cuda_emulation.lopt_forward(*inputs, offsets, 4, 2, hyper)
        runs.append([p_new, s_new, norms, *cuda_emulation.lopt_backward(*inputs, norms, offsets, 4, 2, hyper, gp, gs,
                                                                          [True, True, True])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_launches_and_dynamic_shared_memory_are_rewritten():
    source = ("extern __shared__ unsigned char smem_raw[];\n"
              "step_kernel<scalar_t, 32, 32, 2><<<grid, kStepThreads, 0, stream>>>(h, a);\n"
              "k<<<static_cast<unsigned>(n), 64>>>(x);\n"
              "kernel<decltype(k)::value, decltype(tag)>\n    <<<grid, 256, 0, s>>>(h, a);")
    assert host_source(source) == (
        "unsigned char* smem_raw = reinterpret_cast<unsigned char*>(mk_emu::dynamic_shared);\n"
        "mk_emu::launch(step_kernel<scalar_t, 32, 32, 2>, grid, kStepThreads, 0, stream)(h, a);\n"
        "mk_emu::launch(k, static_cast<unsigned>(n), 64)(x);\n"
        "mk_emu::launch(kernel<decltype(k)::value, decltype(tag)>, grid, 256, 0, s)(h, a);")
