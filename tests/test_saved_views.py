"""Saved views of the fast weights as compact copies, and the plain-SGD update written into the previous
weights' memory: the memory the inner loop frees, and derivatives unchanged to every order."""
import pytest
import torch

import metakernels as mk
import metakernels.inner_loop as inner_loop
from maml_reference import sequential_meta_loss
from metakernels.layout import ParamLayout
from metakernels.models import TransformerLM, lm_loss
from metakernels.saved_views import saved_as_copies, storage_held_only_by


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1  # not the storage object asked


def _fast_weights():
    torch.manual_seed(0)
    base = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    return base * 1.0  # a non-leaf [T, P], as the inner loop's


def _second_order(fast, x, compact):
    """d/dfast of |d/dw sum(tanh(x @ w))|^2 for the [3, 4, 5] view w of fast, both views saved twice."""
    with saved_as_copies(fast) if compact else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        w = fast[:, :20].view(3, 4, 5)
        y = torch.tanh(torch.bmm(x, w)).sum() + torch.bmm(x, w).pow(2).sum()
        (g,) = torch.autograd.grad(y, w, create_graph=True)
    return y, g


def test_saved_views_are_stored_as_one_compact_copy_each_and_free_the_weights():
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    fast = _fast_weights()
    _second_order(fast, x, compact=True)
    assert _use_count(fast) == 1  # nothing autograd saved holds the [T, P] weights
    x.requires_grad_()  # so that the products save w
    with saved_as_copies(fast):
        w = fast[:, :20].view(3, 4, 5)
        products = torch.bmm(x, w), torch.bmm(x, w)
    saved = [p.grad_fn._saved_mat2 for p in products]
    assert saved[0].data_ptr() == saved[1].data_ptr() != fast.data_ptr()  # one copy for both products
    assert saved[0].untyped_storage().nbytes() == 3 * 20 * 8 and torch.equal(saved[0], w)
    plain = _fast_weights()
    _second_order(plain, x, compact=False)
    assert _use_count(plain) > 1  # the views autograd saved pin it


def test_compact_copies_leave_every_derivative_unchanged():
    x = torch.randn(3, 2, 4, dtype=torch.float64)

    def meta(compact):
        fast = _fast_weights()
        _, g = _second_order(fast, x, compact)
        (d,) = torch.autograd.grad(g.pow(2).sum(), fast)
        return g, d

    for got, want in zip(meta(True), meta(False)):
        assert torch.equal(got, want)
    base = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)

    def f(b):
        fast = b * 2.0
        with saved_as_copies(fast):
            w = fast[:, 8:28].view(3, 5, 4)
            return torch.bmm(x, w.transpose(1, 2)[:, :4, :]).sin()

    torch.autograd.gradcheck(f, (base,))
    torch.autograd.gradgradcheck(f, (base,))


def test_compaction_defers_to_a_caller_s_hooks_and_skips_shared_weights():
    calls = []

    def pack(t):
        calls.append(t)
        return t

    fast = _fast_weights()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with saved_as_copies(fast):
            torch.sin(fast[:, :20])
    assert any(c.data_ptr() == fast.data_ptr() for c in calls)  # the caller's hook saw the view itself
    shared = torch.randn(40, dtype=torch.float64, requires_grad=True)
    for weights in (shared.expand(3, 40), shared):  # a copy per task, or of a [P] vector, would free nothing
        with saved_as_copies(weights):
            y = torch.sin(weights[..., :20])
        assert y.grad_fn._saved_self.data_ptr() == shared.data_ptr()


def test_storage_held_only_by_counts_every_tensor_on_the_storage():
    t = torch.randn(4, 6)
    assert storage_held_only_by(t, 1)
    view = t[1:]
    assert not storage_held_only_by(t, 1) and storage_held_only_by(t, 2)
    del view
    assert storage_held_only_by(t, 1)
    seen = []
    torch.vmap(lambda row: seen.append(storage_held_only_by(row, 1)) or row)(t)  # a wrapper has no storage
    assert seen == [False]


