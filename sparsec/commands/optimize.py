"""``sparsec optimize model.onnx -o out.onnx``: rewrite an ONNX model's linear layers, verified and timed."""

from __future__ import annotations

import argparse
import sys

from sparsec.commands import console


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "optimize", help="rewrite an ONNX model's MatMul/Gemm layers into faster formats within an error budget",
        description="Plan each MatMul/Gemm with a constant weight against onnxruntime's measured costs, rewrite "
                    "it (low-rank and Monarch as standard ONNX subgraphs, 2:4 and block as pruned weights), check "
                    "the result with onnx.checker and onnxruntime, time both models and write a report.")
    parser.add_argument("model", help="input .onnx file (opset >= 13; external data next to it)")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    parser.add_argument("--fingerprint", default="auto",
                        help="shipped name, path to a JSON, or 'auto' (default: onnxruntime's fingerprint for the "
                             "provider that runs the model, e.g. ort-cpu)")
    parser.add_argument("--error-budget", type=float, default=0.01,
                        help="max relative L2 error of the outputs vs the original on calibration data (default 0.01)")
    parser.add_argument("--calibration", default=None,
                        help=".npz with one array per graph input, named like it, first axis = samples "
                             "(default: inputs generated from the declared shapes, with a warning)")
    parser.add_argument("--heldout", default=None, help=".npz like --calibration; never fitted to, but the error budget must hold on it too")
    parser.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                        help="allowed formats: 2:4 block lowrank monarch (space or comma separated; default all)")
    parser.add_argument("--plan", default=None, help="plan JSON forcing formats per layer (sparsec.plan/1)")
    parser.add_argument("--report", default=None,
                        help="report to write: .json, or .html (the JSON is written beside it too)")
    parser.add_argument("--measure", action="store_true",
                        help="also time each rewritten layer against its dense MatMul (the whole models are always timed)")
    parser.add_argument("--external-data", action="store_true",
                        help="write the weights to OUTPUT.data (done anyway above 1.8 GB)")
    parser.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"],
                        help="onnxruntime execution provider (default: CUDA when it loads, else CPU)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsec.logs import summary_line
    from sparsec.onnx_entry import optimize_onnx

    formats = None
    if args.formats:
        formats = [f for item in args.formats for f in item.split(",") if f]
    result = optimize_onnx(
        args.model, args.output, fingerprint=args.fingerprint, error_budget=args.error_budget,
        calibration=args.calibration, heldout=args.heldout, formats=formats, plan=args.plan, report=args.report,
        measure=args.measure, external_data=True if args.external_data else None, provider=args.provider)
    if not args.quiet:
        from sparsec.report import render_table

        console().print(render_table(result.report))
    print(summary_line(result.report))
    for path in [*result.written, *result.report_paths]:
        print(f"wrote {path}")
    sys.stdout.flush()
    return 0
