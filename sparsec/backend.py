"""The ``torch.compile(model, backend="sparsec")`` entry.

Dynamo hands the backend one FX subgraph at a time (several when the model has graph breaks).
Each is planned, verified and lowered on its own; the plan and report of one compiled model
accumulate across its subgraphs (appended, never overwritten) in a ``Session`` tied to the
options dict the user passed, and the report file, if asked for, is rewritten after each one.

When Dynamo recompiles a graph it has already handed over (new input shapes, a failed guard),
the session lowers it again with the packed layers it built the first time: no second plan, no
second share of the error budget, no duplicate rows in the report, and the same numerics at
every shape.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import weakref
from typing import NamedTuple

import torch

from sparsec.options import Options, parse_options


class Session:
    """Everything one compiled model's subgraphs share: options, fingerprint, plan, report."""

    def __init__(self, options: Options, entry: str = "torch.compile"):
        from sparsec.fingerprint import load_fingerprint

        self.options = options
        self.entry = entry
        self.fingerprint = (
            options.fingerprint if hasattr(options.fingerprint, "predict_detail") else load_fingerprint(options.fingerprint)
        )
        self.graph_errors: list[float] = []  # measured error of each subgraph planned so far
        # "calibration"/"heldout" -> item index -> per subgraph, the graph traced for that item's
        # shapes with its inputs (``Traced``), for items of other shapes than the first call's
        self.traced: dict[str, dict[int, list]] = {}
        self.plan = None
        self.report = None
        # the tensor the user's model returns under the name option 'output' gives (sparsec.optimize
        # runs the model once to find it; a Dynamo subgraph's outputs have no names)
        self.output_probe = None
        self._seen: set[str] = set()  # names of the layers of every graph planned so far
        # id of each of the model's parameters and buffers -> its qualified name, where the entry
        # knows the model (sparsec.optimize): graphs resumed after a graph break then name layers
        # as the model does
        self.names: dict[int, str] = {}
        self.positional_names: list[str] | None = None  # the model's forward parameters, for sparsec.optimize's entry
        # site name -> what was built for it (``Built``): the compiled graphs own the packed layers,
        # the session only finds them again while some compiled graph still holds them
        self._built: dict[str, Built] = {}

    def compile_graph(self, gm, example_inputs, *, raise_user_errors: bool = False):
        """``run_graph``, or the dense graph when it fails and the options are not strict.

        Whatever state the graph writes in place while it is planned (batch-norm statistics in
        training mode, caches, inputs) is put back as it was (``sparsec.state``). A failure in any
        step falls back to the graph as traced (inductor on CUDA, plain torch on the CPU): one warning
        names the step and the cause, and the report records it under ``fallbacks``. With
        ``strict`` it is raised instead; ``raise_user_errors`` raises errors about the user's own
        input (``SparsecError``: a bad plan, inputs that do not fit) even when not strict.
        """
        from sparsec.errors import SparsecError
        from sparsec.passes.interpret_fx import name_positional_inputs
        from sparsec.state import state_kept

        name_positional_inputs(gm, self.positional_names)

        with state_kept(gm, example_inputs):
            try:
                lowered = self.run_graph(gm, example_inputs)
            except Exception as exc:  # noqa: BLE001 - a compile must not break on sparsec's account
                if self.options.strict or (raise_user_errors and isinstance(exc, SparsecError)):
                    raise
                return self.fall_back(gm, example_inputs, exc)
        return gm.forward if lowered is None else lowered

    def fall_back(self, gm, example_inputs, exc: BaseException):
        """The dense graph for a subgraph sparsec could not plan, with the failure on record."""
        from sparsec.passes.fx_frontend import FxFrontend
        from sparsec.pipeline import fallback_report

        graph = len(self.graph_errors)
        self.graph_errors.append(0.0)
        message = fallback_message(graph, exc)
        warn_fallback(message)
        frontend = FxFrontend(gm, example_inputs, [], graph=graph, entry=self.entry, mode=self.options.mode)
        try:
            report = fallback_report(frontend, self.fingerprint, self.options, exc, message)
            from sparsec.report import Report

            merged = Report(report)
            self.report = merged if self.report is None else self.report.extend(merged)
            if self.plan is None:
                from sparsec.plan import Plan

                self.plan = Plan(layers={}, fingerprint=self.fingerprint.name, error_budget=self.options.error_budget)
            if self.options.report:
                self.report.save(self.options.report)
        except Exception as again:  # noqa: BLE001 - the record is best effort; the dense graph is what counts
            warn_fallback(f"graph {graph}: the failure could not be recorded in the report ({type(again).__name__}: {again})")
        from sparsec.passes.fx_frontend import dense_graph

        return dense_graph(gm, example_inputs, self.options.mode)

    def run_graph(self, gm, example_inputs):
        """Plan, verify and lower one subgraph; return its compiled callable (None with lower=False)."""
        from sparsec.passes.capture_fx import concrete_inputs
        from sparsec.passes.fx_frontend import FxFrontend
        from sparsec.pipeline import optimize_graph, step

        graph = len(self.graph_errors)
        if self.options.lower and self._built:
            # a recompile (new shapes, grad mode) of a graph already planned needs no calibration:
            # its calibration items were mapped to the graph it was planned as
            again = FxFrontend(gm, example_inputs, [concrete_inputs(example_inputs)], graph=graph, entry=self.entry,
                               mode=self.options.mode, names=self.names)
            with step("lower"):
                lowered = self._lower_again(again)
            if lowered is not None:
                return lowered
        with step("calibrate"):
            calibration, warning = calibration_inputs(gm, example_inputs, self.options.calibration,
                                                      self.traced.get("calibration"), graph)
            heldout = _map_items(gm, example_inputs, self.options.heldout, what="heldout",
                                 traced=self.traced.get("heldout"), graph=graph) if self.options.heldout else None
        if self.options.heldout and heldout is None:
            warning = (warning + "; " if warning else "") + "held-out inputs could not be matched to this subgraph's inputs"
        frontend = FxFrontend(gm, example_inputs, calibration, heldout, graph=graph, entry=self.entry,
                              mode=self.options.mode, warnings=[f"graph {graph}: {warning}"] if warning else [],
                              earlier_names=frozenset(self._seen), names=self.names, metric=self.options.metric,
                              output=self._output())
        outcome = optimize_graph(frontend, self.options, self.fingerprint, budget=self._budget_left())
        self._seen.update(l.name for l in outcome.layers)
        self._seen.update(s.name for s in outcome.skipped)
        if self.options.lower:
            for layer in outcome.layers:
                module = frontend.modules.get(layer.name)
                self._built[layer.name] = Built(_weight_identity(layer.site.weight),
                                                None if module is None else weakref.ref(module),
                                                layer.chosen.fmt if layer.chosen is not None else "dense", layer.tokens)
            if frontend.modules:
                outcome.lowered = _holding(outcome.lowered, frontend.modules)
        if frontend.modules or (self.entry == "optimize" and outcome.layers):
            # sparsec.optimize plans every layer of the model: a frame resumed after a graph break
            # inside a repeated block must be traced (and planned) again for each block's weights,
            # not handed the first block's graph
            _guard_weight_identity(gm, example_inputs)
        for layer in outcome.layers:
            layer.release()
        self.graph_errors.append(outcome.report["end_to_end"]["measured_error"] or 0.0)
        self._merge(outcome)  # the session keeps the plan and report, not the layers or their weights
        if self.options.report:
            with step("report"):
                self.report.save(self.options.report)
        from sparsec.logs import log_report

        log_report(outcome.report)
        return outcome.lowered

    def _output(self):
        """Which graph output the metric reads: an index, the named output's tensor, the first float
        tensor the model returns (``FirstReturned``, where the entry ran the model), or None."""
        output = self.options.output
        if output is None and self.output_probe is not None:
            from sparsec.passes.fx_frontend import FirstReturned

            return FirstReturned(self.output_probe)
        if not isinstance(output, str):
            return output
        if self.output_probe is None:
            from sparsec.errors import OptionError

            raise OptionError(f"option 'output' names {output!r}, but a graph compiled by torch.compile has no output "
                              "names: give the output's index among the graph's float outputs (0 is the first), or "
                              "use sparsec.optimize(model, ...), which finds the name in what the model returns")
        return self.output_probe

    def _lower_again(self, frontend):
        """A recompile of a graph already planned: its sites, from the same weights, are all built."""
        from sparsec.pipeline import step

        with step("capture"):
            sites, _ = frontend.capture()
        if not sites:
            return None
        modules = {}
        for site in sites:
            built = self._built.get(site.name)
            if built is None or built.identity != _weight_identity(site.weight):
                return None
            if built.module is not None:
                module = built.module()
                if module is None:  # every graph that held it is gone: plan afresh
                    return None
                modules[site.name] = module
        from sparsec.logs import logger

        logger.info("recompiled graph with %d planned layers: lowered again with the packed layers already built", len(sites))
        changed = self._slower_here(sites, modules)
        if changed:
            from sparsec.reasons import recompile_line

            for entry in changed:
                logger.info(recompile_line(entry))
            if self.report is not None:
                self.report.add_recompiles(changed)
                if self.options.report:
                    self.report.save(self.options.report)
        if modules:
            _guard_weight_identity(frontend.gm, frontend.example_inputs)
        return _holding(frontend.lower_modules(modules), modules)

    def _slower_here(self, sites, modules: dict) -> list[dict]:
        """Where a recompile runs planned layers at another token count than they were planned at
        (a generation loop's one-token steps after its prompt), the launches the fingerprint predicts
        slower than dense there run dense, on the model's own weights, which it still holds (the
        error can only shrink); they are taken out of ``modules``. One report entry per such launch.

        A graph that runs at any token count (a dynamic dimension, as Dynamo makes it on a second
        shape) keeps its plan: the line then gives the prediction at the count it was traced with.
        A stacked launch (layers reading one input in one launch) is weighed as one: its members'
        predicted times summed, each priced alone."""
        from sparsec.codegen import GroupMember

        by_launch: dict[int, list] = {}
        for site in sites:
            if site.name in modules:
                module = modules[site.name]
                key = id(module.group) if isinstance(module, GroupMember) else id(module)
                by_launch.setdefault(key, []).append(site)
        fp, mode, changed = self.fingerprint, self.options.cost_mode, []
        for members in by_launch.values():
            planned = {self._built[s.name].tokens for s in members}
            tokens = {s.tokens for s in members}
            if len(tokens) != 1 or None in tokens or tokens == planned:
                continue
            (M,) = tokens
            dense = fmt = 0.0
            for site in members:
                chosen = self._built[site.name].format
                if fp.can_predict(chosen, site.dtype_name, mode) or fp.can_predict("dense", site.dtype_name, mode):
                    break  # not priced for this dtype or mode: the plan stands
                dense += fp.predict_detail("dense", M, site.N, site.K, dtype=site.dtype_name, mode=mode).us
                fmt += fp.predict_detail(chosen, M, site.N, site.K, dtype=site.dtype_name, mode=mode).us
            else:
                if fmt < dense:
                    continue
                dynamic = any(s.tokens_vary for s in members)
                if not dynamic:
                    for site in members:
                        del modules[site.name]
                changed.append({"layers": [s.name for s in members],
                                "formats": sorted({self._built[s.name].format for s in members}),
                                "tokens": M, "planned_tokens": sorted(t for t in planned if t is not None),
                                "dynamic": dynamic, "predicted_speedup": dense / fmt, "fingerprint": fp.name,
                                "runs": "as planned" if dynamic else "dense"})
        return changed

    def _budget_left(self) -> float:
        """The budget left after the subgraphs already planned, so the whole model stays within it
        (errors add in quadrature on the planner's scale, ``Metric.to_error``)."""
        metric = self.options.metric
        spent = sum(metric.to_error(e) ** 2 for e in self.graph_errors)
        return metric.from_error(math.sqrt(max(metric.to_error(self.options.error_budget) ** 2 - spent, 0.0)))

    def _merge(self, outcome) -> None:
        from sparsec.plan import Plan
        from sparsec.report import Report

        report = Report(outcome.report)
        self.report = report if self.report is None else self.report.extend(report)
        layers = dict(self.plan.layers) if self.plan is not None else {}
        layers.update(outcome.plan.layers)
        experts = dict(self.plan.experts) if self.plan is not None else {}
        experts.update(outcome.plan.experts)
        self.plan = Plan(layers=layers, fingerprint=outcome.plan.fingerprint, error_budget=outcome.plan.error_budget,
                         experts=experts)


