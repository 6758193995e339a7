"""Held-out check of the cost model: measure shapes that are not on the fingerprint's grid and
compare each with ``Fingerprint.predict``.

For every kernel family in the fingerprint, layer shapes of real models (N x K off the grid,
M between grid points, format settings between measured ones) are drawn with a fixed seed and
timed exactly as ``sparsec fingerprint measure`` times its grid (same clock, rotation and
statistic), using the implementation the prediction names. Reported: per family and mode, and
overall, the median and 90th percentile of |predicted - measured| / measured.

Run on the device the fingerprint describes, right after measuring it, or measure first in the
same process (``--measure``, which resumes a partial file)::

    python3 bench/cost_model.py --fingerprint fingerprints/h200.json --out results/cost_model_h200.json
    python3 bench/cost_model.py --measure fingerprints/h200.json --name h200 --out $OUT/cost_model_h200.json

Works from a plain checkout too (no ``pip install``): the package directories are mapped as
pyproject.toml maps them. Writes the JSON (every case, and the summary with device, versions and
date) and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from sparsec.fingerprint import load_fingerprint  # noqa: E402
from sparsec.fingerprint.device import software_versions  # noqa: E402
from sparsec.fingerprint.families import PARAM_GRID, Variant, discover_families  # noqa: E402
from sparsec.fingerprint.timing import Clock, quick_autotune, rotation_count  # noqa: E402
from sparsec.formats import parse_spec  # noqa: E402

# Weight shapes of common models (BERT-base/large, Llama-3-8B, Mistral-7B, GPT-2 XL, ...),
# none of them on the measurement grid.
MODEL_SHAPES = [
    (3072, 768), (768, 3072), (2304, 768), (4096, 1024), (1024, 4096), (14336, 4096), (4096, 14336),
    (6144, 4096), (11008, 4096), (4096, 11008), (5120, 5120), (6400, 1600), (1600, 6400), (2560, 2560),
]
CPU_SHAPES = [(768, 768), (3072, 768), (768, 3072), (1536, 1536), (2304, 768), (3072, 1024)]
GPU_M = [3, 24, 100, 384, 1000, 3000, 6000, 12000]
CPU_M = [3, 24, 100, 384]


def off_grid_variants(fp, family: str, N: int, K: int, rng: random.Random) -> list[str]:
    """Format settings between the measured ones: kept fractions between measured ones at a
    measured block size (block sizes are discrete), rank fractions between measured ones."""
    if family in ("dense", "2:4"):
        return [family]
    if family == "block":
        sizes = sorted({e["block"] for e in fp.data["kernels"].get("block", [])}) or [b for b, _ in PARAM_GRID["block"]]
        return [f"block:{rng.choice(sizes)}:{rng.choice([0.2, 0.3, 0.35, 0.4]):g}"]
    if family == "lowrank":
        return [f"lowrank:{max(8, int(min(N, K) * rng.choice([0.1, 0.2, 0.3, 0.4])) // 8 * 8)}"]
    if family == "monarch":
        return [f"monarch:{nb}" for nb in PARAM_GRID["monarch"][:1]]
    return []


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _measure_case(fam, spec, M, N, K, mode, clock, grid, rotation, device, dtype, gen) -> float:
    """Microseconds of one case, timed like a grid point (same clock, rotation, statistic)."""
    variant = Variant(spec, {})
    weight, _ = fam.build(variant, N, K, dtype, device, gen)
    esize = torch.empty((), dtype=dtype).element_size()
    wbytes = weight.numel() * weight.element_size() if isinstance(weight, torch.Tensor) else weight.nbytes
    r = rotation_count(wbytes + (M * K + M * N) * esize, rotation, grid.max_copies)
    weights = [weight] + [fam.build(variant, N, K, dtype, device, gen)[0] for _ in range(r - 1)]
    xs = [torch.randn(M, K, generator=gen, device=device).to(dtype) for _ in range(r)]
    calls = [lambda x=x, w=w: fam.run(x, w) for x, w in zip(xs, weights)]
    single = clock.warm(calls)
    return clock.graph(calls, single) if mode == "graph" else clock.eager(calls, single)


def time_cases(fp, cases, by_kernel, clock, grid, rotation, device, dtype, dtype_name, seed, budget_s,
               rounds) -> list[dict]:
    """Time each case with the implementation its prediction names, ``rounds`` times at
    different moments (the smallest time kept: on a shared CPU contention only adds time)."""
    cuda = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(seed)
    best: dict[int, float] = {}
    preds = {}
    t0 = time.monotonic()
    for rnd in range(rounds):
        for i, (family, spec, M, N, K, mode) in enumerate(cases):
            if time.monotonic() - t0 > budget_s:
                break
            if rnd and i not in best:
                continue
            pred = preds.get(i) or fp.predict_detail(spec, M, N, K, dtype_name, mode)
            preds[i] = pred
            fam = by_kernel.get(pred.kernel)
            if fam is None:
                continue  # e.g. a composed prediction: no single kernel to time
            try:
                us = _measure_case(fam, spec, M, N, K, mode, clock, grid, rotation, device, dtype, gen)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"{spec} {M}x{N}x{K} {mode}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            best[i] = min(us, best.get(i, math.inf))
    if time.monotonic() - t0 > budget_s:
        print(f"budget of {budget_s:g} s used; {len(best)} cases timed", file=sys.stderr)
    results = []
    for i, us in sorted(best.items()):
        family, spec, M, N, K, mode = cases[i]
        pred = preds[i]
        results.append({"family": family, "format": spec, "M": M, "N": N, "K": K, "mode": mode,
                        "kernel": pred.kernel, "predicted_us": round(pred.us, 3), "measured_us": round(us, 3),
                        "rel_error": round(abs(pred.us - us) / us, 4), "note": pred.note})
    return results


def summarize(results: list[dict]) -> dict:
    groups: dict[str, list[float]] = {}
    for r in results:
        groups.setdefault(f"{r['family']} {r['mode']}", []).append(r["rel_error"])
    summary = {k: {"n": len(v), "median": round(statistics.median(v), 4), "p90": round(quantile(v, 0.9), 4)}
               for k, v in sorted(groups.items())}
    every = [r["rel_error"] for r in results]
    summary["all"] = {"n": len(every), "median": round(statistics.median(every), 4) if every else None,
                      "p90": round(quantile(every, 0.9), 4) if every else None}
    return summary


def print_table(doc: dict) -> None:
    sw, fpd = doc["software"], doc["fingerprint"]
    print(f"\nCost model on {doc['device']} (fingerprint {fpd['name']} {fpd['hash']}), {doc['dtype']}, "
          f"torch {sw['torch']}, triton {sw['triton']}, CUDA {sw['cuda']}, driver {sw['driver']}, {doc['date']}"
          + (f"; {doc['reanalyzed']}" if doc.get("reanalyzed") else "") + "\n")
    print("| family, mode | cases | median error | p90 error |")
    print("|---|---|---|---|")
    for k, s in doc["summary"].items():
        if s["n"]:
            print(f"| {k} | {s['n']} | {100 * s['median']:.1f}% | {100 * s['p90']:.1f}% |")


def reanalyze(path: Path, fingerprint: str) -> dict:
    """Predict the measured cases of an earlier run again with this predictor (no device needed).
    Cases whose predicted implementation changed are left out: their measurement timed another."""
    doc = json.loads(path.read_text())
    fp = load_fingerprint(fingerprint)
    kept = []
    for r in doc["cases"]:
        pred = fp.predict_detail(r["format"], r["M"], r["N"], r["K"], doc["dtype"], r["mode"])
        if pred.kernel != r["kernel"]:
            continue
        kept.append(dict(r, predicted_us=round(pred.us, 3), note=pred.note,
                         rel_error=round(abs(pred.us - r["measured_us"]) / r["measured_us"], 4)))
    doc.update(cases=kept, summary=summarize(kept),
               reanalyzed=f"predictions recomputed {datetime.now(timezone.utc):%Y-%m-%d} "
                          f"({len(kept)} of the run's cases kept the same implementation)")
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fingerprint", default="auto", help="fingerprint to check (ignored with --measure)")
    ap.add_argument("--measure", type=Path, default=None, help="measure this device into PATH first (resumes)")
    ap.add_argument("--name", default=None, help="name of the measured fingerprint")
    ap.add_argument("--measure-budget-s", type=float, default=None, help="time budget of the measurement")
    ap.add_argument("--grid", default=None, help="measurement grid (default: this device's; 'tiny' to check)")
    ap.add_argument("--redo", action="append", default=None, metavar="KERNEL",
                    help="with --measure: measure this kernel or family again in an existing file")
    ap.add_argument("--redo-up-to", type=int, default=None, help="with --redo: only the points at M <= this")
    ap.add_argument("--extend", action="store_true", help="with --measure: continue curves stopped early")
    ap.add_argument("--out", type=Path, required=True, help="JSON result file")
    ap.add_argument("--budget-s", type=float, default=100.0, help="time budget of the comparison")
    ap.add_argument("--cases", type=int, default=24, help="cases per family and mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reanalyze", type=Path, default=None,
                    help="recompute the predictions of an earlier result JSON with this predictor")
    ap.add_argument("--rounds", type=int, default=None, help="times each case is timed (default 1 GPU, 2 CPU)")
    args = ap.parse_args(argv)

    if args.reanalyze:
        doc = reanalyze(args.reanalyze, args.fingerprint)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print_table(doc)
        return 0
    if args.measure:
        from sparsec.fingerprint.measure import measure

        done = args.measure.exists() and json.loads(args.measure.read_text() or "{}").get("complete")
        if done and not args.redo and not args.extend:
            print(f"{args.measure} is complete; comparing only", file=sys.stderr)
        else:
            measure(args.measure, grid=args.grid, budget_s=args.measure_budget_s, name=args.name, redo=args.redo,
                    extend=args.extend, redo_up_to=args.redo_up_to)
        args.fingerprint = args.measure
    fp = load_fingerprint(args.fingerprint)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    warn = fp.matches_current_device()
    if warn:
        print(f"warning: {warn}", file=sys.stderr)
    dtype_name = "bfloat16" if cuda else "float32"
    dtype = getattr(torch, dtype_name)
    from sparsec.fingerprint.measure import GRIDS

    grid = GRIDS["cuda" if cuda else "cpu"]
    policy = grid.policy  # time exactly as the grid was timed
    clock = Clock(device, policy)
    rotation = fp.data["method"].get("rotation_bytes") or (2 * (fp.device.get("l2_bytes") or 64 << 20))
    fams, _ = discover_families(device)
    by_kernel = {f.kernel: f for f in fams}
    modes = ("eager", "graph") if cuda else ("eager",)
    rng = random.Random(args.seed)
    shapes, Ms = (MODEL_SHAPES, GPU_M) if cuda else (CPU_SHAPES, CPU_M)

    cases = []
    for family in sorted({f.family for f in fams}):
        for mode in modes:
            for _ in range(args.cases):
                N, K = rng.choice(shapes)
                M = rng.choice(Ms)
                for spec in off_grid_variants(fp, family, N, K, rng):
                    if parse_spec(spec).check(N, K) is None and fp.can_predict(spec, dtype_name, mode) is None:
                        cases.append((family, spec, M, N, K, mode))
    rng.shuffle(cases)  # a budget cut leaves a sample of every family, not the first ones only

    with quick_autotune():  # as during the measurement
        results = time_cases(fp, cases, by_kernel, clock, grid, rotation, device, dtype, dtype_name,
                             args.seed, args.budget_s, args.rounds or (1 if cuda else 2))

    summary = summarize(results)
    doc = {"fingerprint": {"name": fp.name, "hash": fp.hash, "device": fp.device["name"]},
           "device": torch.cuda.get_device_name() if cuda else fp.device["name"],
           "software": software_versions(), "dtype": dtype_name,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "summary": summary, "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
