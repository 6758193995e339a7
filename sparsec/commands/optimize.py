"""``sparsec optimize model.onnx -o out.onnx``: rewrite an ONNX model's linear layers, verified and timed."""

from __future__ import annotations

import argparse
import contextlib
import sys

from sparsec.commands import console


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "optimize", help="rewrite an ONNX model's MatMul/Gemm layers into faster formats within an error budget",
        description="Plan each MatMul/Gemm with a constant weight against onnxruntime's measured costs, rewrite "
                    "it (low-rank and Monarch as standard ONNX subgraphs, 2:4 and block as pruned weights), check "
                    "the result with onnx.checker and onnxruntime, time both models and write a report.")
    parser.add_argument("model", help="input .onnx file (opset 13 or newer, an older one converted on reading; "
                        "external data next to it)")
    parser.add_argument("-o", dest="output", required=True, metavar="OUT.onnx",
                        help="output .onnx file (written atomically)")
    parser.add_argument("--fingerprint", default="auto",
                        help="shipped name, path to a JSON, or 'auto' (default: onnxruntime's fingerprint for the "
                             "provider that runs the model, e.g. ort-cpu)")
    parser.add_argument("--error-budget", type=_budget, default=0.01,
                        help="the most --metric may reach against the original, on calibration data and on --heldout "
                             "(default 0.01: 1%% relative L2 error of the outputs)")
    parser.add_argument("--metric", default="rel_l2", choices=["rel_l2", "cosine", "kl", "top1"],
                        help="what the budget bounds: rel_l2 (raw outputs), cosine (1 - mean cosine similarity "
                             "along the last axis: embeddings), kl (mean KL divergence of the softmax over the last "
                             "axis, in nats: logits), top1 (fraction of positions whose argmax changes)")
    parser.add_argument("--output", "--metric-output", dest="metric_output", default=None, metavar="NAME",
                        help="the graph output the metric reads, by name or index (default: the first float "
                             "output; for rel_l2 the worst of all); the file written is -o")
    parser.add_argument("--recovery", default="full", choices=["none", "sequential", "full"],
                        help="after planning, refit the chosen rewrites to the inputs they receive once earlier "
                             "layers run theirs: sequential; full (default): and let a later stage of a block make "
                             "up for the rewritten stage feeding it; none: one-shot fits (docs/accuracy.md)")
    parser.add_argument("--calibration", default=None,
                        help=".npz with one array per graph input, named like it, first axis = samples "
                             "(default: inputs generated from the declared shapes, with a warning)")
    parser.add_argument("--dims", type=_dims, default=None, metavar="NAME=SIZE[,NAME=SIZE...]",
                        help="without --calibration: the size of each named dynamic dimension of the inputs "
                             "sparsec makes up (e.g. batch=1,sequence=128); they are also the token counts it "
                             "plans for")
    parser.add_argument("--heldout", default=None, help=".npz like --calibration; never fitted to, but the error budget must hold on it too")
    parser.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                        help="allowed formats: 2:4 block lowrank monarch (space or comma separated; default all); "
                             "one named with its parameters (lowrank:64, block:64:0.25) is then its family's only "
                             "candidate")
    parser.add_argument("--plan", default=None, help="plan JSON forcing formats per layer (sparsec.plan/1)")
    parser.add_argument("--report", default=None,
                        help="report to write: .json, or .html (the JSON is written beside it too)")
    parser.add_argument("--measure", action="store_true",
                        help="also time each rewritten layer against its dense MatMul (the whole models are always timed)")
    parser.add_argument("--external-data", action="store_true",
                        help="write the weights to OUTPUT.data (done anyway above 1.8 GB)")
    parser.add_argument("--provider", default="auto", metavar="{auto,cpu,cuda}",
                        help="onnxruntime execution provider, also by onnxruntime's name (CUDAExecutionProvider); "
                             "default: CUDA when it loads, else CPU")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line (no table, no progress)")
    parser.add_argument("--strict", action="store_true",
                        help="stop with the error when a planning step fails, instead of writing the model unchanged")
    parser.set_defaults(func=run)


def _budget(text: str) -> float:
    """A number in [0, 1): the largest output error allowed, e.g. 0.01 for 1%."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give the error budget as e.g. 0.01 for 1%") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1); give the error budget as e.g. 0.01 for 1%")
    return value


def _dims(text: str) -> dict[str, int]:
    """NAME=SIZE pairs, comma separated: the sizes of named dynamic input dimensions."""
    out = {}
    for item in (t.strip() for t in text.split(",")):
        name, eq, size = item.partition("=")
        if not eq or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=SIZE with a positive whole SIZE; give e.g. "
                                             "--dims batch=1,sequence=128")
        out[name.strip()] = int(size)
    return out


def _output_ref(text: str | None) -> str | int | None:
    """An output's index when the text is a number, else its name."""
    return int(text) if text is not None and text.isdigit() else text


def run(args: argparse.Namespace) -> int:
    from sparsec.logs import summary_line
    from sparsec.onnx_entry import optimize_onnx

    formats = None
    if args.formats:
        formats = [f for item in args.formats for f in item.split(",") if f]
    from rich.console import Console

    from sparsec import progress

    with contextlib.nullcontext() if args.quiet else progress.shown(Console(stderr=True)):
        result = optimize_onnx(
            args.model, args.output, fingerprint=args.fingerprint, error_budget=args.error_budget,
            calibration=args.calibration, heldout=args.heldout, formats=formats, plan=args.plan, report=args.report,
            measure=args.measure, external_data=True if args.external_data else None, provider=args.provider,
            strict=args.strict, metric=args.metric, metric_output=_output_ref(args.metric_output),
            recovery=args.recovery, dims=args.dims)
    if not args.quiet:
        from sparsec.report import render_table

        console().print(render_table(result.report))
    print(summary_line(result.report))
    for path in [*result.written, *result.report_paths]:
        print(f"wrote {path}")
    sys.stdout.flush()
    return 0
