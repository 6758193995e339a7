"""act against actrot through sparsec itself, on real trained models (SmolLM2-135M-Instruct, MiniLM).

bench/act_rotation.py measured what rotating a layer's inputs before thresholding could buy, by
hand. This runs the formats sparsec ships, planned by ``sparsec.optimize`` with a forced plan per
row and judged on held-out text against the dense model (SmolLM2: perplexity, KL of the next-token
distribution, top-1 agreement; MiniLM: mean and lowest cosine of the sentence embeddings):

* ``act``: every linear layer of the 30 blocks at ``act:S``;
* ``actrot wide``: the layers wide next to their input at ``actrot:S`` (SmolLM2's gate and up, whose
  one product with Q pays at run time where S N > K; MiniLM's intermediate layers), every other
  block layer at ``act:S``;
* ``actrot all``: every block layer at ``actrot:S`` (the accuracy bound; its products with Q cost
  more than they save on q/k/v, o and down).

Each row reports the mean fraction of calibration inputs skipped per layer (for actrot, of the rows
held apart: what the thresholds were set to), the fraction of the held-out text's inputs the
rewritten layers skip (counted on their inputs as they run), and the planner's predicted speed-up
on the fingerprint named.

    SPARSEC_MODEL_CACHE=... python bench/act_rotated_plan.py --skips 0.4 0.5 --out act_rotated_plan.json
    python bench/act_rotated_plan.py --model minilm --calib-batches 4 --out act_rotated_plan_minilm.json
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

def plans(block: str, wide: str) -> dict:
    """act everywhere; actrot on the layers wide next to their input (``wide``), act elsewhere;
    actrot everywhere. ``block`` and ``wide`` are plan patterns."""
    return {
        "act": lambda s: {block: f"act:{s}"},
        "actrot wide": lambda s: {wide: f"actrot:{s}", block: f"act:{s}"},
        "actrot all": lambda s: {block: f"actrot:{s}"},
    }


def smollm2_case(args):
    """SmolLM2's 30 blocks; 'wide': gate and up (2 x 1536 outputs of 576 inputs)."""
    import smollm2

    model, tokenizer = smollm2.load_model(torch.float32)
    batch, length = (int(v) for v in args.tokens.split("x"))
    calib_text, held_text = smollm2.split(smollm2.load_text())
    calib = [(ids,) for ids in smollm2.token_batches(tokenizer, calib_text, batch, length)[: args.calib_batches]]
    held = [(ids,) for ids in smollm2.token_batches(tokenizer, held_text, batch, length)[:2]]
    with torch.no_grad():
        dense = [model(ids).logits for (ids,) in held]

    def judge(module) -> dict:
        with torch.no_grad():
            figures = [smollm2.next_token_figures(module(ids).logits, ref, ids) for (ids,), ref in zip(held, dense)]
        return {k: sum(f[k] for f in figures) / len(figures) for k in figures[0]}

    return ("SmolLM2-135M-Instruct", model, calib, held, judge, {"metric": "kl", "output": "logits", "error_budget": 100.0},
            plans(r"re:model\.layers\.\d+\..*", r"re:model\.layers\.\d+\.mlp\.(gate|up)_proj"))


def minilm_case(args):
    """all-MiniLM-L6-v2's 6 encoder blocks; 'wide': the intermediate layers (1536 outputs of 384)
    and query, key and value (3 x 384 outputs of one input of 384, one product with Q for the three)."""
    import minilm_sentences as ms

    model, tokenizer, calib, held = ms.prepare()
    calib = calib[: args.calib_batches]
    reference = ms.embed(model, held).double()

    def judge(module) -> dict:
        new = ms.embed(module, held).double()
        mean, low = ms.embedding_cosine(reference, new)
        return {"mean_cosine": mean, "min_cosine": low}

    return ("all-MiniLM-L6-v2", model, calib, held, judge, {"metric": "cosine", "error_budget": 0.99},
            plans(r"re:encoder\.encoder\.layer\.\d+\..*", r"re:encoder\.encoder\.layer\.\d+\.(intermediate\.dense|attention\.self\.(query|key|value))"))


CASES = {"smollm2": smollm2_case, "minilm": minilm_case}


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=sorted(CASES))
    parser.add_argument("--skips", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--plans", nargs="+", default=["act", "actrot wide", "actrot all"])
    parser.add_argument("--rotate", default=None, help="plan pattern of the layers 'actrot wide' rotates "
                        "(default: the model's layers wide next to their input), e.g. to find which carry the gain")
    parser.add_argument("--tokens", default="4x128", help="smollm2: BATCHxLENGTH of each call")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--recovery", default="none", choices=["none", "sequential", "full"])
    parser.add_argument("--fingerprint", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    name, model, calib, held, judge, metric, plan_of = CASES[args.model](args)
    if args.rotate:
        block = next(iter(plan_of["act"](0.5)))
        plan_of["actrot wide"] = lambda s: {args.rotate: f"actrot:{s}", block: f"act:{s}"}
    result = {"model": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rotate": args.rotate,
              "calibration_calls": len(calib), "heldout_calls": len(held), "recovery": args.recovery, "rows": []}
    for skip in args.skips:
        for plan in args.plans:
            torch._dynamo.reset()
            start = time.perf_counter()
            layers = {**plan_of[plan](skip), "_default": "dense"}
            out = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=args.fingerprint,
                                   plan={"layers": layers}, recovery=args.recovery, **metric)
            seconds = time.perf_counter() - start
            counts = [0, 0]
            with counting(counts):
                judged = judge(out.module)
            report = out.report.to_dict()
            chosen = [l for l in report["layers"] if l["format"] != "dense"]
            skipped = [l["calibrated"]["skipped_on_calibration"] for l in chosen
                       if "skipped_on_calibration" in l.get("calibrated", {})]
            row = {"skip": skip, "plan": plan, **judged, "layers": len(chosen),
                   "formats": sorted({l["format"] for l in chosen}),
                   "skipped_mean": sum(skipped) / max(len(skipped), 1),
                   "skipped_heldout": counts[0] / max(counts[1], 1),
                   "skipped_min": min(skipped, default=None), "skipped_max": max(skipped, default=None),
                   "predicted_speedup": report["end_to_end"].get("predicted_speedup"), "seconds": seconds}
            result["rows"].append(row)
            figures = " ".join(f"{k} {v:.4g}" for k, v in judged.items())
            print(f"S={skip} {plan:<12} {figures}  skipped: calibration {100 * row['skipped_mean']:.1f}%, "
                  f"held-out {100 * row['skipped_heldout']:.1f}%  ({seconds:.0f} s)", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
