"""ESEstimator: the antithetic estimate is its formula, agrees in direction with the exact meta-gradient,
persistent ES over truncations estimates the whole unroll's gradient, and the meta-parameters are
restored exactly, also when an unroll raises."""
import pytest
import torch
from torch import nn

import metakernels as mk

T, DIM, K = 4, 5, 4


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(DIM, 1).double()
    hyper = mk.ops.LoptHyper(step_mult=0.05, exp_mult=0.3)
    lopt = mk.LearnedOptimizer(hidden=4, layers=1, hyper=hyper, init="random", seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, 16, DIM, generator=gen, dtype=torch.float64)
    w_true = torch.randn(T, DIM, 1, generator=gen, dtype=torch.float64)
    return lopt, mk.LearnedOptimizerTrainer(lopt, model), (x, x @ w_true)


def _mse(f, batch):
    x, y = batch
    return ((f(x) - y) ** 2).mean()


def _exact_gradient(lopt, trainer, batch, steps=K):
    lopt.zero_grad()
    trainer.unroll(_mse, batch, steps=steps).meta_loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in lopt.parameters()])
    lopt.zero_grad()
    return grad


def _estimate(es, *args, **kwargs):
    es.trainer.lopt.zero_grad()
    result = es.estimate(*args, **kwargs)
    return result, torch.cat([p.grad.reshape(-1) for p in es.trainer.lopt.parameters()])


def _cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _projection(estimate, exact):
    """The estimate's component along the exact gradient, in units of it: 1 when unbiased."""
    return float(estimate @ exact / (exact @ exact))


@pytest.mark.parametrize("frozen", [(), ("w_time", "b_out")])
def test_antithetic_estimate_is_its_formula(frozen):
    """phi is the meta-parameters that require grad: a frozen one keeps its value in every unroll and gets
    no gradient, as under backpropagation (before, it was perturbed and given one, which a meta-optimizer
    over lopt.parameters() then applied)."""
    lopt, trainer, batch = _setup()
    for name in frozen:
        getattr(lopt, name).requires_grad_(False)
    trained = [p for p in lopt.parameters() if p.requires_grad]
    sigma, pairs = 0.01, 3
    lopt.zero_grad()
    result = mk.ESEstimator(trainer, sigma=sigma, pairs=pairs, seed=5).estimate(_mse, batch, steps=K)
    grad = torch.cat([p.grad.reshape(-1) for p in trained])
    phi = torch.nn.utils.parameters_to_vector(trained).detach()
    eps = torch.randn(pairs, phi.numel(), generator=torch.Generator().manual_seed(5), dtype=phi.dtype) * sigma

    def meta_loss_at(vector):
        probe = mk.LearnedOptimizer(hidden=4, layers=1, hyper=lopt.hyper, init="random").double()
        probe.load_state_dict(lopt.state_dict())
        probe_trained = [q for q, p in zip(probe.parameters(), lopt.parameters()) if p.requires_grad]
        torch.nn.utils.vector_to_parameters(vector, probe_trained)
        return mk.LearnedOptimizerTrainer(probe, trainer.evaluator.model).unroll(_mse, batch, steps=K).meta_loss

    expected = sum((meta_loss_at(phi + e) - meta_loss_at(phi - e)) * e for e in eps) / (2 * pairs * sigma**2)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(result.meta_loss, meta_loss_at(phi).detach(), rtol=0, atol=0)
    assert result.state.step == K and result.state.fast.shape == (T, DIM + 1)
    assert len(result.gradient) == len(trained)
    assert all(getattr(lopt, name).grad is None for name in frozen)


