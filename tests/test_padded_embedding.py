"""An embedding's padding row under MAML's vmap over tasks: torch's vmap rule for a batched embedding
table gives the padding row gradient in every task but the first (the sequential lookup gives it none),
so MAML's inner steps moved the padding token's embedding and its meta-gradient was off wherever a batch
held the padding token (metakernels/ops/padded_embedding.py)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metakernels as mk
from maml_reference import sequential_meta_loss
from metakernels.ops.linear import TaskLinearMode

VOCAB, DIM = 13, 8


@pytest.mark.parametrize("ids_per_task", [True, False], ids=["ids-per-task", "shared-ids"])
@pytest.mark.parametrize("padding_idx", [0, 4, -1])
def test_vmapped_lookup_matches_the_per_task_lookup_padding_row_included(padding_idx, ids_per_task):
    """Shared ids (torch's rule was right there) are a guard."""
    torch.manual_seed(0)
    T = 3
    tables = torch.randn(T, VOCAB, DIM, dtype=torch.float64)
    row = padding_idx % VOCAB
    ids = torch.randint(0, VOCAB, (T, 2, 5))
    ids[:, 0, :2] = row  # every task looks its padding row up
    if not ids_per_task:
        ids = ids[0].expand(T, 2, 5)
    cotangent = torch.randn(T, 2, 5, DIM, dtype=torch.float64)

    looped = tables.clone().requires_grad_()
    want = torch.stack([F.embedding(ids[t], looped[t], padding_idx=padding_idx) for t in range(T)])
    (want * cotangent).sum().backward()
    vmapped = tables.clone().requires_grad_()
    with TaskLinearMode():
        got = torch.vmap(lambda w, i: F.embedding(i, w, padding_idx=padding_idx),
                         in_dims=(0, 0 if ids_per_task else None))(vmapped, ids if ids_per_task else ids[0])
    (got * cotangent).sum().backward()

    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(vmapped.grad, looped.grad, rtol=0, atol=0)
    assert torch.count_nonzero(vmapped.grad[:, row]) == 0


def test_lookup_without_padding_idx_or_with_a_shared_table_is_torch_s_own():
    """Only a vmapped table with a padding_idx is rerouted; the rest is F.embedding, as before."""
    torch.manual_seed(1)
    tables, ids = torch.randn(2, VOCAB, DIM), torch.randint(0, VOCAB, (2, 6))
    with TaskLinearMode():
        plain = torch.vmap(lambda w, i: F.embedding(i, w))(tables, ids)
        shared = torch.vmap(lambda i: F.embedding(i, tables[0], padding_idx=0))(ids)
    torch.testing.assert_close(plain, torch.stack([F.embedding(ids[t], tables[t]) for t in range(2)]))
    torch.testing.assert_close(shared, F.embedding(ids, tables[0], padding_idx=0))


class _PaddedEncoder(nn.Module):
    """Token embedding with a padding row, LayerNorm, self-attention, GELU MLP, mean-pooled classifier."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.norm = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(DIM, 16), nn.GELU(), nn.Linear(16, DIM))
        self.head = nn.Linear(DIM, 3)

    def forward(self, ids):
        h = self.norm(self.tok(ids))
        h = h + self.attn(h, h, h)[0]  # need_weights: the twice-differentiable path
        return self.head((h + self.mlp(h)).mean(1))


def _encoder_loss(f, batch):
    return F.cross_entropy(f(batch[0]), batch[1])


def _padded_batches(T, seed):
    gen = torch.Generator().manual_seed(seed)

    def batch():
        ids = torch.randint(1, VOCAB, (T, 4, 6), generator=gen)
        ids[:, 1:, 4:] = 0  # right padding in three of four sequences of every task
        return ids, torch.randint(0, 3, (T, 4), generator=gen)
    return batch(), batch()


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("mode", [dict(), dict(task_chunk=2), dict(memory="low")], ids=["fast", "chunk", "low"])
def test_maml_meta_gradient_with_a_padding_row_matches_the_sequential_reference(first_order, mode):
    torch.manual_seed(2)
    model = _PaddedEncoder().double()
    support, query = _padded_batches(3, seed=3)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # vmap traced the model: no fallback to the loop
        got = torch.autograd.grad(mk.MAML(model, inner_lr=0.4, inner_steps=2, first_order=first_order, **mode)(
            _encoder_loss, support, query), params)
    want = torch.autograd.grad(sequential_meta_loss(model, _encoder_loss, support, query, names=names,
                                                    lrs={n: 0.4 for n in names}, steps=2, first_order=first_order),
                               params)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)
    assert torch.count_nonzero(got[0][0]) == 0  # the padding row: no meta-gradient, as in the reference


def test_adapted_weights_keep_every_task_s_padding_row():
    torch.manual_seed(4)
    model = _PaddedEncoder().double()
    support, _ = _padded_batches(4, seed=5)
    adapted = mk.MAML(model, inner_lr=0.4, inner_steps=3).adapt(_encoder_loss, support)
    for t in range(4):
        torch.testing.assert_close(adapted.params(t)["tok.weight"][0], model.tok.weight[0], rtol=0, atol=0)


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_learned_optimizer_unroll_with_a_padding_row_matches_the_loop(first_order):
    """The learned optimizer's unroll runs on the same engine: its vmapped meta-gradient and fast weights are
    the loop's (the per-task lookup's).  The padding row may move: the learned step of a zero gradient
    need not be zero."""
    torch.manual_seed(6)
    model = _PaddedEncoder().double()
    support, _ = _padded_batches(3, seed=7)
    lopt = mk.LearnedOptimizer(hidden=4, init="random", seed=0, hyper=mk.ops.LoptHyper(step_mult=0.05)).double()
    results = []
    for vectorize in (None, False):
        trainer = mk.LearnedOptimizerTrainer(lopt, model, first_order=first_order, vectorize=vectorize)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback from vmap to the loop
            result = trainer.unroll(_encoder_loss, support, 2)
        results.append((torch.autograd.grad(result.meta_loss, list(lopt.parameters())), result.state.fast))
    (vmapped, vmapped_fast), (looped, looped_fast) = results
    for g, w in zip(vmapped, looped):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(vmapped_fast, looped_fast, rtol=1e-12, atol=1e-14)
