"""Character tokens and text domains.

Tokens: one per character, ``min(ord(c), 255)``: Latin-1 characters keep their code point and every
other character becomes 255 (shown as U+FFFD by :func:`decode`).  The vocabulary is therefore 256 and
a loss in nats per token is a loss per character (bits per character = nats / ln 2).  Code 0 (NUL,
absent from text) pads classification inputs (:data:`PAD`).

Domains: a mapping name -> text.  :func:`stdlib_domains` builds them from the text every Python
installation carries: the docstrings of the standard-library modules (one domain per top-level module
or package, read with ``ast`` so nothing is imported) and ``pydoc_data.topics`` (one domain).  The
exact text depends on the Python version.  :func:`folder_domains` reads a folder of text files, one
domain each.  :func:`split_domains` assigns domains to disjoint meta-train / meta-validation / meta-test
splits.
"""
from __future__ import annotations

import ast
import functools
import os
import sysconfig
from collections.abc import Mapping

import numpy as np
import torch

from ..ops._checks import require_int

VOCAB_SIZE = 256
PAD = 0
_UNKNOWN = 255
_SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                     "ensurepip", "turtledemo"}


class DataError(ValueError):
    """A data file or domain is missing, malformed or too small; the message names it."""


def positive_ints(**values) -> list[int]:
    """The values as ints, in order; ValueError naming the first that is not an int >= 1 (require_int)."""
    return [require_int(name, value, 1) for name, value in values.items()]


def encode(text: str) -> torch.Tensor:
    """int64 tokens [len(text)]: min(ord(c), 255) per character."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(np.minimum(codes, _UNKNOWN).astype(np.int64))


def decode(tokens) -> str:
    """The text of ``encode``'s tokens; token 255 (any character from U+00FF up) comes back as U+FFFD."""
    return "".join("\ufffd" if t == _UNKNOWN else chr(t) for t in torch.as_tensor(tokens).tolist())


def _docstrings(source: str) -> list[str]:
    """The docstrings of a module's source: the module's, then its classes' and functions'."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                         ast.AsyncFunctionDef)))
    return [doc for doc in (ast.get_docstring(n, clean=True) for n in nodes) if doc]


def _module_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_PACKAGES)
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(".py"))
    return files


@functools.lru_cache(maxsize=4)
def _stdlib_texts(stdlib: str) -> tuple[tuple[str, str], ...]:
    domains = []
    for entry in sorted(os.listdir(stdlib)):
        path = os.path.join(stdlib, entry)
        is_package = os.path.isdir(path) and os.path.exists(os.path.join(path, "__init__.py"))
        if entry in _SKIPPED_PACKAGES or entry.startswith(("_", ".")) or not (is_package or entry.endswith(".py")):
            continue
        docs = []
        for file in _module_files(path):
            with open(file, encoding="utf-8", errors="replace") as f:
                docs.extend(_docstrings(f.read()))
        name = entry[:-3] if entry.endswith(".py") else entry
        domains.append((name, "\n\n".join(docs)))
    try:
        from pydoc_data.topics import topics
        domains.append(("pydoc_data.topics", "\n\n".join(topics[key] for key in sorted(topics))))
    except ImportError:
        pass
    return tuple(domains)


def stdlib_domains(min_chars: int = 2000) -> dict[str, str]:
    """{module name: its docstrings} for the standard library of this Python, plus pydoc_data.topics;
    domains shorter than ``min_chars`` characters are left out."""
    stdlib = sysconfig.get_paths()["stdlib"]
    domains = {name: text for name, text in _stdlib_texts(stdlib) if len(text) >= min_chars}
    if not domains:
        raise DataError(f"no standard-library docstrings of at least {min_chars} characters under {stdlib}")
    return domains


def folder_domains(path: str | os.PathLike, min_chars: int = 1) -> dict[str, str]:
    """{file name without extension: its text} for the ``*.txt`` files of a folder (UTF-8)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder (expected a folder of .txt files, one domain each)")
    domains = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".txt"):
            continue
        file = os.path.join(path, name)
        text = read_utf8(file)
        if len(text) < min_chars:
            raise DataError(f"{file}: {len(text)} characters, fewer than the {min_chars} a domain needs")
        domains[name[:-4]] = text
    if not domains:
        raise DataError(f"{path}: holds no .txt files (one file per domain)")
    return domains


def read_utf8(file: str) -> str:
    """The text of ``file``; a DataError naming it where it is not UTF-8 or cannot be read.  A leading byte
    order mark (Windows editors write one) is not part of the text."""
    try:
        with open(file, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except FileNotFoundError:
        raise DataError(f"{file}: file not found") from None
    except OSError as e:
        raise DataError(f"{file}: cannot be read ({e.strerror})") from None


def split_domains(names, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict[str, list[str]]:
    """Disjoint {"train", "val", "test"} lists of domain names: a seeded permutation of the sorted names,
    cut by ``fractions``; validation and test each get at least one domain."""
    names = sorted(names)
    if len(names) < 3:
        raise DataError(f"{len(names)} domains cannot be split into disjoint train/val/test; at least 3 are needed")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers with a positive sum, got {fractions}")
    total = sum(fractions)
    n_val = max(1, round(len(names) * fractions[1] / total))
    n_test = max(1, round(len(names) * fractions[2] / total))
    n_train = len(names) - n_val - n_test
    if n_train < 1:
        raise DataError(f"{len(names)} domains leave none for meta-training with fractions {fractions}")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [names[i] for i in order]
    return {"train": sorted(shuffled[:n_train]), "val": sorted(shuffled[n_train:n_train + n_val]),
            "test": sorted(shuffled[n_train + n_val:])}


def subset(domains: Mapping[str, str], names) -> dict[str, str]:
    return {name: domains[name] for name in names}
