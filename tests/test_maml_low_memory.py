"""memory="low": the reverse sweep (metakernels.reverse_sweep) against the sequential create_graph oracle
beyond the shared grid of test_maml.py (Meta-SGD rates, subset adaptation, tied weights, dropout masks,
the RNG left behind, non-finite losses), and that it keeps one inner step's graph at a time; task_chunk
in the fast mode keeps one chunk's graph at a time."""
import weakref

import pytest
import torch

import metakernels as mk
from maml_reference import sequential_meta_loss
from metakernels.models import TransformerLM, lm_loss
from test_maml import _assert_grads_close, _grads, _model, _tasks, weighted_lm_loss


def _names(model):
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("learn_lr", ["parameter", "tensor", "scalar"])
def test_meta_sgd_rates_and_init(learn_lr):
    model = _model()
    support, query = _tasks(3)
    meta = mk.MetaSGD(model, inner_lr=0.2, inner_steps=2, learn_lr=learn_lr, memory="low", task_chunk=2)
    with torch.no_grad():
        for i, r in enumerate(meta.inner_lrs):
            r.add_(0.01 * i + 0.001 * torch.arange(r.numel(), dtype=r.dtype).reshape(r.shape))
    params, rates = list(model.parameters()), list(meta.inner_lrs)
    got = _grads(meta(lm_loss, support, query), params + rates)
    lrs = {n: (rates[i] if learn_lr != "scalar" else rates[0]) for i, n in enumerate(_names(model))}
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=_names(model), lrs=lrs, steps=2),
                  params + rates)
    _assert_grads_close(got, want)
    assert all(g is not None for g in got[len(params):])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_subset_adaptation_gives_the_shared_body_its_gradient(optimizer):
    model = _model()
    support, query = _tasks(3)
    head = ["head.weight", "head.bias"]
    maml = mk.MAML(model, inner_lr=0.5, inner_steps=3, adapt=head, memory="low", inner_optimizer=optimizer)
    params = list(model.parameters())
    got = _grads(maml(lm_loss, support, query), params)
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=head, lrs=dict.fromkeys(head, 0.5),
                                       steps=3, optimizer=optimizer), params)
    _assert_grads_close(got, want)
    assert all(g is not None for g in got)


def test_dropout_recomputed_steps_draw_the_forward_masks():
    """The sweep recomputes each step after restoring the random state that step drew from: with dropout
    the meta-gradient equals the oracle's for the same masks, and the random state left behind is the
    one fast mode leaves (same order of draws: vectorize=False, all tasks in one chunk)."""
    support, query = _tasks(2)
    model = _model(dropout=0.3)
    names = _names(model)
    after = {}
    for memory in ("low", "fast"):
        maml = mk.MAML(model, inner_lr=0.3, inner_steps=3, vectorize=False, memory=memory, task_chunk=2)
        torch.manual_seed(123)
        got = _grads(maml(lm_loss, support, query), list(model.parameters()))
        after[memory] = torch.rand(4)
        torch.manual_seed(123)
        want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs=dict.fromkeys(names, 0.3),
                                           steps=3), list(model.parameters()))
        _assert_grads_close(got, want)
    assert torch.equal(after["low"], after["fast"])


@pytest.mark.parametrize("first_order", [False, True])
def test_non_finite_losses_name_the_task_of_the_whole_batch(first_order):
    """Chunks of one task: the task named is its index in the batch, not in its chunk."""
    model = _model()
    tokens_s, tokens_q = _tasks(3)
    bad = torch.ones(3, dtype=torch.float64)
    bad[2] = float("inf")
    ones = torch.ones(3, dtype=torch.float64)
    maml = mk.MAML(model, memory="low", first_order=first_order)
    with pytest.raises(FloatingPointError, match="inner \\(support\\) loss is inf for task 2 at inner step 1"):
        maml(weighted_lm_loss, (tokens_s, bad), (tokens_q, ones))
    with pytest.raises(FloatingPointError, match="query loss is inf for task 2"):
        maml(weighted_lm_loss, (tokens_s, ones), (tokens_q, bad))


def _peak_saved_bytes(fn):
    """The largest total size of the tensors autograd holds for backward at any moment during fn()."""
    live, peak = [0], [0]

    def pack(t):
        size = t.untyped_storage().nbytes()
        live[0] += size
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - size))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return peak[0]


def test_sweep_keeps_one_inner_step_graph_at_a_time():
    torch.manual_seed(0)
    model = TransformerLM(vocab=32, d_model=32, n_heads=2, n_layers=2, max_len=16).double()
    gen = torch.Generator().manual_seed(1)
    support, query = (torch.randint(0, 32, (1, 4, 17), generator=gen) for _ in range(2))
    peaks = {}
    for memory in ("fast", "low"):
        maml = mk.MAML(model, inner_lr=0.1, inner_steps=6, memory=memory)
        peaks[memory] = _peak_saved_bytes(lambda: maml(lm_loss, support, query).backward())
    # fast holds 6 steps' graphs (each also holding that step's fast weights); low one step's
    assert peaks["low"] < 0.3 * peaks["fast"], peaks


def test_task_chunks_in_the_fast_mode_keep_one_chunk_graph_at_a_time():
    torch.manual_seed(0)
    model = TransformerLM(vocab=32, d_model=32, n_heads=2, n_layers=2, max_len=16).double()
    gen = torch.Generator().manual_seed(1)
    support, query = (torch.randint(0, 32, (4, 4, 17), generator=gen) for _ in range(2))
    peaks, grads = {}, {}
    for task_chunk in (None, 1):
        maml = mk.MAML(model, inner_lr=0.1, inner_steps=3, task_chunk=task_chunk)
        model.zero_grad()
        peaks[task_chunk] = _peak_saved_bytes(lambda: maml(lm_loss, support, query).backward())
        grads[task_chunk] = [p.grad.clone() for p in model.parameters()]
    _assert_grads_close(grads[1], grads[None], rtol=1e-12)
    # all 4 tasks' graphs against one task's (and the shared initialisation's, which both hold)
    assert peaks[1] < 0.4 * peaks[None], peaks


@pytest.mark.parametrize("memory", ["fast", "low"])
def test_zero_inner_steps_is_the_query_loss_of_the_initialisation(memory):
    """K = 0: the query cotangent of the shared initialisation is summed over the chunk's tasks (the
    low mode once returned it per task; found by tests/test_maml_properties.py)."""
    model = _model()
    support, query = _tasks(3)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=0, memory=memory, task_chunk=2)
    params = list(model.parameters())
    got = _grads(maml(lm_loss, support, query), params)
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=_names(model),
                                       lrs=dict.fromkeys(_names(model), 0.3), steps=0), params)
    _assert_grads_close(got, want)