def fallback_message(graph: int, exc: BaseException,
                     outcome: str = "this graph runs dense, as traced (inductor on CUDA, plain torch on the CPU). "
                                    "Pass the option strict=True to raise instead") -> str:
    """One line: which step failed on which graph, why, and what happens instead."""
    from sparsec.errors import first_line
    from sparsec.pipeline import failed_step

    cause = first_line(exc)
    return (f"graph {graph}: sparsec's {failed_step(exc)} step failed "
            f"({type(exc).__name__}{': ' + cause if cause else ''}); {outcome}")


class FallbackWarning(UserWarning):
    """sparsec could not rewrite a graph and runs it dense; the message says which step failed and why."""


def warn_fallback(message: str) -> None:
    import warnings

    from sparsec.logs import logger

    logger.warning("%s", message)
    warnings.warn(f"sparsec: {message}", FallbackWarning, stacklevel=2)


class Built(NamedTuple):
    """What a session built for one planned site."""

    identity: tuple  # of the weight it was built from (``_weight_identity``)
    module: object  # a weak reference to its packed linear, None if dense
    format: str  # the format chosen
    tokens: int | None  # the token count it was planned (priced) at


def _holding(fn, modules: dict):
    """``fn`` keeping ``modules`` alive for as long as Dynamo keeps ``fn`` (inductor keeps their tensors only)."""
    try:
        fn._sparsec_packed = tuple(modules.values())
        return fn
    except AttributeError:
        class Holding:
            def __init__(self):
                self._sparsec_packed = tuple(modules.values())
                self._boxed_call = getattr(fn, "_boxed_call", False)

            def __call__(self, *args):
                return fn(*args)

        return Holding()


