"""The sequential oracle for meta-gradients: plain per-parameter tensors for each task, one
torch.autograd.grad(create_graph=True) per task and step, and the update math written out in PyTorch.

Tasks are visited in the order the engine's loop visits them (every task's support forward at step
1, then at step 2, ..., then every query forward), so that models with dropout draw the same masks."""
from __future__ import annotations

import torch
from torch.func import functional_call


def _safe_sqrt(x):
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _task(batch, t):
    return batch[t] if isinstance(batch, torch.Tensor) else tuple(x[t] for x in batch)


def sequential_meta_loss(model, loss_fn, support, query, *, names, lrs, steps, first_order=False, optimizer="sgd",
                         momentum=0.9, betas=(0.9, 0.999), eps=1e-8):
    """Mean query loss over tasks; ``lrs`` maps each adapted name to its rate (number or tensor)."""
    params = dict(model.named_parameters())
    T = (support if isinstance(support, torch.Tensor) else support[0]).shape[0]
    fast = [{n: params[n] for n in names} for _ in range(T)]
    state = [{n: (torch.zeros_like(params[n]), torch.zeros_like(params[n])) for n in names} for _ in range(T)]
    for k in range(1, steps + 1):
        losses = [loss_fn(lambda *a, w=fast[t], **kw: functional_call(model, w, a, kw), _task(support, t)) for t in range(T)]
        for t in range(T):
            grads = torch.autograd.grad(losses[t], [fast[t][n] for n in names], create_graph=not first_order)
            new = {}
            for n, g in zip(names, grads):
                p, lr = fast[t][n], lrs[n]
                if optimizer == "sgd":
                    new[n] = p - lr * g
                elif optimizer == "momentum":
                    buf = momentum * state[t][n][0] + g
                    state[t][n] = (buf, None)
                    new[n] = p - lr * buf
                else:
                    b1, b2 = betas
                    m = b1 * state[t][n][0] + (1 - b1) * g
                    v = b2 * state[t][n][1] + (1 - b2) * g * g
                    state[t][n] = (m, v)
                    new[n] = p - lr * (m / (1 - b1**k)) / (_safe_sqrt(v / (1 - b2**k)) + eps)
            fast[t] = new
    query_losses = [loss_fn(lambda *a, w=fast[t], **kw: functional_call(model, w, a, kw), _task(query, t)) for t in range(T)]
    return sum(query_losses) / T
