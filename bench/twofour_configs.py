"""Every small-M configuration of the 2:4 expansion + MMA kernel, each alone, against cuBLAS.

The autotuner keeps one configuration per shape and token count; this bench times all of them on
the Llama-3-8B MLP shapes (bf16, CUDA-graph replay, median after warm-up, weights and inputs
rotated past the L2, random normal data), each checked against float64 first, for both paths that
use the kernel ("dot": one program per output tile; "dot_split": K cut over several programs), so
a family of configurations under trial is judged on every cell, not only where it won. The summary
compares the best configuration flagged ``PREFETCH`` (loading the next tile while this one expands:
timed on an H100 on 2026-12-06, slower in every cell, and removed; docs/benchmarks.md) with the
best of the others; configurations without that flag fill the first column only.

    python3 bench/twofour_configs.py --M 4,8,16 --out $OUT
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
from kernel_bench import REL_TOL, make_packed, rel_err  # noqa: E402
from sparsec.codegen import twofour  # noqa: E402
from sparsec.fingerprint.timing import Clock, TimingPolicy, rotation_count  # noqa: E402

SHAPES = ((14336, 4096), (4096, 14336))
ROTATION_BYTES = 512 << 20


def label(config) -> str:
    kw = config.kwargs
    flags = "".join(f" {k.lower()}" for k in ("SWAP", "PREFETCH") if kw.get(k))
    return f"{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}{flags}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", default="4,8,16")
    ap.add_argument("--paths", default="dot,dot_split")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    Ms = [int(m) for m in args.M.split(",")]
    paths = args.paths.split(",")
    device, dtype = torch.device("cuda"), torch.bfloat16
    clock = Clock(device, TimingPolicy())
    gen = torch.Generator(device=device).manual_seed(0)
    configs = [c for c in twofour._KERNEL.configs if c.kwargs["BLOCK_M"] == 16]
    rows = []
    for N, K in SHAPES:
        copies = rotation_count(N * K * 2, ROTATION_BYTES, cap=8)
        packs = [make_packed("2:4", N, K, dtype, device, gen) for _ in range(copies)]
        dense = [p.to_dense() for p in packs]
        for M in Ms:
            xs = [torch.randn(M, K, generator=gen, device=device).to(dtype) for _ in range(copies)]
            calls = [lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, dense)]
            cublas = clock.graph(calls, clock.warm(calls))
            ref = xs[0].double() @ dense[0].double().t()
            for path in paths:
                for config in configs:
                    row = {"N": N, "K": K, "M": M, "path": path, "config": label(config), "cublas_us": round(cublas, 2)}
                    with twofour._KERNEL.only(config):
                        try:
                            t0 = packs[0].tensors()
                            y = twofour.twofour_triton(xs[0], t0["values"], t0["meta"], None, path=path)
                            row["rel_err"] = rel_err(y, ref)
                            if row["rel_err"] > REL_TOL[dtype]:
                                row["error"] = f"wrong result: relative error {row['rel_err']:.3g}"
                            else:
                                calls = [lambda x=x, t=p.tensors(): twofour.twofour_triton(x, t["values"], t["meta"], None,
                                                                                           path=path)
                                         for x, p in zip(xs, packs)]
                                us = clock.graph(calls, clock.warm(calls))
                                row.update(us=round(us, 2), x_vs_cublas=round(cublas / us, 3))
                        except Exception as exc:  # noqa: BLE001 - one configuration's failure is a row
                            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    meta = device_meta("CUDA-graph replay, median; weights rotated past the L2")
    write_rows(args.out, "twofour_configs.json", meta, rows)
    print(f"\n{heading(meta)}: "
          "best configuration with and without PREFETCH, x vs cuBLAS")
    for N, K in SHAPES:
        for M in Ms:
            for path in paths:
                cell = [r for r in rows if (r["N"], r["K"], r["M"], r["path"]) == (N, K, M, path) and "us" in r]
                line = f"{N:>6}x{K:<6} M={M:<3} {path:<10}"
                for pre in (False, True):
                    mine = [r for r in cell if ("prefetch" in r["config"]) == pre]
                    if mine:
                        best = min(mine, key=lambda r: r["us"])
                        line += f" {'prefetch' if pre else 'plain':>8}: {best['us']:>6.1f} us {best['x_vs_cublas']:.2f}x ({best['config']})"
                print(line)


if __name__ == "__main__":
    main()
