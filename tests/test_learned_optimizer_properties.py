"""Property-based tests of learned-optimizer meta-training (hypothesis): random task counts (T=1
included), unroll lengths, rule sizes, first or second order, inner or query meta-losses, vmap or the
loop, NaN in one task's data, and deliberately mismatched batches.  Every case either matches the
sequential create_graph oracle of test_learned_optimizer.py in float64 or raises a clear error; the
batches, the model's parameters and the rule's weights are never modified."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metakernels as mk
from metakernels.models import TransformerLM, lm_loss
from test_learned_optimizer import sequential_unroll_meta_loss

VOCAB, SEQ = 7, 4


@st.composite
def unroll_cases(draw):
    return dict(
        T=draw(st.integers(1, 3)), K=draw(st.integers(1, 3)), hidden=draw(st.sampled_from([4, 8])),
        layers=draw(st.integers(1, 2)), first_order=draw(st.booleans()),
        meta_loss=draw(st.sampled_from(["inner", "query"])), vectorize=draw(st.booleans()),
        nan_task=draw(st.sampled_from([None, None, 0, 2])),
        mismatch=draw(st.sampled_from([None] * 5 + ["batches", "query_T"])), seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(unroll_cases())
def test_unroll_meta_gradient_matches_the_oracle_or_raises_clearly(case):
    torch.manual_seed(case["seed"])
    model = TransformerLM(vocab=VOCAB, d_model=8, n_heads=2, n_layers=1, max_len=SEQ).double()
    hyper = mk.ops.LoptHyper(step_mult=0.05, exp_mult=0.3)
    lopt = mk.LearnedOptimizer(hidden=case["hidden"], layers=case["layers"], hyper=hyper, init="random",
                               seed=case["seed"]).double()
    T, K = case["T"], case["K"]
    gen = torch.Generator().manual_seed(case["seed"])
    batches = [torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen) for _ in range(K)]
    query = torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen) if case["meta_loss"] == "query" else None
    poisoned = case["nan_task"] is not None and case["nan_task"] < T
    if poisoned:
        batches[0][case["nan_task"], 0, 0] = VOCAB  # a token the loss below turns into NaN

    def loss_fn(f, batch):
        nan = (batch == VOCAB).any()
        return lm_loss(f, batch.clamp(max=VOCAB - 1)) * torch.where(nan, float("nan"), 1.0)

    inputs = batches + ([query] if query is not None else [])
    before = [b.clone() for b in inputs] + [p.detach().clone() for p in [*model.parameters(), *lopt.parameters()]]
    trainer = mk.LearnedOptimizerTrainer(lopt, model, first_order=case["first_order"], vectorize=case["vectorize"])
    try:
        if case["mismatch"] == "batches":
            with pytest.raises(ValueError, match="one per step"):
                trainer.unroll(loss_fn, batches + batches[:1], K, meta_loss=case["meta_loss"], query=query)
            return
        if case["mismatch"] == "query_T":
            with pytest.raises(ValueError, match="query has T="):
                trainer.unroll(loss_fn, batches, K, meta_loss="query", query=torch.cat([batches[0], batches[0][:1]]))
            return
        if poisoned:
            with pytest.raises(FloatingPointError, match=f"for task {case['nan_task']} at inner step 0"):
                trainer.unroll(loss_fn, batches, K, meta_loss=case["meta_loss"], query=query)
            return
        result = trainer.unroll(loss_fn, batches, K, meta_loss=case["meta_loss"], query=query)
        got = torch.autograd.grad(result.meta_loss, list(lopt.parameters()), allow_unused=True)
        want_loss = sequential_unroll_meta_loss(lopt, model, batches, K, case["first_order"], query)
        want = torch.autograd.grad(want_loss, list(lopt.parameters()), allow_unused=True)
        torch.testing.assert_close(result.meta_loss.detach(), want_loss.detach(), rtol=1e-10, atol=1e-12)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
    finally:
        after = inputs + [p.detach() for p in [*model.parameters(), *lopt.parameters()]]
        for a, b in zip(before, after):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
