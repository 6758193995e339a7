"""The rewrite report: what sparsec did to each layer and why, as data, table, page and diff.

``Report`` is the validated ``sparsec.report/1`` data (DESIGN.md, "Report"); ``render_table``
draws it for a terminal, ``render_html`` as one self-contained page, and ``diff`` says what
changed between two runs. All of them accept a ``Report``, a report dict or a path to a
``.json`` report.
"""

from sparsec.errors import ReportError
from sparsec.report.diff import ReportDiff, diff, render_diff
from sparsec.report.html import render_html
from sparsec.report.model import Report, as_report
from sparsec.report.terminal import render_table
from sparsec.report.validate import SCHEMA_ID, report_schema, schema_errors

__all__ = [
    "Report",
    "ReportError",
    "ReportDiff",
    "SCHEMA_ID",
    "as_report",
    "diff",
    "render_diff",
    "render_html",
    "render_table",
    "report_schema",
    "schema_errors",
]
