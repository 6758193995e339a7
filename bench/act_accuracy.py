"""Activation sparsity on SmolLM2-135M-Instruct (real weights): held-out quality against S.

For each skip fraction S, every linear layer of the transformer blocks (q, k, v, o, gate, up,
down; the LM head stays dense) is forced to ``act:S`` through ``sparsec.optimize`` with
calibration text, and the rewritten model is run on held-out text: perplexity, mean KL divergence
of the next-token distribution against the dense model (nats), top-1 agreement, and the mean over layers of the fraction of calibration inputs under each
layer's threshold.

    SPARSEC_MODEL_CACHE=... python bench/act_accuracy.py --skips 0.25,0.4,0.5 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "samples"))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

import smollm2  # noqa: E402

import sparsec  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skips", default="0.25,0.4,0.5,0.6")
    ap.add_argument("--calibration", default="8x128", help="batches x tokens of calibration text")
    ap.add_argument("--heldout", default="4x128", help="batches x tokens of held-out text")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    nb, length = (int(v) for v in args.calibration.split("x"))
    hb, hlen = (int(v) for v in args.heldout.split("x"))
    model, tok = smollm2.load_model(torch.float32)
    ctext, htext = smollm2.split(smollm2.load_text())
    calib = [(ids,) for ids in smollm2.token_batches(tok, ctext, 1, length)[:nb]]
    held = smollm2.token_batches(tok, htext, 1, hlen)[:hb]
    with torch.no_grad():
        dense = [model(ids).logits for ids in held]
    base = [smollm2.next_token_figures(d, d, ids) for d, ids in zip(dense, held)]
    rows = [{"skip": 0.0, **_mean(base), "skipped_heldout": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for skip in (float(s) for s in args.skips.split(",")):
        t0 = time.perf_counter()
        result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", error_budget=1e9,
                                  metric="kl", output="logits",
                                  plan={"layers": {"re:.*layers.*": f"act:{skip:g}", "_default": "dense"}})
        figs = []
        with torch.no_grad():
            for d, ids in zip(dense, held):
                figs.append(smollm2.next_token_figures(result.module(ids).logits, d, ids))
        rep = result.report.to_dict()
        rewritten = [l for l in rep["layers"] if l["format"].startswith("act")]
        skipped = [l["calibrated"]["skipped_on_calibration"] for l in rewritten if l.get("calibrated")]
        row = {"skip": skip, **_mean(figs), "layers": len(rewritten),
               "skipped_calibration_mean": sum(skipped) / max(len(skipped), 1),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, float32)", "device": "cpu",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "calibration": args.calibration, "heldout": args.heldout}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "act_accuracy.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{'S':>5} {'ppl':>8} {'ppl/dense':>9} {'KL':>7} {'top-1':>6}")
    for r in rows:
        print(f"{r['skip']:>5g} {r['perplexity']:>8.2f} {r['perplexity'] / rows[0]['perplexity']:>9.3f} "
              f"{r['kl']:>7.4f} {r['top1_agreement']:>6.1%}")


def _mean(figs):
    return {k: sum(f[k] for f in figs) / len(figs) for k in figs[0]}


if __name__ == "__main__":
    main()
