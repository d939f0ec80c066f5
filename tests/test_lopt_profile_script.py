"""benchmarks/lopt_profile.py: the per-kernel breakdown of the learned-optimizer step (a CPU smoke run)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import harness  # noqa: E402
import lopt_profile  # noqa: E402
import torch  # noqa: E402


def test_profile_names_the_fused_passes_and_the_eager_ops(capsys):
    lopt_profile.main(["--quick", "--hidden", "4"])
    out = capsys.readouterr().out
    for label in ("reference fwd:", "reference fwd+bwd:"):
        assert f"hidden=4 1x20000 {label} wall" in out
    assert "aten::mm" in out  # the eager MLP's products
    if "cpu" in harness.compiled_backends(torch.device("cpu")):
        assert "cpu fwd+bwd: wall" in out and "_FusedLearnedUpdateBackward" in out
