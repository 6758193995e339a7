"""``sparsec report show | html | diff``: read a saved report as a table, a page, or a comparison."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsec.commands import console

from sparsec.errors import ReportError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="show, convert or compare rewrite reports",
        description="Read a sparsec.report/1 JSON file written by torch.compile, optimize or the CLI.")
    sub = parser.add_subparsers(dest="report_command", metavar="ACTION")
    sub.required = True

    show = sub.add_parser("show", help="print the per-layer table, totals and warnings")
    show.add_argument("report", help="report .json")
    show.add_argument("--width", type=int, default=None, help="table width in characters (default: terminal)")
    show.set_defaults(func=_show)

    html = sub.add_parser("html", help="write the self-contained HTML report")
    html.add_argument("report", help="report .json")
    html.add_argument("-o", "--output", default=None, help="page to write (default: the report's name with .html)")
    html.set_defaults(func=_html)

    diff = sub.add_parser("diff", help="what changed between two runs: plan, predicted time, fingerprint, budget")
    diff.add_argument("before", help="earlier report .json")
    diff.add_argument("after", help="later report .json")
    diff.add_argument("--all", action="store_true", help="list unchanged layers too")
    diff.add_argument("--json", action="store_true", help="print the differences as JSON")
    diff.add_argument("--exit-code", action="store_true", help="exit with status 1 when the reports differ")
    diff.add_argument("--width", type=int, default=None, help="table width in characters (default: terminal)")
    diff.set_defaults(func=_diff)


def _show(args: argparse.Namespace) -> int:
    from sparsec.report import Report, render_table

    console(args.width).print(render_table(Report.load(args.report)))
    return 0


def _html(args: argparse.Namespace) -> int:
    from sparsec.report import Report

    report = Report.load(args.report)
    output = Path(args.output) if args.output else Path(args.report).with_suffix(".html")
    if output.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"{output}: the page must be written to a .html file")
    from sparsec.paths import check_writable

    check_writable(output, ReportError, "report.html")
    report.save(output)
    print(f"wrote {output}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    from sparsec.report import Report, diff, render_diff

    result = diff(Report.load(args.before), Report.load(args.after))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        console(args.width).print(render_diff(result, show_unchanged=args.all))
    return 1 if args.exit_code and result.changed else 0

