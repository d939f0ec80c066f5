"""Meta-gradients reach what the losses depend on outside the MAML's own parameters, in every mode.

task_chunk and memory="low" differentiate each chunk inside the forward (metakernels.graph_leaves).
Before, they handed gradients only to ``maml.parameters()``: support inputs that require grad, an
encoder that ``loss_fn`` calls outside the wrapped model, an input computed before the call from a
tensor that requires grad, and an ``inner_lr`` tensor that is not a parameter silently got none, where
the fast mode's single graph gave them their gradients.  Each is checked here against the sequential
create_graph oracle in float64, on a model with LayerNorm and GELU."""
import pytest
import torch
from torch import nn

import metakernels as mk
from maml_reference import sequential_meta_loss
from metakernels.graph_leaves import leaves_outside

T, STEPS = 3, 2


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2)).double()
    encoder = nn.Linear(4, 4).double()
    support_x = torch.randn(T, 5, 4, dtype=torch.float64, requires_grad=True)  # a leaf, as in data distillation
    query_scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    raw_query = torch.randn(T, 5, 4, dtype=torch.float64)
    targets = (torch.randn(T, 5, 2, dtype=torch.float64), torch.randn(T, 5, 2, dtype=torch.float64))
    inner_lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def loss_fn(f, batch):
        x, y = batch
        return (f(torch.tanh(encoder(x))) - y).pow(2).mean()

    outside = [support_x, query_scale, inner_lr, *encoder.parameters()]
    return model, loss_fn, support_x, raw_query, query_scale, targets, inner_lr, outside


def _gradients(build_loss, model, outside):
    loss = build_loss()
    return torch.autograd.grad(loss, [*model.parameters(), *outside], allow_unused=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("memory,task_chunk", [("fast", None), ("fast", 2), ("fast", 1), ("low", None), ("low", 2)])
def test_leaves_outside_the_model_get_the_oracles_meta_gradient(memory, task_chunk, first_order, optimizer):
    model, loss_fn, support_x, raw_query, query_scale, targets, inner_lr, outside = _setting()

    def ours():
        query_x = raw_query * query_scale  # built before the call: every chunk reaches query_scale through it
        maml = mk.MAML(model, inner_lr=inner_lr, inner_steps=STEPS, first_order=first_order, inner_optimizer=optimizer,
                       memory=memory, task_chunk=task_chunk)
        meta_loss = maml(loss_fn, (support_x, targets[0]), (query_x, targets[1]))
        meta_loss.backward()  # through .backward(), as a training loop calls it
        return meta_loss

    def oracle():
        names = [n for n, _ in model.named_parameters()]
        return sequential_meta_loss(model, loss_fn, (support_x, targets[0]), (raw_query * query_scale, targets[1]),
                                    names=names, lrs=dict.fromkeys(names, inner_lr), steps=STEPS,
                                    first_order=first_order, optimizer=optimizer)

    everything = [*model.parameters(), *outside]
    ours()
    got = [t.grad for t in everything]
    want = torch.autograd.grad(oracle(), everything, allow_unused=True)
    for name, g, w in zip(["model"] * 4 + ["support_x", "query_scale", "inner_lr", "encoder.weight", "encoder.bias"],
                          got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            assert g is not None, f"{name} got no meta-gradient"
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("mode", [{}, {"task_chunk": 1}, {"memory": "low"}])
def test_a_graph_built_before_the_call_is_the_callers_to_keep(mode):
    """As in the fast mode, the caller's backward goes through the query's graph from before the call,
    and retain_graph=True keeps it for the caller afterwards."""
    model, loss_fn, support_x, raw_query, query_scale, targets, inner_lr, _ = _setting()
    query_x = raw_query * query_scale
    maml = mk.MAML(model, inner_lr=0.2, inner_steps=1, **mode)
    maml(loss_fn, (support_x, targets[0]), (query_x, targets[1])).backward(retain_graph=True)
    first = query_scale.grad.clone()
    query_x.sum().backward()
    assert query_scale.grad.item() == pytest.approx(first.item() + raw_query.sum().item(), rel=1e-12)


def test_leaves_outside_stops_at_the_known_leaves_and_finds_each_once():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    c = torch.randn(3, requires_grad=True)
    frozen = torch.randn(3)
    y = ((a * b).sum() + (b * c).sum() + (a * frozen).sum()) * 2
    assert [id(t) for t in leaves_outside([y], [a])] in ([id(b), id(c)], [id(c), id(b)])
    assert leaves_outside([y], [a, b, c]) == []
    assert leaves_outside([c], []) == [c]          # a root that is itself a leaf
    assert leaves_outside([frozen, 3.0], []) == []  # nothing that requires grad


@pytest.mark.parametrize("mode", [{"task_chunk": 1}, {"memory": "low"}])
def test_the_chunked_meta_gradient_refuses_to_be_differentiated_again(mode):
    """The chunked modes hand over precomputed numbers: create_graph=True still gives the meta-gradient,
    and differentiating it again raises, even where another term of the expression has a derivative
    (before: "element 0 of tensors does not require grad", or a silently missing Hessian term)."""
    model, loss_fn, support_x, raw_query, _, targets, _, _ = _setting()
    support, query = (support_x.detach(), targets[0]), (raw_query, targets[1])
    params = list(model.parameters())
    want = torch.autograd.grad(mk.MAML(model, inner_lr=0.2, inner_steps=1)(loss_fn, support, query), params)
    meta_loss = mk.MAML(model, inner_lr=0.2, inner_steps=1, **mode)(loss_fn, support, query)
    got = torch.autograd.grad(meta_loss, params, create_graph=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    mixed = sum(g.pow(2).sum() for g in got) + sum(p.pow(2).sum() for p in params)
    with pytest.raises(RuntimeError, match="MAML takes the meta-gradient inside the forward"):
        torch.autograd.grad(mixed, params)


def test_parameters_changed_in_place_before_the_backward_are_not_refused():
    """The chunked meta-gradient is a number taken in the forward; a parameter stepped in place before the
    backward (an optimizer stepping a previous loss) does not invalidate it, as it did not before the
    create_graph tie held the parameters."""
    model, loss_fn, support_x, raw_query, _, targets, _, _ = _setting()
    maml = mk.MAML(model, inner_lr=0.2, inner_steps=1, task_chunk=1)
    meta_loss = maml(loss_fn, (support_x.detach(), targets[0]), (raw_query, targets[1]))
    want = torch.autograd.grad(meta_loss, list(model.parameters()), retain_graph=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    got = torch.autograd.grad(meta_loss, list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [{}, {"task_chunk": 1}, {"memory": "low"}])
def test_a_second_backward_raises_unless_the_graph_was_retained(mode):
    """As the fast mode's graph does: retain_graph=True lets the caller run the backward twice (the
    gradients accumulate twice), a second backward without it raises (before, the chunked modes handed
    the gradients over again, silently doubling them)."""
    model, loss_fn, support_x, raw_query, _, targets, _, _ = _setting()
    maml = mk.MAML(model, inner_lr=0.2, inner_steps=1, **mode)
    meta_loss = maml(loss_fn, (support_x.detach(), targets[0]), (raw_query, targets[1]))
    meta_loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    meta_loss.backward()
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        meta_loss.backward()