def _weight_identity(w: torch.Tensor) -> tuple:
    """Where a weight lives and its in-place version: equal only for the same, unmodified tensor."""
    return (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device, w._version)


def _guard_weight_identity(gm, example_inputs) -> None:
    """Make Dynamo reuse this compiled graph only with these very weight tensors.

    Dynamo passes parameters as graph inputs and may hand a compiled graph another module
    instance of the same class; a graph with packed weights baked in would then silently run the
    first model's weights. An identity guard on each parameter input makes such a call recompile
    (and be planned for its own weights), as inductor's freezing does.
    """
    from torch._guards import TracingContext

    from sparsec.passes.capture_fx import parameter_sources

    context = TracingContext.try_get()
    if context is None:
        return
    from torch._dynamo.guards import GuardBuilder

    for source in parameter_sources(gm, example_inputs):
        context.guards_context.dynamo_guards.add(source.make_guard(GuardBuilder.ID_MATCH))


def calibration_inputs(gm, example_inputs, items, traced=None, graph: int = 0) -> tuple[list, str | None]:
    """Full placeholder lists for each calibration item, or the first call's inputs (and why)."""
    from sparsec.passes.capture_fx import concrete_inputs

    if not items:
        return [concrete_inputs(example_inputs)], None
    mapped = _map_items(gm, example_inputs, items, traced=traced, graph=graph)
    if mapped is None:
        return [concrete_inputs(example_inputs)], (
            "calibration inputs could not be matched to this subgraph's inputs (it follows a graph "
            "break); it was calibrated on the inputs of its first call"
        )
    return mapped, None


