"""Fused epilogues (codegen/epilogue.py) on the device: checked against fp32, then timed against the
same launches with the epilogue left to inductor, in one device call.

    python3 bench/check_epilogue.py --out $OUT/epilogue.json

One Llama-3-8B MLP block (gate/up 4096 -> 14336 stacked, down 14336 -> 4096, random normal
weights packed into each format) at the token counts where the format fuses
(``epilogue_pays``). Checked: the gated launch and the residual launch in bf16 and fp16 against
the fp32 product with the epilogue applied in fp32 (bf16 on the device, after the timing has
autotuned it; fp16 too under ``--smoke``, where autotuning is off). Timed (CUDA-graph replay over rotated
weight copies, bench/kernel_bench.py's ``time_calls``): the block as two fused launches against the
two unfused launches plus inductor's SiLU-multiply and residual kernels. Prints a table last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import REL_TOL, ROTATE_BYTES, MAX_COPIES, make_packed, rel_err, time_calls, _write  # noqa: E402

from sparsec.codegen import Epilogue, EpilogueLinear, PackedLinear, block, stack_rows, twofour  # noqa: E402
from sparsec.codegen import epilogue as ep  # noqa: E402

D, H = 4096, 14336
CASES = [("2:4", 1), ("block:64:0.25", 1), ("block:64:0.25", 4)]


def block_modules(spec, dtype, device, gen):
    gate, up, down = (make_packed(spec, n, k, dtype, device, gen) for n, k in ((H, D), (H, D), (D, H)))
    stacked = stack_rows([gate, up])
    return (EpilogueLinear(PackedLinear(stacked, impl="triton"), Epilogue(0, H, H)),
            EpilogueLinear(PackedLinear(down, impl="triton"), Epilogue(residual=True)),
            PackedLinear(stacked, impl="triton"), PackedLinear(down, impl="triton"))


def check(device, dtypes) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(7)
    rows = []
    for spec, M in CASES:
        for dtype in dtypes:
            gated, residual, stacked, down = block_modules(spec, dtype, device, gen)
            x = torch.randn(M, D, generator=gen, device=device).to(dtype)
            r = torch.randn(M, D, generator=gen, device=device).to(dtype)
            h = torch.randn(M, H, generator=gen, device=device).to(dtype)
            w_up = stacked.packed.to_dense().float()
            w_down = down.packed.to_dense().float()
            cases = {"gated": (gated(x), ep.apply(x.float() @ w_up.t(), 0, H, H, None)),
                     "residual": (residual(h, r), h.float() @ w_down.t() + r.float())}
            for what, (y, ref) in cases.items():
                err = rel_err(y, ref)
                rows.append({"spec": spec, "M": M, "dtype": str(dtype).replace("torch.", ""), "epilogue": what,
                             "rel_err": err, "ok": bool(err <= REL_TOL[dtype] and y.dtype == dtype)})
    return rows


def timing(device) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(11)
    dtype = torch.bfloat16
    silu_mul = torch.compile(lambda z: F.silu(z[..., :H]) * z[..., H:])
    add = torch.compile(lambda a, b: a + b)
    rows = []
    for spec, M in CASES:
        one = block_modules(spec, dtype, device, gen)
        nbytes = one[2].packed.nbytes + one[3].packed.nbytes
        copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))
        sets = [one] + [block_modules(spec, dtype, device, gen) for _ in range(copies - 1)]
        xs = [torch.randn(M, D, generator=gen, device=device).to(dtype) for _ in range(copies)]
        fused = [lambda x=x, m=m: m[1](m[0](x), x) for x, m in zip(xs, sets)]
        unfused = [lambda x=x, m=m: add(x, m[3](silu_mul(m[2](x)))) for x, m in zip(xs, sets)]
        with torch.no_grad():
            diff = rel_err(fused[0](), unfused[0]().float())
            us_fused = time_calls(fused, device, 30)
            us_unfused = time_calls(unfused, device, 30)
        rows.append({"spec": spec, "M": M, "fused_us": us_fused, "unfused_us": us_unfused,
                     "saved_us": us_unfused - us_fused, "fused_vs_unfused_rel": diff, "copies": copies})
        print(json.dumps(rows[-1]), flush=True)
        del sets
        torch.cuda.empty_cache()
    return rows


def sweep_configs(kernel: str):
    """The kernel's own configurations, then a grid of wider and deeper ones."""
    import triton

    if kernel == "words":
        out = list(twofour._words_configs())
        for bn, bj in ((1, 32), (2, 16), (2, 32), (4, 8), (4, 16), (8, 8), (8, 16), (16, 8)):
            for stages in (2, 3, 4):
                for warps in (2, 4, 8):
                    if bn * bj * 8 // (32 * warps) <= 32:
                        for tma in (True, False):
                            out.append(triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "STAGES": stages, "USE_TMA": tma},
                                                     num_warps=warps, num_stages=stages,
                                                     pre_hook=twofour._tma_block_shapes))
        return out
    out = list(block._gemv_configs())
    for bn in (2, 4, 8, 16):
        for bj in (2, 4, 8):
            for stages in (2, 4, 6):
                warps = max(1, min(8, bn * bj // 16))
                out.append(triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "STAGES": stages}, num_warps=warps,
                                         num_stages=stages))
    return out


