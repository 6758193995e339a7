"""The ONNX front-end: one ONNX graph seen through the pipeline's ``Frontend`` protocol.

Calibration and error evaluation both run the model in onnxruntime, through one *instrumented*
copy of it built once:

* every captured layer's weight becomes an overridable initializer (an initializer that is also
  a graph input), so evaluating a set of replacements is one run that feeds the replaced weights,
  with no new model or session per evaluation (a weight another node also reads, such as an
  embedding tied to an output projection, gets its own copy first, so only the layer changes);
* every layer's input activation is exposed as an extra graph output, so one run yields the
  statistics calibration needs and, when evaluating, each layer's own output error on the
  activations it really receives.

The end-to-end error of a set of replacements is therefore measured by onnxruntime on the same
graph with the dense approximations as weights; the written model (factored subgraphs) is run
again after lowering, and that figure is the one the report gives (see sparsec.onnx_entry).

The end-to-end error is the *largest* relative L2 error over the graph's float outputs (each over
all calibration runs), not one figure over all outputs together: a small output such as a
classifier's logits must not hide behind a large hidden-state output.

A layer that saw fewer calibration rows than it has inputs is fitted data-free by the
pipeline's calibrate step, as for every front-end (``SiteStats.fall_back_to_diagonal``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import torch
from onnx import helper

from sparsec.candidates import Layer
from sparsec.passes import capture_onnx, rewrite_onnx
from sparsec.passes.onnx_data import Feeds
from sparsec.passes.onnx_model import Constants, LoadedModel, infer_shapes, session
from sparsec.passes.interpret_fx import kept_positions, kept_rows
from sparsec.output_error import OutputError, relative
from sparsec.sites import Site, SiteStats, Skipped, as_weight


class OnnxFrontend:
    entry = "onnx"
    graph = 0
    kept_as = "original model was written unchanged"

    def __init__(self, loaded: LoadedModel, calibration: Feeds | None, heldout: Feeds | None = None, *,
                 provider: str = "CPUExecutionProvider", device: str = "cpu", threads: int | None = None,
                 refuse=None, provenance: dict | None = None, executor: dict | None = None, output=None,
                 metric=None, metric_output: str | int | None = None):
        self.loaded = loaded
        self.metric = metric  # sparsec.metrics.Metric (None: rel_l2)
        self.metric_output = metric_output  # the graph output the metric reads: a name or an index
        self.warnings: list[str] = []  # the entry's: executor, made-up calibration data
        self.executor = executor or {}  # how onnxruntime runs the model, for the report
        self.output = output  # where the model will be written
        self.model = loaded.model
        self.calibration = calibration
        self.heldout = heldout
        self.provider = provider
        self.device = device
        self.threads = threads
        self.refuse = refuse  # callable(site) -> reason or None: sites the cost model cannot price
        self.provenance = provenance or {}
        self.constants = Constants(self.model)
        self.shapes: dict[str, list[int | None]] = {}
        self.sites: dict[str, Site] = {}
        self.layers: dict[str, capture_onnx.OnnxLayer] = {}
        self._eval_weight: dict[str, str] = {}
        self._session = None
        self._output_names: list[str] = []
        self._float_outputs: list[int] = []
        self._references: list[list[np.ndarray]] = []
        self._heldout_references: list[list[np.ndarray]] | None = None
        self._captured: tuple[list[Site], list[Skipped]] | None = None

    # -- protocol -----------------------------------------------------------------------------

    def capture(self) -> tuple[list[Site], list[Skipped]]:
        """The sites and the ops skipped; captured once (the weights are copied out of the model)."""
        if self._captured is not None:
            return list(self._captured[0]), list(self._captured[1])
        sites, skipped, layers = capture_onnx.capture(self.model, self.constants, self.graph)
        if self.refuse is not None:
            kept = []
            for site in sites:
                why = self.refuse(site)
                if why:
                    skipped.append(Skipped(site.name, site.op, why))
                    layers.pop(site.name)
                else:
                    kept.append(site)
            sites = kept
        self.sites = {s.name: s for s in sites}
        self.layers = layers
        self._captured = (sites, skipped)
        return list(sites), list(skipped)

    def calibrate(self, sites: list[Site]) -> dict[str, SiteStats]:
        stats: dict[str, SiteStats] = {}
        for s in sites:
            stats.setdefault(s.input_key, SiteStats.empty(s.K))
        self._build_instrumented()
        self._references = []
        from sparsec.progress import advance_current

        device = self.statistics_device()
        for index, (feed, calls) in enumerate(zip(self.calibration.runs, self.calibration.calls)):
            advance_current()
            outs, acts = self._run_data(feed, "calibration", index)
            self._references.append(outs)
            keep = token_keep(feed)
            for key, x in acts.items():
                _accumulate(stats[key], x, calls, device, keep)
        return stats

    def recalibrate(self, names: set[str], replacements: dict[str, torch.Tensor],
                    reference: dict[str, torch.Tensor] | None = None):
        """Gram statistics of the named sites' inputs when ``replacements`` run in place of their
        layers' weights (recovery, ``sparsec.recovery``); with a ``reference`` also, per input,
        (X_r^T X_r, X_r^T X) where X_r is that input when ``reference`` runs instead. onnxruntime
        runs the whole graph: one run per calibration call, two with a reference."""
        from sparsec.progress import advance_current

        device = self.statistics_device()
        stats: dict[str, SiteStats] = {}
        for name in names:
            stats.setdefault(self.sites[name].input_key, SiteStats.empty(self.sites[name].K))
        products = {key: (torch.zeros_like(st.gram, device=device), torch.zeros_like(st.gram, device=device))
                    for key, st in stats.items()} if reference is not None else None
        weights = self._weights(replacements)
        reference_weights = self._weights(reference) if reference is not None else None
        for feed, calls in zip(self.calibration.runs, self.calibration.calls):
            advance_current()
            _, acts = self._run(feed, weights)
            keep = token_keep(feed)
            for key, st in stats.items():
                _accumulate(st, acts[key], calls, device, keep)
            if products is None:
                continue
            _, reference_acts = self._run(feed, reference_weights)
            for key, (ref_gram, cross) in products.items():
                x = _rows(acts[key], device, keep).to(cross.dtype)
                r = _rows(reference_acts[key], device, keep).to(cross.dtype)
                ref_gram.addmm_(r.T, r)
                cross.addmm_(r.T, x)
        return (stats, products) if reference is not None else stats

    def statistics_device(self) -> str:
        """Where calibration statistics are gathered, and so where candidates are fitted: the GPU
        when onnxruntime runs the model on one (on the H200 all low-rank fits of a 14336 x 4096
        layer took 0.28 s, bench/plan_cost.py), else the CPU. Weights and approximations stay on
        the CPU."""
        return "cuda" if self.provider == "CUDAExecutionProvider" and torch.cuda.is_available() else "cpu"

    def evaluate(self, replacements: dict[str, torch.Tensor], heldout: bool = False,
                 per_layer: bool = True, calls: int | None = None) -> tuple[float, "LayerErrors"]:
        """The metric with ``replacements`` in place, and the layers' own errors (computed when read:
        ``per_layer`` changes nothing here). ``calls``: only the first that many runs."""
        feeds = self.heldout if heldout else self.calibration
        refs = self._heldout_refs() if heldout else self._references
        weights = self._weights(replacements)
        error = OutputError(self.metric, self.output_index())
        for feed, ref in zip(feeds.runs[:calls], refs):
            outs, _ = self._run(feed, weights)
            error.add(outs, ref)
        return error.value(), LayerErrors(self, dict(replacements), weights, feeds)

    def calibration_calls(self) -> int:
        """The runs the calibration data makes (calls of one shape are batched into one run)."""
        return len(self.calibration.runs)

    def output_index(self) -> int | None:
        """The metric's output among the float graph outputs (None: the metric's default)."""
        out = self.metric_output
        if out is None or isinstance(out, int):
            return out
        names = [self.model.graph.output[i].name for i in self._float_outputs]
        if out not in names:
            from sparsec.errors import OptionError

            raise OptionError(f"--metric-output names {out!r}, which is not a float output of {self.loaded.path}; its float "
                              f"outputs: {', '.join(names) or 'none'}")
        return names.index(out)

    def _weights(self, replacements: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out = {}
        for name, w in replacements.items():
            info = self.layers[name]
            out[self._eval_weight[name]] = rewrite_onnx.weight_in_node_layout(w, info, _np_dtype(self.sites[name].dtype))
        return out

    def has_heldout(self) -> bool:
        return self.heldout is not None and bool(self.heldout.runs)

    def launch_groups(self) -> list:
        """None: the ONNX rewrite keeps one node per layer."""
        return []

    def lowering_notes(self) -> list[str]:
        return []

    def rest_of_graph(self, fused: bool = False):
        """Unknown (None): onnxruntime's own fusions decide the kernels outside the sites, and the
        written model's end-to-end time is measured by onnxruntime instead."""
        return None

    def lower(self, layers: list[Layer]) -> onnx.ModelProto:
        return rewrite_onnx.rewrite(self.model, self.layers, layers, self.shapes, self.provenance)

    def time_layer(self, layer: Layer, cand, options=None) -> tuple[float, float]:
        """(dense us, candidate us) of one layer, timed in onnxruntime with this model's provider."""
        from sparsec.passes.onnx_timing import time_layer

        return time_layer(layer.site, cand.spec, cand.weight(), max(layer.tokens, 1), self.provider, self.threads)

    def device_name(self) -> str:
        return self.device

    def check(self, lowered, layers: list[Layer], options):
        """The lowered model run in onnxruntime: its error and its time against the original."""
        from sparsec.passes.onnx_check import check_lowered

        checked = check_lowered(self, lowered, layers, options)
        feeds = self.calibration
        if feeds is not None and feeds.generated:
            ids = any("ids uniform" in note for note in feeds.notes)
            checked.end_to_end["calibration"] = "generated-ids" if ids else "generated"
        return checked

    def notes(self, layers: list[Layer], skipped, options, fingerprint) -> list[str]:
        """Nothing to rewrite; formats this executor runs as dense MatMuls."""
        notes = []
        if not self.sites and not skipped:
            notes.append("no weight-bearing op found (no MatMul or Gemm): the model was written unchanged")
        elif not self.sites:
            notes.append(
                f"no weight-bearing op found that sparsec can rewrite: {len(skipped)} MatMul/Gemm-like op(s) "
                "were left as they are, see 'skipped' for why; the model was written unchanged")
        pruned = [l for l in layers if l.chosen is not None and not l.chosen.is_dense and l.chosen.spec.pruned_part]
        if pruned:
            names = ", ".join(f"{l.name} ({l.chosen.fmt})" for l in pruned[:5]) + (" ..." if len(pruned) > 5 else "")
            notes.append(
                f"{len(pruned)} layer(s) were written as pruned dense initializers: {names}. onnxruntime's "
                f"{self.provider} runs them as dense MatMuls, so they gain nothing here (the fingerprint measured "
                "exactly that); the format is recorded in each node's metadata_props ('sparsec.format') for runtimes "
                "with sparse kernels, such as TensorRT's sparsity mode")
        return notes

    def describe(self) -> dict:
        held = self.heldout
        return {"executor": self.executor,
                "model": {"input": str(self.loaded.path), "output": str(self.output),
                          "calibration": self.calibration.source if self.calibration is not None else None,
                          "heldout": held.source if held else None, "opset": self.loaded.opset,
                          "external_data": self.loaded.external_data}}

    # -- for verifying the written model --------------------------------------------------------

    def references(self, heldout: bool = False) -> list[list[np.ndarray]]:
        """The original model's float outputs on each calibration (or held-out) run."""
        return self._heldout_refs() if heldout else self._references

    def float_outputs(self, outputs: list[np.ndarray]) -> list[np.ndarray]:
        """The float graph outputs among all of a run's outputs, in graph order."""
        return [outputs[i] for i in self._float_outputs]

    # -- the instrumented model ---------------------------------------------------------------

    def _build_instrumented(self) -> None:
        self.shapes = infer_shapes(self.model)
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        g = m.graph
        readers: dict[str, int] = {}
        for node in g.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        inits = {t.name: t for t in g.initializer}
        graph_inputs = {i.name for i in g.input}
        self._eval_weight = {}
        for name, info in self.layers.items():
            node = g.node[info.node_index]
            weight = info.weight
            if readers.get(weight, 0) > 1 or weight not in inits:
                copy = self.constants.proto(weight)
                fresh = f"sparsec.eval/{name}/weight"
                tensor = onnx.TensorProto()
                tensor.CopyFrom(copy)
                tensor.name = fresh
                g.initializer.append(tensor)
                node.input[1] = fresh
                weight = fresh
                inits[fresh] = tensor
            if weight not in graph_inputs:
                t = inits[weight]
                g.input.append(helper.make_tensor_value_info(weight, t.data_type, list(t.dims)))
                graph_inputs.add(weight)
            self._eval_weight[name] = weight
        self._output_names = [o.name for o in g.output]
        elem = {o.name: o.type.tensor_type.elem_type for o in g.output}
        self._float_outputs = [i for i, o in enumerate(g.output)
                               if elem[o.name] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                   onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)]
        self._activation_of: dict[str, str] = {}
        extra = []
        for name, info in self.layers.items():
            key = self.sites[name].input_key
            if key in self._activation_of:
                continue
            self._activation_of[key] = info.x
            if info.x not in graph_inputs and info.x not in self._output_names and info.x not in extra:
                extra.append(info.x)
                t = self.constants.elem_type(info.weight)
                g.output.append(helper.make_tensor_value_info(info.x, t, None))
        self._fetch = self._output_names + extra
        self._session = session(m, self.provider, self.threads)

    def _run_data(self, feed: dict[str, np.ndarray], what: str, index: int):
        """``_run`` on the user's data as given: onnxruntime refusing it (an id past the vocabulary,
        a value of the wrong shape) is the data's problem, said in one line."""
        try:
            return self._run(feed, {})
        except Exception as exc:  # onnxruntime's own exception types
            from sparsec.errors import ModelError, first_line

            raise ModelError(
                f"onnxruntime cannot run the model on {what} sample {index}: {first_line(exc) or type(exc).__name__}; "
                f"check the {what} data's values and shapes (token ids must be below the vocabulary size)") from None

    def _run(self, feed: dict[str, np.ndarray], weights: dict[str, np.ndarray]):
        values = self._session.run(self._fetch, {**feed, **weights})
        by_name = dict(zip(self._fetch, values))
        outs = [values[i] for i in self._float_outputs]
        acts = {}
        for key, tensor in self._activation_of.items():
            acts[key] = by_name[tensor] if tensor in by_name else feed[tensor]
        return outs, acts

    def _heldout_refs(self) -> list[list[np.ndarray]]:
        if self._heldout_references is None:
            self._heldout_references = [self._run_data(feed, "heldout", i)[0] for i, feed in enumerate(self.heldout.runs)]
        return self._heldout_references


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.float16 if dtype == torch.float16 else np.float32


