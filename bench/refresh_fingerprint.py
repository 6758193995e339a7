"""Bring a shipped fingerprint up to date after kernel changes, on the device it names.

Run from a checkout (no install needed)::

    python3 bench/refresh_fingerprint.py fingerprints/h200.json --redo cusparselt --extend \\
        --small-m sparsec-triton-2:4,sparsec-triton-block --up-to 4

Steps, each resumable through the file itself: measure the ``--redo`` kernels again at every M
(and continue curves stopped early with ``--extend``), then the ``--small-m`` kernels again at
M <= ``--up-to`` only. Every kernel is checked against dense before it is timed, as in
``sparsec fingerprint measure``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from sparsec.fingerprint.measure import measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("fingerprint", type=Path)
    ap.add_argument("--redo", default="", help="kernels or families to measure again at every M (comma-separated)")
    ap.add_argument("--extend", action="store_true", help="continue curves stopped early")
    ap.add_argument("--small-m", default="", help="kernels to measure again at M <= --up-to (comma-separated)")
    ap.add_argument("--up-to", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=420)
    args = ap.parse_args()
    redo = [k for k in args.redo.split(",") if k]
    small = [k for k in args.small_m.split(",") if k]
    if redo or args.extend:
        measure(args.fingerprint, redo=redo or None, extend=args.extend, budget_s=args.budget_s)
    if small:
        measure(args.fingerprint, redo=small, redo_up_to=args.up_to, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
