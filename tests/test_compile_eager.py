"""Meta-algorithms under torch.compile: ``torch.compile(maml)``, a compiled training step that calls it,
a compiled learned-optimizer unroll and a compiled ES estimate give the eager values and meta-gradients,
each call run eagerly as a graph break (:mod:`metakernels.eager_under_compile`).  Measured on the old
code: the compiled backward of MAML (second and first order, vmap or loop) stopped on an inductor stride
assertion, the compiled unroll on an in-place operation on a leaf, and a compiled ES estimate, which
restores the random-number state around each particle, came out 0.13 from the eager one."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import metakernels as mk


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 1))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 4, 5, generator=gen), torch.randn(3, 4, 1, generator=gen)) for _ in range(2)]


def _loss(f, batch):
    return ((f(batch[0]) - batch[1]) ** 2).mean()


def _loss_and_grads(run, parameters):
    loss = run()
    return loss.detach(), torch.autograd.grad(loss, parameters)


def _assert_same(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    for c, e in zip(compiled[1], eager[1]):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(), dict(first_order=True), dict(vectorize=False), dict(memory="low"),
                                    dict(task_chunk=2)], ids=["second-order", "first-order", "loop", "low", "chunk"])
@pytest.mark.parametrize("algorithm", [mk.MAML, mk.MetaSGD])
def test_a_compiled_maml_gives_the_eager_loss_and_meta_gradients(algorithm, kwargs):
    support, query = _batches()
    maml = algorithm(_model(), inner_lr=0.1, inner_steps=2, **kwargs)
    parameters = list(maml.parameters())
    eager = _loss_and_grads(lambda: maml(_loss, support, query), parameters)
    compiled_maml = torch.compile(maml)
    compiled = _loss_and_grads(lambda: compiled_maml(_loss, support, query), parameters)
    _assert_same(eager, compiled)


def test_a_compiled_training_step_that_calls_maml_matches_the_eager_step():
    support, query = _batches()

    def train(step_fn_of):
        maml = mk.MAML(_model(), inner_lr=0.1, inner_steps=2)
        opt = torch.optim.SGD(maml.parameters(), lr=0.05)

        def step():
            opt.zero_grad()
            loss = maml(_loss, support, query)
            loss.backward()
            opt.step()
            return loss.detach()

        run = step_fn_of(step)
        losses = [run() for _ in range(3)]
        return torch.stack(losses), [p.detach() for p in maml.parameters()]

    eager_losses, eager_params = train(lambda step: step)
    compiled_losses, compiled_params = train(torch.compile)
    # the first step starts from the same weights; the SGD update is compiled by inductor, whose rounding may
    # differ from eager's by an ulp (it does on a Zen 4 EPYC host), and the later steps start from its weights
    torch.testing.assert_close(compiled_losses[0], eager_losses[0], rtol=0, atol=0)
    torch.testing.assert_close(compiled_losses[1:], eager_losses[1:], rtol=1e-6, atol=1e-7)
    for c, e in zip(compiled_params, eager_params):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_compiled_learned_optimizer_unroll_gives_the_eager_meta_gradient(first_order):
    support, query = _batches()
    torch.manual_seed(2)
    lopt = mk.LearnedOptimizer()
    trainer = mk.LearnedOptimizerTrainer(lopt, _model(), first_order=first_order)
    parameters = list(lopt.parameters())
    unroll = lambda run: run(_loss, [support, query], 2, meta_loss="query", query=query).meta_loss  # noqa: E731
    eager = _loss_and_grads(lambda: unroll(trainer.unroll), parameters)
    compiled = _loss_and_grads(lambda: unroll(torch.compile(trainer.unroll)), parameters)
    _assert_same(eager, compiled)


def test_a_compiled_es_estimate_gives_the_eager_estimate():
    support, _ = _batches()
    torch.manual_seed(2)
    lopt = mk.LearnedOptimizer()
    es = mk.ESEstimator(mk.LearnedOptimizerTrainer(lopt, _model()), sigma=0.01, pairs=2)

    def estimate(run):
        lopt.zero_grad()
        torch.manual_seed(3)
        result = run(_loss, support, 2)
        return result.meta_loss, [p.grad.clone() for p in lopt.parameters()]

    _assert_same(estimate(es.estimate), estimate(torch.compile(es.estimate)))


def test_importing_metakernels_does_not_import_dynamo():
    code = "import sys, metakernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