@dataclasses.dataclass
class InputSlots:
    """Where a graph takes the user's inputs: placeholder index -> ("pos", i) or ("name", key),
    and the traced frame's argument names (to read positional items by name)."""

    wanted: dict
    argnames: list
    sources: list    # per placeholder, Dynamo's source name (None if none)
    fixed: list      # per placeholder, the dimensions the graph fixes (None where dynamic); None if not a tensor

    @classmethod
    def of(cls, gm) -> "InputSlots | None":
        """Dynamo names a graph input by where it came from in the traced frame: ``L['args'][0]``
        and ``L['kwargs']['mask']`` when the module's call wrapper is traced, ``L['x']`` for a
        plain function's argument. A resumed frame (after a graph break) takes intermediate
        values, which model-level inputs cannot supply: None."""
        try:
            from torch._dynamo.symbolic_convert import InstructionTranslator

            code = InstructionTranslator.current_tx().f_code
        except Exception:
            return None
        if code.co_name.startswith("torch_dynamo_resume"):
            return None
        argnames = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
        if argnames and argnames[0] == "self":
            argnames = argnames[1:]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        wanted: dict[int, tuple] = {}
        for i, node in enumerate(placeholders):
            name = _source(node)
            if name is None:
                continue
            m = re.fullmatch(r"L\['args'\]\[(\d+)\]", name)
            if m:
                wanted[i] = ("pos", int(m.group(1)))
                continue
            m = re.fullmatch(r"L\['kwargs'\]\['([^']+)'\]", name) or re.fullmatch(r"L\['([^']+)'\]", name)
            if m and m.group(1) not in ("self", "fn"):
                wanted[i] = ("name", m.group(1))
        return cls(wanted, argnames, [_source(n) for n in placeholders], [_traced_shape(n) for n in placeholders])

    def fill(self, gm, example_inputs, item, index: int, what: str) -> list:
        """The graph's inputs for one item: its values at the user-input placeholders, sizes of
        dynamic dimensions read from them. Raises ModelError when a value cannot go there, or
        returns None when the item lacks a value the graph takes (the graph is not the model's)."""
        from sparsec.errors import ModelError
        from sparsec.passes.capture_fx import concrete_inputs

        positional = list(item) if isinstance(item, (tuple, list)) else []
        named = dict(item) if isinstance(item, dict) else dict(zip(self.argnames, positional))
        args = concrete_inputs(example_inputs)
        filled: dict[str, torch.Tensor] = {}
        for i, (kind, key) in self.wanted.items():
            if kind == "pos":
                if key >= len(positional):
                    return None
                v = positional[key]
            elif key in named:
                v = named[key]
            else:
                return None
            if isinstance(args[i], torch.Tensor):
                label = f"{what} item {index}, input {key if kind == 'name' else f'#{key}'}"
                if not isinstance(v, torch.Tensor):
                    raise ModelError(f"{label} is a {type(v).__name__}, but the model takes a tensor there")
                if v.dtype != args[i].dtype:
                    raise ModelError(f"{label} has dtype {v.dtype}, but the model was traced with {args[i].dtype} "
                                     f"there; pass {what} inputs of the example's dtypes")
                fixed = self.fixed[i] if self.fixed[i] is not None else tuple(args[i].shape)
                if v.dim() != len(fixed) or any(f is not None and f != n for f, n in zip(fixed, v.shape)):
                    shown = "(" + ", ".join("any" if f is None else str(f) for f in fixed) + ")"
                    raise ShapeMismatch(f"{label} has shape {tuple(v.shape)}, but this graph was traced for "
                                        f"{shown}")
                v = v.to(args[i].device)
                filled[self.sources[i] or ""] = v
            args[i] = v
        for i, source in enumerate(self.sources):  # sizes of dynamic dimensions, read from the new inputs
            m = re.fullmatch(r"(.+)\.size\(\)\[(\d+)\]", source or "")
            if m and m.group(1) in filled and not isinstance(args[i], torch.Tensor):
                args[i] = int(filled[m.group(1)].shape[int(m.group(2))])
        return args


