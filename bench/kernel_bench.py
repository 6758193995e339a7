"""Kernel benchmark: every sparsec.codegen kernel next to cuBLAS dense, against its physical floor.

Run on a CUDA device (one call does everything)::

    python bench/kernel_bench.py --out results.json

For N x K in {4096x4096, 14336x4096, 4096x14336} and M in {1, 16, 128, 1024, 8192}, bf16:
  * measures the copy bandwidth (device-to-device copy, bytes read + written) and the dense
    peak (8192^3 bf16 matmul on random data) on this device first;
  * times dense (torch's linear, cuBLAS) and each format's implementations, all under CUDA-graph
    replay, the median of many replays after warm-up, with enough copies of the weights and
    inputs rotated through the graph that the working set is several times L2;
  * reports speedup over dense and the fraction of the format's floor reached: floor = max(bytes
    moved / copy bandwidth, useful FLOPs / dense peak), bytes = stored weight (values + metadata)
    + x + y, FLOPs counted on stored values only (2:4 at the dense rate: its floor assumes the
    sparse tensor cores' 2x).
Before timing, each kernel is checked on the GPU in bf16, fp16 and fp32 against a float64
reference (relative L2 error), including a 3-D non-contiguous input with bias.

``--smoke`` runs the same code on tiny shapes on the CPU under the Triton interpreter (no
timing meaning) so the script itself can be checked anywhere.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time

import torch

SHAPES = [(14336, 4096), (4096, 4096), (4096, 14336)]  # the targets' shapes first
TOKENS = [1, 16, 128, 1024, 8192]
ROTATE_BYTES = 256 << 20          # working set per timed graph: ~4x the H200's 60 MB L2
MAX_COPIES = 48
# relative L2 error a correct kernel stays under: bf16 operands 1e-3..1e-2 (8 mantissa bits),
# fp16 ~1e-3, fp32 through tf32 ~3e-4 (METHOD.md's bands, with a 2x margin)
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3}


def _import_codegen():
    try:
        from sparsec import codegen  # noqa: F401
    except ImportError:  # a checkout that is not pip-installed: map codegen/ to sparsec.codegen
        import importlib.util

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, root)
        spec = importlib.util.spec_from_file_location(
            "sparsec.codegen", os.path.join(root, "codegen", "__init__.py"),
            submodule_search_locations=[os.path.join(root, "codegen")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["sparsec.codegen"] = mod
        spec.loader.exec_module(mod)
    from sparsec import codegen

    return codegen


codegen = _import_codegen()
from sparsec.codegen import Packed, linear, pack  # noqa: E402
from sparsec.codegen.twofour_cslt import crossover_from_timings  # noqa: E402
from sparsec.formats import parse_spec  # noqa: E402


# ------------------------------------------------------------------------------ formats
def formats_for(N: int, K: int) -> list[str]:
    """The formats the issue's targets name, at parameters this shape accepts."""
    out = ["2:4", "block:64:0.25", f"lowrank:{min(N, K) // 4}",
           f"2:4+lowrank:{min(N, K) // 32}", f"block:64:0.25+lowrank:{min(N, K) // 32}"]
    for nb in (64, 32, 16, 8):
        if codegen.check(f"monarch:{nb}", N, K) is None:
            out.append(f"monarch:{nb}")
            break
    return out


def impls_for(spec: str, device) -> list[str]:
    family = parse_spec(spec).family
    return {"2:4": ["triton", "cusparselt"] if device.type == "cuda" else ["triton"],
            "block": ["triton"], "lowrank": ["fused", "gemm2"], "monarch": ["fused", "two_launch"],
            "2:4+lowrank": ["triton"], "block+lowrank": ["triton"]}[family]