def test_antithetic_estimate_follows_the_exact_meta_gradient():
    """With u = eps / sigma ~ N(0, I_D), the estimate is (1/N) sum_i u_i u_i^T g + O(sigma^2): mean g,
    squared error about (D + 1) |g|^2 / N, so a cosine of about 1 / sqrt(1 + (D + 1) / N) (0.90 here),
    and a projection on g of 1 +- sqrt(2 / N) (0.07)."""
    lopt, trainer, batch = _setup()
    exact = _exact_gradient(lopt, trainer, batch)
    pairs = 400
    _, grad = _estimate(mk.ESEstimator(trainer, sigma=1e-4, pairs=pairs, seed=0), _mse, batch, steps=K)
    D = exact.numel()
    expected_cosine = (1 + (D + 1) / pairs) ** -0.5
    assert _cosine(grad, exact) > expected_cosine - 0.1
    assert abs(_projection(grad, exact) - 1) < 0.25


def test_persistent_es_over_truncations_estimates_the_whole_unroll():
    """Two truncations of K/2 steps on the same batch: their 'inner' meta-losses sum to twice the whole
    unroll's, so the summed persistent estimates follow twice its exact gradient, without the bias of
    truncation: plain ES (or backpropagation) per truncation ignores how the first truncation's end
    weights change the second's losses, and falls short along the gradient (projection 0.65-0.67 here)."""
    lopt, trainer, batch = _setup()
    exact = 2 * _exact_gradient(lopt, trainer, batch)
    es = mk.ESEstimator(trainer, sigma=1e-4, pairs=400, persistent=True, seed=0)
    lopt.zero_grad()
    first = es.estimate(_mse, batch, steps=K // 2)
    second = es.estimate(_mse, batch, steps=K // 2)
    total = torch.cat([p.grad.reshape(-1) for p in lopt.parameters()])
    assert first.state is None and second.state is None
    assert all(particle.step == K for particle in es._particles)
    assert _cosine(total, exact) > 0.7
    assert abs(_projection(total, exact) - 1) < 0.25


def test_persistent_reset_starts_a_new_inner_problem():
    lopt, trainer, batch = _setup()
    es = mk.ESEstimator(trainer, sigma=1e-3, pairs=2, persistent=True, seed=0)
    es.estimate(_mse, batch, steps=1)
    es.reset()
    es.estimate(_mse, batch, steps=1)
    assert all(particle.step == 1 for particle in es._particles)
    with pytest.raises(ValueError, match="persistent ES continues"):
        es.estimate(_mse, batch, steps=1, state=trainer.initial_state(T))


def test_estimate_adds_to_existing_gradients():
    lopt, trainer, batch = _setup()
    for p in lopt.parameters():
        p.grad = torch.ones_like(p)
    result = mk.ESEstimator(trainer, sigma=1e-3, pairs=2, seed=0).estimate(_mse, batch, steps=2)
    for p, g in zip(lopt.parameters(), result.gradient):
        torch.testing.assert_close(p.grad, 1 + g, rtol=0, atol=0)


def test_hooks_on_the_meta_parameters_see_the_estimate():
    """The estimate goes through autograd's accumulation, as a backward() would: a clipping-style hook
    changes what lands in .grad, and a post-accumulate hook (optimizer-in-backward) fires (before, .grad
    was assigned directly and neither ran)."""
    lopt, trainer, batch = _setup()
    lopt.w_in.register_hook(lambda g: 2 * g)
    accumulated = []
    lopt.b_out.register_post_accumulate_grad_hook(lambda p: accumulated.append(p.grad.clone()))
    result = mk.ESEstimator(trainer, sigma=1e-3, pairs=2, seed=0).estimate(_mse, batch, steps=2)
    names = [name for name, _ in lopt.named_parameters()]
    estimate = dict(zip(names, result.gradient))
    torch.testing.assert_close(lopt.w_in.grad, 2 * estimate["w_in"], rtol=0, atol=0)
    torch.testing.assert_close(lopt.w_time.grad, estimate["w_time"], rtol=0, atol=0)
    assert len(accumulated) == 1
    torch.testing.assert_close(accumulated[0], estimate["b_out"], rtol=0, atol=0)


def test_no_trainable_meta_parameter_is_refused():
    lopt, trainer, batch = _setup()
    lopt.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the learned optimizer requires grad"):
        mk.ESEstimator(trainer, pairs=1, seed=0).estimate(_mse, batch, steps=1)


def test_persistent_es_refuses_a_changed_set_of_trained_parameters():
    """Persistent particles carry perturbations accumulated over the trained parameters they started with;
    freezing one mid-problem would misalign them, so it raises (naming reset()) and reset() recovers."""
    lopt, trainer, batch = _setup()
    es = mk.ESEstimator(trainer, sigma=1e-3, pairs=2, persistent=True, seed=0)
    es.estimate(_mse, batch, steps=1)
    lopt.w_time.requires_grad_(False)
    with pytest.raises(ValueError, match=r"changed since the persistent particles started.*reset\(\)"):
        es.estimate(_mse, batch, steps=1)
    es.reset()
    result = es.estimate(_mse, batch, steps=1)
    assert len(result.gradient) == len(list(lopt.parameters())) - 1


def test_meta_parameters_are_restored_exactly_even_when_an_unroll_raises():
    lopt, trainer, batch = _setup()
    before = [p.detach().clone() for p in lopt.parameters()]
    es = mk.ESEstimator(trainer, sigma=0.5, pairs=2, seed=0)
    es.estimate(_mse, batch, steps=2)
    assert all(torch.equal(a, p) for a, p in zip(before, lopt.parameters()))
    unroll, calls = trainer.unroll, []

    def failing_unroll(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second particle, at phi - eps_1
            raise RuntimeError("data loader broke")
        return unroll(*args, **kwargs)

    trainer.unroll = failing_unroll
    lopt.zero_grad()
    with pytest.raises(RuntimeError, match="data loader broke"):
        es.estimate(_mse, batch, steps=2)
    assert all(torch.equal(a, p) for a, p in zip(before, lopt.parameters()))
    assert all(p.grad is None for p in lopt.parameters())


def test_persistent_particles_are_kept_when_an_unroll_raises():
    lopt, trainer, batch = _setup()
    es = mk.ESEstimator(trainer, sigma=1e-3, pairs=2, persistent=True, seed=0)
    es.estimate(_mse, batch, steps=1)
    particles, xi = es._particles, es._xi.clone()
    unroll = trainer.unroll

    def failing_unroll(*args, **kwargs):
        if kwargs["state"] is particles[1]:
            raise RuntimeError("data loader broke")
        return unroll(*args, **kwargs)

    trainer.unroll = failing_unroll
    with pytest.raises(RuntimeError, match="data loader broke"):
        es.estimate(_mse, batch, steps=1)
    assert es._particles is particles and torch.equal(es._xi, xi)
    trainer.unroll = unroll
    es.estimate(_mse, batch, steps=1)
    assert all(particle.step == 2 for particle in es._particles)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma must be a positive finite number"),
    (dict(sigma=-1.0), "sigma must be a positive finite number"),
    (dict(sigma=True), "sigma must be a positive finite number"),
    (dict(sigma=float("inf")), "sigma must be a positive finite number"),
    (dict(sigma=float("nan")), "sigma must be a positive finite number"),
    (dict(pairs=0), "pairs must be an int >= 1"),
    (dict(pairs=2.5), "pairs must be an int >= 1"),
])
def test_bad_settings_are_named(kwargs, match):
    """When the estimator is built, and when the setting is changed later (sigma annealed, say)."""
    _, trainer, _ = _setup()
    with pytest.raises(ValueError, match=match):
        mk.ESEstimator(trainer, **kwargs)
    es = mk.ESEstimator(trainer, sigma=0.5, pairs=3)
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=match):
        setattr(es, name, value)
    assert (es.sigma, es.pairs) == (0.5, 3)


