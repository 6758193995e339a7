"""Figures derived from a report that the terminal, HTML and diff renderers all show.

Renderers never compute anything themselves: the device-mismatch warning, a rejected
candidate's declared sparsity and speedup, and the error-budget breakdown come from here, so
the terminal and the page cannot disagree. Number formatting lives here for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sparsec.formats import FormatError, parse_spec

DASH = "–"


def fingerprint_label(report) -> str:
    fp = report.fingerprint
    parts = [fp["name"]]
    if fp.get("device"):
        parts.append(f"measured on {fp['device']}")
    if fp.get("hash"):
        parts.append(f"hash {str(fp['hash'])[:12]}")
    return ", ".join(parts)


def device_mismatch(report) -> str | None:
    """A warning when the fingerprint was measured on another device than the model ran on."""
    ran_on = report.get("device")
    measured_on = report.fingerprint.get("device")
    if not ran_on or not measured_on:
        return None
    if _normalise(ran_on) in _BARE_KINDS:
        # Only the kind of device is known ("cpu"): compare kinds, not names.
        if (_normalise(ran_on) == "cpu") != _looks_like_cpu(measured_on):
            return (f"fingerprint {report.fingerprint['name']!r} was measured on {measured_on}, but the "
                    f"model ran on a {ran_on} device: predictions do not hold here")
        return None
    if _normalise(ran_on) == _normalise(measured_on):
        return None
    return (f"fingerprint {report.fingerprint['name']!r} was measured on {measured_on}, but the "
            f"model ran on {ran_on}: predictions may not hold here; run "
            f"'sparsec fingerprint measure' on this device")


def all_warnings(report) -> list[str]:
    """The report's warnings plus the device-mismatch warning if the writer did not add one."""
    warnings = list(report.warnings)
    mismatch = device_mismatch(report)
    ran_on, measured_on = report.get("device"), report.fingerprint.get("device")
    already_said = any(ran_on in w and measured_on in w for w in warnings) if mismatch else True
    if not already_said:
        warnings.insert(0, mismatch)
    return warnings


def is_rewritten(layer: dict) -> bool:
    return layer["format"] != "dense"


def layer_key(layer: dict) -> tuple[int, str]:
    return (layer.get("graph", 0), layer["name"])


def rejected_candidates(layer: dict) -> list[dict]:
    return [c for c in layer["candidates"] if c.get("rejected_because") is not None]


def candidate_sparsity(layer: dict, candidate: dict) -> float | None:
    """Declared sparsity of a candidate: its own field if present, else from its format name."""
    if candidate.get("declared_sparsity") is not None:
        return candidate["declared_sparsity"]
    try:
        n, k = layer["shape"]
        return parse_spec(candidate["format"]).declared_sparsity(n, k)
    except (FormatError, ValueError, ZeroDivisionError):
        return None


def candidate_speedup(layer: dict, candidate: dict) -> float | None:
    """Predicted speedup of a candidate: its own field if present, else dense time over its time."""
    if candidate.get("predicted_speedup") is not None:
        return candidate["predicted_speedup"]
    dense, us = layer.get("predicted_us_dense"), candidate.get("predicted_us")
    if dense is None or not us:
        return None
    return dense / us


def combine_errors(errors) -> float:
    """Relative errors of independent rewrites combined the way the planner budgets them:
    root sum of squares."""
    return math.sqrt(sum(e * e for e in errors))


@dataclass(frozen=True)
class BudgetShare:
    name: str
    format: str
    predicted_error: float | None
    measured_error: float | None
    share: float | None  # of the combined predicted error, in squared terms (shares add to 1)


@dataclass(frozen=True)
class BudgetSpend:
    """How the error budget was spent: per rewritten layer, then end to end."""

    budget: float
    shares: list[BudgetShare]
    predicted_combined: float | None
    measured_error: float | None
    heldout_error: float | None

    def fraction(self, value: float | None) -> float | None:
        """``value`` as a fraction of the budget (both relative L2 errors)."""
        if value is None or self.budget <= 0:
            return None
        return value / self.budget


def budget_spend(report) -> BudgetSpend:
    rewritten = [layer for layer in report.layers if is_rewritten(layer)]
    known = [layer["predicted_error"] for layer in rewritten if layer.get("predicted_error") is not None]
    total_sq = sum(e * e for e in known)
    shares = [BudgetShare(layer["name"], layer["format"], layer.get("predicted_error"), layer.get("measured_error"),
                          None if layer.get("predicted_error") is None or total_sq == 0
                          else layer["predicted_error"] ** 2 / total_sq)
              for layer in rewritten]
    unknown = len(known) < len(rewritten)
    e2e = report.end_to_end
    return BudgetSpend(budget=report["error_budget"], shares=shares,
                       predicted_combined=None if unknown else combine_errors(known),
                       measured_error=e2e.get("measured_error"), heldout_error=e2e.get("heldout_error"))


