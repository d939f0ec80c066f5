"""Compiles the learned-optimizer's Triton kernels for an H100/H200 (sm_90) on a machine with no GPU, as
they are specialised when the op runs, and prints one JSON line per kernel compiled: {"kernel", "case",
"error"}.  Run as a script by tests/test_triton_compiles_for_sm90.py, in a process of its own: the
interpreter (TRITON_INTERPRET=1, which the test process sets) never compiles, so a kernel that only the
GPU compiler rejects passes every interpreted test (seen on an H200, 2026-12-04: triton 3.6 refused to
reassign a constexpr in a static_range loop of the backward).

Triton's active driver is replaced by one that names the sm_90 target, and JITFunction._do_compile by one
that compiles the kernel through ptxas and launches nothing (the ops' outputs stay unwritten)."""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver, jit  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class _Sm90Driver:
    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _compile_only(case):
    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        error = None
        try:
            self.compile(self.ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
        except Exception as e:  # noqa: BLE001 - every compiler error is reported, whatever its type
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}"
        print(json.dumps({"kernel": self.fn.__name__, "case": case, "error": error}), flush=True)
        return None  # nothing to launch

    return do_compile


def main():
    from metakernels.ops import learned_update_triton as lt
    from metakernels.ops.learned_update import LoptHyper, num_weights

    driver.set_active(_Sm90Driver())
    T, offsets, hyper = 2, [0, 70, 203], LoptHyper().values()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for hidden, layers in ((4, 1), (8, 3), (32, 2)):
            case = f"{str(dtype).split('.')[-1]} hidden={hidden} layers={layers}"
            jit.JITFunction._do_compile = _compile_only(case)
            p, g = torch.randn(T, offsets[-1], dtype=dtype), torch.randn(T, offsets[-1], dtype=dtype)
            s = torch.rand(4, T, offsets[-1], dtype=dtype)
            w = torch.randn(num_weights(hidden, layers), dtype=lt.acc_dtype(dtype))
            _, _, norms = lt.lopt_forward(p, g, s, w, offsets, hidden, layers, hyper)
            lt.lopt_backward(p, g, s, w, norms, offsets, hidden, layers, hyper, torch.ones_like(p),
                             torch.ones_like(s), [True, True, True])


if __name__ == "__main__":
    sys.exit(main())
