"""Loss scaling of the chunked modes' in-forward meta-gradients where float16 carries the backward
(metakernels.chunk_scale).

A GradScaler scales the loss the caller differentiates; task_chunk and memory="low" differentiate each
chunk before that.  Under float16 autocast, with a loss small enough that the backward's float16 values
flush to zero unscaled, their meta-gradient was all zeros (measured on the old code) where the fast
mode's was 6e-4 off the float32 one.  Run on the CPU's float16 autocast."""
import pytest
import torch
from torch import nn

import metakernels as mk
from metakernels import chunk_scale
from metakernels.chunk_scale import ChunkLossScale, float16_backward

CHUNKED = [{"task_chunk": 2}, {"memory": "low"}, {"memory": "low", "task_chunk": 2}]


def _setting(dropout=0.0, norm=nn.LayerNorm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), norm(32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 4))
    support = (torch.randn(4, 8, 16), torch.randn(4, 8, 4))
    query = (torch.randn(4, 8, 16), torch.randn(4, 8, 4))
    return model, support, query


def _loss_fn(scale):
    def loss_fn(f, batch):
        x, y = batch
        return scale * (f(x).float() - y).pow(2).mean()
    return loss_fn


def _meta_gradient(model, support, query, loss_fn, autocast, initial_scale=None, inner_lr=0.2, **mode):
    model.zero_grad()
    maml = mk.MAML(model, inner_lr=inner_lr, inner_steps=1, **mode)
    if initial_scale is not None:
        maml._chunk_scale.value = initial_scale
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        meta_loss = maml(loss_fn, support, query)
    (meta_loss * 2.0 ** 16).backward()  # as a GradScaler would
    return [p.grad / 2.0 ** 16 for p in model.parameters()], maml


def _relative_error(got, want):
    return (torch.cat([g.flatten() for g in got]) - torch.cat([w.flatten() for w in want])).norm() / \
        torch.cat([w.flatten() for w in want]).norm()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("mode", CHUNKED, ids=str)
def test_a_small_loss_keeps_its_meta_gradient_under_float16_autocast(mode, first_order):
    model, support, query = _setting()
    loss_fn = _loss_fn(1e-6)
    want, _ = _meta_gradient(model, support, query, loss_fn, False, first_order=first_order)
    fast16, _ = _meta_gradient(model, support, query, loss_fn, True, first_order=first_order)
    got, _ = _meta_gradient(model, support, query, loss_fn, True, first_order=first_order, **mode)
    assert all(torch.count_nonzero(g) > 0 for g in got)
    assert _relative_error(got, want) < 4 * _relative_error(fast16, want) + 1e-6
    assert _relative_error(got, want) < 1e-2


@pytest.mark.parametrize("mode", CHUNKED, ids=str)
def test_a_chunk_that_overflows_is_retaken_unscaled_with_the_same_dropout(mode):
    """At 2**16 this loss's float16 backward overflows: the chunk is taken again unscaled (the same
    dropout masks), which gives exactly the unscaled run's meta-gradient, and the scale halves.  (A small
    inner rate keeps the unscaled run finite.)"""
    model, support, query = _setting(dropout=0.2)
    loss_fn = _loss_fn(100.0)
    unscaled, _ = _meta_gradient(model, support, query, loss_fn, True, initial_scale=1.0, inner_lr=1e-5, **mode)
    got, maml = _meta_gradient(model, support, query, loss_fn, True, inner_lr=1e-5, **mode)
    assert maml._chunk_scale.value < chunk_scale.INITIAL
    for g, w in zip(got, unscaled):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:metakernels. torch.vmap could not trace")
@pytest.mark.parametrize("mode", CHUNKED, ids=str)
def test_a_retaken_chunk_writes_the_buffers_once(mode):
    """BatchNorm's running statistics and batch count after a meta-step whose chunk overflowed and was
    taken again are those of the unscaled run: the retake starts from the buffers the chunk found.  (The
    meta-gradients may differ: chunks after the retake run at the halved scale.)"""
    runs = []
    for initial_scale in (1.0, None):
        model, support, query = _setting(norm=nn.BatchNorm1d)
        _, maml = _meta_gradient(model, support, query, _loss_fn(100.0), True, initial_scale=initial_scale,
                                 inner_lr=1e-5, **mode)
        runs.append(({n: b.clone() for n, b in model.named_buffers()}, maml._chunk_scale.value))
    (want, _), (got, scale) = runs
    assert scale < chunk_scale.INITIAL
    assert got["1.num_batches_tracked"].item() == 4 * 2  # T (K + 1) forwards
    for name, buffer in got.items():
        torch.testing.assert_close(buffer, want[name], rtol=0, atol=0, msg=name)


def test_no_scaling_without_float16():
    model, support, query = _setting()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            assert not float16_backward(list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.float16):
        assert float16_backward(list(model.parameters()))
    assert float16_backward(list(model.half().parameters()))
    assert not float16_backward([])


def test_the_scale_halves_on_an_overflow_and_doubles_after_a_run_of_finite_chunks(monkeypatch):
    monkeypatch.setattr(chunk_scale, "GROWTH_INTERVAL", 3)
    scale = ChunkLossScale()
    assert scale.value == 2.0 ** 16
    assert not scale.accepts([torch.tensor([1.0, float("inf")]), None])
    assert scale.value == 2.0 ** 15
    assert scale.accepts([torch.ones(2), None]) and scale.accepts([torch.ones(2)])
    assert scale.value == 2.0 ** 15
    assert scale.accepts([torch.ones(2)])
    assert scale.value == 2.0 ** 16
    scale.value = 1.0
    assert not scale.accepts([torch.tensor(float("nan"))])
    assert scale.value == 1.0  # never below 1


def test_a_scale_down_at_one_grows_back_after_clean_chunks(monkeypatch):
    """At s = 1 the chunks are taken unscaled, and their clean runs still count towards the growth (before,
    a scale that had fallen to 1 stayed there)."""
    monkeypatch.setattr(chunk_scale, "GROWTH_INTERVAL", 2)
    model, support, query = _setting()
    _, maml = _meta_gradient(model, support, query, _loss_fn(1e-6), True, initial_scale=1.0, task_chunk=2)
    assert maml._chunk_scale.value == 2.0  # T=4 in chunks of 2: two clean chunks
