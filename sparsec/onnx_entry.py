"""``sparsec optimize model.onnx``: the offline ONNX entry, from a file to a faster, verified file.

Order of work (every failure before the rename leaves nothing written):

1. check the output folder, the options and the input model (parse, opset >= 13, external data,
   ``onnx.checker``);
2. pick the executor (onnxruntime's best provider here) and the fingerprint that describes it:
   ``auto`` is your own measurement of onnxruntime on this device, else the shipped ``ort-cpu``;
3. inputs: ``--calibration`` / ``--heldout`` .npz files, else inputs generated from the declared
   shapes (with a warning in the report);
4. the shared pipeline (``sparsec.pipeline.optimize_graph``) with the ONNX front-end, which runs
   the rewritten model in onnxruntime on the calibration (and held-out) inputs, where its error
   against the original is measured, and times it against the original (``passes/onnx_check.py``);
   the pipeline builds the report, with the executor and the warnings a user must see (made-up
   calibration data, formats the executor does not accelerate, a fingerprint of another device);
5. the model is written to a temporary folder beside the output, checked with ``onnx.checker``
   (full), then renamed into place.

End-to-end timing always runs (it is what the command promises); ``measure=True`` adds the
per-layer timing of each rewritten subgraph against its dense MatMul, in isolation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from sparsec.errors import FingerprintError, ModelError, OptionError, SparsecError
from sparsec.options import parse_options

log = logging.getLogger("sparsec")



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
                  external_data: bool | None = None, provider: str = "auto", strict: bool = False,
                  metric=None, metric_output: str | int | None = None, recovery: str | None = None,
                  dims: dict[str, int] | None = None) -> OnnxResult:
    """Plan, rewrite, verify and write ``model`` (an .onnx path) to ``output``; see the module doc.
    ``dims``: sizes of the inputs' named dynamic dimensions for inputs made up without ``calibration``."""
    from sparsec.passes.onnx_model import check_writable, load_model, save_checked
    from sparsec.pipeline import optimize_graph

    if dims and calibration:
        raise OptionError("--dims sizes the inputs sparsec makes up, and --calibration's arrays give their own "
                          "sizes: pass one of them")
    output = check_writable(output)
    _refuse_overwriting_input(model, output)
    options = _options(fingerprint, error_budget, formats, plan, report, measure, metric, metric_output, recovery)
    _formats_with_onnx_form(options, explicit=formats is not None)
    loaded = load_model(model)
    _check_input(loaded)
    executor = choose_executor(provider, options.fingerprint)
    warnings = [*loaded.notes, *executor.warnings]
    if formats is None:
        options.formats, note = executor_formats(options.formats, executor)
        warnings += [note] if note else []
    frontend = _frontend(loaded, executor, options, calibration, heldout, warnings, output, dims)
    try:
        outcome = optimize_graph(frontend, options, executor.fingerprint)
    except SparsecError:
        raise
    except Exception as exc:  # noqa: BLE001 - a planning failure leaves the model as it was, on record
        if strict:
            raise
        outcome = _unchanged(frontend, loaded, executor, options, exc)
    written = save_checked(outcome.lowered, output, external_data=external_data)
    from sparsec.report import Report

    final = Report(outcome.report)
    report_paths = _save_report(final, options.report) if options.report else []
    from sparsec.logs import log_report

    log_report(final)
    return OnnxResult(output=output, written=written, report=final, plan=outcome.plan, report_paths=report_paths)


def _unchanged(frontend, loaded, executor: "Executor", options, exc: Exception):
    """The outcome of a plan that failed inside sparsec: the input model, written unchanged, and a
    report that names the failing step and its cause."""
    from sparsec.backend import fallback_message, warn_fallback
    from sparsec.pipeline import Outcome, fallback_report
    from sparsec.plan import Plan

    message = fallback_message(0, exc, "the model is written unchanged. Pass --strict to stop with the error instead")
    warn_fallback(message)
    rep = fallback_report(frontend, executor.fingerprint, options, exc, message)
    plan = Plan(layers={}, fingerprint=executor.fingerprint.name, error_budget=options.error_budget)
    return Outcome([], [], plan, rep, loaded.model)


