"""Settings of the meta-algorithms that are checked whenever they are set: when the object is built, and
when a training script changes one later (``maml.first_order = True`` for a warm-up phase,
``maml.inner_steps = k`` for a curriculum).  Assigned as plain attributes, ``inner_steps = -1`` ran zero
steps, ``memory = "tiny"`` ran the fast mode and ``task_chunk = 0`` chunks of one task, without a word."""
from __future__ import annotations


class CheckedSetting:
    """A class attribute whose value, on each assignment, is ``check(value)`` (which returns the value to
    keep, or raises naming the setting)."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        try:
            return obj.__dict__[self.slot]
        except KeyError:
            raise AttributeError(f"{self.slot[1:]} has not been set") from None

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = self.check(value)


def one_of(name: str, choices: tuple):
    """A check that ``value`` is one of ``choices``."""
    def check(value):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value
    return check
