"""Checked, atomic files: LearnedOptimizer.save / load round trip, corrupted / truncated / foreign files
refused with a message naming the file and the problem, and a save killed midway leaves the previous
file intact."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import metakernels as mk
from metakernels.checkpoint import atomic_write_text, load_checked, save_checked


def _lopt(seed=0):
    return mk.LearnedOptimizer(hidden=4, layers=2, hyper=mk.ops.LoptHyper(step_mult=0.01), seed=seed)


def test_save_load_round_trip(tmp_path):
    lopt = _lopt()
    path = tmp_path / "lopt.mk"
    lopt.save(path)
    loaded = mk.LearnedOptimizer.load(path)
    assert loaded.config() == lopt.config()
    for (n, a), (_, b) in zip(lopt.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert [p.name for p in tmp_path.iterdir()] == ["lopt.mk"]  # no temporary file left behind


def test_load_keeps_the_saved_dtype(tmp_path):
    """A float64 rule comes back float64, bit for bit (loading into a float32 module rounded it)."""
    lopt = _lopt().double()
    with torch.no_grad():
        lopt.w_in.add_(1e-12)  # a difference float32 cannot hold
    lopt.save(tmp_path / "lopt.mk")
    loaded = mk.LearnedOptimizer.load(tmp_path / "lopt.mk")
    for (n, a), (_, b) in zip(lopt.state_dict().items(), loaded.state_dict().items()):
        assert b.dtype == torch.float64 and torch.equal(a, b), n


def test_saving_onto_a_folder_names_it(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder; give the path of a file to write"):
        _lopt().save(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / "lopt.mk"
    save_checked(path, "metakernels.LearnedOptimizer", [1, 2], meta=_lopt().config())
    with pytest.raises(mk.CheckpointError, match="holds no learned-optimizer weights"):
        mk.LearnedOptimizer.load(path)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:-100] + bytes([b[-100] ^ 0xFF]) + b[-99:], "corrupted"),
    (lambda b: b"not a checkpoint at all", "not a metakernels checkpoint"),
    (lambda b: b[:20], "truncated|corrupted"),
])
def test_damaged_file_is_refused_by_name(tmp_path, damage, match):
    path = tmp_path / "lopt.mk"
    _lopt().save(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(mk.CheckpointError, match=match) as info:
        mk.LearnedOptimizer.load(path)
    assert str(path) in str(info.value)


def test_other_kind_is_refused(tmp_path):
    path = tmp_path / "other.mk"
    save_checked(path, "something.else", {"x": torch.zeros(2)})
    with pytest.raises(mk.CheckpointError, match="something.else"):
        mk.LearnedOptimizer.load(path)
    meta, obj = load_checked(path, "something.else")
    assert meta == {} and torch.equal(obj["x"], torch.zeros(2))


def test_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "lopt.mk"
    state = {k: v for k, v in _lopt().state_dict().items() if k != "w_out"}
    save_checked(path, "metakernels.LearnedOptimizer", state, meta=_lopt().config())
    with pytest.raises(mk.CheckpointError, match="do not match"):
        mk.LearnedOptimizer.load(path)


def test_save_killed_midway_leaves_previous_file_intact(tmp_path):
    """A process that dies after writing the new bytes but before the rename (here: at the fsync)
    leaves the old checkpoint loadable and unchanged."""
    path = tmp_path / "lopt.mk"
    _lopt(seed=0).save(path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os
        import metakernels as mk
        os.fsync = lambda fd: os._exit(17)
        mk.LearnedOptimizer(hidden=4, layers=2, hyper=mk.ops.LoptHyper(step_mult=0.01), seed=1).save({str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 17, result.stderr
    assert path.read_bytes() == before
    mk.LearnedOptimizer.load(path)


def test_atomic_write_gives_the_mode_of_a_plain_open_and_keeps_a_replaced_files(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.json").chmod(0o600)
        atomic_write_text(tmp_path / "new.json", "[]")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "new.json").read_text() == "[]"
    finally:
        os.umask(umask)


def test_atomic_write_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "metrics.json"
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(os.path.join("runs", "metrics.json"))
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    dangling = tmp_path / "next.json"
    dangling.symlink_to(os.path.join("runs", "next.json"))
    atomic_write_text(dangling, "first")
    assert dangling.is_symlink() and (tmp_path / "runs" / "next.json").read_text() == "first"
    assert sorted(os.listdir(tmp_path / "runs")) == ["metrics.json", "next.json"]
