"""Second-order MAML on the transformer LM, side by side in one run: metakernels (fast mode, fast mode
with the fused LayerNorm / bias + GELU layers of metakernels.nn, the same plus the chunked vocabulary
head, low-memory mode, low-memory mode with the fused layers and the chunked head), the correct
plain-PyTorch batched recipe (stacked per-task weights, vmap over the forward,
autograd.grad(create_graph=True)), higher, TorchOpt and learn2learn where installed.

Configuration (the MAML issue's): 2 layers, d=128, 4 heads, vocabulary 256, sequences of 32 tokens,
4 support and 4 query sequences per task, T=16 tasks, K=5 inner SGD steps, second order, CPU.
Each variant runs in its own process, so its peak resident memory (ru_maxrss, minus the process's
footprint after a 1-task, 1-step warm-up that loads its modules) is its own. The step's FLOPs are counted once with
torch.utils.flop_counter and divided by each time, next to the fp32 matmul rate measured in this run
at the model's own shapes.

    python benchmarks/maml_table.py            # full configuration (glibc tunables as in harness.py)
    python benchmarks/maml_table.py --quick    # T=4, K=2, a smoke run
    python benchmarks/maml_table.py --rounds 3 # every variant 3 times, interleaved: medians, ratio ranges
    python benchmarks/maml_table.py --device cuda --variants metakernels metakernels-fused stacked-recipe
    python benchmarks/maml_table.py --task-chunk 4 --variants metakernels metakernels-low  # 4 tasks at a time

On CUDA the peak is torch.cuda.max_memory_allocated over the same warm-up baseline, and times are taken
after a synchronize.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

VARIANTS = ("metakernels", "metakernels-fused", "metakernels-fused-head", "metakernels-low", "metakernels-fused-head-low",
            "stacked-recipe", "higher", "torchopt", "learn2learn")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every variant this many times, interleaved (the machine's load drifts between runs)")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size (32768 shows the chunked head's memory)")
    ap.add_argument("--task-chunk", type=int, default=None,
                    help="task_chunk of the metakernels variants (default: theirs, all tasks at once in the fast mode)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults (see harness.py)")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.steps, args.repeats = 4, 2, 2
    return args


def setup(T, vocab=256, device="cpu"):
    import torch

    from metakernels.models import TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(vocab=vocab, d_model=128, n_heads=4, n_layers=2, max_len=32).to(device)
    gen = torch.Generator().manual_seed(1)
    support = torch.randint(0, vocab, (T, 4, 33), generator=gen).to(device)
    query = torch.randint(0, vocab, (T, 4, 33), generator=gen).to(device)
    return model, support, query


def meta_step_fn(variant, model, support, query, K, lr=0.1, task_chunk=None):
    """A function doing one meta-step (forward + backward, grads left on the model); task_chunk: that of
    the metakernels variants."""
    import torch
    from torch.func import functional_call

    import metakernels as mk
    from metakernels.models import lm_loss, lm_loss_chunked_head

    T = support.shape[0]
    if variant.startswith("metakernels"):
        maml = mk.MAML(model, inner_lr=lr, inner_steps=K, memory="low" if variant.endswith("low") else "fast",
                       fused_layers="fused" in variant, task_chunk=task_chunk)
        loss = lm_loss_chunked_head if "head" in variant else lm_loss
        return lambda: maml(loss, support, query).backward()
    if variant == "stacked-recipe":
        names = [n for n, _ in model.named_parameters()]

        def losses(weights, batch):
            def one(w, b):
                return lm_loss(lambda x: functional_call(model, dict(zip(names, w)), (x,)), b)
            return torch.vmap(one)(weights, batch)

        def step():
            weights = [p.unsqueeze(0).expand(T, *p.shape) for p in model.parameters()]
            for _ in range(K):
                grads = torch.autograd.grad(losses(weights, support).sum(), weights, create_graph=True)
                weights = [w - lr * g for w, g in zip(weights, grads)]
            losses(weights, query).mean().backward()
        return step
    if variant == "higher":
        import higher

        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def step():
            for t in range(T):
                with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                    for _ in range(K):
                        diffopt.step(lm_loss(fmodel, support[t]))
                    (lm_loss(fmodel, query[t]) / T).backward()
        return step
    if variant == "torchopt":
        import torchopt

        inner = torchopt.MetaSGD(model, lr=lr)
        state = torchopt.extract_state_dict(model)

        def step():
            for t in range(T):
                for _ in range(K):
                    inner.step(lm_loss(model, support[t]))
                (lm_loss(model, query[t]) / T).backward()
                torchopt.recover_state_dict(model, state)
        return step
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=lr)

    def step():
        for t in range(T):
            learner = maml.clone()
            for _ in range(K):
                learner.adapt(lm_loss(learner, support[t]))
            (lm_loss(learner, query[t]) / T).backward()
    return step


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args):
    import torch

    device = torch.device(args.device)
    model, support, query = setup(args.tasks, args.vocab, device)
    try:
        step = meta_step_fn(args.child, model, support, query, args.steps, task_chunk=args.task_chunk)
    except ImportError as exc:
        print(json.dumps({"variant": args.child, "error": f"not installed: {exc}"}))
        return
    # One tiny meta-step first (1 task, 1 inner step) loads every module the variant uses, so that the
    # peak below is the meta-step's memory, not imported code.
    meta_step_fn(args.child, model, support[:1], query[:1], 1, task_chunk=args.task_chunk)()
    harness.synchronize(device)
    base = _peak_bytes(device)
    times = []
    for i in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        harness.synchronize(device)
        if i:  # the first step warms up allocators and caches
            times.append(time.perf_counter() - start)
    peak = _peak_bytes(device)
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)).item()
    print(json.dumps({"variant": args.child, "seconds": statistics.median(times), "peak_mb": (peak - base) / 2**20,
                      "grad_norm": grad_norm}))


def _summary(variant, rounds):
    """One variant's rounds -> its medians over the rounds that ran (times, peaks) and each round's time
    (None where that round failed); the first error when none ran."""
    done = [r for r in rounds if "seconds" in r]
    if not done:
        return rounds[0]
    return {"variant": variant, "seconds": statistics.median(r["seconds"] for r in done),
            "peak_mb": statistics.median(r["peak_mb"] for r in done), "grad_norm": done[0]["grad_norm"],
            "per_round": [r.get("seconds") for r in rounds]}


def _round_ratios(base, r) -> str:
    """base's time over r's, the median over rounds and, with several rounds, the range of the
    round-by-round ratios (both ran in the same round, under the same load)."""
    if base is None:
        return ""
    ratios = [b / x for b, x in zip(base["per_round"], r["per_round"]) if b is not None and x is not None]
    if not ratios:
        return ""
    text = f"{statistics.median(ratios):.2f}x"
    return text + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")


def count_flops(args):
    from torch.utils.flop_counter import FlopCounterMode

    model, support, query = setup(args.tasks, args.vocab, args.device)
    step = meta_step_fn("stacked-recipe", model, support, query, args.steps)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_rate(device):
    """fp32 GFLOP/s of torch's products at the model's own shapes (MLP of 16x4x32 tokens, attention bmm),
    and harness.matmul_rates at 1024^2."""
    import torch

    x = torch.randn(16 * 4 * 32, 128, device=device)
    w = torch.randn(128, 512, device=device)
    mlp = harness.median_ms(lambda: x @ w, device, 20)
    q = torch.randn(16 * 4 * 4, 32, 32, device=device)
    k = torch.randn(16 * 4 * 4, 32, 32, device=device)
    att = harness.median_ms(lambda: q @ k, device, 20)
    return 2 * x.shape[0] * 128 * 512 / mlp / 1e6, 2 * q.shape[0] * 32**3 / att / 1e6, harness.matmul_rates(device)


def kernel_rate(device):
    """GFLOP/s of metakernels' float32 product kernel on the MLP's [16, 128, 128] x [16, 128, 512] product,
    None where this process does not run it (metakernels.ops.matmul): where it runs, it and not the BLAS
    sets the products' ceiling."""
    import torch

    from metakernels.ops import matmul

    if device.type != "cpu" or not matmul.kernel_chosen():
        return None
    a, b = torch.randn(16, 128, 128), torch.randn(16, 128, 512)
    return 2 * 16 * 128 * 128 * 512 / harness.median_ms(lambda: matmul.task_bmm(a, b), device, 20) / 1e6


