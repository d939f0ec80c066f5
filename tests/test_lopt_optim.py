"""The torch.optim.Optimizer of a learned rule (``lopt.optimizer(params)``, metakernels/lopt_optim.py): its
step against the fused op, state_dict round trips, NaN policies, packed small tensors, in-place writes, the
per-group learning rate that LR schedulers drive and weight decay, and bad input."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import metakernels as mk
from conftest import ops_run


def test_optimizer_step_equals_update_and_state_roundtrips():
    torch.manual_seed(0)
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=1)
    a, b = torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))
    opt = lopt.optimizer([a, b])
    ga, gb = torch.randn(7, 3), torch.randn(5)
    a.grad, b.grad = ga.clone(), gb.clone()
    a0 = a.detach().clone()
    opt.step()
    with torch.no_grad():
        want, _ = lopt.update(a0.reshape(-1), ga.reshape(-1), lopt.initial_state(a0.reshape(-1)), 0)
    torch.testing.assert_close(a.detach().reshape(-1), want)
    saved = opt.state_dict()
    opt2 = lopt.optimizer([torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())])
    opt2.load_state_dict(saved)
    for p1, p2 in zip([a, b], opt2.param_groups[0]["params"]):
        s1, s2 = opt.state[p1], opt2.state[p2]
        assert s1["step"] == s2["step"] == 1
        assert torch.equal(s1["lopt_state"], s2["lopt_state"])


def test_optimizer_refuses_a_state_from_another_optimizer():
    w = torch.nn.Parameter(torch.randn(4))
    adam = torch.optim.Adam([w])
    w.grad = torch.ones(4)
    adam.step()
    opt = mk.LearnedOptimizer(hidden=4, layers=1).optimizer([w])
    with pytest.raises(ValueError, match="another optimizer"):
        opt.load_state_dict(adam.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_optimizer_nan_gradient_policy(policy, dtype, bad):
    w = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    v = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    opt = mk.LearnedOptimizer(hidden=4, layers=1).optimizer([w, v], nan_policy=policy)
    w.grad = torch.tensor([1.0, bad, 0.0, 1.0], dtype=dtype)
    v.grad = torch.ones(3, dtype=dtype)
    w0, v0 = w.detach().clone(), v.detach().clone()
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="parameter 0"):
            opt.step()
        assert torch.equal(v.detach(), v0)  # nothing was updated
    else:
        opt.step()
        assert torch.equal(w.detach(), w0) and not torch.equal(v.detach(), v0)


@pytest.mark.parametrize("copy_of", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_keeps_its_rule_and_policy_and_steps_as_the_original(copy_of, tmp_path):
    """torch.optim's copies carry defaults, state and param groups only: a copy lost the learned rule (its
    step raised AttributeError) and the NaN policy."""
    import copy
    import pickle

    model = torch.nn.Linear(5, 3)
    opt = mk.LearnedOptimizer(hidden=4, seed=0).optimizer(model.parameters(), nan_policy="skip")
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 5)).pow(2).sum().backward()
        opt.step()
    if copy_of == "deepcopy":
        copied_model, copied = copy.deepcopy((model, opt))
    elif copy_of == "pickle":
        copied_model, copied = pickle.loads(pickle.dumps((model, opt)))
    else:
        torch.save((model, opt), tmp_path / "both.pt")
        copied_model, copied = torch.load(tmp_path / "both.pt", weights_only=False)
    assert copied.nan_policy == "skip"
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (copied_model, copied)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        m.bias.grad[0] = float("nan")  # skipped under "skip"
        o.step()
    for p, q in zip(model.parameters(), copied_model.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"nan_policy must be one of \('raise', 'skip'\), got 'ignore'"):
        copied.nan_policy = "ignore"


def _step_alone(lopt, params, grads_per_step, **kwargs):
    """Steps each parameter with its own optimizer (one fused call each): the oracle of the packed step."""
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opts = [lopt.optimizer([p], **kwargs) for p in alone]
    for grads in grads_per_step:
        for p, opt, g in zip(alone, opts, grads):
            p.grad = None if g is None else g.clone()
            opt.step()
    return alone, opts


@pytest.mark.parametrize("hidden", [4, 32])
def test_optimizer_packs_small_tensors_with_the_per_tensor_result(hidden):
    """Small tensors of one step count and dtype step in one fused call, each its own segment: the same
    parameters and state, bit for bit, as stepping each alone; a large tensor, an empty one, a float64 one
    and one that missed a step (another step count) are stepped apart."""
    from metakernels.lopt_optim import PACK_UP_TO
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (33,), (PACK_UP_TO + 5,), (0,), (16, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(9, generator=gen, dtype=torch.float64)))
    steps = []
    for k in range(4):
        grads = [0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        if k == 0:
            grads[1] = None  # parameter 1 then lags one step behind the others
        if k == 3:  # parameter 0 alone: its state, a view of the last pack's, steps on its own
            grads = [g if i in (0, 3) else None for i, g in enumerate(grads)]
        steps.append(grads)
    lopt = mk.LearnedOptimizer(hidden=hidden, layers=2, seed=0)
    want, want_opts = _step_alone(lopt, params, steps)
    opt = lopt.optimizer(params)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    for p, q, q_opt in zip(params, want, want_opts):
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p]["step"] == q_opt.state[q]["step"]
        assert torch.equal(opt.state[p]["lopt_state"], q_opt.state[q]["lopt_state"])
    assert opt.state[params[1]]["step"] == 2 and opt.state[params[0]]["step"] == 4


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_optimizer_nan_gradient_inside_a_pack(policy):
    """A bad gradient among packed tensors: raise names it and updates nothing; skip steps the rest of the
    pack as if it were absent."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (6, 4, 5)]
    grads = [torch.randn(n, generator=gen) for n in (6, 4, 5)]
    grads[1][2] = float("nan")
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    opt = lopt.optimizer(params, nan_policy=policy)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="parameter 1 "):
            opt.step()
        assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)) and not opt.state
        return
    opt.step()
    assert torch.equal(params[1].detach(), before[1]) and not opt.state[params[1]]
    want, _ = _step_alone(lopt, [before[0], before[2]], [[grads[0], grads[2]]])
    assert torch.equal(params[0].detach(), want[0].detach()) and torch.equal(params[2].detach(), want[1].detach())


