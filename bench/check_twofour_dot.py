"""The 2:4 expansion + MMA kernel (M = 2..16): metadata read as int32 words or as bytes.

Both ways of reading the metadata (``codegen/twofour.py``,
``DOT_META_WORDS``: int32 words of two quads, or bytes) are checked against
float64 and timed in alternating rounds in one process, with bench/kernel_bench.py's method
(CUDA-graph replay over >= 256 MB of rotated weight copies, median of 30 replays, random data),
on the Llama-3-8B shapes.

    python3 bench/check_twofour_dot.py --out $OUT/twofour_dot.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from kernel_bench import MAX_COPIES, REL_TOL, ROTATE_BYTES, make_packed, rel_err, time_calls  # noqa: E402

from sparsec.codegen import twofour  # noqa: E402

VARIANTS = ("words", "bytes")
SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 4096))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="2,4,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "twofour_dot.json"))
    args = ap.parse_args()
    import triton

    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(3)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda}
    print(f"# {meta}", flush=True)
    rows = []
    for N, K in SHAPES:
        copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (N * K))))
        packs = [make_packed("2:4", N, K, dtype, device, gen) for _ in range(copies)]
        dense = packs[0].to_dense().double()
        for M in (int(m) for m in args.tokens.split(",")):
            x = torch.randn(M, K, generator=gen, device=device).to(dtype)
            ref = x.double() @ dense.t()
            row = {"N": N, "K": K, "M": M, "us": {v: [] for v in VARIANTS}, "rel_err": {}}
            for r in range(args.rounds):
                for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                    twofour.DOT_META_WORDS = variant == "words"
                    if r == 0:
                        t = packs[0].tensors()
                        y = twofour.twofour_triton(x, t["values"], t["meta"], None, path="dot")
                        row["rel_err"][variant] = rel_err(y, ref)
                    calls = [lambda t=p.tensors(): twofour.twofour_triton(x, t["values"], t["meta"], None, path="dot")
                             for p in packs]
                    row["us"][variant].append(time_calls(calls, device, 30))
            row["ok"] = all(e < REL_TOL[dtype] for e in row["rel_err"].values())
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("\n| N x K | M | " + " | ".join(f"{v} us" for v in VARIANTS) + " | checks |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|")
    for row in rows:
        cells = " | ".join(f"{statistics.median(row['us'][v]):.1f}" for v in VARIANTS)
        print(f"| {row['N']}x{row['K']} | {row['M']} | {cells} | {'ok' if row['ok'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
