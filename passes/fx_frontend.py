"""The FX front-end: one Dynamo subgraph (or traced module) seen through the pipeline's protocol."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.candidates import Layer
from sparsec.launches import LaunchGroup
from sparsec.passes import capture_fx, rewrite_fx
from sparsec.output_error import output_error
from sparsec.passes.interpret_fx import SiteInterpreter, empty_stats, flatten_outputs
from sparsec.progress import advance_current
from sparsec.sites import Site, SiteStats, Skipped


@dataclass
class Traced:
    """A calibration or held-out call whose shapes the graph was not traced for, with the graph
    Dynamo traced for its own shapes (the same code and parameters) and that graph's inputs."""

    gm: fx.GraphModule
    args: list
    nodes: dict  # site name -> node, captured while Dynamo's metadata was on the graph


@dataclass
class FirstReturned:
    """The first float tensor the user's model returned on the example: the output a metric reads
    when none is named, found among a graph's outputs (which Dynamo may order otherwise)."""

    probe: torch.Tensor


class FxFrontend:
    kept_as = "graph runs dense, as traced"

    def __init__(self, gm: fx.GraphModule, example_inputs, calibration: list[list], heldout: list[list] | None = None,
                 *, graph: int = 0, entry: str = "torch.compile", mode: str = "default",
                 warnings: list[str] | None = None, earlier_names: set[str] | frozenset = frozenset(),
                 names: dict[int, str] | None = None, metric=None, output=None):
        self.gm = gm
        self.names = names or {}  # see ConstantFolder: the user's parameters' names in the whole model
        self.metric = metric  # sparsec.metrics.Metric (None: rel_l2)
        # which float output the metric reads: an index, or a tensor the user's model returned under
        # the name they gave (found among the graph's outputs on the example inputs), or None
        self.output = output
        self._output_index: int | None = None
        self.warnings = list(warnings or [])  # the entry's, about this graph's inputs
        self.earlier_names = earlier_names  # layers of the graphs of the same model compiled before this one
        self.example_inputs = list(example_inputs)
        self.run_inputs = capture_fx.concrete_inputs(example_inputs)  # the example, runnable (sizes as traced)
        self.calibration = calibration
        self.heldout = heldout or []
        self.graph = graph
        self.entry = entry
        self.mode = mode
        self.sites: dict[str, Site] = {}
        self.nodes: dict[str, fx.Node] = {}
        self.modules: dict = {}  # the packed linears ``lower`` built, by site name
        self.fused: dict = {}    # what ``rewrite`` folded into launches: "epilogues", "absorbed"
        self._references: list[list[torch.Tensor]] = []
        self._heldout_references: list[list[torch.Tensor]] | None = None
        self.pruned: dict = {}  # expert-bank node name -> the experts it keeps (passes/experts_prune.py)
        self.bank_names: list[str] = []  # the expert banks this graph holds
        self._references_of_experts = False  # the dense outputs were taken before banks dropped experts
        self._prefixes = None  # the dense graph's state before some layers, per calibration call (prefix_fx)

    # -- protocol ---------------------------------------------------------------------------

    def capture(self) -> tuple[list[Site], list[Skipped]]:
        sites, skipped, nodes = capture_fx.capture(self.gm, self.example_inputs, self.graph, self.names)
        self.sites = {s.name: s for s in sites}
        self.nodes = nodes
        return sites, skipped

    def experts(self, fingerprint=None, cost_mode: str = "eager", options=None) -> tuple[list[dict], list[Skipped]]:
        """Expert banks (passes/experts_fx.py): each running sparsec's op gets the implementation
        measured fastest on its calibration routing, then, with ``options``, drops the experts
        calibration routes almost nothing to where the budget allows; the report's rows, and banks
        left as traced."""
        from sparsec.passes import experts_fx

        banks, skipped = experts_fx.find_banks(self.gm, self.example_inputs, self.graph, self.names)
        self.bank_names = [b.name for b in banks]
        if not banks:
            return [], skipped
        for gm, _, args in map(self._run_of, self.calibration or [self.run_inputs]):
            experts_fx.record(gm, banks, [args])
        replay = self.mode == "reduce-overhead"
        rows = experts_fx.choose(self.gm, banks, graph_replay=replay, fingerprint=fingerprint, cost_mode=cost_mode)
        if options is not None:
            self._prune(banks, rows, options, fingerprint)
        return rows, skipped

    def _prune(self, banks, rows, options, fingerprint) -> None:
        from sparsec.metrics import metric_of
        from sparsec.passes import experts_fx

        replay = self.mode == "reduce-overhead"
        forced = experts_fx.forced_forms(banks, options.plan)

        def rewritten() -> dict:
            return {b.node.name: b.structured or b.pruning for b in banks
                    if b.structured is not None or b.pruning is not None}

        why = None
        if options.expert_pruning <= 0:
            why = "expert_pruning is 0"
        else:
            missing = [item for item in self.calibration + self.heldout
                       if not all(name in self._bank_nodes(self._run_of(item)[0]) for name in (b.node.name for b in banks))]
            if missing or not self.calibration:
                why = ("a calibration input of other shapes runs a graph without the same banks, where a rewritten "
                       "bank could not be checked" if missing else "no calibration data to measure its error on")
        if why is not None:
            experts_fx.refuse_pruning(rows, f"no expert dropped: {why}", f"experts kept dense: {why}")
            if forced:  # what the plan asks for runs whatever the budget allows
                experts_fx.structure(banks, rows, None, 0.0, graph_replay=replay, fingerprint=fingerprint,
                                     forced=forced, refused=f"experts kept dense: {why}")
                self.pruned = rewritten()
            return
        metric = self.metric or metric_of(None)
        with torch.no_grad():  # the dense model's outputs, before any bank drops an expert
            self._references = [flatten_outputs(gm(*args)) for gm, _, args in map(self._run_of, self.calibration)]
        self._references_of_experts = True
        self._heldout_refs()

        def evaluate() -> float:
            self.pruned = rewritten()
            error = self.evaluate({})[0]
            held = self.evaluate({}, heldout=True)[0] if self.has_heldout() else 0.0
            return max(error, held)

        # the planning options carry the budget on the planner's scale: back to the metric's units
        allowed = options.expert_pruning * metric.from_error(options.error_budget)
        experts_fx.prune(banks, rows, evaluate, allowed, graph_replay=replay,
                         fingerprint=fingerprint, cost_mode=options.cost_mode, show=metric.show)
        experts_fx.structure(banks, rows, evaluate, allowed, graph_replay=replay, fingerprint=fingerprint,
                             show=metric.show, forced=forced)
        self.pruned = rewritten()

    def calibrate(self, sites: list[Site]) -> dict[str, SiteStats]:
        from sparsec.passes.prefix_fx import Prefixes

        stats = empty_stats(sites)
        references = []
        # graphs with expert banks are left out: a bank that drops experts changes what comes after it
        prefixes = Prefixes(self.gm, [self.nodes[s.name] for s in sites if s.name in self.nodes],
                            len(self.calibration)) if not self.bank_names else None
        with torch.no_grad():
            for item in self.calibration:
                advance_current()
                gm, nodes, args = self._run_of(item)
                if prefixes is not None:
                    prefixes.record()  # a call of other shapes runs another graph: nothing kept for it
                out = SiteInterpreter(gm, nodes, self.sites, stats=stats, banks=self._banks_in(gm),
                                      prefixes=prefixes if gm is self.gm else None).run(*args)
                references.append(flatten_outputs(out))
        self._prefixes = prefixes
        if not self._references_of_experts:  # else the outputs before banks dropped experts stand
            self._references = references
        return stats

    def recalibrate(self, names: set[str], replacements: dict[str, torch.Tensor],
                    reference: dict[str, torch.Tensor] | None = None):
        """Gram statistics of the named sites' inputs as they arrive when ``replacements`` run in
        place of their layers' weights (sequential recovery), one pass over the calibration data;
        with a ``reference`` (weights to run instead, ``{}`` for the dense graph) also, per input,
        (X_r^T X_r, X_r^T X) where X_r is what the graph running ``reference`` gives that input (a
        second pass per calibration call): ``(stats, products)``."""
        stats = empty_stats([self.sites[n] for n in names])
        products = {key: (torch.zeros_like(st.gram), torch.zeros_like(st.gram)) for key, st in stats.items()} \
            if reference is not None else None
        with torch.no_grad():
            for item in self.calibration:
                advance_current()
                gm, nodes, args = self._run_of(item)
                pairs = None
                if products is not None:
                    reference_inputs = dict.fromkeys(stats)
                    _run_until_seen(SiteInterpreter(gm, nodes, self.sites, inputs=reference_inputs, replacements=reference,
                                                    banks=self._banks_in(gm), stop_when_seen=stats), args)
                    for key, (d, c) in products.items():
                        if d.device != reference_inputs[key].device:
                            products[key] = (d.to(reference_inputs[key].device), c.to(reference_inputs[key].device))
                    pairs = {key: (reference_inputs[key], products[key]) for key in stats}
                _run_until_seen(SiteInterpreter(gm, nodes, self.sites, stats=stats, replacements=replacements, pairs=pairs,
                                                banks=self._banks_in(gm),
                                                stop_when_seen=stats), args)
        return (stats, products) if reference is not None else stats

    def masked_products(self, thresholds: dict[str, float], replacements: dict[str, torch.Tensor]) -> dict:
        """Per named site, ``MaskedProducts`` over the calibration data: X the inputs it receives
        when ``replacements`` run in place of their layers' weights, S that X with every entry under
        the site's threshold set to zero (what an ``act`` layer multiplies); one pass, float64 up to
        8192 inputs (float32 above, as the Gram statistics). For recovery's refit of ``act``
        weights (sparsec.recovery)."""
        from sparsec.activation import masked

        keys = {self.sites[n].input_key for n in thresholds}
        out: dict[str, MaskedProducts] = {}
        with torch.no_grad():
            for item in self.calibration:
                advance_current()
                gm, nodes, args = self._run_of(item)
                inputs = dict.fromkeys(keys)
                _run_until_seen(SiteInterpreter(gm, nodes, self.sites, inputs=inputs, replacements=replacements,
                                                banks=self._banks_in(gm), stop_when_seen=keys), args)
                for name, t in thresholds.items():
                    x = inputs[self.sites[name].input_key]
                    if x is None:
                        continue
                    x = x.to(torch.float64 if x.shape[1] <= 8192 else torch.float32)  # as SiteStats.empty
                    sx = masked(x, t)
                    if name not in out:
                        K = x.shape[1]
                        out[name] = MaskedProducts(x.new_zeros(K, K), x.new_zeros(K, K), x.new_zeros(K, K),
                                                   x.new_zeros(K))
                    out[name].add(x, sx)
        return out

    def evaluate(self, replacements: dict[str, torch.Tensor], heldout: bool = False,
                 per_layer: bool = True, calls: int | None = None) -> tuple[float, dict[str, float]]:
        """The metric on the calibration (or held-out) calls with ``replacements`` in place, and each
        replaced layer's own relative output error; ``per_layer=False`` leaves the latter out (empty),
        and with it the dense product each replaced layer would run beside its replacement.
        ``calls``: only the first that many calls."""
        data = self.heldout if heldout else self.calibration
        data = data if calls is None else data[:calls]
        refs = self._heldout_refs() if heldout else self._references
        local: dict[str, torch.Tensor] = {}  # per layer: [squared error, energy], summed over the calls
        outs = []
        # the dense graph's state kept before the first replaced layer, where one was (calibration only)
        prefixes = self._prefixes if not heldout and replacements and not self.pruned else None
        with torch.no_grad():
            for index, item in enumerate(data):
                gm, nodes, args = self._run_of(item)
                env = None
                if prefixes is not None and gm is self.gm:
                    first = min((nodes[n] for n in replacements if n in nodes), key=prefixes.order.__getitem__, default=None)
                    env = prefixes.start(index, first) if first is not None else None
                out = SiteInterpreter(gm, nodes, self.sites, replacements=replacements,
                                      local=local if per_layer else None, banks=self._banks_in(gm)).run(*args, initial_env=env)
                outs.append(flatten_outputs(out))
        sums = {name: acc.tolist() for name, acc in local.items()}
        errors = {name: (num / den) ** 0.5 if den > 0 else 0.0 for name, (num, den) in sums.items()}
        return output_error(outs, refs, self.metric, self.output_index()), errors

    def calibration_calls(self) -> int:
        return len(self.calibration)

    def output_loss(self, index: int, replacements: dict[str, torch.Tensor]) -> torch.Tensor:
        """The metric's differentiable stand-in (``Metric.loss``) on calibration call ``index`` with
        ``replacements`` running in place of their layers' weights: what recovery's distillation
        descends. Gradients flow to whatever the replacements were made from."""
        from sparsec.metrics import loss_of, metric_of

        gm, nodes, args = self._run_of(self.calibration[index])
        with torch.enable_grad():
            out = SiteInterpreter(gm, nodes, self.sites, replacements=replacements, banks=self._banks_in(gm)).run(*args)
            return loss_of(self.metric or metric_of(None), flatten_outputs(out, detach=False), self._references[index],
                           self.output_index())

    def output_index(self) -> int | None:
        """The float output the metric reads (None: its default)."""
        if self.output is None or isinstance(self.output, int):
            return self.output
        if isinstance(self.output, FirstReturned):
            if self._output_index is None:
                from sparsec.errors import OptionError

                try:
                    self._output_index = find_output(self.gm, self.run_inputs, self.output.probe)
                except OptionError:  # a subgraph before the model's last: what it hands on
                    self._output_index = 0
            return self._output_index
        if self._output_index is None:
            self._output_index = find_output(self.gm, self.run_inputs, self.output)
        return self._output_index

    def has_heldout(self) -> bool:
        return bool(self.heldout)

    def launch_groups(self) -> list[LaunchGroup]:
        """The sets of layers the lowering runs as one launch over stacked weights."""
        from sparsec.codegen import GroupMember

        groups: dict[int, list[str]] = {}
        for name, module in self.modules.items():
            if isinstance(module, GroupMember):
                groups.setdefault(id(module.group), []).append(name)
        out = []
        for names in groups.values():
            linear = self.modules[names[0]].group.linear
            ordered = tuple(sorted(names, key=lambda n: self.modules[n].index))
            out.append(LaunchGroup(ordered, str(linear.spec), tuple(linear.shape)))
        return out

    def lowering_notes(self) -> list[str]:
        """What the lowering folded into the layers' launches (their epilogues), a line each."""
        return list(self.fused.get("epilogues", []))

    def rest_of_graph(self, fused: bool = False):
        """The kernels the graph launches outside its sites (``sparsec.rest``), from traced shapes;
        ``fused``: as lowered, without what the rewritten layers' epilogues absorbed."""
        from sparsec.passes.rest_fx import rest_of_graph

        absorbed = self.fused.get("absorbed", []) if fused else []
        return rest_of_graph(self.gm, self.example_inputs, self.nodes.values(), absorbed)

    def lower(self, layers: list[Layer]):
        self.modules = rewrite_fx.packed_modules(layers)
        return self.lower_modules(self.modules)

    def lower_modules(self, modules: dict):
        """The graph with the named sites calling ``modules`` (packed linears), compiled for its device."""
        self.fused = {}
        rewritten = rewrite_fx.rewrite(self.gm, self.nodes, self.sites, modules, notes=self.fused)
        if self.pruned:
            from sparsec.passes.experts_fx import apply_pruning

            rewritten = apply_pruning(rewritten, self.pruned)
        if self._use_inductor():
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = list_mode_options(self.mode)
            return compile_inlined(rewritten, lambda g: compile_fx(g, self.example_inputs, config_patches=patches))
        return rewritten

    def time_layer(self, layer: Layer, cand, options) -> tuple[float, float]:
        """(dense us, candidate us) of one layer at its token count, with torch on its weight's device."""
        from sparsec import measure

        return measure.time_layer(layer, cand, options, measure.rotation_for(self.sites.values()))

    def check(self, lowered, layers: list[Layer], options):
        """With ``measure``: the lowered graph timed against its dense self compiled the same way
        (inductor on CUDA, eager on CPU), in this process."""
        from sparsec.pipeline import Check

        if not options.measure or lowered is None:
            return Check()
        from sparsec import measure

        rewritten = any(l.chosen is not None and not l.chosen.is_dense for l in layers)
        dense = self.original() if rewritten else None
        dense_us, us = measure.time_graph(lowered, dense, self.run_inputs)
        return Check(measured_us=us, measured_us_dense=dense_us)

    def original(self):
        """The graph as traced: inductor's compile on CUDA, the FX graph itself on the CPU."""
        return dense_graph(self.gm, self.example_inputs, self.mode)

    def notes(self, layers: list[Layer], skipped, options, fingerprint) -> list[str]:
        """Plan entries no layer compiled so far matches; frozen weights under autograd; the last
        compile Dynamo allows; a fingerprint of another device."""
        notes = []
        if options.plan is not None:
            names = sorted(set(self.earlier_names) | {l.name for l in layers} | {s.name for s in skipped})
            unmatched = options.plan.describe_unmatched(names, "the graphs compiled so far", banks=self.bank_names)
            if unmatched:
                notes.append(f"graph {self.graph}: {unmatched}")
        frozen = [l.name for l in layers if l.chosen is not None and not l.chosen.is_dense]
        trainable = any(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in self.example_inputs)
        if frozen and trainable and torch.is_grad_enabled() and options.lower:
            notes.append(
                f"graph {self.graph} was compiled with autograd on: gradients flow through the rewritten layers to "
                f"their inputs, but their packed weights are frozen ({', '.join(frozen[:3])}"
                f"{', ...' if len(frozen) > 3 else ''} get no gradient); sparsec is for inference, call the "
                f"model under torch.no_grad() or torch.inference_mode()")
        last = last_compile_warning(self.graph) if options.lower and self.modules else None
        if last:
            from sparsec.logs import logger

            logger.warning("%s", last)
            notes.append(last)
        mismatch = fingerprint.matches_current_device(self.device_kind())
        if mismatch:
            notes.append(mismatch)
        guessed = self._output_guessed(options)
        if guessed:
            notes.append(guessed)
        return notes

    def _output_guessed(self, options) -> str | None:
        """Where the metric reads one output, none was named and the entry could not run the model to
        find its first: which graph output that is, among several of other shapes."""
        metric = options.metric
        if self.output is not None or metric is None or metric.reads_every_output or not self._references:
            return None
        shapes = [tuple(t.shape) for t in self._references[0]]
        if len(set(shapes)) < 2:
            return None
        listed = ", ".join(f"{i}: {tuple(s)}" for i, s in enumerate(shapes[:8])) + (", ..." if len(shapes) > 8 else "")
        return (f"graph {self.graph}: metric {metric.name} reads this graph's first float output, of shape "
                f"{shapes[0]}, one of {len(shapes)} ({listed}); a graph traced by torch.compile can list other "
                "outputs (a language model's updated key/value cache) before the model's own. Name the one to read "
                "with option output=<index>, or use sparsec.optimize, which finds the model's first output itself")

    def describe(self) -> dict:
        return {}

    def device_kind(self) -> str:
        """Where the graph runs: "cuda" or "cpu"."""
        return "cuda" if self._device().type == "cuda" else "cpu"

    def device_name(self) -> str:
        from sparsec.fingerprint.device import current_device_name

        dev = self._device()
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        return current_device_name("cpu")

    # -- helpers ----------------------------------------------------------------------------

    def _bank_nodes(self, gm) -> dict[str, fx.Node]:
        from sparsec.passes.experts_fx import is_experts_op

        return {n.name: n for n in gm.graph.nodes if is_experts_op(n)}

    def _banks_in(self, gm) -> dict:
        """The pruned banks as nodes of ``gm`` (the graph a calibration call of other shapes runs
        names its banks as the example's graph does)."""
        if not self.pruned:
            return {}
        nodes = self._bank_nodes(gm)
        return {nodes[name]: p for name, p in self.pruned.items() if name in nodes}

    def _device(self) -> torch.device:
        for t in self.example_inputs:
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")

    def _use_inductor(self) -> bool:
        """On CUDA the dense rest goes to inductor; on CPU the rewritten graph runs as plain torch."""
        return self._device().type == "cuda"

    def _heldout_refs(self):
        if self._heldout_references is None:
            with torch.no_grad():
                refs = []
                for item in self.heldout:
                    gm, _, args = self._run_of(item)
                    refs.append(flatten_outputs(gm(*args)))
                self._heldout_references = refs
        return self._heldout_references

    def _run_of(self, item) -> tuple[fx.GraphModule, dict[str, fx.Node], list]:
        """The graph a calibration or held-out call runs through, its site nodes, and its inputs."""
        if not isinstance(item, Traced):
            return self.gm, self.nodes, item
        missing = sorted(set(self.sites) - set(item.nodes))
        if missing:
            from sparsec.errors import ModelError

            raise ModelError(
                f"the graph traced for a calibration input of other shapes lacks layer(s) {', '.join(missing[:3])}: "
                "the model takes another path at those shapes; calibrate with inputs of the example's shapes")
        return item.gm, item.nodes, item.args


