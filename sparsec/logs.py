"""sparsec's logging: silent by default, one line per compiled graph when asked, more for debug.

Everything sparsec says goes through the ``sparsec`` logger (and its children). A library must
not print on its own, so the logger carries a ``NullHandler``: with Python's default logging
setup nothing appears, not even warnings (they are in the report). Two ways to see it:

- ``SPARSEC_LOG=info`` (or ``debug``, ``warning``, ``error``) in the environment: sparsec writes
  its own records at that level and above to stderr, through a handler of its own, and stops
  passing them to the root logger so nothing is printed twice.
- An application's own logging setup: ``logging.getLogger("sparsec").setLevel(logging.INFO)``
  and sparsec's records reach the application's handlers like any other library's.

At INFO, ``log_report`` writes ``summary_line`` once per compiled graph; at DEBUG it adds one
line per layer and the report's warnings.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from typing import Any, Iterable

LOGGER_NAME = "sparsec"
ENV_VAR = "SPARSEC_LOG"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_OFF = {"", "0", "off", "none", "false"}

logger = logging.getLogger(LOGGER_NAME)


class _EnvHandler(logging.StreamHandler):
    """The stderr handler installed for ``SPARSEC_LOG``; a class of its own so it is found again."""


def configure_from_env(environ: dict | None = None) -> int | None:
    """Apply ``SPARSEC_LOG``; return the level set, or None when logging stays off.

    Called once when this module is imported; calling it again (tests, a changed environment)
    replaces the previous setting instead of adding a second handler.
    """
    env = os.environ if environ is None else environ
    for handler in [h for h in logger.handlers if isinstance(h, _EnvHandler)]:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)  # undo what the previous call set, nothing else
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    value = env.get(ENV_VAR, "").strip().lower()
    if value in _OFF:
        logger.propagate = True
        return None
    level = _LEVELS.get(value)
    if level is None:
        known = ", ".join(_LEVELS)
        print(f"sparsec: {ENV_VAR}={value!r} is not a level; use one of {known} (logging stays off)",
              file=sys.stderr)
        return None
    handler = _EnvHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return level


def summary_line(report_or_layers: Any) -> str:
    """One line about one compiled graph (or a whole report): layers, formats, speed, error.

    Accepts a ``Report``, a report dict (checked only for the fields it reads) or a list of
    layer dicts.
    """
    data = report_or_layers.to_dict() if hasattr(report_or_layers, "to_dict") else report_or_layers
    if isinstance(data, dict):
        layers = data.get("layers", [])
    elif isinstance(data, (list, tuple)):
        layers, data = list(data), {}
    else:
        raise TypeError(f"summary_line takes a report or a list of layers, got {type(data).__name__}")
    parts = [f"{_graphs(layers)}{_rewritten(layers)}"]
    totals = data.get("totals") or {}
    dense = totals.get("predicted_us_dense", _sum(x.get("predicted_us_dense") for x in layers))
    pred = totals.get("predicted_us", _sum(x.get("predicted_us") for x in layers))
    e2e = data.get("end_to_end") or {}
    if dense is not None and pred:
        linear = f"{dense / pred:.2f}x on linear layers alone ({dense:,.1f} -> {pred:,.1f} us)"
        if e2e.get("predicted_speedup") is not None and e2e.get("predicted_us_rest") is not None:
            parts.append(f"predicted {e2e['predicted_speedup']:.2f}x end to end ({linear})")
        elif e2e.get("predicted_speedup") is not None:
            parts.append(f"predicted {linear}; the rest of the graph unpriced")
        else:
            parts.append(f"predicted {linear}")
    if e2e.get("measured_speedup") is not None:
        slower = e2e["measured_speedup"] < 1.0 and (totals.get("rewritten") or 0) > 0
        parts.append(f"measured {e2e['measured_speedup']:.2f}x end to end" + (": SLOWER than the original" if slower else ""))
    if e2e.get("measured_error") is not None and data.get("error_budget") is not None:
        parts.append(_error_part(e2e, data["error_budget"]))
    fingerprint = (data.get("fingerprint") or {}).get("name")
    if fingerprint:
        parts.append(f"fingerprint {fingerprint}")
    warnings = data.get("warnings") or []
    if warnings:
        parts.append(f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}")
    return "; ".join(parts)


def _error_part(e2e: dict, budget: float) -> str:
    """The measured error, saying which data it was measured on and how far to trust it."""
    measured = _pct(e2e["measured_error"])
    if e2e.get("heldout_error") is not None:
        text = f"error {measured} on calibration, {_pct(e2e['heldout_error'])} held out, of {_pct(budget)} budget"
    else:
        text = (f"error {measured} of {_pct(budget)} budget on calibration data only (new inputs can show "
                "several times more; pass held-out data to bound it there)")
    made_up = e2e.get("calibration")
    if made_up == "generated-ids":
        text += " — calibrated on made-up token ids, so the error figure means little: pass real inputs"
    elif made_up == "generated":
        text += " — calibrated on made-up inputs: pass real ones"
    return text


def log_report(report_or_dict: Any, log: logging.Logger | None = None) -> None:
    """Log one compiled graph's report: the summary at INFO, layers and warnings at DEBUG."""
    log = log or logger
    if log.isEnabledFor(logging.INFO):
        log.info("%s", summary_line(report_or_dict))
    if not log.isEnabledFor(logging.DEBUG):
        return
    data = report_or_dict.to_dict() if hasattr(report_or_dict, "to_dict") else report_or_dict
    for layer in data.get("layers", []):
        log.debug("  %s [%s]: %s — %s", layer.get("name"), "x".join(map(str, layer.get("shape", []))),
                  layer.get("format"), layer.get("reason"))
    for warning in data.get("warnings", []):
        log.debug("  warning: %s", warning)


def _graphs(layers: list[dict]) -> str:
    graphs = sorted({x.get("graph") for x in layers if x.get("graph") is not None})
    if not graphs:
        return ""
    if len(graphs) == 1:
        return f"graph {graphs[0]}: "
    return f"graphs {graphs[0]}-{graphs[-1]}: "


def _rewritten(layers: list[dict]) -> str:
    formats = Counter(x.get("format") for x in layers if x.get("format") not in (None, "dense"))
    count = sum(formats.values())
    text = f"{count} of {len(layers)} linear layer{'s' if len(layers) != 1 else ''} rewritten"
    if formats:
        text += " (" + ", ".join(f"{fmt} x{n}" for fmt, n in formats.most_common()) + ")"
    return text


def _sum(values: Iterable[Any]) -> float | None:
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


configure_from_env()
