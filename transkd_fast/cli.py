"""The ``transkd-fast`` command line (also ``python -m transkd_fast`` and ``python -m transkd_fast.cli``).

Subcommands register themselves in :data:`SUBCOMMANDS` as ``name -> (help, add_arguments,
run)``; the engine (#6) adds train/distill/evaluate/demo and the reports (#7) add
report/bench.

Exit codes: 0 success; 2 a user error — one line ``transkd-fast: error: …`` naming the flag or
file, no traceback (``--debug`` prints it); 3 a non-finite loss stopped training; 130 stopped by
SIGINT (Ctrl-C), 143 by SIGTERM, each after writing a checkpoint. Negative numbers are values
(``--lr -1e-3`` reaches the validation, which refuses it).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional

import transkd_fast

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}

PROG = "transkd-fast"
USER_ERROR_EXIT = 2


def _load_subcommands() -> None:
    """Import the modules that define subcommands (each is optional while being built)."""
    import importlib

    for mod in ("transkd_fast.engine.commands", "transkd_fast.reports", "transkd_fast.deploy_commands"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


class Parser(argparse.ArgumentParser):
    """argparse with numbers like ``-1e-3`` taken as values, and one-line errors."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        sys.stderr.write(f"{PROG}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(USER_ERROR_EXIT)


def build_parser() -> argparse.ArgumentParser:
    _load_subcommands()
    p = Parser(prog=PROG, description="Fast, faithful TransKD for SegFormer.")
    p.add_argument("--version", action="version", version=f"transkd-fast {transkd_fast.__version__}")
    p.add_argument("--backend", choices=transkd_fast.BACKENDS, default=None,
                   help="kernel backend for every op (default: $TRANSKD_FAST_BACKEND or auto)")
    p.add_argument("--debug", action="store_true", help="print the traceback of a user error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_args, _run) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        add_args(sp)
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of a user error")
    return p


def user_error_types() -> tuple[type, ...]:
    """Exceptions that mean "the input is wrong" (a flag, a file), not "the program is wrong"."""
    from transkd_fast.backend import BackendError

    types: list[type] = [ValueError, OSError, BackendError]
    try:
        from transkd_fast.models.checkpoints import CheckpointError

        types.append(CheckpointError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from transkd_fast.data import DataError  # type: ignore[attr-defined]

        types.append(DataError)
    except ImportError:
        pass
    return tuple(types)


def one_line(e: BaseException) -> str:
    """The error as one line. A DataLoader worker's re-raised error gives the original message."""
    msg = str(e) or type(e).__name__
    if "Original Traceback" in msg:  # "Caught X in DataLoader worker process 0.\nOriginal Traceback ...\nX: msg"
        last = [line for line in msg.splitlines() if line.strip()][-1].strip()
        name, sep, rest = last.partition(": ")
        msg = rest if sep and " " not in name else last
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    out = lines[0] if lines else type(e).__name__
    if len(lines) > 1:
        out += " (more with --debug)"
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        if args.backend:
            transkd_fast.set_backend(args.backend)
        if not args.command:
            parser.print_help()
            return 0
        return SUBCOMMANDS[args.command][2](args) or 0
    except user_error_types() as e:
        if debug:
            import traceback

            traceback.print_exc()
        else:
            sys.stderr.write(f"{PROG}: error: {one_line(e)}\n")
        return USER_ERROR_EXIT


if __name__ == "__main__":
    # ``python -m transkd_fast.cli``: this file runs as ``__main__``, while the subcommands
    # register in the importable ``transkd_fast.cli``: dispatch through that one.
    from transkd_fast.cli import main as _main

    sys.exit(_main())
