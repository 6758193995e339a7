"""Layers the lowering runs as one launch over their stacked weights, and what that saves.

The planner prices each layer on its own, at its own shape. A stacked launch (gate and up, q/k/v)
streams the same bytes but pays a kernel's fixed cost once, so the plan's end-to-end prediction
takes off the difference between the members' own prices and the fingerprint's price of the
stacked shape (``end_to_end.predicted_us_stacked``, docs/report.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchGroup:
    names: tuple[str, ...]      # the layers, in the order their rows are stacked
    spec: str                   # their common format setting
    shape: tuple[int, int]      # the stacked weight: (sum of the layers' N, K)


def price_groups(groups, layers, fingerprint, mode: str) -> tuple[float, list[str]]:
    """Microseconds the stacked launches save against their members' own predictions, and one
    planner-log line per group. A group the fingerprint cannot price saves nothing (said so)."""
    by_name = {layer.name: layer for layer in layers}
    saved, lines = 0.0, []
    for group in groups:
        members = [by_name[n] for n in group.names if n in by_name and by_name[n].chosen is not None]
        N, K = group.shape
        line = f"{', '.join(group.names)}: one launch over their stacked {group.spec} weights ({N} x {K}, same input)"
        if not members:
            lines.append(line)
            continue
        apart = sum(layer.chosen.predicted_us for layer in members)
        M, dtype = max(members[0].tokens, 1), members[0].site.dtype_name
        why = fingerprint.can_predict(group.spec, dtype, mode)
        pred = None if why else fingerprint.predict_detail(group.spec, M, N, K, dtype=dtype, mode=mode)
        if pred is None or not math.isfinite(pred.us) or not math.isfinite(apart) or getattr(pred, "unmeasured", ""):
            lines.append(f"{line}; priced as {len(members)} launches (the fingerprint cannot price the stacked shape)")
            continue
        saved += apart - pred.us
        note = f" ({pred.note})" if getattr(pred, "note", "") else ""
        lines.append(f"{line}: predicted {pred.us:.1f} us against {apart:.1f} us as {len(members)} launches{note}")
    return saved, lines
