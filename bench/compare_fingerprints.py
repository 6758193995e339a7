"""Where two devices' fingerprints price the same layer differently: predicted speed-up over dense.

    python bench/compare_fingerprints.py h100 h200 --mode graph

For each layer shape and M, every format setting's predicted speed-up over dense on each device
(a star marks a setting the fingerprint did not time there, which the planner never chooses on
its own), and the settings faster than dense on one device but not on the other: where the
planner, given the same model and budget, chooses differently.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

SHAPES = ((14336, 4096), (4096, 14336), (3072, 768), (768, 3072))  # Llama-3-8B MLP, ViT-B MLP
SPECS = ("2:4", "block:64:0.25", "block:64:0.5", "lowrank:1024", "lowrank:2048", "monarch:4")


def main(argv=None) -> int:
    import sparsec
    from sparsec.formats import parse_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fingerprints", nargs=2)
    ap.add_argument("--mode", default="graph", choices=("eager", "graph"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--M", default="1,16,2048")
    args = ap.parse_args(argv)
    fps = [sparsec.load_fingerprint(f) for f in args.fingerprints]
    names = [fp.name for fp in fps]
    print(f"predicted speed-up over dense, {args.dtype}, {args.mode} mode ({' / '.join(names)}); * = not timed there")
    print(f"{'N x K':>12} {'M':>5}  " + "  ".join(f"{s:>15}" for s in SPECS))
    differ = []
    for N, K in SHAPES:
        for M in (int(m) for m in args.M.split(",")):
            cells = []
            for spec in SPECS:
                if parse_spec(spec).check(N, K):
                    cells.append(f"{'n/a':>15}")
                    continue
                xs = []
                for fp in fps:
                    p = fp.predict_detail(spec, M, N, K, dtype=args.dtype, mode=args.mode)
                    dense = fp.predict("dense", M, N, K, args.dtype, args.mode)
                    xs.append((dense / p.us, bool(getattr(p, "unmeasured", ""))))
                cells.append(f"{' / '.join(f'{x:.2f}{chr(42) if u else chr(32)}' for x, u in xs):>15}")
                wins = [x > 1.0 and not u for x, u in xs]
                if wins[0] != wins[1]:
                    differ.append(f"{N}x{K} M={M} {spec}: faster than dense on {names[wins.index(True)]} only "
                                  f"({xs[0][0]:.2f}x / {xs[1][0]:.2f}x)")
            print(f"{f'{N}x{K}':>12} {M:>5}  " + "  ".join(cells))
    print("\nchosen differently (faster than dense and timed on one device only):")
    print("\n".join(differ) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
