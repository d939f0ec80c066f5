"""The README's Python examples run as written.

Each example is found by a phrase of its own and runs in a chain, in one namespace, after the examples
whose names it uses (as a reader following the README would have them).  Names the README leaves to the
reader (``my_model``, ``my_domains/``, ``task_batches``, a torchrun environment) are supplied here, and
small where the example says nothing about size.  Every Python block of the README must belong to a
chain, so a new example is run too.
"""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"

# A phrase that occurs in exactly one Python block of the README -> the name used for that block here.
BLOCKS = {
    'mk.data.folder_domains("my_domains/")': "own loop",
    "mk.ops.sgd_update(theta, grads, rates)": "update ops",
    "meta_loss = maml(loss_fn, support, query)": "MAML",
    "fused_layers=True)": "fused layers",
    "from metakernels.compat import MAML": "learn2learn facade",
    "maml(loss_fn, support, query).backward()": "batched call",
    "mk.LearnedOptimizer(hidden=32, layers=2)": "learned optimizer",
    "distributed.local_tasks(T)": "task-parallel",
}

CHAINS = {
    "own loop": ["own loop"],
    "update ops": ["update ops"],
    "MAML": ["MAML", "fused layers", "learn2learn facade", "batched call", "task-parallel"],
    "learned optimizer": ["MAML", "learned optimizer"],
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def block(name: str) -> str:
    phrase = next(p for p, n in BLOCKS.items() if n == name)
    found = [b for b in python_blocks() if phrase in b]
    assert len(found) == 1, f"README: {len(found)} Python blocks contain {phrase!r}, expected exactly one"
    return found[0]


def run_chain(chain: str, namespace: dict, supply=None) -> dict:
    """Runs the chain's blocks in ``namespace``; ``supply[name](namespace)`` first adds what the README
    leaves to the reader before block ``name``."""
    for name in CHAINS[chain]:
        if supply and name in supply:
            supply[name](namespace)
        exec(compile(block(name), f"README.md ({name} example)", "exec"), namespace)
    return namespace


def test_every_python_block_is_run():
    names = [[n for p, n in BLOCKS.items() if p in b] for b in python_blocks()]
    unclaimed = [b.splitlines()[0] for b, n in zip(python_blocks(), names) if len(n) != 1]
    assert not unclaimed, f"README Python blocks without exactly one entry in BLOCKS: {unclaimed}"
    assert sorted({n for chain in CHAINS.values() for n in chain}) == sorted(BLOCKS.values())


def test_own_loop_example(tmp_path, monkeypatch):
    from metakernels.models import TransformerLM, lm_loss

    domains = tmp_path / "my_domains"
    domains.mkdir()
    generator = torch.Generator().manual_seed(0)
    for d in range(6):
        letters = torch.randint(97, 123, (3000,), generator=generator).tolist()
        (domains / f"domain{d}.txt").write_text("".join(map(chr, letters)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    model = TransformerLM(vocab=256, d_model=16, n_heads=2, n_layers=1, max_len=48)
    before = [p.detach().clone() for p in model.parameters()]
    ns = run_chain("own loop", dict(my_model=model, my_loss_fn=lm_loss, steps=2))
    assert ns["batch"].support.shape == (8, 4, 49) and ns["batch"].support.dtype == torch.int64
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "the loop did not train"


def test_update_ops_example():
    ns = run_chain("update ops", {})
    assert ns["fast"].shape == (16, 1_000_000)
    assert ns["theta"].grad is not None and ns["rates"].grad is not None
    assert ns["p3"].shape == ns["m"].shape == ns["v"].shape == (16, 1_000_000)


def test_maml_examples(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ns = {}
    try:
        run_chain("MAML", ns)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert torch.isfinite(ns["meta_loss"]) and ns["logits"].shape == (4, 32, 256)
    assert ns["tasks"] == slice(0, 16)
    assert all(p.grad is not None for p in ns["model"].parameters())


def test_learned_optimizer_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    two_tasks = {"learned optimizer": lambda ns: ns.update(task_batches=[ns["support"][:2]])}
    ns = run_chain("learned optimizer", {}, supply=two_tasks)
    assert torch.isfinite(ns["result"].meta_loss)
    assert isinstance(ns["opt"], torch.optim.Optimizer) and (tmp_path / "lopt.mk").is_file()
    assert ns["opt"].param_groups[0]["lr"] == 0.0  # the warmup's first value, set by the scheduler


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

