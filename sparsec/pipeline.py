"""The pass order, as one flat function of named steps (DESIGN.md, "The pipeline").

    capture -> experts -> calibrate -> candidates -> cost -> approximate -> select -> verify -> deferred
      -> [measure] -> recover -> replan -> lower -> check -> report

The pipeline knows neither FX nor ONNX. A front-end supplies the graph-specific parts through
the small ``Frontend`` protocol: what the sites are, their calibration statistics, the end-to-end
error of a set of weight replacements, how to time a layer and lower the chosen formats with its
own runtime, how the lowered graph runs there (``check``), and what only it can say about the
graph (``notes``, ``describe``). The report is built once, at the end, from what the steps
returned; the entries only hand it on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sparsec.candidates import Candidate, Layer
from sparsec.fingerprint.device import free_memory_bytes
from sparsec.formats import Dense, family_of, parse_spec
from sparsec.launches import LaunchGroup, price_groups, price_shared, settle_shared, transposed_output_us
from sparsec.options import Options
from sparsec.plan import Plan
from sparsec.rest import RestOfGraph, price_rest, price_rest_by_kind
from sparsec.sites import Site, SiteStats, Skipped, output_energy, relative_output_error

log = logging.getLogger("sparsec")


class Frontend(Protocol):
    entry: str
    graph: int
    warnings: list[str]  # what the entry found before planning (inputs, executor), for the report
    kept_as: str  # what runs when the rewritten graph is not used ("original model was written unchanged")

    def capture(self) -> tuple[list[Site], list[Skipped]]: ...

    def calibrate(self, sites: list[Site]) -> dict[str, SiteStats]: ...

    def evaluate(self, replacements: dict[str, torch.Tensor], heldout: bool = False,
                 per_layer: bool = True, calls: int | None = None) -> tuple[float, dict[str, float]]: ...

    def calibration_calls(self) -> int: ...

    def has_heldout(self) -> bool: ...

    def rest_of_graph(self, fused: bool = False) -> RestOfGraph | None: ...

    def launch_groups(self) -> list[LaunchGroup]: ...

    def time_layer(self, layer: Layer, cand: Candidate, options: Options) -> tuple[float, float]: ...

    def lowering_notes(self) -> list[str]: ...

    def lower(self, layers: list[Layer]) -> Any: ...

    def device_name(self) -> str: ...

    def check(self, lowered: Any, layers: list[Layer], options: Options) -> "Check": ...

    def notes(self, layers: list[Layer], skipped: list[Skipped], options: Options, fingerprint) -> list[str]: ...

    def describe(self) -> dict: ...


@dataclass
class Check:
    """How the lowered graph ran in the front-end's own runtime (``Frontend.check``); None: not run."""

    measured_error: float | None = None  # the lowered graph's, on calibration data
    heldout_error: float | None = None
    measured_us: float | None = None  # end to end, rewritten
    measured_us_dense: float | None = None  # end to end, the original graph, same runtime and process
    measured_us_rest: float | None = None  # the original with its layers' work taken out, where measured
    timing: str | None = None  # how
    end_to_end: dict = field(default_factory=dict)  # further facts for the report's end_to_end
    warnings: list[str] = field(default_factory=list)
    alarm: str | None = None  # a warning that leads the report; "{predicted}" in it: the predicted speed-up

    @property
    def speedup(self) -> float | None:
        return _ratio(self.measured_us_dense, self.measured_us)


@dataclass
class Outcome:
    layers: list[Layer]
    skipped: list[Skipped]
    plan: Plan
    report: dict
    lowered: Any = None


def optimize_graph(frontend: Frontend, options: Options, fingerprint, budget: float | None = None) -> Outcome:
    """Plan, verify, lower, check and report one graph.

    ``budget``: the share of ``options.error_budget`` this graph may spend (what earlier,
    separately compiled graphs of the same model left). An exception escaping a step carries the
    step's name (``failed_step``), so that an entry falling back to the dense graph can say where
    planning broke. However it ends, the approximations planning held beyond the resting bound
    are let go."""
    try:
        return _optimize_graph(frontend, options, fingerprint, budget)
    finally:
        _APPROXIMATIONS.release()


def _optimize_graph(frontend: Frontend, options: Options, fingerprint, budget: float | None) -> Outcome:
    planning, checking, shared = _graph_options(frontend, options, budget)
    timed = StepClock()
    with timed("capture"):
        sites, skipped = capture(frontend)
    with timed("experts"):
        banks, left = experts(frontend, fingerprint, planning)
        skipped = skipped + left
    with timed("calibrate"):
        stats, facts = calibrate(frontend, sites)
    with timed("candidates"):
        layers = candidates(sites, stats, planning, planning.plan)
        drop_unread_rows(layers)
    warnings = list(getattr(frontend, "warnings", [])) + calibration_warnings(facts, layers) + shared
    with timed("cost"):
        cost(layers, fingerprint, planning)
    with timed("approximate", total=len(layers)):
        approximate(layers, planning, defer=True)
    with timed("select"):
        alloc = select(layers, planning, fingerprint)
    with timed("verify", shown_as="verify (model evaluations)"):
        e2e = verify(frontend, layers, alloc, planning)
        timed.evaluated("verify", e2e)
    with timed("deferred", shown_as="deferred (multi-step fits where the measured sensitivities leave room)"):
        alloc, e2e = fit_deferred(frontend, layers, planning, fingerprint, alloc, e2e)
        timed.evaluated("deferred", e2e)
    with timed("measure"):
        while settle(layers, alloc, fingerprint, planning) or measure(frontend, layers, alloc, planning):
            e2e = verify(frontend, layers, alloc, planning, before=e2e)
        timed.evaluated("measure", e2e)
    with timed("recover", shown_as="recover (passes over the calibration data: per block, then per epoch)"):
        one_shot = e2e
        recovery, e2e = recover(frontend, layers, planning, e2e)
        timed.evaluated("recover", e2e)
    with timed("replan", shown_as="replan (spend what the plan left of the budget)"):
        alloc, e2e, recovery, replans = replan(frontend, layers, planning, fingerprint, alloc, recovery, one_shot, e2e)
        timed.evaluated("replan", e2e)
    with timed("lower"):
        lowered = lower(frontend, layers) if planning.lower else None
    with timed("check", shown_as="check (run and time the rewritten graph)"):
        checked, kept = check(frontend, layers, lowered, checking)
        if kept is not None:  # every layer dense now: the graph as given (but for dropped experts)
            lowered = lower(frontend, layers)
            error, held = _error_as_given(frontend)
            e2e = dataclasses.replace(e2e, measured_error=error, heldout_error=held, local={})
    with timed("report"):
        rest_us, fused_us, rest_kinds = rest(frontend, fingerprint, planning)
        stacked_us, stacked_lines = price_groups(frontend.launch_groups(), layers, fingerprint, planning.cost_mode)
        plan = plan_of(layers, fingerprint, options, banks)
        notes = frontend.notes(layers, skipped, planning, fingerprint)
        report = report_of(frontend, layers, skipped, e2e, fingerprint, planning, rest_us, fused_us, stacked_us,
                           checked=checked, kept_dense_speedup=kept, budget=options.error_budget,
                           rest_kinds=rest_kinds)
        report["warnings"] = _unique(warnings + notes + checked.warnings + shared_weight_warnings(layers)
                                     + ([_kept_dense_warning(frontend, kept)] if kept is not None else []))
        if checked.alarm:
            predicted = report["end_to_end"]["predicted_speedup"]
            report["warnings"].insert(0, checked.alarm.replace("{predicted}", f"{predicted or float('nan'):.2f}x"))
        if banks:
            report["experts"] = banks
        report["planning"] = planning_of(timed, e2e)
        if recovery is not None:
            report["planning"]["recovery"] = recovery.to_dict()
            report["warnings"] += recovery.warnings()
        if replans:
            report["planning"]["replans"] = replans
        # how the budget was calibrated, re-allocated and backed off, per subgraph
        report["planner_log"] = [f"graph {frontend.graph}: {line}"
                                 for line in alloc.history + stacked_lines + frontend.lowering_notes()]
    return Outcome(layers, skipped, plan, report, lowered)


def _error_as_given(frontend: Frontend) -> tuple[float, float | None]:
    """The end-to-end error with every layer dense: none, unless expert banks dropped experts."""
    if not getattr(frontend, "pruned", None):
        return 0.0, 0.0 if frontend.has_heldout() else None
    return frontend.evaluate({})[0], frontend.evaluate({}, heldout=True)[0] if frontend.has_heldout() else None


def _graph_options(frontend: Frontend, options: Options, budget: float | None) -> tuple[Options, Options, list[str]]:
    """The options this graph is planned with (its share of the budget, on the planner's error
    scale: ``Metric.to_error``), those its lowered graph is checked with (the share in the metric's
    own units), and a warning where it is a share."""
    metric = options.metric
    share = options.error_budget if budget is None else min(budget, options.error_budget)
    checking = options if share == options.error_budget else dataclasses.replace(options, error_budget=share)
    planning = dataclasses.replace(options, error_budget=metric.to_error(share))
    if share == options.error_budget:
        return planning, checking, []
    return planning, checking, [
        f"graph {frontend.graph} was planned within the {metric.show(share)} of the error budget the earlier "
        f"subgraphs left (errors of separately compiled subgraphs add in quadrature)"]


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


