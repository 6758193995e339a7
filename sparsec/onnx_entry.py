"""``sparsec optimize model.onnx``: the offline ONNX entry, from a file to a faster, verified file.

Order of work (every failure before the rename leaves nothing written):

1. check the output folder, the options and the input model (parse, opset >= 13, external data,
   ``onnx.checker``);
2. pick the executor (onnxruntime's best provider here) and the fingerprint that describes it:
   ``auto`` is your own measurement of onnxruntime on this device, else the shipped ``ort-cpu``;
3. inputs: ``--calibration`` / ``--heldout`` .npz files, else inputs generated from the declared
   shapes (with a warning in the report);
4. the shared pipeline (``sparsec.pipeline.optimize_graph``) with the ONNX front-end;
5. the rewritten model is written to a temporary folder beside the output, checked with
   ``onnx.checker`` (full), run in onnxruntime on the calibration (and held-out) inputs, where its
   error against the original is measured, and timed against the original; then renamed into place;
6. the report: the pipeline's, plus the written model's measured error and speed-up, the executor
   and the warnings a user must see (made-up calibration data, formats the executor does not
   accelerate, a fingerprint of another device).

End-to-end timing always runs (it is what the command promises); ``measure=True`` adds the
per-layer timing of each rewritten subgraph against its dense MatMul, in isolation.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from sparsec.errors import FingerprintError, ModelError, OptionError
from sparsec.options import parse_options

log = logging.getLogger("sparsec")

TIMING_BUDGET_S = 1.0
LAYER_TIMING_BUDGET_S = 0.5
# The written model's error may exceed the planned one by float rounding of the factors alone.
LOWERED_ERROR_SLACK = 1.05


@dataclass
class OnnxResult:
    """What ``optimize_onnx`` wrote and decided."""

    output: Path | None
    written: list[Path]
    report: object  # sparsec.report.Report
    plan: object  # sparsec.plan.Plan
    report_paths: list[Path] = field(default_factory=list)


def optimize_onnx(model, output, *, fingerprint="auto", error_budget: float = 0.01, calibration=None,
                  heldout=None, formats=None, plan=None, report=None, measure: bool = False,
                  external_data: bool | None = None, provider: str = "auto") -> OnnxResult:
    """Plan, rewrite, verify and write ``model`` (an .onnx path) to ``output``; see the module doc."""
    from sparsec.passes.onnx_model import check_writable, load_model, save_checked
    from sparsec.pipeline import optimize_graph

    output = check_writable(output)
    options = _options(fingerprint, error_budget, formats, plan, report, measure)
    loaded = load_model(model)
    _check_input(loaded)
    executor = choose_executor(provider, options.fingerprint)
    warnings = list(executor.warnings)
    if formats is None:
        options.formats, note = executor_formats(options.formats, executor)
        warnings += [note] if note else []
    frontend = _frontend(loaded, executor, options, calibration, heldout, warnings)
    outcome = optimize_graph(frontend, options, executor.fingerprint)
    rep = _annotate(outcome, frontend, executor, loaded, output, warnings)
    rewritten = [l for l in outcome.layers if l.chosen is not None and not l.chosen.is_dense]
    written = save_checked(outcome.lowered, output, external_data=external_data,
                           check=lambda staged: _verify_and_time(staged, rep, rewritten, frontend, loaded, executor,
                                                                 options.error_budget))
    if options.measure and rewritten:
        _time_layers(rep, outcome.layers, executor)
    final = _finish(rep)
    report_paths = _save_report(final, options.report) if options.report else []
    from sparsec.logs import log_report

    log_report(final)
    return OnnxResult(output=output, written=written, report=final, plan=outcome.plan, report_paths=report_paths)


def _options(fingerprint, error_budget, formats, plan, report, measure):
    """Validated options; the report's folder and the plan file are checked before any work."""
    from sparsec.passes.onnx_model import check_writable

    given = {"fingerprint": fingerprint, "error_budget": error_budget, "plan": plan, "report": report,
             "measure": measure, "formats": formats}
    options = parse_options({k: v for k, v in given.items() if v is not None})
    if options.report:
        check_writable(options.report)
    if options.plan is not None:
        from sparsec.plan import Plan

        options.plan = Plan.coerce(options.plan)
    return options


