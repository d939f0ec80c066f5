"""Few-shot language-modelling tasks: a task is one text domain; its support set is ``n_support``
chunks of the domain and its query set ``n_query`` other chunks (disjoint positions), each chunk
``seq_len + 1`` characters (the model predicts characters 1..seq_len from the ones before).

Batch ``index`` of a sampler is a pure function of (seed, index): the T domains are drawn without
replacement when there are at least T (with replacement otherwise), and each task's chunks are drawn
without replacement from a grid of non-overlapping chunks whose offset is random per task; a query
chunk whose text equals one of its task's support chunks is passed over for the next one drawn.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..ops._checks import as_integer, require_int
from .text import DataError, encode, positive_ints


@dataclasses.dataclass
class LMTaskBatch:
    support: torch.Tensor   # int64 [T, n_support, seq_len + 1]
    query: torch.Tensor     # int64 [T, n_query, seq_len + 1]
    domains: list[str]      # the T task domains


def check_seed(seed) -> int:
    """A sampler's seed as an int: any int, None refused (its batches are a pure function of it and the
    batch index)."""
    integer = as_integer(seed)
    if integer is None:
        raise TypeError(f"seed must be an int, got {seed!r}")
    return integer


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The generator of batch ``index`` of a sampler seeded ``seed`` (independent of other batches)."""
    index = require_int("index", index, 0, note=" (the batch's number)")
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63))


class LMTaskSampler:
    """Samples few-shot LM task batches from ``domains`` ({name: text})."""

    def __init__(self, domains: Mapping[str, str], n_support: int = 4, n_query: int = 4, seq_len: int = 48,
                 seed: int = 0):
        n_support, n_query, seq_len = positive_ints(n_support=n_support, n_query=n_query, seq_len=seq_len)
        seed = check_seed(seed)
        if not domains:
            raise DataError("no domains to sample tasks from")
        self.n_support, self.n_query, self.seq_len, self.seed = n_support, n_query, seq_len, seed
        self.names = sorted(domains)
        not_text = [n for n in self.names if not isinstance(domains[n], str)]
        if not_text:
            raise DataError(f"domain {not_text[0]!r} is a {type(domains[not_text[0]]).__name__}; each domain must "
                            "be one str of text (for labelled texts, one list per class, use EpisodeSampler)")
        needed = (n_support + n_query) * (seq_len + 1) + seq_len
        too_small = [(n, len(domains[n])) for n in self.names if len(domains[n]) < needed]
        if too_small:
            shown = ", ".join(f"{n!r} ({c} characters)" for n, c in too_small[:5])
            raise DataError(
                f"{len(too_small)} domain(s) are too small for {n_support} support + {n_query} query chunks of "
                f"{seq_len + 1} characters (each domain needs at least {needed}): {shown}"
            )
        self.tokens = [encode(domains[n]) for n in self.names]

    def batch(self, index: int, num_tasks: int) -> LMTaskBatch:
        """Batch number ``index``: ``num_tasks`` domains (without repeats while there are enough), each
        with disjoint support and query chunks; a pure function of the seed and ``index``."""
        num_tasks, = positive_ints(num_tasks=num_tasks)
        gen = batch_generator(self.seed, index)
        n = len(self.names)
        if num_tasks <= n:
            picks = torch.randperm(n, generator=gen)[:num_tasks].tolist()
        else:
            picks = torch.randint(n, (num_tasks,), generator=gen).tolist()
        chunk = self.seq_len + 1
        support, query = [], []
        for d in picks:
            tokens = self.tokens[d]
            offset = int(torch.randint(self.seq_len + 1, (), generator=gen))
            n_chunks = (tokens.numel() - offset) // chunk
            starts = (offset + torch.randperm(n_chunks, generator=gen) * chunk).tolist()
            support.append(torch.stack([tokens[s:s + chunk] for s in starts[:self.n_support]]))
            query.append(self._query_chunks(d, tokens, starts[self.n_support:], support[-1]))
        return LMTaskBatch(torch.stack(support), torch.stack(query), [self.names[d] for d in picks])

    def _query_chunks(self, domain: int, tokens: torch.Tensor, starts: list[int], support: torch.Tensor):
        """[n_query, seq_len + 1]: the first chunks at ``starts`` whose text is not a support chunk's (a domain
        that repeats a passage could otherwise show the model a query chunk in its own support set)."""
        chunk = self.seq_len + 1
        chosen = []
        for s in starts:
            candidate = tokens[s:s + chunk]
            if not (support == candidate).all(-1).any():
                chosen.append(candidate)
                if len(chosen) == self.n_query:
                    return torch.stack(chosen)
        raise DataError(f"domain {self.names[domain]!r} has fewer than {self.n_query} chunks of {chunk} characters "
                        f"that differ from its {self.n_support} support chunks (its text repeats)")
