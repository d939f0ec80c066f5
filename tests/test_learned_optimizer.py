"""LearnedOptimizer: meta-gradients of K-step unrolls against a sequential create_graph oracle (float64,
transformer LM with LayerNorm, attention, embeddings, GELU), the torch.optim.Optimizer it returns, and
its initial rule."""
import os
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call

import metakernels as mk
from conftest import ops_run, triton_interpreted
from metakernels.models import TransformerLM, lm_loss

VOCAB, SEQ = 11, 7


def _model():
    torch.manual_seed(0)
    return TransformerLM(vocab=VOCAB, d_model=16, n_heads=2, n_layers=2, max_len=8).double()


def _lopt(hidden=8, layers=2):
    hyper = mk.ops.LoptHyper(step_mult=0.05, exp_mult=0.3)
    lopt = mk.LearnedOptimizer(hidden=hidden, layers=layers, hyper=hyper, init="random", seed=0).double()
    return lopt


def _batches(T, K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen) for _ in range(K)]


def sequential_unroll_meta_loss(lopt, model, batches, K, first_order, query=None):
    """Per task, per step: torch.autograd.grad(create_graph=True) of that task's loss, then the learned
    step of the reference backend on the task's flat [P] weights (tensors as segments)."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    T = batches[0].shape[0]
    total = 0
    with mk.use_backend("reference"):
        for t in range(T):
            flat = torch.cat([params[n].detach().reshape(-1) for n in names]).requires_grad_()
            state = torch.zeros(4, flat.numel(), dtype=flat.dtype)
            terms = []

            def loss_at(w, batch):
                chunks = dict(zip(names, [c.view_as(params[n]) for n, c in zip(names, w.split(sizes))]))
                return lm_loss(lambda *a: functional_call(model, chunks, a), batch[t])

            for k in range(K):
                loss = loss_at(flat, batches[k])
                if k > 0:
                    terms.append(loss)
                (g,) = torch.autograd.grad(loss, flat, create_graph=not first_order, retain_graph=True)
                flat, state = mk.ops.learned_update(flat, g, state, lopt.flat_weights(k), hidden=lopt.hidden,
                                                    layers=lopt.layers, segments=sizes, hyper=lopt.hyper)
            if query is None:
                terms.append(loss_at(flat, batches[-1]))
                total = total + sum(terms) / K
            else:
                total = total + loss_at(flat, query)
    return total / T


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
@pytest.mark.parametrize("meta_loss", ["inner", "query"])
@pytest.mark.parametrize("T,K", [(1, 1), (3, 2)])
def test_unroll_meta_gradient_matches_sequential_reference(backend, first_order, meta_loss, T, K):
    name, device = backend
    if device.type != "cpu":
        pytest.skip("the model runs on CPU here")
    if triton_interpreted(name) and (T, K) != (1, 1):
        pytest.skip("the Triton interpreter takes minutes here; the op's own tests cover its kernels at every size")
    model, lopt = _model(), _lopt()
    batches = _batches(T, K)
    query = _batches(T, 1, seed=7)[0] if meta_loss == "query" else None
    trainer = mk.LearnedOptimizerTrainer(lopt, model, first_order=first_order)
    result = trainer.unroll(lm_loss, batches, K, meta_loss=meta_loss, query=query)
    got = torch.autograd.grad(result.meta_loss, list(lopt.parameters()), allow_unused=True)
    want_loss = sequential_unroll_meta_loss(lopt, model, batches, K, first_order, query)
    want = torch.autograd.grad(want_loss, list(lopt.parameters()), allow_unused=True)
    torch.testing.assert_close(result.meta_loss, want_loss, rtol=1e-12, atol=1e-12)
    for (pname, _), g, w in zip(lopt.named_parameters(), got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0, pname
            continue
        scale = w.abs().max().clamp_min(1e-12)
        assert (g - w).abs().max() <= 1e-9 * scale, (pname, (g - w).abs().max().item(), scale.item())
    assert result.losses.shape == (K + 1, T)


def test_second_order_differs_from_first_order():
    """The Hessian terms matter on this model: the two meta-gradients are not equal."""
    model, lopt = _model(), _lopt()
    batches = _batches(2, 2)
    grads = []
    for first_order in (False, True):
        result = mk.LearnedOptimizerTrainer(lopt, model, first_order=first_order).unroll(lm_loss, batches, 2)
        grads.append(torch.autograd.grad(result.meta_loss, lopt.w_in))
    assert not torch.allclose(grads[0][0], grads[1][0], rtol=1e-6)


def test_truncated_unrolls_continue_where_they_stopped():
    model, lopt = _model(), _lopt()
    batches = _batches(2, 4)
    trainer = mk.LearnedOptimizerTrainer(lopt, model)
    whole = trainer.unroll(lm_loss, batches, 4, track_meta_gradient=False)
    first = trainer.unroll(lm_loss, batches[:2], 2, track_meta_gradient=False)
    second = trainer.unroll(lm_loss, batches[2:], 2, state=first.state, track_meta_gradient=False)
    assert second.state.step == 4
    torch.testing.assert_close(second.state.fast, whole.state.fast, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second.losses[-1], whole.losses[-1], rtol=1e-12, atol=1e-12)
    assert not second.meta_loss.requires_grad


def test_unroll_bad_input():
    model, lopt = _model(), _lopt()
    trainer = mk.LearnedOptimizerTrainer(lopt, model)
    batches = _batches(2, 2)
    with pytest.raises(ValueError, match="one per step"):
        trainer.unroll(lm_loss, batches, 3)
    with pytest.raises(ValueError, match="query"):
        trainer.unroll(lm_loss, batches, 2, meta_loss="query")
    with pytest.raises(ValueError, match="tasks"):
        trainer.unroll(lm_loss, batches, 2, meta_loss="query", query=_batches(3, 1)[0])
    with pytest.raises(ValueError, match="step_weights"):
        trainer.unroll(lm_loss, batches, 2, step_weights=[1.0])
    with pytest.raises(TypeError, match="LearnedOptimizer"):
        mk.LearnedOptimizerTrainer(object(), model)


def test_nan_inner_loss_names_task_and_step():
    model, lopt = _model(), _lopt()
    trainer = mk.LearnedOptimizerTrainer(lopt, model)

    def loss_fn(f, batch):
        loss = lm_loss(f, batch)
        return loss * torch.where(batch[0, 0] == 3, float("nan"), 1.0)

    batch = _batches(3, 1)[0]
    batch[:, 0, 0] = 0
    batch[1, 0, 0] = 3
    with pytest.raises(FloatingPointError, match="task 1 at inner step 0"):
        trainer.unroll(loss_fn, batch, 2)


def test_adam_init_descends_like_normalised_adam():
    """The default initial rule moves every parameter against its momentum: loss goes down."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50, 30))
    target = torch.randn(50, 30)
    lopt = mk.LearnedOptimizer(hidden=8, layers=2, seed=0)
    opt = lopt.optimizer([w])
    before = ((w - target) ** 2).mean().item()
    for _ in range(20):
        opt.zero_grad()
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
    after = ((w - target) ** 2).mean().item()
    assert after < before
    step = (lopt.hyper.step_mult * 20)
    assert before - after > 0.5 * step  # it moved at about the configured step size, not a tiny fraction


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


def test_learned_optimizer_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        mk.LearnedOptimizer(hidden=0)
    with pytest.raises(ValueError, match="layers"):
        mk.LearnedOptimizer(layers=7)
    with pytest.raises(ValueError, match="init"):
        mk.LearnedOptimizer(init="zeros")
    with pytest.raises(ValueError, match="step"):
        mk.LearnedOptimizer(hidden=4).update(torch.zeros(3), torch.zeros(3), torch.zeros(4, 3), -1)


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