def _refuse_overwriting_input(model, output: Path) -> None:
    """The input model (and a data file of its) is never written over: the user would lose it."""
    source = Path(model)
    targets = [output, output.with_name(output.name + ".data")]
    for target in targets:
        same = target.exists() and source.exists() and os.path.samefile(source, target)
        if same or target.resolve() == source.resolve():
            raise OptionError(f"the output {target} is the input model {source}; sparsec never writes over its "
                              "input: pass another -o path (e.g. model.sparsec.onnx)")
    if source.is_file() and targets[1].exists():  # only then is there a data file to lose
        try:
            proto = onnx.load(str(source), load_external_data=False)
        except Exception:  # noqa: BLE001 - an unreadable input is refused by load_model with its own message
            return
        locations = {(source.parent / e.value).resolve() for t in proto.graph.initializer
                     for e in t.external_data if e.key == "location"}
        if targets[1].resolve() in locations:
            raise OptionError(f"the output's data file {targets[1]} is the input model's external data; sparsec "
                              "never writes over its input: pass another -o path")


def _options(fingerprint, error_budget, formats, plan, report, measure, metric=None, output=None, recovery=None):
    """Validated options; the report's folder and the plan file are checked before any work."""
    given = {"fingerprint": fingerprint, "error_budget": error_budget, "plan": plan, "report": report,
             "measure": measure, "formats": formats, "metric": metric, "output": output, "recovery": recovery}
    return parse_options({k: v for k, v in given.items() if v is not None})


def _frontend(loaded, executor: "Executor", options, calibration, heldout, warnings: list[str], output: Path,
              dims: dict[str, int] | None = None):
    """The ONNX front-end with its inputs: the .npz files, or inputs generated when there is something to calibrate."""
    from sparsec.passes.onnx_data import Feeds, generate, load_npz
    from sparsec.passes.onnx_frontend import OnnxFrontend

    fp = executor.fingerprint
    frontend = OnnxFrontend(
        loaded, None, provider=executor.provider, device=executor.device, threads=executor.threads,
        refuse=lambda site: _unpriceable(fp, site), executor=executor.describe(), output=output,
        metric=options.metric, metric_output=options.output,
        provenance={"sparsec_version": _version(), "fingerprint": fp.name, "fingerprint_hash": fp.hash,
                    "error_budget": options.error_budget, "source": loaded.name})
    sites, skipped = frontend.capture()  # kept by the front-end for the pipeline's capture step
    outputs = [o.name for o in loaded.model.graph.output]
    if isinstance(options.output, str) and options.output not in outputs:
        raise OptionError(f"--output names {options.output!r}, which is not an output of {loaded.path}; its "
                          f"outputs: {', '.join(outputs)}")
    if isinstance(options.output, int) and options.output >= len(outputs):
        raise OptionError(f"--output is {options.output}, but {loaded.path} has {len(outputs)} output(s)")
    if options.plan is not None:
        from sparsec.errors import PlanError

        unmatched = options.plan.describe_unmatched([s.name for s in [*sites, *skipped]], str(loaded.path))
        if unmatched:
            raise PlanError(unmatched)
    if sites:
        feeds = load_npz(calibration, loaded.model) if calibration else generate(loaded.model, sizes=dims)
    else:
        feeds = Feeds(runs=[], calls=[], source="none (nothing to calibrate)")
    frontend.calibration = feeds
    frontend.heldout = load_npz(heldout, loaded.model, what="heldout") if heldout else None
    if feeds.generated:
        warnings.append(
            f"calibrated on {feeds.source} ({'; '.join(feeds.notes)}), not on real data: the errors and the "
            "choices reflect made-up inputs; pass --calibration data.npz with representative inputs")
    frontend.warnings = warnings
    return frontend


# -- input checks ---------------------------------------------------------------------------------


def _check_input(loaded) -> None:
    from sparsec.passes.onnx_model import EXTERNAL_DATA_BYTES, serialized_bytes

    model = loaded.model
    try:
        if serialized_bytes(model) < EXTERNAL_DATA_BYTES:
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


def provider_key(provider: str) -> str:
    """``auto``, ``cpu`` or ``cuda``, from those or from onnxruntime's own provider names."""
    if provider in PROVIDERS:
        return provider
    by_name = {name.lower(): key for key, name in PROVIDERS.items() if name}
    if isinstance(provider, str) and provider.lower() in by_name:
        return by_name[provider.lower()]
    raise OptionError(f"provider {provider!r} is not one sparsec plans for; use auto, cpu or cuda (or "
                      f"onnxruntime's names: {', '.join(n for n in PROVIDERS.values() if n)})")


