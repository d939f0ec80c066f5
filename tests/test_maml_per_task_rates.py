"""A per-task inner rate [T, P]: each chunk of tasks (task_chunk, memory="low") steps with its own tasks'
rows, and the meta-gradient, also of the rates, equals the sequential create_graph oracle run task by
task in float64.  Before, a chunk was handed all T rows and failed inside sgd_update ("argument 'lr'
must have shape [26] or [2, 26]"), and a [1, P] rate in memory="low" was silently used for every task."""
import pytest
import torch
from torch import nn

import metakernels as mk
from maml_reference import sequential_meta_loss

T, STEPS = 3, 2


def _setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 7)).double()
    support = (torch.randint(0, 7, (T, 5)), torch.randint(0, 7, (T, 5)))
    query = (torch.randint(0, 7, (T, 5)), torch.randint(0, 7, (T, 5)))
    P = sum(p.numel() for p in model.parameters())
    rates = (0.1 + 0.2 * torch.rand(T, P, dtype=torch.float64)).requires_grad_()
    return model, support, query, rates


def _loss(f, batch):
    x, y = batch
    return nn.functional.cross_entropy(f(x), y)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("mode", [{}, {"task_chunk": 2}, {"task_chunk": 1}, {"memory": "low"},
                                  {"memory": "low", "task_chunk": 2}])
def test_each_chunk_steps_with_its_own_tasks_rates(mode, first_order):
    model, support, query, rates = _setting()
    maml = mk.MAML(model, inner_lr=rates, inner_steps=STEPS, first_order=first_order, **mode)
    everything = [*model.parameters(), rates]
    meta_loss = maml(_loss, support, query)
    meta_loss.backward()
    got = [t.grad for t in everything]
    names = [n for n, _ in model.named_parameters()]
    oracle = sum(sequential_meta_loss(model, _loss, tuple(x[t:t + 1] for x in support),
                                      tuple(x[t:t + 1] for x in query), names=names,
                                      lrs=maml.layout.unflatten(rates[t]), steps=STEPS, first_order=first_order)
                 for t in range(T)) / T
    want = torch.autograd.grad(oracle, everything)
    torch.testing.assert_close(meta_loss.detach(), oracle.detach(), rtol=1e-12, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("mode", [{}, {"task_chunk": 2}, {"memory": "low"}])
def test_a_rate_with_another_task_count_is_refused(rows, mode):
    model, support, query, rates = _setting()
    maml = mk.MAML(model, inner_lr=rates[:1].detach().expand(rows, -1), inner_steps=1, **mode)
    message = (rf"inner_lr is a per-task rate of shape \[{rows}, 103\], one row per task, but the batch has T=3 "
               r"tasks; give 3 rows, or a \[P\] or \[\] rate for any T")
    with pytest.raises(ValueError, match=message):
        maml(_loss, support, query)
    with pytest.raises(ValueError, match=message):
        maml.adapt(_loss, support)


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("mode", [{}, {"memory": "low"}, {"task_chunk": 2}], ids=["fast", "low", "chunk"])
@pytest.mark.parametrize("shape", ["one", "per-parameter", "per-task"])
def test_a_rate_tensor_in_another_dtype_is_used_in_the_weights_dtype(shape, mode, inner_optimizer):
    """torch.tensor(0.1) is float32: given for a float64 model it failed inside the update op ("argument 'lr'
    has dtype torch.float32 but 'params' has torch.float64"), as did a rate left float32 by maml.double().
    It is cast to the weights' dtype, differentiably: the meta-gradient is that of the same rates in
    float64, and the rate's own gradient reaches it in its dtype."""
    model, support, query, rates = _setting()
    rates = {"one": rates[0, 0], "per-parameter": rates[0], "per-task": rates}[shape].detach()
    results = []
    for dtype in (torch.float32, torch.float64):
        rate = rates.to(torch.float32).to(dtype).requires_grad_()  # the same values in both dtypes
        maml = mk.MAML(model, inner_lr=rate, inner_steps=STEPS, inner_optimizer=inner_optimizer, **mode)
        grads = torch.autograd.grad(maml(_loss, support, query), [*model.parameters(), rate])
        results.append(grads)
    (*got, got_rate), (*want, want_rate) = results
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert got_rate.dtype == torch.float32
    torch.testing.assert_close(got_rate, want_rate.to(torch.float32))


def test_a_rate_tensor_keeps_working_after_the_maml_module_is_cast():
    model, support, query, _ = _setting()
    maml = mk.MAML(model.float(), inner_lr=torch.tensor(0.2), inner_steps=STEPS)
    maml.double()
    want = mk.MAML(model, inner_lr=float(torch.tensor(0.2)), inner_steps=STEPS)  # 0.2 rounded to float32
    torch.testing.assert_close(maml(_loss, support, query), want(_loss, support, query), rtol=1e-12, atol=0)
