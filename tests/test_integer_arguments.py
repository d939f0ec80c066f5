"""Counts, steps, sizes and seeds (ops._checks.require_int and require_seed): a numpy integer or an integer 0-d
tensor is taken as the int it holds, everywhere such an argument is, and gives what the Python int gives; a
bool, float or str is refused with a message that names the argument and the value."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import metakernels as mk
from metakernels.data.episodes import EpisodeSampler
from metakernels.data.lm_tasks import LMTaskSampler
from metakernels.ops._checks import require_int, require_seed
from metakernels.training.config import TrainConfig

INTEGERS = [np.int64(3), np.int32(3), np.uint8(3), torch.tensor(3)]


@pytest.mark.parametrize("value", [3, *INTEGERS])
def test_require_int_returns_a_python_int(value):
    got = require_int("count", value, 1)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value,low,high,note,message", [
    (0, 1, None, "", "count must be an int >= 1, got 0"),
    (True, 0, None, "", "count must be an int >= 0, got True"),
    (2.0, 0, None, "", "count must be an int >= 0, got 2.0"),
    ("2", 0, None, "", "count must be an int >= 0, got '2'"),
    (torch.tensor(2.0), 0, None, "", "count must be an int >= 0, got tensor(2.)"),
    (9, 1, 8, "", "count must be an int in [1, 8], got 9"),
    (-1, 0, None, " (0-based)", "count must be an int >= 0 (0-based), got -1"),
])
def test_require_int_refuses_naming_the_value(value, low, high, note, message):
    with pytest.raises(ValueError) as info:
        require_int("count", value, low, high, note)
    assert str(info.value) == message


@pytest.mark.parametrize("seed", [None, 7, np.int64(7), torch.tensor(7)])
def test_require_seed_returns_an_int_or_none(seed):
    got = require_seed("here", seed)
    assert got == (None if seed is None else 7) and type(got) is (type(None) if seed is None else int)


def _regression(T=3, dim=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, 6, dim, generator=gen, dtype=torch.float64)
    return model, (x, x.sum(-1, keepdim=True))


def _mse(f, batch):
    return ((f(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("integer", INTEGERS)
def test_maml_takes_numpy_and_tensor_counts(integer):
    model, batch = _regression()
    expected = mk.MAML(model, inner_lr=0.1, inner_steps=3, task_chunk=3)(_mse, batch, batch)
    maml = mk.MAML(model, inner_lr=0.1, inner_steps=integer, task_chunk=integer)
    assert type(maml.inner_steps) is int and type(maml.task_chunk) is int
    torch.testing.assert_close(maml(_mse, batch, batch), expected, rtol=0, atol=0)
    adapted = maml.adapt(_mse, batch, steps=integer)
    torch.testing.assert_close(adapted.fast, maml.adapt(_mse, batch, steps=3).fast, rtol=0, atol=0)


@pytest.mark.parametrize("integer", INTEGERS)
def test_learned_optimizer_takes_numpy_and_tensor_counts(integer):
    expected = mk.LearnedOptimizer(hidden=3, layers=3, seed=3)
    lopt = mk.LearnedOptimizer(hidden=integer, layers=integer, seed=integer)
    assert type(lopt.hidden) is int and type(lopt.layers) is int
    for a, b in zip(lopt.parameters(), expected.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(lopt.flat_weights(integer), expected.flat_weights(3), rtol=0, atol=0)
    p, g = torch.randn(2, 10), torch.randn(2, 10)
    s = lopt.initial_state(p)
    for a, b in zip(lopt.update(p, g, s, integer), expected.update(p, g, s, 3)):
        assert torch.equal(a, b)
    weights = expected.flat_weights(0).detach()
    for a, b in zip(mk.ops.learned_update(p, g, s, weights, hidden=integer, layers=integer),
                    mk.ops.learned_update(p, g, s, weights, hidden=3, layers=3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("integer", INTEGERS)
def test_unroll_and_es_take_numpy_and_tensor_counts(integer):
    model, batch = _regression()
    lopt = mk.LearnedOptimizer(hidden=4, seed=0).double()
    trainer = mk.LearnedOptimizerTrainer(lopt, model)
    expected = trainer.unroll(_mse, batch, 3).meta_loss
    torch.testing.assert_close(trainer.unroll(_mse, batch, integer).meta_loss, expected, rtol=0, atol=0)
    grads = []
    for pairs, seed in ((3, 3), (integer, integer)):
        lopt.zero_grad()
        mk.ESEstimator(trainer, sigma=1e-3, pairs=pairs, seed=seed).estimate(_mse, batch, steps=1)
        grads.append([p.grad.clone() for p in lopt.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("integer", INTEGERS)
def test_ops_take_numpy_and_tensor_counts(integer):
    p, g, m, v = torch.randn(2, 7), torch.randn(2, 7), torch.randn(2, 7), torch.rand(2, 7)
    for a, b in zip(mk.ops.adam_update(p, g, m, v, integer, 0.1), mk.ops.adam_update(p, g, m, v, 3, 0.1)):
        assert torch.equal(a, b)
    qkv = torch.randn(5, 18)
    assert torch.equal(mk.ops.causal_attention(qkv, integer), mk.ops.causal_attention(qkv, 3))
    h, w, targets = torch.randn(7, 4), torch.randn(6, 4), torch.randint(0, 6, (7,))
    assert torch.equal(mk.ops.linear_cross_entropy(h, w, None, targets, chunk_rows=integer),
                       mk.ops.linear_cross_entropy(h, w, None, targets, chunk_rows=3))


@pytest.mark.parametrize("integer", INTEGERS)
def test_samplers_take_numpy_and_tensor_counts_and_seeds(integer):
    domains = {name: "".join(f"{name}{i:05d}\n" for i in range(100)) for name in ("ab", "cd", "ef", "gh")}
    lm, lm_int = (LMTaskSampler(domains, n_support=n, n_query=n, seq_len=n, seed=n) for n in (integer, 3))
    first, second = lm.batch(integer, integer), lm_int.batch(3, 3)
    assert torch.equal(first.support, second.support) and torch.equal(first.query, second.query)
    classes = {name: [f"{k}{name}" for k in range(1, 9)] for name in ("ab", "cd", "ef", "gh")}
    ep, ep_int = (EpisodeSampler(classes, n_way=n, k_shot=n, n_query=n, max_len=n, seed=n) for n in (integer, 3))
    first, second = ep.batch(integer, integer), ep_int.batch(3, 3)
    assert torch.equal(first.support[0], second.support[0]) and torch.equal(first.query[1], second.query[1])


def test_train_config_stores_python_ints():
    config = TrainConfig(steps=np.int64(5), inner_steps=np.int32(2), seed=np.int64(4))
    assert (config.steps, config.inner_steps, config.seed) == (5, 2, 4)
    json.dumps(config.to_dict())  # a numpy integer there would not serialise


@pytest.mark.parametrize("build,message", [
    (lambda: mk.MAML(nn.Linear(2, 1), inner_steps=np.float64(2.0)), "inner_steps must be an int >= 0, got"),
    (lambda: mk.MAML(nn.Linear(2, 1), task_chunk=torch.tensor(2.0)), "task_chunk must be an int >= 1 or None, got"),
    (lambda: mk.LearnedOptimizer(hidden=np.bool_(True)), "LearnedOptimizer: argument 'hidden' must be an int in [1,"),
    (lambda: TrainConfig(seed=1.5), "seed must be an int, got 1.5"),
])
def test_non_integers_are_refused_naming_the_argument(build, message):
    with pytest.raises((ValueError, TypeError)) as info:
        build()
    assert message in str(info.value)
