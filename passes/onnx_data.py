"""Inputs for an ONNX model: calibration data from a ``.npz`` file, or generated from declared shapes.

A ``.npz`` file holds one array per graph input, named like the input, whose first axis counts
samples. A *sample* is what one inference call receives, and M (the tokens a layer sees per call,
which the cost model prices) is measured per sample:

* an array with one axis more than the input: each ``array[i]`` is a whole input (the model's own
  batch axis included), one call each; use this form to plan for batched serving;
* an array of the input's rank: the first axis is the model's batch axis. With a dynamic batch
  dimension every sample is one call of batch 1; samples are still run through onnxruntime
  several at a time (``RUN_BATCH``), only for speed, and their activations split back per sample.
  With a fixed batch dimension d, each call takes d consecutive samples.

Without a file, inputs are generated from the declared shapes: normal floats, and for integer
inputs that index an embedding table (a ``Gather``), ids uniform over the table's rows. A
dynamic dimension cannot be generated; the error names the input and the way to supply it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from sparsec.errors import ModelError
from sparsec.passes.onnx_model import Constants, elem_numpy_dtype, value_info_dims

RUN_BATCH = 8
GENERATED_CALLS = 16
PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


@dataclass
class Feeds:
    """Calls to run: one feed dict per onnxruntime run, and how many calls each run stands for
    (several batch-1 calls concatenated along a dynamic batch axis, split back afterwards)."""

    runs: list[dict[str, np.ndarray]]
    calls: list[int]
    source: str
    generated: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return int(sum(self.calls))

    def first_call(self) -> dict[str, np.ndarray]:
        """The inputs of one call, the token count planning prices: the first run, cut to its first
        call where it concatenates several along the batch axis."""
        feed, calls = self.runs[0], self.calls[0]
        if calls == 1:
            return feed
        return {name: np.ascontiguousarray(array[: array.shape[0] // calls]) for name, array in feed.items()}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs a caller must feed (those shadowing an initializer have a default and are left out)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def load_npz(path, model: onnx.ModelProto, what: str = "calibration") -> Feeds:
    path = Path(path)
    option = f"--{what}"
    if not path.is_file():
        raise ModelError(f"{what} data {path}: no such file")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive")
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, AttributeError) as exc:
        why = "holds pickled Python objects" if "pickled" in str(exc) else "cannot be read as one"
        raise ModelError(f"{what} data {path} is not an .npz archive of arrays (it {why}); write it with "
                         "numpy.savez(path, input_name=array, ...), one array per graph input") from None
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise ModelError(f"{what} data {path}: array(s) {', '.join(map(repr, unknown))} name no graph input "
                         f"(the model's inputs: {', '.join(names)})")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ModelError(f"{what} data {path} has no array for input(s) {', '.join(map(repr, missing))}; "
                         f"{option} needs one array per graph input, named like it, first axis = samples")
    plans = [_input_plan(vi, arrays[vi.name], path, what) for vi in inputs]
    calls = {p["calls"] for p in plans}
    if len(calls) != 1:
        counts = ", ".join(f"{vi.name}: {p['calls']}" for vi, p in zip(inputs, plans))
        raise ModelError(f"{what} data {path}: inputs give different numbers of calls ({counts}); "
                         "every array needs the same number of samples")
    n_calls = calls.pop()
    if n_calls == 0:
        raise ModelError(f"{what} data {path} holds no samples")
    groupable = all(p["groupable"] for p in plans)
    step = RUN_BATCH if groupable else 1
    runs, calls_per_run = [], []
    for start in range(0, n_calls, step):
        stop = min(start + step, n_calls)
        runs.append({vi.name: p["take"](start, stop) for vi, p in zip(inputs, plans)})
        calls_per_run.append(stop - start if groupable else 1)
    return Feeds(runs=runs, calls=calls_per_run, source=f"{path} ({n_calls} samples)")


def _input_plan(vi: onnx.ValueInfoProto, array: np.ndarray, path: Path, what: str) -> dict:
    dims = value_info_dims(vi)
    want = elem_numpy_dtype(vi.type.tensor_type.elem_type)
    array = _cast(array, want, vi.name, path, what)
    declared = "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"
    r = len(dims)
    if array.ndim == r + 1:
        _check_dims(array.shape[1:], dims, vi.name, path, what, declared)
        return {"calls": array.shape[0], "groupable": False, "take": lambda a, b: np.ascontiguousarray(array[a])}
    if array.ndim == r and r >= 1:
        _check_dims(array.shape[1:], dims[1:], vi.name, path, what, declared, offset=1)
        d0 = dims[0]
        if isinstance(d0, int):
            if array.shape[0] % d0:
                raise ModelError(f"{what} data {path}: input {vi.name!r} has a fixed batch of {d0} but the array "
                                 f"holds {array.shape[0]} samples, not a multiple of it")
            return {"calls": array.shape[0] // d0, "groupable": False,
                    "take": lambda a, b: np.ascontiguousarray(array[a * d0:(a + 1) * d0])}
        return {"calls": array.shape[0], "groupable": True, "take": lambda a, b: np.ascontiguousarray(array[a:b])}
    raise ModelError(f"{what} data {path}: array {vi.name!r} has shape {list(array.shape)} but the input is "
                     f"{declared}; give [samples, ...] of rank {r} (samples along the batch axis) or {r + 1} "
                     "(one whole input per sample)")


def _cast(array: np.ndarray, want: np.dtype, name: str, path: Path, what: str) -> np.ndarray:
    if array.dtype == want:
        return array
    same_kind = (np.issubdtype(array.dtype, np.floating) and np.issubdtype(want, np.floating)) or (
        np.issubdtype(array.dtype, np.integer) and np.issubdtype(want, np.integer))
    if not same_kind:
        raise ModelError(f"{what} data {path}: array {name!r} is {array.dtype} but the input takes {want}")
    return array.astype(want)


def _check_dims(shape, dims, name, path, what, declared, offset=0):
    if len(shape) != len(dims):
        raise ModelError(f"{what} data {path}: array {name!r} does not match input {declared}")
    for axis, (have, want) in enumerate(zip(shape, dims)):
        if isinstance(want, int) and have != want:
            raise ModelError(f"{what} data {path}: array {name!r} has {have} at input axis {axis + offset} "
                             f"but the input {declared} fixes it to {want}")


# -- generated inputs ----------------------------------------------------------------------------


def generate(model: onnx.ModelProto, constants: Constants | None = None, calls: int = GENERATED_CALLS,
             seed: int = 0, sizes: dict[str, int] | None = None) -> Feeds:
    """Random inputs of the declared shapes, each named dynamic dimension at its size in ``sizes``
    (``--dims``); ModelError names any other dynamic dimension, and any name in ``sizes`` that is
    no dynamic dimension of the inputs."""
    constants = constants or Constants(model)
    rng = np.random.default_rng(seed)
    inputs = graph_inputs(model)
    sizes = dict(sizes or {})
    named = {d for vi in inputs for d in value_info_dims(vi) if isinstance(d, str)}
    unknown = sorted(set(sizes) - named)
    if unknown:
        raise ModelError(f"--dims names {', '.join(map(repr, unknown))}, which is no dynamic dimension of the "
                         f"model's inputs (" + (f"theirs: {', '.join(sorted(named))}" if named else "they have none")
                         + ")")
    notes = []
    makers = []
    for vi in inputs:
        dims = [sizes.get(d, d) if isinstance(d, str) else d for d in value_info_dims(vi)]
        for axis, d in enumerate(dims):
            if not isinstance(d, int) or d < 1:
                label = f"{d!r}" if d is not None else "unnamed"
                example = ", ".join(str(x) if isinstance(x, int) else (x if isinstance(x, str) and x else "N")
                                    for x in dims)
                fix = f"pass --dims {d}=SIZE to make up inputs of that size, or " if isinstance(d, str) else "pass "
                raise ModelError(
                    f"input {vi.name!r} has a dynamic dimension ({label}, axis {axis}), so sparsec cannot "
                    f"make up inputs for it: {fix}--calibration data.npz with an array named {vi.name!r} "
                    f"of shape [samples, {example}] (numpy.savez('data.npz', {_identifier(vi.name)}=array))")
        dtype = elem_numpy_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            makers.append(lambda dims=dims, dtype=dtype: rng.standard_normal(dims).astype(dtype))
            notes.append(f"{vi.name}: normal floats")
        elif np.issubdtype(dtype, np.integer):
            rows = embedding_rows(model, constants, vi.name)
            if rows:
                makers.append(lambda dims=dims, dtype=dtype, rows=rows: rng.integers(0, rows, size=dims).astype(dtype))
                notes.append(f"{vi.name}: ids uniform in [0, {rows}) (the embedding table's rows)")
            else:
                makers.append(lambda dims=dims, dtype=dtype: np.ones(dims, dtype=dtype))
                notes.append(f"{vi.name}: ones (it indexes no embedding table; a mask-like input is assumed)")
        elif dtype == np.bool_:
            makers.append(lambda dims=dims: np.ones(dims, dtype=np.bool_))
            notes.append(f"{vi.name}: all true")
        else:
            raise ModelError(f"input {vi.name!r} has type {dtype}, which sparsec cannot generate; "
                             "pass --calibration data.npz")
    runs = [{vi.name: make() for vi, make in zip(inputs, makers)} for _ in range(calls)]
    return Feeds(runs=runs, calls=[1] * calls, source=f"{calls} generated inputs", generated=True, notes=notes)


def _identifier(name: str) -> str:
    return name if name.isidentifier() else "**{" + repr(name) + ": array}"


def embedding_rows(model: onnx.ModelProto, constants: Constants, name: str) -> int | None:
    """Rows of the smallest constant table an integer input indexes through Gather (via casts/reshapes)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    frontier, seen, rows = [name], {name}, []
    while frontier:
        tensor = frontier.pop()
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                table = node.input[0]
                dims = constants.dims(table) if constants.has(table) else None
                if dims:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    rows.append(int(dims[axis]))
            elif node.op_type in PASS_THROUGH and node.input and node.input[0] == tensor:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        frontier.append(out)
    return min(rows) if rows else None
