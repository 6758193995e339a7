"""The report as data: one validated ``sparsec.report/1`` dict, with load, save and extend.

A ``Report`` holds its own deep copy of the dict the pipeline returns, validated against
``schema.json`` on construction and on load, so every renderer can trust its fields. Saving is
atomic (temporary file in the same folder, then ``os.replace``): a crash never leaves half a
report. ``extend`` joins the reports of the subgraphs torch.compile produces at graph breaks
into one; how the totals and end-to-end figures combine is written on that method.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from sparsec import interrupts
from sparsec.errors import ReportError
from sparsec.report.validate import SCHEMA_ID, schema_errors

_MAX_LISTED_ERRORS = 5


class Report:
    """A validated rewrite report; see DESIGN.md "Report" for the fields."""

    def __init__(self, data: dict, *, source: str | None = None):
        self._data = copy.deepcopy(data)
        _raise_if_invalid(self._data, source or "report")

    # -- access ---------------------------------------------------------------------------------
    @property
    def layers(self) -> list[dict]:
        return self._data["layers"]

    @property
    def totals(self) -> dict:
        return self._data["totals"]

    @property
    def end_to_end(self) -> dict:
        return self._data["end_to_end"]

    @property
    def fingerprint(self) -> dict:
        return self._data["fingerprint"]

    @property
    def warnings(self) -> list[str]:
        return self._data.get("warnings", [])

    def add_recompiles(self, entries: list[dict]) -> None:
        """Record what recompiles at other token counts did with launches predicted slower than dense
        there (``recompiles``), each said among the warnings too."""
        from sparsec.reasons import recompile_line

        if entries:
            self._data["recompiles"] = [*self._data.get("recompiles", []), *entries]
            self.add_warnings([recompile_line(e) for e in entries])

    def add_warnings(self, lines: list[str]) -> None:
        """Append warnings an entry learns after the graphs are planned (without repeats)."""
        if lines:
            self._data["warnings"] = list(dict.fromkeys([*self.warnings, *lines]))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def to_dict(self) -> dict:
        """A deep copy of the report's data, safe to change."""
        return copy.deepcopy(self._data)

    def __repr__(self) -> str:
        t = self.totals
        return (f"Report(entry={self['entry']!r}, fingerprint={self.fingerprint['name']!r}, "
                f"layers={t['layers']}, rewritten={t['rewritten']})")

    # -- files ----------------------------------------------------------------------------------
    # file suffix -> renderer of the file's text; the renderers register themselves (``html``
    # adds ".html" and ".htm" when the ``sparsec.report`` package is imported), so that this
    # module, which every renderer reads reports through, imports none of them
    RENDERERS: dict = {".json": lambda report: json.dumps(report._data, indent=2, allow_nan=False) + "\n"}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report: ``.json`` as data, ``.html`` as the self-contained HTML report."""
        path = Path(path)
        render = self.RENDERERS.get(path.suffix.lower())
        if render is None:
            raise ReportError(f"{path}: a report is written as .json (data) or .html (page); "
                              f"got {path.suffix or 'no suffix'!r}")
        write_atomic(path, render(self))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        """Read and validate a ``.json`` report; ReportError names the file and the bad field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReportError(f"{path}: no such report file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ReportError(f"{path}: cannot read the report ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (an HTML report cannot be read back; pass the .json)" if text.lstrip().startswith("<") else ""
            raise ReportError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: "
                              f"{exc.msg}{hint}") from None
        return cls(data, source=str(path))

    # -- graph breaks ---------------------------------------------------------------------------
    def extend(self, other: "Report") -> "Report":
        """Append ``other``'s layers (a later compiled subgraph) to this report, in place.

        Returns ``self`` so that ``report = report.extend(next_graph)`` and chaining both work;
        ``other`` is not changed. Layers are appended, never merged or overwritten, even when a
        name repeats. Each layer's ``graph`` index is kept unique: this report's layers without
        one count as graph 0; ``other``'s indices are kept when they already come after this
        report's (the backend numbered its graphs), and shifted past them otherwise.

        Combination rules (all associative, so extending graph by graph equals one big extend):
        - totals: counts and predicted times are summed, ``predicted_speedup`` is recomputed as
          summed dense time over summed predicted time, and ``measured_speedup`` is the
          harmonic mean weighted by each part's predicted dense time (the same "total dense time
          over total rewritten time" rule applied to measured figures); null if either is null.
        - end_to_end: speedups combine as in totals, weighted by each part's dense time end to
          end (totals dense time plus ``predicted_us_rest``, summed; totals alone where either
          part's rest is unknown);
          ``measured_error`` and ``heldout_error`` combine as the root sum of squares, the rule
          the planner uses for the errors of independent rewrites; null if either is null.
          Each subgraph is planned against the whole budget, so the combined error can exceed
          it: the report then shows that rather than hiding it.
        - planning: evaluation counts and step seconds are summed, the time of one evaluation is
          the mean weighted by evaluations.
        - ``skipped``, ``experts``, ``fallbacks``, ``recompiles`` and ``warnings`` are joined (warnings without repeats); entry,
          fingerprint, device and error budget must agree, since one compilation uses one of
          each.
        """
        if not isinstance(other, Report):
            raise TypeError(f"extend takes a Report, got {type(other).__name__}")
        for key in ("schema", "entry", "error_budget", "device"):
            if self.get(key) != other.get(key):
                raise ReportError(f"cannot extend a report with one of another {key}: "
                                  f"{self.get(key)!r} vs {other.get(key)!r}")
        if self.fingerprint != other.fingerprint:
            raise ReportError("cannot extend a report with one planned on another fingerprint: "
                              f"{self.fingerprint['name']!r} vs {other.fingerprint['name']!r}")
        combined = copy.deepcopy(self._data)
        shift = _graph_shift(self._data, other._data)
        combined["layers"] = ([dict(x, graph=x.get("graph", 0)) for x in combined["layers"]]
                              + [dict(copy.deepcopy(x), graph=shift + x.get("graph", 0)) for x in other.layers])
        if "skipped" in combined or "skipped" in other._data:
            combined["skipped"] = ([dict(x, graph=x.get("graph", 0)) for x in combined.get("skipped", [])]
                                   + [dict(x, graph=shift + x.get("graph", 0)) for x in other.get("skipped", [])])
        if "experts" in combined or "experts" in other._data:
            combined["experts"] = ([dict(x) for x in combined.get("experts", [])]
                                   + [dict(copy.deepcopy(x), graph=shift + x.get("graph", 0)) for x in other.get("experts", [])])
        if "planner_log" in combined or "planner_log" in other._data:
            combined["planner_log"] = list(combined.get("planner_log", [])) + list(other.get("planner_log", []))
        if "planning" in combined or "planning" in other._data:
            combined["planning"] = combine_planning(combined.get("planning"), other.get("planning"))
        if "recompiles" in other._data:
            combined["recompiles"] = [*combined.get("recompiles", []), *copy.deepcopy(other["recompiles"])]
        if "fallbacks" in combined or "fallbacks" in other._data:
            combined["fallbacks"] = ([dict(x) for x in combined.get("fallbacks", [])]
                                     + [dict(x, graph=shift + x.get("graph", 0)) for x in other.get("fallbacks", [])])
        combined["totals"] = combine_totals(self.totals, other.totals)
        combined["end_to_end"] = combine_end_to_end(self.end_to_end, self.totals,
                                                    other.end_to_end, other.totals)
        warnings = list(dict.fromkeys([*self.warnings, *other.warnings]))
        if warnings or "warnings" in combined:
            combined["warnings"] = warnings
        _raise_if_invalid(combined, "extended report")
        self._data = combined
        return self


