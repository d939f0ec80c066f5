"""pytest-benchmark suite of the fused update ops (forward + backward) against eager PyTorch:

    python -m pytest benchmarks/test_bench_update.py --benchmark-columns=median,iqr

Sizes are modest so the suite runs in about a minute; benchmarks/update_table.py gives the full
table with bandwidth fractions."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metakernels as mk  # noqa: E402
from metakernels import _backend  # noqa: E402
from update_table import eager_call, fused_call, make_inputs  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ["eager"] + [b for b in ("cpu", "cuda", "triton") if _backend._why_unavailable(b, DEVICE) is None]


@pytest.mark.parametrize("op", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_update_forward_backward(benchmark, op, variant):
    T, P = 16, 100_000
    inputs = list(make_inputs(op, T, P, DEVICE, requires_grad=True).values())
    fn = eager_call(op) if variant == "eager" else fused_call(op)
    cotangents = [torch.randn(T, P, device=DEVICE) for _ in fn(*inputs)]

    def step():
        with mk.use_backend(variant if variant != "eager" else "reference"):
            grads = torch.autograd.grad(fn(*inputs), inputs, cotangents)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return grads

    benchmark(step)
