"""The options every entry shares (DESIGN.md, "The three user entries"), validated once.

The torch.compile backend, ``sparsec.optimize`` and the CLI all turn what the user gave into one
``Options`` value, so that a misspelt key or an impossible value is refused with a message that
names it before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sparsec.errors import OptionError
from sparsec.formats import STRUCTURED_FAMILIES, family_of

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "none": each layer fitted to the dense model's activations (one shot); "sequential": the chosen
# layers refitted, block after block, to the activations they receive when every earlier block
# already runs its rewrite; "full": and a later stage of a block (a down projection) also makes up
# for the rewritten stage feeding it (sparsec.recovery)
RECOVERY = ("none", "sequential", "full")


@dataclass
class Options:
    fingerprint: Any = "auto"
    error_budget: float = 0.01
    calibration: list | None = None
    heldout: list | None = None
    formats: tuple[str, ...] = STRUCTURED_FAMILIES
    # formats named with their parameters ("lowrank:64", "block:64:0.25"): where a family is named
    # only that way, its candidates are exactly these, not the family's grid
    exact_formats: tuple[str, ...] = ()
    plan: Any = None  # a Plan once parsed
    report: str | None = None
    measure: bool = False
    mode: str = "default"
    lower: bool = True
    strict: bool = False  # raise on any failure instead of falling back to the dense graph
    metric: Any = None  # the quality measure the budget bounds (a sparsec.metrics.Metric once parsed)
    output: str | int | None = None  # which output the metric reads: a name or an index (None: the first)
    recovery: str = "full"
    # the share of error_budget that dropping rarely routed experts may spend (0: never drop one)
    expert_pruning: float = 0.25

    def __post_init__(self):
        if self.metric is None:
            from sparsec.metrics import metric_of

            self.metric = metric_of(None)

    @property
    def cost_mode(self) -> str:
        """Which launch regime the cost model prices: CUDA-graph replay or eager launches.

        The modes are torch.compile's; the two that replay CUDA graphs are priced as graphs.
        """
        return "graph" if self.mode in ("reduce-overhead", "max-autotune") else "eager"


def _exact_format(text: str) -> str:
    """A format named with its parameters, in its canonical spelling; refused here if malformed."""
    from sparsec.formats import FormatError, parse_spec

    try:
        return str(parse_spec(text))
    except FormatError as exc:
        raise OptionError(f"option 'formats' names {text!r}: {exc}") from None


KNOWN = {
    "fingerprint",
    "error_budget",
    "calibration",
    "heldout",
    "formats",
    "plan",
    "report",
    "measure",
    "mode",
    "strict",
    "metric",
    "output",
    "recovery",
    "expert_pruning",
}


def parse_options(options: dict | None = None, *, mode: str | None = None, lower: bool = True, **kwargs) -> Options:
    """Validate user options into an Options value; raise OptionError naming the bad key."""
    merged: dict[str, Any] = dict(options or {})
    for key, value in kwargs.items():
        if key in merged and merged[key] is not value:
            raise OptionError(f"option {key!r} given twice")
        merged[key] = value
    if mode is not None:
        merged.setdefault("mode", mode)
    unknown = sorted(k for k in merged if k not in KNOWN)
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(KNOWN))}")

    out = Options(lower=lower)
    if "fingerprint" in merged:
        fp = merged["fingerprint"]
        if not isinstance(fp, (str, os.PathLike)) and not hasattr(fp, "predict_detail"):
            raise OptionError("option 'fingerprint' must be a shipped name ('h200', 'h100', 'cpu'), a JSON path or 'auto'")
        out.fingerprint = os.fspath(fp) if isinstance(fp, os.PathLike) else fp
    if merged.get("metric") is not None:
        from sparsec.metrics import metric_of

        out.metric = metric_of(merged["metric"])
    if merged.get("output") is not None:
        o = merged["output"]
        if isinstance(o, bool) or not isinstance(o, (str, int)) or (isinstance(o, int) and o < 0) or o == "":
            raise OptionError(f"option 'output' must name an output (e.g. 'logits') or give its index (0, 1, ...); "
                              f"got {o!r}")
        out.output = o
    if "error_budget" in merged:
        b = merged["error_budget"]
        top = out.metric.ceiling
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not (0.0 <= float(b) < top):
            where = "[0, 1), e.g. 0.01 for 1%" if top == 1.0 else "[0, inf), in the metric's own units"
            raise OptionError(f"option 'error_budget' must be a number in {where} for metric {out.metric.name!r}; "
                              f"got {b!r}")
        out.error_budget = float(b)
    for key in ("calibration", "heldout"):
        if merged.get(key) is not None:
            data = merged[key]
            if not isinstance(data, (list, tuple)) or not data:
                raise OptionError(f"option {key!r} must be a non-empty list of model inputs (one tuple of arguments per call)")
            setattr(out, key, [item if isinstance(item, (tuple, list, dict)) else (item,) for item in data])
    if merged.get("formats") is not None:
        fmts = merged["formats"]
        if isinstance(fmts, str):
            fmts = [fmts]
        families, exact, bare = [], [], set()
        for f in fmts:
            fam = family_of(str(f))
            if fam not in STRUCTURED_FAMILIES:
                raise OptionError(f"option 'formats' names {f!r}; allowed: {', '.join(STRUCTURED_FAMILIES)}")
            families.append(fam)
            if str(f) == fam:
                bare.add(fam)
            else:
                exact.append((fam, _exact_format(str(f))))
        out.formats = tuple(dict.fromkeys(families))
        out.exact_formats = tuple(dict.fromkeys(text for fam, text in exact if fam not in bare))
    if merged.get("plan") is not None:
        plan = merged["plan"]
        if not isinstance(plan, (str, os.PathLike, dict)) and not hasattr(plan, "to_dict"):
            raise OptionError("option 'plan' must be a path to a plan JSON file or a plan dict")
        from sparsec.plan import Plan

        out.plan = Plan.coerce(os.fspath(plan) if isinstance(plan, os.PathLike) else plan)  # refused here, before any work
    if merged.get("report") is not None:
        rep = os.fspath(merged["report"])
        if not rep.endswith((".json", ".html")):
            raise OptionError(f"option 'report' must end in .json or .html, got {rep!r}")
        from sparsec.paths import check_writable

        check_writable(rep, OptionError, "report.json")  # before any work, not after the plan
        out.report = rep
    if "measure" in merged:
        out.measure = bool(merged["measure"])
    if "strict" in merged:
        if not isinstance(merged["strict"], bool):
            raise OptionError(f"option 'strict' must be True or False, got {merged['strict']!r}")
        out.strict = merged["strict"]
    if merged.get("recovery") is not None:
        if merged["recovery"] not in RECOVERY:
            raise OptionError(f"option 'recovery' must be one of {', '.join(map(repr, RECOVERY))}; "
                              f"got {merged['recovery']!r}")
        out.recovery = merged["recovery"]
    if merged.get("expert_pruning") is not None:
        share = merged["expert_pruning"]
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise OptionError(f"option 'expert_pruning' must be a number in [0, 1], the share of error_budget that "
                              f"expert rewrites (dropping rarely routed experts, structured experts) may spend (0: none); got {share!r}")
        out.expert_pruning = float(share)
    if merged.get("mode") is not None:
        if merged["mode"] not in MODES:
            raise OptionError(f"mode {merged['mode']!r} not supported; use one of {', '.join(MODES)}")
        out.mode = merged["mode"]
    return out