def test_persistent_es_refuses_a_changed_number_of_pairs_until_reset():
    """The particles and their accumulated perturbations are 2N of the N they started with: with another
    N, the old code raised an IndexError or a tensor shape mismatch that did not say why."""
    lopt, trainer, batch = _setup()
    for before, after in ((1, 3), (3, 1), (2, 3)):
        es = mk.ESEstimator(trainer, sigma=1e-3, pairs=before, persistent=True, seed=0)
        es.estimate(_mse, batch, steps=1)
        es.pairs = after
        with pytest.raises(ValueError, match=f"pairs is {after}, but the persistent particles started with "
                                             rf"{before} pairs; call reset\(\)"):
            es.estimate(_mse, batch, steps=1)
        es.reset()
        assert es.estimate(_mse, batch, steps=1).state is None
    lopt.zero_grad()


@pytest.mark.parametrize("kwargs, match", [
    (dict(seed=1.5), "ESEstimator: argument 'seed' must be an int or None, got float"),
    (dict(seed="1"), "ESEstimator: argument 'seed' must be an int or None, got str"),
    (dict(persistent="yes"), "persistent must be True or False, got 'yes'"),
])
def test_settings_of_the_wrong_type_are_named(kwargs, match):
    _, trainer, _ = _setup()
    with pytest.raises(TypeError, match=match):
        mk.ESEstimator(trainer, **kwargs)


