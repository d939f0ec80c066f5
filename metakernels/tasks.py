"""Task batches: tensors, tuples/lists or dicts (nested) whose tensors all carry a leading task
dimension T."""
from __future__ import annotations

import torch
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_map


def task_count(batch, name: str) -> int:
    """T of a task batch; raises a clear error, naming the leaf by its path in the batch
    (``support[1]``, ``query['labels']``), when leaves disagree or lack the task dimension."""
    leaves = tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(f"'{name}' holds no tensors; expected tensors with a leading task dimension T")
    T = first = None
    for path, leaf in leaves:
        where = name + keystr(path)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{where} is a {type(leaf).__name__}; every leaf of '{name}' must be a tensor "
                            f"[T, ...] (a value shared by all tasks belongs in loss_fn, not in the batch)")
        if leaf.dim() == 0:
            raise ValueError(f"{where} is a 0-d tensor; every tensor of '{name}' needs a leading task dimension T")
        if T is None:
            T, first = leaf.shape[0], where
            if T == 0:
                raise ValueError(f"{where} has shape {list(leaf.shape)}: no tasks; a task batch needs T >= 1")
        elif leaf.shape[0] != T:
            raise ValueError(f"'{name}' leaves disagree on the task count: {first} has T={T}, "
                             f"{where} has shape {list(leaf.shape)}")
    return T


def select_tasks(batch, index):
    """The batch restricted to tasks ``index`` (an int drops the task dimension, a slice keeps it)."""
    return tree_map(lambda x: x[index], batch)
