"""``f`` in ``loss_fn(f, batch)`` (metakernels.BoundModel): its parameters are the task's weights, so an
inner-loss regulariser written on them (an L2 or proximal term) adapts the task's weights, in every mode,
against a sequential create_graph oracle in float64.  Before, ``f`` was a bare function: the only
parameters in reach were the model's own, the shared initialisation, and a term on them silently had no
effect on the inner steps."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

import metakernels as mk

T, STEPS, LR, DECAY = 3, 2, 0.2, 0.05


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 7)).double()
    support = (torch.randint(0, 7, (T, 5)), torch.randint(0, 7, (T, 5)))
    query = (torch.randint(0, 7, (T, 5)), torch.randint(0, 7, (T, 5)))
    return model, support, query


def _regularised_loss(f, batch):
    x, y = batch
    data = nn.functional.cross_entropy(f(x), y)
    return data + DECAY * sum(w.pow(2).sum() for w in f.parameters())


def _oracle(model, support, query, adapted):
    params = dict(model.named_parameters())
    total = 0
    for t in range(T):
        fast = dict(params)
        for _ in range(STEPS):
            x, y = support[0][t], support[1][t]
            loss = nn.functional.cross_entropy(functional_call(model, fast, (x,)), y)
            loss = loss + DECAY * sum(w.pow(2).sum() for w in fast.values())
            grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
            fast.update({n: fast[n] - LR * g for n, g in zip(adapted, grads)})
        x, y = query[0][t], query[1][t]
        total = total + (nn.functional.cross_entropy(functional_call(model, fast, (x,)), y)
                         + DECAY * sum(w.pow(2).sum() for w in fast.values())) / T
    return total


@pytest.mark.parametrize("adapt", [None, ["3.weight", "3.bias"]], ids=["all", "head"])
@pytest.mark.parametrize("mode", [{}, {"vectorize": False}, {"task_chunk": 2}, {"memory": "low"}])
def test_a_regulariser_on_f_parameters_adapts_the_task_weights(adapt, mode):
    model, support, query = _setting()
    adapted = [n for n, _ in model.named_parameters()] if adapt is None else adapt
    maml = mk.MAML(model, inner_lr=LR, inner_steps=STEPS, adapt=adapt, **mode)
    meta_loss = maml(_regularised_loss, support, query)
    got = torch.autograd.grad(meta_loss, list(model.parameters()))
    want_loss = _oracle(model, support, query, adapted)
    want = torch.autograd.grad(want_loss, list(model.parameters()))
    torch.testing.assert_close(meta_loss, want_loss, rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_f_named_parameters_are_the_tasks_where_adapted_and_the_models_elsewhere():
    model, support, _ = _setting()
    maml = mk.MAML(model, inner_lr=LR, inner_steps=1, adapt=["3.weight", "3.bias"])
    adapted = maml.adapt(_regularised_loss, support)
    f = adapted.task(1)
    assert isinstance(f, mk.BoundModel)
    names = [n for n, _ in f.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
    weights = dict(f.named_parameters())
    assert weights["0.weight"] is model[0].weight
    torch.testing.assert_close(weights["3.weight"], adapted.params(1)["3.weight"], rtol=0, atol=0)
    assert not torch.equal(weights["3.weight"], model[3].weight)
    assert [w.data_ptr() for w in f.parameters()] == [w.data_ptr() for w in weights.values()]
    torch.testing.assert_close(f(support[0][1]), functional_call(model, adapted.params(1), (support[0][1],)))


def test_tied_weights_appear_once_as_in_the_model():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(self.embed(x))

    model = Tied().double()
    seen = []

    def loss_fn(f, batch):
        seen.append([n for n, _ in f.named_parameters()])
        return f(batch).pow(2).mean()

    mk.MAML(model, inner_lr=0.1, inner_steps=1, vectorize=False)(loss_fn, torch.randint(0, 5, (2, 3)),
                                                                  torch.randint(0, 5, (2, 3)))
    assert all(names == ["embed.weight"] for names in seen)


def test_the_learned_optimizers_unroll_hands_f_the_unrolled_weights():
    model, support, _ = _setting()
    trainer = mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4).double(), model, vectorize=False)  # .item()
    moved = []

    def loss_fn(f, batch):
        moved.append(max((w - own).abs().max().item() for w, own in zip(f.parameters(), model.parameters())))
        return _regularised_loss(f, batch)

    trainer.unroll(loss_fn, support, steps=2)
    assert moved[0] == 0 and moved[-1] > 0  # the first step runs at the initialisation, later ones moved


def test_adapted_module_is_a_standalone_copy_with_the_tasks_weights():
    model, support, query = _setting()
    model[3].weight = model[0].weight  # the head tied to the embedding, as in an LM
    maml = mk.MAML(model, inner_lr=LR, inner_steps=STEPS)
    adapted = maml.adapt(_regularised_loss, support)
    shared = {n: p.clone() for n, p in model.state_dict().items()}
    standalone = adapted.module(2)
    assert isinstance(standalone, type(model)) and standalone is not model
    assert standalone[3].weight is standalone[0].weight  # the tie is kept
    torch.testing.assert_close(standalone(query[0][2]), adapted.task(2)(query[0][2]), rtol=0, atol=0)
    with torch.no_grad():
        for p in standalone.parameters():
            p.zero_()
    for n, p in model.state_dict().items():
        assert torch.equal(p, shared[n]), n
    assert not torch.equal(adapted.task(2)(query[0][2]), standalone(query[0][2]))
