"""learn2learn's clone is a copy of the model, and code written for it reaches into that copy:
``learner.module``, ``learner.features(x)`` (an attribute the clone lacks is the copy's), a method of
the model, ``learner.head.weight``, ``learner.eval()``.  metakernels' clone keeps only the task's weights;
these run with them (:mod:`metakernels.compat_view`).  On the old code each raised AttributeError
('_Learner' object has no attribute ...), and ``learner.eval()`` left dropout on."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from metakernels import compat


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(7, 6)
        self.features = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(6, 7, bias=False)
        if tie:
            self.head.weight = self.embed.weight
        self.note = "a plain attribute"

    def encode(self, tokens):
        return self.features(self.embed(tokens)).mean(dim=1)

    def forward(self, tokens):
        return self.head(self.encode(tokens))


def _net(**kwargs):
    torch.manual_seed(0)
    return Net(**kwargs).double()


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (5, 3), generator=gen), torch.randint(0, 7, (5,), generator=gen)


def _loss(logits, labels):
    return nn.functional.cross_entropy(logits, labels)


def _adapted(maml, batch):
    learner = maml.clone()
    learner.adapt(_loss(learner(batch[0]), batch[1]))
    return learner


@pytest.mark.parametrize("tie", [False, True])
def test_submodules_and_methods_of_a_clone_run_with_its_adapted_weights(tie):
    model = _net(tie=tie)
    maml = compat.MAML(model, lr=0.5)
    (tokens, labels), (query, query_labels) = _batch(1), _batch(2)
    learner = _adapted(maml, (tokens, labels))
    weights = dict(learner.named_parameters())
    assert not torch.equal(weights["features.0.weight"], model.features[0].weight)
    want = functional_call(model, weights, (query,))
    by_parts = learner.head(learner.features(learner.embed(query)).mean(dim=1))
    for got in (learner.module(query), learner.head(learner.encode(query)), by_parts):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert learner.head.weight is (weights["embed.weight"] if tie else weights["head.weight"])
    assert learner.features[0].bias is weights["features.0.bias"]
    assert learner.note == "a plain attribute" and maml.note == "a plain attribute"
    assert maml.features is model.features
    params = list(model.parameters())
    got = torch.autograd.grad(_loss(by_parts, query_labels), params, retain_graph=True)
    want_grads = torch.autograd.grad(_loss(learner(query), query_labels), params)
    for g, w in zip(got, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_clone_has_its_own_train_and_eval_modes():
    model = _net(dropout=0.5)
    maml = compat.MAML(model, lr=0.5)
    tokens, labels = _batch(1)
    learner = _adapted(maml, (tokens, labels))
    training = maml.clone()
    assert learner.eval() is learner and not learner.training and not learner.module.training
    eval_output = learner(tokens)
    torch.testing.assert_close(learner(tokens), eval_output, rtol=0, atol=0)  # no dropout
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(functional_call(model, dict(learner.named_parameters()), (tokens,)), eval_output)
        model.train()
    assert all(m.training for m in model.modules())  # the model's modes are its own
    assert training.training and not torch.equal(training(tokens), training(tokens))  # another clone: dropout on
    learner.train()
    learner.features.eval()
    assert learner.training and learner.embed.training and not learner.features.training
    assert not learner.features[3].training
    assert not learner.clone().features[3].training  # a clone of a clone keeps its modes
    model.eval()
    assert not maml.clone().training  # a new clone starts in the model's modes


def test_module_methods_through_a_clone_are_refused_with_what_to_do():
    learner = compat.MAML(_net(), lr=0.5).clone()
    with pytest.raises(AttributeError, match=r"'state_dict' is an nn.Module method, which would act on the shared "
                                             r"model, not on this clone's weights .* use maml.module.state_dict"):
        learner.module.state_dict()
    with pytest.raises(AttributeError, match="'apply' is an nn.Module method"):
        learner.features.apply(lambda m: None)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        learner.missing
