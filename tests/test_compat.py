"""The learn2learn-compatible facade gives the sequential oracle's meta-gradients (learn2learn's own
semantics), and learn2learn's when it can be imported."""
import pytest
import torch

from maml_reference import sequential_meta_loss
import metakernels as mk
from metakernels import compat
from metakernels.models import lm_loss
from test_maml import _assert_grads_close, _grads, _model, _tasks


def _l2l_loop(maml, support, query, steps):
    total = 0.0
    for t in range(support.shape[0]):
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(lm_loss(learner, support[t]))
        total = total + lm_loss(learner, query[t])
    return total / support.shape[0]


@pytest.mark.parametrize("first_order", [False, True])
def test_compat_maml_matches_reference(first_order):
    model = _model()
    support, query = _tasks(3)
    maml = compat.MAML(model, lr=0.3, first_order=first_order)
    params = list(model.parameters())
    got = _grads(_l2l_loop(maml, support, query, 2), params)
    names = [n for n, _ in model.named_parameters()]
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs={n: 0.3 for n in names},
                                       steps=2, first_order=first_order), params)
    _assert_grads_close(got, want)


def test_compat_meta_sgd_matches_reference():
    model = _model()
    support, query = _tasks(2)
    meta = compat.MetaSGD(model, lr=0.2)
    with torch.no_grad():
        for i, r in enumerate(meta.lrs):
            r.add_(0.01 * i)
    params, rates = list(model.parameters()), list(meta.lrs)
    got = _grads(_l2l_loop(meta, support, query, 2), params + rates)
    names = [n for n, _ in model.named_parameters()]
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs=dict(zip(names, rates)),
                                       steps=2), params + rates)
    _assert_grads_close(got, want)


def test_compat_meta_sgd_rates_broadcast_to_their_parameters_as_in_learn2learn():
    model = _model()
    support, query = _tasks(2)
    params = list(model.parameters())
    per_tensor = compat.MetaSGD(model, lrs=[torch.full([1], 0.2 + 0.01 * i, dtype=p.dtype) for i, p in enumerate(params)])
    got = _grads(_l2l_loop(per_tensor, support, query, 2), params + list(per_tensor.lrs))
    names = [n for n, _ in model.named_parameters()]
    rates = [r.expand_as(p) for r, p in zip(per_tensor.lrs, params)]
    want = _grads(sequential_meta_loss(model, lm_loss, support, query, names=names, lrs=dict(zip(names, rates)),
                                       steps=2), params + list(per_tensor.lrs))
    _assert_grads_close(got, want)
    assert all(g.shape == (1,) for g in got[len(params):])
    transposed = [torch.ones(p.shape[::-1], dtype=p.dtype) for p in params]
    with pytest.raises(ValueError, match=r"lrs\[0\] has shape \[16, 11\], which does not broadcast to its "
                                         r"parameter's shape \[11, 16\]"):
        compat.MetaSGD(model, lrs=transposed)
    with pytest.raises(ValueError, match=f"lrs holds 1 rates for the model's {len(params)} parameters"):
        compat.MetaSGD(model, lrs=[torch.ones(1)])
    with pytest.raises(TypeError, match=r"lrs\[0\] must be a tensor, got float"):
        compat.MetaSGD(model, lrs=[0.1] * len(params))


def test_compat_frozen_parameters_need_allow_nograd():
    model = _model()
    model.tok.weight.requires_grad_(False)
    support, _ = _tasks(1)
    learner = compat.MAML(model, lr=0.1).clone()
    with pytest.raises(ValueError, match="allow_nograd=True"):
        learner.adapt(lm_loss(learner, support[0]))
    learner = compat.MAML(model, lr=0.1, allow_nograd=True).clone()
    learner.adapt(lm_loss(learner, support[0]))
    assert learner._fast["tok.weight"]._base is model.tok.weight  # not adapted: still the clone's view