def make_packed(spec: str, N: int, K: int, dtype, device, gen) -> Packed:
    """Random, never-zero data in the format (factors drawn directly for lowrank and monarch)."""
    family = parse_spec(spec).family
    if family == "lowrank":
        R = int(spec.split(":")[1])
        u = torch.randn(N, R, generator=gen, device=device) / math.sqrt(R)
        v = torch.randn(R, K, generator=gen, device=device) / math.sqrt(K)
        return Packed.from_tensors(spec, (N, K), {"u": u.to(dtype), "v": v.to(dtype)})
    if family == "monarch":
        nb = int(spec.split(":")[1])
        p, n = K // nb, N // nb
        L = torch.randn(nb, p, p, generator=gen, device=device) / math.sqrt(p)
        R = torch.randn(nb, n, p, generator=gen, device=device) / math.sqrt(p)
        return Packed.from_tensors(spec, (N, K), {"L": L.to(dtype), "R": R.to(dtype)})
    w = torch.randn(N, K, generator=gen, device=device) / math.sqrt(K)
    return pack(spec, w.to(dtype))


def useful_flops(spec: str, M: int, N: int, K: int) -> float:
    parsed = parse_spec(spec)
    if hasattr(parsed, "parts"):  # a composite: its parts' work, summed
        return sum(useful_flops(str(p), M, N, K) for p in parsed.parts(N, K))
    family = parsed.family
    if family == "dense":
        return 2.0 * M * N * K
    if family == "2:4":
        return 2.0 * M * N * K / 2
    if family == "block":
        return 2.0 * M * N * K * float(spec.split(":")[2])
    if family == "lowrank":
        return 2.0 * M * int(spec.split(":")[1]) * (N + K)
    nb = int(spec.split(":")[1])
    return 2.0 * M * (K // nb) * (K + N)


# ------------------------------------------------------------------------------ timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(calls, device, replays: int) -> float:
    """Median microseconds per call over ``replays`` replays of one CUDA graph making every call
    once, after a warm-up pass (compile, autotune, cuSPARSELt compression): sparsec's ``Clock``."""
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    return Clock(device, TimingPolicy()).replays(calls, replays)


def sustained_us(calls, seconds: float) -> float:
    """Microseconds per call over ``seconds`` of back-to-back replays of one CUDA graph of ``calls``:
    the clock a long run settles at (the device at its power limit)."""
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    return Clock(torch.device("cuda"), TimingPolicy()).sustained(calls, seconds)


def measure_copy_bandwidth(device, smoke: bool) -> float:
    n = (1 << 20) if smoke else (2 << 30)  # bytes per buffer
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)], device, replays=5 if smoke else 30)
    return 2 * n / (us * 1e-6) / 1e9


def measure_dense_peak(device, smoke: bool) -> float:
    n = 256 if smoke else 8192
    gen = torch.Generator(device=device).manual_seed(7)
    dtype = torch.float32 if smoke else torch.bfloat16
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    us = time_calls([lambda: torch.mm(a, b)], device, replays=3 if smoke else 20)
    return 2.0 * n ** 3 / (us * 1e-6) / 1e12


# ------------------------------------------------------------------------------ correctness
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref).norm() / ref.norm())