def _frontend(loaded, executor: "Executor", options, calibration, heldout, warnings: list[str]):
    """The ONNX front-end with its inputs: the .npz files, or inputs generated when there is something to calibrate."""
    from sparsec.passes.onnx_data import Feeds, generate, load_npz
    from sparsec.passes.onnx_frontend import OnnxFrontend

    fp = executor.fingerprint
    frontend = OnnxFrontend(
        loaded, None, provider=executor.provider, device=executor.device, threads=executor.threads,
        refuse=lambda site: _unpriceable(fp, site),
        provenance={"sparsec_version": _version(), "fingerprint": fp.name, "fingerprint_hash": fp.hash,
                    "error_budget": options.error_budget, "source": loaded.name})
    sites, _ = frontend.capture()  # kept by the front-end for the pipeline's capture step
    if sites:
        feeds = load_npz(calibration, loaded.model) if calibration else generate(loaded.model)
    else:
        feeds = Feeds(runs=[], calls=[], source="none (nothing to calibrate)")
    frontend.calibration = feeds
    frontend.heldout = load_npz(heldout, loaded.model, what="heldout") if heldout else None
    if feeds.generated:
        warnings.append(
            f"calibrated on {feeds.source} ({'; '.join(feeds.notes)}), not on real data: the errors and the "
            "choices reflect made-up inputs; pass --calibration data.npz with representative inputs")
    return frontend


def _annotate(outcome, frontend, executor: "Executor", loaded, output: Path, warnings: list[str]) -> dict:
    """The pipeline's report plus what only the ONNX entry knows: executor, files, warnings."""
    rep = outcome.report
    for names, rows, K in frontend.undersampled:
        warnings.append(
            f"{names}: calibration gave {rows} rows for {K} inputs, too few to weight a fit by, so it was "
            "fitted data-free (as if inputs were isotropic) and its measured error holds for new inputs; pass "
            "more samples, at least as many rows as inputs, for activation-aware fitting")
    rep["warnings"] = warnings + rep.get("warnings", [])
    rep["executor"] = executor.describe()
    held = frontend.heldout
    rep["model"] = {"input": str(loaded.path), "output": str(output), "calibration": frontend.calibration.source,
                    "heldout": held.source if held else None, "opset": loaded.opset,
                    "external_data": loaded.external_data}
    if not frontend.sites and not outcome.skipped:
        rep["warnings"].append("no weight-bearing op found (no MatMul or Gemm): the model was written unchanged")
    elif not frontend.sites:
        rep["warnings"].append(
            f"no weight-bearing op found that sparsec can rewrite: {len(outcome.skipped)} MatMul/Gemm-like op(s) "
            "were left as they are, see 'skipped' for why; the model was written unchanged")
    rewritten = [l for l in outcome.layers if l.chosen is not None and not l.chosen.is_dense]
    _note_pruned(rep, rewritten, executor)
    return rep


def _verify_and_time(staged: Path, rep: dict, rewritten, frontend, loaded, executor: "Executor", budget: float) -> None:
    """Run the staged model in onnxruntime: its error on both data sets, and its time against the original."""
    from sparsec.passes.onnx_model import session

    if not rewritten:
        rep["end_to_end"]["note"] = "nothing was rewritten: the written model computes exactly what the input does"
        return
    new = _session_from_path(staged, executor)
    calib_error, held_error = _lowered_errors(frontend, new, frontend.calibration, frontend.heldout)
    rep["end_to_end"]["measured_error"] = calib_error
    if frontend.heldout is not None:
        rep["end_to_end"]["heldout_error"] = held_error
    if calib_error > budget * LOWERED_ERROR_SLACK:
        rep["warnings"].append(
            f"the written model's error on the calibration data is {calib_error:.3%}, over the "
            f"{budget:.3%} budget the plan met with dense approximations")
    if held_error is not None and held_error > budget:
        rep["warnings"].append(
            f"the error on held-out data is {held_error:.3%}, over the {budget:.3%} budget met on the "
            "calibration data: the plan fits the calibration data better than other inputs; calibrate on more "
            "(and more varied) samples, or lower --error-budget")
    original = session(loaded.model, executor.provider, executor.threads)
    _time_end_to_end(rep, original, new, frontend.calibration.runs[0], executor)


