"""On/off settings (ops._checks.require_bool): a flag is True or False (a numpy bool is taken as the bool
it holds), never read by truthiness, so a "false" from a config file or a 0/1 is refused with a message
naming the flag instead of silently switching it on or off."""
import numpy as np
import pytest
import torch
from torch import nn

import metakernels as mk
from metakernels import compat
from metakernels.ops._checks import require_bool


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _loss(f, batch):
    x, y = batch
    return (f(x) - y).pow(2).mean()


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (np.bool_(True), True),
                                            (np.bool_(False), False)])
def test_require_bool_returns_a_python_bool(value, expected):
    got = require_bool("flag", value)
    assert got is expected


@pytest.mark.parametrize("value,none_ok,message", [
    ("false", False, "flag must be True or False, got 'false'"),
    (0, False, "flag must be True or False, got 0"),
    (1.0, False, "flag must be True or False, got 1.0"),
    (None, False, "flag must be True or False, got None"),
    (torch.tensor(True), True, "flag must be True or False or None, got tensor(True)"),
])
def test_require_bool_refuses_naming_the_value(value, none_ok, message):
    with pytest.raises(TypeError) as info:
        require_bool("flag", value, none_ok=none_ok)
    assert str(info.value) == message


BUILDERS = {
    "MAML.first_order": lambda v: mk.MAML(_model(), first_order=v),
    "MAML.fused_layers": lambda v: mk.MAML(_model(), fused_layers=v),
    "MAML.vectorize": lambda v: mk.MAML(_model(), vectorize=v),
    "MetaSGD.first_order": lambda v: mk.MetaSGD(_model(), first_order=v),
    "LearnedOptimizerTrainer.first_order": lambda v: mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4), _model(),
                                                                              first_order=v),
    "LearnedOptimizerTrainer.vectorize": lambda v: mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4), _model(),
                                                                            vectorize=v),
    "LearnedOptimizerTrainer.unroll.track_meta_gradient": lambda v: mk.LearnedOptimizerTrainer(
        mk.LearnedOptimizer(hidden=4), _model()).unroll(_loss, (torch.randn(2, 5, 3), torch.randn(2, 5, 2)), steps=1,
                                                        track_meta_gradient=v),
    "ESEstimator.persistent": lambda v: mk.ESEstimator(mk.LearnedOptimizerTrainer(mk.LearnedOptimizer(hidden=4),
                                                                                  _model()), persistent=v),
    "compat.MAML.first_order": lambda v: compat.MAML(_model(), lr=0.1, first_order=v),
    "compat.MAML.allow_unused": lambda v: compat.MAML(_model(), lr=0.1, allow_unused=v),
    "compat.MAML.allow_nograd": lambda v: compat.MAML(_model(), lr=0.1, allow_nograd=v),
    "compat.MAML.clone": lambda v: compat.MAML(_model(), lr=0.1).clone(first_order=v),
    "compat.MetaSGD.first_order": lambda v: compat.MetaSGD(_model(), lr=0.1, first_order=v),
}


@pytest.mark.parametrize("where", BUILDERS)
def test_every_flag_refuses_a_string(where):
    flag = where.rsplit(".", 1)[1]
    flag = "first_order" if flag == "clone" else flag
    with pytest.raises(TypeError, match=f"^{flag} must be True or False(?: or None)?, got 'false'$"):
        BUILDERS[where]("false")


@pytest.mark.parametrize("where", BUILDERS)
def test_every_flag_takes_a_numpy_bool(where):
    BUILDERS[where](np.bool_(False))


def test_a_numpy_bool_gives_what_the_bool_gives():
    torch.manual_seed(0)
    batch = (torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64))
    grads = []
    for flag in (True, np.bool_(True)):
        model = _model().double()
        torch.manual_seed(1)
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        maml = mk.MAML(model, inner_lr=0.1, inner_steps=2, first_order=flag)
        assert maml.first_order is True
        maml(_loss, batch, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_compat_adapt_refuses_a_string_flag():
    maml = compat.MAML(_model(), lr=0.1)
    learner = maml.clone()
    loss = _loss(learner, (torch.randn(5, 3), torch.randn(5, 2)))
    with pytest.raises(TypeError, match="^allow_unused must be True or False, got 'yes'$"):
        learner.adapt(loss, allow_unused="yes")
