"""Task batches: the leading task dimension T is read from every leaf, and a bad leaf is named by its
path in the batch, so a nested dict or tuple batch says which entry is wrong."""
import pytest
import torch

from metakernels.tasks import select_tasks, task_count


def _x(*shape):
    return torch.zeros(shape)


@pytest.mark.parametrize("batch,T", [
    (_x(3, 4), 3),
    ((_x(2, 4), _x(2)), 2),
    ([_x(5, 1), {"y": _x(5, 2, 2)}], 5),
    ({"a": {"b": (_x(1, 7),)}}, 1),
])
def test_task_count_reads_the_leading_dimension(batch, T):
    assert task_count(batch, "support") == T


@pytest.mark.parametrize("batch,exc,message", [
    ({"x": _x(3, 4), "scale": 2.0}, TypeError,
     "support['scale'] is a float; every leaf of 'support' must be a tensor [T, ...] "
     "(a value shared by all tasks belongs in loss_fn, not in the batch)"),
    ((_x(3, 4), "abc"), TypeError, "support[1] is a str"),
    ((_x(3, 4), {"mask": torch.tensor(1.0)}), ValueError,
     "support[1]['mask'] is a 0-d tensor; every tensor of 'support' needs a leading task dimension T"),
    (torch.tensor(1.0), ValueError, "support is a 0-d tensor"),
    ({"x": _x(0, 2, 8)}, ValueError, "support['x'] has shape [0, 2, 8]: no tasks; a task batch needs T >= 1"),
    ({"x": _x(3, 4), "y": [_x(3), _x(2, 4)]}, ValueError,
     "'support' leaves disagree on the task count: support['x'] has T=3, support['y'][1] has shape [2, 4]"),
    ({}, ValueError, "'support' holds no tensors"),
])
def test_a_bad_leaf_is_named_by_its_path(batch, exc, message):
    with pytest.raises(exc) as info:
        task_count(batch, "support")
    assert message in str(info.value)


def test_select_tasks_keeps_the_structure():
    batch = {"x": torch.arange(6).reshape(3, 2), "y": (torch.arange(3),)}
    one = select_tasks(batch, 1)
    assert one["x"].tolist() == [2, 3] and one["y"][0].item() == 1
    two = select_tasks(batch, slice(0, 2))
    assert two["x"].shape == (2, 2) and two["y"][0].tolist() == [0, 1]
