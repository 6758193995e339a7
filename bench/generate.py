"""A language model planned for decoding, then generating through its rewritten graph.

SmolLM2-135M-Instruct (``samples/smollm2.py``) is planned with ``sparsec.optimize`` at one token a
step (the example is one token; the calibration is whole rows of the shipped text), and then the
model's own ``generate`` runs on ``result.module``: the prompt, then one-token steps, each through
the rewritten graph. Held-out prompts are continued greedily by the dense model and by the
rewritten one; a row per budget gives the plan (layers per format, predicted speed-up at one
token on the fingerprint), the held-out metric of the plan, and what a user of the model sees:
the share of generated tokens that match the dense model's, position by position, and how many
tokens each continuation runs before its first difference.

    python bench/generate.py --fingerprint h200 --budgets 0.05 0.1 --out generate-smollm2.json
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


def agreement(ours: torch.Tensor, dense: torch.Tensor, prompt_len: int) -> tuple[float, list[int]]:
    """(share of new tokens equal to the dense model's at the same position, tokens before the first
    difference in each row)."""
    a, b = ours[:, prompt_len:], dense[:, prompt_len:]
    same = a == b
    first = [int(row.logical_not().nonzero()[0]) if not bool(row.all()) else row.numel() for row in same]
    return float(same.double().mean()), first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fingerprint", default="h200")
    ap.add_argument("--metric", default="kl")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1])
    ap.add_argument("--formats", nargs="*", default=None, help="allowed formats (default: all)")
    ap.add_argument("--recovery", default="full")
    ap.add_argument("--mode", default="reduce-overhead",
                    help="priced as run (reduce-overhead: replayed under CUDA graphs, as decoding is served)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--calibration", default="4x128", help="BATCHxLENGTH of each calibration call")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts continued")
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="generate-smollm2.json")
    args = ap.parse_args(argv)

    import smollm2

    import sparsec

    dtype = getattr(torch, args.dtype)
    try:
        model, tokenizer = smollm2.load_model(dtype)
    except smollm2.MissingModel as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    batch, length = (int(v) for v in args.calibration.split("x"))
    calib_text, held_text = smollm2.split(smollm2.load_text())
    calibration = [{"input_ids": ids} for ids in
                   smollm2.token_batches(tokenizer, calib_text, batch, length)[: args.calib_batches]]
    heldout = [{"input_ids": ids} for ids in smollm2.token_batches(tokenizer, held_text, batch, length)[:2]]
    prompts = smollm2.token_batches(tokenizer, held_text, args.prompts, args.prompt_len)[0]
    with torch.no_grad():
        dense = model.generate(prompts, max_new_tokens=args.new_tokens, do_sample=False,
                               attention_mask=torch.ones_like(prompts))
    rows = []
    for budget in args.budgets:
        t0 = time.perf_counter()
        result = sparsec.optimize(model, {"input_ids": prompts[:1, :1]}, fingerprint=args.fingerprint,
                                  metric=args.metric, error_budget=budget, calibration=calibration,
                                  heldout=heldout, recovery=args.recovery, mode=args.mode,
                                  **({"formats": args.formats} if args.formats is not None else {}))
        planned_s = time.perf_counter() - t0
        with torch.no_grad():
            t0 = time.perf_counter()
            ours = result.module.generate(prompts, max_new_tokens=args.new_tokens, do_sample=False,
                                          attention_mask=torch.ones_like(prompts))
            generate_s = time.perf_counter() - t0
        share, first = agreement(ours, dense, prompts.shape[1])
        report = result.report.to_dict()
        e2e = report["end_to_end"]
        rows.append({
            "budget": budget, "metric": args.metric,
            "formats": dict(Counter(layer["format"] for layer in report["layers"])),
            "predicted_speedup": e2e.get("predicted_speedup"),
            "calibration_error": e2e.get("measured_error"), "heldout_error": e2e.get("heldout_error"),
            "token_agreement": share, "tokens_before_first_difference": first,
            "median_tokens_before_first_difference": statistics.median(first),
            "recompiles": report.get("recompiles", []), "planning_s": planned_s, "generate_s": generate_s,
        })
        r = rows[-1]
        print(f"budget {budget:g}: {sum(v for k, v in r['formats'].items() if k != 'dense')} of "
              f"{sum(r['formats'].values())} layers rewritten {r['formats']}, predicted "
              f"{r['predicted_speedup'] or float('nan'):.2f}x at one token on {args.fingerprint}; held-out "
              f"{args.metric} {r['heldout_error'] or float('nan'):.4f}; greedy tokens equal to dense's "
              f"{100 * share:.1f}%, first difference after {r['median_tokens_before_first_difference']:g} "
              f"tokens (median of {len(first)}); planned in {planned_s:.0f} s", flush=True)
    out = {"model": "SmolLM2-135M-Instruct", "fingerprint": args.fingerprint, "mode": args.mode, "dtype": args.dtype,
           "device": "cpu", "torch": torch.__version__, "sparsec": sparsec.__version__,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "calibration": f"{args.calib_batches} x {args.calibration}", "prompts": list(prompts.shape),
           "new_tokens": args.new_tokens, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