class ShapeMismatch(Exception):
    """An input whose shape the graph was not traced for (``sparsec.optimize`` traces it anew)."""


def _traced_shape(node) -> tuple | None:
    """The dimensions a placeholder fixes: an int where the graph was specialised, None where dynamic."""
    shape = getattr(node.meta.get("example_value"), "shape", None)
    return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)


def _map_items(gm, example_inputs, items, *, what: str = "calibration", traced=None, graph: int = 0):
    """Each item's values placed at this graph's user-input placeholders, or None when this graph
    cannot take model-level inputs (it follows a graph break).

    An item of other shapes than the graph was traced for runs through the graph ``traced``
    holds for it (``sparsec.optimize`` traces one per shape); without one it is refused, naming
    the shape needed."""
    from sparsec.errors import ModelError

    slots = InputSlots.of(gm)
    if slots is None:
        return None
    out = []
    for index, item in enumerate(items):
        try:
            args = slots.fill(gm, example_inputs, item, index, what)
        except ShapeMismatch as exc:
            run = (traced or {}).get(index)
            if run is None or graph >= len(run):
                raise ModelError(
                    f"{exc}. torch.compile specialises a graph to the shapes of its first call, so its "
                    f"{what} inputs must have those shapes (or be dynamic there: torch.compile(..., dynamic=True) "
                    f"with inputs of more than one element along the dimension); sparsec.optimize(model, "
                    f"example, {what}=[...]) takes {what} inputs of any shape the model accepts") from None
            args = run[graph]
        if args is None:
            return None
        out.append(args)
    return out


