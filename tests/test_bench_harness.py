"""benchmarks/harness.py's matmul ceiling: every fp32 product this process can run, the fastest counted."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import harness  # noqa: E402
from metakernels._backend import extension  # noqa: E402


def test_rates_of_every_product_this_process_runs():
    rates = harness.matmul_rates(torch.device("cpu"), n=96, repeats=2)
    assert "torch.mm" in rates and all(math.isfinite(r) and r > 0 for r in rates.values())
    ext = extension()
    assert ("metakernels kernel" in rates) == (ext is not None and ext.task_matmul_available())
    assert ("oneDNN" in rates) == torch.backends.mkldnn.is_available()


def test_a_product_that_disagrees_is_not_counted(monkeypatch):
    monkeypatch.setattr(harness, "_cpu_products", lambda a, b: {"wrong": lambda: torch.zeros(a.shape[0], b.shape[1]),
                                                                "right": lambda: a @ b})
    assert set(harness.matmul_rates(torch.device("cpu"), n=32, repeats=1)) == {"torch.mm", "right"}


def test_the_ceiling_is_the_fastest_and_the_line_names_it():
    rates = {"torch.mm": 203.4, "oneDNN": 424.6, "metakernels kernel": 473.6}
    assert harness.matmul_ceiling(rates) == ("metakernels kernel", 473.6)
    assert harness.describe_matmul(rates) == "fp32 matmul 474 GFLOP/s (metakernels kernel; torch.mm 203, oneDNN 425)"
    assert harness.describe_matmul({"torch.mm": 50.0}) == "fp32 matmul 50 GFLOP/s (torch.mm)"


def test_the_compiled_backends_timed_on_a_cpu_are_the_cpu_backend_where_it_runs():
    expected = ["cpu"] if extension() is not None else []
    assert harness.compiled_backends(torch.device("cpu")) == expected
