"""The report as one self-contained HTML page: summary, chart, error budget, sortable layer table.

Everything is inline (CSS, JS, SVG) and a Content-Security-Policy forbids the page any network
access, so the file can be mailed or attached to a ticket as is. Layer names, reasons and
formats come from user models and are escaped everywhere. The page's script only sorts the table
(``#sort=<column>:asc|desc`` in the address does the same), expands candidate rows
(``#expand=all``), and writes what it rendered, plus any script error, into hidden elements
(``#render-status``, ``#js-errors``) that a headless browser can read back.
"""

from __future__ import annotations

from functools import lru_cache
from html import escape
from importlib import resources

from sparsec.report import chart
from sparsec.report import views as v
from sparsec.report.model import Report, as_report

_CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "img-src data:; base-uri 'none'; form-action 'none'")

# (id, header, title) of the layer table's columns; ids are what #sort= names.
COLUMNS = (
    ("index", "#", "order in the model"),
    ("graph", "graph", "compiled subgraph (graph breaks)"),
    ("name", "layer", "module name or ONNX node"),
    ("shape", "N×K", "weight shape: outputs × inputs"),
    ("tokens", "tokens", "rows M per call, from calibration"),
    ("format", "format", "chosen format"),
    ("declared", "declared", "declared sparsity: share of the dense weight not stored"),
    ("dense_us", "dense", "predicted time of the dense layer"),
    ("predicted_us", "predicted", "predicted time in the chosen format"),
    ("predicted_speedup", "pred ×", "predicted speedup over dense"),
    ("measured_speedup", "meas ×", "measured speedup over dense (– if not timed)"),
    ("predicted_error", "pred err", "predicted relative L2 error of the layer's output"),
    ("measured_error", "meas err", "measured relative L2 error of the layer's output"),
    ("reason", "reason", "why this format"),
    ("candidates", "cands", "formats considered; click to show them"),
)


def render_html(report) -> str:
    """The whole page as a string."""
    report = as_report(report)
    fp = report.fingerprint
    title = f"sparsec report — {fp['name']} — {report.totals['rewritten']} of {report.totals['layers']} layers rewritten"
    body = "".join([
        '<div id="js-errors" hidden></div>',
        _header(report),
        _warnings(report),
        _summary(report),
        '<div class="row">',
        _chart_section(report),
        _budget_section(report),
        "</div>",
        _layer_section(report),
        _experts_section(report),
        _skipped_section(report),
        f'<footer>written {escape(report["created"])} by sparsec {escape(report["sparsec_version"])}'
        f' · schema {escape(report["schema"])}</footer>',
        '<div id="render-status" hidden></div>',
    ])
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_asset('report.css')}</style></head>"
        f"<body>{body}<script>{_asset('report.js')}</script></body></html>\n"
    )


@lru_cache(maxsize=None)
def _asset(name: str) -> str:
    text = resources.files("sparsec.report").joinpath(name).read_text(encoding="utf-8")
    if "</" in text and name.endswith(".js"):
        raise ValueError(f"{name} must not contain '</' (it would end the inline script)")
    return text


def _header(report) -> str:
    bits = [f"entry <b>{escape(report['entry'])}</b>",
            f"fingerprint <b>{escape(v.fingerprint_label(report))}</b>"]
    if report.get("device"):
        bits.append(f"ran on <b>{escape(report['device'])}</b>")
    bits.append(f"error budget <b>{escape(v.fmt_error(report['error_budget']))}</b>")
    return f'<header><h1>sparsec rewrite report</h1><p class="meta">{" · ".join(bits)}</p></header>'


def _warnings(report) -> str:
    items = v.all_warnings(report)
    if not items:
        return ""
    lis = "".join(f"<li>{escape(w)}</li>" for w in items)
    return f'<section id="warnings" class="warnings"><h2>Warnings</h2><ul>{lis}</ul></section>'


