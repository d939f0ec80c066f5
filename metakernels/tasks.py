"""Task batches: tensors, tuples/lists or dicts (nested) whose tensors all carry a leading task
dimension T."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map


def task_count(batch, name: str) -> int:
    """T of a task batch; raises a clear error when leaves disagree or lack the task dimension."""
    leaves, _ = tree_flatten(batch)
    if not leaves:
        raise ValueError(f"'{name}' holds no tensors; expected tensors with a leading task dimension T")
    T = None
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"'{name}' leaf {i} is a {type(leaf).__name__}; every leaf must be a tensor [T, ...]")
        if leaf.dim() == 0:
            raise ValueError(f"'{name}' leaf {i} is a 0-d tensor; every tensor needs a leading task dimension T")
        if T is None:
            T = leaf.shape[0]
            if T == 0:
                raise ValueError(f"'{name}' leaf 0 has shape {list(leaf.shape)}: no tasks; a task batch needs T >= 1")
        elif leaf.shape[0] != T:
            raise ValueError(
                f"'{name}' leaves disagree on the task count: leaf 0 has T={T}, leaf {i} has shape {list(leaf.shape)}"
            )
    return T


def select_tasks(batch, index):
    """The batch restricted to tasks ``index`` (an int drops the task dimension, a slice keeps it)."""
    return tree_map(lambda x: x[index], batch)