@contextlib.contextmanager
def step(name: str, total: int | None = None, shown_as: str | None = None):
    """Name the step an exception escaped from (``failed_step``), once: the innermost step wins.
    Where progress is shown (``sparsec.progress``), the step has a line while it runs."""
    from sparsec import progress

    try:
        with progress.task(shown_as or name, total):
            yield
    except Exception as exc:
        if getattr(exc, "failed_step", None) is None:
            try:
                exc.failed_step = name
            except AttributeError:  # an exception type without a __dict__
                pass
        raise


class StepClock:
    """``step`` that also adds up each step's wall time, and the whole-model evaluations each step
    ran, for the report's ``planning``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.evaluations: dict[str, list[int]] = {}  # step -> [on calibration data, on held-out data]
        self._counted = (0, 0)

    def evaluated(self, name: str, e2e: "EndToEnd") -> None:
        """Count the evaluations ``e2e`` holds beyond those counted before as ``name``'s."""
        now = (e2e.evaluations, e2e.heldout_evaluations)
        mine = self.evaluations.setdefault(name, [0, 0])
        mine[0] += max(0, now[0] - self._counted[0])
        mine[1] += max(0, now[1] - self._counted[1])
        self._counted = now

    @contextlib.contextmanager
    def __call__(self, name: str, total: int | None = None, shown_as: str | None = None):
        start = time.perf_counter()
        try:
            with step(name, total, shown_as):
                yield
        finally:
            took = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            log.debug("step %s: %.2f s", name, took)


def planning_of(timed: StepClock, e2e: "EndToEnd") -> dict:
    """What planning cost: whole-model evaluations run (on calibration and on held-out data), in
    all and by the step that ran them, the mean wall time of one on calibration data, and the
    seconds of each step (the report's own rendering excluded)."""
    seconds = {name: round(s, 3) for name, s in timed.seconds.items() if name != "report"}
    return {"model_evaluations": e2e.evaluations, "heldout_evaluations": e2e.heldout_evaluations,
            "evaluations_by_step": {name: {"calibration": n, "heldout": h}
                                    for name, (n, h) in timed.evaluations.items() if n or h},
            "timing": {"evaluation_s": round(e2e.evaluation_s, 4) if e2e.evaluations else None,
                       "total_s": round(sum(seconds.values()), 3), "steps_s": seconds}}


def failed_step(exc: BaseException) -> str:
    """The pipeline step ``exc`` escaped from, or "compile" when it came from outside one."""
    return getattr(exc, "failed_step", None) or "compile"


def fallback_report(frontend: Frontend, fingerprint, options: Options, exc: BaseException, message: str) -> dict:
    """The report of a graph left as it was because ``exc`` broke a step: no layers, the failure
    under ``fallbacks`` (graph, step, the error's first line) and ``message`` among the warnings."""
    from sparsec.errors import first_line

    report = report_of(frontend, [], [], EndToEnd(), fingerprint, options)
    report["warnings"] = _unique(list(getattr(frontend, "warnings", [])) + [message])
    report["fallbacks"] = [{"graph": frontend.graph, "step": failed_step(exc),
                            "error": f"{type(exc).__name__}: {first_line(exc)}"}]
    return report


# -- capture ----------------------------------------------------------------------------------


def capture(frontend: Frontend) -> tuple[list[Site], list[Skipped]]:
    sites, skipped = frontend.capture()
    log.debug("captured %d sites, skipped %d", len(sites), len(skipped))
    return sites, skipped


# -- calibrate --------------------------------------------------------------------------------


THIN_ROWS_PER_INPUT = 4  # below, calibration error understates new-input error noticeably (docs/accuracy.md)


def calibrate(frontend: Frontend, sites: list[Site]) -> tuple[dict[str, SiteStats], dict[str, list]]:
    """Gram statistics of every site's input; under-sampled ones fall back to data-free fitting.

    Also returns which inputs fell back and which are thinly sampled, (names, rows, inputs) by
    input key, for ``calibration_warnings`` to say once the candidates are known."""
    stats = frontend.calibrate(sites) if sites else {}
    if stats and not any(st.rows for st in stats.values()):
        from sparsec.errors import DataError

        raise DataError("the calibration data give no layer any input rows (every call's inputs are empty); "
                        "give calibration inputs with at least one token")
    facts: dict[str, list] = {"diagonal": [], "thin": []}
    for key, st in stats.items():
        K = st.gram.shape[0]
        names = ", ".join(s.name for s in sites if s.input_key == key)
        _check_finite(st, names)
        if K <= st.rows < THIN_ROWS_PER_INPUT * K and not frontend.has_heldout():
            facts["thin"].append((key, names, st.rows, K))
        if st.fall_back_to_diagonal():
            facts["diagonal"].append((key, names, st.rows, K))
    return stats, facts


def _check_finite(st: SiteStats, names: str) -> None:
    """Refuse calibration data that give a layer non-finite inputs: nothing fits or measures on them."""
    from sparsec.errors import DataError

    if not bool(torch.isfinite(st.total).all()) or not bool(torch.isfinite(torch.diagonal(st.gram)).all()):
        raise DataError(f"the inputs of layer(s) {names} hold NaN or infinite values on the calibration data, so no "
                        "error can be fitted or measured on them; give calibration inputs on which the model computes "
                        "finite values (check them with torch.isfinite)")


def calibration_warnings(facts: dict[str, list], layers: list[Layer]) -> list[str]:
    """What under-sampled calibration means for the fits, said only of inputs where some candidate
    is fitted through the Gram (``FormatSpec.fits_to_gram``): a layer weighing only activation
    sparsity reads its inputs' magnitudes, which few rows estimate well."""
    fitted = {l.site.input_key for l in layers if any(c.spec.fits_to_gram for c in l.candidates)}
    warnings = [
        f"{names}: {rows} calibration rows for {K} inputs, too few to weight a fit by their correlations; "
        f"fitted to each input's energy alone (as if inputs were uncorrelated) so its measured error holds "
        f"for new inputs. Supply at least {K} calibration rows for a fully activation-aware fit"
        for key, names, rows, K in facts["diagonal"] if key in fitted
    ]
    thin = [(names, rows, K) for key, names, rows, K in facts["thin"] if key in fitted]
    if thin:
        names = "; ".join(f"{n} ({rows} rows for {K} inputs)" for n, rows, K in thin[:3])
        warnings.append(
            f"{len(thin)} layer input(s) have fewer than {THIN_ROWS_PER_INPUT} calibration rows per input, e.g. {names}: "
            f"an activation-aware fit follows so small a sample, and the error measured on it can understate "
            f"the error on new inputs (1.2-1.6x at 1-2 rows per input, bench/calibration_rows.py); pass held-out "
            f"data (the budget then binds on it too) or more calibration rows"
        )
    return warnings


# -- candidates -------------------------------------------------------------------------------


def candidates(sites: list[Site], stats: dict[str, SiteStats], options: Options, forced: Plan | None) -> list[Layer]:
    """Per site, the format specs worth weighing: the handlers' grids (or what the plan forces)."""
    from sparsec.passes.registry import HANDLERS

    exact: dict[str, list] = {}
    for text in options.exact_formats:
        exact.setdefault(family_of(text), []).append(parse_spec(text))
    layers = []
    for site in sites:
        layer = Layer(site=site, stats=stats[site.input_key], dense=Candidate(Dense(), None, None, 0.0))
        requested, key = forced.resolve(site.name) if forced is not None else ("auto", None)
        layer.requested, layer.forced_by = requested, key if requested != "auto" else None
        if requested == "auto":
            specs = _allowed_specs(site, options, exact, HANDLERS)
        else:
            spec = parse_spec(requested)
            specs = [] if isinstance(spec, Dense) else [spec]
        for spec in specs:
            why = spec.check(site.N, site.K)
            if why is None and spec.family not in HANDLERS:
                why = f"no pass implements {spec.family}"
            if why is None and hasattr(HANDLERS[spec.family], "refusal"):
                why = HANDLERS[spec.family].refusal(layer.stats, site.K)
            layer.candidates.append(Candidate(spec, None, None, math.nan, rejected_because=why))
        layers.append(layer)
    return layers


def drop_unread_rows(layers: list[Layer]) -> None:
    """Free the calibration rows held apart (``SiteStats.held``) of every input no standing
    candidate reads them for (a handler with ``reads_held_rows``): up to 1024 rows per input."""
    from sparsec.passes.registry import HANDLERS

    read = {id(l.stats) for l in layers for c in l.candidates
            if c.rejected_because is None and getattr(HANDLERS.get(c.spec.family), "reads_held_rows", False)}
    for layer in layers:
        if id(layer.stats) not in read:
            layer.stats.held = None


