"""One sentence per decision, in words a person can act on.

Reasons are derived from the decision data (candidates, predicted times and errors, the plan
entry that forced a format), never stored separately, so they cannot drift from what happened.
"""

from __future__ import annotations

import math

from sparsec.candidates import Layer


def candidate_rejections(layer: Layer, options, fingerprint) -> None:
    """Fill ``rejected_because`` for viable candidates the selection passed over."""
    chosen = layer.chosen or layer.dense
    left = _budget_left(layer, options)
    for c in layer.candidates:
        if c is chosen or c.rejected_because is not None:
            continue
        if layer.forced_by is not None:
            c.rejected_because = f"plan entry {layer.forced_by!r} forces {chosen.fmt}"
        elif c.predicted_error > chosen.predicted_error and c.predicted_error > left:
            c.rejected_because = f"over budget: {_pct(c.predicted_error)} error > {_pct(left)} left"
        else:
            c.rejected_because = (
                f"saves less than {chosen.fmt}: {_x(layer.speedup(c))} vs {_x(layer.speedup(chosen))}"
                if not chosen.is_dense
                else "not on the best error/time trade-off"
            )


def layer_reason(layer: Layer, options, fingerprint) -> str:
    chosen = layer.chosen or layer.dense
    M, fp = max(layer.tokens, 1), fingerprint.name
    if layer.kept_dense:
        return layer.kept_dense
    if layer.forced_by is not None:
        if chosen.is_dense and layer.requested != "dense":
            refused = next((c.rejected_because for c in layer.candidates if c.fmt == layer.requested), None)
            return f"plan entry {layer.forced_by!r} asked for {layer.requested}, but {refused or 'it cannot be applied'}; kept dense"
        if chosen.is_dense:
            return f"kept dense: plan entry {layer.forced_by!r} says so"
        return (
            f"forced by plan entry {layer.forced_by!r}: {chosen.fmt} predicted {_x(layer.speedup(chosen))} "
            f"at M={M} on {fp}{_shared(layer, chosen)}, {_pct(chosen.predicted_error)} layer error"
        )
    if not chosen.is_dense:
        return (
            f"{chosen.fmt} predicted {_x(layer.speedup(chosen))} at M={M} on {fp} ({chosen.kernel}"
            f"{_shared(layer, chosen)}) for {_pct(chosen.predicted_error)} layer error: the most time saved "
            f"within the budget"
        )
    vetoed = [c for c in layer.candidates if (c.rejected_because or "").startswith("measured")]
    if vetoed:
        return f"kept dense: {vetoed[0].fmt} {vetoed[0].rejected_because}"
    if not layer.candidates:
        return f"kept dense: none of the allowed formats ({', '.join(options.formats)}) has a pass for this layer"
    viable = [c for c in layer.candidates if c.rejected_because is None or c.rejected_because.startswith("over budget")]
    if viable:
        best = max(viable, key=lambda c: (layer.speedup(c) or 0.0) / max(c.predicted_error, 1e-12))
        cheapest = min(viable, key=lambda c: c.predicted_error)
        return (
            f"kept dense: the least lossy saving candidate, {cheapest.fmt} ({_x(layer.speedup(cheapest))}), "
            f"costs {_pct(cheapest.predicted_error)} layer error, over the {_pct(_budget_left(layer, options))} "
            f"of budget left (best ratio: {best.fmt})"
        )
    timed = [c for c in layer.candidates if c.predicted_us]
    if timed:
        best = min(timed, key=lambda c: c.predicted_us)
        if (layer.speedup(best) or 0.0) > 1.0 and best.rejected_because:
            return f"kept dense: the fastest candidate, {best.fmt} ({_x(layer.speedup(best))}), was refused: {best.rejected_because}"
        return (
            f"kept dense: every candidate is predicted slower than dense on {fp} at M={M} "
            f"(fastest: {best.fmt} at {_x(layer.speedup(best))})"
        )
    first = layer.candidates[0].rejected_because
    return f"kept dense: no allowed format fits this layer ({first})"


def _shared(layer: Layer, chosen) -> str:
    """How a price shared with sibling layers (``sparsec.launches.price_shared``) was made."""
    if not chosen.shared_with or not chosen.alone_us:
        return ""
    return (f", as its share of one launch with {', '.join(chosen.shared_with)}; alone "
            f"{_x(layer.dense.predicted_us / chosen.alone_us)}")


def _budget_left(layer: Layer, options) -> float:
    return options.error_budget if layer.budget_left is None else layer.budget_left


def _pct(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100.0 * v:.2g}%" if v < 0.001 else f"{100.0 * v:.2f}%"


def _x(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def recompile_line(entry: dict) -> str:
    """What a recompile at another token count did with a launch predicted slower than dense there
    (a report's ``recompiles`` entry)."""
    M = entry["tokens"]
    them = "them" if len(entry["layers"]) > 1 else "it"
    if entry["runs"] == "dense":
        outcome = (f"so this graph runs {them} dense; to rewrite at this shape, plan with inputs of {M} "
                   "token(s) first (sparsec.optimize, or the first call)")
    else:
        outcome = (f"this graph runs any token count and keeps {them} as planned; to plan for {M} token(s), "
                   "make the first call (or sparsec.optimize's example) that size")
    planned = ", ".join(str(t) for t in entry["planned_tokens"]) or "an unknown count"
    return (f"{', '.join(entry['layers'])}: recompiled for {M} token(s), planned at {planned}; "
            f"{', '.join(entry['formats'])} is predicted {_x(entry['predicted_speedup'])} of dense at M={M} "
            f"on {entry['fingerprint']}, {outcome}")
