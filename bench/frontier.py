"""The speed-quality frontier of a real trained model: what each error budget buys.

For a model, a metric and a fingerprint, plans (and runs) the model at each budget and prints a
row per budget: the held-out value of the metric, the figures users of such a model judge by
(for an LLM perplexity, KL divergence of the next-token distribution and top-1 agreement; for a
sentence embedder mean and minimum cosine and nearest-neighbour retrieval agreement), the
layers per format, the predicted end-to-end speed-up, planning time next to one model
evaluation's time, and with ``--measure`` the realised speed-up against the dense model compiled
the same way in this process (inductor with CUDA graphs on a GPU, eager on a CPU).

    python bench/frontier.py --model minilm --metric cosine --fingerprint cpu --out frontier-minilm.json
    python bench/frontier.py --model smollm2 --metric kl --fingerprint cpu --tokens 4x128 --out frontier-smollm2.json
    python bench/frontier.py --plot docs/frontier.png frontier-minilm.json frontier-smollm2.json

Models come from ``samples/`` (``minilm_sentences.py``, ``smollm2.py``) and are skipped, with the
reason, when their packages are missing. Calibration and held-out text: ``samples/data``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

BUDGETS = {"kl": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2), "cosine": (0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
           "top1": (0.01, 0.02, 0.05, 0.1, 0.2), "rel_l2": (0.01, 0.02, 0.05, 0.1, 0.2)}


def call_shape(text: str) -> tuple[int, int]:
    """BATCHxLENGTH as two ints."""
    b, l = (int(v) for v in text.split("x"))
    return b, l


def smollm2_case(tokens: str, device: torch.device, dtype: torch.dtype, calib_batches: int, example: str = ""):
    import smollm2

    model, tokenizer = smollm2.load_model(dtype)
    model = model.to(device)
    batch, length = call_shape(tokens)
    calib_text, held_text = smollm2.split(smollm2.load_text())
    calib = [(ids.to(device),) for ids in smollm2.token_batches(tokenizer, calib_text, batch, length)[:calib_batches]]
    held = [(ids.to(device),) for ids in smollm2.token_batches(tokenizer, held_text, batch, length)[:2]]

    def judge(rewritten) -> dict:
        figures = []
        with torch.no_grad():
            for (ids,) in held:
                figures.append(smollm2.next_token_figures(rewritten(ids).logits, model(ids).logits, ids.cpu()))
        return {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}

    if example:  # the deployment's shape: real text, the corpus repeated where it is shorter than the call
        b, l = call_shape(example)
        stream = tokenizer(" ".join(calib_text + held_text), return_tensors="pt").input_ids[0]
        stream = stream.repeat(-(-b * l // stream.numel()))
        return model, calib, held, "logits", judge, (stream[: b * l].reshape(b, l).to(device),)
    return model, calib, held, "logits", judge, calib[0]


MINILM_DIR = [None]  # --minilm: a copy made by samples/minilm_sentences.export, for a machine without the package


def minilm_case(tokens: str, device: torch.device, dtype: torch.dtype, calib_batches: int, example: str = ""):
    import minilm_sentences as ms

    batch, length = call_shape(tokens) if tokens else (ms.BATCH, None)
    model, tokenizer, calib, held = ms.prepare(batch=batch, length=length, directory=MINILM_DIR[0])
    model = model.to(device=device, dtype=dtype)
    move = lambda items: [tuple(t.to(device) for t in item) for item in items]  # noqa: E731
    calib, held = move(calib[:calib_batches]), move(held)

    def judge(rewritten) -> dict:
        ref, new = ms.embed(model, held).double(), ms.embed(rewritten, held).double()
        mean, low = ms.embedding_cosine(ref, new)
        # nearest neighbour of every held-out sentence among the others, before and after
        def neighbours(e):
            e = torch.nn.functional.normalize(e, dim=-1)
            sim = e @ e.T
            sim.fill_diagonal_(-2.0)
            return sim.argmax(-1)
        agree = float((neighbours(ref) == neighbours(new)).double().mean())
        return {"mean_cosine": mean, "min_cosine": low, "retrieval_agreement": agree}

    if example:  # the deployment's shape, cut from the first calibration call
        b, l = call_shape(example)
        first = calib[0]
        if b > first[0].shape[0] or l > first[0].shape[1]:
            raise ValueError(f"--example {example} is larger than a calibration call ({tuple(first[0].shape)})")
        return model, calib, held, None, judge, tuple(t[:b, :l] for t in first)
    return model, calib, held, None, judge, calib[0]


def llama8b_shape_case(tokens: str, device: torch.device, dtype: torch.dtype, calib_batches: int, example: str = ""):
    """A Llama-3-8B-shaped LlamaForCausalLM (32 blocks, 4096 -> 14336, GQA 32/8, vocab 128256) with
    random weights: planning cost and the speed the fingerprint predicts at real LLM shapes. Random
    weights say nothing of accuracy, so its quality figures are not a frontier; run it with --plan-only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    batch, length = call_shape(tokens or "8x128")
    g = torch.Generator().manual_seed(0)
    ids = lambda: (torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device),)  # noqa: E731
    calib, held = [ids() for _ in range(calib_batches)], [ids()]

    def judge(rewritten) -> dict:
        return {}

    if example:
        b, l = call_shape(example)
        return model, calib, held, "logits", judge, (torch.randint(0, config.vocab_size, (b, l), generator=g).to(device),)
    return model, calib, held, "logits", judge, calib[0]