def test_optimizer_packed_state_saves_and_resumes(tmp_path):
    """The packed step keeps each tensor's state as a view of the call's output; saved with torch.save and
    loaded into a fresh optimizer, it resumes exactly."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (8, 3, 12)]
    lopt = mk.LearnedOptimizer(hidden=4, layers=2, seed=0)
    opt = lopt.optimizer(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = lopt.optimizer(copies)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for p, q in zip(params, copies):
        q.grad = p.grad.clone()
    opt.step()
    resumed.step()
    for p, q in zip(params, copies):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["lopt_state"], resumed.state[q]["lopt_state"])


def _sized_like(ran, p):
    """The names of the ATen ops in ran with an output of at least p's size."""
    return {name for name, _, outs in ran if any(o.numel() >= p.numel() for o in outs)}


def test_optimizer_writes_in_place_like_torch_optimizers():
    """A lone contiguous parameter and its state are overwritten by the kernel itself (same memory over
    three steps, the values of the out-of-place op); a non-contiguous parameter steps through a copy to
    the same values (one copy there); the version counter moves, so a graph that saved the parameter refuses to
    backpropagate afterwards, as it does after torch.optim.Adam's step."""
    gen = torch.Generator().manual_seed(2)
    lopt = mk.LearnedOptimizer(hidden=32, layers=2, seed=0)
    w = torch.nn.Parameter(torch.randn(60, 50, generator=gen))  # more elements than the MLP's weights
    wt = torch.nn.Parameter(w.detach().clone().t().contiguous().t())  # the same values, column-major
    opt, opt_t = lopt.optimizer([w]), lopt.optimizer([wt])
    p, s = w.detach().clone().reshape(-1), lopt.initial_state(w.detach().reshape(-1))
    ptr, state_ptrs = w.data_ptr(), set()
    for k in range(3):
        g = torch.randn(60, 50, generator=gen)
        w.grad, wt.grad = g.clone(), g.clone()
        _, ran = ops_run(opt.step)
        _, ran_t = ops_run(opt_t.step)
        if k > 0:  # after the first step, which allocates the state: views only, nothing written twice
            assert _sized_like(ran, w) <= {"detach", "view", "unsqueeze", "split_with_sizes"}
            assert sorted(_sized_like(ran_t, w) - _sized_like(ran, w)) == ["_unsafe_view", "clone"]
        with torch.no_grad():
            p, s = lopt.update(p, g.reshape(-1), s, k)
        state_ptrs.add(opt.state[w]["lopt_state"].data_ptr())
        assert w.data_ptr() == ptr and len(state_ptrs) == 1
        assert torch.equal(w.detach().reshape(-1), p) and torch.equal(opt.state[w]["lopt_state"], s)
        assert torch.equal(wt.detach(), w.detach()) and not wt.is_contiguous()
    w.grad = torch.randn(60, 50, generator=gen)
    x = torch.randn(50, requires_grad=True)
    saved = (w @ x).sum()  # saves w for the gradient of x
    opt.step()
    assert opt.state[w]["lopt_state"].data_ptr() in state_ptrs
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_optimizer_steps_an_empty_parameter():
    empty, w = torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.randn(5))
    opt = mk.LearnedOptimizer(hidden=4, layers=1).optimizer([empty, w])
    empty.grad, w.grad = torch.zeros(0), torch.ones(5)
    w0 = w.detach().clone()
    opt.step()
    assert empty.numel() == 0 and not torch.equal(w.detach(), w0)