def test_clone_settings_belong_to_the_clone():
    """learn2learn's clone(first_order, allow_unused, allow_nograd) sets them for that clone (and its own
    clones) only: a first-order clone does not turn the next clone first order (it did, through the parent)."""
    model = _model()
    support, query = _tasks(1)
    params = list(model.parameters())

    def meta_grads(learner):
        learner.adapt(lm_loss(learner, support[0]))
        return _grads(lm_loss(learner, query[0]), params)

    maml = compat.MAML(model, lr=0.3)
    first = meta_grads(maml.clone(first_order=True))
    second = meta_grads(maml.clone())
    assert maml.first_order is False
    _assert_grads_close(first, meta_grads(compat.MAML(model, lr=0.3, first_order=True).clone()))
    _assert_grads_close(second, meta_grads(compat.MAML(model, lr=0.3).clone()))
    assert not all(torch.allclose(a, b) for a, b in zip(first, second))
    _assert_grads_close(meta_grads(maml.clone(first_order=True).clone()), first)  # a clone's clone inherits
    model.tok.weight.requires_grad_(False)
    learner = maml.clone(allow_nograd=True)
    learner.adapt(lm_loss(learner, support[0]))
    with pytest.raises(ValueError, match="allow_nograd=True"):
        learner = maml.clone()
        learner.adapt(lm_loss(learner, support[0]))


def test_matches_learn2learn_when_installed():
    l2l = pytest.importorskip("learn2learn", reason="learn2learn 0.2 does not build on Python 3.11 (see TOOLCHAIN.md)")
    model = _model()
    support, query = _tasks(2)
    params = list(model.parameters())
    ours = _grads(_l2l_loop(compat.MAML(model, lr=0.3), support, query, 2), params)
    theirs = _grads(_l2l_loop(l2l.algorithms.MAML(model, lr=0.3), support, query, 2), params)
    _assert_grads_close(ours, theirs)
    ours_sgd = compat.MetaSGD(model, lr=0.2)
    theirs_sgd = l2l.algorithms.MetaSGD(model, lr=0.2)
    ours = _grads(_l2l_loop(ours_sgd, support, query, 2), params + list(ours_sgd.lrs))
    theirs = _grads(_l2l_loop(theirs_sgd, support, query, 2), params + list(theirs_sgd.lrs))
    _assert_grads_close(ours, theirs)


def test_a_clones_parameters_are_its_adapted_weights():
    """learn2learn's clone is a module whose parameters are the task's weights: code that regularises
    ``learner.parameters()`` in the inner loss must act on them (before: the clone listed no parameters,
    and such a term was silently 0)."""
    model = _model()
    support, query = _tasks(2)
    decay, names = 1e-2, [n for n, _ in model.named_parameters()]
    maml = compat.MAML(model, lr=0.3)

    def regularised(f, batch):
        return lm_loss(f, batch) + decay * sum(w.pow(2).sum() for w in f.parameters())

    learner = maml.clone()
    assert [n for n, _ in learner.named_parameters()] == names
    assert all(w._base is p for w, p in zip(learner.parameters(), model.parameters()))  # views, not copies
    learner.adapt(regularised(learner, support[0]))
    assert all(not torch.equal(w, p) for w, p in zip(learner.parameters(), model.parameters()))
    assert [n for n, _ in learner.named_parameters(prefix="learner")][0] == f"learner.{names[0]}"

    total = 0.0
    for t in range(2):
        learner = maml.clone()
        learner.adapt(regularised(learner, support[t]))
        total = total + regularised(learner, query[t]) / 2
    params = list(model.parameters())
    got = _grads(total, params)
    want = _grads(mk.MAML(model, inner_lr=0.3, inner_steps=1, vectorize=False)(regularised, support, query), params)
    _assert_grads_close(got, want)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_hook_on_a_parameter_sees_the_meta_gradient_alone(first_order):
    """As with learn2learn's cloned weights, a hook on a model parameter runs once, on the meta-gradient;
    before, the first inner step's gradient was taken with respect to the parameter itself, so the hook
    also ran on (and, doubling it, changed) the inner gradient."""
    model = _model()
    support, query = _tasks(2)
    maml = compat.MAML(model, lr=0.3, first_order=first_order)
    params = list(model.parameters())
    want = [2 * g for g in _grads(_l2l_loop(maml, support, query, 2), params)]
    calls = []
    for p in params:
        p.register_hook(lambda g: (calls.append(1), g * 2)[1])
    got = _grads(_l2l_loop(maml, support, query, 2), params)
    assert len(calls) == len(params)
    _assert_grads_close(got, want)
