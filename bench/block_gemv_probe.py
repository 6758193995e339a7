"""Why a planned block-sparse down projection runs its GEMV slower than the fingerprint's random one.

On an H100 (2026-12-06, docs/benchmarks.md) the 4096 x 14336 down projection of the MLP stack,
block:64:0.25 at four tokens, measured 1.6x of cuBLAS in the planner's measure step and about
26 µs in the stack, where the fingerprint (random weights) has 4096 x 16384 at 16.8 µs. This probe
plans one block of that stack with the forced plan, takes the packed layers the lowering built,
and times each next to a freshly packed random weight of the same shape and to cuBLAS, with
programmatic dependent launch on and off (``SPARSEC_PDL``), at M = 1, 2, 4 (CUDA-graph replay,
median after warm-up, copies rotated past the L2). It prints one line per case.

    python3 bench/block_gemv_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

import sparsec  # noqa: E402
from device_results import device_meta, heading, write_rows  # noqa: E402
from e2e import MLPStack  # noqa: E402
from sparsec.codegen import Packed, linear, pack  # noqa: E402
from sparsec.codegen.module import PackedLinear  # noqa: E402
from sparsec.fingerprint.timing import Clock, TimingPolicy, rotation_count  # noqa: E402

ROTATION_BYTES = 512 << 20


def planned_packs(model, M, fingerprint):
    """The Packed weights the lowering of a forced block:64:0.25 plan built, by shape."""
    calib = [(torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16),) for _ in range(max(1, 2048 // M))]
    result = sparsec.optimize(model, calib[0], fingerprint=fingerprint, plan={"_default": "block:64:0.25"},
                              calibration=calib, recovery="none", error_budget=0.5, mode="reduce-overhead")
    with torch.no_grad():
        result.module(*calib[0])
    found = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, PackedLinear) and obj.spec.family == "block":
                found.setdefault(tuple(obj.shape), obj.packed)
        except ReferenceError:
            continue
    return found, result


def copies_of(p: Packed, n: int) -> list[Packed]:
    return [p] + [Packed(p.spec, p.shape, {k: t.clone() for k, t in p.tensors().items()}, p.crossover_m)
                  for _ in range(n - 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fingerprint", default="auto")
    ap.add_argument("--M", default="1,2,4")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = MLPStack(blocks=1).to("cuda", torch.bfloat16)
    found, result = planned_packs(model, 4, args.fingerprint)
    clock = Clock(torch.device("cuda"), TimingPolicy())
    rows = []
    for shape, planned in sorted(found.items()):
        N, K = shape
        counts = (planned.tensors()["row_ptr"][1:] - planned.tensors()["row_ptr"][:-1]).float()
        n = rotation_count(planned.nbytes, ROTATION_BYTES, cap=8)
        dense = [(torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16) for _ in range(n)]
        cases = {"planned": copies_of(planned, n), "random": [pack("block:64:0.25", w) for w in dense]}
        for M in [int(m) for m in args.M.split(",")]:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
            calls = [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, dense)]
            cublas = clock.graph(calls, clock.warm(calls))
            for pdl in ("1", "0"):
                os.environ["SPARSEC_PDL"] = pdl
                for name, packs in cases.items():
                    calls = [lambda x=x, p=p: linear(x, p) for x, p in zip(xs, packs)]
                    us = clock.graph(calls, clock.warm(calls))
                    row = {"N": N, "K": K, "M": M, "weight": name, "pdl": pdl == "1", "us": round(us, 2),
                           "cublas_us": round(cublas, 2), "x_vs_cublas": round(cublas / us, 3),
                           "blocks_per_row": [int(counts.min()), round(float(counts.mean()), 1), int(counts.max())]}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    os.environ.pop("SPARSEC_PDL", None)
    meta = device_meta("CUDA-graph replay, median; weights rotated past the L2")
    write_rows(args.out, "block_gemv_probe.json", meta, rows)
    print(f"\n{heading(meta)}")
    for r in rows:
        print(f"{r['N']:>6}x{r['K']:<6} M={r['M']} pdl={int(r['pdl'])} {r['weight']:>8}: {r['us']:>6.1f} us "
              f"({r['x_vs_cublas']:.2f}x of {r['cublas_us']:.1f})")


if __name__ == "__main__":
    main()
