"""Inline SVG charts for the HTML report, drawn in Python so the page needs no chart library.

``declared_vs_realised`` is the chart the report exists for: declared sparsity on x, speedup
(log scale) on y, the dense line at 1.0x. Each layer is one filled circle at its predicted
speedup (class ``mark layer predicted``), plus a diamond at its measured speedup when it was
timed (``mark layer measured``), and each costed rejected candidate is a hollow circle
(``mark candidate rejected``): points below the line are sparsity that does not pay on this
substrate. ``budget_bar`` shows how the error budget was spent. Every text is escaped.
"""

from __future__ import annotations

import math
from html import escape

from sparsec.formats import family_of
from sparsec.report import views as v

FAMILY_COLOURS = {
    "dense": "#6b7280", "2:4": "#2563eb", "block": "#ea580c", "lowrank": "#16a34a", "monarch": "#9333ea",
    "act": "#db2777", "actrot": "#9d174d", "2:4+lowrank": "#0891b2", "block+lowrank": "#ca8a04",
}
_OTHER_COLOUR = "#0f766e"

W, H = 760, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 16, 52


def family_colour(fmt: str) -> str:
    return FAMILY_COLOURS.get(family_of(fmt), _OTHER_COLOUR)


_NICE_TICKS = (1 / 64, 1 / 32, 1 / 16, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0, 64.0)


class _LogScale:
    """Speedup to pixel row on a log2 axis that always shows 0.5x..2x and at most 1/64x..64x;
    a value beyond that is drawn on the edge (its tooltip keeps the real figure)."""

    LIMIT = 6.0  # log2 of the widest speedup or slowdown drawn in place

    def __init__(self, values: list[float]):
        logs = [math.log2(v) for v in values]
        lo = max(min([-1.0, *logs]), -self.LIMIT)
        hi = min(max([1.0, *logs]), self.LIMIT)
        self.lo, self.hi = lo - 0.15, hi + 0.15

    def clipped(self, speedup: float) -> bool:
        return not (-self.LIMIT <= math.log2(speedup) <= self.LIMIT)

    def __call__(self, speedup: float) -> float:
        value = min(max(math.log2(speedup), -self.LIMIT), self.LIMIT)
        frac = (value - self.lo) / (self.hi - self.lo)
        return TOP + (1 - frac) * (H - TOP - BOTTOM)

    def ticks(self) -> list[float]:
        inside = [t for t in _NICE_TICKS if self.lo <= math.log2(t) <= self.hi]
        if len(inside) > 8:  # a wide range: octaves only
            inside = [t for t in inside if math.log2(t).is_integer()]
        if len(inside) > 8:  # wider still: every other octave, 1x included
            inside = [t for t in inside if int(math.log2(t)) % 2 == 0]
        return inside


_X_PAD = 12  # keeps marks at 0% off the axis labels


def _x(sparsity: float) -> float:
    return LEFT + _X_PAD + sparsity * (W - LEFT - RIGHT - _X_PAD)


def declared_vs_realised(report) -> tuple[str, set[str]]:
    """The SVG of declared sparsity against predicted and measured speedup, and the colours
    of the format families it draws (for the legend)."""
    points = []  # (kind, layer index, x, speedup, colour, tooltip)
    for i, layer in enumerate(report.layers):
        sparsity = layer["declared_sparsity"]
        label = f"{layer['name']} — {layer['format']}, {v.fmt_fraction(sparsity)} declared"
        colour = family_colour(layer["format"])
        if sparsity is not None and layer["predicted_speedup"]:
            points.append(("layer predicted", i, sparsity, layer["predicted_speedup"], colour,
                           f"{label}\npredicted {v.fmt_speedup(layer['predicted_speedup'])} (chosen)"))
        if sparsity is not None and layer["measured_speedup"]:
            points.append(("layer measured", i, sparsity, layer["measured_speedup"], colour,
                           f"{label}\nmeasured {v.fmt_speedup(layer['measured_speedup'])}"))
        for cand in v.rejected_candidates(layer):
            cs, speed = v.candidate_sparsity(layer, cand), v.candidate_speedup(layer, cand)
            if cs is None or not speed:
                continue
            points.append(("candidate rejected", i, cs, speed, family_colour(cand["format"]),
                           f"{layer['name']} — {cand['format']}, {v.fmt_fraction(cs)} declared\n"
                           f"predicted {v.fmt_speedup(speed)}, rejected: {cand['rejected_because']}"))
    y = _LogScale([p[3] for p in points])
    out = [f'<svg id="chart-svg" class="chart" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="declared sparsity against predicted and measured speedup">']
    out += _axes(y)
    out.append(_links(report, y))
    order = {"candidate rejected": 0, "layer predicted": 1, "layer measured": 2}
    for kind, i, x, speed, colour, tip in sorted(points, key=lambda p: order[p[0]]):
        if y.clipped(speed):
            kind, tip = f"{kind} clipped", f"{tip} (off the scale)"
        out.append(_mark(kind, i, _x(x), y(speed), colour, tip))
    out.append("</svg>")
    return "".join(out), {p[4] for p in points}


