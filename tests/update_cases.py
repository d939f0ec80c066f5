"""Inputs for the update-op tests: operand layouts ([P] shared or [T, P] per task, lr kinds) and a
float64 oracle built on the reference formulas."""
from __future__ import annotations

import dataclasses

import torch

import metakernels as mk

OPS = ("sgd", "momentum", "adam")
STATE_NAMES = {"sgd": (), "momentum": ("buf",), "adam": ("m", "v")}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which operands are [T, P] (the rest [P]) and what the learning rate is."""

    name: str
    batched: frozenset  # operand names among params, grads, buf, m, v
    lr: str  # "float", "scalar_tensor", "shared" ([P]) or "per_task" ([T, P])


LAYOUTS = [
    Layout("all_per_task", frozenset({"params", "grads", "buf", "m", "v"}), "float"),
    Layout("shared_init_meta_sgd", frozenset({"grads", "buf", "m", "v"}), "shared"),
    Layout("per_task_rates", frozenset({"params", "grads"}), "per_task"),
    Layout("all_shared", frozenset(), "scalar_tensor"),
    Layout("shared_init", frozenset({"grads", "buf", "m", "v"}), "float"),  # MAML's first inner step
    Layout("shared_grads_and_state", frozenset({"params"}), "float"),
]


def make_inputs(op: str, layout: Layout, T: int, P: int, dtype, device, seed: int = 0, requires_grad=False):
    """Returns (tensors: dict name -> tensor, lr), Adam's v in [0.5, 1.5) where its derivatives are well
    conditioned (v near 0 has its own tests)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(name, positive=False):
        shape = (T, P) if name in layout.batched else (P,)
        x = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64) if positive else torch.randn(shape, generator=gen, dtype=torch.float64)
        return x.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    tensors = {"params": rand("params"), "grads": rand("grads")}
    for name in STATE_NAMES[op]:
        tensors[name] = rand(name, positive=(name == "v"))
    if layout.lr == "float":
        lr = 0.05
    else:
        shape = {"scalar_tensor": (), "shared": (P,), "per_task": (T, P)}[layout.lr]
        lr = (0.01 + 0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype=dtype, device=device)
        lr.requires_grad_(requires_grad)
    return tensors, lr


def call(op: str, tensors: dict, lr):
    if op == "sgd":
        return (mk.ops.sgd_update(tensors["params"], tensors["grads"], lr),)
    if op == "momentum":
        return mk.ops.momentum_update(tensors["params"], tensors["grads"], tensors["buf"], lr, 0.9)
    return mk.ops.adam_update(tensors["params"], tensors["grads"], tensors["m"], tensors["v"], 3, lr, 0.9, 0.99, 1e-8)


def call_reference_f64(op: str, tensors: dict, lr):
    """The oracle: the reference backend on float64 CPU copies (differentiable)."""
    def f64(x):
        return x.detach().to("cpu", torch.float64).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x

    t64 = {k: f64(v) for k, v in tensors.items()}
    lr64 = f64(lr)
    with mk.use_backend("reference"):
        return call(op, t64, lr64), t64, lr64


def differentiable_inputs(tensors: dict, lr) -> list:
    return list(tensors.values()) + ([lr] if isinstance(lr, torch.Tensor) else [])


def assert_close(actual, expected, dtype, what):
    tol = {torch.float64: (1e-11, 1e-11), torch.float32: (2e-5, 2e-5)}[dtype]
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected.detach(), rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")