def check_correctness(device, smoke: bool, specs: list[str], impls: list[str]) -> list[dict]:
    """Each kernel and implementation vs float64 on the same packed weight, per dtype.

    The device is synchronised after every case, so a failing kernel is named by its own row."""
    gen = torch.Generator(device=device).manual_seed(11)
    N, K = (48, 64) if smoke else (768, 1024)
    dtypes = [torch.float32, torch.float16] if smoke else [torch.bfloat16, torch.float16, torch.float32]
    cases = {torch.bfloat16: ("M1", "M37", "M300", "3d-strided"), torch.float16: ("M37", "3d-strided"),
             torch.float32: ("M37",)}
    rows = []
    for spec in specs:
        if codegen.check(spec, N, K):
            continue
        for dtype in dtypes:
            packed = make_packed(spec, N, K, dtype, device, gen)
            dense64 = packed.to_dense().double()
            bias = torch.randn(N, generator=gen, device=device).to(dtype)
            for impl in impls:
                if impl == "cusparselt" and dtype == torch.float32:
                    continue
                for case in cases[dtype]:
                    if case == "3d-strided":
                        x = torch.randn(3, 5, 2 * K, generator=gen, device=device).to(dtype)[..., ::2]
                    else:
                        x = torch.randn(int(case[1:]), K, generator=gen, device=device).to(dtype)
                    row = {"spec": spec, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "case": case}
                    try:
                        y = linear(x, packed, bias, impl=impl)
                        _sync(device)
                        ref = x.double() @ dense64.t() + bias.double()
                        err = rel_err(y, ref)
                        row.update(rel_err=err, ok=bool(err <= REL_TOL[dtype] and y.dtype == dtype
                                                        and y.shape == ref.shape))
                    except Exception as exc:  # noqa: BLE001 - reported as a failed check
                        row.update(rel_err=None, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
                    rows.append(row)
                    if not row["ok"]:
                        print(f"# FAIL {row}", flush=True)
    return rows


# ------------------------------------------------------------------------------ benchmark
def bench_case(spec, impl, N, K, M, dtype, device, gen, bw_GBps, peak_tflops, smoke):
    """Time one (format, impl) at one shape; returns a result row."""
    one = make_packed(spec, N, K, dtype, device, gen) if spec != "dense" else None
    weight_bytes = one.nbytes if one is not None else N * K * dtype.itemsize
    io_bytes = (M * K + M * N) * dtype.itemsize
    copies = max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / (weight_bytes + io_bytes))))
    if smoke:
        copies = 2
    xs = [torch.randn(M, K, generator=gen, device=device).to(dtype) for _ in range(copies)]
    if spec == "dense":
        ws = [(torch.randn(N, K, generator=gen, device=device) / math.sqrt(K)).to(dtype) for _ in range(copies)]
        calls = [lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
    else:
        packs = [one] + [Packed(one.spec, one.shape, {k: v.clone() for k, v in one.tensors().items()})
                         for _ in range(copies - 1)]
        calls = [lambda x=x, p=p: linear(x, p, impl=impl) for x, p in zip(xs, packs)]
    replays = 3 if smoke else (30 if M <= 128 else 10)
    us = time_calls(calls, device, replays)
    mem_us = (weight_bytes + io_bytes) / (bw_GBps * 1e3)
    flop_us = useful_flops(spec, M, N, K) / (peak_tflops * 1e6)
    floor_us = max(mem_us, flop_us)
    return {"spec": spec, "impl": impl, "N": N, "K": K, "M": M, "us": us, "weight_bytes": weight_bytes,
            "floor_us": floor_us, "bound": "memory" if mem_us >= flop_us else "compute",
            "floor_fraction": floor_us / us, "copies": copies}


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and whether it was met."""
    def best(spec_prefix, N, K, M):
        rows = [r for r in results if r["spec"].startswith(spec_prefix) and (r["N"], r["K"], r["M"]) == (N, K, M)]
        return min(rows, key=lambda r: r["us"]) if rows else None

    def speedup(spec_prefix, N, K, M):
        d, f = best("dense", N, K, M), best(spec_prefix, N, K, M)
        return (d["us"] / f["us"], f["impl"]) if d and f else (None, None)

    out = []

    def add(name, value, goal, impl=None):
        out.append({"target": name, "measured": value, "goal": goal, "impl": impl,
                    "met": value is not None and value >= goal})

    for M, goal in ((1, 1.6), (8192, 1.45)):
        s, impl = speedup("2:4", 14336, 4096, M)
        add(f"2:4 speedup, 14336x4096, M={M}", s, goal, impl)
    for M in (1, 16):
        for N, K in SHAPES:
            s, impl = speedup("block:64:0.25", N, K, M)
            add(f"block:64:0.25 speedup, {N}x{K}, M={M}", s, 3.0, impl)
    for N, K in SHAPES:
        s, impl = speedup("block:64:0.25", N, K, 8192)
        add(f"block:64:0.25 speedup, {N}x{K}, M=8192", s, 2.5, impl)
    for M in TOKENS:
        s, impl = speedup("lowrank", 4096, 4096, M)
        add(f"lowrank:1024 speedup, 4096x4096, M={M}", s, 1.0, impl)
        s, impl = speedup("monarch:64", 4096, 4096, M)
        add(f"monarch:64 speedup, 4096x4096, M={M}", s, 1.0, impl)
    for r in results:
        if r["spec"] != "dense" and r["M"] <= 16:
            add(f"{r['spec']} [{r['impl']}] floor fraction, {r['N']}x{r['K']}, M={r['M']}",
                r.get("floor_fraction_read", r["floor_fraction"]), 0.85, r["impl"])
    return out


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


GROUPS = ("twofour-triton", "twofour-cusparselt", "block", "lowrank", "monarch", "twofour-lowrank", "block-lowrank")


def group_plan(group: str, N: int, K: int, smoke: bool) -> list[tuple[str, str]]:
    """(spec, impl) pairs a group times at one shape; every group also times dense."""
    fmts = formats_for(N, K) if not smoke else ["2:4", "block:16:0.25", "lowrank:16", "monarch:4",
                                                  "2:4+lowrank:4", "block:16:0.25+lowrank:4"]
    fam = {"twofour-triton": "2:4", "twofour-cusparselt": "2:4", "block": "block",
           "lowrank": "lowrank", "monarch": "monarch", "twofour-lowrank": "2:4+lowrank",
           "block-lowrank": "block+lowrank"}[group]
    spec = next((f for f in fmts if parse_spec(f).family == fam), None)
    if spec is None:
        return [("dense", "cublas")]
    impls = {"twofour-triton": ["triton"], "twofour-cusparselt": ["cusparselt"]}.get(group, impls_for(spec, torch.device("cuda")))
    return [("dense", "cublas")] + [(spec, i) for i in impls]


def correctness_plan(group: str, smoke: bool) -> tuple[list[str], list[str]]:
    return {"twofour-triton": (["2:4"], ["triton"]),
            "twofour-cusparselt": (["2:4"], ["cusparselt"]),
            "block": (["block:16:0.3", "block:64:0.25", "block:128:0.5"], ["triton"]),
            "lowrank": (["lowrank:8" if smoke else "lowrank:64"], ["fused", "gemm2"]),
            "monarch": (["monarch:4", "monarch:2"] if smoke else ["monarch:8", "monarch:4"], ["fused", "two_launch"]),
            "twofour-lowrank": (["2:4+lowrank:8"], ["triton"]),
            "block-lowrank": (["block:16:0.5+lowrank:8", "block:64:0.25+lowrank:32"], ["triton"])}[group]


def run_group(args, device, dtype, shapes, tokens) -> dict:
    """One group in its own process: its correctness checks, then its timings next to dense."""
    t_start = time.time()
    os.environ["SPARSEC_AUTOTUNE"] = "0"  # correctness needs no tuning: one config per shape class
    specs, impls = correctness_plan(args.group, args.smoke)
    correctness = check_correctness(device, args.smoke, specs, impls)
    os.environ["SPARSEC_AUTOTUNE"] = "1"
    print(f"# {args.group} correctness: {sum(r['ok'] for r in correctness)}/{len(correctness)} within tolerance",
          flush=True)
    gen = torch.Generator(device=device).manual_seed(3)
    results = []
    for N, K in shapes:
        for M in tokens:
            for spec, impl in group_plan(args.group, N, K, args.smoke):
                if time.time() - t_start > args.budget_s:
                    results.append({"spec": spec, "impl": impl, "N": N, "K": K, "M": M, "us": None,
                                    "error": "skipped: time budget spent"})
                    continue
                try:
                    row = bench_case(spec, impl, N, K, M, dtype, device, gen, args.copy_gbps,
                                     args.peak_tflops, args.smoke)
                except Exception as exc:  # noqa: BLE001 - a failing kernel is reported, not fatal
                    row = {"spec": spec, "impl": impl, "N": N, "K": K, "M": M, "us": None,
                           "error": f"{type(exc).__name__}: {exc}"[:300]}
                results.append(row)
            dense_us = next((r.get("us") for r in results if r["spec"] == "dense"
                             and (r["N"], r["K"], r["M"]) == (N, K, M)), None)
            for r in results:
                if (r["N"], r["K"], r["M"]) == (N, K, M) and r.get("us"):
                    r["speedup"] = dense_us / r["us"] if dense_us else None
                    r["group"] = args.group
                    print(f"# {N}x{K} M={M} {r['spec']} [{r['impl']}] {r['us']:.1f} us, "
                          f"x{r['speedup'] or 0:.2f}, floor {100 * r['floor_fraction']:.0f}%", flush=True)
            _write(args.out, {"correctness": correctness, "results": results})
    return {"correctness": correctness, "results": results}


def run_calibration(args, device) -> dict:
    # the matmul first: it also brings the clocks up from idle before the copy is timed
    peak = max(measure_dense_peak(device, args.smoke) for _ in range(2))
    bw = max(measure_copy_bandwidth(device, args.smoke) for _ in range(2))
    return {"copy_GBps": bw, "peak_tflops": peak}


def _child(args, role: str, out: str, budget: float, extra=()) -> dict:
    """Run one role in a fresh process (a CUDA fault there cannot take the other groups down)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--out", out, "--budget-s", f"{budget:.0f}",
           *(["--smoke"] if args.smoke else []), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 120)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        sys.stdout.write(f"# {role} exited {proc.returncode}: {proc.stderr[-1500:]}\n")
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="whole run's time budget; each group gets a share and skips the cases left")
    ap.add_argument("--reanalyze", metavar="JSON", help="recompute the summary of a stored result file, no device")
    ap.add_argument("--role", default="driver", help=argparse.SUPPRESS)
    ap.add_argument("--copy-gbps", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reanalyze:
        with open(args.reanalyze) as f:
            report = summarize(json.load(f))
        _write(args.out, report)
        print_summary(report)
        return
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        shapes, tokens, dtype = [(64, 128)], [1, 16], torch.float32
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/kernel_bench.py needs a CUDA device (or --smoke)")
        device = torch.device("cuda")
        shapes, tokens, dtype = SHAPES, TOKENS, torch.bfloat16
    if args.role == "calibrate":
        _write(args.out, run_calibration(args, device))
        return
    if args.role != "driver":
        args.group = args.role
        run_group(args, device, dtype, shapes, tokens)
        return

    import triton

    t_start = time.time()
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "dtype": str(dtype).replace("torch.", "")}
    print(f"# {meta}", flush=True)
    base = os.path.splitext(args.out)[0]
    meta.update(_child(args, "calibrate", f"{base}.calibrate.json", 60))
    print(f"# copy {meta.get('copy_GBps', 0):.0f} GB/s, dense peak {meta.get('peak_tflops', 0):.0f} TFLOP/s",
          flush=True)
    groups = [g for g in GROUPS if not (args.smoke and g == "twofour-cusparselt")]
    correctness, results = [], []
    for i, group in enumerate(groups):
        left = args.budget_s - (time.time() - t_start)
        budget = max(20.0, left / (len(groups) - i) - 10)
        part = _child(args, group, f"{base}.{group}.json", budget,
                      ("--copy-gbps", str(meta.get("copy_GBps", 1.0)), "--peak-tflops", str(meta.get("peak_tflops", 1.0))))
        correctness += part.get("correctness", [])
        results += part.get("results", [])
        print(f"# group {group} done ({time.time() - t_start:.0f}s)", flush=True)

    report = {"meta": meta, "correctness": correctness, "results": results, "elapsed_s": time.time() - t_start}
    if not args.smoke:
        summarize(report)
    _write(args.out, report)
    print_summary(report)
    print(f"# elapsed {report['elapsed_s']:.0f}s; full results in {args.out}")