def combine_planning(mine: dict | None, theirs: dict | None) -> dict | None:
    """What planning two graphs cost together (``extend``)."""
    if not mine or not theirs:
        return copy.deepcopy(mine or theirs)
    n = mine["model_evaluations"] + theirs["model_evaluations"]
    a, b = mine["timing"], theirs["timing"]
    weighted = [(p["model_evaluations"], p["timing"]["evaluation_s"]) for p in (mine, theirs)
                if p["timing"]["evaluation_s"] is not None]
    steps = dict(a["steps_s"])
    for name, sec in b["steps_s"].items():
        steps[name] = round(steps.get(name, 0.0) + sec, 3)
    by_step = copy.deepcopy(mine.get("evaluations_by_step") or {})
    for name, counts in (theirs.get("evaluations_by_step") or {}).items():
        into = by_step.setdefault(name, {"calibration": 0, "heldout": 0})
        into["calibration"] += counts["calibration"]
        into["heldout"] += counts["heldout"]
    out = {"model_evaluations": n, "heldout_evaluations": mine["heldout_evaluations"] + theirs["heldout_evaluations"],
           "timing": {"evaluation_s": (sum(k * t for k, t in weighted) / n) if weighted and n else None,
                      "total_s": round(a["total_s"] + b["total_s"], 3), "steps_s": steps}}
    if by_step:
        out["evaluations_by_step"] = by_step
    return out


def _graph_shift(mine: dict, theirs: dict) -> int:
    """How much to add to ``theirs``' graph indices so they follow ``mine``'s."""
    def indices(data):
        return [x.get("graph", 0) for x in [*data["layers"], *data.get("skipped", []), *data.get("fallbacks", [])]]

    own_max = max(indices(mine), default=-1)
    their_min = min(indices(theirs), default=0)
    return 0 if their_min > own_max else own_max + 1 - their_min


