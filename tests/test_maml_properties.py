"""Property-based tests of the meta-algorithms (hypothesis): random task counts (T=1 included), inner
steps (K=0 included), inner optimisers, first or second order, memory modes and task chunks, vmap or
the loop, subset adaptation, Meta-SGD's rate shapes, NaN in a task's data, and deliberately mismatched
batches.  Every case either matches the sequential create_graph oracle in float64 (NaN policy: raise
with the task's index in the whole batch) or raises a clear error; the batches and the model's
parameters are never modified."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metakernels as mk
from maml_reference import sequential_meta_loss
from metakernels.models import TransformerLM, lm_loss
from test_maml import _assert_grads_close, weighted_lm_loss

VOCAB, SEQ = 7, 4
ADAPT = {"all": None, "head": ["head.weight", "head.bias"], "block": lambda name, p: name.startswith("blocks.0")}


@st.composite
def maml_cases(draw):
    return dict(
        T=draw(st.integers(1, 3)), K=draw(st.integers(0, 2)),
        optimizer=draw(st.sampled_from(["sgd", "momentum", "adam"])), first_order=draw(st.booleans()),
        memory=draw(st.sampled_from(["fast", "low"])), task_chunk=draw(st.integers(1, 3)),
        vectorize=draw(st.booleans()), adapt=draw(st.sampled_from(sorted(ADAPT))),
        learn_lr=draw(st.sampled_from([None, "parameter", "tensor", "scalar"])),
        nan_task=draw(st.sampled_from([None, None, 0, 2])),
        mismatch=draw(st.sampled_from([None] * 5 + ["query_T", "no_task_dim"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _model(seed):
    torch.manual_seed(seed)
    return TransformerLM(vocab=VOCAB, d_model=8, n_heads=2, n_layers=1, max_len=SEQ).double()


def _adapted_names(model, adapt):
    spec = ADAPT[adapt]
    names = [n for n, _ in model.named_parameters()]
    return names if spec is None else [n for n in names if (spec(n, None) if callable(spec) else n in spec)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maml_cases())
def test_meta_gradients_match_the_oracle_or_raise_clearly(case):
    model = _model(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    T = case["T"]
    support = torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen)
    query = torch.randint(0, VOCAB, (T, 2, SEQ + 1), generator=gen)
    weight_s, weight_q = torch.ones(T, dtype=torch.float64), torch.ones(T, dtype=torch.float64)
    if case["nan_task"] is not None and case["nan_task"] < T:
        weight_s[case["nan_task"]] = float("nan")
    batches = [support, query, weight_s, weight_q]
    before = [b.clone() for b in batches] + [p.detach().clone() for p in model.parameters()]
    kwargs = dict(inner_lr=0.2, inner_steps=case["K"], inner_optimizer=case["optimizer"], first_order=case["first_order"],
                  memory=case["memory"], task_chunk=case["task_chunk"], vectorize=case["vectorize"],
                  adapt=ADAPT[case["adapt"]])
    algo = mk.MetaSGD(model, learn_lr=case["learn_lr"], **kwargs) if case["learn_lr"] else mk.MAML(model, **kwargs)
    meta_params = list(algo.parameters())
    s_batch, q_batch = (support, weight_s), (query, weight_q)
    if case["mismatch"] == "query_T":
        q_batch = (torch.cat([query, query[:1]]), torch.cat([weight_q, weight_q[:1]]))
    elif case["mismatch"] == "no_task_dim":
        s_batch = (support, weight_s[0])

    try:
        if case["mismatch"]:
            with pytest.raises(ValueError, match="task|T="):
                algo(weighted_lm_loss, s_batch, q_batch)
            return
        if case["nan_task"] is not None and case["nan_task"] < T and case["K"] > 0:
            with pytest.raises(FloatingPointError, match=f"for task {case['nan_task']} at inner step 1"):
                algo(weighted_lm_loss, s_batch, q_batch)
            return
        loss = algo(weighted_lm_loss, s_batch, q_batch)
        got = torch.autograd.grad(loss, meta_params, allow_unused=True)
        names = _adapted_names(model, case["adapt"])
        if case["learn_lr"]:
            rates = list(algo.inner_lrs)
            lrs = {n: rates[i] if case["learn_lr"] != "scalar" else rates[0] for i, n in enumerate(names)}
        else:
            lrs = dict.fromkeys(names, 0.2)
        want_loss = sequential_meta_loss(model, weighted_lm_loss, s_batch, q_batch, names=names, lrs=lrs, steps=case["K"],
                                         first_order=case["first_order"], optimizer=case["optimizer"])
        want = torch.autograd.grad(want_loss, meta_params, allow_unused=True)
        torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-12, atol=1e-12)
        _assert_grads_close(got, want)
    finally:
        after = batches + [p.detach() for p in model.parameters()]
        for a, b in zip(before, after):  # an input or a parameter modified
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
