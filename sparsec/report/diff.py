"""What changed between two reports: plan (format per layer), predicted time, fingerprint, budget.

``diff(a, b)`` returns a ``ReportDiff`` (plain data, ``to_dict`` for JSON) and ``render_diff``
turns it into a rich renderable. Layers are matched by (graph index, name); a name that repeats
within one graph is matched by order of appearance.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from rich.console import Group
from rich.table import Table
from rich.text import Text

from sparsec.report import views as v
from sparsec.report.model import as_report

_SETTINGS = (
    ("fingerprint.name", lambda r: r.fingerprint.get("name")),
    ("fingerprint.device", lambda r: r.fingerprint.get("device")),
    ("fingerprint.hash", lambda r: r.fingerprint.get("hash")),
    ("device", lambda r: r.get("device")),
    ("error_budget", lambda r: r["error_budget"]),
    ("entry", lambda r: r["entry"]),
    ("sparsec_version", lambda r: r["sparsec_version"]),
)
_FIGURES = (
    ("totals.rewritten", lambda r: r.totals["rewritten"]),
    ("totals.predicted_us", lambda r: r.totals["predicted_us"]),
    ("totals.predicted_speedup", lambda r: r.totals["predicted_speedup"]),
    ("totals.measured_speedup", lambda r: r.totals["measured_speedup"]),
    ("end_to_end.measured_error", lambda r: r.end_to_end["measured_error"]),
    ("end_to_end.heldout_error", lambda r: r.end_to_end["heldout_error"]),
    ("end_to_end.predicted_speedup", lambda r: r.end_to_end["predicted_speedup"]),
    ("end_to_end.measured_speedup", lambda r: r.end_to_end["measured_speedup"]),
)


@dataclass(frozen=True)
class FieldChange:
    field: str
    before: object
    after: object


@dataclass(frozen=True)
class LayerChange:
    """One layer in either report. ``status`` is added, removed, format, time or same."""

    graph: int
    name: str
    status: str
    format_before: str | None
    format_after: str | None
    predicted_us_before: float | None
    predicted_us_after: float | None
    reason_after: str | None

    @property
    def predicted_us_delta(self) -> float | None:
        if self.predicted_us_before is None or self.predicted_us_after is None:
            return None
        return self.predicted_us_after - self.predicted_us_before


@dataclass
class ReportDiff:
    settings: list[FieldChange] = field(default_factory=list)
    figures: list[FieldChange] = field(default_factory=list)
    layers: list[LayerChange] = field(default_factory=list)

    @property
    def plan_changes(self) -> list[LayerChange]:
        return [c for c in self.layers if c.status in ("added", "removed", "format")]

    @property
    def changed(self) -> bool:
        return bool(self.settings or self.figures or any(c.status != "same" for c in self.layers))

    def to_dict(self) -> dict:
        return {
            "settings": [asdict(c) for c in self.settings],
            "figures": [asdict(c) for c in self.figures],
            "layers": [dict(asdict(c), predicted_us_delta=c.predicted_us_delta) for c in self.layers],
        }


def diff(a, b) -> ReportDiff:
    """Compare report ``a`` (before) with report ``b`` (after); each a Report, dict or path."""
    a, b = as_report(a), as_report(b)
    out = ReportDiff()
    for name, get in _SETTINGS:
        if get(a) != get(b):
            out.settings.append(FieldChange(name, get(a), get(b)))
    for name, get in _FIGURES:
        if get(a) != get(b):
            out.figures.append(FieldChange(name, get(a), get(b)))
    before = _index(a.layers)
    after = _index(b.layers)
    for key in list(before) + [k for k in after if k not in before]:
        out.layers.append(_layer_change(key, before.get(key), after.get(key)))
    return out


def _index(layers: list[dict]) -> dict[tuple[int, str, int], dict]:
    seen: dict[tuple[int, str], int] = defaultdict(int)
    index = {}
    for layer in layers:
        graph, name = v.layer_key(layer)
        index[(graph, name, seen[(graph, name)])] = layer
        seen[(graph, name)] += 1
    return index


def _layer_change(key, old: dict | None, new: dict | None) -> LayerChange:
    graph, name, _ = key
    if old is None:
        status = "added"
    elif new is None:
        status = "removed"
    elif old["format"] != new["format"]:
        status = "format"
    elif old["predicted_us"] != new["predicted_us"]:
        status = "time"
    else:
        status = "same"
    return LayerChange(
        graph=graph, name=name, status=status,
        format_before=old["format"] if old else None,
        format_after=new["format"] if new else None,
        predicted_us_before=old["predicted_us"] if old else None,
        predicted_us_after=new["predicted_us"] if new else None,
        reason_after=new["reason"] if new else None,
    )


_STATUS_STYLE = {"added": "green", "removed": "red", "format": "bold yellow", "time": "cyan", "same": "dim"}


def render_diff(d: ReportDiff, *, show_unchanged: bool = False) -> Group:
    """A rich renderable of a ``ReportDiff``: settings, layer table, totals."""
    parts: list = []
    if not d.changed:
        return Group(Text("no differences"))
    if d.settings:
        parts.append(Text("settings:", style="bold"))
        parts += [Text(f"  {c.field}: {_value(c.before)} -> {_value(c.after)}") for c in d.settings]
    rows = [c for c in d.layers if show_unchanged or c.status != "same"]
    if rows:
        table = Table(header_style="bold", pad_edge=False)
        if len({c.graph for c in d.layers}) > 1:
            table.add_column("graph", justify="right")
        for title, kw in (("layer", {"overflow": "fold"}), ("change", {}), ("format before", {}),
                          ("format after", {}), ("predicted before", {"justify": "right"}),
                          ("predicted after", {"justify": "right"}), ("delta", {"justify": "right"}),
                          ("reason now", {"overflow": "fold", "ratio": 1, "min_width": 20})):
            table.add_column(title, **kw)
        for c in rows:
            delta = c.predicted_us_delta
            row = [Text(c.name), Text(c.status, style=_STATUS_STYLE[c.status]),
                   Text(c.format_before or v.DASH), Text(c.format_after or v.DASH),
                   Text(v.fmt_us(c.predicted_us_before)), Text(v.fmt_us(c.predicted_us_after)),
                   Text(v.DASH if delta is None else f"{delta:+,.1f} us",
                        style="" if delta is None else "green" if delta < 0 else "red" if delta > 0 else ""),
                   Text(c.reason_after or v.DASH)]
            if len({c.graph for c in d.layers}) > 1:
                row.insert(0, Text(str(c.graph)))
            table.add_row(*row)
        parts.append(table)
    unchanged = sum(c.status == "same" for c in d.layers)
    summary = f"{len(d.plan_changes)} plan change(s), {unchanged} layer(s) unchanged"
    parts.append(Text(summary, style="bold"))
    parts += [Text(f"  {c.field}: {_value(c.before)} -> {_value(c.after)}") for c in d.figures]
    return Group(*parts)


def _value(x) -> str:
    if x is None:
        return v.DASH
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)
