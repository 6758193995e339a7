"""The report as a terminal table (rich): what each layer became, how fast, how wrong, and why.

Layer names and reasons come from user models, so every string is passed to rich as plain
``Text``, never as markup: a layer called ``[bold]x`` prints as written.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from sparsec.report import views as v
from sparsec.report.model import as_report


def render_table(report) -> Group:
    """A rich renderable: header, one row per layer, totals, end-to-end figures, warnings."""
    report = as_report(report)
    parts = [_header(report), _layer_table(report)]
    parts += [Text(f"expert bank {v.bank_line(b)}") for b in v.expert_banks(report)]
    parts += [Text(f"not considered: {x['name']}" + (f" ({x['op']})" if x.get("op") else "") + f": {x['reason']}",
                   style="dim") for x in v.skipped(report)]
    parts.append(_totals(report))
    parts += [Text(f"warning: {w}", style="bold yellow") for w in v.all_warnings(report)]
    return Group(*parts)


def _header(report) -> Text:
    text = Text()
    text.append("sparsec report", style="bold")
    text.append(f"  entry {report['entry']}  ·  fingerprint {v.fingerprint_label(report)}")
    if report.get("device"):
        text.append(f"  ·  ran on {report['device']}")
    text.append(f"  ·  error budget {v.fmt_error(report['error_budget'])}")
    return text


def _layer_table(report) -> Table:
    multi_graph = len({layer.get("graph", 0) for layer in report.layers}) > 1
    table = Table(show_lines=False, header_style="bold", expand=False, pad_edge=False)
    if multi_graph:
        table.add_column("graph", justify="right")
    table.add_column("layer", overflow="fold")
    table.add_column("shape N×K", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right")
    table.add_column("format", no_wrap=True)
    table.add_column("declared\nsparsity", justify="right")
    table.add_column("predicted\nspeedup", justify="right")
    table.add_column("measured\nspeedup", justify="right")
    table.add_column("error\npred / meas", justify="right", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=1, min_width=24)
    for layer in report.layers:
        row = [
            Text(layer["name"]),
            Text(v.fmt_shape(layer["shape"])),
            Text(v.fmt_tokens(layer["tokens"])),
            Text(layer["format"], style="green" if v.is_rewritten(layer) else "dim"),
            Text(v.fmt_fraction(layer["declared_sparsity"])),
            _speedup(layer["predicted_speedup"]),
            _speedup(layer["measured_speedup"]),
            Text(f"{v.fmt_error(layer['predicted_error'])} / {v.fmt_error(layer['measured_error'])}"),
            Text(layer["reason"]),
        ]
        if multi_graph:
            row.insert(0, Text(str(layer.get("graph", 0))))
        table.add_row(*row)
    if not report.layers:
        table.caption = "no linear layers were found"
    return table


def _totals(report) -> Text:
    t, e2e = report.totals, report.end_to_end
    text = Text()
    text.append("totals: ", style="bold")
    text.append(f"{t['rewritten']} of {t['layers']} layers rewritten; linear layers "
                f"{v.fmt_us(t['predicted_us_dense'])} dense -> {v.fmt_us(t['predicted_us'])} predicted "
                f"({v.fmt_speedup(t['predicted_speedup'])}), measured {v.fmt_speedup(t['measured_speedup'])}\n")
    text.append("end to end: ", style="bold")
    rest = e2e.get("predicted_us_rest")
    source = e2e.get("predicted_us_rest_source") or ""
    how = ("measured" if source.startswith("measured") else
           "from the original model's measured time" if source else "predicted")
    kinds = e2e.get("predicted_us_rest_by_kind") or {}
    by_kind = (": " + ", ".join(f"{kind} {v.fmt_us(us)}" for kind, us in kinds.items())) if len(kinds) > 1 else ""
    rest_text = f" (rest of graph {v.fmt_us(rest)} {how}{by_kind}{_fused_note(e2e)})" if rest is not None \
        else " (rest of graph not priced)"
    text.append(f"predicted {v.fmt_speedup(e2e['predicted_speedup'])}{rest_text}, measured "
                f"{v.fmt_speedup(e2e['measured_speedup'])}; error {v.fmt_error(e2e['measured_error'])} "
                f"on calibration, {v.fmt_error(e2e['heldout_error'])} held out, of budget "
                f"{v.fmt_error(report['error_budget'])}")
    planning = v.planning_line(report)
    if planning:
        text.append("\nplanning: ", style="bold")
        text.append(planning)
    recovery = v.recovery_line(report)
    if recovery:
        text.append("\nrecovery: ", style="bold")
        text.append(recovery)
    return text


def _fused_note(e2e) -> str:
    fused = e2e.get("predicted_us_fused")
    return f", {v.fmt_us(fused)} of it in the layers' epilogues" if fused else ""


def _speedup(x) -> Text:
    if x is None:
        return Text(v.DASH, style="dim")
    return Text(v.fmt_speedup(x), style="green" if x > 1.0 else "red" if x < 1.0 else "")