def test_many_tensor_step_benchmark_runs():
    """benchmarks/lopt_step_tensors.py --quick: the table of the packed step prints (a smoke run)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(repo, "benchmarks", "lopt_step_tensors.py"), "--quick",
                           "--hidden", "4"], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": repo})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if "learned, small tensors packed" in line]
    assert len(rows) == 2 and "GPT d=64 x2, V=512" in done.stdout


def _op_steps(lopt, p0, grads, lr, weight_decay=0.0):
    """The oracle of the optimizer with lr and weight_decay: the fused op with step_mult * lr, then the
    decay, one tensor, step by step."""
    hyper = dataclasses.replace(lopt.hyper, step_mult=lopt.hyper.step_mult * lr)
    p, state = p0.reshape(-1), lopt.initial_state(p0.reshape(-1))
    with torch.no_grad():
        for k, g in enumerate(grads):
            p, state = mk.ops.learned_update(p, g.reshape(-1), state, lopt.flat_weights(k), hidden=lopt.hidden,
                                             layers=lopt.layers, hyper=hyper)
            p = (1 - lr * weight_decay) * p
    return p.view_as(p0)


def _one_step(lopt, p0, g, **rates):
    p = torch.nn.Parameter(p0.clone())
    opt = lopt.optimizer([p], **rates)
    p.grad = g.clone()
    opt.step()
    return p.detach(), opt.state[p]


@pytest.mark.parametrize("shape", [(37,), (130, 129)], ids=["packed", "alone"])
def test_lr_multiplies_the_learned_update_and_weight_decay_follows(shape):
    """The step with lr and weight_decay equals the fused op with step_mult * lr, times 1 - lr *
    weight_decay; without weight decay its displacement is lr times lr=1's; the state (the momenta, the
    step count) is the same whatever the rates are, lr 0 included."""
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    lopt = mk.LearnedOptimizer(hidden=8, layers=2, seed=0).double()
    unit, unit_state = _one_step(lopt, p0, g)
    assert not torch.equal(unit, p0)
    for lr, weight_decay in ((0.0, 0.0), (0.25, 0.0), (3.0, 0.0), (1.0, 0.01), (0.5, 0.2), (0.0, 0.3)):
        stepped, state = _one_step(lopt, p0, g, lr=lr, weight_decay=weight_decay)
        torch.testing.assert_close(stepped, _op_steps(lopt, p0, [g], lr, weight_decay), rtol=1e-14, atol=1e-15)
        if weight_decay == 0:
            torch.testing.assert_close(stepped - p0, lr * (unit - p0), rtol=1e-12, atol=1e-15)
        assert state["step"] == unit_state["step"] == 1
        assert torch.equal(state["lopt_state"], unit_state["lopt_state"])


def test_groups_with_their_own_rates_are_not_packed_together():
    """Small tensors in groups of different lr or weight_decay step in separate calls, each with its
    group's rates: the fused op's result with step_mult * lr, then the decay, tensor by tensor."""
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (6, 9, 4, 5)]
    grads = [[0.1 * torch.randn(p.shape, generator=gen) for p in params] for _ in range(3)]
    initial = [p.detach().clone() for p in params]
    lopt = mk.LearnedOptimizer(hidden=4, layers=2, seed=0)
    opt = lopt.optimizer([{"params": params[:2]}, {"params": params[2:3], "lr": 0.5},
                          {"params": params[3:], "weight_decay": 0.1}])
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for i, (p, rates) in enumerate(zip(params, [(1.0, 0.0), (1.0, 0.0), (0.5, 0.0), (1.0, 0.1)])):
        torch.testing.assert_close(p.detach(), _op_steps(lopt, initial[i], [gs[i] for gs in grads], *rates))


def test_lr_schedulers_drive_the_step():
    """torch.optim.lr_scheduler's schedulers set and read the groups' lr: a linear warmup from 0 (as trainers
    build one) steps exactly as setting each step's lr by hand; the first step, at lr 0, moves nothing; the
    scheduler's and the optimizer's state_dicts round-trip; ReduceLROnPlateau lowers it."""
    gen = torch.Generator().manual_seed(5)
    lopt = mk.LearnedOptimizer(hidden=4, layers=2, seed=0)
    w0 = torch.randn(300, generator=gen)
    grads = [torch.randn(300, generator=gen) for _ in range(5)]
    warmup = 4
    w, by_hand = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, opt_by_hand = lopt.optimizer([w]), lopt.optimizer([by_hand])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / warmup))
    for k, g in enumerate(grads):
        opt_by_hand.param_groups[0]["lr"] = min(1.0, k / warmup)
        assert opt.param_groups[0]["lr"] == opt_by_hand.param_groups[0]["lr"]
        w.grad, by_hand.grad = g.clone(), g.clone()
        opt.step()
        opt_by_hand.step()
        sched.step()
        if k == 0:
            assert torch.equal(w.detach(), w0) and opt.state[w]["step"] == 1
        assert torch.equal(w.detach(), by_hand.detach())
    assert not torch.equal(w.detach(), w0)

    resumed_w = torch.nn.Parameter(w.detach().clone())
    resumed = lopt.optimizer([resumed_w])
    resumed_sched = torch.optim.lr_scheduler.LambdaLR(resumed, lambda k: min(1.0, k / warmup))
    resumed.load_state_dict(opt.state_dict())
    resumed_sched.load_state_dict(sched.state_dict())
    assert resumed.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 1.0

    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    for loss in (1.0, 1.0, 1.0):
        plateau.step(loss)
    assert opt.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2.0, total_steps=6, cycle_momentum=False),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4),
    lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.1, total_iters=2),
                                                            torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3)], [2]),
], ids=["one_cycle", "warm_restarts", "sequential"])
def test_other_schedulers_step_as_their_lr_set_by_hand(make):
    """The schedulers the README names (OneCycleLR with cycle_momentum=False, as the rule has no momentum
    setting), each stepping exactly as its lr values set by hand."""
    gen = torch.Generator().manual_seed(8)
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    w0 = torch.randn(50, generator=gen)
    w, by_hand = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, opt_by_hand = lopt.optimizer([w]), lopt.optimizer([by_hand])
    sched = make(opt)
    rates = set()
    for _ in range(5):
        rate = opt.param_groups[0]["lr"]
        rates.add(rate)
        opt_by_hand.param_groups[0]["lr"] = rate
        g = torch.randn(50, generator=gen)
        w.grad, by_hand.grad = g.clone(), g.clone()
        opt.step()
        opt_by_hand.step()
        sched.step()
    assert torch.equal(w.detach(), by_hand.detach()) and len(rates) >= 3


def test_state_dict_from_before_groups_had_rates_loads():
    """A state_dict whose groups have no lr or weight_decay (saved before the optimizer had them) loads
    with this optimizer's defaults."""
    w = torch.nn.Parameter(torch.randn(5))
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    opt = lopt.optimizer([w])
    w.grad = torch.ones(5)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["lr"], group["weight_decay"]
    resumed = lopt.optimizer([torch.nn.Parameter(w.detach().clone())], lr=0.5, weight_decay=0.1)
    resumed.load_state_dict(saved)
    group = resumed.param_groups[0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.1 and resumed.state[group["params"][0]]["step"] == 1
    resumed.step()


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "fast", torch.ones(2)], ids=repr)
@pytest.mark.parametrize("key", ["lr", "weight_decay"])
def test_bad_rates_are_refused_where_they_are_set(key, value):
    """A negative, non-finite or non-numeric lr or weight_decay: at construction, in add_param_group (the
    group is not added), and at step when set on a group afterwards (nothing is updated)."""
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    w = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=f"argument '{key}' must be a finite number >= 0"):
        lopt.optimizer([w], **{key: value})
    opt = lopt.optimizer([w])
    with pytest.raises(ValueError, match=f"parameter group 1's {key} must be a finite number >= 0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], key: value})
    assert len(opt.param_groups) == 1
    opt.param_groups[0][key] = value
    w.grad = torch.ones(5)
    w0 = w.detach().clone()
    with pytest.raises(ValueError, match=f"parameter group 0's {key}"):
        opt.step()
    assert torch.equal(w.detach(), w0) and not opt.state


def test_a_one_element_tensor_lr_works():
    """Schedulers may hold lr as a tensor (torch.optim allows it): a one-element tensor is read as its value."""
    w, v = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    opt, opt_float = lopt.optimizer([w], lr=torch.tensor(0.5)), lopt.optimizer([v], lr=0.5)
    v.data.copy_(w.detach())
    w.grad, v.grad = torch.ones(5), torch.ones(5)
    opt.step()
    opt_float.step()
    assert torch.equal(w.detach(), v.detach())


@pytest.mark.parametrize("size", [5, 100_000], ids=["packed", "alone"])
def test_errors_name_a_named_parameter(size):
    """Given named parameters (torch.optim's param_names), the messages name the tensor, in any group."""
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, size))
    opt = lopt.optimizer(model[0].named_parameters(prefix="0"))
    opt.add_param_group({"params": list(model[1].named_parameters(prefix="1")), "lr": 0.5})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].bias.grad[-1] = float("inf")
    with pytest.raises(FloatingPointError, match=rf"the gradient of parameter 3 \('1.bias', shape \[{size}\]\) has "
                                                 "NaN or Inf"):
        opt.step()
    assert not opt.state
    z = torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"parameter 4 \('z', shape \[2\]\) has dtype torch.complex64"):
        opt.add_param_group({"params": [("z", z)]})


