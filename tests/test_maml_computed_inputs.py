"""Batch tensors computed before the call (an encoder's output), and gradient hooks, in MAML's chunked
modes.

task_chunk and memory="low" take each chunk's meta-gradient inside the forward.  The batch tensors that
require grad now enter the chunks as detached aliases, whose gradients are handed to them
(metakernels.graph_leaves): the caller's backward runs an input's graph once, as the fast mode does.
Before, the gradients went to the leaves behind it, so each chunk ran that graph again, and
``torch.autograd.grad(meta_loss, x)`` failed, where the fast mode's single graph serves it.  Hooks on
the parameters and other leaves were run on every chunk's part of the gradient and again on the sum
(a hook doubling its gradient gave 4x); they are now held off in the chunks and see the sum once.
Checked in float64 against the sequential create_graph oracle (where inputs and other targets lie
behind each other, against the fast mode's single graph), on a model with LayerNorm and GELU."""
import re
import warnings

import pytest
import torch
from torch import nn

import metakernels as mk
from maml_reference import sequential_meta_loss
from metakernels.graph_leaves import grad_without_hooks

T, STEPS = 3, 2
CHUNKED = [("fast", 2), ("fast", 1), ("low", None), ("low", 2)]


class _CountedIdentity(torch.autograd.Function):
    """Identity whose backward counts its calls in ``calls``."""

    @staticmethod
    def forward(ctx, x, calls):
        ctx.calls = calls
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.calls.append(1)
        return grad, None


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 2)).double()


def _loss_fn(f, batch):
    x, y = batch
    return (f(x) - y).pow(2).mean()


def _task_data():
    torch.manual_seed(1)
    encoder = nn.Linear(3, 4).double()
    raw = torch.randn(2, T, 5, 3, dtype=torch.float64)
    labels = torch.randn(2, T, 5, 2, dtype=torch.float64)
    return encoder, raw, labels


def _oracle(model, loss_fn, support, query, first_order):
    names = [n for n, _ in model.named_parameters()]
    return sequential_meta_loss(model, loss_fn, support, query, names=names, lrs=dict.fromkeys(names, 0.2),
                                steps=STEPS, first_order=first_order)


def _gradients(loss, wrt):
    """d loss / d wrt, zeros where it does not depend on one (first order: the support inputs)."""
    grads = torch.autograd.grad(loss, wrt, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]


def _ours(model, support, query, memory, task_chunk, first_order, loss_fn=_loss_fn):
    maml = mk.MAML(model, inner_lr=0.2, inner_steps=STEPS, first_order=first_order, memory=memory,
                   task_chunk=task_chunk)
    return maml(loss_fn, support, query)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("memory,task_chunk", CHUNKED)