def _allowed_specs(site: Site, options: Options, exact: dict[str, list], handlers) -> list:
    """The allowed families' grids, except that a family named only with its parameters
    ("lowrank:64", ``exact`` by family) weighs exactly those specs (refused with the reason where
    they do not fit)."""
    specs = []
    for fam in options.formats:
        if fam in exact:
            specs.extend(exact[fam])
        elif fam in handlers:
            specs.extend(handlers[fam].grid(site.N, site.K))
    return specs


# -- cost -------------------------------------------------------------------------------------


def cost(layers: list[Layer], fingerprint, options: Options) -> None:
    """Predicted time of dense and every candidate at (M, N, K, dtype, mode), from the fingerprint."""
    mode = options.cost_mode
    for layer in layers:
        site, M = layer.site, max(layer.tokens, 1)
        dense = fingerprint.predict_detail("dense", M, site.N, site.K, dtype=site.dtype_name, mode=mode)
        layer.dense.predicted_us, layer.dense.kernel = dense.us, dense.kernel
        for cand in layer.candidates:
            if cand.rejected_because:
                continue
            why = fingerprint.can_predict(cand.fmt, site.dtype_name, mode)
            if why is None:
                why = _kernel_refusal(cand, site)
            if why is not None:
                cand.rejected_because = why
                continue
            pred = fingerprint.predict_detail(cand.fmt, M, site.N, site.K, dtype=site.dtype_name, mode=mode)
            cand.predicted_us, cand.kernel, cand.impl = pred.us, pred.kernel, pred.impl
            cand.predicted_us += transposed_output_us(pred.kernel, site, M, fingerprint)
            unmeasured = getattr(pred, "unmeasured", "")
            if layer.requested == "auto" and unmeasured:
                cand.rejected_because = (
                    f"not measured on {fingerprint.name}: {unmeasured}; sparsec does not choose "
                    f"a setting its fingerprint has not timed"
                )
    price_shared(layers, fingerprint, mode)
    for layer in layers:
        M = max(layer.tokens, 1)
        for cand in layer.candidates:
            if cand.rejected_because:
                continue
            if layer.requested == "auto" and cand.predicted_us >= layer.dense.predicted_us:
                cand.rejected_because = (
                    f"predicted {layer.dense.predicted_us / cand.predicted_us:.2f}x of dense "
                    f"on {fingerprint.name} at M={M} ({cand.kernel}): slower than dense"
                    + cand.spec.cost_note(M)
                )


def _kernel_refusal(cand: Candidate, site: Site) -> str | None:
    from sparsec.codegen import check

    return check(cand.spec, site.N, site.K, dtype=site.dtype, device=site.weight.device)


# -- experts ----------------------------------------------------------------------------------


def experts(frontend: Frontend, fingerprint, options: Options) -> tuple[list[dict], list[Skipped]]:
    """Expert banks: the implementation each runs fastest in (measured here, or predicted by the
    fingerprint when it describes another device; an exact choice: no error is spent), and the
    experts calibration routes almost nothing to dropped where ``expert_pruning``'s share of the
    budget allows it (measured end to end; the layers' planning then works on the pruned model), as
    report rows, and the banks left as traced, as skipped entries. Entries without banks (ONNX)
    have none."""
    find = getattr(frontend, "experts", None)
    return find(fingerprint, options.cost_mode, options=options) if find is not None else ([], [])


# -- approximate ------------------------------------------------------------------------------


def approximate(layers: list[Layer], options: Options, defer: bool = False) -> None:
    """For candidates still standing: a weight with the format's exact structure, and its error.

    Runs after ``cost`` so that no time is spent pruning or factoring into a format the
    fingerprint already says would be slower than dense. Within a family (and block size), the
    candidates are made from the least lossy (most values kept) down; once one already costs more
    than a layer can carry (``OVER_BUDGET`` times the whole error budget), the lossier ones of that
    chain could never be chosen and are refused without being computed. Handlers whose grid shares
    one factorisation (``shares_work_across_specs``) are asked for their whole chain at once.

    Families whose fits take several steps (``can_abandon``: Monarch's sweeps, block's two masks) come
    last, and an automatic layer's fit stops after a step (any but its last) where a candidate already
    made and predicted at least as fast is more accurate by over ``abandon_margin`` (``ABANDON_MARGIN``
    after the first step, less after each later one): the candidate is then refused as dominated. It
    stops too where its error after that step is over the margin times what the layer can carry: it
    is refused as over budget, with the lossier ones of its chain.
    With ``defer``, an automatic layer's multi-step fits wait (``DEFERRED``) for ``fit_deferred``,
    which knows from the measured sensitivities how much error each layer can carry.
    """
    from sparsec.progress import advance_current

    _APPROXIMATIONS.reserve(sum(l.site.weight.numel() * torch.empty((), dtype=l.site.dtype).element_size()
                                for l in layers), layers[0].site.weight.device if layers else None)
    cap = OVER_BUDGET * options.error_budget
    for layer in layers:
        advance_current()
        _approximate_layer(layer, options, cap, f"{OVER_BUDGET:g}x the budget", defer=defer)


# A deferred candidate is weighed only if its saving per unit of weighted squared error, from dense, is
# at least 1 / RATE_MARGIN of the least the allocation took (a candidate's rate along its layer's hull is
# at least the rate of every step up to it, and the greedy allocation stops taking steps near that rate).
RATE_MARGIN = 2.0

# Why a multi-step fit has not been made yet: ``approximate(defer=True)`` left it for ``fit_deferred``.
DEFERRED = "deferred: fitted once the end-to-end sensitivities are measured"


def _approximate_layer(layer: Layer, options: Options, cap: float, cap_note: str, defer: bool = False,
                       worth=None) -> None:
    """``approximate`` for one layer's candidates not yet made, a candidate over ``cap`` (layer error;
    ``cap_note`` says what it is) ending its chain. ``worth(candidate) -> (error, note)``, where
    given, is the error past which a candidate would not be worth its saving: a multi-step fit over
    ``abandon_margin`` times it after a step stops too."""
    from sparsec.passes.registry import HANDLERS, forget_layer_work

    site, st = layer.site, layer.stats
    weight = site.weight.detach().to(device=st.gram.device, dtype=torch.float32)
    energy = _layer_energy(layer, weight)
    auto = layer.requested == "auto"
    chains: dict[tuple, list[Candidate]] = {}
    for cand in layer.candidates:
        if cand.rejected_because is None and math.isnan(cand.predicted_error):
            chains.setdefault(_chain_key(cand.spec, site.N, site.K), []).append(cand)
    for chain in sorted(chains.values(), key=lambda ch: _can_abandon(HANDLERS[ch[0].spec.family])):
        # least lossy first: most values kept, then (act) fewest inputs skipped
        chain.sort(key=lambda c: (-c.spec.stored_params(site.N, site.K), c.spec.curve_key(site.N, site.K)))
        handler = HANDLERS[chain[0].spec.family]
        if defer and auto and _can_abandon(handler):
            for cand in chain:
                cand.rejected_because = DEFERRED
            continue
        key = (_weight_identity(layer), _identity_stats(st), handler.default_method)
        step = len(chain) if getattr(handler, "shares_work_across_specs", False) else 1
        for i in range(0, len(chain), step):
            batch = chain[i : i + step]
            todo = [c for c in batch if (key, c.fmt) not in _APPROXIMATIONS]
            abandoned: dict[str, _Stopped] = {}
            extra = {}
            if todo and auto and _can_abandon(handler):
                extra["abandon"] = _dominated(layer, handler, weight, st, energy, abandoned, cap, cap_note, worth)
            made = dict(zip((c.fmt for c in todo), handler.approximate([c.spec for c in todo], weight, st, **extra))) if todo else {}
            for cand in batch:
                if cand.fmt in abandoned:
                    stopped = abandoned[cand.fmt]
                    error, rival = stopped.error, stopped.rival
                    cand.predicted_error = error
                    after = f"after {_STEP_NAMES.get(stopped.step, f'{stopped.step} steps')} of its fit its error is {100.0 * error:.2f}%"
                    cand.rejected_because = (
                        f"over budget: {after}, over {stopped.margin:g}x the {100.0 * stopped.limit:.2f}% "
                        f"({stopped.note}) past which a candidate is not weighed"
                        if rival is None else
                        f"dominated: {after}, over {stopped.margin:g}x the {100.0 * rival.predicted_error:.2f}% of "
                        f"{rival.fmt}, which is predicted at least as fast ({_faster(layer, rival, cand)})"
                    )
                    continue
                cand.remake = _remaker(layer, cand, (key, cand.fmt))
                w_hat = made.get(cand.fmt)
                if w_hat is None:  # cached (or, evicted meanwhile, made again)
                    w_hat = cand.weight()
                else:
                    # what will run, where the weight lives; half the memory of float32 in 16-bit models
                    w_hat = w_hat.to(site.dtype)
                    _APPROXIMATIONS.put((key, cand.fmt), _beside(w_hat, site.weight))
                cand.method = handler.default_method + (", inputs as if uncorrelated (too few calibration rows)" if st.uncorrelated else "")
                # kept with the approximation: a handler may read a fresh fit's error off the fit itself,
                # and a plan made again from the cache must predict the same, to the last digit
                error_key = (key, cand.fmt, None if site.bias is None else _identity(site.bias))
                error = _APPROXIMATIONS.errors.get(error_key)
                if error is None:
                    error = _APPROXIMATIONS.errors[error_key] = _error(handler, weight, w_hat, st, site.bias, energy)
                cand.predicted_error = error
            # stopped over what the layer can carry (not over what one candidate is worth): so are the lossier ones
            over = [c for c in batch if c.fmt in abandoned and abandoned[c.fmt].whole_layer]
            fitted = [c for c in batch if c.fmt not in abandoned]
            if not fitted and not over:  # a fit stopped as dominated says nothing of the lossier ones
                continue
            worst = max(over or fitted, key=lambda c: c.predicted_error)
            if auto and worst.predicted_error > cap:
                floor = worst.predicted_error / (abandoned[worst.fmt].margin if over else 1.0)
                for rest in chain[i + step :]:
                    rest.rejected_because = (
                        f"over budget: the less lossy {worst.fmt} already costs "
                        f"{'over ' if over else ''}{100.0 * floor:.2f}% "
                        f"error, over the {100.0 * cap:.2f}% ({cap_note}) past which a candidate is not weighed"
                    )
                break
    forget_layer_work()


