"""memory="low", second order: the meta-gradient of a chunk of tasks by a reverse sweep over the inner
steps, recomputing one step's graph at a time.

Fast mode keeps the graph of all K inner steps (each step's activations and the graph of its inner
gradient) until the meta-backward.  Here the forward sweep runs the K steps without a graph, keeping
only what enters each step k: the fast weights theta_{k-1} [T, P] (the shared [P] at k = 1), the
optimizer state s_{k-1}, and the random-number state the step drew from and the model's buffers as the
step found them (:mod:`metakernels.forward_state`).  The query loss gives
v_K = dL/dtheta_K; then, for k = K..1, step k is recomputed with its graph (the inner gradient with
create_graph, the same dropout masks and buffers) and its vector-Jacobian product at the incoming cotangents

    (v_{k-1}, w_{k-1}, d meta-parameters) += (v_k, w_k) . d(theta_k, s_k) / d(theta_{k-1}, s_{k-1}, meta-parameters)

takes the cotangents one step back (w: the optimizer state's cotangent; the meta-parameters are the
shared, non-adapted parameters the support loss uses and Meta-SGD's rates).  v_0 is the cotangent of
the initialisation.  The peak holds one step's graph instead of K, plus K + 1 copies of the fast
weights; each step's forward and backward run twice (once without create_graph)."""
from __future__ import annotations

import torch

from . import forward_state
from .graph_leaves import grad_without_hooks, leaves_outside
from .inner_loop import check_finite
from .recompute_guard import forward_not_recomputed


def _task_rows(params: torch.Tensor, T: int) -> torch.Tensor:
    return params.expand(T, -1) if params.dim() == 1 else params


def _detached(rate):
    return rate.detach() if isinstance(rate, torch.Tensor) else rate


def chunk_meta_gradients(maml, loss_fn, support, query, T: int, scale: float, meta_params: list[torch.Tensor],
                         first_task: int = 0, seed_scale: float = 1.0):
    """(scale * mean query loss, targets, seed_scale x its gradient for each target, None where unused;
    seed_scale is a loss scale, see :mod:`metakernels.chunk_scale`) for T tasks of
    ``maml`` (an :class:`metakernels.MAML`), without keeping more than one inner step's graph.  The
    targets are ``meta_params`` followed by the leaves outside them that the losses or the inner rate
    reach (:func:`metakernels.graph_leaves.leaves_outside`).
    first_task: the index of this chunk's first task in the whole batch, for error messages."""
    evaluator, optimizer = maml._evaluator, maml.optimizer
    theta0 = maml.layout.flatten().detach()
    device = theta0.device
    rate = maml.inner_rate_of_tasks(first_task, T)
    targets = meta_params + leaves_outside([rate], meta_params)
    rate = _detached(rate)
    entering = []  # (theta_{k-1}, s_{k-1}, forward state) of step k
    params, state = theta0, optimizer.initial_state(theta0.shape[0], theta0)
    for k in range(1, maml.inner_steps + 1):
        entering.append((params, state, forward_state.capture(device, evaluator.model)))
        with torch.enable_grad():
            rows = _task_rows(params, T).detach().requires_grad_()
            views = maml.layout.unflatten(rows)
            losses = evaluator.losses_of(loss_fn, views, support, T)
            if k == 1:
                targets += leaves_outside([losses], [*targets, rows])
            if maml.nan_policy == "raise":
                check_finite(losses, "inner (support)", k, first_task)
            with forward_not_recomputed(evaluator.model, type(maml).__name__):
                params, state = optimizer.descend(params, views, losses, state, rate, k, maml.layout)

    with torch.enable_grad():
        theta = params.detach().requires_grad_()  # [P] when K = 0: v is then summed over the tasks
        losses = evaluator.losses(loss_fn, _task_rows(theta, T), query, T)
        if maml.nan_policy == "raise":
            check_finite(losses, "query", maml.inner_steps, first_task)
        loss = losses.mean() * scale
        targets += leaves_outside([loss], [*targets, theta])
        # a leaf outside may hang on a graph built before this call (a closure's), which every chunk and step
        # traverses again
        retain = len(targets) > len(meta_params)
        v, *meta_grads = grad_without_hooks(loss * seed_scale, [theta, *targets], allow_unused=True,
                                            retain_graph=retain)
    after_query = forward_state.capture(device, evaluator.model)

    w = (None,) * len(state)
    for k in range(maml.inner_steps, 0, -1):
        theta, s, entered = entering[k - 1]
        if v is None and all(c is None for c in w):
            break  # nothing flows back from the query through this step
        forward_state.restore(entered)
        with torch.enable_grad():
            theta = theta.detach().requires_grad_()
            s = tuple(x.detach().requires_grad_(k > 1) for x in s)  # the initial state is a constant
            views, base = maml.layout.unflatten_for_update(theta, T)
            losses = evaluator.losses_of(loss_fn, views, support, T)
            step_rate = maml.inner_rate_of_tasks(first_task, T)  # anew each step: its graph is freed with the step's
            new_theta, new_s = optimizer.descend(base, views, losses, s, step_rate, k, maml.layout, create_graph=True)
            if not maml._second_order_checked:
                maml._check_twice_differentiable(new_theta)
            pairs = [(out, cot) for out, cot in zip((new_theta, *new_s), (v, *w)) if cot is not None]
            inputs = [theta, *(x for x in s if x.requires_grad), *targets]
            back = grad_without_hooks([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True,
                                      retain_graph=retain)
        v = back[0]
        n_states = len(inputs) - 1 - len(targets)
        w = tuple(back[1:1 + n_states]) if k > 1 else w
        meta_grads = [add_optional(a, b) for a, b in zip(meta_grads, back[1 + n_states:])]
    forward_state.restore(after_query)

    if v is not None:  # v = v_0, the cotangent of the initialisation: onto the adapted parameters
        index = {id(p): i for i, p in enumerate(targets)}
        for p, g in zip(maml.layout.parameters(), maml.layout.unflatten(v).values()):
            if id(p) in index:
                meta_grads[index[id(p)]] = add_optional(meta_grads[index[id(p)]], g)
    return loss.detach(), targets, meta_grads


def add_optional(a, b):
    """a + b where None stands for zero."""
    return b if a is None else (a if b is None else a + b)
