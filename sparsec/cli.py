"""The ``sparsec`` command line: optimize, fingerprint and report subcommands.

Each subcommand lives in its own module under ``sparsec.commands`` and adds itself to the parser
through ``register(subparsers)``. Errors the user can act on (``SparsecError``) are printed as one
line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sparsec.errors import SparsecError

SUBCOMMANDS = ("optimize", "fingerprint", "report")


def build_parser() -> argparse.ArgumentParser:
    from sparsec import __version__

    parser = argparse.ArgumentParser(
        prog="sparsec",
        description="Rewrite a model's linear layers into the sparse or structured form this "
        "hardware serves faster, within an error budget, and explain every choice.",
    )
    parser.add_argument("--version", action="version", version=f"sparsec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"sparsec.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SparsecError as exc:
        print(f"sparsec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparsec: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