def summarize(report: dict) -> dict:
    """Derived figures, recomputable from the raw timings (``--reanalyze``).

    Besides the floor at the measured copy bandwidth, a second floor uses the read bandwidth
    cuBLAS itself realised on the dense layers at M <= 16 (a copy both reads and writes, a
    GEMV mostly reads, so the copy figure can sit below what a weight-streaming kernel gets).
    """
    meta, results = report["meta"], report["results"]
    itemsize = torch.empty(0, dtype=getattr(torch, meta["dtype"])).element_size()
    ok = [r for r in results if r.get("us")]

    def io_bytes(r):
        return (r["M"] * r["K"] + r["M"] * r["N"]) * itemsize

    dense_small = [r for r in ok if r["spec"] == "dense" and r["M"] <= 16]
    read = max(((r["weight_bytes"] + io_bytes(r)) / (r["us"] * 1e3) for r in dense_small), default=meta["copy_GBps"])
    meta["read_GBps_cublas"] = max(read, meta["copy_GBps"])
    for r in ok:
        flop_us = useful_flops(r["spec"], r["M"], r["N"], r["K"]) / (meta["peak_tflops"] * 1e6)
        r["floor_fraction_read"] = max((r["weight_bytes"] + io_bytes(r)) / (meta["read_GBps_cublas"] * 1e3),
                                       flop_us) / r["us"]
    crossovers = {}
    for N, K in SHAPES:
        for spec in formats_for(N, K):
            impls = impls_for(spec, torch.device("cuda"))
            if len(impls) != 2:
                continue
            rows = []
            for M in TOKENS:
                t = {i: [r["us"] for r in ok if (r["spec"], r["impl"], r["N"], r["K"], r["M"]) == (spec, i, N, K, M)]
                     for i in impls}
                if t[impls[0]] and t[impls[1]]:
                    rows.append((M, t[impls[0]][0], t[impls[1]][0]))
            crossovers[f"{spec} {N}x{K}: {impls[1]} from M"] = crossover_from_timings(rows)
    report["crossovers"] = crossovers
    report["targets"] = targets(ok)
    return report


