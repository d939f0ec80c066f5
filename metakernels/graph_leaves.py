"""Walks over autograd graphs: their nodes, and the leaf tensors they reach, which a meta-gradient
taken inside the forward (MAML's task_chunk and memory="low") must also hand gradients to, besides the
MAML's own parameters.

Those modes differentiate each chunk of tasks with ``torch.autograd.grad`` before the caller's
``backward`` and hand the sums over.  Anything else the losses depend on that requires grad (support
or query tensors that do, an encoder ``loss_fn`` calls outside the wrapped model, an ``inner_lr``
tensor that is not a parameter) would otherwise get no gradient at all, where the fast mode's single
graph gives it one.

Two things keep those modes' gradients the fast mode's, seen from outside:
- the tensors of the task batches that require grad are replaced by detached aliases
  (:func:`with_stand_ins`), whose gradients are handed to the originals: a tensor computed before the
  call (an encoder's output) is then differentiated through once, by the caller's backward, not once
  per chunk, and the caller can differentiate with respect to it or hook it;
- the targets' tensor hooks are held off while the chunks are differentiated (:func:`grad_without_hooks`):
  a hook sees the summed gradient once, in the caller's backward, as in the fast mode, and not every
  chunk's part too (a hook that scales or clips its gradient did so twice)."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._pytree import tree_map


def graph_nodes(nodes):
    """Every autograd node reachable from ``nodes`` (grad_fns; None is skipped), each once."""
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def leaves_outside(roots, inside) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that the autograd graphs of ``roots`` reach, other than those in
    ``inside`` (compared by identity), in the order found.  A root that is itself such a leaf counts."""
    known = {id(t) for t in inside}
    found = []
    roots = [r for r in roots if isinstance(r, torch.Tensor) and r.requires_grad]
    for root in roots:
        if root.grad_fn is None:
            _keep_new(root, known, found)
    for node in graph_nodes(root.grad_fn for root in roots):
        if node.name() == "torch::autograd::AccumulateGrad":  # the graph ends at a leaf
            _keep_new(node.variable, known, found)
    return found


def _keep_new(leaf: torch.Tensor, known: set[int], found: list[torch.Tensor]) -> None:
    if id(leaf) not in known:
        known.add(id(leaf))
        found.append(leaf)


def with_stand_ins(batch, originals: dict[int, torch.Tensor]):
    """``batch`` with each tensor that requires grad replaced by a detached alias that requires grad (a
    leaf of its own, sharing the memory), recorded in ``originals`` as id(alias) -> the tensor."""
    def stand_in(x):
        if not (isinstance(x, torch.Tensor) and x.requires_grad):
            return x
        alias = x.detach().requires_grad_()
        originals[id(alias)] = x
        return alias
    return tree_map(stand_in, batch)


def grad_without_hooks(outputs, inputs, *args, **kwargs):
    """``torch.autograd.grad(outputs, inputs, *args, **kwargs)`` with the hooks registered on ``inputs``
    (``Tensor.register_hook``) held off: they see the sum the caller's backward hands over instead.  The
    hooks are those in each tensor's ``_backward_hooks``, torch's own store of them, emptied meanwhile."""
    with contextlib.ExitStack() as stack:
        for hooks in {id(h): h for t in inputs if (h := t._backward_hooks)}.values():
            held = dict(hooks)
            hooks.clear()
            stack.callback(hooks.update, held)
        return torch.autograd.grad(outputs, inputs, *args, **kwargs)