def fit_deferred(frontend: Frontend, layers: list[Layer], options: Options, fingerprint, alloc,
                 e2e: EndToEnd):
    """The multi-step fits ``approximate`` deferred, made now that verification measured how much of
    each layer's error reaches the output: a layer with the whole budget to itself can carry
    budget / sqrt(amplification x sensitivity), and a fit over ``abandon_margin`` times that after
    a step stops (a layer whose sensitivity was not measured keeps ``OVER_BUDGET`` times the
    budget). Most Monarch and block fits of a model whose budget binds end far above what their
    layer can carry, and their later steps were most of the planning time (SmolLM2-135M:
    docs/frontier.md). Where a fit made here is still standing, the budget is allocated again, with
    the sensitivities and amplification measured, and verified only if that allocation takes one of them.
    Returns the allocation and end-to-end measurement that stand."""
    from sparsec.progress import advance_current

    waiting = [l for l in layers if any(c.rejected_because == DEFERRED for c in l.candidates)]
    if not waiting:
        return alloc, e2e
    hull_of = {h.layer.name: h for h in alloc.hulls}
    # the least saving per unit of (sensitivity-weighted squared) error the allocation took anywhere:
    # a candidate is chosen only if its own rate, from dense, is not far under it
    rates = [h.gain() / h.cost() for h in alloc.hulls if h.index > 0 and h.cost() > 0.0]
    least_rate = min(rates) if rates else None
    made: set[int] = set()  # the candidates fitted here and still standing
    for layer in waiting:
        advance_current()
        for cand in layer.candidates:
            if cand.rejected_because == DEFERRED:
                cand.rejected_because = None
        hull = hull_of.get(layer.name)
        if hull is not None and len(hull.points) > 1 and hull.sensitivity > 0.0 and alloc.amplification > 0.0:
            cap = options.error_budget / math.sqrt(alloc.amplification * hull.sensitivity)
            note = f"the whole budget on this layer alone, its end-to-end sensitivity {hull.sensitivity:.2g} measured"
        elif hull is not None and len(hull.points) > 1 and hull.sensitivity <= 0.0:
            cap, note = math.inf, "no error of this layer reaches the output"
        else:
            cap, note = OVER_BUDGET * options.error_budget, f"{OVER_BUDGET:g}x the budget"
        fresh = [c for c in layer.candidates if c.rejected_because is None and math.isnan(c.predicted_error)]
        worth = None
        if least_rate is not None and hull is not None and len(hull.points) > 1 and hull.sensitivity > 0.0:
            left = alloc.budget_left_for(hull)  # what the layer could take without displacing another's choice

            def worth(cand, layer=layer, sensitivity=hull.sensitivity, left=left):
                limit = math.sqrt(RATE_MARGIN * max(layer.saving(cand), 0.0) / (sensitivity * least_rate))
                if left >= limit:
                    return left, "the budget the allocation left this layer"
                return limit, (f"where its saving would buy its error at {1.0 / RATE_MARGIN:g}x the least rate "
                               f"the allocation took, {least_rate:.3g} us per unit of weighted squared error, "
                               f"above the {100.0 * left:.2f}% of budget left to this layer")
        _approximate_layer(layer, options, cap, note, worth=worth)
        made.update(id(c) for c in fresh if c.rejected_because is None)
    if not made:
        return alloc, e2e
    trial = select(layers, options, fingerprint)
    for h in trial.hulls:
        if h.layer.sensitivity is not None:
            h.sensitivity, h.measured_alone = h.layer.sensitivity, h.layer.sensitivity_alone
    trial.fill(alloc.amplification)
    if not any(id(h.current) in made for h in trial.hulls):
        # no fit made here is chosen, at the sensitivities and amplification measured: the plan verified stands
        for h in alloc.hulls:
            h.layer.chosen = h.current
        return alloc, e2e
    trial.history[:0] = alloc.history + ["multi-step fits made where the measured sensitivities left room: "
                                         "the budget allocated again"]
    return trial, verify(frontend, layers, trial, options, before=e2e)


# A candidate whose layer error is over this many times the whole error budget is not weighed, nor
# are the lossier ones of its chain: no allocation would spend the budget on it.
OVER_BUDGET = 2.0

# A fit's first step against where it ends, on SmolLM2-135M (docs/frontier.md): Monarch after one sweep
# had at most 1.35x the error of the planner's four sweeps (1.48x that of twelve) on the q and o
# projections, NB 4 and 8; block's refit of its activation-scored mask at most 1.06x the better of it
# and the OBS-scored one, over 540 specs. A fit still this far above a rival after its first step
# would not end below it. After each later step what is left to gain halves in the margin
# (``abandon_margin``): Monarch after two and three sweeps had at most 1.11x and 1.04x the error of
# four, on 132 fits of every third layer of SmolLM2-135M, NB 4 and 8.
ABANDON_MARGIN = 1.5

_STEP_NAMES = {1: "the first step", 2: "two steps", 3: "three steps"}


def abandon_margin(step: int) -> float:
    """How far over a rival or a limit a fit may be after ``step`` steps and still be finished."""
    return 1.0 + (ABANDON_MARGIN - 1.0) / 2.0 ** (max(step, 1) - 1)


def _layer_energy(layer: Layer, weight: torch.Tensor) -> float:
    """``output_energy`` of the layer (``weight``: its weight as the fits take it) on its statistics,
    once per statistics and version of the weight (``approximate`` and ``fit_deferred`` both ask)."""
    st = layer.stats
    return _memo(layer, "energy", (st, st.rows), lambda: output_energy(weight, st, layer.site.bias))


def _weight_identity(layer: Layer) -> tuple:
    """``_identity`` of the layer's weight, once per version of it (an in-place change makes it anew)."""
    return _memo(layer, "identity", (), lambda: _identity(layer.site.weight))


def _memo(layer: Layer, name: str, of: tuple, make):
    """``make()``, kept on the layer while the objects ``of`` and its weight (and the weight's version)
    are the same; made each time for an inference tensor, which keeps no version."""
    w = layer.site.weight
    try:
        version = w._version
    except RuntimeError:
        return make()
    key, memo = (w, version, *of), layer.memo.get(name)
    # objects by identity, counts (versions, rows) by value
    if memo is None or any(not (a is b or (type(a) is int and a == b)) for a, b in zip(memo[0], key)):
        memo = layer.memo[name] = (key, make())
    return memo[1]


def _faster(layer: Layer, rival: Candidate, cand: Candidate) -> str:
    """"1.39x against 1.18x" of dense, or the predicted microseconds where dense has no price."""
    a, b = layer.speedup(rival), layer.speedup(cand)
    if a is None or b is None:
        return f"{rival.predicted_us:.1f} us against {cand.predicted_us:.1f} us"
    return f"{a:.2f}x against {b:.2f}x"


@dataclasses.dataclass(frozen=True)
class _Stopped:
    """A fit stopped after ``step`` steps: its error then, and the rival more accurate and at least
    as fast, or (``rival`` None) the limit it was over and what that limit is; ``whole_layer`` where
    the limit is what the layer can carry (the lossier ones of its chain are then over it too);
    ``margin`` the factor it was over them by."""

    error: float
    rival: Candidate | None = None
    limit: float = math.inf
    note: str = ""
    whole_layer: bool = False
    step: int = 1
    margin: float = ABANDON_MARGIN


def _can_abandon(handler) -> bool:
    return bool(getattr(handler, "can_abandon", False))