def test_the_meta_gradient_with_respect_to_a_computed_input_is_the_oracles(memory, task_chunk, first_order):
    model = _model()
    encoder, raw, labels = _task_data()
    support_x, query_x = torch.tanh(encoder(raw[0])), torch.tanh(encoder(raw[1]))
    support, query = (support_x, labels[0]), (query_x, labels[1])
    wrt = [support_x, query_x, *model.parameters()]
    got = _gradients(_ours(model, support, query, memory, task_chunk, first_order), wrt)
    want = _gradients(_oracle(model, _loss_fn, support, query, first_order), wrt)
    assert torch.count_nonzero(want[0]) == 0 if first_order else torch.count_nonzero(want[0]) > 0  # support_x
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("memory,task_chunk", CHUNKED)
def test_a_hook_on_a_computed_input_sees_its_whole_gradient_once(memory, task_chunk):
    model = _model()
    encoder, raw, labels = _task_data()
    support, query_x = (raw[0] @ encoder.weight.detach().T, labels[0]), encoder(raw[1])
    seen = []
    query_x.register_hook(seen.append)
    _ours(model, support, (query_x, labels[1]), memory, task_chunk, False).backward()
    assert len(seen) == 1
    want = torch.autograd.grad(_oracle(model, _loss_fn, support, (query_x, labels[1]), False), query_x)[0]
    torch.testing.assert_close(seen[0], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("memory,task_chunk", CHUNKED)
def test_the_graph_behind_a_computed_input_runs_once_per_backward(memory, task_chunk):
    """Before, every chunk differentiated the encoder again (T = 3 chunks of one task: 3 runs)."""
    model = _model()
    encoder, raw, labels = _task_data()
    calls = []
    features = _CountedIdentity.apply(encoder(raw), calls)
    _ours(model, (features[0], labels[0]), (features[1], labels[1]), memory, task_chunk, False).backward()
    assert len(calls) == 1
    assert encoder.weight.grad is not None and torch.count_nonzero(encoder.weight.grad) > 0


def _tangled_settings():
    """Batches whose computed tensors have something else differentiated behind them: the part through
    the tensor must reach it once.  build(model, encoder, raw, labels) -> (support, query, loss_fn,
    tensors to differentiate besides the model's parameters)."""

    def model_parameter_behind(model, encoder, raw, labels):  # the input made with the meta-trained layer
        support_x = encoder(raw[0]) * model[0].bias[:4]
        return (support_x, labels[0]), (encoder(raw[1]), labels[1]), _loss_fn, list(encoder.parameters())

    def closure_leaf_behind(model, encoder, raw, labels):  # loss_fn uses the encoder's weight directly too
        def loss_fn(f, batch):
            return _loss_fn(f, batch) + 0.1 * encoder.weight.pow(2).sum()
        return (encoder(raw[0]), labels[0]), (encoder(raw[1]), labels[1]), loss_fn, list(encoder.parameters())

    def computed_behind_computed(model, encoder, raw, labels):  # the query made from the support
        support_x = torch.tanh(encoder(raw[0]))
        return (support_x, labels[0]), (support_x * 2 - 1, labels[1]), _loss_fn, list(encoder.parameters())

    def two_outputs_of_one_node(model, encoder, raw, labels):  # unbind's outputs share one autograd node
        support_x, query_x = encoder(raw).unbind(0)
        return (support_x, labels[0]), (query_x, labels[1]), _loss_fn, [*encoder.parameters(), support_x, query_x]

    def one_tensor_in_both(model, encoder, raw, labels):  # the support's inputs are the query's too
        x = torch.tanh(encoder(raw[0]))
        return (x, labels[0]), (x, labels[1]), _loss_fn, [*encoder.parameters(), x]

    return [model_parameter_behind, closure_leaf_behind, computed_behind_computed, two_outputs_of_one_node,
            one_tensor_in_both]


@pytest.mark.parametrize("build", _tangled_settings(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("memory,task_chunk", CHUNKED)
def test_a_gradient_is_counted_once_where_targets_lie_behind_each_other(memory, task_chunk, first_order, build):
    """Against the fast mode's single graph: the oracle's first inner gradient is taken with respect to
    the parameters themselves, and so also through an input made with one."""
    model = _model()
    encoder, raw, labels = _task_data()
    support, query, loss_fn, extra = build(model, encoder, raw, labels)
    wrt = [*model.parameters(), *extra]
    want = _gradients(_ours(model, support, query, "fast", None, first_order, loss_fn), wrt)
    meta_loss = _ours(model, support, query, memory, task_chunk, first_order, loss_fn)
    got = _gradients(meta_loss, wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("memory,task_chunk", [("fast", None), *CHUNKED])
def test_a_gradient_hook_sees_the_summed_gradient_once(memory, task_chunk, first_order):
    """Hooks doubling the gradient on the model's parameters, on an encoder loss_fn calls and on the inner
    rate give the fast mode's (the oracle's) gradients: before, task_chunk gave 4x on the parameters."""
    model = _model()
    encoder, raw, labels = _task_data()
    inner_lr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    hooked = [*model.parameters(), *encoder.parameters(), inner_lr]

    def loss_fn(f, batch):
        x, y = batch
        return (f(torch.tanh(encoder(x))) - y).pow(2).mean()

    support, query = (raw[0], labels[0]), (raw[1], labels[1])
    names = [n for n, _ in model.named_parameters()]
    oracle = sequential_meta_loss(model, loss_fn, support, query, names=names, lrs=dict.fromkeys(names, inner_lr),
                                  steps=STEPS, first_order=first_order)
    want = [2 * g for g in _gradients(oracle, hooked)]  # before the hooks: the oracle's inner steps would run them
    calls = []
    for t in hooked:
        t.register_hook(lambda g: (calls.append(1), g * 2)[1])
    maml = mk.MAML(model, inner_lr=inner_lr, inner_steps=STEPS, first_order=first_order, memory=memory,
                   task_chunk=task_chunk)
    maml(loss_fn, support, query).backward()
    assert len(calls) == len(hooked)
    for t, w in zip(hooked, want):
        torch.testing.assert_close(t.grad, w, rtol=1e-9, atol=1e-12)


MODULE_HOOK_WARNING = "module backward hooks .* on (.*) do not see the meta-gradient once"


@pytest.mark.parametrize("options", [{}, {"task_chunk": 2}, {"memory": "low"}, {"vectorize": False}])
def test_module_backward_hooks_are_warned_about_once(options):
    """Module backward hooks do not run under vmap and run for every inner gradient in a loop over tasks
    (measured: 0 calls in the fast mode, 20 for one meta-step of 4 tasks with vectorize=False), so the
    engine says so, once per MAML; without such hooks it is silent."""
    model = _model()
    encoder, raw, labels = _task_data()
    support, query = (encoder(raw[0]).detach(), labels[0]), (encoder(raw[1]).detach(), labels[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mk.MAML(model, inner_lr=0.2, inner_steps=STEPS, **options)(_loss_fn, support, query)
    model[3].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    maml = mk.MAML(model, inner_lr=0.2, inner_steps=STEPS, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maml(_loss_fn, support, query)
        maml(_loss_fn, support, query)
    hooked = [re.search(MODULE_HOOK_WARNING, str(w.message)) for w in caught]
    assert [match.group(1) for match in hooked if match] == ["['3']"]


def test_global_and_pre_backward_hooks_are_warned_about_in_the_learned_optimizers_trainer():
    model = _model()
    x, y = torch.randn(T, 5, 4, dtype=torch.float64), torch.randn(T, 5, 2, dtype=torch.float64)
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0).double()
    handle = nn.modules.module.register_module_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        with pytest.warns(RuntimeWarning, match=re.escape("on ['every module (a global hook)'] do not see")):
            mk.LearnedOptimizerTrainer(lopt, model).unroll(_loss_fn, (x, y), steps=1)
    finally:
        handle.remove()
    model[1].register_full_backward_pre_hook(lambda module, grad_out: None)
    with pytest.warns(RuntimeWarning, match=re.escape("on ['1'] do not see")):
        mk.LearnedOptimizerTrainer(lopt, model).unroll(_loss_fn, (x, y), steps=1)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward failed")


def test_hooks_come_back_after_a_failed_gradient():
    w = torch.randn(3, requires_grad=True)
    seen = []
    w.register_hook(seen.append)
    with pytest.raises(RuntimeError, match="backward failed"):
        grad_without_hooks(_FailingBackward.apply(w).sum(), [w])
    assert seen == []
    torch.autograd.grad((w * 2).sum(), [w])
    assert len(seen) == 1