def _finish(rep: dict):
    from sparsec.report import Report

    rep.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    rep.setdefault("sparsec_version", _version())
    return Report(rep)


# -- input checks ---------------------------------------------------------------------------------


def _check_input(loaded) -> None:
    from sparsec.passes.onnx_model import EXTERNAL_DATA_BYTES

    model = loaded.model
    try:
        if model.ByteSize() < EXTERNAL_DATA_BYTES:
            onnx.checker.check_model(model, full_check=True)
        else:
            onnx.checker.check_model(str(loaded.path), full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{loaded.path} fails onnx.checker ({first}); sparsec only writes models that pass "
                         "it, so fix the input model first") from None


def _unpriceable(fp, site) -> str | None:
    why = fp.can_predict("dense", site.dtype_name)
    return None if why is None else f"{why}, so it cannot be priced; measure that dtype or convert the model"


def _version() -> str:
    from sparsec import __version__

    return __version__


# -- executor and fingerprint ---------------------------------------------------------------------


@dataclass
class Executor:
    provider: str
    fingerprint: object
    device: str
    threads: int | None
    warnings: list[str]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"runtime": "onnxruntime", "version": ort.__version__, "provider": self.provider,
                "intra_op_num_threads": self.threads or "onnxruntime's default"}


PROVIDERS = {"auto": None, "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def choose_executor(provider: str, fingerprint) -> Executor:
    """The onnxruntime provider to run on, the fingerprint describing it, and the session threads."""
    from sparsec.fingerprint import Fingerprint, load_fingerprint
    from sparsec.fingerprint_device import current_device_name
    from sparsec.passes.onnx_model import best_provider

    if provider not in PROVIDERS:
        raise OptionError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    warnings = []
    here = best_provider()
    wanted = PROVIDERS[provider] or here
    if wanted != here:
        raise OptionError(f"onnxruntime's {wanted} does not load here (a session with it falls back to {here}); "
                          "use --provider auto or cpu")
    if fingerprint in (None, "auto"):
        fp = _ort_fingerprint(wanted)
        if fp is None and provider == "auto" and wanted != "CPUExecutionProvider":
            warnings.append(f"no onnxruntime fingerprint of {wanted} (measure one with 'python -m "
                            "sparsec.fingerprint_ort --provider CUDAExecutionProvider -o ...'); planned and "
                            "timed on the CPU provider, which the shipped ort-cpu describes")
            wanted = "CPUExecutionProvider"
            fp = _ort_fingerprint(wanted)
        if fp is None:
            raise FingerprintError(f"no onnxruntime fingerprint of {wanted}: measure one with 'python -m "
                                   f"sparsec.fingerprint_ort -o FILE --provider {wanted}' and pass --fingerprint FILE")
    else:
        fp = fingerprint if isinstance(fingerprint, Fingerprint) else load_fingerprint(fingerprint)
    kind = "cuda" if wanted == "CUDAExecutionProvider" else "cpu"
    device = current_device_name(kind)
    if not is_onnxruntime_fingerprint(fp):
        warnings.append(f"fingerprint {fp.name!r} measured torch kernels, not onnxruntime, which runs this "
                        "model: predicted speed-ups may not hold; the shipped 'ort-cpu' describes onnxruntime")
    if fp.device.get("kind") != kind:
        warnings.append(f"fingerprint {fp.name!r} describes a {fp.device.get('kind')} device "
                        f"({fp.device.get('name')}) but onnxruntime runs this model on {kind} ({device})")
    elif fp.device.get("name") != device:
        warnings.append(f"fingerprint {fp.name!r} was measured on {fp.device.get('name')} but this device is "
                        f"{device}; measure it here with 'python -m sparsec.fingerprint_ort -o FILE'")
    threads = (fp.data.get("grid") or {}).get("intra_op_num_threads") if is_onnxruntime_fingerprint(fp) else None
    return Executor(provider=wanted, fingerprint=fp, device=device, threads=threads or None, warnings=warnings)


def is_onnxruntime_fingerprint(fp) -> bool:
    kernels = fp.data.get("kernels", {}).get("dense", [])
    return bool(kernels) and all(str(e.get("kernel", "")).startswith("onnxruntime") for e in kernels)


def _ort_fingerprint(provider: str):
    """Your own onnxruntime fingerprint of this device, else the shipped one for the provider."""
    from sparsec import fingerprints
    from sparsec.fingerprint import load_fingerprint
    from sparsec.fingerprint_device import device_slug, user_fingerprint_dir

    kind = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    mine = user_fingerprint_dir() / f"ort-{device_slug(kind)}.json"
    if mine.is_file():
        return load_fingerprint(mine)
    shipped = fingerprints.shipped_path(f"ort-{kind}")
    return load_fingerprint(shipped) if shipped else None


def executor_formats(formats, executor: Executor) -> tuple[tuple[str, ...], str | None]:
    """The default formats for onnxruntime: those written as pruned dense weights are left out.

    onnxruntime's execution providers have no sparse MatMul: a 2:4 or block-sparse weight is a
    dense weight with zeros to them, and the fingerprint measures exactly that. Planning them would
    spend error budget (and time pruning) for no speed; they stay available through ``formats``.
    """
    from sparsec.passes.onnx_emit import PRUNED_FAMILIES

    dropped = [f for f in formats if f in PRUNED_FAMILIES]
    if not dropped:
        return tuple(formats), None
    measured = []
    for family in dropped:
        ratio = dense_ratio(executor.fingerprint, family)
        if ratio is not None:
            measured.append(f"{family} at {ratio[0]:.2f}x of dense's time (median of {ratio[1]} shapes)")
    evidence = f"; {executor.fingerprint.name} measured " + ", ".join(measured) if measured else ""
    note = (f"{' and '.join(dropped)} not tried: onnxruntime's {executor.provider} runs them as dense MatMuls "
            f"over pruned weights, so they cannot save time here{evidence}. Pass --formats with them to write "
            "pruned weights (format in each node's metadata_props) for a runtime with sparse kernels, such as "
            "TensorRT's sparsity mode")
    return tuple(f for f in formats if f not in dropped), note


def dense_ratio(fp, family: str) -> tuple[float, int] | None:
    """Median over a family's measured points of its time over dense's predicted time at the same shape."""
    import statistics

    ratios = []
    for e in fp.data.get("kernels", {}).get(family, []):
        try:
            dense = fp.predict("dense", e["M"], e["N"], e["K"], dtype=e["dtype"], mode=e["mode"])
        except FingerprintError:
            continue
        ratios.append(e["us"] / dense)
    return (statistics.median(ratios), len(ratios)) if ratios else None


# -- verification and timing ----------------------------------------------------------------------


def _session_from_path(path: Path, executor: Executor):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if executor.threads:
        opts.intra_op_num_threads = int(executor.threads)
    providers = [executor.provider] + ([] if executor.provider == "CPUExecutionProvider" else ["CPUExecutionProvider"])
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load the rewritten model, so it was not written: "
                         f"{str(exc).strip().splitlines()[0]}") from None