def _dominated(layer: Layer, handler, weight, st: SiteStats, energy: float, abandoned: dict, cap: float,
               cap_note: str, worth=None):
    """``abandon`` for a multi-step handler's fits of ``layer``: yes where a candidate of the layer
    already made, still standing and predicted at least as fast has under 1 / ``abandon_margin`` of
    the error the fit has after the steps made so far, or where that error is over that margin times
    ``cap`` (the most the layer can carry) or times what ``worth`` says the candidate's saving pays
    for (it would end over budget). The handler passes the number of steps made (``step``) and, where
    its fit knows it, the error's numerator tr(D G D^T) (``numerator``); else the error is taken
    through the Gram. Recorded in ``abandoned``: fmt -> ``_Stopped``."""

    def abandon(spec, approx, step: int = 1, numerator: float | None = None) -> bool:
        cand = next(c for c in layer.candidates if c.spec == spec)
        if numerator is None:
            error = _error(handler, weight, approx, st, layer.site.bias, energy)
        else:
            error = 0.0 if numerator <= 0.0 else (math.inf if energy <= 0.0 else math.sqrt(numerator / energy))
        margin = abandon_margin(step)
        rivals = [c for c in layer.candidates
                  if c is not cand and c.rejected_because is None and not math.isnan(c.predicted_error)
                  and c.predicted_us is not None and cand.predicted_us is not None
                  and c.predicted_us <= cand.predicted_us]
        rival = min(rivals, key=lambda c: c.predicted_error) if rivals else None
        if rival is not None and error > margin * rival.predicted_error:
            abandoned[cand.fmt] = _Stopped(error, rival, step=step, margin=margin)
            return True
        limit, note, whole_layer = cap, cap_note, True
        if worth is not None:
            paid, why = worth(cand)
            if paid < cap:
                limit, note, whole_layer = paid, why, False
        if error > margin * limit:
            abandoned[cand.fmt] = _Stopped(error, None, limit, note, whole_layer, step=step, margin=margin)
            return True
        return False

    return abandon


def _error(handler, weight, approx, st: SiteStats, bias, energy: float) -> float:
    """A candidate's predicted relative output error on the calibration activations: its handler's
    own where the approximation is not a weight (``output_error``), else through the Gram."""
    own = getattr(handler, "output_error", None)
    if own is not None:
        return own(weight, approx, st, energy)
    return relative_output_error(weight, approx, st, bias, energy)


def _remaker(layer: Layer, cand: Candidate, key: tuple):
    """How a candidate's approximation is had on use (``Candidate.weight``): from the bounded cache,
    or computed again from the same weight and statistics, which gives the same tensor.

    Held by every candidate of every layer, the approximations were many copies of the model's
    weights at once: a BERT-base-shaped 4-block ONNX model of 113 MB peaked at 3.0 GB, 2.3 GB since.
    """
    from sparsec.passes.registry import HANDLERS, forget_layer_work

    def remake() -> torch.Tensor:
        try:
            return _APPROXIMATIONS.get_recent(key)
        except KeyError:
            pass
        site, st = layer.site, layer.stats
        weight = site.weight.detach().to(device=st.gram.device, dtype=torch.float32)
        (w_hat,) = HANDLERS[cand.spec.family].approximate([cand.spec], weight, st)
        forget_layer_work()
        w_hat = _beside(w_hat.to(site.dtype), site.weight)
        _APPROXIMATIONS.put(key, w_hat)
        return w_hat

    return remake


def _beside(approx, weight: torch.Tensor):
    """An approximation on the device of the weight it replaces (statistics, and so the fits, may
    live on a GPU while an ONNX model's weights stay on the CPU)."""
    return approx.to(weight.device) if hasattr(approx, "to") and approx.device != weight.device else approx


def _chain_key(spec, N: int, K: int) -> tuple:
    """Candidates whose error grows as they keep fewer values: one family, one group of its cost
    curve (one block size)."""
    return (spec.family, spec.curve_key(N, K)[:-1])


class _BoundedCache(dict):
    """Approximations kept across recompiles (a new shape re-plans the same weights), bounded in bytes.

    The bound is ``SPARSEC_CACHE_MB`` where set; otherwise 256 MB or, when more, one and a half
    times the weights of the graph being planned (``reserve``): verification and sensitivity probing
    revisit about one approximation per layer again and again, and with a bound under that working
    set each revisit missed and was computed again (SmolLM2-135M: 410 of 621 truncated SVDs, 53 s of
    a 400 s plan). Where the weights' device has the memory free, up to four times the weights
    (``ROOMY``; a quarter of what is free at most): the candidates verification weighs, a few per
    layer, then fit (SmolLM2-135M: 127 low-rank fits made again with one and a half times, none with
    four). The least recently used entries go first. An entry evicted is computed again when
    needed (``Candidate.remake``).

    Once a graph is planned the bound falls back to ``BASE`` (``release``): the memory the working
    set took, a quarter of a GPU's at most, goes back to the model it was planned for.
    """

    BASE = 256 * 2 ** 20
    floor = 0
    held = 0  # bytes of the entries

    def __init__(self) -> None:
        super().__init__()
        self.errors: dict = {}  # each approximation's predicted error, by the same key (plus the bias): floats, kept

    ROOMY = 4.0

    def reserve(self, nbytes: int, device: torch.device | None = None) -> None:
        roomy = min(self.ROOMY * nbytes, free_memory_bytes(device) / 4.0) if device is not None else 0.0
        self.floor = int(max(1.5 * nbytes, roomy))

    def release(self) -> None:
        """Back to the resting bound, least recently used entries dropped first."""
        self.floor = 0
        limit = self.limit()
        while self and self.held > limit:
            self._drop(next(iter(self)))

    def limit(self) -> float:
        import os

        given = os.environ.get("SPARSEC_CACHE_MB")
        if given is not None:
            return float(given) * 2 ** 20
        return float(max(self.BASE, self.floor))

    def put(self, key, tensor) -> None:
        limit = self.limit()
        size = _nbytes(tensor)
        self._drop(key)
        while self and self.held + size > limit:
            self._drop(next(iter(self)))
        if size <= limit:
            self[key] = tensor
            self.held += size

    def _drop(self, key) -> None:
        if key in self:
            self.held -= _nbytes(dict.pop(self, key))

    def get_recent(self, key):
        """The entry for ``key``, now the most recently used; KeyError if absent."""
        tensor = self.pop(key)
        self[key] = tensor
        return tensor

    def __missing__(self, key):
        raise KeyError(key)


def _nbytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()



_APPROXIMATIONS = _BoundedCache()


def _identity(t: torch.Tensor) -> tuple:
    """Content-based key (an address can be reused by another model's weight)."""
    d = t.detach().double()
    return (tuple(t.shape), t.dtype, str(t.device), float(d.sum()), float((d * d).sum()), float(d.abs().max()))


def _identity_stats(st: SiteStats) -> tuple:
    return (st.rows, float(st.gram.trace()), float(st.gram.sum()), float(st.total.sum()))


# -- select -----------------------------------------------------------------------------------


def select(layers: list[Layer], options: Options, fingerprint):
    """Forced layers take what the plan names; the rest share the budget left (knapsack)."""
    from sparsec.passes import select as knapsack

    auto, forced_cost = [], 0.0
    for layer in layers:
        if layer.requested == "auto":
            auto.append(layer)
            continue
        layer.chosen = _forced_choice(layer)
        forced_cost += layer.chosen.predicted_error ** 2 if not layer.chosen.is_dense else 0.0
    viable = {l.name: [c for c in l.candidates if c.rejected_because is None] for l in auto}
    alloc = knapsack.allocate(auto, viable, options.error_budget, fixed=forced_cost)
    for h in alloc.hulls:
        h.layer.chosen = h.current
    return alloc


def _forced_choice(layer: Layer) -> Candidate:
    spec = parse_spec(layer.requested)
    if isinstance(spec, Dense):
        return layer.dense
    for cand in layer.candidates:
        if cand.spec == spec and cand.rejected_because is None:
            return cand
    return layer.dense


# -- measure ----------------------------------------------------------------------------------


def settle(layers: list[Layer], alloc, fingerprint, options: Options) -> bool:
    """Keep the promise of shared prices (``sparsec.launches.price_shared``): a rewrite priced as its
    share of one launch with sibling layers that chose otherwise is priced again on what they
    chose, and refused, its layer stepping back along its hull, where it then no longer pays.
    Returns whether anything was refused, so the pipeline verifies the new choice again."""
    hulls = {h.layer.name: h for h in alloc.hulls}
    refused = False
    for layer, why in settle_shared(layers, fingerprint, options.cost_mode):
        hull = hulls.get(layer.name)
        if hull is None or hull.current is not layer.chosen:  # forced: priced again, kept
            continue
        _step_back(hull, why)
        refused = True
    return refused


def _step_back(hull, why: str) -> None:
    """Refuse the hull's current candidate (and the costlier ones after it), saying why; its layer
    takes the step before."""
    hull.current.rejected_because = why
    hull.points = hull.points[: hull.index]
    hull.index -= 1
    hull.layer.chosen = hull.current


