"""Files written by the library: atomic (a temporary file in the same folder, fsync, then rename; a
symbolic link is written through to its target), and, for checkpoints, self-checking.

Checkpoint format: the magic line ``METAKERNELS\\n``, an 8-byte little-endian header length, a JSON header
``{"kind", "format_version", "length", "sha256", "meta"}``, then the payload written by ``torch.save``.
``load_checked`` verifies the magic, kind, version, length and SHA-256 before unpickling, and unpickles
with ``weights_only=True``: a truncated, corrupted or foreign file is refused with a message that names
the file and the problem.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import torch

MAGIC = b"METAKERNELS\n"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A file is not a valid metakernels checkpoint of the expected kind."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see either the old file or the complete new one.  A
    symbolic link is written through, as ``open(path, "wb")`` does: its target is replaced, and the link
    stays (replacing the link itself would leave the target stale)."""
    path = os.path.realpath(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600 files; keep the mode a plain open() would give
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _file_mode(path: str) -> int:
    """The replaced file's mode, or 0666 minus the umask for a new file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checked(path: str | os.PathLike, kind: str, obj, meta: dict | None = None) -> None:
    """Saves ``obj`` (tensors, numbers, strings, lists, dicts) as a checked checkpoint of ``kind``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    header = json.dumps({"kind": kind, "format_version": FORMAT_VERSION, "length": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest(), "meta": meta or {}}).encode("utf-8")
    atomic_write_bytes(path, MAGIC + len(header).to_bytes(8, "little") + header + payload)


def read_header(path: str | os.PathLike, kind: str) -> tuple[dict, bytes]:
    """(header, payload) of a checked checkpoint, verified; raises CheckpointError otherwise."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path}: not a metakernels checkpoint (it does not start with {MAGIC!r})")
    start = len(MAGIC) + 8
    if len(data) < start:
        raise CheckpointError(f"{path}: truncated (the header is incomplete)")
    size = int.from_bytes(data[len(MAGIC):start], "little")
    try:
        header = json.loads(data[start:start + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupted (the header is not valid JSON)") from None
    if header.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {header.get('kind')!r}, expected a {kind!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {header.get('format_version')} is not supported "
                              f"(this metakernels reads version {FORMAT_VERSION})")
    payload = data[start + size:]
    if len(payload) != header.get("length"):
        raise CheckpointError(f"{path}: truncated or extended: payload is {len(payload)} bytes, "
                              f"the header says {header.get('length')}")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path}: corrupted (SHA-256 of the payload does not match the header)")
    return header, payload


def load_checked(path: str | os.PathLike, kind: str, map_location=None) -> tuple[dict, object]:
    """(meta, obj) of a checkpoint written by :func:`save_checked`."""
    header, payload = read_header(path, kind)
    return header["meta"], torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
