"""act:S per layer on the device: the Triton kernel against cuBLAS at decode token counts.

For Llama-3-8B's MLP shapes (gate/up 14336 x 4096, down 4096 x 14336) in bf16, at M tokens and
skip fraction S, times under CUDA-graph replay (sparsec's Clock, median after warm-up, inputs and
weights rotated past the L2):

* cuBLAS ``F.linear`` on the dense weight (the baseline);
* sparsec's act kernel on the same weight, inputs whose entries fall under the threshold with
  probability S independently (the worst case for the union of several tokens' kept inputs), and
  inputs whose tokens share which entries are small (``shared``: one channel mask, as in an
  LLM where some channels are always quiet).

It prints the ratio to cuBLAS and the fraction of the byte floor reached: the bytes the kernel must
read (the union of kept rows, plus x and y) over the read bandwidth cuBLAS reaches on the dense
weight in the same run.

    python bench/act.py --out $OUT
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

from device_results import device_meta, heading, write_rows  # noqa: E402
from sparsec.activation import normal_threshold  # noqa: E402
from sparsec.codegen import linear, pack  # noqa: E402
from sparsec.fingerprint.timing import Clock, TimingPolicy, rotation_count  # noqa: E402

SHAPES = ((14336, 4096), (4096, 14336))
ROTATION_BYTES = 512 << 20


def inputs(M, K, skip, shared, gen, dtype):
    """Unit-normal inputs; with ``shared``, every token's small entries at the same channels."""
    x = torch.randn(M, K, generator=gen, device="cuda")
    t = normal_threshold(skip)
    if shared:
        quiet = torch.rand(K, generator=gen, device="cuda") < skip
        big = x.abs().clamp_min(t * 1.01) * x.sign().where(x != 0, torch.ones_like(x))
        small = x.clamp(-t * 0.99, t * 0.99)
        x = torch.where(quiet[None, :], small, big)
    return x.to(dtype)


def time_graph(clock, calls):
    single = clock.warm(calls)
    return clock.graph(calls, single)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", default="1,2,4,8,16")
    ap.add_argument("--skips", default="0.4,0.5")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    Ms = [int(m) for m in args.M.split(",")]
    skips = [float(s) for s in args.skips.split(",")]
    dtype = torch.bfloat16
    clock = Clock(torch.device("cuda"), TimingPolicy())
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for N, K in SHAPES:
        copies = rotation_count(N * K * 2, ROTATION_BYTES, cap=8)
        ws = [(torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype) for _ in range(copies)]
        for skip in skips:
            packs = [pack(f"act:{skip:g}", w) for w in ws]
            t = normal_threshold(skip)
            for M in Ms:
                for shared in (False, True):
                    xs = [inputs(M, K, skip, shared, gen, dtype) for _ in range(copies)]
                    dense = time_graph(clock, [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)])
                    act = time_graph(clock, [lambda x=x, p=p: linear(x, p) for x, p in zip(xs, packs)])
                    kept = float((xs[0].float().abs() >= t).any(0).float().mean())
                    bw = (N * K + M * K + M * N) * 2 / (dense * 1e-6)
                    floor_us = (kept * N * K + M * K + M * N) * 2 / bw * 1e6
                    row = {"N": N, "K": K, "M": M, "skip": skip, "inputs": "shared" if shared else "independent",
                           "kept_rows": round(kept, 4), "dense_us": round(dense, 2), "act_us": round(act, 2),
                           "x_vs_cublas": round(dense / act, 3), "of_floor": round(floor_us / act, 3),
                           "cublas_GBps": round(bw / 1e9, 1)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    meta = device_meta("CUDA-graph replay, median")
    write_rows(args.out, "act.json", meta, rows)
    print(f"\n{heading(meta)}")
    print(f"{'N x K':>12} {'S':>4} {'inputs':>11} " + " ".join(f"{'M=' + str(m):>14}" for m in Ms))
    for N, K in SHAPES:
        for skip in skips:
            for kind in ("independent", "shared"):
                cells = [next(r for r in rows if (r["N"], r["K"], r["skip"], r["M"], r["inputs"]) == (N, K, skip, m, kind))
                         for m in Ms]
                print(f"{N:>6}x{K:<5} {skip:>4g} {kind:>11} "
                      + " ".join(f"{c['x_vs_cublas']:>6.2f}x ({c['of_floor']:.0%})" for c in cells))


if __name__ == "__main__":
    main()