def test_non_floating_parameters_are_refused():
    """A complex parameter is named with its dtype when it is given, not at the first step."""
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    w = torch.nn.Parameter(torch.randn(5))
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"parameter 1 \(shape \[3\]\) has dtype torch.complex64"):
        lopt.optimizer([w, z])
    opt = lopt.optimizer([w])
    with pytest.raises(TypeError, match=r"parameter 1 \(shape \[3\]\) has dtype torch.complex64"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("size", [100, 100_000], ids=["packed", "alone"])
def test_a_gradient_of_another_dtype_is_refused_before_anything_is_updated(size):
    """A bfloat16 parameter whose grad_dtype was set to None may hold a float32 gradient: the step names it
    before stepping the parameters ahead of it (the fused op's own error came after them, mid-step)."""
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, seed=0)
    first = torch.nn.Parameter(torch.randn(100_000))
    first.grad = torch.randn(100_000)
    low = torch.nn.Parameter(torch.randn(size, dtype=torch.bfloat16))
    low.grad_dtype = None
    low.grad = torch.randn(size)
    opt = lopt.optimizer([first, low])
    first_before = first.detach().clone()
    with pytest.raises(TypeError, match=rf"gradient of parameter 1 \(shape \[{size}\]\) has dtype torch.float32, "
                                        r"expected the parameter's torch.bfloat16"):
        opt.step()
    assert torch.equal(first.detach(), first_before) and not opt.state


