"""Does meta-training the learned optimizer pay?  Meta-trains a LearnedOptimizer on a family of small
regression tasks and compares it, on held-out tasks of that family at the training horizon, with Adam
at the best learning rate of a grid (tuned on the meta-training tasks) and with the untrained rule.

Task family: fit y = teacher(x), a random 2-layer tanh teacher per task (16 inputs, 32 hidden units),
with a 2-layer tanh student (16 -> 32 -> 1, fresh random initialisation per task), full-batch MSE on 64
points, K = 20 steps.  Meta-training: second-order unrolls of K steps, T = 8 tasks per meta-step,
Metz et al.'s meta-loss (mean training loss over the unroll), Adam on the meta-parameters.
Evaluation: the loss after K steps on 64 held-out tasks, mean and 95% interval, for the rule at the end
of meta-training and for the rule selected by its loss at K on the 64 tuning tasks (the tasks Adam's
learning rate is tuned on; the held-out tasks choose nothing).

The learned optimizer uses exp_mult = 1 (Metz et al. use 0.001, made for meta-training runs of many
thousands of steps): the magnitude output then reaches the task family's step size within a short
meta-training.  Everything else is the default rule (init="adam", hidden=32, layers=2).

    OMP_NUM_THREADS=1 python benchmarks/lopt_meta_train.py   # ~2.5 minutes (1000 meta-steps; one thread is
                                                             # faster than two at these tiny sizes)
    python benchmarks/lopt_meta_train.py --meta-steps 50 # shorter
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

import metakernels as mk

D_IN, D_HIDDEN, N_POINTS, K = 16, 32, 64, 20
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def student() -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.Tanh(), nn.Linear(D_HIDDEN, 1))


def tasks(T: int, seed: int):
    """(x [T, N, D], y [T, N, 1]) and student initialisations [T, P] for T tasks."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N_POINTS, D_IN, generator=gen)
    w1 = torch.randn(T, D_IN, D_HIDDEN, generator=gen) / math.sqrt(D_IN)
    w2 = torch.randn(T, D_HIDDEN, 1, generator=gen) / math.sqrt(D_HIDDEN)
    y = torch.tanh(x @ w1) @ w2
    inits = []
    for t in range(T):
        torch.manual_seed(seed * 1000 + t)
        inits.append(torch.cat([p.detach().reshape(-1) for p in student().parameters()]))
    return (x, y), torch.stack(inits)


def loss_fn(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def adam_final_losses(model, batch, inits, lr):
    """Loss after K Adam steps for every task (a per-task loop, plain torch.optim.Adam)."""
    out = []
    for t in range(inits.shape[0]):
        flat = inits[t].clone()
        params = [nn.Parameter(c.view_as(p).clone()) for c, p in
                  zip(flat.split([p.numel() for p in model.parameters()]), model.parameters())]
        opt = torch.optim.Adam(params, lr=lr)
        names = [n for n, _ in model.named_parameters()]
        for _ in range(K):
            opt.zero_grad()
            loss = loss_fn(lambda x: torch.func.functional_call(model, dict(zip(names, params)), (x,)),
                           (batch[0][t], batch[1][t]))
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(loss_fn(lambda x: torch.func.functional_call(model, dict(zip(names, params)), (x,)),
                               (batch[0][t], batch[1][t])).item())
    return torch.tensor(out)


def lopt_final_losses(trainer, batch, inits):
    result = trainer.unroll(loss_fn, batch, K, state=trainer.initial_state(inits.shape[0], inits),
                            track_meta_gradient=False)
    return result.losses[-1]


def summary(losses: torch.Tensor) -> str:
    half = 1.96 * losses.std().item() / math.sqrt(losses.numel())
    return f"{losses.mean().item():.4f} +- {half:.4f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meta-steps", type=int, default=1000)
    ap.add_argument("--tasks-per-step", type=int, default=8)
    ap.add_argument("--meta-lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = student()
    lopt = mk.LearnedOptimizer(hyper=mk.ops.LoptHyper(exp_mult=1.0), seed=args.seed)
    trainer = mk.LearnedOptimizerTrainer(lopt, model)
    test_batch, test_inits = tasks(64, seed=10_000)
    tune_batch, tune_inits = tasks(64, seed=20_000)

    untrained = lopt_final_losses(trainer, test_batch, test_inits)
    meta_opt = torch.optim.Adam(lopt.parameters(), lr=args.meta_lr)
    best = (lopt_final_losses(trainer, tune_batch, tune_inits).mean().item(), -1, copy.deepcopy(lopt.state_dict()))
    start = time.perf_counter()
    for step in range(args.meta_steps):
        batch, inits = tasks(args.tasks_per_step, seed=args.seed * 100_000 + step + 1)
        result = trainer.unroll(loss_fn, batch, K, state=trainer.initial_state(args.tasks_per_step, inits))
        meta_opt.zero_grad()
        result.meta_loss.backward()
        meta_opt.step()
        if step % 25 == 0 or step == args.meta_steps - 1:
            tuning = lopt_final_losses(trainer, tune_batch, tune_inits).mean().item()
            if tuning < best[0]:
                best = (tuning, step, copy.deepcopy(lopt.state_dict()))
            print(f"meta-step {step:4d}  meta-loss {result.meta_loss.item():.4f}  "
                  f"final inner loss {result.losses[-1].mean().item():.4f}  tuning-task loss at K {tuning:.4f}  "
                  f"({time.perf_counter() - start:.0f} s)")
    last = lopt_final_losses(trainer, test_batch, test_inits)
    lopt.load_state_dict(best[2])
    trained = lopt_final_losses(trainer, test_batch, test_inits)

    tuned = {lr: adam_final_losses(model, tune_batch, tune_inits, lr).mean().item() for lr in ADAM_GRID}
    best_lr = min(tuned, key=tuned.get)
    adam = adam_final_losses(model, test_batch, test_inits, best_lr)
    print(f"\nAdam grid on the tuning tasks (mean loss after {K} steps): "
          + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in tuned.items()))
    print(f"\nHeld-out tasks (64), loss after K = {K} steps, mean +- 95% interval:")
    print(f"  initial loss                     {summary(initial_losses(trainer, test_batch, test_inits))}")
    print(f"  Adam, lr = {best_lr:g} (best of grid)   {summary(adam)}")
    print(f"  learned optimizer, untrained     {summary(untrained)}")
    print(f"  learned optimizer, meta-trained  {summary(last)}  (after all {args.meta_steps} meta-steps)")
    print(f"  learned optimizer, selected      {summary(trained)}  (meta-step {best[1]}: the lowest loss at K "
          "on the tuning tasks, checked every 25 meta-steps)")
    wins = (trained < adam).float().mean().item()
    print(f"  selected rule beats tuned Adam on {100 * wins:.0f}% of held-out tasks")


def initial_losses(trainer, batch, inits):
    result = trainer.unroll(loss_fn, batch, 1, state=trainer.initial_state(inits.shape[0], inits),
                            track_meta_gradient=False)
    return result.losses[0]


if __name__ == "__main__":
    main()
