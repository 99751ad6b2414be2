"""The `tkernels` command. Each subcommand lives in its own module with `add_arguments(parser)`
and `run(args) -> int`; this file only dispatches, so importing it stays cheap."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

SUBCOMMANDS = {
    "train": ("train", "train a reference model on scikit-learn's digits (the demo)"),
    "bench": ("bench", "benchmark the kernels against torch eager and torch.compile"),
    "inspect": ("inspect", "compile every kernel config for sm_80/sm_90 and report its resources"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tkernels", description="Fused Triton kernels for classic deep networks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:  # a subcommand whose module is not there yet
            if exc.name != f"{__name__}.{module}":
                raise
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
