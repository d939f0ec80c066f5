"""The command line: ``python -m metakernels train`` (the main job) and ``python -m metakernels bench``."""
from __future__ import annotations

import argparse
import sys

from . import bench, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metakernels",
                                     description="Fast, exact meta-learning for PyTorch language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_parser(commands)
    bench.add_parser(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted" + (f"; continue with --resume --out {args.out}" if getattr(args, "out", None) else ""),
              file=sys.stderr)
        return 130
