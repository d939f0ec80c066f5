"""Property-based tests of the chunked vocabulary head (mk.ops.linear_cross_entropy, hypothesis): random
task counts (0-d and T=1 included), rows, widths, vocabularies, chunk sizes, bias or none, ignored
targets (all of a task's included), non-contiguous operands, NaN/Inf in h, and deliberately mismatched
operands.  Every case matches PyTorch's linear + cross_entropy in float64 to the second derivative, or
raises a clear error; where PyTorch's loss is not finite ours is not either (an Inf logit gives +inf
here where PyTorch's log_softmax gives NaN; a task whose targets are all ignored gives NaN on both
sides); inputs are never modified."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metakernels as mk


@st.composite
def head_cases(draw):
    return dict(
        tasks=draw(st.sampled_from([None, 1, 3])), R=draw(st.integers(1, 9)), D=draw(st.integers(1, 6)),
        V=draw(st.integers(1, 13)), chunk_rows=draw(st.sampled_from([None, 1, 2, 5])), bias=draw(st.booleans()),
        ignored=draw(st.sampled_from(["none", "some", "all_of_task_0"])), strided=draw(st.booleans()),
        poison=draw(st.sampled_from([None, None, "nan", "inf"])),
        mismatch=draw(st.sampled_from([None] * 5 + ["targets", "bias", "target_range"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _reference(h, w, b, targets):
    """PyTorch's linear + cross_entropy per task (mean over non-ignored targets; NaN if none)."""
    logits = h @ w.transpose(-1, -2) + (0 if b is None else b.unsqueeze(-2))
    if w.dim() == 2:
        return F.cross_entropy(logits, targets)
    return torch.stack([F.cross_entropy(logits[n], targets[n]) for n in range(w.shape[0])])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head_cases())
def test_matches_pytorch_to_second_order_or_raises_clearly(case):
    gen = torch.Generator().manual_seed(case["seed"])
    lead = () if case["tasks"] is None else (case["tasks"],)
    R, D, V = case["R"], case["D"], case["V"]

    def rand(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if case["strided"]:  # same values, every other column of a wider tensor
            wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=torch.float64)
            wide[..., ::2] = x
            x = wide[..., ::2]
        return x.requires_grad_()

    h, w = rand(*lead, R, D), rand(*lead, V, D)
    b = rand(*lead, V) if case["bias"] else None
    targets = torch.randint(0, V, (*lead, R), generator=gen)
    if case["ignored"] == "some":  # rows 1, 4, 7, ...: the poisoned row 0 stays counted
        targets.view(-1)[1::3] = -100
    elif case["ignored"] == "all_of_task_0":
        targets.view(-1)[:R] = -100
    if case["poison"]:
        with torch.no_grad():
            h.view(-1)[0] = float(case["poison"])
    inputs = [t for t in (h, w, b) if t is not None]
    before = [t.detach().clone() for t in inputs] + [targets.clone()]
    kwargs = dict(chunk_rows=case["chunk_rows"])
    try:
        if case["mismatch"] == "targets":
            with pytest.raises(ValueError, match="'targets'"):
                mk.ops.linear_cross_entropy(h, w, b, targets[..., :-1] if R > 1 else targets.unsqueeze(-1).expand(*lead, 1, 2), **kwargs)
            return
        if case["mismatch"] == "bias":
            with pytest.raises(ValueError, match="'bias'"):
                mk.ops.linear_cross_entropy(h, w, torch.zeros(*lead, V + 1, dtype=torch.float64), targets, **kwargs)
            return
        if case["mismatch"] == "target_range":
            with pytest.raises(ValueError, match="'targets'"):
                mk.ops.linear_cross_entropy(h, w, b, targets.clamp_min(0) + V, **kwargs)
            return
        got = mk.ops.linear_cross_entropy(h, w, b, targets, **kwargs)
        want = _reference(h, w, b, targets)
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), (got, want)  # non-finite where PyTorch is (inf or NaN)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-12, atol=1e-12)
        if not finite.all():
            return  # the derivatives of a non-finite loss are not finite on either side
        cot = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        first = torch.autograd.grad(got, inputs, cot, create_graph=True)
        first0 = torch.autograd.grad(want, inputs, cot, create_graph=True)
        probes = [torch.randn(f.shape, generator=gen, dtype=torch.float64) for f in first]
        second = torch.autograd.grad(sum((f * p).sum() for f, p in zip(first, probes)), inputs, allow_unused=True)
        second0 = torch.autograd.grad(sum((f * p).sum() for f, p in zip(first0, probes)), inputs, allow_unused=True)
        for a, c in zip(first + second, first0 + second0):
            if c is None:
                assert a is None or torch.count_nonzero(a) == 0
            else:
                torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    finally:
        for a, c in zip(before, [t.detach() for t in inputs] + [targets]):
            torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True)