def planning_line(report) -> str | None:
    """What planning cost, in a sentence: model evaluations, seconds, and the slowest steps."""
    planning = report.get("planning")
    if not planning:
        return None
    timing = planning["timing"]
    one = timing.get("evaluation_s")
    steps = sorted(timing["steps_s"].items(), key=lambda kv: -kv[1])[:3]
    held = planning["heldout_evaluations"]
    by_step = planning.get("evaluations_by_step") or {}
    runs = [(name, n["calibration"]) for name, n in by_step.items() if n["calibration"]]
    where = (f"{runs[0][0]} ran {runs[0][1]}" + "".join(f", {name} {n}" for name, n in runs[1:])) if len(runs) > 1 else ""
    said = "; ".join(part for part in (f"one: {one:.3g} s" if one else "", where) if part)
    return (f"{planning['model_evaluations']} model evaluations on calibration data"
            + (f" and {held} on held-out data" if held else "")
            + (f" ({said})" if said else "")
            + f"; {timing['total_s']:.3g} s in all"
            + (f" ({', '.join(f'{name} {sec:.3g} s' for name, sec in steps)})" if steps else ""))


def recovery_line(report) -> str | None:
    """What recovery did, in a sentence: layers refitted, passes, and what distillation trained."""
    recovery = (report.get("planning") or {}).get("recovery")
    if not recovery:
        return None
    line = (f"{recovery['mode']}: {recovery['refit']} layer(s) refitted, {recovery['kept_one_shot']} kept one shot, "
            f"{recovery['passes']} pass(es) over the calibration data")
    distilled = recovery.get("distillation")
    if distilled and distilled.get("kept_epoch"):
        line += (f"; distilled {distilled['layers']} layer(s) end to end, epoch {distilled['kept_epoch']} of "
                 f"{distilled['epochs']} kept")
        if distilled.get("earlier_runs"):
            earlier = ", ".join(f"{r['travel']:g}" for r in distilled["earlier_runs"])
            line += f" at a travel of {distilled['travel']:g} (after {earlier} kept nothing)"
        if distilled.get("validation_loss"):
            before, after = distilled["validation_loss"]
            line += f" (held-back calibration loss {before:.4g} -> {after:.4g})"
        line += f" in {distilled['seconds']:.3g} s"
    elif distilled and distilled.get("note"):
        line += f"; distillation {distilled['note']}"
    return line


def expert_banks(report) -> list[dict]:
    """Expert banks, each with the implementation measured fastest and every other one's time."""
    return list(report.get("experts") or [])


def bank_line(bank: dict) -> str:
    """One line: the bank, its shape and routing, what it runs and why, which experts it dropped,
    whether its experts run in a structured form."""
    E, I, H = bank["shape"]
    counts = bank.get("tokens_per_expert")
    routing = f"; tokens per expert over {bank['calibration_calls']} calibration call(s): {counts}" if counts else ""
    pruning = bank.get("pruning") or {}
    dropped = f"; {pruning['reason']}" if pruning.get("reason") else ""
    structured = bank.get("expert_format") or {}
    dropped += f"; {structured['reason']}" if structured.get("reason") else ""
    return (f"{bank['name']}: {E} experts of {H} -> {I} -> {H}, top-{bank.get('top_k')}, {bank.get('tokens')} tokens"
            f"{routing}; runs {bank['implementation']}: {bank['reason']}{dropped}")


def skipped(report) -> list[dict]:
    """Weight-bearing ops the pipeline did not consider, each with its reason."""
    return list(report.get("skipped") or [])


# -- number formatting ----------------------------------------------------------------------------
def fmt_speedup(x: Any) -> str:
    if x is None:
        return DASH
    return f"{x:.2g}x" if 0 < x < 0.1 else f"{x:.2f}x"


def fmt_fraction(x: Any) -> str:
    return DASH if x is None else f"{100 * x:.0f}%"


def fmt_error(x: Any) -> str:
    if x is None:
        return DASH
    if x == 0:
        return "0"
    return f"{100 * x:.2f}%" if x >= 1e-4 else f"{x:.1e}"


def fmt_us(x: Any) -> str:
    if x is None:
        return DASH
    return f"{x:,.0f} us" if x >= 100 else f"{x:.1f} us"


def fmt_shape(shape: list[int]) -> str:
    return "x".join(str(v) for v in shape)


def fmt_tokens(x: Any) -> str:
    return DASH if x is None else f"{x:,}"


_BARE_KINDS = ("cpu", "cuda", "gpu", "mps", "xpu")
_ACCELERATOR_WORDS = ("nvidia", "tesla", "geforce", "quadro", "rtx", "radeon", "instinct", "gpu", "cuda")


def _looks_like_cpu(device: str) -> bool:
    name = _normalise(device)
    return not any(word in name for word in _ACCELERATOR_WORDS)


def _normalise(device: str) -> str:
    return " ".join(str(device).casefold().split())
