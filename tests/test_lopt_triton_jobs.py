"""The Triton learned-optimizer step's job table and its deterministic per-segment sums (plain tensor
code: runs without the interpreter or a GPU)."""
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _jobs(T, offsets):
    from metakernels.ops import learned_update_triton as lt

    return lt, lt._Jobs(T, tuple(offsets), torch.device("cpu"))


@pytest.mark.parametrize("T,offsets", [(1, [0, 1]), (3, [0, 64, 65, 300]), (2, [0, 5000, 5001, 70001]), (16, [0, 37])])
def test_the_job_table_cuts_each_task_and_segment_into_blocks(T, offsets):
    lt, jobs = _jobs(T, offsets)
    expected = [(t, s, i) for t in range(T) for s in range(len(offsets) - 1)
                for i in range(offsets[s], offsets[s + 1], lt._BLOCK)]
    assert jobs.count == len(expected)
    assert jobs.table.tolist() == [list(row) for row in expected]
    sizes = [b - a for a, b in zip(offsets[:-1], offsets[1:])] * T
    assert jobs.sizes.tolist() == sizes


@pytest.mark.parametrize("T,offsets",
                         [(1, [0, 1]), (3, [0, 64, 65, 300]), (2, [0, 5000, 5001, 200001]), (4, [0, 2049])])
def test_segment_sums_are_the_float64_sums_of_each_segments_jobs(T, offsets):
    _, jobs = _jobs(T, offsets)
    partial = torch.randn(jobs.count, 9, dtype=torch.float64)
    segment = [(int(t), int(s)) for t, s, _ in jobs.table.tolist()]
    keys = [(t, s) for t in range(T) for s in range(len(offsets) - 1)]
    expected = torch.stack([partial[[k for k, key in enumerate(segment) if key == want]].sum(dim=0) for want in keys])
    got = jobs.segment_sums(partial)
    assert got.dtype == torch.float64 and got.shape == (len(keys), 9)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(jobs.segment_sums(partial.clone()), got)  # the same bits every time


def test_segment_sums_of_a_float32_partial_are_float64():
    _, jobs = _jobs(2, [0, 100, 4000])
    partial = torch.randn(jobs.count, 9)
    torch.testing.assert_close(jobs.segment_sums(partial)[0], partial[:2].double().sum(dim=0), rtol=1e-12, atol=1e-12)


def test_the_sum_plan_stays_near_one_row_per_job_with_one_huge_and_many_small_segments():
    offsets = [0, 64 * 100_000] + [64 * 100_000 + k for k in range(1, 2001)]
    _, jobs = _jobs(1, offsets)
    assert jobs.count == 100_000 + 2000
    biggest = max(level.numel() for level in jobs.levels)
    assert biggest <= jobs.count + 32 * 2001  # never a [segments, longest segment] padding


def test_the_table_is_kept_for_the_shapes_last_seen():
    from metakernels.ops import learned_update_triton as lt

    first = lt._jobs(2, (0, 10, 300), torch.device("cpu"))
    assert lt._jobs(2, (0, 10, 300), torch.device("cpu")) is first
    assert lt._jobs(3, (0, 10, 300), torch.device("cpu")) is not first