def main():
    args = parse_args()
    if args.child:
        return child(args)
    allocator = harness.reexec_with_malloc_tunables(enabled=not args.system_malloc)  # children inherit it
    import torch

    runs = {variant: [] for variant in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant, "--tasks", str(args.tasks), "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--vocab", str(args.vocab), "--device", args.device]
            if args.task_chunk:
                cmd += ["--task-chunk", str(args.task_chunk)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else json.dumps(
                {"variant": variant, "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:100]})
            runs[variant].append(json.loads(line))
    results = [_summary(variant, rounds) for variant, rounds in runs.items()]
    flops = count_flops(args)
    mlp_rate, att_rate, big_rates = matmul_rate(torch.device(args.device))
    big_rate = harness.matmul_ceiling(big_rates)[1]
    own_rate = kernel_rate(torch.device(args.device))
    print(f"torch {torch.__version__}, device={args.device}, threads={torch.get_num_threads()}, T={args.tasks}, K={args.steps}, vocab={args.vocab}, "
          f"second order, median of {args.repeats} meta-steps in each of {args.rounds} round(s); allocator: {allocator}"
          + (f"; task_chunk={args.task_chunk} for the metakernels variants" if args.task_chunk else ""))
    print(f"FLOPs per meta-step: {flops / 1e9:.1f} GFLOP (FlopCounterMode); this run: "
          f"{harness.describe_matmul(big_rates)} at 1024^2 (the % column's ceiling); torch.mm "
          f"{mlp_rate:.0f} at the MLP's shape, {att_rate:.0f} at attention's"
          + ("" if own_rate is None else f"; metakernels' product kernel {own_rate:.0f} at the MLP's shape"))
    ref = next((r for r in results if r["variant"] == "metakernels" and "seconds" in r), None)
    l2l = next((r for r in results if r["variant"] == "learn2learn" and "seconds" in r), None)
    header = ["variant", "s / meta-step", "peak MB", "GFLOP/s", "% of matmul rate", "speed vs metakernels",
              "speed vs learn2learn (rounds: min-max)", "|grad|"]
    rows = []
    for r in results:
        if "seconds" not in r:
            rows.append([r["variant"], r["error"], "", "", "", "", "", ""])
            continue
        rate = flops / r["seconds"] / 1e9
        rows.append([r["variant"], f"{r['seconds']:.3f}", f"{r['peak_mb']:.0f}", f"{rate:.0f}", f"{100 * rate / big_rate:.0f}%",
                     f"{ref['seconds'] / r['seconds']:.2f}x" if ref else "", _round_ratios(l2l, r), f"{r['grad_norm']:.6g}"])
    harness.print_table(header, rows, args.markdown,
                        title=f"second-order MAML meta-step, T={args.tasks}, K={args.steps}, vocabulary {args.vocab}")

if __name__ == "__main__":
    main()
