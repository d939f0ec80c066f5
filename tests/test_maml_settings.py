"""MAML's (and the learned-optimizer trainer's) settings changed between calls (a first-order warm-up, a curriculum over inner_steps, a memory
mode switched for a larger batch): a valid change gives what a MAML built with it gives, and a bad value
is refused at the assignment with the constructor's message, leaving the setting as it was.  Assigned
as plain attributes, inner_steps=-1 ran zero steps, memory='tiny' the fast mode, task_chunk=0 chunks of
one task and first_order='yes' first order, without a word (measured on the old code)."""
import re

import numpy as np
import pytest
import torch
from torch import nn

import metakernels as mk


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)).double()
    gen = torch.Generator().manual_seed(1)
    support = (torch.randn(3, 5, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (3, 5), generator=gen))
    query = (torch.randn(3, 5, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (3, 5), generator=gen))
    return model, support, query


def _loss(f, batch):
    return nn.functional.cross_entropy(f(batch[0]), batch[1])


def _meta_gradient(maml, support, query):
    return torch.autograd.grad(maml(_loss, support, query), list(maml.module.parameters()))


@pytest.mark.parametrize("name,value", [("first_order", True), ("inner_steps", 3), ("inner_steps", np.int64(0)),
                                        ("memory", "low"), ("task_chunk", 2), ("nan_policy", "ignore")])
def test_a_setting_changed_after_construction_acts_as_if_built_with_it(name, value):
    model, support, query = _setting()
    changed = mk.MAML(model, inner_lr=0.2, inner_steps=2)
    _meta_gradient(changed, support, query)  # a call before the change
    setattr(changed, name, value)
    assert getattr(changed, name) == value
    assert name != "inner_steps" or type(changed.inner_steps) is int
    built = mk.MAML(model, inner_lr=0.2, **{"inner_steps": 2, name: value})
    for g, w in zip(_meta_gradient(changed, support, query), _meta_gradient(built, support, query)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name,value,error,message", [
    ("inner_steps", -1, ValueError, "inner_steps must be an int >= 0, got -1"),
    ("inner_steps", 2.0, ValueError, "inner_steps must be an int >= 0, got 2.0"),
    ("first_order", "yes", TypeError, "first_order must be True or False, got 'yes'"),
    ("memory", "tiny", ValueError, "memory must be one of ('fast', 'low'), got 'tiny'"),
    ("task_chunk", 0, ValueError, "task_chunk must be an int >= 1 or None, got 0"),
    ("nan_policy", "skip", ValueError, "nan_policy must be one of ('raise', 'ignore'), got 'skip'"),
])
def test_a_bad_setting_is_refused_when_built_and_when_changed(name, value, error, message):
    model, _, _ = _setting()
    with pytest.raises(error) as built:
        mk.MAML(model, **{name: value})
    assert str(built.value) == message
    maml = mk.MAML(model, inner_steps=2, task_chunk=3)
    before = getattr(maml, name)
    with pytest.raises(error) as changed:
        setattr(maml, name, value)
    assert str(changed.value) == message
    assert getattr(maml, name) == before


def test_a_number_inner_lr_set_after_construction_is_checked_at_the_next_call():
    """A negative rate set later ran gradient ascent in the inner loop, without a word."""
    model, support, query = _setting()
    maml = mk.MAML(model, inner_lr=0.2, inner_steps=2)
    maml.inner_lr = 0.05
    built = mk.MAML(model, inner_lr=0.05, inner_steps=2)
    for g, w in zip(_meta_gradient(maml, support, query), _meta_gradient(built, support, query)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    for value, error, message in ((-0.1, ValueError, r"MAML: argument 'inner_lr' must be in \[0.0, inf\], got -0.1"),
                                  (float("nan"), ValueError, "MAML: argument 'inner_lr' must be finite, got nan"),
                                  ("0.1", TypeError, "MAML: argument 'inner_lr' must be a real number, got str")):
        maml.inner_lr = value
        for call in (lambda: maml(_loss, support, query), lambda: maml.adapt(_loss, support)):
            with pytest.raises(error, match=message):
                call()


def test_the_learned_optimizer_trainer_checks_its_settings_when_changed():
    model, support, _ = _setting()
    lopt = mk.LearnedOptimizer(hidden=4, seed=0).double()
    changed = mk.LearnedOptimizerTrainer(lopt, model)
    changed.first_order = True
    built = mk.LearnedOptimizerTrainer(lopt, model, first_order=True)
    got, want = (torch.autograd.grad(t.unroll(_loss, support, 2).meta_loss, list(lopt.parameters()), allow_unused=True)
                 for t in (changed, built))
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="first_order must be True or False, got 'no'"):
        changed.first_order = "no"
    with pytest.raises(ValueError, match=r"nan_policy must be one of \('raise', 'ignore'\), got 'skip'"):
        changed.nan_policy = "skip"
    assert changed.first_order is True and changed.nan_policy == "raise"


def test_meta_sgd_refuses_a_changed_learn_lr_and_keeps_its_rates():
    """The learned rates are shaped for learn_lr when MetaSGD is built; changed later, 'scalar' failed with a
    shape error from the update op and 'tensor' with one from expand (measured on the old code)."""
    model, support, query = _setting()
    meta = mk.MetaSGD(model, inner_lr=0.2, learn_lr="parameter")
    before = _meta_gradient(meta, support, query)
    for value in ("scalar", "tensor", "row"):
        message = (f"MetaSGD.learn_lr is fixed when MetaSGD is built (its inner_lrs are shaped for 'parameter'); "
                   f"build a new MetaSGD with learn_lr='{value}'")
        with pytest.raises(AttributeError, match=re.escape(message)):
            meta.learn_lr = value
    assert meta.learn_lr == "parameter"
    for g, w in zip(_meta_gradient(meta, support, query), before):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
