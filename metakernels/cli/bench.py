"""``python -m metakernels bench``."""
from __future__ import annotations


def add_parser(commands) -> None:
    p = commands.add_parser("bench", help="kernel and end-to-end benchmark tables for this machine")
    p.set_defaults(handler=main)


def main(args) -> int:
    raise NotImplementedError
