"""The ``torch.compile(model, backend="sparsec")`` entry.

Dynamo hands the backend one FX subgraph at a time (several when the model has graph breaks).
Each is planned, verified and lowered on its own; the plan and report of one compiled model
accumulate across its subgraphs (appended, never overwritten) in a ``Session`` tied to the
options dict the user passed, and the report file, if asked for, is rewritten after each one.
"""

from __future__ import annotations

import logging

import torch

from sparsec.options import Options, parse_options

log = logging.getLogger("sparsec")


class Session:
    """Everything one compiled model's subgraphs share: options, fingerprint, plan, report."""

    def __init__(self, options: Options, entry: str = "torch.compile"):
        from sparsec.fingerprint import load_fingerprint

        from sparsec.plan import Plan

        self.options = options
        self.entry = entry
        if options.plan is not None:
            options.plan = Plan.coerce(options.plan)
        self.fingerprint = (
            options.fingerprint if hasattr(options.fingerprint, "predict_detail") else load_fingerprint(options.fingerprint)
        )
        self.outcomes = []
        self.plan = None
        self.report = None

    def run_graph(self, gm, example_inputs):
        from sparsec.passes.fx_frontend import FxFrontend
        from sparsec.pipeline import optimize_graph

        graph = len(self.outcomes)
        calibration, warning = calibration_inputs(gm, example_inputs, self.options.calibration)
        heldout, _ = calibration_inputs(gm, example_inputs, self.options.heldout) if self.options.heldout else (None, None)
        frontend = FxFrontend(gm, example_inputs, calibration, heldout if not _fell_back(heldout, example_inputs) else None,
                              graph=graph, entry=self.entry, mode=self.options.mode, inner=self.options.extra.get("_inner", "auto"))
        outcome = optimize_graph(frontend, self.options, self.fingerprint)
        if warning:
            outcome.report["warnings"].append(f"graph {graph}: {warning}")
        mismatch = self.fingerprint.matches_current_device()
        if mismatch and not any(mismatch in w for w in outcome.report["warnings"]):
            outcome.report["warnings"].append(mismatch)
        if self.options.measure and self.options.lower:
            from sparsec.measure import measure_outcome

            measure_outcome(self, outcome, gm, example_inputs)
        self.outcomes.append(outcome)
        self._merge(outcome)
        if self.options.report:
            self.report.save(self.options.report)
        from sparsec.logs import summary_line

        log.info(summary_line(outcome.report))
        return outcome

    def _merge(self, outcome) -> None:
        from sparsec.plan import Plan
        from sparsec.report import Report

        report = Report(_finish(outcome.report))
        self.report = report if self.report is None else self.report.extend(report)
        layers = dict(self.plan.layers) if self.plan is not None else {}
        layers.update(outcome.plan.layers)
        self.plan = Plan(layers=layers, fingerprint=outcome.plan.fingerprint, error_budget=outcome.plan.error_budget)


def _finish(report: dict) -> dict:
    import datetime

    from sparsec import __version__

    report.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    report.setdefault("sparsec_version", __version__)
    return report


def _fell_back(data, example_inputs) -> bool:
    return data is not None and len(data) == 1 and data[0] is example_inputs


def calibration_inputs(gm, example_inputs, items) -> tuple[list[list], str | None]:
    """Full placeholder lists for each calibration item, or the first call's inputs (and why)."""
    if not items:
        return [list(example_inputs)], None
    mapped = _map_items(gm, example_inputs, items)
    if mapped is None:
        return [list(example_inputs)], (
            "calibration inputs could not be matched to this subgraph's inputs (it follows a graph "
            "break); it was calibrated on the inputs of its first call"
        )
    return mapped, None


def _map_items(gm, example_inputs, items):
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        code = tx.f_code
    except Exception:
        return None
    if code.co_name.startswith("torch_dynamo_resume"):
        return None
    argnames = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user = {}
    for i, node in enumerate(placeholders):
        ga = node.meta.get("grapharg")
        name = getattr(getattr(ga, "source", None), "name", None)
        name = name() if callable(name) else name
        if isinstance(name, str) and name.startswith("L['") and name.endswith("']") and name.count("[") == 1:
            user[i] = name[3:-2]
    out = []
    for item in items:
        if isinstance(item, dict):
            values = dict(item)
        else:
            names = argnames[1:] if argnames and argnames[0] == "self" else argnames
            if len(item) > len(names):
                return None
            values = dict(zip(names, item))
        args = list(example_inputs)
        for i, local in user.items():
            if local not in values:
                return None
            v = values[local]
            if isinstance(v, torch.Tensor) and isinstance(args[i], torch.Tensor):
                if v.dim() != args[i].dim() or v.dtype != args[i].dtype:
                    return None
                v = v.to(args[i].device)
            args[i] = v
        out.append(args)
    return out


_SESSIONS: dict[int, tuple[dict, Session]] = {}


def session_for(options: dict | None, mode: str | None) -> Session:
    """One session per options dict object, so a model's subgraphs share it."""
    if options is not None and id(options) in _SESSIONS and _SESSIONS[id(options)][0] is options:
        return _SESSIONS[id(options)][1]
    session = Session(parse_options(options, mode=mode))
    if options is not None:
        _SESSIONS[id(options)] = (options, session)
    return session


def sparsec_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: plan and rewrite this subgraph, hand the dense rest to inductor on CUDA."""
    session = session_for(options, mode)
    outcome = session.run_graph(gm, example_inputs)
    if outcome.lowered is None:
        return gm.forward
    return outcome.lowered

