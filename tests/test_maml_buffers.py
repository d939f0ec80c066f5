"""The model's buffers (BatchNorm's running statistics and batch count) after a meta-step: every forward
the meta-step runs once counts once.  The low-memory reverse sweep recomputes inner steps and a failed
torch.vmap trace is followed by the loop over tasks; neither may write the buffers a second time, and a
recomputed step must see the buffers as the step first found them (metakernels.forward_state).  Measured
on the old code: memory="low" counted 15 BatchNorm batches for the 9 forwards of 3 tasks and 2 inner
steps, and the vmap attempt counted one batch too many."""
import warnings

import pytest
import torch
from torch import nn

import metakernels as mk
from maml_reference import sequential_meta_loss

T, K = 3, 2


def _batch_norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 3)).double()


def _tasks():
    gen = torch.Generator().manual_seed(1)
    support = (torch.randn(T, 6, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (T, 6), generator=gen))
    query = (torch.randn(T, 6, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (T, 6), generator=gen))
    return support, query


def _loss(f, batch):
    return nn.functional.cross_entropy(f(batch[0]), batch[1])


def _meta_step(first_order=False, **mode):
    """(the model's buffers, the meta-gradient) after one meta-step of a fresh model in train mode."""
    model = _batch_norm_model()
    support, query = _tasks()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "metakernels: torch.vmap could not trace", RuntimeWarning)
        loss = mk.MAML(model, inner_lr=0.1, inner_steps=K, first_order=first_order, **mode)(_loss, support, query)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return {n: b.clone() for n, b in model.named_buffers()}, grads


def _assert_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_each_forward_counts_once_whatever_the_mode(first_order):
    """The loop over tasks (vectorize=False) and the default, which tries vmap first (BatchNorm's running
    statistics refuse it), run the same forwards in the same order; task_chunk=1 and memory="low" run
    them task by task.  Each pair leaves the same buffers, with T (K + 1) batches counted."""
    loop, loop_grads = _meta_step(first_order, vectorize=False)
    tried_vmap, tried_grads = _meta_step(first_order)
    by_task, by_task_grads = _meta_step(first_order, task_chunk=1)
    low, low_grads = _meta_step(first_order, memory="low")
    assert loop["1.num_batches_tracked"].item() == T * (K + 1)
    _assert_equal(tried_vmap, loop)
    _assert_equal(low, by_task)
    for got in (tried_grads, by_task_grads, low_grads):
        for g, w in zip(got, loop_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


class _CountingScale(nn.Module):
    """x * (1 + 0.1 calls) where ``calls`` counts this module's forwards: a forward that depends on a
    buffer it writes, so that a recomputed step that found the buffer advanced would differentiate
    another function."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x * (1 + 0.1 * self.calls)


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_the_reverse_sweep_recomputes_each_step_with_the_buffers_it_first_found(inner_optimizer):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 5), _CountingScale(), nn.Tanh(), nn.Linear(5, 3)).double()

    support, query = _tasks()
    support, query = tuple(x[:1] for x in support), tuple(x[:1] for x in query)  # one task: the reference's order
    reference = model()
    names = [n for n, _ in reference.named_parameters()]
    want = torch.autograd.grad(
        sequential_meta_loss(reference, _loss, support, query, names=names, lrs={n: 0.1 for n in names}, steps=K,
                             optimizer=inner_optimizer), list(reference.parameters()))
    low = model()
    got = torch.autograd.grad(mk.MAML(low, inner_lr=0.1, inner_steps=K, inner_optimizer=inner_optimizer,
                                      memory="low")(_loss, support, query), list(low.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert low[1].calls.item() == reference[1].calls.item() == K + 1


def test_batch_norm_in_eval_mode_under_the_reverse_sweep():
    """In eval mode BatchNorm reads its running statistics and saves them for the backward: putting the
    buffers back must not write them (an in-place error at the backward), and they stay as they were."""
    model = _batch_norm_model()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    before = {n: b.clone() for n, b in model.named_buffers()}
    support, query = _tasks()
    got = torch.autograd.grad(mk.MAML(model, inner_lr=0.1, inner_steps=K, memory="low")(_loss, support, query),
                              list(model.parameters()))
    want = torch.autograd.grad(mk.MAML(model, inner_lr=0.1, inner_steps=K)(_loss, support, query),
                               list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    _assert_equal({n: b.clone() for n, b in model.named_buffers()}, before)


def _spectral_norm_model():
    """Spectral normalisation's power iteration: each training forward advances the buffers u, v and
    normalises the weight with the advanced ones, so a forward's output depends on every forward before it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 8)), nn.Tanh(),
                         nn.Linear(8, 3)).double()


@pytest.mark.parametrize("mode,chunk", [(dict(), T), (dict(vectorize=False), T), (dict(memory="low"), 1),
                                        (dict(task_chunk=2), 2), (dict(task_chunk=2, memory="low"), 2)],
                         ids=["fast", "loop", "low", "chunk-2", "low-chunk-2"])
def test_a_forward_that_reads_what_it_writes_sees_the_modes_order_of_forwards(mode, chunk):
    """The fast mode runs every task's step k before step k + 1; the chunked modes run one chunk of tasks
    through all its steps and its query before the next chunk.  Each is exact for its order: the
    sequential reference run chunk by chunk, the same meta-gradient and the same buffers (to rounding:
    the fused update's weights may be an ulp from the reference's p - lr * g)."""
    support, query = _tasks()
    model, reference = _spectral_norm_model(), _spectral_norm_model()
    names = [n for n, _ in reference.named_parameters()]
    want_loss = 0.0
    for start in range(0, T, chunk):
        tasks = slice(start, min(start + chunk, T))
        want_loss = want_loss + (tasks.stop - tasks.start) / T * sequential_meta_loss(
            reference, _loss, tuple(x[tasks] for x in support), tuple(x[tasks] for x in query), names=names,
            lrs={n: 0.1 for n in names}, steps=K)
    want = torch.autograd.grad(want_loss, list(reference.parameters()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "metakernels: torch.vmap could not trace", RuntimeWarning)
        loss = mk.MAML(model, inner_lr=0.1, inner_steps=K, **mode)(_loss, support, query)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(torch.autograd.grad(loss, list(model.parameters())), want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for (name, got), (_, want_buffer) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        torch.testing.assert_close(got, want_buffer, rtol=1e-12, atol=1e-14, msg=name)  # fused update: an ulp apart
