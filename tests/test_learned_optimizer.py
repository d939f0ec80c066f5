"""LearnedOptimizer: meta-gradients of K-step unrolls against a sequential create_graph oracle (float64,
transformer LM with LayerNorm, attention, embeddings, GELU) and its initial rule (the torch.optim.Optimizer it
returns: test_lopt_optim.py)."""
import pytest
import torch
from torch.func import functional_call

import metakernels as mk
from conftest import triton_interpreted
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


@pytest.mark.parametrize("vectorize", [None, False], ids=["vmap", "loop"])
def test_second_order_unroll_names_a_layer_without_double_backward(vectorize):
    """Before, the unroll ran and .backward() failed in torch ("the derivative for '_embedding_bag_backward'
    is not implemented"); now the unroll names the node, as second-order MAML does.  First order runs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(VOCAB, 4), torch.nn.Linear(4, 3)).double()
    batch = (torch.randint(0, VOCAB, (2, 3, 5)), torch.randint(0, 3, (2, 3)))
    loss_fn = lambda f, b: torch.nn.functional.cross_entropy(f(b[0]), b[1])  # noqa: E731
    trainer = mk.LearnedOptimizerTrainer(_lopt(), model, vectorize=vectorize)
    with pytest.raises(RuntimeError, match=r"the learned optimizer's second-order unroll differentiates the inner "
                                           r"gradients, .*EmbeddingBagBackwardBackward0.*first_order=True"):
        trainer.unroll(loss_fn, batch, 2)
    with torch.no_grad():  # no meta-gradient: no second order, nothing to refuse
        trainer.unroll(loss_fn, batch, 2)
    trainer.first_order = True
    trainer.unroll(loss_fn, batch, 2).meta_loss.backward()


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
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")], [float("inf"), 1.0]):
        with pytest.raises(ValueError, match="step_weights must be 2 finite non-negative numbers"):
            trainer.unroll(lm_loss, batches, 2, step_weights=bad)
    with pytest.raises(TypeError, match="LearnedOptimizer"):
        mk.LearnedOptimizerTrainer(object(), model)


def test_unroll_refuses_a_state_init_or_batches_that_do_not_fit():
    """What an unroll starts from, and the batches beside it, are checked before any step runs: a state from
    another model, task count, dtype or a bad step; an init of another dtype; per-step batches with another
    task count; a query batch that meta_loss='inner' would silently ignore."""
    model, lopt = _model(), _lopt()
    trainer = mk.LearnedOptimizerTrainer(lopt, model)
    batches = _batches(2, 2)
    P = trainer.layout.numel
    good = trainer.unroll(lm_loss, batches, 2, track_meta_gradient=False).state
    other_model = mk.LearnedOptimizerTrainer(lopt, torch.nn.Linear(3, 2).double()).initial_state(2)
    bad_states = {
        rf"state.fast must be \[2, {P}\].*got \[2, 8\]": other_model,
        rf"state.fast must be \[2, {P}\].*got \[3, {P}\]": trainer.initial_state(3),
        rf"state.opt_state must be \[4, 2, {P}\], got \[3, 2, {P}\]":
            mk.lopt_training.UnrollState(good.fast, good.opt_state[:3], good.step),
        "state.fast is torch.float32 on cpu; the model's adapted parameters are torch.float64 on cpu":
            mk.lopt_training.UnrollState(good.fast.float(), good.opt_state, good.step),
        "state.step must be an int >= 0, got -1": mk.lopt_training.UnrollState(good.fast, good.opt_state, -1),
        "state must be an UnrollState": (good.fast, good.opt_state, good.step),
    }
    for message, state in bad_states.items():
        with pytest.raises((TypeError, ValueError), match=message):
            trainer.unroll(lm_loss, batches, 2, state=state)
    with pytest.raises(TypeError, match="init is torch.float32 on cpu; the model's adapted parameters are torch.float64"):
        trainer.initial_state(2, init=torch.zeros(P))
    with pytest.raises(ValueError, match=r"support\[1\] has T=3 tasks, support\[0\] has T=2"):
        trainer.unroll(lm_loss, [batches[0], _batches(3, 1)[0]], 2)
    with pytest.raises(ValueError, match="meta_loss='inner' does not use it"):
        trainer.unroll(lm_loss, batches, 2, query=_batches(2, 1)[0])


@pytest.mark.parametrize("meta_loss", ["inner", "query"])
def test_unroll_under_no_grad_takes_inner_gradients_only(meta_loss):
    support, query = _batches(3, 2)
    trainer = mk.LearnedOptimizerTrainer(_lopt(), _model())
    query = query if meta_loss == "query" else None
    tracked = trainer.unroll(lm_loss, support, steps=2, meta_loss=meta_loss, query=query)
    with torch.no_grad():
        evaluated = trainer.unroll(lm_loss, support, steps=2, meta_loss=meta_loss, query=query)
    assert tracked.meta_loss.requires_grad and not evaluated.meta_loss.requires_grad
    torch.testing.assert_close(evaluated.meta_loss, tracked.meta_loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(evaluated.state.fast, tracked.state.fast, rtol=1e-12, atol=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"LearnedOptimizerTrainer.unroll: .*inference_mode"):
        trainer.unroll(lm_loss, support, steps=1)


def test_nan_inner_loss_names_task_and_step():
    model, lopt = _model(), _lopt()
    trainer = mk.LearnedOptimizerTrainer(lopt, model)

    def loss_fn(f, batch):
        loss = lm_loss(f, batch)
        return loss * torch.where(batch[0, 0] == 3, float("nan"), 1.0)

    batch = _batches(3, 1)[0]
    batch[:, 0, 0] = 0
    batch[1, 0, 0] = 3
    with pytest.raises(FloatingPointError, match="inner loss is nan for task 1 at inner step 0; lower the learned "
                                                 r"optimizer's step_mult \(mk.ops.LoptHyper\)"):
        trainer.unroll(loss_fn, batch, 2)


def test_nan_query_loss_is_named_a_query_loss():
    """The final loss of meta_loss='query' is the query batch's (before, it was reported as an inner loss,
    with MAML's advice to lower an inner_lr the trainer does not have)."""
    model, lopt = _model(), _lopt()
    trainer = mk.LearnedOptimizerTrainer(lopt, model)

    def loss_fn(f, batch):
        return lm_loss(f, batch) * torch.where(batch[0, 0] == 3, float("inf"), 1.0)

    support, query = _batches(3, 2)
    support[:, 0, 0], query[:, 0, 0] = 0, 0
    query[2, 0, 0] = 3
    with pytest.raises(FloatingPointError, match="query loss is inf for task 2 at inner step 2; lower the learned"):
        trainer.unroll(loss_fn, support, 2, query=query, meta_loss="query")


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


def test_learned_optimizer_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        mk.LearnedOptimizer(hidden=0)
    with pytest.raises(ValueError, match="layers"):
        mk.LearnedOptimizer(layers=7)
    with pytest.raises(ValueError, match="init"):
        mk.LearnedOptimizer(init="zeros")
    with pytest.raises(ValueError, match="step"):
        mk.LearnedOptimizer(hidden=4).update(torch.zeros(3), torch.zeros(3), torch.zeros(4, 3), -1)
    for seed in (1.5, "0", True):
        with pytest.raises(TypeError, match="argument 'seed' must be an int or None"):
            mk.LearnedOptimizer(hidden=4, seed=seed)
    for step in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"LearnedOptimizer.flat_weights: step must be an int >= 0"):
            mk.LearnedOptimizer(hidden=4).flat_weights(step)
