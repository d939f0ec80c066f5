"""Argument checks shared by the op families: every message names the argument, what was expected and
what was given, and nothing is broadcast that the op does not document."""
from __future__ import annotations

import math
import numbers
import operator
import warnings

import numpy as np
import torch


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def require_tensor(op: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: argument '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{op}: argument '{name}' must be a floating-point tensor, got dtype {value.dtype}")
    return value


def require_like(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as the reference tensor (no implicit promotion or transfer)."""
    if value.dtype != ref.dtype:
        raise TypeError(
            f"{op}: argument '{name}' has dtype {value.dtype} but '{ref_name}' has {ref.dtype}; "
            "mixed dtypes are not promoted, convert one of them"
        )
    if value.device != ref.device:
        raise ValueError(
            f"{op}: argument '{name}' is on {value.device} but '{ref_name}' is on {ref.device}; "
            "move them to one device"
        )


def require_number(op: str, name: str, value, *, low=None, high=None, high_open=False, low_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: argument '{name}' must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: argument '{name}' must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(
            f"{op}: argument '{name}' must be in {lo}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{hi}, got {value}"
        )
    return value


def as_integer(value) -> int | None:
    """``value`` as an int where it is one (Python and numpy integers, integer 0-d tensors), else None;
    bools are not integers here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def require_int(name: str, value, low: int, high: int | None = None, note: str = "") -> int:
    """``value`` as a Python int (Python and numpy integers, integer 0-d tensors; not bools or floats) in
    [low, high]; else a ValueError "<name> must be an int >= <low><note>, got <value>" (``in [low, high]``
    where there is a high bound).  ``name`` says where, e.g. "adam_update: argument 'step'"."""
    integer = as_integer(value)
    if integer is None or integer < low or (high is not None and integer > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}{note}, got {value!r}")
    return integer


def require_bool(name: str, value, none_ok: bool = False) -> bool | None:
    """``value`` as a Python bool (a bool or numpy bool; None too where ``none_ok``); else a TypeError
    "<name> must be True or False, got <value>".  A flag is never read by truthiness: "false" from a
    config file would otherwise switch it on."""
    if value is None and none_ok:
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False{' or None' if none_ok else ''}, got {value!r}")
    return bool(value)


def warn_float16_second_moment(where: str, dtype: torch.dtype, beta: float) -> None:
    """A warning where a second moment of gradients is kept in float16: ``(1 - beta) * g^2`` rounds to 0
    below half float16's smallest subnormal, 2^-25, i.e. for ``|g| < sqrt(2^-25 / (1 - beta))`` (5.5e-3 at
    beta = 0.999), and each step then divides by a moment that lost its history."""
    if dtype == torch.float16:
        threshold = math.sqrt(2.0 ** -25 / (1.0 - beta))
        warnings.warn(f"{where}: the second moment of the gradients is kept in float16, where (1 - {beta}) * g^2 "
                      f"is 0 for |g| < {threshold:.1e}; such steps lose their scale. Keep these parameters in "
                      "bfloat16 or float32", stacklevel=3)


def require_seed(where: str, seed) -> int | None:
    """``seed`` as a Python int, or None; TypeError for anything else (torch.Generator.manual_seed's own error
    names no argument)."""
    if seed is None:
        return None
    integer = as_integer(seed)
    if integer is None:
        raise TypeError(f"{where}: argument 'seed' must be an int or None, got {type(seed).__name__}")
    return integer


def task_operand_shape(op: str, named: list[tuple[str, torch.Tensor]]) -> tuple[int | None, int]:
    """Checks operands that are each [P] (shared by all tasks) or [T, P] (one row per task).

    P is fixed by the first operand's last dimension, T by the first [T, P] operand.  Returns
    (T, P), with T None when every operand is [P].
    """
    first_name, first = named[0]
    if first.dim() not in (1, 2):
        raise ValueError(f"{op}: argument '{first_name}' must be [P] or [T, P], got shape {shape_str(first.shape)}")
    P = first.shape[-1]
    T, t_name = None, None
    for name, t in named:
        if t.dim() == 2 and T is None:
            T, t_name = t.shape[0], name
    for name, t in named:
        expected = f"[{P}] or [{T}, {P}] (T from '{t_name}')" if T is not None else f"[{P}] or [T, {P}]"
        if t.dim() not in (1, 2) or t.shape[-1] != P or (t.dim() == 2 and t.shape[0] != T):
            raise ValueError(
                f"{op}: argument '{name}' must have shape {expected} (P from '{first_name}'), "
                f"got {shape_str(t.shape)}"
            )
    return T, P


def task_matrices(op: str, x_name: str, x: torch.Tensor, weight: torch.Tensor, rows: str, cols: str) -> int:
    """Checks that ``weight`` is one matrix [rows, cols] or one per task [*task, rows, cols] for ``x``
    [*task, ..., cols] (same dtype and device); returns the number of matrices."""
    require_tensor(op, x_name, x)
    require_tensor(op, "weight", weight)
    require_like(op, "weight", weight, x_name, x)
    if weight.dim() < 2 or x.dim() < weight.dim() - 1 or x.shape[-1] != weight.shape[-1] \
            or x.shape[:weight.dim() - 2] != weight.shape[:-2]:
        raise ValueError(
            f"{op}: argument 'weight' must be [{rows}, {cols}] or [*task, {rows}, {cols}] with {x_name} "
            f"[*task, ..., {cols}] ({cols} = {x_name}'s last size, task sizes leading {x_name}'s), got weight "
            f"{shape_str(weight.shape)} for {x_name} {shape_str(x.shape)}"
        )
    return math.prod(weight.shape[:-2])
