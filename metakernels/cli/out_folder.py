"""The --out folder of a command, made ready before the command's work, so that a path that cannot be a
folder is reported at once and not when the first file is written, minutes or hours later."""
from __future__ import annotations

import os


def prepare_out_folder(out: str, receives: str) -> str | None:
    """Creates the folder ``out`` (and its parents) if needed; returns why it cannot be, or None.
    ``receives`` says what the folder is for, in the message."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out} is a file; expected a folder (it receives {receives})"
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        return f"--out {out}: cannot create the folder: {e.strerror}"
    return None
