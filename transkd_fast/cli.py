"""The ``transkd-fast`` command line.

Subcommands register themselves in :data:`SUBCOMMANDS` as ``name -> (help, add_arguments,
run)``; the engine (#6) adds train/distill/evaluate/demo and the reports (#7) add
report/bench.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

import transkd_fast

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _load_subcommands() -> None:
    """Import the modules that define subcommands (each is optional while being built)."""
    import importlib

    for mod in ("transkd_fast.engine.commands", "transkd_fast.reports"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_subcommands()
    p = argparse.ArgumentParser(prog="transkd-fast", description="Fast, faithful TransKD for SegFormer.")
    p.add_argument("--version", action="version", version=f"transkd-fast {transkd_fast.__version__}")
    p.add_argument("--backend", choices=transkd_fast.BACKENDS, default=None,
                   help="kernel backend for every op (default: $TRANSKD_FAST_BACKEND or auto)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, _run) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backend:
        transkd_fast.set_backend(args.backend)
    if not args.command:
        parser.print_help()
        return 0
    return SUBCOMMANDS[args.command][2](args) or 0


if __name__ == "__main__":
    sys.exit(main())