def _card(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{escape(note)}</div>' if note else ""
    return f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{escape(value)}</div>{note_html}</div>'


def _rest_note(e2e) -> str:
    rest, fused = e2e.get("predicted_us_rest"), e2e.get("predicted_us_fused")
    if rest is None:
        return "; rest of graph not priced"
    return f"; rest of graph {v.fmt_us(rest)}" + (f", {v.fmt_us(fused)} of it in the layers' epilogues" if fused else "")


def _summary(report) -> str:
    t, e2e, budget = report.totals, report.end_to_end, report["error_budget"]
    spend = v.budget_spend(report)
    used = spend.fraction(e2e["measured_error"])
    cards = [
        _card("layers rewritten", f"{t['rewritten']} of {t['layers']}",
              f"linear time {v.fmt_us(t['predicted_us_dense'])} → {v.fmt_us(t['predicted_us'])}"),
        _card("predicted speedup", v.fmt_speedup(e2e["predicted_speedup"]),
              f"linear layers {v.fmt_speedup(t['predicted_speedup'])}" + _rest_note(e2e)),
        _card("measured speedup", v.fmt_speedup(e2e["measured_speedup"]),
              f"linear layers {v.fmt_speedup(t['measured_speedup'])}" if t["measured_speedup"] else "not timed"),
        _card("output error", v.fmt_error(e2e["measured_error"]),
              f"{v.fmt_fraction(used)} of budget {v.fmt_error(budget)}" if used is not None
              else f"budget {v.fmt_error(budget)}"),
        _card("held-out error", v.fmt_error(e2e["heldout_error"]),
              "no held-out data given" if e2e["heldout_error"] is None else "on data not used to plan"),
    ]
    return f'<section id="summary" class="cards">{"".join(cards)}</section>'


def _chart_section(report) -> str:
    svg, families = chart.declared_vs_realised(report)
    swatches = "".join(
        f'<span class="swatch" style="background:{colour}"></span>{escape(name)} '
        for name, colour in chart.FAMILY_COLOURS.items() if colour in families)
    legend = ('<div class="legend"><span class="key"><svg width="14" height="14"><circle cx="7" cy="7" r="5" '
              'fill="#374151"/></svg> chosen, predicted</span><span class="key"><svg width="14" height="14">'
              '<polygon points="7,1 13,7 7,13 1,7" fill="#374151"/></svg> chosen, measured</span>'
              '<span class="key"><svg width="14" height="14"><circle cx="7" cy="7" r="4.5" fill="none" '
              f'stroke="#374151" stroke-width="1.5"/></svg> rejected candidate</span> {swatches}</div>')
    return ('<section id="chart" class="panel wide"><h2>Declared vs realised</h2>'
            '<p class="hint">Sparsity a format declares against the speedup it predicts and, when timed, '
            'realises on this substrate. Below the dashed line a layer would be slower than dense.</p>'
            f"{svg}{legend}</section>")


def _budget_section(report) -> str:
    spend = v.budget_spend(report)
    rows = "".join(
        f"<tr><td class=\"name\">{escape(s.name)}</td><td>{escape(s.format)}</td>"
        f"<td class=\"num\">{escape(v.fmt_error(s.predicted_error))}</td>"
        f"<td class=\"num\">{escape(v.fmt_fraction(s.share))}</td></tr>"
        for s in sorted(spend.shares, key=lambda s: -(s.predicted_error or 0)))
    if not rows:
        rows = '<tr><td colspan="4">no layer was rewritten: nothing spent</td></tr>'
    lines = [f"Budget: relative L2 error of the outputs against dense, at most {v.fmt_error(spend.budget)}."]
    if spend.predicted_combined is not None and spend.shares:
        lines.append(f"The rewritten layers' predicted errors combine (root sum of squares, as the planner "
                     f"budgets them) to {v.fmt_error(spend.predicted_combined)}, "
                     f"{v.fmt_fraction(spend.fraction(spend.predicted_combined))} of the budget.")
    if spend.measured_error is not None:
        lines.append(f"Measured end to end on calibration data: {v.fmt_error(spend.measured_error)} "
                     f"({v.fmt_fraction(spend.fraction(spend.measured_error))}).")
    if spend.heldout_error is not None:
        lines.append(f"On held-out data: {v.fmt_error(spend.heldout_error)} "
                     f"({v.fmt_fraction(spend.fraction(spend.heldout_error))}).")
    text = " ".join(escape(line) for line in lines)
    return ('<section id="budget" class="panel"><h2>Error budget</h2>'
            f'<p class="hint">{text}</p>{chart.budget_bar(spend)}'
            '<table class="small"><thead><tr><th>layer</th><th>format</th><th>pred err</th>'
            '<th title="share of the combined predicted error, in squares: shares add up to 100%">share</th>'
            f'</tr></thead><tbody>{rows}</tbody></table></section>')


def _layer_section(report) -> str:
    multi_graph = len({layer.get("graph", 0) for layer in report.layers}) > 1
    columns = [c for c in COLUMNS if multi_graph or c[0] != "graph"]
    head = "".join(f'<th data-col="{cid}" title="{escape(tip)}" tabindex="0">{escape(label)}</th>'
                   for cid, label, tip in columns)
    rows = []
    for i, layer in enumerate(report.layers):
        cells = _layer_cells(i, layer)
        rows.append(f'<tr class="layer{" rewritten" if v.is_rewritten(layer) else ""}" data-layer="{i}">'
                    + "".join(cells[cid] for cid, _, _ in columns) + "</tr>")
        rows.append(f'<tr class="cands" data-layer="{i}" hidden><td colspan="{len(columns)}">'
                    f"{_candidate_table(layer)}</td></tr>")
    if not report.layers:
        rows.append(f'<tr><td colspan="{len(columns)}">no linear layers were found</td></tr>')
    return ('<section id="layers" class="panel"><h2>Layers</h2>'
            '<p class="hint">Click a column to sort; click a layer\'s candidates to see every format '
            "considered and why it was not chosen.</p>"
            f'<div class="scroll"><table id="layer-table" class="layers"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _experts_section(report) -> str:
    banks = v.expert_banks(report)
    if not banks:
        return ""
    lis = "".join(f"<li>{escape(v.bank_line(b))}</li>" for b in banks)
    return ('<section id="experts" class="panel"><h2>Expert banks</h2>'
            '<p class="hint">Each bank runs the implementation measured fastest on its own calibration routing '
            f'(every implementation computes the same function).</p><ul>{lis}</ul></section>')


def _skipped_section(report) -> str:
    items = v.skipped(report)
    if not items:
        return ""
    lis = "".join(f'<li><span class="name">{escape(x["name"])}</span>'
                  + (f" ({escape(x['op'])})" if x.get("op") else "") + f": {escape(x['reason'])}</li>"
                  for x in items)
    return ('<section id="skipped" class="panel"><h2>Not considered</h2>'
            f'<p class="hint">Weight-bearing operations left as they were, and why.</p><ul>{lis}</ul></section>')


def _cell(text: str, sort: object, cls: str = "") -> str:
    key = "" if sort is None else sort
    cls_attr = f' class="{cls}"' if cls else ""
    return f'<td{cls_attr} data-sort="{escape(str(key))}">{escape(text)}</td>'


def _layer_cells(i: int, layer: dict) -> dict[str, str]:
    n, k = layer["shape"]
    rejected = len(v.rejected_candidates(layer))
    return {
        "index": _cell(str(i), i, "num"),
        "graph": _cell(str(layer.get("graph", 0)), layer.get("graph", 0), "num"),
        "name": (f'<td class="name" data-sort="{escape(layer["name"])}">'
                 f'{_breakable(layer["name"])}</td>'),
        "shape": _cell(v.fmt_shape(layer["shape"]), n * k, "num"),
        "tokens": _cell(v.fmt_tokens(layer["tokens"]), layer["tokens"], "num"),
        "format": (f'<td data-sort="{escape(layer["format"])}"><span class="fmt" style="border-color:'
                   f'{chart.family_colour(layer["format"])}" title="kernel: {escape(layer["kernel"] or "dense")}">'
                   f'{escape(layer["format"])}</span></td>'),
        "declared": _cell(v.fmt_fraction(layer["declared_sparsity"]), layer["declared_sparsity"], "num"),
        "dense_us": _cell(v.fmt_us(layer["predicted_us_dense"]), layer["predicted_us_dense"], "num"),
        "predicted_us": _cell(v.fmt_us(layer["predicted_us"]), layer["predicted_us"], "num"),
        "predicted_speedup": _cell(v.fmt_speedup(layer["predicted_speedup"]), layer["predicted_speedup"],
                                   _speed_class(layer["predicted_speedup"])),
        "measured_speedup": _cell(v.fmt_speedup(layer["measured_speedup"]), layer["measured_speedup"],
                                  _speed_class(layer["measured_speedup"])),
        "predicted_error": _cell(v.fmt_error(layer["predicted_error"]), layer["predicted_error"], "num"),
        "measured_error": _cell(v.fmt_error(layer["measured_error"]), layer["measured_error"], "num"),
        "reason": _cell(layer["reason"], layer["reason"], "reason"),
        "candidates": (f'<td data-sort="{len(layer["candidates"])}"><button class="toggle" type="button" '
                       f'aria-expanded="false" title="{len(layer["candidates"])} candidates, {rejected} rejected: '
                       f'show them">{len(layer["candidates"])} ▸</button></td>'),
    }


def _breakable(name: str) -> str:
    """An escaped qualified name that may wrap after its dots."""
    return ".<wbr>".join(escape(part) for part in name.split("."))


def _speed_class(x: float | None) -> str:
    if x is None or x == 1:
        return "num"
    return "num good" if x > 1 else "num bad"


def _candidate_table(layer: dict) -> str:
    runs_as = (f'<p class="hint">runs as <code>{escape(layer["kernel"])}</code> · op {escape(layer["op"])} · '
               f'{escape(layer["dtype"])}</p>' if layer["kernel"]
               else f'<p class="hint">op {escape(layer["op"])} · {escape(layer["dtype"])}</p>')
    if not layer["candidates"]:
        return runs_as + '<p class="hint">no candidates were considered for this layer</p>'
    rows = []
    for cand in layer["candidates"]:
        chosen = cand.get("rejected_because") is None
        status = "chosen" if chosen else f"rejected: {cand['rejected_because']}"
        rows.append(
            f'<tr class="{"chosen" if chosen else "rejected"}"><td>{escape(cand["format"])}</td>'
            f'<td class="num">{escape(v.fmt_fraction(v.candidate_sparsity(layer, cand)))}</td>'
            f'<td class="num">{escape(v.fmt_us(cand.get("predicted_us")))}</td>'
            f'<td class="num">{escape(v.fmt_speedup(v.candidate_speedup(layer, cand)))}</td>'
            f'<td class="num">{escape(v.fmt_error(cand.get("predicted_error")))}</td>'
            f"<td>{escape(status)}</td></tr>")
    return (runs_as + '<table class="candidates"><thead><tr><th>format</th><th>declared</th><th>predicted</th>'
            '<th>pred ×</th><th>pred err</th><th>decision</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


Report.RENDERERS.update({".html": render_html, ".htm": render_html})
