"""act kernel launch-shape sweep on the device: block width, programs per SM, and up to how many
tokens the CUDA cores take the product (codegen/act.py's BLOCK_N_ONE/BLOCK_N_MANY, PROGRAMS_PER_SM, FMA_MAX_M),
each timed against cuBLAS under CUDA-graph replay on Llama-3-8B's MLP shapes, bf16, S = 0.5,
inputs whose tokens share their quiet channels (as in an LLM). Prints the ratio per setting.

    python bench/act_sweep.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from act import SHAPES, inputs  # noqa: E402
from sparsec.codegen import act as A  # noqa: E402
from sparsec.codegen import linear, pack  # noqa: E402
from sparsec.fingerprint.timing import Clock, TimingPolicy  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", default="1,2,4,8,16")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    Ms = [int(m) for m in args.M.split(",")]
    clock = Clock(torch.device("cuda"), TimingPolicy())
    gen = torch.Generator(device="cuda").manual_seed(0)
    settings = [(bn, pps, fma) for bn in (32, 64, 128) for pps in (1, 2, 4) for fma in (1, 4)]
    rows = []
    for N, K in SHAPES:
        ws = [(torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).bfloat16() for _ in range(4)]
        ps = [pack("act:0.5", w) for w in ws]
        for M in Ms:
            xs = [inputs(M, K, 0.5, True, gen, torch.bfloat16) for _ in range(4)]
            calls = [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)]
            dense = clock.graph(calls, clock.warm(calls))
            for bn, pps, fma in settings:
                if fma == 1 and M > 4 or (fma == 4 and M == 1):
                    continue  # the same launch as another setting
                A.BLOCK_N_ONE = A.BLOCK_N_MANY = bn
                A.PROGRAMS_PER_SM, A.FMA_MAX_M = pps, fma
                calls = [lambda x=x, p=p: linear(x, p) for x, p in zip(xs, ps)]
                us = clock.graph(calls, clock.warm(calls))
                row = {"N": N, "K": K, "M": M, "BLOCK_N": bn, "programs_per_sm": pps, "fma_max_m": fma,
                       "dense_us": round(dense, 2), "act_us": round(us, 2), "x": round(dense / us, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "act_sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print()
    for N, K in SHAPES:
        for M in Ms:
            best = sorted((r for r in rows if (r["N"], r["K"], r["M"]) == (N, K, M)), key=lambda r: -r["x"])[:3]
            print(f"{N}x{K} M={M}: " + "  ".join(f"{r['x']:.2f}x bn{r['BLOCK_N']}/pps{r['programs_per_sm']}/fma{r['fma_max_m']}"
                                                for r in best))


if __name__ == "__main__":
    main()