def measure(frontend: Frontend, layers: list[Layer], alloc, options: Options) -> bool:
    """With ``measure: True``: time each chosen rewrite against dense on this device, at its M,
    with the front-end's own runtime (torch for FX, onnxruntime for ONNX).

    The fingerprint predicts; this checks. An automatically chosen rewrite that measures slower
    than dense is refused (with the measured figure) and its layer steps back along its hull;
    returns whether anything was refused, so the pipeline verifies the new choice (and measures
    whatever that picks) again. Forced layers are timed, not vetoed. Each candidate is timed once.
    """
    if not options.measure or not options.lower:
        return False
    hulls = {h.layer.name: h for h in alloc.hulls}
    refused = False
    for layer in layers:
        cand = layer.chosen
        if cand is None or cand.is_dense:
            layer.measured_us = None
            continue
        if cand.measured_us is None:
            layer.measured_us_dense, cand.measured_us = frontend.time_layer(layer, cand, options)
        layer.measured_us = cand.measured_us
        hull = hulls.get(layer.name)
        # timed alone; a layer priced as its share of a launch with its siblings is held to that
        # share of what it measured (the launch's other work scaled as the fingerprint scales it)
        shared = cand.predicted_us / cand.alone_us if cand.shared_with and cand.alone_us else 1.0
        if hull is None or cand.measured_us * shared < layer.measured_us_dense:
            continue
        as_share = f", {shared:.2f} of it as its share of one launch with its siblings" if shared != 1.0 else ""
        _step_back(hull, f"measured {layer.measured_us_dense / cand.measured_us:.2f}x of dense on this device at "
                         f"M={max(layer.tokens, 1)}{as_share} (predicted {layer.speedup(cand):.2f}x): slower than dense")
        layer.measured_us = None
        refused = True
    return refused


# -- verify -----------------------------------------------------------------------------------


@dataclass
class EndToEnd:
    measured_error: float | None = None
    heldout_error: float | None = None
    local: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0  # whole-model evaluations on calibration data while verifying
    heldout_evaluations: int = 0
    evaluation_s: float = 0.0  # mean wall time of one on calibration data


PROBE_SHARE = 0.5  # of the calibration calls, the first this share (at least one) serve the sensitivity probes


def probe_share(calls: int) -> int | None:
    """How many calibration calls a sensitivity probe runs (None: all of them).

    A probe measures how much of one layer's (or one role's, one depth's) error reaches the output:
    a ratio, which half the calls estimate about as well as all of them at half the cost. Probes are
    most of planning's model evaluations (31 of 36 on SmolLM2-135M at 8 x 128 tokens); every
    allocation is still judged on all the calls, and on the held-out ones.
    """
    share = max(1, math.ceil(calls * PROBE_SHARE))
    return None if share >= calls else share


def verify(frontend: Frontend, layers: list[Layer], alloc, options: Options, before: EndToEnd | None = None) -> EndToEnd:
    """Measure the rewritten graph's output error: probe each role of layer's end-to-end
    sensitivity, calibrate the error model, re-allocate, and back off auto layers until within
    budget (``passes.select.fit_to_budget``).

    With held-out data the budget binds there too: an allocation fits only if both its
    calibration and its held-out error are within it, so a fit that only reproduces the
    calibration rows is backed off rather than reported as a generalisation failure.
    """
    from sparsec.passes import select as knapsack
    from sparsec.progress import advance_current

    measured: dict[tuple, tuple[float, float | None, dict[str, float]]] = {}
    before = before or EndToEnd()
    count = {"calibration": before.evaluations, "heldout": before.heldout_evaluations,
             "seconds": before.evaluation_s * before.evaluations, "whole": before.evaluations}

    def evaluate(reps: dict[str, torch.Tensor], heldout: bool = False,
                 per_layer: bool = True, calls: int | None = None) -> tuple[float, dict[str, float]]:
        start = time.perf_counter()
        # each layer's own error is read on calibration data only (where the planner calibrates on it)
        result = frontend.evaluate(reps, heldout=heldout, per_layer=per_layer and not heldout, calls=calls)
        count["heldout" if heldout else "calibration"] += 1
        if not heldout and calls is None:  # the mean time of one over all the calibration calls
            count["seconds"] += time.perf_counter() - start
            count["whole"] += 1
        return result

    def evaluate_current() -> tuple[float, float | None, dict[str, float]]:
        rewritten = [l for l in layers if l.chosen is not None and not l.chosen.is_dense]
        key = tuple(sorted((l.name, l.chosen.fmt) for l in rewritten))
        if key not in measured:
            reps = {l.name: l.chosen.weight().to(l.site.dtype) for l in rewritten}
            if not reps and not getattr(frontend, "pruned", None):  # the graph as given: nothing to measure
                measured[key] = (0.0, 0.0 if frontend.has_heldout() else None, {})
            else:
                advance_current()
                error, local = evaluate(reps)
                held = evaluate(reps, heldout=True)[0] if frontend.has_heldout() else None
                measured[key] = (error, held, local)
        return measured[key]

    to_error = options.metric.to_error  # the frontend measures the metric; the planner models errors

    def measure_current():
        for h in alloc.hulls:
            h.layer.chosen = h.current
        error, held, local = evaluate_current()
        return to_error(error if held is None else max(error, held)), local

    probe_calls = probe_share(frontend.calibration_calls())

    def measure_alone(choices: dict[str, Candidate]) -> float:
        advance_current()
        site_of = {l.name: l.site for l in layers}
        reps = {n: c.weight().to(site_of[n].dtype) for n, c in choices.items()}
        return to_error(evaluate(reps, per_layer=False, calls=probe_calls)[0])

    knapsack.fit_to_budget(alloc, measure_current, measure_alone=measure_alone)
    for h in alloc.hulls:
        h.layer.chosen = h.current
    error, held, local = evaluate_current()
    result = EndToEnd(measured_error=error, heldout_error=held, local=local, evaluations=count["calibration"],
                      heldout_evaluations=count["heldout"],
                      evaluation_s=count["seconds"] / count["whole"] if count["whole"] else 0.0)
    for layer in layers:
        layer.measured_error = local.get(layer.name, 0.0 if layer.chosen is None or layer.chosen.is_dense else None)
    return result


# -- recover ----------------------------------------------------------------------------------


def recover(frontend: Frontend, layers: list[Layer], options: Options, e2e: EndToEnd):
    """With ``recovery: "sequential"``: refit the chosen rewrites block after block to the inputs
    they receive (``sparsec.recovery``); with ``"full"`` also train their stored values end to end
    (``sparsec.distill``); then measure the graph end to end again. The refits are
    kept only if the end-to-end error is no worse than the one-shot plan's (on calibration and,
    when given, held-out data); else every layer goes back to its one-shot fit."""
    if options.recovery == "none" or not any(l.chosen is not None and not l.chosen.is_dense for l in layers):
        return None, e2e
    from sparsec.recovery import recover_sequentially

    summary = recover_sequentially(frontend, layers, options.recovery)
    if options.recovery == "full":
        from sparsec.distill import distill

        summary.distilled(distill(frontend, layers))
    if not summary.refit:
        return summary, e2e
    worst_before = max(e2e.measured_error or 0.0, e2e.heldout_error or 0.0)
    counts = dict(evaluations=e2e.evaluations, heldout_evaluations=e2e.heldout_evaluations)
    while True:
        reps = {l.name: l.chosen.weight().to(l.site.dtype) for l in layers if l.chosen is not None and not l.chosen.is_dense}
        error, local = frontend.evaluate(reps)
        held = frontend.evaluate(reps, heldout=True, per_layer=False)[0] if frontend.has_heldout() else None
        counts["evaluations"] += 1
        counts["heldout_evaluations"] += held is not None
        if max(error, held or 0.0) <= worst_before:
            for layer in layers:
                layer.measured_error = local.get(layer.name, layer.measured_error)
                if layer.name in summary.trained and layer.recovered is not None and layer.name in local:
                    layer.recovered = (layer.recovered[0], local[layer.name])  # its error once trained end to end
            return summary, dataclasses.replace(e2e, measured_error=error, heldout_error=held, local=local, **counts)
        if not summary.trained:
            break
        # the metric's stand-in fell, the metric did not: the local refits may still stand without it
        summary.undistill(layers, f"made the graph measure {max(error, held or 0.0):.4g} end to end (the larger of "
                                  f"calibration and held-out) against {worst_before:.4g} one shot: undone")
        if not summary.refit:  # no local refit was kept either: the one-shot plan stands as measured
            return summary, dataclasses.replace(e2e, **counts)
    for layer in layers:  # recovered layer by layer, yet worse end to end: the one-shot plan stands
        if layer.recovered is not None and layer.name in summary.refit:
            layer.chosen.approx = summary.originals.get(layer.name)
            layer.recovered = layer.received = None
    summary.kept += summary.refit
    summary.refit = []
    summary.note = (f"refitted layers measured {max(error, held or 0.0):.4g} end to end (the larger of calibration "
                    f"and held-out) against {worst_before:.4g} one shot: kept the one-shot fits")
    return summary, dataclasses.replace(e2e, **counts)


# -- replan -----------------------------------------------------------------------------------

REPLAN_BINDING = 0.5  # a plan whose one-shot error is under this share of its budget was not bound by it
REPLAN_GAIN = 1.1     # plan again only where the plan left this much more budget to spend
REPLAN_STRETCH = 4.0  # a re-plan's one-shot budget is at most this many times the user's
REPLAN_ROUNDS = 2     # plans tried after the first: each costs a verification and a recovery