def dense_graph(gm, example_inputs, mode: str | None):
    """The graph as traced: inductor's compile on CUDA, the FX graph itself on the CPU."""
    on_cuda = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
    if not on_cuda:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode or "default")
    return compile_inlined(gm, lambda g: compile_fx(g, example_inputs, config_patches=patches))


def compile_inlined(gm, compile):
    """``compile(gm)`` with its ``inline`` expert banks' ops in the graph (``inline_banks``); where
    that does not compile, ``compile(gm)`` as traced (the banks run inside the op, as ``grouped_mm``)
    with a warning: the dense fallback must compile whatever went wrong before it."""
    from sparsec.passes.experts_fx import inline_banks

    inlined = inline_banks(gm)
    if inlined is not gm:
        try:
            return compile(inlined)
        except Exception as exc:  # noqa: BLE001 - any failure: the op computes the same
            import warnings

            first = str(exc).splitlines()[0] if str(exc) else ""
            warnings.warn(f"expert banks chosen 'inline' run inside sparsec's op instead (grouped_mm): the "
                          f"graph with their ops inlined did not compile ({type(exc).__name__}: {first})",
                          stacklevel=2)
    return compile(gm)


def last_compile_warning(graph: int) -> str | None:
    """Why the next model instance or input signature may silently run dense, when this compile of
    the traced function is the last Dynamo allows.

    A graph with packed layers is guarded on its own weights, so every instance of a model class
    compiles its own graph, and all of them count against Dynamo's per-function limit
    (``recompile_limit``, 8 by default); past it Dynamo runs the function eagerly, without the
    backend, and only its own log says so."""
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # noqa: BLE001 - not inside a Dynamo compile (e.g. a direct call in a test)
        return None
    config = torch._dynamo.config
    limit = getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8)
    if cid is None or cid.frame_compile_id is None or cid.frame_compile_id + 1 < limit:
        return None
    return (f"graph {graph} is compile {cid.frame_compile_id + 1} of this function, Dynamo's limit "
            f"(torch._dynamo.config.recompile_limit = {limit}): a further model instance of this class, input "
            "shape or dtype will run eagerly, dense, without sparsec. Each instance compiled with sparsec is "
            "guarded on its own weights and compiles its own graph; for many instances use sparsec.optimize(model, "
            "...), which gives every call its own entry, or raise the limit")