def test_the_step_under_torch_compile_equals_eager():
    """torch.compile(opt.step), as compiled training loops wrap it: the same parameters and state, bit for
    bit, as the eager step, over three steps with an lr and a weight decay (Dynamo breaks the graph at the
    NaN check's host read and the fused op; what it compiles around them must not change the result)."""
    gen = torch.Generator().manual_seed(6)
    initial = [torch.randn(40, 30, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in initial] for _ in range(3)]
    lopt = mk.LearnedOptimizer(hidden=4, layers=2, seed=0)

    def run(wrap):
        params = [torch.nn.Parameter(p.clone()) for p in initial]
        opt = lopt.optimizer(params, lr=0.5, weight_decay=0.1)
        step = wrap(opt.step)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            step()
        return params, opt

    torch._dynamo.reset()
    try:
        compiled, compiled_opt = run(torch.compile)
    finally:
        torch._dynamo.reset()
    eager, eager_opt = run(lambda step: step)
    for p, q, p0 in zip(compiled, eager, initial):
        assert torch.equal(p.detach(), q.detach()) and not torch.equal(q.detach(), p0)
        assert compiled_opt.state[p]["step"] == eager_opt.state[q]["step"] == 3
        assert torch.equal(compiled_opt.state[p]["lopt_state"], eager_opt.state[q]["lopt_state"])