def token_keep(feed: dict) -> torch.Tensor | None:
    """The positions a graph input that is an attention mask keeps (``kept_positions``, the FX
    front-end's rule): their activations are padding, which no output reads, and stay out of the
    statistics."""
    for name, value in feed.items():
        keep = kept_positions(name, torch.from_numpy(value)) if isinstance(value, np.ndarray) else None
        if keep is not None:
            return keep
    return None


def _rows(x: np.ndarray, device: str = "cpu", keep: torch.Tensor | None = None) -> torch.Tensor:
    """A run's activations as (rows, inputs), less the positions ``keep`` masks (``kept_rows``)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    return (kept_rows(t, keep) if t.dim() else t.reshape(-1, 1)).to(device)


def _accumulate(stats: SiteStats, x: np.ndarray, calls: int, device: str = "cpu", keep: torch.Tensor | None = None) -> None:
    """Add a run's activations, split back into its calls when the run held several."""
    if keep is not None and tuple(x.shape[:-1]) == tuple(keep.shape):
        per = x.shape[0] // calls if calls > 1 and x.shape[0] % calls == 0 else x.shape[0]
        for start in range(0, x.shape[0], per):  # one call is a slice of the batch axis
            stats.add(_rows(x[start:start + per], device, keep[start:start + per]))
        return
    x2 = _rows(x, device)
    rows = x2.shape[0]
    if calls > 1 and rows % calls == 0:
        for chunk in x2.split(rows // calls):
            stats.add(chunk)
    else:
        stats.add(x2)


class LayerErrors(Mapping):
    """Each replaced layer's own relative output error, on the activations it receives in the
    rewritten graph, computed when first read: the planner evaluates several allocations but reads
    the per-layer errors of the one it keeps only, so they cost one more pass, not one per evaluation."""

    def __init__(self, frontend: OnnxFrontend, replacements: dict[str, torch.Tensor], weights, feeds: Feeds):
        self._args = (frontend, replacements, weights, feeds)
        self._values: dict[str, float] | None = None

    def _compute(self) -> dict[str, float]:
        if self._values is None:
            frontend, replacements, weights, feeds = self._args
            sums = {name: [0.0, 0.0] for name in replacements}
            for feed in feeds.runs:
                _, acts = frontend._run(feed, weights)
                keep = token_keep(feed)
                for name, w in replacements.items():
                    site = frontend.sites[name]
                    num, den = _layer_error(acts[site.input_key], site, w, keep)
                    sums[name][0] += num
                    sums[name][1] += den
            self._values = {name: relative(n, d) for name, (n, d) in sums.items()}
        return self._values

    def __getitem__(self, name: str) -> float:
        return self._compute()[name]

    def __iter__(self):
        return iter(self._args[1])

    def __len__(self) -> int:
        return len(self._args[1])


def _layer_error(x: np.ndarray, site: Site, w, keep: np.ndarray | None = None) -> tuple[float, float]:
    """This layer's squared output error and energy on the activations it received in this run."""
    w = as_weight(w)
    x2 = _rows(x, "cpu", keep).reshape(-1, site.K).to(w.device, torch.float32)
    weight = site.weight.to(w.device, torch.float32)
    diff = x2 @ (w.to(torch.float32) - weight).T  # the error itself, not a difference of two outputs
    ref = x2 @ weight.T
    if site.bias is not None:
        ref = ref + site.bias.to(w.device, torch.float32)
    return float(torch.sum(diff.double() ** 2)), float(torch.sum(ref.double() ** 2))
