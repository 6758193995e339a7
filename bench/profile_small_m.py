"""Nsight Compute counters of the small-M kernels next to cuBLAS: achieved DRAM bandwidth, SM and
memory throughput, occupancy, registers and warp stalls of one launch each, caches flushed.

Run on a CUDA device with ncu on the PATH (give the clocks to the device: ``--clock-control none``)::

    python3 bench/profile_small_m.py --out $OUT/profile --paths 2:4:dot,2:4:tokens,block:64:0.25:dot_split \
        --tokens 8,16 --shapes 4096x14336,14336x4096

The script runs itself under ``ncu --profile-from-start off``: the inner run builds every case and
calls it three times unprofiled (compiling and autotuning), then, between cudaProfilerStart and
Stop, makes each call once behind a marker kernel (``torch.cuda._sleep``), so the launches of
each case are told apart by the markers, whatever number of kernels a call launches. The report
(``profile.ncu-rep``) is exported to CSV and reduced to one row per kernel (``profile.json``) and
a table printed last. Writes under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats")
MARKER = "spin_kernel"  # torch.cuda._sleep's kernel
SHOWN = {  # column in the table -> ncu metric (raw page), read where ncu reports it
    "us": "gpu__time_duration.sum",
    "DRAM GB/s": "dram__bytes.sum.per_second",  # read and written: the sections name no read-only count
    "DRAM %": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "SM %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "occ %": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "grid": "launch__grid_size",
}


def inner(args) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernel_bench import make_packed
    from small_m import path_call

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(3)
    dtype = torch.bfloat16
    cases = []
    for N, K in args.shapes:
        w = (torch.randn(N, K, generator=gen, device=device) / K ** 0.5).to(dtype)
        packs = {}
        for M in args.tokens:
            x = torch.randn(M, K, generator=gen, device=device).to(dtype)
            cases.append((f"dense:cublas {N}x{K} M={M}", lambda x=x, w=w: torch.nn.functional.linear(x, w)))
            for spec, path in args.paths:
                if spec not in packs:
                    packs[spec] = make_packed(spec, N, K, dtype, device, gen)
                cases.append((f"{spec}:{path} {N}x{K} M={M}", path_call(spec, path, x, packs[spec])))
    for _ in range(3):
        for _, call in cases:
            call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _, call in cases:
        torch.cuda._sleep(1000)
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    with open(args.manifest, "w") as f:
        json.dump([label for label, _ in cases], f)


def kernels_by_case(rows: list[dict], labels: list[str]) -> list[dict]:
    """Each profiled launch with the case it belongs to: the launches after the i-th marker are case i's."""
    out, case = [], -1
    for row in rows:
        if MARKER in row.get("Kernel Name", ""):
            case += 1
            continue
        if 0 <= case < len(labels):
            out.append({"case": labels[case], **row})
    return out


def read_raw_csv(text: str) -> list[dict]:
    """ncu's raw page as CSV (``--print-units base``: bytes, nanoseconds, made microseconds here):
    a header row, a units row, then a row per launch."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]  # ncu's own notes start with '=='
    table = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(table) < 2:
        return []
    header, units, body = table[0], table[1], table[2:]
    rows = []
    for values in body:
        row = {}
        for name, unit, value in zip(header, units, values):
            number = _number(value)
            row[name] = value if number is None else number / 1e3 if unit in ("ns", "nsecond") else number  # -> us
        rows.append(row)
    return rows


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def table(kernels: list[dict]) -> str:
    lines = [f"{'case':<40} {'kernel':<34} " + " ".join(f"{c:>10}" for c in SHOWN)]
    for k in kernels:
        cells = []
        for column, metric in SHOWN.items():
            v = k.get(metric)
            if isinstance(v, float) and column == "DRAM GB/s":
                v = v / 1e9
            cells.append(f"{v:>10.1f}" if isinstance(v, float) else f"{'-':>10}")
        lines.append(f"{k['case']:<40} {str(k.get('Kernel Name', ''))[:34]:<34} " + " ".join(cells))
    return "\n".join(lines)


def outer(args) -> int:
    ncu = shutil.which("ncu")
    if ncu is None:
        print("ncu is not on the PATH; this script needs Nsight Compute", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = os.path.join(args.out, "profile")
    manifest = os.path.join(args.out, "manifest.json")
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--cache-control", "all",
           *[a for s in SECTIONS for a in ("--section", s)], "--export", report, "--force-overwrite",
           sys.executable, os.path.abspath(__file__), "--inner", "--manifest", manifest,
           "--paths", args.paths_arg, "--tokens", args.tokens_arg, "--shapes", args.shapes_arg]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(args.out, "ncu.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode or not os.path.exists(manifest):
        print(f"ncu run failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}", file=sys.stderr)
        return 1
    raw = subprocess.run([ncu, "--import", report + ".ncu-rep", "--csv", "--page", "raw", "--print-units", "base"],
                         capture_output=True, text=True)
    with open(os.path.join(args.out, "raw.csv"), "w") as f:
        f.write(raw.stdout)
    kernels = kernels_by_case(read_raw_csv(raw.stdout), json.load(open(manifest)))
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(kernels, f, indent=1)
    print(table(kernels))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="profile")
    ap.add_argument("--paths", dest="paths_arg", default="2:4:dot,2:4:tokens,block:64:0.25:dot_split",
                    help="SPEC:PATH list (as bench/small_m.py takes it)")
    ap.add_argument("--tokens", dest="tokens_arg", default="8,16")
    ap.add_argument("--shapes", dest="shapes_arg", default="4096x14336,14336x4096,4096x4096")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.paths = [tuple(p.rsplit(":", 1)) for p in args.paths_arg.split(",") if p]
    args.tokens = [int(t) for t in args.tokens_arg.split(",") if t]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes_arg.split(",") if s]
    if args.inner:
        inner(args)
        return 0
    return outer(args)


if __name__ == "__main__":
    sys.exit(main())