@dataclass
class MaskedProducts:
    """Sums over calibration rows of an ``act`` layer's inputs X and their kept part S."""

    kept_gram: torch.Tensor  # S^T S
    cross: torch.Tensor  # S^T X
    gram: torch.Tensor  # X^T X
    total: torch.Tensor  # the rows of X summed
    rows: int = 0

    def add(self, x: torch.Tensor, sx: torch.Tensor) -> None:
        self.kept_gram.addmm_(sx.T, sx)
        self.cross.addmm_(sx.T, x)
        self.gram.addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.rows += int(x.shape[0])


def _run_until_seen(interpreter, args) -> None:
    """Run until every watched input has arrived (``Seen``) or the graph ends."""
    from sparsec.passes.interpret_fx import Seen

    try:
        interpreter.run(*args)
    except Seen:
        pass


def find_output(gm, example_inputs, probe: torch.Tensor) -> int:
    """The index among ``gm``'s float outputs on ``example_inputs`` of the one equal to ``probe``
    (what the user's model returned under the name the user gave)."""
    from sparsec.errors import OptionError

    with torch.no_grad():
        outs = flatten_outputs(gm(*example_inputs))
    shaped = [i for i, t in enumerate(outs) if tuple(t.shape) == tuple(probe.shape)]
    if not shaped:
        raise OptionError(f"the output named by option 'output' (shape {tuple(probe.shape)}) is not among this "
                          f"graph's {len(outs)} float outputs; it may come from another subgraph: give its index "
                          "instead")
    if len(shaped) == 1:  # the only one of its shape, however far 16-bit rounding through a deep graph moved it
        return shaped[0]
    scale = float(probe.double().abs().max()) or 1.0
    off = {i: float((outs[i].double() - probe.double().to(outs[i].device)).abs().max()) / scale for i in shaped}
    best = min(off, key=off.get)
    tolerance = 1e-3 if probe.dtype in (torch.float32, torch.float64) else 5e-2
    if off[best] > tolerance:
        raise OptionError(f"the output named by option 'output' (shape {tuple(probe.shape)}) matches none of this "
                          f"graph's {len(shaped)} outputs of that shape (nearest off by {off[best]:.2g} of its "
                          "largest value); give its index instead")
    return best
