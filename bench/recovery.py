"""Recovery on all-MiniLM-L6-v2 (real weights): held-out embedding quality with one format forced on
every linear layer of the encoder, with each ``recovery`` mode.

For each format and mode, ``sparsec.optimize`` plans with the calibration sentences (metric
``cosine``, a forced plan, lowered) and the rewritten model embeds the held-out sentences:
1 - mean cosine similarity to the dense embeddings (the metric), the minimum cosine, and how long
planning with recovery took. SmolLM2's counterpart is ``bench/forced_accuracy.py --recovery``.

    python bench/recovery.py --formats 2:4,lowrank:192 --modes none,full --out DIR
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

import minilm_sentences as ms  # noqa: E402

import sparsec  # noqa: E402

LAYERS = r"re:.*encoder\.layer\..*"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="2:4,block:32:0.5,lowrank:192,monarch:4")
    ap.add_argument("--modes", default="none,sequential,full")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, _, calib, held = ms.prepare()
    dense = ms.embed(model, held)
    rows = []
    for fmt in args.formats.split(","):
        for mode in args.modes.split(","):
            t0 = time.perf_counter()
            result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", metric="cosine",
                                      error_budget=0.999, recovery=mode,
                                      plan={"layers": {LAYERS: fmt, "_default": "dense"}})
            seconds = time.perf_counter() - t0
            mean, low = ms.embedding_cosine(dense, ms.embed(result.module, held))
            rep = result.report.to_dict()
            row = {"format": fmt, "recovery": mode, "heldout_cosine_error": 1.0 - mean, "min_cosine": low,
                   "calibration_error": rep["end_to_end"]["measured_error"],
                   "layers": sum(l["format"] == fmt for l in rep["layers"]),
                   "summary": rep.get("planning", {}).get("recovery"), "seconds": round(seconds, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"model": "all-MiniLM-L6-v2 (float32)", "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "calibration_batches": len(calib), "heldout_batches": len(held)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recovery_minilm.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n{'format':<16} {'recovery':<11} {'1-cos':>8} {'min cos':>8} {'s':>6}")
    for r in rows:
        print(f"{r['format']:<16} {r['recovery']:<11} {r['heldout_cosine_error']:>8.5f} {r['min_cosine']:>8.4f} {r['seconds']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
