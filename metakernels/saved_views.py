"""Saved views of the fast weights stored as compact copies.

Autograd keeps what each op saves for its backward.  A layer that reads its weight back in the backward
(a linear layer, the vocabulary head, a norm) saves a view of the step's [T, P] fast weights, and a view
keeps its whole storage alive: over K second-order inner steps that pins K [T, P] tensors, including
the parameters no op saves (an embedding's backward needs only the indices; biases).  Inside
``saved_as_copies(fast)``, a view of ``fast`` that autograd saves is stored as a copy of just that view,
so each step keeps only the parameters its ops read back and ``fast`` is freed once the next step's
weights exist.  The copies carry the views' autograd history, so every derivative is unchanged.

Measured on the benchmark LM with a 32k vocabulary (T=16, K=5, second order, CPU; the embedding and the
head are 8.4M of the 8.8M parameters): see benchmarks/RESULTS.md, "Saved views as compact copies"."""
from __future__ import annotations

import contextlib

import torch


def _hooks_available() -> bool:
    """False inside torch.func's grad transforms (they refuse saved-tensor hooks) and under a caller's
    own hooks (such as ``torch.autograd.graph.save_on_cpu``), which an inner pair would override."""
    return (torch._C._autograd._saved_tensors_hooks_is_enabled()
            and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


def _unpack(saved: torch.Tensor) -> torch.Tensor:
    return saved


@contextlib.contextmanager
def saved_as_copies(fast: torch.Tensor):
    """While active, autograd saves a view of ``fast`` ([T, P], not expanded) as a compact copy; each
    distinct view is copied once however many ops save it."""
    if fast.dim() != 2 or fast.stride(0) == 0 or not fast.requires_grad or not _hooks_available():
        yield
        return
    # The hook outlives this context (autograd keeps it with what it packed), so it holds the storage's
    # address and size, not ``fast``: holding the tensor would pin the very memory this frees.
    storage, numel = fast.untyped_storage().data_ptr(), fast.numel()
    copies: dict[tuple, torch.Tensor] = {}

    def pack(saved: torch.Tensor) -> torch.Tensor:
        if saved.untyped_storage().data_ptr() != storage or saved.numel() >= numel:
            return saved
        key = (saved.storage_offset(), tuple(saved.shape), tuple(saved.stride()), saved.dtype)
        if key not in copies:
            copies[key] = saved.detach().clone()
        return copies[key]

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        copies.clear()


def storage_held_only_by(tensor: torch.Tensor, holders: int) -> bool:
    """Whether exactly ``holders`` tensors (``tensor`` and its views, each counted once) reference
    ``tensor``'s storage: no saved tensor, no caller's view, nothing else that would read it later.
    False where torch does not expose the count, and for a torch.func transform's wrapper (no storage)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None or torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        return False
    storage = tensor.untyped_storage()  # itself one more reference while it lives
    return use_count(storage._cdata) == holders + 1