def as_report(value: "Report | dict | str | os.PathLike") -> "Report":
    """Accept a Report, a report dict or a path to a ``.json`` report."""
    if isinstance(value, Report):
        return value
    if isinstance(value, dict):
        return Report(value)
    if isinstance(value, (str, os.PathLike)):
        return Report.load(value)
    raise TypeError(f"expected a Report, a dict or a path, got {type(value).__name__}")


def combine_totals(a: dict, b: dict) -> dict:
    """Totals of two parts run one after the other (see ``Report.extend``)."""
    out = {**a, **b}
    out["layers"] = a["layers"] + b["layers"]
    out["rewritten"] = a["rewritten"] + b["rewritten"]
    out["predicted_us_dense"] = _sum_or_none(a["predicted_us_dense"], b["predicted_us_dense"])
    out["predicted_us"] = _sum_or_none(a["predicted_us"], b["predicted_us"])
    out["predicted_speedup"] = _ratio(out["predicted_us_dense"], out["predicted_us"])
    out["measured_speedup"] = weighted_speedup(
        [(a["predicted_us_dense"], a["measured_speedup"]), (b["predicted_us_dense"], b["measured_speedup"])])
    return out


def combine_end_to_end(a: dict, a_totals: dict, b: dict, b_totals: dict) -> dict:
    """End-to-end figures of two subgraphs run one after the other (see ``Report.extend``)."""
    out = {**a, **b}
    wa, wb = a_totals["predicted_us_dense"], b_totals["predicted_us_dense"]
    rests = (a.get("predicted_us_rest"), b.get("predicted_us_rest"))
    if "predicted_us_rest" in a or "predicted_us_rest" in b:
        out["predicted_us_rest"] = None if None in rests else rests[0] + rests[1]
    if "predicted_us_rest_by_kind" in a or "predicted_us_rest_by_kind" in b:
        kinds = (a.get("predicted_us_rest_by_kind"), b.get("predicted_us_rest_by_kind"))
        out["predicted_us_rest_by_kind"] = None if None in kinds else {
            k: kinds[0].get(k, 0.0) + kinds[1].get(k, 0.0) for k in sorted({*kinds[0], *kinds[1]})}
    if "predicted_us_stacked" in a or "predicted_us_stacked" in b:
        stacked = (a.get("predicted_us_stacked"), b.get("predicted_us_stacked"))
        out["predicted_us_stacked"] = None if None in stacked else stacked[0] + stacked[1]
    if "predicted_us_fused" in a or "predicted_us_fused" in b:
        fused = (a.get("predicted_us_fused"), b.get("predicted_us_fused"))
        out["predicted_us_fused"] = None if None in fused else fused[0] + fused[1]
    if wa is not None and wb is not None and None not in rests:
        wa, wb = wa + rests[0], wb + rests[1]   # each part's dense time end to end
    for key in ("predicted_speedup", "measured_speedup"):
        out[key] = weighted_speedup([(wa, a[key]), (wb, b[key])])
    for key in ("measured_error", "heldout_error"):
        out[key] = None if a[key] is None or b[key] is None else math.hypot(a[key], b[key])
    return out


def weighted_speedup(parts: Iterable[tuple[float | None, float | None]]) -> float | None:
    """Speedup of parts run in sequence: sum of dense times over sum of dense/speedup.

    Each part is ``(dense_time, speedup)``. Unknown (None) anywhere makes the result unknown,
    because a missing part would silently bias the whole; parts with zero dense time add
    nothing.
    """
    dense, rewritten = 0.0, 0.0
    for weight, speedup in parts:
        if weight is None or speedup is None:
            return None
        if weight == 0:
            continue
        if speedup <= 0:
            return None
        dense += weight
        rewritten += weight / speedup
    return dense / rewritten if rewritten > 0 else None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ReportError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        interrupts.check()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _raise_if_invalid(data: Any, source: str) -> None:
    if isinstance(data, dict) and data.get("schema") not in (None, SCHEMA_ID):
        found = data.get("schema")
        hint = " (this is a plan, not a report)" if str(found).startswith("sparsec.plan") else ""
        if str(found).startswith("sparsec.report/"):
            hint = " (written by a newer sparsec; upgrade to read it)"
        raise ReportError(f"{source}: schema is {found!r}, expected {SCHEMA_ID!r}{hint}")
    errors = schema_errors(data)
    if errors:
        shown = "; ".join(errors[:_MAX_LISTED_ERRORS])
        more = f" (and {len(errors) - _MAX_LISTED_ERRORS} more)" if len(errors) > _MAX_LISTED_ERRORS else ""
        raise ReportError(f"{source}: not a valid {SCHEMA_ID} report: {shown}{more}")


def _sum_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else num / den
