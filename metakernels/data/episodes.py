"""N-way K-shot classification episodes from labelled text.

A labelled dataset is {class name: [texts]} plus, for class-disjoint splits, {group: [class names]}
(CLINC150's domains).  An episode draws ``n_way`` classes, relabels them 0..n_way-1 in a random order,
and draws ``k_shot`` support and ``n_query`` query texts per class without replacement.  Texts are
character tokens (see :mod:`.text`), cut or padded with :data:`PAD` to ``max_len``; a class keeps each
distinct token row once (its first occurrence), so that no query input is also one of its episode's
support inputs, which texts repeated in the data, or made equal by the cut, would otherwise allow
(CLINC150: 1 repeated utterance, and 82 / 945 / 6641 of its 22500 in-scope rows repeat within their
intent once cut to 48 / 32 / 16 characters).  A text found in two classes stays in both: that ambiguity
is the data's.

CLINC150 (Larson et al., 2019): ``data_full.json`` holds {"train"|"val"|"test": [[text, intent], ...],
"oos_*": ...}; ``domains.json`` holds {domain: [intent, ...]}.  All in-scope utterances of an intent
(train, val and test lists together: 150 per intent) are its texts; out-of-scope ones are left out.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import torch

from .lm_tasks import batch_generator, check_seed
from .text import PAD, DataError, encode, positive_ints, read_utf8

_CLINC_SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class EpisodeBatch:
    support: tuple[torch.Tensor, torch.Tensor]   # tokens int64 [T, n_way * k_shot, max_len], labels [T, n_way * k_shot]
    query: tuple[torch.Tensor, torch.Tensor]     # tokens [T, n_way * n_query, max_len], labels [T, n_way * n_query]
    classes: list[list[str]]                     # per task, the class name of label 0..n_way-1


def _read_json(path: str):
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def load_clinc150(path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({intent: utterances}, {domain: intents}) from a CLINC150 folder (data_full.json, domains.json)."""
    path = os.fspath(path)
    data_file, domains_file = os.path.join(path, "data_full.json"), os.path.join(path, "domains.json")
    data, groups = _read_json(data_file), _read_json(domains_file)
    if not isinstance(data, dict) or any(k not in data for k in _CLINC_SPLITS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{data_file}: expected the keys {list(_CLINC_SPLITS)}, found {keys}")
    texts: dict[str, list[str]] = {}
    for split in _CLINC_SPLITS:
        for i, row in enumerate(data[split]):
            if not (isinstance(row, list) and len(row) == 2 and all(isinstance(x, str) for x in row)):
                raise DataError(f"{data_file}: {split}[{i}] is {row!r}, expected [text, intent]")
            texts.setdefault(row[1], []).append(row[0])
    if not isinstance(groups, dict) or not all(isinstance(v, list) for v in groups.values()):
        raise DataError(f"{domains_file}: expected {{domain: [intent, ...]}}")
    unknown = sorted({i for intents in groups.values() for i in intents} - set(texts))
    if unknown:
        raise DataError(f"{domains_file}: intents {unknown[:5]} have no utterances in {data_file}")
    return texts, {d: list(v) for d, v in groups.items()}


def load_labelled_folder(path: str | os.PathLike) -> dict[str, list[str]]:
    """{class: texts} from a folder of ``<class>.txt`` files, one text per non-empty line."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder (expected <class>.txt files, one text per line)")
    classes = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".txt"):
            lines = read_utf8(os.path.join(path, name)).split("\n")  # as iterating the file: universal newlines
            classes[name[:-4]] = [line.strip() for line in lines if line.strip()]
    if not classes:
        raise DataError(f"{path}: holds no .txt files (one file per class)")
    return classes


class EpisodeSampler:
    """Samples N-way K-shot episodes from ``classes`` ({name: texts})."""

    def __init__(self, classes: Mapping[str, list[str]], n_way: int = 5, k_shot: int = 5, n_query: int = 5,
                 max_len: int = 48, seed: int = 0):
        n_way, k_shot, n_query, max_len = positive_ints(n_way=n_way, k_shot=k_shot, n_query=n_query, max_len=max_len)
        seed = check_seed(seed)
        self.names = sorted(classes)
        for name in self.names:
            texts = classes[name]
            if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
                raise DataError(f"class {name!r} must be a list of str, one text per example; got "
                                f"{type(texts).__name__}" + ("" if isinstance(texts, str) else " holding other items"))
        if len(self.names) < n_way:
            raise DataError(f"{n_way}-way episodes need at least {n_way} classes, there are {len(self.names)}")
        self.n_way, self.k_shot, self.n_query, self.max_len, self.seed = n_way, k_shot, n_query, max_len, seed
        self.tokens = [self._distinct_rows(classes[n]) for n in self.names]
        needed = k_shot + n_query
        short = [(n, rows.shape[0]) for n, rows in zip(self.names, self.tokens) if rows.shape[0] < needed]
        if short:
            shown = ", ".join(f"{n!r} ({c})" for n, c in short[:5])
            raise DataError(f"{len(short)} class(es) have fewer than k_shot + n_query = {needed} distinct texts "
                            f"(once cut to max_len={max_len} characters, and every character from U+00FF up read "
                            f"as one token): {shown}")

    def _distinct_rows(self, texts: list[str]) -> torch.Tensor:
        """[distinct texts, max_len]: the texts' token rows, each distinct row once, in first-seen order."""
        rows = {}
        for text in texts:
            row = self._tokens(text)
            rows.setdefault(row.numpy().tobytes(), row)
        return torch.stack(list(rows.values())) if rows else torch.empty((0, self.max_len), dtype=torch.int64)

    def _tokens(self, text: str) -> torch.Tensor:
        tokens = encode(text)[:self.max_len]
        return torch.cat([tokens, torch.full((self.max_len - tokens.numel(),), PAD, dtype=torch.int64)])

    def batch(self, index: int, num_tasks: int) -> EpisodeBatch:
        """Batch number ``index``: ``num_tasks`` episodes, each ``n_way`` classes drawn anew and labelled
        0..n_way-1 in the order drawn, with disjoint support and query texts; a pure function of the seed
        and ``index``."""
        num_tasks, = positive_ints(num_tasks=num_tasks)
        gen = batch_generator(self.seed, index)
        support, query, names = [], [], []
        for _ in range(num_tasks):
            picks = torch.randperm(len(self.names), generator=gen)[:self.n_way].tolist()
            s, q = [], []
            for c in picks:
                rows = self.tokens[c][torch.randperm(self.tokens[c].shape[0], generator=gen)[:self.k_shot + self.n_query]]
                s.append(rows[:self.k_shot])
                q.append(rows[self.k_shot:])
            support.append(torch.cat(s))
            query.append(torch.cat(q))
            names.append([self.names[c] for c in picks])
        labels = torch.arange(self.n_way)
        return EpisodeBatch(
            (torch.stack(support), labels.repeat_interleave(self.k_shot).expand(num_tasks, -1).contiguous()),
            (torch.stack(query), labels.repeat_interleave(self.n_query).expand(num_tasks, -1).contiguous()),
            names,
        )