@dataclass
class _Accepted:
    """A plan that fits the budget: every layer's choice and reconstruction, to go back to."""

    alloc: Any
    e2e: EndToEnd
    state: list[tuple]
    speedup: float

    @classmethod
    def take(cls, layers: list[Layer], alloc, e2e: EndToEnd) -> "_Accepted":
        state = [(l, l.chosen, None if l.chosen is None else l.chosen.approx, l.recovered, l.received,
                  l.measured_error, l.measured_us) for l in layers]
        return cls(alloc, e2e, state, _plan_speedup(layers))

    def restore(self) -> None:
        for layer, chosen, approx, recovered, received, error, us in self.state:
            layer.chosen, layer.recovered, layer.received = chosen, recovered, received
            layer.measured_error, layer.measured_us = error, us
            if chosen is not None:
                chosen.approx = approx


def _plan_speedup(layers: list[Layer]) -> float:
    dense = sum(l.dense.predicted_us or 0.0 for l in layers)
    chosen = sum((l.chosen or l.dense).predicted_us or 0.0 for l in layers)
    return dense / chosen if chosen > 0 else 1.0


def stretched_budget(planned_at: float, recovered: float, budget: float) -> float:
    """The one-shot budget to plan at next. A plan at one-shot budget T spends about the same share
    of it, and recovery takes off about the same share again: the plan made at ``planned_at``
    recovered to ``recovered``, so one at planned_at * budget / recovered should recover to the
    budget. At most ``REPLAN_STRETCH`` budgets."""
    if recovered <= 0.0:
        return REPLAN_STRETCH * budget
    return min(planned_at * budget / recovered, REPLAN_STRETCH * budget)


def replan(frontend: Frontend, layers: list[Layer], options: Options, fingerprint, alloc, recovery,
           one_shot: EndToEnd, e2e: EndToEnd):
    """Spend what the plan left of the budget: it was chosen and verified on one-shot errors, the
    allocation may have stopped short of the budget, and recovery (where on) brought its error
    down further. Where enough of the budget is left (``REPLAN_GAIN``), plan again at a one-shot
    budget stretched by what is left, recover that plan, and keep it only if its final error (the
    larger of calibration and held-out) is within the user's budget and it is predicted faster;
    else the plan before stands. A plan over budget is followed by one between it and the last that
    fitted. Returns the allocation, end-to-end measurement and recovery summary of the plan kept,
    and one row per plan tried (the report's ``planning.replans``)."""
    rows: list[dict] = []
    if (options.error_budget <= 0 or not any(l.requested == "auto" for l in layers)
            or (recovery is not None and not recovery.refit)):
        return alloc, e2e, recovery, rows
    to_error = options.metric.to_error
    in_metric = options.metric.from_error  # the rows speak the user's metric, as the budget does

    def worst(result: EndToEnd) -> float:
        return to_error(max(result.measured_error or 0.0, result.heldout_error or 0.0))

    budget = options.error_budget
    accepted = _Accepted.take(layers, alloc, e2e)
    planned_at, over = budget, None  # one-shot budget of the plan accepted; of the last one over budget
    before, after = worst(one_shot), worst(e2e)
    current, passes = recovery, 0  # the kept plan's recovery; passes the plans tried cost
    for _ in range(REPLAN_ROUNDS):
        if over is None:
            if before < REPLAN_BINDING * planned_at:
                break  # the budget did not bind the plan: more of it buys nothing
            if all(h.index == len(h.points) - 1 for h in accepted.alloc.hulls):
                break  # every layer already takes its fastest candidate
            trial = stretched_budget(planned_at, after, budget)
        else:
            trial = math.sqrt(planned_at * over)
        if trial <= REPLAN_GAIN * planned_at:  # too little left to buy another rewrite
            break
        if current is not None:
            current.undo(layers)
        stretched = dataclasses.replace(options, error_budget=trial)
        trial_alloc = select(layers, stretched, fingerprint)
        trial_e2e = verify(frontend, layers, trial_alloc, stretched, before=e2e)
        while settle(layers, trial_alloc, fingerprint, stretched) or measure(frontend, layers, trial_alloc, stretched):
            trial_e2e = verify(frontend, layers, trial_alloc, stretched, before=trial_e2e)
        trial_one_shot = trial_e2e
        trial_recovery, trial_e2e = recover(frontend, layers, options, trial_e2e)
        passes += trial_recovery.passes if trial_recovery is not None else 0
        fits = worst(trial_e2e) <= budget
        speedup = _plan_speedup(layers)
        row = {"one_shot_budget": in_metric(trial), "one_shot_error": in_metric(worst(trial_one_shot)),
               "error": in_metric(worst(trial_e2e)),
               "rewritten": sum(1 for l in layers if l.chosen is not None and not l.chosen.is_dense),
               "predicted_layer_speedup": speedup, "kept": False}
        rows.append(row)
        e2e = dataclasses.replace(e2e, evaluations=trial_e2e.evaluations, heldout_evaluations=trial_e2e.heldout_evaluations)
        if fits and speedup > accepted.speedup:
            row["kept"] = True
            current = trial_recovery
            accepted = _Accepted.take(layers, trial_alloc, trial_e2e)
            planned_at, before, after = trial, worst(trial_one_shot), worst(trial_e2e)
            continue
        if trial_recovery is not None:
            trial_recovery.undo(layers)
        accepted.restore()
        if not fits and over is None:
            over = trial
        else:
            break
    counts = dict(evaluations=e2e.evaluations, heldout_evaluations=e2e.heldout_evaluations)
    if current is not None:  # the report counts every pass recovery made, for every plan tried
        current.passes = recovery.passes + passes
    for row in rows:
        accepted.alloc.history.append(
            f"re-planned at a one-shot budget of {row['one_shot_budget']:.4g} with what the plan left: "
            f"{row['rewritten']} rewritten, {row['one_shot_error']:.4g} one shot, {row['error']:.4g} "
            f"{'recovered' if recovery is not None else 'measured'}, {'kept' if row['kept'] else 'not kept'}")
    return accepted.alloc, dataclasses.replace(accepted.e2e, **counts), current, rows


# -- lower ------------------------------------------------------------------------------------


def lower(frontend: Frontend, layers: list[Layer]):
    return frontend.lower(layers)


# -- check ------------------------------------------------------------------------------------


def check(frontend: Frontend, layers: list[Layer], lowered, options: Options) -> tuple[Check, float | None]:
    """Run the lowered graph as the front-end's runtime does (its error, its time against the
    original). With ``measure``, an automatically planned graph that times slower than the original
    end to end is not used: every layer is kept dense, saying why; returns the measured speed-up
    then. A plan that forces a rewrite is timed, not vetoed, as each forced layer is: it is kept,
    with a warning that gives the figure."""
    if not options.lower:
        return Check(), None
    checked = frontend.check(lowered, layers, options)
    rewritten = [l for l in layers if l.chosen is not None and not l.chosen.is_dense]
    speedup = checked.speedup
    if not (options.measure and rewritten and speedup is not None and speedup < 1.0):
        return checked, None
    forced = [l for l in rewritten if l.forced_by is not None]
    if forced:
        checked.warnings.append(
            f"the rewritten model measured {speedup:.2f}x of the original end to end, slower; kept because the plan "
            f"forces {len(forced)} of its {len(rewritten)} rewritten layers ({forced[0].name}: {forced[0].chosen.fmt}"
            f"{', ...' if len(forced) > 1 else ''}); remove those entries to let --measure keep the model dense")
        return checked, None
    for layer in rewritten:
        why = (f"{layer.chosen.fmt} was planned, but the rewritten model measured {speedup:.2f}x of the "
               "original end to end, so with --measure every layer was kept dense")
        layer.chosen.rejected_because = why
        layer.kept_dense = why
        layer.chosen, layer.measured_error, layer.measured_us = layer.dense, 0.0, None
    return Check(warnings=checked.warnings, end_to_end=checked.end_to_end), speedup


