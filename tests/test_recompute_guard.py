"""A model with activation checkpointing is refused wherever metakernels takes gradients through it with
fast weights: the recomputation would run with the module's own parameters (metakernels/recompute_guard.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import metakernels as mk
from metakernels import compat
from metakernels import RecomputedForwardError
from test_maml import _tasks, _tiny_gpt2

ADVICE = "gradient_checkpointing_disable"


class Checkpointed(torch.nn.Module):
    """Linear -> checkpoint(Linear -> GELU) -> Linear; ``reentrant=None`` runs the middle block plainly."""

    def __init__(self, reentrant):
        super().__init__()
        self.first, self.middle, self.last = torch.nn.Linear(5, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        h = self.first(x)
        block = lambda z: F.gelu(self.middle(z))  # noqa: E731
        h = block(h) if self.reentrant is None else checkpoint(block, h, use_reentrant=self.reentrant)
        return self.last(h)


def _model(reentrant):
    torch.manual_seed(0)
    return Checkpointed(reentrant).double()


def _loss(f, batch):
    x, y = batch
    return F.cross_entropy(f(x), y)


def _batch(T=3):
    torch.manual_seed(1)
    return torch.randn(T, 6, 5, dtype=torch.float64), torch.randint(0, 3, (T, 6))


def test_the_premise_a_checkpointed_block_recomputes_with_the_modules_own_weights():
    """Why the guard exists: the gradient through functional_call's weights is the shared weights'."""
    model = _model(False)
    fast = {n: p.detach() * 2 for n, p in model.named_parameters()}
    fast["middle.weight"].requires_grad_()
    x, y = _batch(1)
    plain = _model(None)
    (got,) = torch.autograd.grad(_loss(lambda *a: functional_call(model, fast, a), (x[0], y[0])), fast["middle.weight"])
    (want,) = torch.autograd.grad(_loss(lambda *a: functional_call(plain, fast, a), (x[0], y[0])), fast["middle.weight"])
    assert not torch.allclose(got, want)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("settings", [
    {}, {"vectorize": False}, {"first_order": True}, {"memory": "low"}, {"task_chunk": 1}, {"inner_optimizer": "adam"},
], ids=["vmap", "loop", "first-order", "low-memory", "task-chunk", "adam"])
def test_maml_refuses_a_checkpointed_model(reentrant, settings):
    batch = _batch()
    with pytest.raises(RecomputedForwardError, match=ADVICE):
        mk.MAML(_model(reentrant), inner_steps=2, **settings)(_loss, batch, batch)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_metasgd_adapt_and_the_learned_optimizer_refuse_a_checkpointed_model(reentrant):
    batch = _batch()
    with pytest.raises(RecomputedForwardError, match="^MetaSGD: "):
        mk.MetaSGD(_model(reentrant))(_loss, batch, batch)
    with pytest.raises(RecomputedForwardError, match=r"^MAML\.adapt: "):
        mk.MAML(_model(reentrant)).adapt(_loss, batch)
    trainer = mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4).double(), _model(reentrant))
    with pytest.raises(RecomputedForwardError, match=r"^LearnedOptimizerTrainer\.unroll: "):
        trainer.unroll(_loss, batch, 2)
    learner = compat.MAML(_model(reentrant), lr=0.1).clone()
    x, y = batch
    with pytest.raises(RecomputedForwardError, match="^compat.MAML adapt: "):
        learner.adapt(_loss(learner, (x[0], y[0])))


def test_the_error_names_the_block_that_ran_again():
    batch = _batch()
    with pytest.raises(RecomputedForwardError, match=r"'middle' \(Linear\) ran its forward again"):
        mk.MAML(_model(False), vectorize=False)(_loss, batch, batch)


def test_after_the_error_nothing_is_left_installed_and_the_same_maml_runs_without_checkpointing():
    model = _model(False)
    maml = mk.MAML(model, inner_lr=0.3, inner_steps=2)
    batch = _batch()
    with pytest.raises(RecomputedForwardError):
        maml(_loss, batch, batch)
    assert not torch.nn.modules.module._global_forward_pre_hooks
    model.reentrant = None
    got = maml(_loss, batch, batch)
    want = mk.MAML(_model(None), inner_lr=0.3, inner_steps=2)(_loss, batch, batch)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_checkpointing_in_a_module_outside_the_model_is_not_refused():
    """A frozen feature extractor the loss calls runs with its own weights, which its recomputation keeps."""
    torch.manual_seed(2)
    encoder = torch.nn.Linear(5, 5).double().requires_grad_(False)
    head = torch.nn.Linear(5, 3).double()
    loss_fn = lambda f, b: F.cross_entropy(f(checkpoint(encoder, b[0], use_reentrant=False)), b[1])  # noqa: E731
    plain_loss = lambda f, b: F.cross_entropy(f(encoder(b[0])), b[1])  # noqa: E731
    batch = _batch()
    maml = mk.MAML(head, inner_lr=0.3, vectorize=False)
    got = maml(loss_fn, batch, batch)
    torch.testing.assert_close(got, maml(plain_loss, batch, batch), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}], ids=["default", "non-reentrant"])
def test_hugging_face_gradient_checkpointing_is_refused(kwargs):
    model = _tiny_gpt2("eager")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    support, query = _tasks(2)
    with pytest.raises(RecomputedForwardError, match=ADVICE):
        mk.MAML(model, inner_steps=1)(lambda f, b: f(input_ids=b, labels=b).loss, support, query)
