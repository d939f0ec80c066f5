"""Walks over autograd graphs: their nodes, and the leaf tensors they reach, which a meta-gradient
taken inside the forward (MAML's task_chunk and memory="low") must also hand gradients to, besides the
MAML's own parameters.

Those modes differentiate each chunk of tasks with ``torch.autograd.grad`` before the caller's
``backward`` and hand the sums over.  Anything else the losses depend on that requires grad (support
or query tensors that do, an encoder ``loss_fn`` calls outside the wrapped model, an ``inner_lr``
tensor that is not a parameter) would otherwise get no gradient at all, where the fast mode's single
graph gives it one."""
from __future__ import annotations

import torch


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