def choose_executor(provider: str, fingerprint) -> Executor:
    """The onnxruntime provider to run on, the fingerprint describing it, and the session threads."""
    from sparsec.fingerprint import Fingerprint, load_fingerprint
    from sparsec.fingerprint.device import current_device_name
    from sparsec.passes.onnx_model import best_provider

    provider = provider_key(provider)
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
                            "sparsec.fingerprint.ort --provider CUDAExecutionProvider -o ...'); planned and "
                            "timed on the CPU provider, which the shipped ort-cpu describes")
            wanted = "CPUExecutionProvider"
            fp = _ort_fingerprint(wanted)
        if fp is None:
            raise FingerprintError(f"no onnxruntime fingerprint of {wanted}: measure one with 'python -m "
                                   f"sparsec.fingerprint.ort -o FILE --provider {wanted}' and pass --fingerprint FILE")
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
                        f"{device}; measure it here with 'python -m sparsec.fingerprint.ort -o FILE'")
    threads = (fp.data.get("grid") or {}).get("intra_op_num_threads") if is_onnxruntime_fingerprint(fp) else None
    return Executor(provider=wanted, fingerprint=fp, device=device, threads=threads or None, warnings=warnings)


def is_onnxruntime_fingerprint(fp) -> bool:
    kernels = fp.data.get("kernels", {}).get("dense", [])
    return bool(kernels) and all(str(e.get("kernel", "")).startswith("onnxruntime") for e in kernels)


def _ort_fingerprint(provider: str):
    """Your own onnxruntime fingerprint of this device, else the shipped one for this provider and
    device (``ort-cuda-h200`` on an H200), else the shipped one for the provider (``ort-cpu``)."""
    from sparsec import fingerprints
    from sparsec.fingerprint import load_fingerprint
    from sparsec.fingerprint.device import current_device_name, device_slug, slugify, user_fingerprint_dir

    kind = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    mine = user_fingerprint_dir() / f"ort-{device_slug(kind)}.json"
    if mine.is_file():
        return load_fingerprint(mine)
    if kind == "cuda":
        tokens = set(slugify(current_device_name(kind)).split("-"))
        for name in fingerprints.shipped_names():
            if name.startswith("ort-cuda-") and name[len("ort-cuda-"):] in tokens:
                return load_fingerprint(fingerprints.shipped_path(name))
    shipped = fingerprints.shipped_path(f"ort-{kind}")
    return load_fingerprint(shipped) if shipped else None


def _formats_with_onnx_form(options, explicit: bool) -> None:
    """Formats that standard ONNX cannot write (activation sparsity) are refused where the user
    named them, left out where they came by default."""
    from sparsec.formats import family_of
    from sparsec.passes.onnx_forms import has_form

    why = "standard ONNX has no operator that skips weight rows by its input's values; use torch.compile"
    plan = options.plan
    for key, value in (plan.layers.items() if plan is not None else ()):
        if value != "auto" and not has_form(family_of(value)):
            raise OptionError(f"plan entry {key!r}: {value} is not available on the ONNX path: {why}")
    missing = [f for f in options.formats if not has_form(f)]
    if missing and explicit:
        raise OptionError(f"--formats names {', '.join(missing)}, not available on the ONNX path: {why}")
    options.formats = tuple(f for f in options.formats if f not in missing)


def executor_formats(formats, executor: Executor) -> tuple[tuple[str, ...], str | None]:
    """The default formats for onnxruntime: those written as (or with a part written as) pruned dense
    weights are left out.

    onnxruntime's execution providers have no sparse MatMul: a 2:4 or block-sparse weight is a
    dense weight with zeros to them, and the fingerprint measures exactly that. Planning them would
    spend error budget (and time pruning) for no speed; they stay available through ``formats``.
    """
    from sparsec.formats import FAMILIES

    dropped = [f for f in formats if FAMILIES[f].pruned_part]
    if not dropped:
        return tuple(formats), None
    measured = []
    for family in dropped:
        ratio = dense_ratio(executor.fingerprint, family)
        if ratio is not None:
            measured.append(f"{family} at {ratio[0]:.2f}x of dense's time (median of {ratio[1]} shapes)")
    evidence = f"; {executor.fingerprint.name} measured " + ", ".join(measured) if measured else ""
    names = " and ".join(dropped) if len(dropped) < 3 else ", ".join(dropped[:-1]) + " and " + dropped[-1]
    note = (f"{names} not tried: onnxruntime's {executor.provider} runs them (or their sparse part) as dense "
            f"MatMuls over pruned weights, so they cannot save time here{evidence}. Pass --formats with them to write "
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


# -- report ---------------------------------------------------------------------------------------


def _save_report(report, path) -> list[Path]:
    """Write the report; an HTML page also gets its JSON data beside it (pages cannot be read back)."""
    path = Path(path)
    paths = [report.save(path)]
    if path.suffix.lower() in (".html", ".htm"):
        paths.append(report.save(path.with_suffix(".json")))
    return paths