def _source(node) -> str | None:
    ga = node.meta.get("grapharg")
    name = getattr(getattr(ga, "source", None), "name", None)
    name = name() if callable(name) else name
    return name if isinstance(name, str) else None


# id of an options dict -> (that dict, its session); the most recently used SESSIONS_KEPT only, so
# that users' options (calibration tensors among them) do not outlive them without bound. A graph
# compiled for an options dict no longer here is planned in a session of its own.
SESSIONS_KEPT = 32
_SESSIONS: "collections.OrderedDict[int, tuple[dict, Session]]" = collections.OrderedDict()


def session_for(options: dict | None, mode: str | None) -> Session:
    """One session per options dict object, so a model's subgraphs share it."""
    if options is not None and id(options) in _SESSIONS and _SESSIONS[id(options)][0] is options:
        _SESSIONS.move_to_end(id(options))
        return _SESSIONS[id(options)][1]
    session = Session(parse_options(options, mode=mode))
    if options is not None:
        _SESSIONS[id(options)] = (options, session)
        while len(_SESSIONS) > SESSIONS_KEPT:
            _SESSIONS.popitem(last=False)
    return session


def sparsec_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """Dynamo backend: plan and rewrite this subgraph, hand the dense rest to inductor on CUDA.

    It never breaks the user's compile: whatever fails (options included) leaves the graph dense
    with one warning, unless the options say ``strict``."""
    from sparsec.pipeline import step

    try:
        with step("options"):
            session = session_for(options, mode)
    except Exception as exc:  # noqa: BLE001 - bad options or fingerprint: the compile still runs, dense
        if isinstance(options, dict) and options.get("strict"):
            raise
        warn_fallback(fallback_message(0, exc))
        from sparsec.passes.fx_frontend import dense_graph

        return dense_graph(gm, example_inputs, mode)
    return session.compile_graph(gm, example_inputs)


def _reset() -> None:
    """What ``torch._dynamo.reset()`` asks of a backend: drop the CUDA graphs recorded for the graphs
    it compiled (``mode="reduce-overhead"``), as inductor's own entry does, so their memory pools
    go with them rather than outliving every compiled model."""
    import sys

    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is not None:  # never imported: nothing was recorded
        trees.reset_cudagraph_trees()


sparsec_backend.reset = _reset
