"""Small-M kernel paths and cuSPARSELt settings, timed next to cuBLAS in one device call.

Run on a CUDA device::

    python3 bench/small_m.py --out $OUT/small_m.json

Part 1 (in this process): every small-M path of the 2:4 and block kernels, forced
(``twofour_triton(path=...)``, ``block_triton(path=...)``), checked against float64 in bf16 and
fp16 first, then timed with bench/kernel_bench.py's method (CUDA-graph replay over >= 256 MB of
rotated weight copies, median of 30 replays, random normal data) at M in {1, 2, 4, 8, 16} on the
Llama-3-8B shapes, with the autotuner's chosen configuration recorded per case.

Part 2 (child processes): cuSPARSELt's ``_cslt_sparse_mm`` at large M for each algorithm id and
both output layouts, each id in a process of its own run (an id the library rejects is recorded;
one that faults the device only ends that child, and the next id goes on in a new one).
``--cslt-algs`` limits the ids, ``--cslt-split-k`` adds split-K factors (untransposed output), and
``--cslt-sustain-s`` also times each setting over seconds of back-to-back replays, the state a
long run settles in (the device at its power limit), next to the short synchronised replays.

Prints a table last; the JSON keeps every row with device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import REL_TOL, ROTATE_BYTES, MAX_COPIES, make_packed, rel_err, sustained_us, time_calls, _write  # noqa: E402

from sparsec.codegen import Packed, block, twofour  # noqa: E402

SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336)]
TOKENS = [1, 2, 4, 8, 16]
CSLT_TOKENS = [1024, 2048, 8192]
CSLT_MAX_ALG = 16


def path_call(spec: str, path: str, x: torch.Tensor, p: Packed):
    t = p.tensors()
    if spec == "2:4":
        return lambda: twofour.twofour_triton(x, t["values"], t["meta"], None, path=path)
    return lambda: block.block_triton(x, t["values"], t["col_idx"], t["row_ptr"], t["order"], None, p.shape[0],
                                      path=path)


PATHS = [("2:4", "words"), ("2:4", "tokens"), ("2:4", "gemv"), ("2:4", "dot"), ("2:4", "dot_split"),
         ("block:64:0.25", "gemv"), ("block:64:0.25", "dot"), ("block:64:0.25", "dot_split")]


def correctness(device, paths=PATHS) -> list[dict]:
    """Each timed path checked against float64 in bf16 and fp16 (block:16:0.3 besides the timed
    block spec), on three shapes."""
    gen = torch.Generator(device=device).manual_seed(5)
    rows = []
    for N, K in ((768, 1024), (14336, 4096), (4096, 14336)):
        for dtype in (torch.bfloat16, torch.float16):
            for spec in ("2:4", "block:64:0.25", "block:16:0.3"):
                p = make_packed(spec, N, K, dtype, device, gen)
                dense = p.to_dense().double()
                for path in (("words", "tokens", "gemv", "dot", "dot_split") if spec == "2:4"
                             else ("gemv", "dot", "dot_split")):
                    if (spec.split(":")[0], path) not in {(s.split(":")[0], q) for s, q in paths}:
                        continue
                    for M in (1, 2, 4) if path in ("words", "gemv") else (3, 16) if path == "tokens" else (8, 16):
                        x = torch.randn(M, K, generator=gen, device=device).to(dtype)
                        call = path_call(spec, path, x, p)
                        try:
                            y = call()
                            torch.cuda.synchronize()
                            err = rel_err(y, x.double() @ dense.t())
                            ok = err <= REL_TOL[dtype]
                        except Exception as exc:  # noqa: BLE001 - a failing kernel is a failed row
                            err, ok = None, False
                            print(f"# FAIL {spec} {path} {N}x{K} M={M}: {exc}", flush=True)
                        rows.append({"spec": spec, "path": path, "N": N, "K": K, "M": M,
                                     "dtype": str(dtype).replace("torch.", ""), "rel_err": err, "ok": ok})
    return rows


def chosen_config(spec: str, path: str) -> str | None:
    lazy = {("2:4", "words"): twofour._WORDS_KERNEL, ("2:4", "gemv"): twofour._GEMV_KERNEL,
            ("2:4", "dot"): twofour._KERNEL, ("2:4", "dot_split"): twofour._KERNEL,
            ("2:4", "tokens"): twofour._TOKENS_KERNEL}.get((spec, path))
    if lazy is None:
        lazy = block._GEMV_KERNEL if path == "gemv" else block._KERNEL
    kernel = lazy._built.get(False)
    best = getattr(kernel, "best_config", None)
    return str(best) if best is not None else None


def time_paths(device, budget_s: float, paths=PATHS, tokens=TOKENS) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(3)
    dtype = torch.bfloat16
    rows, t0 = [], time.time()
    for N, K in SHAPES:
        for M in tokens:
            dense_us = None
            for spec, path in [("dense", "cublas")] + paths:
                if time.time() - t0 > budget_s:
                    break
                if spec == "dense":
                    ws = [(torch.randn(N, K, generator=gen, device=device) / math.sqrt(K)).to(dtype)]
                    nbytes = N * K * 2
                else:
                    one = make_packed(spec, N, K, dtype, device, gen)
                    nbytes = one.nbytes
                copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))
                xs = [torch.randn(M, K, generator=gen, device=device).to(dtype) for _ in range(copies)]
                if spec == "dense":
                    ws += [w.clone() for w in ws * (copies - 1)]
                    calls = [lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
                else:
                    packs = [one] + [Packed(one.spec, one.shape, {k: v.clone() for k, v in one.tensors().items()})
                                     for _ in range(copies - 1)]
                    calls = [path_call(spec, path, x, p) for x, p in zip(xs, packs)]
                try:
                    us = time_calls(calls, device, 30)
                except Exception as exc:  # noqa: BLE001
                    rows.append({"spec": spec, "path": path, "N": N, "K": K, "M": M, "us": None,
                                 "error": str(exc)[:300]})
                    continue
                if spec == "dense":
                    dense_us = us
                row = {"spec": spec, "path": path, "N": N, "K": K, "M": M, "us": us, "bytes": nbytes,
                       "read_GBps": nbytes / us / 1e3, "speedup": dense_us / us if dense_us else None,
                       "config": None if spec == "dense" else chosen_config(spec, path)}
                rows.append(row)
                print(f"# {N}x{K} M={M} {spec} [{path}] {us:.1f} us x{row['speedup'] or 0:.2f} "
                      f"{row['read_GBps']:.0f} GB/s {row['config']}", flush=True)
    return rows


SWEPT = {("2:4", "words"): "_WORDS_KERNEL", ("block:64:0.25", "gemv"): "_GEMV_KERNEL"}


def config_sweep(device, budget_s: float, tokens=(1,)) -> list[dict]:
    """Every config of the MMA-free kernels run alone (``LazyKernel.only``): checked in bf16
    against float64, then timed like the paths above; shows what each tile shape and pipelining
    depth is worth, beyond the one the autotuner keeps."""
    gen = torch.Generator(device=device).manual_seed(11)
    dtype = torch.bfloat16
    rows, t0 = [], time.time()
    for N, K in SHAPES:
        for (spec, path), name in SWEPT.items():
            lazy = getattr(twofour if spec == "2:4" else block, name)
            one = make_packed(spec, N, K, dtype, device, gen)
            dense = one.to_dense().double()
            copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / one.nbytes)))
            packs = [one] + [Packed(one.spec, one.shape, {k: v.clone() for k, v in one.tensors().items()})
                             for _ in range(copies - 1)]
            for M in tokens:
                xs = [torch.randn(M, K, generator=gen, device=device).to(dtype) for _ in range(copies)]
                for config in lazy.configs:
                    if time.time() - t0 > budget_s:
                        return rows
                    row = {"spec": spec, "path": path, "N": N, "K": K, "M": M, "config": str(config)}
                    try:
                        with lazy.only(config):
                            err = rel_err(path_call(spec, path, xs[0], one)(), xs[0].double() @ dense.t())
                            row["rel_err"], row["ok"] = err, err <= REL_TOL[dtype]
                            row["us"] = time_calls([path_call(spec, path, x, p) for x, p in zip(xs, packs)],
                                                   device, 30)
                    except Exception as exc:  # noqa: BLE001 - a config that fails to build is a row
                        row["error"] = str(exc)[:200]
                    rows.append(row)
                    print(f"# sweep {N}x{K} M={M} {spec} [{path}] {row.get('us') or 0:.1f} us "
                          f"ok={row.get('ok')} {config}", flush=True)
    return rows


SUSTAIN_S = 0.0  # --cslt-sustain-s


def cslt_child(alg: int, out: str, shapes, tokens, split_ks=None) -> None:
    """Time one algorithm id at every shape, M and output layout; rows appended as JSON lines.
    ``split_ks``: also each split-K factor, in both of cuSPARSELt's split-K modes (one kernel, or
    a second reducing kernel), untransposed output only (the layout the product asks for)."""
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(7)
    for N, K in shapes:
        w = (torch.randn(N, K, generator=gen, device=device) / math.sqrt(K)).to(torch.bfloat16)
        w = w.reshape(N, K // 4, 4)
        w = w.scatter(2, w.abs().topk(2, dim=-1).indices, 0.0).reshape(N, K)
        comp = torch._cslt_compress(w)
        for M in tokens:
            x = torch.randn(M, K, generator=gen, device=device).to(torch.bfloat16)
            dense = torch.nn.functional.linear(x, w)
            settings = ([(True, 1, -1), (False, 1, -1)] if not split_ks else
                        [(False, k, mode) for k in split_ks for mode in ((-1,) if k == 1 else (0, 1))])
            for transposed, split_k, mode in settings:
                row = {"alg": alg, "N": N, "K": K, "M": M, "transpose_result": transposed}
                if split_ks:
                    row.update(split_k=split_k, split_k_mode=mode)
                try:
                    def call():
                        y = torch._cslt_sparse_mm(comp, x.t(), transpose_result=transposed, alg_id=alg,
                                                  split_k=split_k, split_k_mode=mode)
                        return y if transposed else y.t()
                    err = rel_err(call(), dense.double())
                    copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (N * K + M * K + M * N) / 2)))
                    row.update(us=time_calls([call] * copies, device, 10), rel_err=err)
                    if SUSTAIN_S:
                        row["us_sustained"] = sustained_us([call] * copies, SUSTAIN_S)
                except Exception as exc:  # noqa: BLE001 - an id the library refuses is a row, not an end
                    row.update(us=None, error=f"{type(exc).__name__}: {exc}"[:200])
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print(f"# alg {alg} done", flush=True)


def cslt_sweep(out_dir: str, budget_s: float, shapes_arg: str | None, tokens_arg: str | None,
               algs=None, split_k_arg: str | None = None) -> list[dict]:
    lines = os.path.join(out_dir, "cslt_sweep.jsonl")
    t0 = time.time()
    for alg in (algs if algs is not None else range(CSLT_MAX_ALG)):
        if time.time() - t0 > budget_s:
            break
        extra = ((["--cslt-shapes", shapes_arg] if shapes_arg else []) + (["--cslt-tokens", tokens_arg] if tokens_arg else [])
                 + (["--cslt-split-k", split_k_arg] if split_k_arg else [])
                 + (["--cslt-sustain-s", str(SUSTAIN_S)] if SUSTAIN_S else []))
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--cslt-alg", str(alg), "--out", lines] + extra,
                              capture_output=True, text=True, timeout=240)
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            sys.stdout.write(f"# alg {alg} child exited {proc.returncode}: {proc.stderr[-400:]}\n")
        rows = [json.loads(s) for s in open(lines)] if os.path.exists(lines) else []
        mine = [r for r in rows if r["alg"] == alg]
        if algs is None and mine and all(r.get("us") is None for r in mine):
            break  # the library refused this id everywhere: no higher id exists
    return [json.loads(s) for s in open(lines)] if os.path.exists(lines) else []


def dense_times(device, shapes, tokens) -> dict:
    gen = torch.Generator(device=device).manual_seed(9)
    out = {}
    for N, K in shapes:
        w = (torch.randn(N, K, generator=gen, device=device) / math.sqrt(K)).to(torch.bfloat16)
        for M in tokens:
            x = torch.randn(M, K, generator=gen, device=device).to(torch.bfloat16)
            copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (N * K + M * K + M * N) / 2)))
            calls = [lambda: torch.nn.functional.linear(x, w)] * copies
            out[f"{N}x{K}:{M}"] = time_calls(calls, device, 10)
            if SUSTAIN_S:
                out[f"{N}x{K}:{M}:sustained"] = sustained_us(calls, SUSTAIN_S)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="small_m.json")
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--cslt-budget-s", type=float, default=150)
    ap.add_argument("--skip-cslt", action="store_true")
    ap.add_argument("--paths", default=None, help="SPEC:PATH list, e.g. 2:4:words,block:64:0.25:gemv (default all)")
    ap.add_argument("--tokens", default=None, help="M list, e.g. 1,2,4 (default 1,2,4,16)")
    ap.add_argument("--config-sweep-s", type=float, default=0,
                    help="also time every config of the MMA-free kernels at M=1, for up to this long")
    ap.add_argument("--cslt-shapes", default=None, help="NxK list for the cuSPARSELt sweep, e.g. 28672x4096")
    ap.add_argument("--cslt-tokens", default=None, help="M list for the cuSPARSELt sweep (default 1024,2048,8192)")
    ap.add_argument("--cslt-only", action="store_true", help="only the cuSPARSELt sweep")
    ap.add_argument("--cslt-algs", default=None, help="algorithm ids for the cuSPARSELt sweep, e.g. 0,1 (default all)")
    ap.add_argument("--cslt-split-k", default=None, help="split-K factors for the cuSPARSELt sweep, e.g. 1,2,4")
    ap.add_argument("--cslt-sustain-s", type=float, default=0,
                    help="also time each cuSPARSELt setting over this many seconds of back-to-back replays")
    ap.add_argument("--cslt-alg", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    split_ks = [int(k) for k in args.cslt_split_k.split(",")] if args.cslt_split_k else None
    global SUSTAIN_S
    SUSTAIN_S = args.cslt_sustain_s
    cslt_shapes = ([tuple(int(v) for v in s.split("x")) for s in args.cslt_shapes.split(",")]
                   if args.cslt_shapes else SHAPES)
    cslt_tokens = [int(m) for m in args.cslt_tokens.split(",")] if args.cslt_tokens else CSLT_TOKENS
    if args.cslt_alg is not None:
        cslt_child(args.cslt_alg, args.out, cslt_shapes, cslt_tokens, split_ks)
        return
    import triton

    device = torch.device("cuda")
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda}
    print(f"# {meta}", flush=True)
    t0 = time.time()
    if args.cslt_only:
        report = {"meta": meta, "cslt_dense_us": dense_times(device, cslt_shapes, cslt_tokens),
                  "cslt": cslt_sweep(os.path.dirname(os.path.abspath(args.out)), args.cslt_budget_s,
                                     args.cslt_shapes, args.cslt_tokens,
                                     [int(a) for a in args.cslt_algs.split(",")] if args.cslt_algs else None,
                                     args.cslt_split_k)}
        _write(args.out, report)
        print_cslt(report, cslt_shapes, cslt_tokens)
        return
    paths = PATHS if not args.paths else [tuple(p.rsplit(":", 1)) for p in args.paths.split(",")]
    checks = correctness(device, paths)
    print(f"# correctness {sum(r['ok'] for r in checks)}/{len(checks)}", flush=True)
    tokens = TOKENS if not args.tokens else [int(m) for m in args.tokens.split(",")]
    cslt_s = 0 if args.skip_cslt else args.cslt_budget_s
    rows = time_paths(device, args.budget_s - cslt_s - 60, paths, tokens)
    report = {"meta": meta, "correctness": checks, "paths": rows}
    _write(args.out, report)
    if args.config_sweep_s:
        report["config_sweep"] = config_sweep(device, args.config_sweep_s)
        _write(args.out, report)
    if not args.skip_cslt:
        report["cslt_dense_us"] = dense_times(device, SHAPES, CSLT_TOKENS)
        report["cslt"] = cslt_sweep(os.path.dirname(os.path.abspath(args.out)), args.cslt_budget_s, None, None)
    report["elapsed_s"] = time.time() - t0
    _write(args.out, report)
    print("\n| N x K | M | " + " | ".join(f"{s} {p}" for s, p in [("dense", "cublas")] + paths) + " |")
    for N, K in SHAPES:
        for M in tokens:
            cells = []
            for spec, path in [("dense", "cublas")] + paths:
                r = next((r for r in rows
                          if (r["spec"], r["path"], r["N"], r["K"], r["M"]) == (spec, path, N, K, M)), None)
                cells.append("-" if not r or r.get("us") is None else f"{r['us']:.1f} (x{r['speedup'] or 1:.2f})")
            print(f"| {N}x{K} | {M} | " + " | ".join(cells) + " |")
    if report.get("cslt"):
        print_cslt(report, SHAPES, CSLT_TOKENS)
    if report.get("config_sweep"):
        print("\n| N x K | kernel | fastest configs (us) | failed checks |")
        for N, K in SHAPES:
            for spec, path in SWEPT:
                mine = [r for r in report["config_sweep"] if (r["N"], r["K"], r["spec"]) == (N, K, spec)]
                timed = sorted((r for r in mine if r.get("us")), key=lambda r: r["us"])[:3]
                bad = sum(1 for r in mine if not r.get("ok"))
                print(f"| {N}x{K} | {spec} {path} | " + "; ".join(f"{r['us']:.1f} {r['config']}" for r in timed)
                      + f" | {bad} |")
    print(f"# elapsed {report['elapsed_s']:.0f}s")


def print_cslt(report, shapes, tokens) -> None:
    print("\n| N x K | M | dense us | best cuSPARSELt (alg, transposed) | us | x | alg 0, 1 untransposed us |")
    for N, K in shapes:
        for M in tokens:
            mine = [r for r in report["cslt"] if (r["N"], r["K"], r["M"]) == (N, K, M) and r.get("us")]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["us"])
            if f"{N}x{K}:{M}:sustained" in report["cslt_dense_us"]:
                print(f"#   {N}x{K} M={M} sustained: dense {report['cslt_dense_us'][f'{N}x{K}:{M}:sustained']:.1f} us; "
                      + "; ".join(f"alg {r['alg']}{' transposed' if r['transpose_result'] else ''} "
                                  f"{r['us_sustained']:.1f} us (short {r['us']:.1f})" for r in mine if "us_sustained" in r))
            for r in sorted((r for r in mine if "split_k" in r), key=lambda r: r["us"])[:6]:
                print(f"#   {N}x{K} M={M} alg {r['alg']} split_k {r['split_k']} mode {r['split_k_mode']}: {r['us']:.1f} us")
            base = [next((r["us"] for r in mine if r["alg"] == a and not r["transpose_result"]), 0) for a in (0, 1)]
            d = report["cslt_dense_us"][f"{N}x{K}:{M}"]
            print(f"| {N}x{K} | {M} | {d:.1f} | {best['alg']}, {best['transpose_result']} | {best['us']:.1f} | "
                  f"{d / best['us']:.2f} | {base[0]:.1f}, {base[1]:.1f} |")


if __name__ == "__main__":
    main()