def shared_weight_warnings(layers: list[Layer]) -> list[str]:
    """One weight called at several sites (a layer shared across depth, as ALBERT shares its blocks)
    is planned per call, each call fitted to its own inputs: where any call is rewritten, the
    rewritten model stores a weight per rewritten call beside the one the dense calls still read.
    Where they store more values than the shared weight, says so with the count, so that a model
    shared to save memory is not silently unshared."""
    groups: dict[tuple, list[Layer]] = {}
    for layer in layers:
        w = layer.site.weight  # the same memory, whatever tensor object each site holds it by
        key = (w.device, w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
        groups.setdefault(key, []).append(layer)
    out = []
    for group in groups.values():
        rewritten = [l for l in group if l.chosen is not None and not l.chosen.is_dense]
        if len(group) < 2 or not rewritten:
            continue
        N, K = group[0].site.N, group[0].site.K
        stored = sum(l.chosen.spec.stored_params(N, K) for l in rewritten)
        stored += N * K if len(rewritten) < len(group) else 0
        if stored <= N * K:
            continue  # the fits together still store no more than the shared weight
        formats = ", ".join(f"{fmt} x{n}" for fmt, n in Counter(l.chosen.fmt for l in rewritten).items())
        out.append(f"{group[0].name}'s weight is called at {len(group)} sites ({', '.join(l.name for l in group[:3])}"
                   f"{', ...' if len(group) > 3 else ''}); each rewritten call stores its own fit ({formats}"
                   f"{'' if len(rewritten) == len(group) else f', {len(group) - len(rewritten)} dense'}): "
                   f"{stored:,} values stored where the model shares {N * K:,}; where memory matters more, "
                   f"keep them dense with a plan entry")
    return out


def _kept_dense_warning(frontend: Frontend, speedup: float) -> str:
    return (f"the rewritten model measured {speedup:.2f}x of the original end to end, slower: with --measure the "
            f"{frontend.kept_as}")


# -- rest -------------------------------------------------------------------------------------


def rest(frontend: Frontend, fingerprint, options: Options) -> tuple[float | None, float, dict[str, float] | None]:
    """Predicted time of the graph outside its linear layers in the dense plan, how much of it
    the lowered layers' launches absorb (their fused epilogues: 0 when nothing was folded), and the
    first by kind of kernel. An estimate only: an op it cannot read leaves the rest unpriced
    (logged), never the compile failed."""
    try:
        found = frontend.rest_of_graph()
        lowered = frontend.rest_of_graph(fused=True) if frontend.lowering_notes() else found
    except Exception as exc:  # noqa: BLE001 - a graph the estimate cannot read still compiles
        log.warning("graph %s: the rest of the graph was not priced (%s: %s); the end-to-end prediction "
                    "counts the linear layers only", frontend.graph, type(exc).__name__, exc)
        return None, 0.0, None
    by_kind = price_rest_by_kind(found, fingerprint, options.cost_mode)
    rest_us = None if by_kind is None else sum(by_kind.values(), 0.0)
    left_us = price_rest(lowered, fingerprint, options.cost_mode)
    fused_us = max(rest_us - left_us, 0.0) if rest_us is not None and left_us is not None else 0.0
    return rest_us, fused_us, by_kind


# -- plan and report --------------------------------------------------------------------------


def plan_of(layers: list[Layer], fingerprint, options: Options, banks: list[dict] = ()) -> Plan:
    """What was chosen, as a plan that replays it: each layer's format and each expert bank's form."""
    return Plan(
        layers={l.name: (l.chosen.fmt if l.chosen is not None else "dense") for l in layers},
        fingerprint=fingerprint.name,
        error_budget=options.error_budget,
        experts={b["name"]: (b.get("expert_format") or {}).get("form") or "dense" for b in banks
                 if "expert_format" in b},
    )


def report_of(frontend: Frontend, layers, skipped, e2e: EndToEnd, fingerprint, options: Options,
              rest_us: float | None = None, fused_us: float = 0.0, stacked_us: float = 0.0, *,
              checked: Check | None = None, kept_dense_speedup: float | None = None,
              budget: float | None = None, rest_kinds: dict[str, float] | None = None) -> dict:
    """The report of one graph, from what the steps found (``budget``: the user's, where the graph
    was planned within a share of it)."""
    from sparsec.reasons import candidate_rejections, layer_reason

    checked = checked or Check()
    spent = sum((l.chosen.predicted_error ** 2) for l in layers if l.chosen is not None and not l.chosen.is_dense)
    for layer in layers:
        own = layer.chosen.predicted_error ** 2 if layer.chosen is not None and not layer.chosen.is_dense else 0.0
        layer.budget_left = math.sqrt(max(options.error_budget ** 2 - (spent - own), 0.0))
    measured = options.measure and options.lower
    rows = []
    for layer in layers:
        site, chosen = layer.site, layer.chosen or layer.dense
        candidate_rejections(layer, options, fingerprint)
        row = {
            "name": site.name,
            "op": site.op,
            "graph": site.graph,
            "shape": [site.N, site.K],
            "tokens": layer.tokens,
            "dtype": site.dtype_name,
            "format": chosen.fmt,
            "declared_sparsity": round(chosen.spec.declared_sparsity(site.N, site.K), 6),
            "predicted_us_dense": _num(layer.dense.predicted_us),
            "predicted_us": _num(chosen.predicted_us),
            "predicted_speedup": _num(layer.speedup(chosen)),
            "predicted_error": _num(chosen.predicted_error),
            "measured_error": _num(layer.measured_error),
            "measured_speedup": _ratio(layer.measured_us_dense, layer.measured_us),
            "kernel": chosen.kernel,
            "method": chosen.method,
            "reason": layer_reason(layer, options, fingerprint),
            **({"recovery": {"one_shot_error": _num(layer.recovered[0]), "recovered_error": _num(layer.recovered[1])}}
               if layer.recovered is not None else {}),
            **_calibrated(layer),
            "candidates": [
                {
                    "format": c.fmt,
                    "predicted_us": _num(c.predicted_us),
                    "predicted_error": _num(c.predicted_error),
                    "predicted_speedup": _num(layer.speedup(c)),
                    "declared_sparsity": round(c.spec.declared_sparsity(site.N, site.K), 6),
                    "rejected_because": c.rejected_because if c is not chosen else None,
                }
                for c in layer.candidates
            ],
        }
        if row["measured_speedup"] is not None:
            row["measured_us"], row["measured_us_dense"] = layer.measured_us, layer.measured_us_dense
        elif measured and chosen.is_dense:
            row["measured_speedup"] = 1.0
        rows.append(row)
    dense_total = sum(r["predicted_us_dense"] or 0.0 for r in rows)
    chosen_total = sum(r["predicted_us"] or 0.0 for r in rows)
    rewritten = sum(1 for r in rows if r["format"] != "dense")
    speedup = (dense_total / chosen_total) if chosen_total > 0 else None
    timed = [l for l in layers if l.measured_us and l.measured_us_dense]
    end_to_end = {
        "metric": options.metric.describe(),
        "measured_error": _num(e2e.measured_error if checked.measured_error is None else checked.measured_error),
        "heldout_error": _num(e2e.heldout_error if checked.heldout_error is None else checked.heldout_error),
        "predicted_speedup": None,
        "predicted_us_rest": _num(rest_us),
        "predicted_us_rest_by_kind": ({kind: _num(us) for kind, us in sorted(rest_kinds.items())}
                                      if rest_kinds is not None and rest_us is not None else None),
        "predicted_us_fused": _num(fused_us) if rest_us is not None else None,
        "predicted_us_stacked": _num(stacked_us),
        "measured_speedup": checked.speedup,
    }
    if checked.measured_us is not None:
        end_to_end.update(measured_us=checked.measured_us, measured_us_dense=checked.measured_us_dense)
    if checked.timing:
        end_to_end["timing"] = checked.timing
    if rest_us is None and dense_total and chosen_total and checked.measured_us_rest is not None:
        # onnxruntime's fusions leave the rest of the graph unpriceable from the graph alone: it is
        # measured (passes/onnx_check.py, without_layers)
        rest_us = checked.measured_us_rest
        end_to_end.update(predicted_us_rest=rest_us, predicted_us_rest_source=(
            "measured: the original model with each layer's product cut to one input feature, less what "
            "that stand-in costs (timed with two of them)"))
    rest_dense = rest_us or 0.0
    end_to_end["predicted_speedup"] = _ratio(dense_total + rest_dense, chosen_total - stacked_us + rest_dense - fused_us)
    if kept_dense_speedup is not None:
        end_to_end["kept_dense_measured_speedup"] = kept_dense_speedup
    end_to_end.update(checked.end_to_end)
    from sparsec import __version__

    return {
        "schema": "sparsec.report/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sparsec_version": __version__,
        "entry": frontend.entry,
        "device": frontend.device_name(),
        "fingerprint": {"name": fingerprint.name, "device": fingerprint.device.get("name"), "hash": fingerprint.hash},
        "error_budget": options.error_budget if budget is None else budget,
        "mode": options.mode,
        "layers": rows,
        "skipped": [{"name": s.name, "op": s.op, "reason": s.reason, "graph": frontend.graph} for s in skipped],
        "totals": {
            "layers": len(rows),
            "rewritten": rewritten,
            "predicted_us_dense": _num(dense_total),
            "predicted_us": _num(chosen_total),
            "predicted_speedup": _num(speedup),
            "measured_speedup": _ratio(sum(l.measured_us_dense for l in timed), sum(l.measured_us for l in timed)),
        },
        "end_to_end": end_to_end,
        "warnings": [],
        **frontend.describe(),
    }


def _calibrated(layer: Layer) -> dict:
    """What the chosen format learned from calibration data, where it learns anything (act: the
    threshold and the fraction of calibration inputs under it), as ``{"calibrated": {...}}``."""
    from sparsec.passes.registry import HANDLERS

    chosen = layer.chosen
    describe = None if chosen is None or chosen.is_dense else getattr(HANDLERS.get(chosen.spec.family), "describe", None)
    if describe is None:
        return {}
    stats = layer.received or layer.stats
    return {"calibrated": {k: _num(v) for k, v in describe(chosen.weight(), stats).items()}}


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _ratio(a, b):
    return _num(a / b) if a and b else None
