"""The ``sparsec`` command line: optimize, fingerprint and report subcommands.

Each subcommand lives in its own module under ``sparsec.commands`` and adds itself to the parser
through ``register(subparsers)``. Errors the user can act on (``SparsecError``) are printed as one
line and exit with status 2; an interrupt (Ctrl-C), even while the first imports run, exits 130
with one line; a closed output pipe ends the command quietly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sparsec import interrupts
from sparsec.errors import SparsecError

SUBCOMMANDS = ("optimize", "fingerprint", "report")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument said in one line (and where to read more) rather than the usage block."""

    def error(self, message: str):
        print(f"sparsec: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from sparsec import __version__

    parser = OneLineParser(
        prog="sparsec",
        description="Rewrite a model's linear layers into the sparse or structured form this "
        "hardware serves faster, within an error budget, and explain every choice.",
    )
    parser.add_argument("--version", action="version", version=f"sparsec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"sparsec.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    with interrupts.installed():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        logging.basicConfig(format="%(message)s")
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a bad argument already said in one line
            return exc.code if isinstance(exc.code, int) else 2
        interrupts.check()  # one that arrived while the imports ran may have been swallowed there
        return int(args.func(args) or 0)
    except SparsecError as exc:
        print(f"sparsec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written atomically, at the end: an interrupt leaves none
        print("sparsec: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``sparsec report diff ... | head``): stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that flushing at exit raises nothing more
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