SWEPT = {"gemv": ("block:64:0.25", lambda: block._GEMV_KERNEL), "words": ("2:4", lambda: twofour._WORDS_KERNEL)}


def sweep(device, budget_s: float, kernel: str) -> list[dict]:
    """Every configuration of the block GEMV (``kernel`` "gemv") or the 2:4 word kernel ("words")
    on the gated and the residual launch at M = 1, in graph replay."""
    import time

    spec, lazy = SWEPT[kernel][0], SWEPT[kernel][1]()
    gen = torch.Generator(device=device).manual_seed(13)
    dtype = torch.bfloat16
    one = block_modules(spec, dtype, device, gen)
    copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (one[2].packed.nbytes + one[3].packed.nbytes))))
    sets = [one] + [block_modules(spec, dtype, device, gen) for _ in range(copies - 1)]
    xs = [torch.randn(1, D, generator=gen, device=device).to(dtype) for _ in range(copies)]
    hs = [torch.randn(1, H, generator=gen, device=device).to(dtype) for _ in range(copies)]
    launches = {"gated": [lambda x=x, m=m: m[0](x) for x, m in zip(xs, sets)],
                "residual": [lambda h=h, x=x, m=m: m[1](h, x) for h, x, m in zip(hs, xs, sets)]}
    rows, t0 = [], time.time()
    with torch.no_grad():
        for what, calls in launches.items():
            us = time_calls(calls, device, 30)
            picked = getattr(lazy._built.get(False), "best_config", None)
            rows.append({"kernel": kernel, "launch": what, "config": "autotuned: " + str(picked), "us": us})
            for config in sweep_configs(kernel):
                if time.time() - t0 > budget_s:
                    break
                try:
                    with lazy.only(config):
                        us = time_calls(calls, device, 30)
                except Exception as exc:  # noqa: BLE001 - a configuration that does not build is a row
                    us = None
                    print(f"# {what} {config}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                rows.append({"kernel": kernel, "launch": what, "config": str(config), "us": us})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="epilogue.json")
    ap.add_argument("--sweep-s", type=float, default=0, help="time every block GEMV configuration for this long")
    ap.add_argument("--sweep-words-s", type=float, default=0,
                    help="time every 2:4 word kernel configuration for this long")
    ap.add_argument("--no-prmt", action="store_true",
                    help="pick the word kernel's inputs with selects and shifts, not the byte permute (an A/B)")
    ap.add_argument("--no-evict", action="store_true",
                    help="GEMV weight loads without the evict-first cache hint (an A/B)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1), checks only")
    args = ap.parse_args(argv)
    import triton

    global D, H
    if args.no_prmt:
        twofour.prmt_usable = lambda x: False
    if args.no_evict:
        twofour.WEIGHT_EVICTION = block.WEIGHT_EVICTION = ""
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        D, H = 512, 1024
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "date": _dt.date.today().isoformat(),
            "command": "python3 bench/check_epilogue.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(meta), flush=True)
    timed = [] if args.smoke else timing(device)
    checked = check(device, (torch.bfloat16, torch.float16) if args.smoke else (torch.bfloat16,))
    failed = [r for r in checked if not r["ok"]]
    for r in failed:
        print("# FAIL", json.dumps(r), flush=True)
    swept = []
    if not args.smoke:
        for kernel, budget in (("gemv", args.sweep_s), ("words", args.sweep_words_s)):
            if budget > 0:
                swept += sweep(device, budget, kernel)
    _write(args.out, {"meta": meta, "checks": checked, "timing": timed, "sweep": swept})
    print(f"checks: {len(checked) - len(failed)} of {len(checked)} passed (max rel err "
          f"{max(r['rel_err'] for r in checked):.2e})")
    print(f"{'format':16s} {'M':>3s} {'fused us':>9s} {'unfused us':>11s} {'saved us':>9s}")
    for r in timed:
        print(f"{r['spec']:16s} {r['M']:3d} {r['fused_us']:9.2f} {r['unfused_us']:11.2f} {r['saved_us']:9.2f}")
    for kernel in SWEPT:
        for what in ("gated", "residual"):
            mine = [r for r in swept if r["kernel"] == kernel and r["launch"] == what]
            rows = sorted((r for r in mine if r["us"] is not None and not r["config"].startswith("autotuned")),
                          key=lambda r: r["us"])
            auto = next((r for r in mine if r["config"].startswith("autotuned")), None)
            if auto:
                print(f"{kernel} {what}: {auto['config']} {auto['us']:.2f} us")
            for r in rows[:5]:
                print(f"{kernel} {what}: {r['config']} {r['us']:.2f} us")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
