"""Fingerprint onnxruntime as the executor: the time of each format's ONNX subgraph, measured.

When sparsec writes an ONNX model, the substrate is onnxruntime with one execution provider,
not torch's kernels: what a format saves is what that runtime realises on the subgraph sparsec
emits for it. This harness times exactly those subgraphs (``sparsec.passes.onnx_emit``) over a
grid of shapes and writes a ``sparsec.fingerprint/1`` file the planner reads like any other:

* ``dense``: one MatMul with a [K, N] initializer;
* ``lowrank``: two MatMuls (rank as a fraction of min(N, K));
* ``monarch``: the Reshape/Transpose/batched-MatMul subgraph;
* ``2:4`` and ``block``: one MatMul with a *pruned* initializer. onnxruntime's providers run it as
  dense, so these entries measure what it really does with the zeros (nothing), and the planner
  sees no gain unless a runtime does better.

Each subgraph is timed as a graph of ``copies`` independent copies of it (distinct weights,
enough of them to cycle through half the last-level cache, as a model's layers do), minus a
graph that only passes the input through, divided by the copies: that removes the fixed cost of a
``session.run`` (recorded as ``measured.launch_us.eager``). At each weight shape and token count
every format's graph is timed in the same interleaved rounds (``passes/onnx_timing``), so the
ratios between formats, which decide the plan, do not drift with the machine's load.

Run: ``python -m sparsec.fingerprint.ort -o fingerprints/ort-cpu.json`` (``--grid tiny`` for seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from sparsec.errors import FingerprintError
from sparsec.fingerprint.device import describe_device, software_versions
from sparsec.fingerprint.schema import validate_fingerprint
from sparsec import formats
from sparsec.formats import FormatSpec
from sparsec.passes.onnx_emit import Emitter
from sparsec.passes.onnx_forms import emit_product, form_of, random_factors
from sparsec.passes.onnx_model import MIN_OPSET, session
from sparsec.fingerprint.timing import HOST_CLOCKS, interleaved
from sparsec.passes.onnx_timing import clock_for

SCHEMA = "sparsec.fingerprint/1"
THREADS_KEY = "intra_op_num_threads"  # in the grid block: the session setting measured
PROVIDER_SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda"}


@dataclass(frozen=True)
class OrtGrid:
    name: str
    Ms: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]  # (N, K)
    params: dict  # per family, its parameter grid (``FormatSpec.settings``)
    point_budget_s: float
    min_rounds: int
    threads: int  # onnxruntime intra-op threads (0: its default)
    dtypes: tuple[str, ...] = ("float32",)
    rotation_bytes: int = 16 << 20  # weights cycled through per point: more than the last-level cache

    def describe(self) -> dict:
        return {"name": self.name, "M": list(self.Ms), "shapes": [list(s) for s in self.shapes],
                "params": {f: [list(p) if isinstance(p, tuple) else p for p in v] for f, v in self.params.items()},
                THREADS_KEY: self.threads, "dtypes": list(self.dtypes)}

    def specs(self, family: str, N: int, K: int) -> list[FormatSpec]:
        return formats.FAMILIES[family].settings(N, K, self.params.get(family, ()))


def _shapes(squares, aspect_ks):
    return tuple([(s, s) for s in squares] + [(4 * k, k) for k in aspect_ks] + [(k, 4 * k) for k in aspect_ks])


# One intra-op thread on the shipped CPU grid: on a small shared machine onnxruntime's default
# pool (a spinning thread per core) measures the neighbours' load more than the kernels; one
# thread gives repeatable figures, and sparsec runs onnxruntime with the fingerprint's setting.
GRIDS = {
    # A 2-core CPU: M from 1 to 1024, weights to 2048 x 2048 (and 4096 x 1024).
    "cpu": OrtGrid("cpu", (1, 8, 32, 128, 512, 1024), _shapes((256, 512, 1024, 2048), (256, 1024)),
                   params={"lowrank": (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), "monarch": (2, 4, 8, 16),
                           "block": ((32, 0.25), (32, 0.5))}, point_budget_s=0.25, min_rounds=8, threads=1),
    # A data-centre GPU under the CUDA provider: decode to prefill token counts, encoder-sized
    # (MiniLM's 384-wide layers lie nearer 512 than 1024, where fixed costs weigh differently) to
    # Llama-3-8B MLP-sized weights, both 16-bit and 32-bit floats; weights cycled through 128 MB,
    # more than twice an H100's or H200's L2. (ort-cuda-h200.json predates the 512-class shapes.)
    "cuda": OrtGrid("cuda", (1, 16, 256, 2048), ((512, 512), (2048, 512), (512, 2048), (1024, 1024),
                                               (4096, 4096), (4096, 1024), (1024, 4096), (14336, 4096),
                                               (4096, 14336)),
                   params={"lowrank": (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2), "monarch": (2, 4, 8, 16),
                           "block": ((32, 0.25), (32, 0.5))}, point_budget_s=0.05, min_rounds=5, threads=0,
                   dtypes=("float16", "float32"), rotation_bytes=128 << 20),
    # Seconds, for tests of the harness itself.
    "tiny": OrtGrid("tiny", (1, 16), ((256, 256), (512, 128)), params={"lowrank": (1 / 8, 1 / 4), "monarch": (2, 4),
                                                                "block": ((32, 0.5),)}, point_budget_s=0.01, min_rounds=2, threads=1),
}
FAMILIES = ("dense", "lowrank", "monarch", "2:4", "block")
MAX_COPIES = 16
ELEMENT = {"float32": (onnx.TensorProto.FLOAT, np.float32, 4), "float16": (onnx.TensorProto.FLOAT16, np.float16, 2)}


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "sparsec_fingerprint", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", max(MIN_OPSET, 17))])
    m.ir_version = 8
    return m


def subgraph_model(spec: FormatSpec, N: int, K: int, copies: int, rng: np.random.Generator,
                   M: int | None = None, dtype: str = "float32") -> onnx.ModelProto:
    """``copies`` independent copies of ``spec``'s subgraph, each reading x [M, K], each a graph output.

    ``M`` None leaves the token count dynamic, so one session serves every M of the grid."""
    m_dim = M if M is not None else "M"
    elem, np_dtype, _ = ELEMENT[dtype]
    x = helper.make_tensor_value_info("x", elem, [m_dim, K])
    nodes, inits, outs, taken = [], [], [], {"x"}
    for c in range(copies):
        em = Emitter(prefix=f"copy{c}", taken=taken)
        y = f"y{c}"
        emit_product(em, spec, "x", y, random_factors(spec, N, K, rng, np_dtype), N, K, [M, K])
        nodes += em.nodes
        inits += em.initializers
        outs.append(helper.make_tensor_value_info(y, elem, [m_dim, N]))
    return _model(nodes, inits, [x], outs)


def passthrough_model(M: int | None, K: int, dtype: str = "float32") -> onnx.ModelProto:
    m_dim = M if M is not None else "M"
    elem = ELEMENT[dtype][0]
    x = helper.make_tensor_value_info("x", elem, [m_dim, K])
    y = helper.make_tensor_value_info("y", elem, [m_dim, K])
    return _model([helper.make_node("Identity", ["x"], ["y"])], [], [x], [y])


def weight_bytes(spec: FormatSpec, N: int, K: int, dtype: str = "float32") -> int:
    if hasattr(spec, "parts"):
        return sum(weight_bytes(part, N, K, dtype) for part in spec.parts(N, K))
    return ELEMENT[dtype][2] * (N * K if spec.prunes else spec.stored_params(N, K))


def copies_for(spec: FormatSpec, N: int, K: int, dtype: str = "float32", rotation_bytes: int = 16 << 20) -> int:
    """Enough copies for their weights to fill ``rotation_bytes`` (at most ``MAX_COPIES``)."""
    return max(1, min(MAX_COPIES, math.ceil(rotation_bytes / weight_bytes(spec, N, K, dtype))))


def measure_shape(specs: list[FormatSpec], N: int, K: int, provider: str, grid: OrtGrid,
                  rng: np.random.Generator, dtype: str = "float32") -> dict[FormatSpec, dict[int, float]]:
    """Microseconds of every spec's subgraph at each M of the grid for one weight shape and dtype.

    All specs (and the pass-through graph) are timed together at each M, in interleaved rounds,
    so that a change of load or clock frequency during the measurement moves them alike and the
    ratios the planner acts on stay right."""
    from sparsec.passes.onnx_model import runner

    copies = [copies_for(spec, N, K, dtype, grid.rotation_bytes) for spec in specs]
    sessions = [session(subgraph_model(spec, N, K, c, rng, dtype=dtype), provider, grid.threads)
                for spec, c in zip(specs, copies)]
    base = session(passthrough_model(None, K, dtype), provider, grid.threads)
    out: dict[FormatSpec, dict[int, float]] = {spec: {} for spec in specs}
    for M in grid.Ms:
        feed = {"x": rng.standard_normal((M, K)).astype(ELEMENT[dtype][1])}
        runs = [runner(s, feed, provider) for s in (*sessions, base)]
        t = interleaved(runs, budget_s=grid.point_budget_s * len(runs), min_rounds=grid.min_rounds, max_rounds=100,
                        round_s=0.002, warmup=2, clock=clock_for(provider, grid.threads))
        overhead = t.us[-1]
        for spec, total, c in zip(specs, t.us, copies):
            # Noise can make the difference vanish for the smallest subgraphs; never report less
            # than a tenth of the measured per-copy time.
            out[spec][M] = max(total - overhead, 0.1 * total) / c
    return out


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def new_document(name: str, provider: str, grid: OrtGrid) -> dict:
    import onnxruntime as ort

    from sparsec import __version__

    kind = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    device = describe_device(kind)
    software = software_versions(kind)
    software["sparsec"] = __version__
    threads = grid.threads or "onnxruntime's default"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    on = (f"onnxruntime {ort.__version__} {provider} (intra-op threads: {threads}) on "
          f"{device['name']}" + (f" with {device['cores']} cores" if device.get("cores") else "")
          + (f", load average {load:.1f} when the measurement started" if load is not None else ""))
    return {
        "schema": SCHEMA, "name": name, "created": _now(), "complete": False, "measured_on": on,
        "device": device, "software": software,
        "measured": {"copy_GBps": None, "peak_tflops": {}, "launch_us": {"eager": None, "graph": None}},
        "granules": {}, "kernels": {},
        "skipped": {**({} if "float16" in grid.dtypes else
                       {"float16": "not measured: float32 is what onnxruntime's CPU provider accelerates"}),
                    "graph": "not measured: sparsec runs onnxruntime sessions without CUDA-graph capture; eager only"},
        "grid": grid.describe(),
        "method": {"repeats": grid.min_rounds, "warmup": 2,
                   "timer": HOST_CLOCKS[clock_for(provider, grid.threads)][1] + " around session.run",
                   "statistic": (f"per point: min over >= {grid.min_rounds} interleaved rounds of the mean "
                                 "session.run time of a graph of copies of the subgraph, minus that of a "
                                 "pass-through graph, divided by the copies"
                                 + ("; inputs and outputs bound on the device (I/O binding)"
                                    if provider != "CPUExecutionProvider" else "")),
                   "rotation_bytes": grid.rotation_bytes, "seconds": 0.0},
    }


def measure(out: Path, *, grid: str | None = None, provider: str = "CPUExecutionProvider", name: str | None = None,
            families=FAMILIES, log=None, seed: int = 0, threads: int | None = None) -> Path:
    """Measure every family over ``grid`` with ``provider`` and write the fingerprint to ``out``."""
    import onnxruntime as ort

    grid = grid or ("cpu" if provider == "CPUExecutionProvider" else "cuda")
    if grid not in GRIDS:
        raise FingerprintError(f"unknown grid {grid!r}; use one of {', '.join(GRIDS)}")
    if provider not in ort.get_available_providers():
        raise FingerprintError(f"onnxruntime here has no {provider}; it has {', '.join(ort.get_available_providers())}")
    g = GRIDS[grid] if threads is None else dataclasses.replace(GRIDS[grid], threads=threads)
    out = Path(out)
    short = PROVIDER_SHORT.get(provider, provider)
    doc = new_document(name or out.stem, provider, g)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    rng = np.random.default_rng(seed)
    start = time.monotonic()
    doc["measured"]["launch_us"]["eager"] = round(_run_overhead(provider, g.threads), 3)
    kernels: dict[str, list[dict]] = {family: [] for family in families}
    for N, K in g.shapes:
        specs = [spec for family in families for spec in g.specs(family, N, K) if not spec.check(N, K)]
        for dtype in g.dtypes:
            times = measure_shape(specs, N, K, provider, g, rng, dtype)
            for spec in specs:
                for M, us in times[spec].items():
                    entry = {"M": M, "N": N, "K": K, "dtype": dtype, "mode": "eager", "us": round(us, 4),
                             "kernel": f"onnxruntime {short}: {form_of(spec).label}"}
                    entry.update(spec.record())
                    kernels[spec.family].append(entry)
            log(f"[{time.monotonic() - start:6.1f} s] {N}x{K} {dtype}: {len(specs)} subgraphs x {len(g.Ms)} token counts")
        # what is measured so far, marked incomplete, so a run stopped by a time limit keeps it
        _write(out, doc, kernels, start, complete=False)
    _write(out, doc, kernels, start, complete=True)
    return out


def _write(out: Path, doc: dict, kernels: dict, start: float, *, complete: bool) -> None:
    from sparsec.fingerprint.measure import write_atomically

    doc["kernels"] = {family: entries for family, entries in kernels.items() if entries}
    for dtype in sorted({e["dtype"] for e in doc["kernels"].get("dense", [])}):
        dense = [e for e in doc["kernels"]["dense"] if e["dtype"] == dtype]
        if dense:
            best = max(2.0 * e["M"] * e["N"] * e["K"] / (e["us"] * 1e6) for e in dense)
            doc["measured"]["peak_tflops"][dtype] = round(best, 4)
    doc["complete"] = complete
    doc["created"] = _now()
    doc["method"]["seconds"] = round(time.monotonic() - start, 1)
    validate_fingerprint(doc)
    write_atomically(out, doc)


def _run_overhead(provider: str, threads: int) -> float:
    """Microseconds of ``session.run`` on a graph that does nothing but pass one float through."""
    from sparsec.passes.onnx_model import runner

    sess = session(passthrough_model(1, 1), provider, threads)
    feed = {"x": np.zeros((1, 1), dtype=np.float32)}
    return interleaved([runner(sess, feed, provider)], budget_s=0.2, min_rounds=5, round_s=0.005,
                       clock=clock_for(provider, threads)).us[0]


def main(argv=None) -> int:
    """``python -m sparsec.fingerprint.ort ARGS`` is ``sparsec fingerprint measure --onnxruntime ...``."""
    parser = argparse.ArgumentParser(prog="python -m sparsec.fingerprint.ort", description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, help="fingerprint JSON to write")
    parser.add_argument("--grid", default=None, choices=sorted(GRIDS),
                        help="default: cpu for the CPU provider, cuda for a GPU provider")
    parser.add_argument("--provider", default="CPUExecutionProvider")
    parser.add_argument("--name", default=None, help="fingerprint name (default: the output's file stem)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads (0: its default; default: the grid's, 1 on 'cpu')")
    args = parser.parse_args(argv)
    from sparsec.cli import main as cli

    command = ["fingerprint", "measure", "--onnxruntime", args.provider, "-o", args.output]
    if args.grid:
        command += ["--grid", args.grid]
    if args.name:
        command += ["--name", args.name]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    return cli(command)


if __name__ == "__main__":
    sys.exit(main())
