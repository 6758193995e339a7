"""all-MiniLM-L6-v2 on real sentences: layer reconstruction error of every method, and the planner
at four error budgets. Runs on CPU; produces the numbers of docs/accuracy.md.

    python bench/accuracy_minilm.py --fingerprint h200 --out bench/results/accuracy-minilm/accuracy_minilm_h200.json

Part 1 (``--layers``): for each of the model's linear layers, the relative output error
||(W - W_hat) X^T|| / ||W X^T + b|| on the calibration sentences and on held-out sentences, for
every method of every format family, over each family's grid for that shape, with the time each
method took. Part 2 (``--budgets``): ``sparsec.optimize`` at each budget with the calibration and
held-out sentences; the measured end-to-end error on both, the cosine similarity of the held-out
sentence embeddings before and after (computed with the lowered module), the plan's predicted
speedup on the fingerprint, and which formats were chosen.

The model runs in float32 on the CPU, where a rewrite's error can be measured down to a
fraction of a percent (in bfloat16 the rounding of the dense model itself moves MiniLM's
embeddings by about 0.8%, above the smaller budgets). A GPU fingerprint holds bfloat16 kernel
timings, so with ``--price-as bfloat16`` (the default for GPU fingerprints) each layer is priced
as the bfloat16 layer it would be served as, while its error is measured in float32.

Needs the optional extra: pip install 'sparsec[minilm]'.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.005, 0.01, 0.02, 0.05)


def load_sample():
    spec = importlib.util.spec_from_file_location("minilm_sentences", ROOT / "samples" / "minilm_sentences.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layer_stats(model, batches) -> dict:
    """SiteStats of every nn.Linear's input over ``batches`` (forward hooks, nothing else changed)."""
    from sparsec.sites import SiteStats

    stats, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            stats[name] = SiteStats.empty(mod.in_features)
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: stats[name].add(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            for item in batches:
                model(*item)
    finally:
        for h in hooks:
            h.remove()
    return stats


def method_errors(model, calib_stats, held_stats, families) -> list[dict]:
    from sparsec.passes.registry import HANDLERS
    from sparsec.sites import relative_output_error

    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        W, b = mod.weight.detach().float(), None if mod.bias is None else mod.bias.detach().float()
        N, K = W.shape
        for family in families:
            handler = HANDLERS[family]
            specs = [s for s in handler.grid(N, K) if s.check(N, K) is None]
            if not specs:
                continue
            for method in handler.methods:
                t0 = time.perf_counter()
                approx = handler.approximate(specs, W, calib_stats[name], method=method)
                seconds = time.perf_counter() - t0
                for spec, w_hat in zip(specs, approx):
                    rows.append({
                        "layer": name, "role": re.sub(r"\d+", "#", name), "shape": [N, K], "family": family,
                        "format": str(spec), "method": method,
                        "calibration_error": relative_output_error(W, w_hat, calib_stats[name], b),
                        "heldout_error": relative_output_error(W, w_hat, held_stats[name], b),
                        "seconds_all_specs": seconds,
                    })
        print(f"  {name}: done", file=sys.stderr, flush=True)
    return rows


class PricedAs:
    """A fingerprint that prices every layer as if it ran in ``dtype`` (the serving dtype)."""

    def __init__(self, fingerprint, dtype: str):
        self._fp, self.dtype = fingerprint, dtype

    def __getattr__(self, name):
        return getattr(self._fp, name)

    def can_predict(self, fmt, dtype="bfloat16", mode="eager"):
        return self._fp.can_predict(fmt, self.dtype, mode)

    def predict_detail(self, fmt, M, N, K, dtype="bfloat16", mode="eager"):
        return self._fp.predict_detail(fmt, M, N, K, dtype=self.dtype, mode=mode)


def budget_runs(sample, model, calib, held, fingerprint, budgets, mode: str = "default") -> list[dict]:
    import sparsec

    reference = sample.embed(model, held)
    rows = []
    for budget in budgets:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        result = sparsec.optimize(model, calib[0], fingerprint=fingerprint, error_budget=budget,
                                  calibration=calib, heldout=held, mode=mode)
        seconds = time.perf_counter() - t0
        cos_mean, cos_min = sample.embedding_cosine(reference, sample.embed(result.module, held))
        report = result.report
        e2e = report.end_to_end
        chosen = collections.Counter(l["format"].split(":")[0] if l["format"] != "2:4" else "2:4"
                                     for l in report.layers)
        rows.append({
            "budget": budget,
            "calibration_error": e2e["measured_error"],
            "heldout_error": e2e["heldout_error"],
            "heldout_cosine_mean": cos_mean,
            "heldout_cosine_min": cos_min,
            "predicted_speedup": e2e["predicted_speedup"],
            "rewritten": report.totals["rewritten"],
            "layers": report.totals["layers"],
            "families": dict(chosen),
            "formats": {l["name"]: l["format"] for l in report.layers},
            "fingerprint": report.fingerprint["name"],
            "seconds": seconds,
        })
        print(f"  budget {budget:.1%}: calibration {e2e['measured_error']:.3%}, held-out "
              f"{e2e['heldout_error']:.3%}, cosine {cos_mean:.6f} (min {cos_min:.6f}), "
              f"speedup {e2e['predicted_speedup']:.3f}x, {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


# -- summaries ---------------------------------------------------------------------------------


def ordering_summary(rows, family, better, worse) -> dict:
    """How many (layer, format) pairs have ``better``'s error below ``worse``'s, per data set."""
    by_key = collections.defaultdict(dict)
    for r in rows:
        if r["family"] == family:
            by_key[(r["layer"], r["format"])][r["method"]] = r
    out = {}
    for data in ("calibration_error", "heldout_error"):
        ok = sum(m[better][data] < m[worse][data] for m in by_key.values())
        out[data] = [ok, len(by_key)]
    return out


def role_table(rows, family, methods, fmt=None) -> list[str]:
    """Markdown: mean error per role (over the 6 blocks) for each method, calibration / held-out."""
    cells = collections.defaultdict(list)
    for r in rows:
        if r["family"] == family and (fmt is None or r["format"] == fmt):
            cells[(r["role"], r["format"], r["method"])].append((r["calibration_error"], r["heldout_error"]))
    keys = sorted({(role, f) for role, f, _ in cells}, key=lambda k: (k[0], _spec_order(k[1])))
    lines = ["| layer (6 blocks) | format | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for role, f in keys:
        vals = []
        for m in methods:
            pairs = cells.get((role, f, m), [])
            if not pairs:
                vals.append("")
                continue
            c = statistics.mean(p[0] for p in pairs)
            h = statistics.mean(p[1] for p in pairs)
            vals.append(f"{c:.2%} / {h:.2%}")
        lines.append(f"| `{role.replace('encoder.encoder.', '').replace('encoder.', '')}` | {f} | " + " | ".join(vals) + " |")
    return lines


def _spec_order(fmt: str):
    parts = fmt.split(":")
    return tuple(float(p) for p in parts[1:] if re.fullmatch(r"[\d.]+", p))


def timing_table(rows) -> list[str]:
    seen = {}
    for r in rows:
        seen[(r["family"], r["method"], tuple(r["shape"]), r["layer"])] = r["seconds_all_specs"]
    agg = collections.defaultdict(list)
    counts = {}
    for (family, method, shape, _), s in seen.items():
        agg[(family, method, shape)].append(s)
    for r in rows:
        counts.setdefault((r["family"], r["method"], tuple(r["shape"])), set()).add(r["format"])
    lines = ["| family | method | shape N x K | specs | median seconds (all specs of one layer) |",
             "|---|---|---|---|---|"]
    for key in sorted(agg):
        family, method, shape = key
        lines.append(f"| {family} | {method} | {shape[0]} x {shape[1]} | {len(counts[key])} | {statistics.median(agg[key]):.3f} |")
    return lines


def budget_table(rows) -> list[str]:
    lines = ["| budget | calibration error | held-out error | held-out / budget | embedding cosine mean (min) | "
             "predicted speedup | layers rewritten | formats chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fams = ", ".join(f"{k} {v}" for k, v in sorted(r["families"].items()) if k != "dense")
        lines.append(f"| {r['budget']:.1%} | {r['calibration_error']:.3%} | {r['heldout_error']:.3%} | "
                     f"{r['heldout_error'] / r['budget']:.2f} | {r['heldout_cosine_mean']:.6f} ({r['heldout_cosine_min']:.6f}) | "
                     f"{r['predicted_speedup']:.3f}x | {r['rewritten']} of {r['layers']} | {fams or '-'} |")
    return lines


def markdown(result) -> str:
    flags = f"--fingerprint {result['fingerprint']}"
    if result.get("mode", "default") != "default":
        flags += f" --mode {result['mode']}"
    batch, length = result["batch_shape"]
    if batch != 32:
        flags += f" --batch {batch}"
    out = [f"Produced by `python bench/accuracy_minilm.py {flags}` on {result['machine']} "
           f"(torch {result['torch']}), {result['created']}: {result['calibration_batches']} calibration and "
           f"{result['heldout_batches']} held-out calls of {batch} sentences x {length} tokens (M = {batch * length}).", ""]
    rows = result.get("layer_rows") or []
    if rows:
        for family, better, worse in (("2:4", "sparsegpt", "wanda"), ("2:4", "wanda", "magnitude"),
                                      ("lowrank", "activation-aware", "plain"), ("monarch", "als", "projection"),
                                      ("block", "least-squares", "activation"), ("block", "activation", "magnitude")):
            s = ordering_summary(rows, family, better, worse)
            if s["calibration_error"][1]:
                out.append(f"- {family}: {better} below {worse} on {s['calibration_error'][0]} of "
                           f"{s['calibration_error'][1]} (layer, format) pairs on calibration data, "
                           f"{s['heldout_error'][0]} of {s['heldout_error'][1]} on held-out data")
        out += ["", "2:4, mean relative output error per layer role (calibration / held-out):", ""]
        out += role_table(rows, "2:4", ["sparsegpt", "wanda", "magnitude"])
        out += ["", "Low rank:", ""]
        out += role_table(rows, "lowrank", ["activation-aware", "plain"])
        out += ["", "Monarch:", ""]
        out += role_table(rows, "monarch", ["als", "projection"])
        out += ["", "Block sparse, half the blocks kept:", ""]
        out += [l for l in role_table(rows, "block", ["least-squares", "activation", "magnitude"])
                if "|" in l and (":0.5 |" in l or l.startswith("| layer") or l.startswith("|---"))]
        out += ["", "Time per layer (all grid specs of the family at once):", ""]
        out += timing_table(rows)
    if result.get("budget_rows"):
        priced = f", layers priced as {result['priced_as']}" if result.get("priced_as") else ""
        mode = f", mode {result['mode']}" if result.get("mode", "default") != "default" else ""
        out += ["", f"Planner on the `{result['fingerprint']}` fingerprint{priced}{mode}:", ""]
        out += budget_table(result["budget_rows"])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprint", default="h200", help="fingerprint the planner prices with (default h200)")
    parser.add_argument("--price-as", default=None,
                        help="dtype to price layers in (default: bfloat16 for a GPU fingerprint, the model's own on CPU)")
    parser.add_argument("--out", default=None, help="write results JSON (and a .md beside it)")
    parser.add_argument("--families", nargs="*", default=["2:4", "block", "lowrank", "monarch"])
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS))
    parser.add_argument("--batch", type=int, default=32, help="sentences per call (tokens per call: batch x padded length)")
    parser.add_argument("--mode", default="default", help="'reduce-overhead' prices CUDA-graph replay")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer method comparison")
    parser.add_argument("--no-budgets", action="store_true", help="skip the planner runs")
    parser.add_argument("--render", default=None, help="print the markdown of a results JSON and exit")
    args = parser.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0

    sample = load_sample()
    model, _, calib, held = sample.prepare(args.batch)
    result = {
        "schema": "sparsec.bench.accuracy_minilm/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "fingerprint": args.fingerprint,
        "priced_as": None,
        "calibration_batches": len(calib),
        "heldout_batches": len(held),
        "batch_shape": list(calib[0][0].shape),
        "mode": args.mode,
    }
    if not args.no_layers:
        print("per-layer method comparison", file=sys.stderr)
        calib_stats, held_stats = layer_stats(model, calib), layer_stats(model, held)
        result["layer_rows"] = method_errors(model, calib_stats, held_stats, args.families)
    if not args.no_budgets:
        print(f"planner at budgets {args.budgets} on {args.fingerprint}", file=sys.stderr)
        from sparsec.fingerprint import load_fingerprint

        fp = load_fingerprint(args.fingerprint)
        price_as = args.price_as or ("bfloat16" if fp.device.get("kind") == "cuda" else None)
        result["priced_as"] = price_as
        result["budget_rows"] = budget_runs(sample, model, calib, held, PricedAs(fp, price_as) if price_as else fp,
                                            args.budgets, args.mode)
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for path, content in ((out, json.dumps(result, indent=1) + "\n"), (out.with_suffix(".md"), text)):
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(content)
            os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
