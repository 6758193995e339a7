"""Gate and up of a Llama MLP at decode token counts: two launches, one stacked launch, one stacked
launch with the SiLU-multiply in its epilogue, each against cuBLAS in the same process.

The planner credits a stacked launch with the fingerprint's price of the stacked shape, which the
grid does not hold for Llama-3-8B's gate/up (28672 x 4096: extrapolated). This bench measures what
each way of running the pair costs per format, so ``stack_pays`` / ``epilogue_pays`` follow
measurements. Per (format, M), CUDA-graph replay (sparsec's Clock, median after warm-up), weights and
inputs rotated past the L2, random normal data; the SiLU-multiply in torch where not fused:

* dense: cuBLAS on gate, on up, and the SiLU-multiply (also as one stacked cuBLAS call);
* two: the format's launch on gate, on up;
* stacked: one launch over the stacked weight, the SiLU-multiply after it;
* fused: the stacked launch with the SiLU-multiply in its epilogue (where the format has one).

    python3 bench/stacked.py --formats block:64:0.25,2:4,act:0.5 --M 1,2,3,4,8 --out $OUT
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
from sparsec.codegen import linear, linear_epilogue, pack  # noqa: E402
from sparsec.codegen.epilogue import Epilogue  # noqa: E402
from sparsec.codegen.packed import stack_rows  # noqa: E402
from sparsec.fingerprint.timing import Clock, TimingPolicy, rotation_count  # noqa: E402
from sparsec.formats import parse_spec  # noqa: E402

ROTATION_BYTES = 512 << 20


def silu_mul(g, u):
    return (F.silu(g.float()) * u.float()).to(g.dtype)


def inputs(M, K, spec, gen, dtype):
    """Unit-normal inputs; for act:S, every token's small entries at the same channels (S of them)."""
    x = torch.randn(M, K, generator=gen, device="cuda")
    skip = getattr(parse_spec(spec), "skip", None)
    if skip is not None:
        t = normal_threshold(skip)
        quiet = torch.rand(K, generator=gen, device="cuda") < skip
        big = x.abs().clamp_min(t * 1.01) * torch.where(x < 0, -1.0, 1.0)
        x = torch.where(quiet[None, :], x.clamp(-t * 0.99, t * 0.99), big)
    return x.to(dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="block:64:0.25,2:4,act:0.5")
    ap.add_argument("--M", default="1,2,3,4,8")
    ap.add_argument("--N", type=int, default=14336)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    Ms = [int(m) for m in args.M.split(",")]
    N, K, dtype = args.N, args.K, torch.bfloat16
    clock = Clock(torch.device("cuda"), TimingPolicy())
    gen = torch.Generator(device="cuda").manual_seed(0)

    def timed(calls):
        return clock.graph(calls, clock.warm(calls))

    copies = rotation_count(2 * N * K * 2, ROTATION_BYTES, cap=8)
    pairs = [tuple((torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype) for _ in range(2))
             for _ in range(copies)]
    stacked_dense = [torch.cat(p) for p in pairs]
    ep = Epilogue(gate_row=0, up_row=N, width=N)
    rows = []
    for spec in args.formats.split(","):
        packs = [tuple(pack(spec, w) for w in p) for p in pairs]
        stacked = [stack_rows(list(p)) for p in packs]
        if stacked[0] is None:
            print(f"{spec}: its layout does not stack; skipped", flush=True)
            continue
        handler = stacked[0].handler
        aux = [handler.epilogue_aux(s, ep) for s in stacked]
        for M in Ms:
            xs = [inputs(M, K, spec, gen, dtype) for _ in range(copies)]
            got = linear_epilogue(xs[0], stacked[0], None, ep, aux=aux[0]).float()
            want = silu_mul(linear(xs[0], packs[0][0]).float(), linear(xs[0], packs[0][1]).float()).float()
            row = {"format": spec, "M": M, "N": N, "K": K,
                   "fused_vs_two_rel_err": float((got - want).norm() / want.norm().clamp_min(1e-12)),
                   "dense_us": timed([lambda x=x, p=p: silu_mul(F.linear(x, p[0]), F.linear(x, p[1]))
                                      for x, p in zip(xs, pairs)]),
                   "dense_stacked_us": timed([lambda x=x, w=w: silu_mul(*F.linear(x, w).split(N, dim=1))
                                              for x, w in zip(xs, stacked_dense)]),
                   "two_us": timed([lambda x=x, p=p: silu_mul(linear(x, p[0]), linear(x, p[1]))
                                    for x, p in zip(xs, packs)]),
                   "stacked_us": timed([lambda x=x, s=s: silu_mul(*linear(x, s).split(N, dim=1))
                                        for x, s in zip(xs, stacked)]),
                   "fused_us": timed([lambda x=x, s=s, a=a: linear_epilogue(x, s, None, ep, aux=a)
                                      for x, s, a in zip(xs, stacked, aux)])}
            for k in ("dense_us", "dense_stacked_us", "two_us", "stacked_us", "fused_us"):
                row[k] = round(row[k], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = device_meta("CUDA-graph replay, median; weights rotated past the L2")
    write_rows(args.out, "stacked.json", meta, rows)
    print(f"\n{heading(meta)}; gate+up {N}x{K} each, "
          "µs (x vs dense two cuBLAS calls + SiLU-multiply)")
    print(f"{'format':>14} {'M':>3} {'dense':>8} {'dense stk':>10} {'two':>14} {'stacked':>14} {'fused':>14}")
    for r in rows:
        d = r["dense_us"]
        cells = " ".join(f"{r[k]:>7.1f} ({d / r[k]:.2f})" for k in ("two_us", "stacked_us", "fused_us"))
        print(f"{r['format']:>14} {r['M']:>3} {d:>8.1f} {r['dense_stacked_us']:>10.1f} {cells}")


if __name__ == "__main__":
    main()
