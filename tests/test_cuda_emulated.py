"""The CUDA kernels of the fused update, LayerNorm / RMSNorm, GELU, causal softmax and cross-entropy ops
(csrc/cuda) on the CPU, under the stand-in runtime of tests/cuda_emulation, through the real bindings of
python/: the value, gradient and determinism tests every backend passes, run with the emulated CUDA kernels as
the backend (the learned optimizer's are in test_lopt_cuda_emulated.py).  Where no GPU is, this is what checks
the kernels' indexing, block reductions and dtype conversions; register and shared-memory limits and timing stay
the GPU's to show.

Left out: the layers' gradcheck / gradgradcheck tests (about two minutes under the emulation).  The float64
reference tests wrapped here already check each of those kernels (forward, backward, double backward) directly;
what gradcheck adds is the autograd wiring of metakernels/ops, which is the same code on every backend and is
checked on the cpu backend.  The update's gradcheck, a few seconds, stays."""
import test_fused_layers as layers
import test_update_errors as update_errors
import test_update_gradcheck as update_gradcheck
import test_update_values as update_values
import test_xent_kernels as xent
import update_cases
from emulate import on_emulated_cuda

# The emulation runs a launch's blocks one after another with a real thread per CUDA thread: the shapes of
# test_update_values without its largest (16 x 100003, 6,256 blocks), one row of 100003 kept for the
# multi-block grid.
UPDATE_SHAPES = [(1, 1), (3, 37), (16, 1037), (2, 100003)]

test_update_forward_and_backward_match_float64_reference = on_emulated_cuda(
    update_values.test_forward_and_backward_match_float64_reference, {"T,P": UPDATE_SHAPES})


def test_update_over_more_tasks_than_the_grid_has_rows(emulated_cuda_kernels):
    """The forward's grid has at most 65,535 rows of tasks (kMaxGridY); each row then strides over the rest.  One
    op and layout (~20 s under the emulation), float32, with the task-shared operands whose sums over tasks in the
    backward were furthest off when summed in float32: this checks the indexing and the double sums at once."""
    update_values.test_float32_sums_over_65537_tasks_stay_within_tolerance(emulated_cuda_kernels, "momentum",
                                                                           update_cases.LAYOUTS[1])


test_update_unused_outputs_and_non_contiguous_inputs = on_emulated_cuda(
    update_values.test_unused_outputs_get_no_gradient_and_non_contiguous_inputs_work)
test_update_bf16_error = on_emulated_cuda(update_values.test_bf16_error_at_most_twice_a_bf16_pytorch_composition)
test_update_backward_is_deterministic = on_emulated_cuda(update_values.test_backward_is_deterministic)
test_update_gradcheck_and_gradgradcheck = on_emulated_cuda(update_gradcheck.test_gradcheck_and_gradgradcheck)
test_adam_backward_is_finite_where_v_is_zero = on_emulated_cuda(
    update_gradcheck.test_adam_backward_is_finite_where_v_is_zero)
test_update_second_order_path_matches_reference = on_emulated_cuda(
    update_gradcheck.test_second_order_path_matches_reference)
test_update_zero_size_inputs = on_emulated_cuda(update_errors.test_zero_size_inputs_return_empty_results)

test_norm_kernels_match_the_float64_reference = on_emulated_cuda(layers.test_norm_kernels_match_the_float64_reference)
test_gelu_kernels_match_the_float64_reference = on_emulated_cuda(layers.test_gelu_kernels_match_the_float64_reference)
test_layers_first_and_second_derivatives_equal_pytorch = on_emulated_cuda(
    layers.test_first_and_second_derivatives_equal_pytorch_layers)
test_softmax_kernels_match_the_float64_reference = on_emulated_cuda(
    layers.test_softmax_kernels_match_the_float64_reference)
test_causal_softmax_to_second_order = on_emulated_cuda(layers.test_causal_softmax_equals_pytorch_to_second_order)

test_xent_kernels_match_the_float64_reference = on_emulated_cuda(xent.test_kernels_match_the_float64_reference)
test_xent_logsumexp_of_infinite_rows = on_emulated_cuda(xent.test_logsumexp_of_infinite_rows_is_torchs)
test_xent_head_to_second_order = on_emulated_cuda(xent.test_the_head_on_each_backend_equals_pytorch_to_second_order)