CASES = {"smollm2": smollm2_case, "minilm": minilm_case, "llama8b-shape": llama8b_shape_case}


def timed(fn, args, device) -> float:
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    clock = Clock(device, TimingPolicy(repeats=7, min_repeats=5, point_budget_s=2.0, min_sample_s=0.01))
    with torch.no_grad():
        return clock.eager([lambda: fn(*args)], clock.warm([lambda: fn(*args)]))


def run(args) -> dict:
    import sparsec

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    try:
        model, calib, held, output, judge, example = CASES[args.model](args.tokens, device, dtype, args.calib_batches,
                                                                       args.example)
    except Exception as exc:  # noqa: BLE001 - a missing optional package: say which, skip
        print(f"frontier: {args.model} skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    with torch.no_grad():
        model(*calib[0])  # warm-up
    passes = evaluation_passes(model, calib, device)
    mode = args.mode or ("reduce-overhead" if device.type == "cuda" else "default")
    dense = torch.compile(model, mode=mode) if device.type == "cuda" else model
    dense_us = timed(dense, example, device) if args.measure else None
    lowered_dense_us = None
    if args.measure and not args.plan_only:
        # the same model through sparsec with every layer kept dense: the share of a measured
        # speed-up that is the lowering's, not the rewrite's
        torch._dynamo.reset()
        kept = sparsec.optimize(model, example, calibration=calib[:1], fingerprint=args.fingerprint[0], mode=mode,
                                output=output, plan={"layers": {"_default": "dense"}})
        lowered_dense_us = timed(kept.module, example, device)
        baseline = f'torch.compile(mode="{mode}")' if device.type == "cuda" else "eager"
        print(f"dense: {baseline} {dense_us:.1f} us, through sparsec with every layer dense {lowered_dense_us:.1f} us",
              flush=True)
    from sparsec.fingerprint.device import current_device_name

    shape = lambda item: "x".join(str(d) for d in next(t.shape for t in item if isinstance(t, torch.Tensor))[:2])  # noqa: E731
    rows = []
    result = {"model": args.model, "metric": args.metric, "fingerprint": ", ".join(args.fingerprint),
              "tokens": shape(example), "calibration_tokens": shape(calib[0]), "formats": args.formats or "all",
              "device": current_device_name(device.type),
              "dtype": args.dtype, "torch": torch.__version__, "triton": _triton_version(),
              "date": datetime.now(timezone.utc).date().isoformat(), "calibration_batches": len(calib),
              "dense_us": dense_us, "lowered_dense_us": lowered_dense_us, "rows": rows}
    for fingerprint, budget in [(f, b) for f in args.fingerprint for b in args.budgets or BUDGETS[args.metric]]:
        torch._dynamo.reset()
        start = time.perf_counter()
        optimized = sparsec.optimize(model, example, calibration=calib, heldout=held, fingerprint=fingerprint,
                                  error_budget=budget, metric=args.metric, output=output, formats=args.formats,
                                  mode=mode, lower=not args.plan_only, recovery=args.recovery,
                                  measure=args.plan_measure and not args.plan_only)
        plan_s = time.perf_counter() - start
        # the machine's speed drifts over minutes: one evaluation is the median of passes timed just
        # before the first plan and just after this one
        after = evaluation_passes(model, calib, device)
        one_eval_s = statistics.median(passes + after)
        if args.reports:
            Path(args.reports).mkdir(parents=True, exist_ok=True)
            optimized.report.save(str(Path(args.reports) / f"{args.model}-{fingerprint}-{shape(example)}-{budget:g}.json"))
        report = optimized.report.to_dict()
        e2e = report["end_to_end"]
        row = {"budget": budget, "metric": args.metric, "fingerprint": fingerprint, "calibration": e2e["measured_error"],
               "heldout": e2e["heldout_error"], "predicted_speedup": e2e["predicted_speedup"],
               "formats": dict(Counter(l["format"] for l in report["layers"] if l["format"] != "dense")),
               "dense_layers": sum(1 for l in report["layers"] if l["format"] == "dense"),
               "layers": len(report["layers"]), "plan_s": plan_s, "one_eval_s": one_eval_s,
               "one_eval_s_before_after": [statistics.median(passes), statistics.median(after)],
               "evaluations": report["planning"]["model_evaluations"] + report["planning"]["heldout_evaluations"],
               "evaluations_by_step": {name: n["calibration"] + n["heldout"]
                                       for name, n in (report["planning"].get("evaluations_by_step") or {}).items()},
               "steps_s": report["planning"]["timing"]["steps_s"], "recovery": args.recovery,
               "recovery_summary": report["planning"].get("recovery"), "replans": report["planning"].get("replans"),
               "fallbacks": report.get("fallbacks", [])}
        if args.plan_measure and not args.plan_only:  # what the measure option found, and whether it kept it dense
            row["planned_with_measure"] = True
            row["plan_measured_speedup"] = e2e.get("measured_speedup")
            row["kept_dense_measured_speedup"] = e2e.get("kept_dense_measured_speedup")
            row["layers_refused_as_measured_slower"] = sum(
                1 for l in report["layers"] for c in l.get("candidates", [])
                if "slower than dense" in (c.get("rejected_because") or "") and "measured" in c["rejected_because"])
        if not args.plan_only and example is calib[0]:
            # at another shape the rewritten module would be compiled (and planned) anew: the
            # report's held-out metric is then the quality figure
            row.update(judge(optimized.module))
        if args.judge and example is not calib[0] and any(l["format"] != "dense" for l in report["layers"]):
            # the plan made for the deployment's shape, applied at the calibration shape (each
            # layer's format forced, fitted and recovered again on the same data) to read the
            # figures users judge by on held-out text
            torch._dynamo.reset()
            forced = {"layers": {"_default": "dense", **{l["name"]: l["format"] for l in report["layers"]}}}
            again = sparsec.optimize(model, calib[0], calibration=calib, heldout=held, fingerprint=fingerprint,
                                     error_budget=budget, metric=args.metric, output=output, plan=forced,
                                     mode="default", recovery=args.recovery)
            row.update(judge(again.module))
            row["judged_at_calibration_shape"] = True
        if args.measure and not args.plan_only:
            row["rewritten_us"] = timed(optimized.module, example, device)
            row["measured_speedup"] = dense_us / row["rewritten_us"]
            row["measured_over_lowered_dense"] = lowered_dense_us / row["rewritten_us"]
        rows.append(row)
        print(line(row), flush=True)
        if args.out:  # after every row: a run stopped by its time limit keeps what it measured
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def evaluation_passes(model, calib, device: torch.device, passes: int = 3) -> list[float]:
    """Seconds of each of ``passes`` forward passes of the plain model over the calibration data:
    what "one model evaluation" means in planning cost."""
    out = []
    with torch.no_grad():
        for _ in range(passes):
            _sync(device)
            start = time.perf_counter()
            for item in calib:
                model(*item)
            _sync(device)
            out.append(time.perf_counter() - start)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def line(row: dict) -> str:
    extra = ", ".join(f"{k} {row[k]:.4g}" for k in ("perplexity", "kl", "top1_agreement", "mean_cosine",
                                                     "min_cosine", "retrieval_agreement") if k in row)
    formats = ", ".join(f"{n} {f}" for f, n in sorted(row["formats"].items())) or "all dense"
    measured = f", measured {row['measured_speedup']:.2f}x" if "measured_speedup" in row else ""
    if "measured_over_lowered_dense" in row:
        measured += f" ({row['measured_over_lowered_dense']:.2f}x over sparsec's all-dense lowering)"
    extra = f" ({extra})" if extra else ""
    held = f"held-out {row['metric']} {row['heldout']:.4g}{extra}; " if row.get("heldout") is not None else ""
    on = f" on {row['fingerprint']}" if row.get("fingerprint") else ""
    replans = row.get("replans") or (row.get("recovery_summary") or {}).get("replans") or []
    replanned = ", ".join(f"re-planned at {r['one_shot_budget']:.3g}: {r['rewritten']} rewritten, "
                          f"{'kept' if r['kept'] else 'not kept'}" for r in replans)
    on += f", recovery {row['recovery']}" if row.get("recovery") else ""
    on += f" ({replanned})" if replanned else ""
    return (f"budget {row['budget']:g}{on}: {held}{formats} "
            f"({row['dense_layers']} of {row['layers']} dense); predicted {row['predicted_speedup'] or 1.0:.2f}x"
            f"{measured}; planned in {row['plan_s']:.0f} s = {row['plan_s'] / row['one_eval_s']:.0f} evaluations' "
            f"time, {row.get('evaluations', '?')} evaluations run{_by_step(row)}")


def _by_step(row: dict) -> str:
    """" (verify 42, replan 12)": the evaluations (calibration and held-out) by the step that ran them."""
    steps = [f"{name} {n}" for name, n in (row.get("evaluations_by_step") or {}).items() if n]
    return f" ({', '.join(steps)})" if steps else ""


def table(result: dict) -> str:
    head = (f"{result['model']} ({result['metric']}, fingerprint {result['fingerprint']}, {result['tokens']} tokens "
            f"(calibration {result.get('calibration_tokens', result['tokens'])}), "
            f"{result['device']}, torch {result['torch']}, {result['date']})")
    return "\n".join([head] + [line(r) for r in result["rows"]])


def plot(paths: list[Path], out: Path) -> None:
    """Speed-up against held-out quality, one panel per model, one line per device/fingerprint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in paths]
    results = [r for r in results if all(row.get("heldout") is not None for row in r["rows"])]  # plan-only runs: no quality
    lines: dict[tuple, list] = {}  # runs of one model, device and shape (split over several files) are one line
    for r in results:
        lines.setdefault((r["model"], r["fingerprint"], r["device"], r["tokens"], r["metric"]), []).extend(r["rows"])
    models = list(dict.fromkeys(key[0] for key in lines))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        for (model, fingerprint, device, tokens, metric), rows in lines.items():
            if model != name:
                continue
            rows = sorted(rows, key=lambda row: row["heldout"])
            xs = [row["heldout"] for row in rows]
            ys = [row.get("measured_speedup") or row["predicted_speedup"] or 1.0 for row in rows]
            how = "measured" if any("measured_speedup" in row for row in rows) else "predicted"
            ax.plot(xs, ys, marker="o", label=f"{fingerprint} ({device}), {tokens} tokens, {how}")
            ax.set_xlabel(f"held-out {metric}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("speed-up over dense")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CASES))
    parser.add_argument("--metric", default=None, help="default: kl for smollm2, cosine for minilm")
    parser.add_argument("--fingerprint", nargs="+", default=["cpu"], help="one or more: each plans every budget")
    parser.add_argument("--budgets", type=float, nargs="+", default=None)
    parser.add_argument("--tokens", default="", help="BATCHxLENGTH of each call (smollm2: default 4x128, "
                        "minilm: 32 x the longest sentence, llama8b-shape: 8x128)")
    parser.add_argument("--example", default="", help="BATCHxLENGTH of the call the plan is priced and timed at "
                        "(decode: 1x1); default: a calibration call. At another shape than --tokens, quality is the "
                        "report's held-out metric alone")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--formats", nargs="+", default=None)
    parser.add_argument("--minilm", default=None, help="MiniLM from this folder (made by --export-minilm) "
                        "instead of its package")
    parser.add_argument("--export-minilm", default=None, metavar="DIR", help="copy MiniLM into DIR in float16 and exit")
    parser.add_argument("--recovery", default="full", choices=["none", "sequential", "full"],
                        help="sparsec's recovery option (full: refit, then plan again with what that saved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", default=None, choices=["default", "reduce-overhead"],
                        help="torch.compile mode the plan is priced for (default: reduce-overhead on CUDA, "
                             "else default); reduce-overhead on the CPU with --plan-only reproduces a GPU plan there")
    parser.add_argument("--measure", action="store_true", help="also time each rewritten model against dense")
    parser.add_argument("--plan-measure", action="store_true",
                        help="plan with sparsec's measure option: each chosen layer timed here against dense and "
                             "refused if slower, the rewritten graph timed against the original and kept dense if slower")
    parser.add_argument("--plan-only", action="store_true", help="plan without lowering (lower=False): planning cost")
    parser.add_argument("--judge", action="store_true", help="with --example: apply each plan at the calibration "
                        "shape and read perplexity, KL and top-1 agreement (or cosines) on held-out data")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    parser.add_argument("--reports", default=None, help="write each row's rewrite report into this folder")
    parser.add_argument("--plot", default=None, help="with result JSON files as arguments: draw them into this PNG")
    parser.add_argument("results", nargs="*", help="result JSON files to plot")
    args = parser.parse_args(argv)
    if args.plot:
        plot([Path(p) for p in args.results], Path(args.plot))
        return 0
    if args.export_minilm:
        import minilm_sentences

        print(f"MiniLM copied to {minilm_sentences.export(args.export_minilm)}")
        return 0
    MINILM_DIR[0] = args.minilm
    if args.model is None:
        parser.error("--model is required unless --plot is given")
    args.metric = args.metric or ("cosine" if args.model == "minilm" else "kl")
    args.tokens = args.tokens or ("4x128" if args.model == "smollm2" else "")
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
