"""Runs a meta-algorithm's call eagerly when ``torch.compile`` traces it.

A meta-gradient step takes gradients inside its forward (``torch.autograd.grad`` with
``create_graph=True``) and differentiates them again.  torch compiles no double backward, and measured
with torch 2.14, what it does compile of such a step fails: ``torch.compile(maml)`` (or a compiled
training step that calls it) builds the forward, then its compiled backward stops on a stride assertion
("expected size 3==3, stride 7==50"), and a compiled learned-optimizer unroll stops with "a leaf
Variable that requires grad is being used in an in-place operation".  An evolution-strategies estimate
sets and restores the random-number state around each particle's unroll, which a compiled trace does not
reproduce (measured: an estimate 0.13 from the eager one).

:func:`eager_under_compile` makes the decorated call a graph break: under ``torch.compile`` it runs as
it runs eagerly (the same values and gradients), and the code around it is compiled as usual.  The
decorator reaches ``torch._dynamo`` only while torch is compiling, so importing metakernels does not
import it (that takes about a second).
"""
from __future__ import annotations

import functools

import torch


def eager_under_compile(fn):
    """``fn``, run outside the compiled graph when called while ``torch.compile`` traces."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch._dynamo.disable(fn, reason="metakernels differentiates twice inside this call, "
                                                    "which torch.compile cannot compile")(*args, **kwargs)
        return fn(*args, **kwargs)

    return run