def test_pack_in_place_writes_the_update_into_onto_s_memory():
    torch.manual_seed(0)
    layout = ParamLayout(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)).double())
    parts = [torch.randn(2, *s, dtype=torch.float64) for s in layout.shapes]
    parts[1] = None
    onto = torch.randn(2, layout.numel, dtype=torch.float64)
    want = layout.pack(parts, onto=onto)
    got = layout.pack(parts, onto=onto, in_place=True)
    assert torch.equal(got, want) and got.data_ptr() == onto.data_ptr()
    for bad in (torch.randn(layout.numel, 2, dtype=torch.float64).t(), torch.randn(3, layout.numel, dtype=torch.float64),
                None):
        with pytest.raises(ValueError, match="contiguous onto"):
            layout.pack(parts, onto=bad, in_place=True)


VOCAB, SEQ = 11, 7


def _lm():
    torch.manual_seed(0)
    return TransformerLM(vocab=VOCAB, d_model=16, n_heads=2, n_layers=2, max_len=8).double()


def _tasks(T):
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen), torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen))


def _assert_matches_reference(model, loss, support, query, steps):
    params = list(model.parameters())
    got = torch.autograd.grad(loss, params)
    names = [n for n, _ in model.named_parameters()]
    want = torch.autograd.grad(sequential_meta_loss(model, lm_loss, support, query, names=names,
                                                    lrs={n: 0.3 for n in names}, steps=steps), params)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-9 * w.abs().max() + 1e-14


def _record_update_memory(monkeypatch):
    """[(memory of step k's weights, memory of step k+1's)] for every inner step of a MAML forward."""
    steps = []
    descend = inner_loop.InnerOptimizer.descend

    def recording(self, params, *args, **kwargs):
        before = params.data_ptr()
        out = descend(self, params, *args, **kwargs)
        steps.append((before, out[0].data_ptr()))
        return out

    monkeypatch.setattr(inner_loop.InnerOptimizer, "descend", recording)
    return steps


@pytest.mark.parametrize("vectorize", [None, False])
def test_second_order_maml_updates_in_place_and_matches_the_reference(monkeypatch, vectorize):
    steps = _record_update_memory(monkeypatch)
    model = _lm()
    support, query = _tasks(3)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=3, vectorize=vectorize)
    loss = maml(lm_loss, support, query)
    assert [before == after for before, after in steps] == [False, True, True]  # step 1 starts from the shared [P]
    _assert_matches_reference(model, loss, support, query, steps=3)


def test_weights_a_loss_fn_keeps_are_never_overwritten(monkeypatch):
    """A loss_fn that keeps the fast weights it is given (say, for logging) holds their memory, so the
    update writes a new tensor and the kept weights keep the values of their step."""
    steps = _record_update_memory(monkeypatch)
    kept = []
    bind = inner_loop.TaskBatchedModel.bind

    def keeping_bind(self, params):
        kept.append((params["head.weight"], params["head.weight"].detach().clone()))
        return bind(self, params)

    monkeypatch.setattr(inner_loop.TaskBatchedModel, "bind", keeping_bind)
    model = _lm()
    support, query = _tasks(2)
    loss = mk.MAML(model, inner_lr=0.3, inner_steps=3, vectorize=False)(lm_loss, support, query)
    assert len(steps) == 3 and all(before != after for before, after in steps)
    assert all(torch.equal(weights, values) for weights, values in kept)
    _assert_matches_reference(model, loss, support, query, steps=3)


def test_a_meta_gradient_differentiated_again_is_unchanged():
    """A meta-backward with create_graph (its cotangents packed into where nothing else holds them) gives
    the meta-loss's Hessian-vector product of the sequential reference.  The task loop, not vmap: through vmap,
    PyTorch's LayerNorm gets this third derivative ~0.4% off (pytorch/pytorch#175754; see the README)."""
    model = _lm()
    support, query = _tasks(2)
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]

    def hvp(loss):
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, direction)), params, allow_unused=True)

    got = hvp(mk.MAML(model, inner_lr=0.3, inner_steps=2, vectorize=False)(lm_loss, support, query))
    names = [n for n, _ in model.named_parameters()]
    want = hvp(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs={n: 0.3 for n in names}, steps=2))
    for g, w in zip(got, want):
        if w is None:
            continue
        assert (g - w).abs().max() <= 1e-9 * w.abs().max() + 1e-14