def _lowered_errors(frontend, new_session, feeds, held) -> tuple[float, float | None]:
    """The written model's output error against the original's (worst output), on both data sets."""
    from sparsec.passes.onnx_frontend import OutputError

    names = [o.name for o in new_session.get_outputs()]

    def error(runs, refs) -> float:
        total = OutputError()
        for feed, ref in zip(runs, refs):
            try:
                outs = new_session.run(names, feed)
            except Exception as exc:  # onnxruntime's own exception types
                raise ModelError(f"onnxruntime cannot run the rewritten model, so it was not written: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
            total.add(frontend.float_outputs(outs), ref)
        return total.value()

    calib = error(feeds.runs, frontend.references())
    heldout = error(held.runs, frontend.references(heldout=True)) if held is not None else None
    return calib, heldout


def _time_end_to_end(rep: dict, original, new, feed: dict, executor: Executor) -> None:
    from sparsec.passes.onnx_timing import clock_for, interleaved

    t = interleaved([lambda: original.run(None, feed), lambda: new.run(None, feed)], budget_s=TIMING_BUDGET_S,
                    min_rounds=10, max_rounds=200, round_s=0.01, clock=clock_for(executor.provider, executor.threads))
    e2e = rep["end_to_end"]
    e2e["measured_speedup"] = t.speedup(1)
    e2e["measured_us_dense"], e2e["measured_us"] = t.us
    e2e["timing"] = t.describe()


def _time_layers(rep: dict, layers, executor: Executor) -> None:
    """Each rewritten layer's subgraph against its dense MatMul, in isolation, at its token count."""
    from sparsec.fingerprint_ort import passthrough_model
    from sparsec.formats import Dense
    from sparsec.passes.onnx_emit import Emitter, emit_product, factors
    from sparsec.passes.onnx_model import session
    from sparsec.passes.onnx_timing import clock_for, interleaved

    rows = {row["name"]: row for row in rep["layers"]}
    dense_total = new_total = 0.0
    rng = np.random.default_rng(0)
    for layer in layers:
        row = rows[layer.name]
        if layer.chosen is None or layer.chosen.is_dense:
            row["measured_speedup"] = 1.0
            continue
        site = layer.site
        dtype = np.float16 if str(site.dtype) == "torch.float16" else np.float32
        M = max(layer.tokens, 1)
        sessions = []
        for spec, weight in ((Dense(), site.weight), (layer.chosen.spec, layer.chosen.approx)):
            em = Emitter(prefix="layer", taken={"x", "y"})
            emit_product(em, spec, "x", "y", factors(spec, weight, dtype), site.N, site.K, [M, site.K])
            sessions.append(session(_single(em, M, site.N, site.K, dtype), executor.provider, executor.threads))
        base = session(passthrough_model(M, site.K), executor.provider, executor.threads)
        x = {"x": rng.standard_normal((M, site.K)).astype(dtype)}
        t = interleaved([lambda s=s: s.run(None, x) for s in (*sessions, base)], budget_s=LAYER_TIMING_BUDGET_S,
                        min_rounds=8, max_rounds=100, round_s=0.002, clock=clock_for(executor.provider, executor.threads))
        dense_us, new_us, base_us = t.us
        dense_us, new_us = max(dense_us - base_us, 0.1 * dense_us), max(new_us - base_us, 0.1 * new_us)
        row["measured_us_dense"], row["measured_us"] = dense_us, new_us
        row["measured_speedup"] = dense_us / new_us
        dense_total += dense_us
        new_total += new_us
    if new_total:
        rep["totals"]["measured_speedup"] = dense_total / new_total


def _single(em, M: int, N: int, K: int, dtype) -> onnx.ModelProto:
    from onnx import helper

    elem = onnx.TensorProto.FLOAT16 if dtype == np.float16 else onnx.TensorProto.FLOAT
    g = helper.make_graph(em.nodes, "layer", [helper.make_tensor_value_info("x", elem, [M, K])],
                          [helper.make_tensor_value_info("y", elem, [M, N])], em.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# -- report ---------------------------------------------------------------------------------------


def _note_pruned(rep: dict, rewritten, executor: Executor) -> None:
    """Say plainly that 2:4 and block are zeros in a dense weight to this executor."""
    pruned = [l for l in rewritten if l.chosen.spec.family in ("2:4", "block")]
    if not pruned:
        return
    names = ", ".join(f"{l.name} ({l.chosen.fmt})" for l in pruned[:5]) + (" ..." if len(pruned) > 5 else "")
    rep["warnings"].append(
        f"{len(pruned)} layer(s) were written as pruned dense initializers: {names}. onnxruntime's "
        f"{executor.provider} runs them as dense MatMuls, so they gain nothing here (the fingerprint measured "
        "exactly that); the format is recorded in each node's metadata_props ('sparsec.format') for runtimes "
        "with sparse kernels, such as TensorRT's sparsity mode")


def _save_report(report, path) -> list[Path]:
    """Write the report; an HTML page also gets its JSON data beside it (pages cannot be read back)."""
    path = Path(path)
    paths = [report.save(path)]
    if path.suffix.lower() in (".html", ".htm"):
        paths.append(report.save(path.with_suffix(".json")))
    return paths