def test_trainer_must_be_a_trainer():
    with pytest.raises(TypeError, match="trainer must be a LearnedOptimizerTrainer, got LearnedOptimizer"):
        mk.ESEstimator(mk.LearnedOptimizer(hidden=4, layers=1))


def _dropout_setup():
    lopt, _, batch = _setup()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1)).double()
    return lopt, mk.LearnedOptimizerTrainer(lopt, model), batch


def test_antithetic_pairs_draw_the_same_dropout_masks():
    """Each particle starts from the random-number state the estimate found, so L(phi + eps) - L(phi - eps)
    measures the perturbation and not two draws of the masks.  With dropout the estimate then follows
    the exact meta-gradient under the entry masks: cosine 0.90 and 1.10 times its length, as without
    dropout (the old code, whose particles drew their own masks: 0.29 and 2.17 times)."""
    lopt, trainer, batch = _dropout_setup()
    torch.manual_seed(5)
    entry = torch.get_rng_state()
    exact = _exact_gradient(lopt, trainer, batch, steps=3)
    torch.set_rng_state(entry)
    _, estimate = _estimate(mk.ESEstimator(trainer, sigma=1e-3, pairs=400, seed=3), _mse, batch, 3)
    assert _cosine(estimate, exact) > 0.75
    assert 0.8 < float(estimate.norm() / exact.norm()) < 1.25


@pytest.mark.parametrize("persistent", [False, True])
def test_every_unroll_starts_from_the_state_the_estimate_found_and_one_unroll_is_left(persistent):
    """The random-number state and a buffer the forward writes (BatchNorm's batch count) are, after the
    estimate, those of one unroll from where it started (the centre's, or the last particle's)."""
    lopt, _, batch = _setup()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIM, 6), nn.BatchNorm1d(6), nn.Dropout(0.1), nn.Linear(6, 1)).double()
    trainer = mk.LearnedOptimizerTrainer(lopt, model, vectorize=False)
    torch.manual_seed(7)
    mk.ESEstimator(trainer, sigma=1e-2, pairs=3, persistent=persistent, seed=1).estimate(_mse, batch, 2)
    after_estimate = torch.rand(4), model[1].num_batches_tracked.item()
    model[1].reset_running_stats()
    torch.manual_seed(7)
    trainer.unroll(_mse, batch, 2, track_meta_gradient=False)
    after_one_unroll = torch.rand(4), model[1].num_batches_tracked.item()
    assert torch.equal(after_estimate[0], after_one_unroll[0])
    assert after_estimate[1] == after_one_unroll[1] == T * 3  # T tasks, 2 steps and the final loss
