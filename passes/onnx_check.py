"""The ONNX front-end's check of a lowered model: run in onnxruntime with the model's own provider,
its error against the original on the calibration (and held-out) data, and its time against the
original in the same process. What it finds goes into the report; a model onnxruntime cannot
load or run is refused, so nothing is written."""

from __future__ import annotations

import numpy as np
import onnx

from sparsec.errors import ModelError

TIMING_BUDGET_S = 1.0
# The written model's error may exceed the planned one by float rounding of the factors alone.
LOWERED_ERROR_SLACK = 1.05


def check_lowered(frontend, lowered: onnx.ModelProto, layers, options):
    """``Frontend.check`` for ONNX: see the module doc."""
    from sparsec.passes.onnx_model import session
    from sparsec.pipeline import Check

    if not any(l.chosen is not None and not l.chosen.is_dense for l in layers):
        return Check(end_to_end={"note": "nothing was rewritten: the written model computes exactly what the input does"})
    try:
        new = session(lowered, frontend.provider, frontend.threads)
    except ModelError as exc:
        raise ModelError(f"onnxruntime cannot load the rewritten model, so it was not written: "
                         f"{str(exc).split(': ', 1)[-1]}") from None
    calib, held = lowered_errors(frontend, new, options.metric)
    budget, show = options.error_budget, options.metric.show
    warnings = []
    if calib > budget * LOWERED_ERROR_SLACK:
        warnings.append(f"the written model's error on the calibration data is {show(calib)}, over the "
                        f"{show(budget)} budget the plan met with dense approximations")
    if held is not None and held > budget:
        warnings.append(
            f"the error on held-out data is {show(held)}, over the {show(budget)} budget met on the "
            "calibration data: the plan fits the calibration data better than other inputs; calibrate on more "
            "(and more varied) samples, or lower --error-budget")
    original = session(frontend.model, frontend.provider, frontend.threads)
    rests = [session(without_layers(frontend.model, frontend.layers.values(), frontend.constants, copies),
                     frontend.provider, frontend.threads) for copies in (1, 2)]
    timing = time_end_to_end(original, new, frontend.calibration.first_call(), frontend.provider, frontend.threads,
                             *rests)
    checked = Check(measured_error=calib, heldout_error=held, measured_us_dense=timing.us[0], measured_us=timing.us[1],
                    measured_us_rest=max(2.0 * timing.us[2] - timing.us[3], 0.0), timing=timing.describe(),
                    warnings=warnings)
    if checked.speedup < 1.0 and not options.measure:
        checked.alarm = (
            f"SLOWER: the rewritten model measured {checked.speedup:.2f}x of the original end to end "
            "(predicted {predicted}); it was written as asked, but the original is faster here: keep it, "
            "or rerun with --measure to write the original unchanged")
    return checked


def lowered_errors(frontend, new_session, metric=None) -> tuple[float, float | None]:
    """The written model's error against the original's in ``metric`` (default: the worst output's
    relative L2), on the calibration and the held-out data."""
    from sparsec.output_error import OutputError

    names = [o.name for o in new_session.get_outputs()]

    def error(runs, refs) -> float:
        total = OutputError(metric, frontend.output_index())
        for feed, ref in zip(runs, refs):
            try:
                outs = new_session.run(names, feed)
            except Exception as exc:  # onnxruntime's own exception types
                raise ModelError(f"onnxruntime cannot run the rewritten model, so it was not written: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
            total.add(frontend.float_outputs(outs), ref)
        return total.value()

    calib = error(frontend.calibration.runs, frontend.references())
    held = frontend.heldout
    heldout = error(held.runs, frontend.references(heldout=True)) if held is not None else None
    return calib, heldout


def time_end_to_end(original, new, feed: dict, provider: str, threads: int | None, *others):
    """The models (sessions), interleaved in one process (``onnx_timing.interleaved``)."""
    from sparsec.fingerprint.timing import interleaved
    from sparsec.passes.onnx_model import runner
    from sparsec.passes.onnx_timing import clock_for

    return interleaved([runner(s, feed, provider) for s in (original, new, *others)], budget_s=TIMING_BUDGET_S,
                       min_rounds=10, max_rounds=200, round_s=0.01, clock=clock_for(provider, threads))


def without_layers(model: onnx.ModelProto, layers, constants, copies: int = 1) -> onnx.ModelProto:
    """The model with every captured product made ``copies`` chained products of one input feature
    onto a zero weight: the same output shapes and everything around the layers, almost none of
    their work. Timed next to the original with one copy and with two, it measures the rest of the
    graph (one copy less the difference: what a stand-in itself costs is taken out), which the
    end-to-end prediction adds to the layers' predicted times (onnxruntime fuses the rest, so it
    cannot be priced node by node)."""
    from onnx import helper, numpy_helper

    from sparsec.passes.onnx_model import elem_numpy_dtype
    from sparsec.passes.rewrite_onnx import drop_unused

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    axes = numpy_helper.from_array(np.asarray([-1], np.int64), "sparsec.rest/axes")
    starts = numpy_helper.from_array(np.asarray([0], np.int64), "sparsec.rest/starts")
    ends = numpy_helper.from_array(np.asarray([1], np.int64), "sparsec.rest/ends")
    g.initializer.extend([axes, starts, ends])
    before = {}  # node index -> the nodes that go before it
    for info in layers:
        node = g.node[info.node_index]
        dims = constants.dims(info.weight)
        n = dims[1] if info.weight_kn else dims[0]
        zero = numpy_helper.from_array(np.zeros((1, n), elem_numpy_dtype(constants.elem_type(info.weight))),
                                       f"sparsec.rest/{info.name}/w")
        g.initializer.append(zero)
        extra, source = [], info.x
        for copy in range(copies):
            narrow = f"sparsec.rest/{info.name}/x{copy}"
            extra.append(helper.make_node("Slice", [source, starts.name, ends.name, axes.name], [narrow]))
            if copy < copies - 1:
                source = f"sparsec.rest/{info.name}/y{copy}"
                extra.append(helper.make_node("MatMul", [narrow, zero.name], [source]))
        before[info.node_index] = extra
        node.input[0], node.input[1] = narrow, zero.name
        for attr in node.attribute:
            if attr.name == "transB":
                attr.i = 0
    nodes = [n for i, node in enumerate(g.node) for n in (*before.get(i, ()), node)]
    del g.node[:]
    g.node.extend(nodes)
    drop_unused(g, {info.weight for info in layers})  # the stand-ins need no weights
    return out