def _axes(y: _LogScale) -> list[str]:
    x0, x1, y0, y1 = LEFT, W - RIGHT, TOP, H - BOTTOM
    out = [f'<rect class="plot" x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}"/>']
    for tick in y.ticks():
        ty = y(tick)
        label = f"1/{round(1 / tick)}x" if tick < 0.125 else f"{tick:g}x"
        out.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{ty:.1f}" y2="{ty:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{ty + 4:.1f}" text-anchor="end">{label}</text>')
    for pct in range(0, 101, 25):
        tx = _x(pct / 100)
        out.append(f'<line class="grid" x1="{tx:.1f}" x2="{tx:.1f}" y1="{y0}" y2="{y1}"/>'
                   f'<text class="tick" x="{tx:.1f}" y="{y1 + 16}" text-anchor="middle">{pct}%</text>')
    dense_y = y(1.0)
    out.append(f'<line id="dense-line" class="dense" x1="{x0}" x2="{x1}" y1="{dense_y:.1f}" y2="{dense_y:.1f}"/>'
               f'<text class="dense-label" x="{x1 - 4}" y="{dense_y - 5:.1f}" text-anchor="end">'
               f'dense = 1.0x</text>')
    out.append(f'<text class="axis" x="{(x0 + x1) / 2}" y="{H - 12}" text-anchor="middle">'
               f'declared sparsity (share of the dense weight not stored)</text>')
    out.append(f'<text class="axis" transform="translate(16 {(y0 + y1) / 2}) rotate(-90)" '
               f'text-anchor="middle">speedup over dense (log scale)</text>')
    return out


def _links(report, y: _LogScale) -> str:
    """A thin line from each layer's predicted to its measured speedup: the prediction error."""
    parts = ['<g class="links">']
    for layer in report.layers:
        s, p, m = layer["declared_sparsity"], layer["predicted_speedup"], layer["measured_speedup"]
        if s is not None and p and m:
            parts.append(f'<line class="link" x1="{_x(s):.1f}" x2="{_x(s):.1f}" '
                         f'y1="{y(p):.1f}" y2="{y(m):.1f}" stroke="{family_colour(layer["format"])}"/>')
    parts.append("</g>")
    return "".join(parts)


def _mark(kind: str, layer_index: int, cx: float, cy: float, colour: str, tip: str) -> str:
    title = f"<title>{escape(tip)}</title>"
    common = f'class="mark {kind}" data-layer="{layer_index}"'
    if kind.startswith("layer measured"):
        r = 6
        pts = f"{cx:.1f},{cy - r:.1f} {cx + r:.1f},{cy:.1f} {cx:.1f},{cy + r:.1f} {cx - r:.1f},{cy:.1f}"
        return f'<polygon {common} points="{pts}" fill="{colour}">{title}</polygon>'
    if kind.startswith("candidate rejected"):
        return f'<circle {common} cx="{cx:.1f}" cy="{cy:.1f}" r="5" style="stroke:{colour}">{title}</circle>'
    return f'<circle {common} cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{colour}">{title}</circle>'


BW, BH = 520, 92
_BAR_Y, _BAR_H = 22, 22


def budget_bar(spend: v.BudgetSpend) -> str:
    """The budget as a bar in error units: the rewritten layers' combined predicted error, split
    by each layer's share of it, against the budget line, with the measured end-to-end (and
    held-out) error as markers below."""
    combined = spend.predicted_combined or 0.0
    top = max([spend.budget, combined, spend.measured_error or 0, spend.heldout_error or 0]) or 1.0
    scale = (BW - 20) / (top * 1.08)
    out = [f'<svg id="budget-svg" class="budget" viewBox="0 0 {BW} {BH}" role="img" '
           f'aria-label="error budget use">',
           f'<rect class="budget-track" x="10" y="{_BAR_Y}" width="{BW - 20}" height="{_BAR_H}"/>']
    x = 10.0
    for share in spend.shares:
        if not share.share:
            continue
        width = share.share * combined * scale
        tip = (f"{share.name} — {share.format}: predicted error {v.fmt_error(share.predicted_error)}, "
               f"{v.fmt_fraction(share.share)} of the combined predicted error")
        out.append(f'<rect class="budget-share" x="{x:.1f}" y="{_BAR_Y}" width="{width:.1f}" height="{_BAR_H}" '
                   f'fill="{family_colour(share.format)}"><title>{escape(tip)}</title></rect>')
        x += width
    bx = 10 + spend.budget * scale
    out.append(f'<line class="budget-limit" x1="{bx:.1f}" x2="{bx:.1f}" y1="{_BAR_Y - 8}" y2="{_BAR_Y + _BAR_H + 6}"/>'
               f'<text class="tick" x="{bx:.1f}" y="{_BAR_Y - 11}" text-anchor="middle">'
               f'budget {v.fmt_error(spend.budget)}</text>')
    if spend.shares:
        out.append(f'<text class="tick" x="12" y="{_BAR_Y - 11}">predicted {v.fmt_error(spend.predicted_combined)}'
                   f'</text>')
    for label, value, row in (("measured", spend.measured_error, 64), ("held out", spend.heldout_error, 82)):
        if value is None:
            continue
        mx = 10 + value * scale
        anchor = "end" if mx > BW / 2 else "start"
        tx = mx - 9 if anchor == "end" else mx + 9
        out.append(f'<path class="budget-marker" d="M{mx:.1f},{row - 9} l-5,6 h10 z"/>'
                   f'<line class="budget-stem" x1="{mx:.1f}" x2="{mx:.1f}" y1="{_BAR_Y + _BAR_H}" y2="{row - 9}"/>'
                   f'<text class="tick" x="{tx:.1f}" y="{row}" text-anchor="{anchor}">{label} end to end '
                   f'{v.fmt_error(value)}</text>')
    out.append("</svg>")
    return "".join(out)