def print_summary(report: dict) -> None:
    correctness, results = report["correctness"], report["results"]
    bad = [r for r in correctness if not r["ok"]]
    print(f"\n## Correctness: {len(correctness) - len(bad)}/{len(correctness)} within tolerance")
    for r in bad[:12]:
        print(f"FAIL {r['spec']} [{r['impl']}] {r['dtype']} {r['case']}: {r.get('rel_err')} {r.get('error', '')[:120]}")
    print("\n## Targets")
    for t in report.get("targets", []):
        if "floor" not in t["target"]:
            v = "n/a" if t["measured"] is None else f"{t['measured']:.2f}"
            print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {v} (goal {t['goal']}, {t['impl']})")
    floors = [t for t in report.get("targets", []) if "floor" in t["target"]]
    print(f"floor fraction (cuBLAS read bandwidth) >= 0.85 at M<=16: {sum(t['met'] for t in floors)} met of {len(floors)}")
    print(f"crossovers: {report.get('crossovers')}")
    meta = report["meta"]
    print(f"\n## Kernels on {meta['device']}, {meta['dtype']}; copy {meta['copy_GBps']:.0f} GB/s, "
          f"cuBLAS read {meta.get('read_GBps_cublas', 0):.0f} GB/s, peak {meta['peak_tflops']:.0f} TFLOP/s")
    print(f"{'shape':>11} {'M':>5} {'format':>14} {'impl':>10} {'us':>9} {'x dense':>7} {'floor%copy':>10} {'floor%read':>10}")
    seen_dense = set()
    for r in results:
        key = (r["N"], r["K"], r["M"])
        if r["spec"] == "dense":
            if key in seen_dense:
                continue
            seen_dense.add(key)
        if r.get("us") is None:
            print(f"{r['N']:>5}x{r['K']:<5} {r['M']:>5} {r['spec']:>14} {r['impl']:>10}  {r.get('error', '')[:50]}")
            continue
        print(f"{r['N']:>5}x{r['K']:<5} {r['M']:>5} {r['spec']:>14} {r['impl']:>10} {r['us']:>9.1f} "
              f"{r.get('speedup') or 0:>7.2f} {100 * r['floor_fraction']:>9.0f}% {100 * r.get('floor_fraction_read', 0):>9.0f}%")


if __name__ == "__main__":
    main()
