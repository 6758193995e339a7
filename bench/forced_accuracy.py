"""Held-out quality of SmolLM2-135M-Instruct (real weights) with one format forced on a set of layers.

For each format, the chosen layers (``--layers mlp``: the gate, up and down projections of the 30
blocks; ``all``: every linear layer of the blocks; the LM head stays dense) are forced to it through
``sparsec.optimize`` with calibration text, and the rewritten model runs on held-out text:
perplexity, mean KL divergence of the next-token distribution against the dense model (nats) and
top-1 agreement. Formats that report what they calibrated give its mean over layers: a composite's
sparse part alone (against the layers' mean error), act's skipped fraction of calibration inputs.

    SPARSEC_MODEL_CACHE=... python bench/forced_accuracy.py --formats 2:4,2:4+lowrank:32 --out DIR
    SPARSEC_MODEL_CACHE=... python bench/forced_accuracy.py --layers all --formats act:0.25,act:0.4 --out DIR
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

LAYERS = {"mlp": r"re:.*layers\.\d+\.mlp\..*", "all": r"re:.*layers\..*"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="2:4,2:4+lowrank:16,2:4+lowrank:32,2:4+lowrank:64")
    ap.add_argument("--layers", choices=sorted(LAYERS), default="mlp")
    ap.add_argument("--calibration", default="8x128", help="batches x tokens of calibration text")
    ap.add_argument("--heldout", default="4x128", help="batches x tokens of held-out text")
    ap.add_argument("--recovery", default="none")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fingerprint", default="cpu")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    nb, length = (int(v) for v in args.calibration.split("x"))
    hb, hlen = (int(v) for v in args.heldout.split("x"))
    model, tok = smollm2.load_model(torch.float32)
    model = model.to(args.device)
    ctext, htext = smollm2.split(smollm2.load_text())
    calib = [(ids.to(args.device),) for ids in smollm2.token_batches(tok, ctext, 1, length)[:nb]]
    held = [ids.to(args.device) for ids in smollm2.token_batches(tok, htext, 1, hlen)[:hb]]
    with torch.no_grad():
        dense = [model(ids).logits for ids in held]
    rows = [{"format": "dense", **_mean([smollm2.next_token_figures(d.cpu(), d.cpu(), ids.cpu())
                                         for d, ids in zip(dense, held)])}]
    print(json.dumps(rows[0]), flush=True)
    for fmt in args.formats.split(","):
        t0 = time.perf_counter()
        result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=args.fingerprint,
                                  error_budget=1e9, metric="kl", output="logits", recovery=args.recovery,
                                  plan={"layers": {LAYERS[args.layers]: fmt, "_default": "dense"}})
        seconds = time.perf_counter() - t0
        figs = []
        with torch.no_grad():
            for d, ids in zip(dense, held):
                figs.append(smollm2.next_token_figures(result.module(ids).logits.cpu(), d.cpu(), ids.cpu()))
        rep = result.report.to_dict()
        rewritten = [l for l in rep["layers"] if l["format"] == fmt]
        row = {"format": fmt, **_mean(figs), "layers": len(rewritten),
               "layer_error_mean": sum(l["predicted_error"] for l in rewritten) / max(len(rewritten), 1),
               "sparse_alone_error_mean": _calibrated_mean(rewritten, "sparse_alone_error"),
               "skipped_calibration_mean": _calibrated_mean(rewritten, "skipped_on_calibration"),
               "recovery": rep.get("planning", {}).get("recovery"),
               "warnings": [w for w in rep.get("warnings", []) if "recover" in w],
               "seconds": round(seconds, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, float32)", "device": args.device,
            "torch": torch.__version__, "date": datetime.date.today().isoformat(), "layers": args.layers,
            "calibration": args.calibration, "heldout": args.heldout, "recovery": args.recovery}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"forced_accuracy_{args.layers}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{'format':<22} {'ppl':>8} {'KL':>7} {'top-1':>6} {'layer err':>9} {'s':>6}")
    for r in rows:
        err = f"{r['layer_error_mean']:.3f}" if "layer_error_mean" in r else ""
        print(f"{r['format']:<22} {r['perplexity']:>8.2f} {r['kl']:>7.4f} {r['top1_agreement']:>6.1%} {err:>9} "
              f"{r.get('seconds', ''):>6}")


def _calibrated_mean(layers, key):
    """The mean over layers of what a format calibrated (None where no layer reports it)."""
    values = [l["calibrated"][key] for l in layers if (l.get("calibrated") or {}).get(key) is not None]
    return sum(values) / len(values) if values else None


def _mean(figs):
    return {k: sum(f[k] for f in figs) / len(figs) for k in figs[0]}


if __name__ == "__main__":
    main()
