"""act against actrot through sparsec itself, on SmolLM2-135M-Instruct (real weights).

bench/act_rotation.py measured what rotating a layer's inputs before thresholding could buy, by
hand. This runs the formats sparsec ships, planned by ``sparsec.optimize`` with a forced plan per
row and judged on held-out text against the dense model (perplexity, KL of the next-token
distribution, top-1 agreement):

* ``act``: every linear layer of the 30 blocks at ``act:S``;
* ``actrot gate/up``: gate and up at ``actrot:S`` (one product with Q for both, which pays at run
  time where S N > K), every other block layer at ``act:S``;
* ``actrot all``: every block layer at ``actrot:S`` (the accuracy bound; its products with Q cost
  more than they save on q/k/v, o and down).

Each row reports the mean fraction of calibration inputs skipped per layer (for actrot, of the rows
held apart: what the thresholds were set to), the fraction of the held-out text's inputs the
rewritten layers skip (counted on their inputs as they run), and the planner's predicted speed-up
on the fingerprint named.

    SPARSEC_MODEL_CACHE=... python bench/act_rotated_plan.py --skips 0.4 0.5 --out act_rotated_plan.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

import sparsec  # noqa: E402

BLOCK = r"re:model\.layers\.\d+\..*"
GATE_UP = r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"
PLANS = {
    "act": lambda s: {BLOCK: f"act:{s}"},
    "actrot gate/up": lambda s: {GATE_UP: f"actrot:{s}", BLOCK: f"act:{s}"},
    "actrot all": lambda s: {BLOCK: f"actrot:{s}"},
}


@contextlib.contextmanager
def counting(counts):
    """Count, while inside, the inputs act and actrot layers multiply on this machine (the masked
    product both run where there is no Triton, on the rotated inputs for actrot) and how many of
    them are under the threshold: counts[0] skipped of counts[1]."""
    from sparsec.codegen import act, actrot

    original = act.act_masked_gemm

    def counted(z, weight_t, threshold, bias):
        counts[0] += int((z.abs().float() < threshold.float()).sum())
        counts[1] += z.numel()
        return original(z, weight_t, threshold, bias)

    act.act_masked_gemm = actrot.act_masked_gemm = counted
    try:
        yield
    finally:
        act.act_masked_gemm = actrot.act_masked_gemm = original


def main(argv=None) -> int:
    import smollm2

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skips", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--tokens", default="4x128", help="BATCHxLENGTH of each call")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--recovery", default="none", choices=["none", "sequential", "full"])
    parser.add_argument("--fingerprint", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = smollm2.load_model(torch.float32)
    batch, length = (int(v) for v in args.tokens.split("x"))
    calib_text, held_text = smollm2.split(smollm2.load_text())
    calib = [(ids,) for ids in smollm2.token_batches(tokenizer, calib_text, batch, length)[: args.calib_batches]]
    held = [(ids,) for ids in smollm2.token_batches(tokenizer, held_text, batch, length)[:2]]
    with torch.no_grad():
        dense_logits = [model(ids).logits for (ids,) in held]

    result = {"model": "SmolLM2-135M-Instruct", "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "calibration": f"{len(calib)} x {args.tokens}",
              "heldout": f"{len(held)} x {args.tokens}", "recovery": args.recovery, "rows": []}
    print(f"{'skip':>5} {'plan':<16} {'ppl':>7} {'KL':>7} {'top-1':>7} {'skip cal':>8} {'held-out':>8} {'pred.':>6} {'s':>5}")
    for skip in args.skips:
        for name in args.plans:
            torch._dynamo.reset()
            start = time.perf_counter()
            layers = {**PLANS[name](skip), "_default": "dense"}
            out = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=args.fingerprint,
                                   plan={"layers": layers}, recovery=args.recovery, error_budget=100.0,
                                   metric="kl", output="logits")
            seconds = time.perf_counter() - start
            figures, counts = [], [0, 0]
            with torch.no_grad(), counting(counts):
                for (ids,), ref in zip(held, dense_logits):
                    figures.append(smollm2.next_token_figures(out.module(ids).logits, ref, ids))
            judged = {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}
            report = out.report.to_dict()
            chosen = [l for l in report["layers"] if l["format"] != "dense"]
            skipped = [l["calibrated"]["skipped_on_calibration"] for l in chosen
                       if "skipped_on_calibration" in l.get("calibrated", {})]
            row = {"skip": skip, "plan": name, **judged, "layers": len(chosen),
                   "formats": sorted({l["format"] for l in chosen}),
                   "skipped_mean": sum(skipped) / max(len(skipped), 1),
                   "skipped_heldout": counts[0] / max(counts[1], 1),
                   "skipped_min": min(skipped, default=None), "skipped_max": max(skipped, default=None),
                   "predicted_speedup": report["end_to_end"].get("predicted_speedup"), "seconds": seconds}
            result["rows"].append(row)
            print(f"{skip:>5} {name:<16} {row['perplexity']:>7.2f} {row['kl']:>7.3f} {100 * row['top1_agreement']:>6.1f}% "
                  f"{100 * row['skipped_mean']:>7.1f}% {100 * row['skipped_heldout']:>7.1f}% {row['predicted_speedup'] or 0:>6.2f} "
                  f"{seconds:>5.0f}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
