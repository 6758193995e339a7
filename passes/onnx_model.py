"""Reading, checking, running and writing ONNX models: the file-level chores of the ONNX entry.

Everything here turns a failure the user can act on into one ``ModelError`` sentence: a missing
file, bytes that are not ONNX, a truncated file, external data that is not where the model says,
an opset older than the one sparsec reads. Writing goes through a temporary folder beside the
output and a rename, so a failure never leaves a partial model (or a model without its data).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sparsec import interrupts, paths
from sparsec.errors import ModelError

MIN_OPSET = 13
# Protobuf cannot serialise a message of 2 GiB; above this a model is written with external data.
EXTERNAL_DATA_BYTES = int(1.8e9)
DEFAULT_DOMAINS = ("", "ai.onnx")


def serialized_bytes(model: onnx.ModelProto) -> int:
    """About ``model.ByteSize()`` (a few kB over), without serialising the weights.

    protobuf's ``ByteSize`` serialises the whole message to measure it (0.27 s a call for an 88 MB
    model on this project's 2-core CPU, six calls a plan), and every session and write asks. The weights are almost all of a large model, and
    a raw initializer's size is its ``raw_data`` length; the rest is measured as protobuf does.
    Used only against ``EXTERNAL_DATA_BYTES``, which leaves 300 MB below protobuf's limit.
    """
    graph = model.graph
    weights = sum(len(t.raw_data) + 64 + 8 * len(t.dims) + len(t.name) if t.raw_data else t.ByteSize()
                  for t in graph.initializer)
    rest = sum(n.ByteSize() for n in graph.node) + sum(t.ByteSize() for t in graph.sparse_initializer)
    rest += sum(v.ByteSize() for v in (*graph.input, *graph.output, *graph.value_info))
    return weights + rest + sum(f.ByteSize() for f in model.functions) + 4096


@dataclass
class LoadedModel:
    """A model read from disk with its weights in memory, and where it came from."""

    model: onnx.ModelProto
    path: Path
    opset: int
    external_data: bool
    notes: list[str] = field(default_factory=list)  # what was changed on reading, for the report's warnings

    @property
    def name(self) -> str:
        return self.path.name


def load_model(path) -> LoadedModel:
    """Read and check an ONNX file (external data included); ModelError says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path} is a folder; pass the .onnx file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read it ({exc.strerror})") from None
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(_unparsable(path, head, exc)) from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelError(f"{path} is not an ONNX model (no graph, IR version or opset in it)")
    opset = default_opset(model)
    if opset is None:
        raise ModelError(f"{path}: the model imports no version of the standard ONNX operator set")
    notes = []
    if opset < MIN_OPSET:
        notes.append(f"{path.name} uses opset {opset}, older than {MIN_OPSET}, the oldest sparsec reads: read as "
                     f"opset {MIN_OPSET} (onnx.version_converter), and written so")
        model, opset = _upgraded(model, path, opset), MIN_OPSET
    notes += _readable_ir_version(model, path)
    external = _uses_external_data(model)
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # OSError, ValueError, onnx's ValidationError
            raise ModelError(
                f"{path}: its external weight data cannot be read ({_first_line(exc)}); keep the data file(s) "
                "next to the model, under the names the model records"
            ) from None
    return LoadedModel(model=model, path=path, opset=opset, external_data=external, notes=notes)


def _upgraded(model: onnx.ModelProto, path: Path, opset: int) -> onnx.ModelProto:
    """The model converted to MIN_OPSET by onnx's version converter (old exporters wrote opsets 11
    and 12, whose Split, Squeeze and Unsqueeze read their axes as attributes); ModelError where
    the converter cannot."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter's RuntimeError for ops it has no adapter for, and the like
        raise ModelError(
            f"{path}: opset {opset} is older than {MIN_OPSET}, the oldest sparsec reads, and onnx.version_converter "
            f"could not convert it ({_first_line(exc)}); export the model again with opset {MIN_OPSET} or newer"
        ) from None


def _readable_ir_version(model: onnx.ModelProto, path: Path) -> list[str]:
    """Lower an IR version newer than onnxruntime reads to one it does, where the model's opsets allow.

    Exporters stamp the newest IR version their onnx package knows, which can be newer than the
    installed onnxruntime accepts although nothing in the model needs it: the IR version a model
    needs follows from its operator sets."""
    readable = ort_max_ir_version()
    if model.ir_version <= readable:
        return []
    import onnxruntime as ort

    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except ValueError:  # an operator set newer than this onnx package knows
        needed = model.ir_version
    sets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    if needed > readable:
        raise ModelError(
            f"{path}: its operator sets ({sets}) need ONNX IR version {needed}, but onnxruntime {ort.__version__} "
            f"reads up to IR version {readable}; upgrade onnxruntime, or convert the model to an older opset "
            "with onnx.version_converter.convert_version")
    was, model.ir_version = model.ir_version, max(needed, min(readable, model.ir_version))
    return [f"{path.name} declares ONNX IR version {was}, newer than onnxruntime {ort.__version__} reads "
            f"({readable}); its operator sets ({sets}) need only {needed}, so it is read and written as IR "
            f"version {model.ir_version}"]


@functools.lru_cache(maxsize=1)
def ort_max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads, found by loading a one-node model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    for version in range(onnx.IR_VERSION, 6, -1):
        probe = _identity_model(version)
        try:
            ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - onnxruntime's own exception types: too new for it
            continue
        return version
    return 7


def _identity_model(ir_version: int) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", MIN_OPSET)], ir_version=ir_version)


def _unparsable(path: Path, head: bytes, exc: Exception) -> str:
    size = path.stat().st_size
    # An ONNX file starts with field 1 (ir_version, varint): tag byte 0x08.
    if head[:1] == b"\x08":
        return (f"{path} looks like ONNX but cannot be parsed: the file is truncated or corrupted "
                f"({size} bytes; {type(exc).__name__})")
    return f"{path} is not an ONNX model (it does not parse as one: {type(exc).__name__})"


def default_opset(model: onnx.ModelProto) -> int | None:
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model)
    )


SKELETON_KEEP_ELEMENTS = 4096  # initializers up to this size keep their values: shape constants, axes


def shape_skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer of its main graph turned into a typed graph input.

    Shape inference reads a weight's type and dims, which an input declares as well; the small
    initializers (Reshape targets, axes, scalars) keep their values for data propagation.
    """
    g = model.graph
    declared = {i.name for i in g.input}
    small, inputs = [], list(g.input)
    for init in g.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= SKELETON_KEEP_ELEMENTS and not init.external_data:
            small.append(init)
        elif init.name not in declared:
            inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    graph = helper.make_graph(list(g.node), g.name, inputs, list(g.output), small, value_info=list(g.value_info),
                              sparse_initializer=list(g.sparse_initializer))
    skeleton = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    return skeleton


def infer_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static shapes of the graph's values where ONNX shape inference finds them (None: unknown dim).

    Inference runs on a skeleton of the model whose large weights are declared, not stored: it
    needs their shapes only, and serialising hundreds of megabytes of weights for it took longer
    than the rest of calibration. Inference failures on exotic graphs are not errors: the callers
    have a shape-free path.
    """
    shapes: dict[str, list[int | None]] = {}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        shapes[vi.name] = value_info_shape(vi)
    try:
        inferred = onnx.shape_inference.infer_shapes(shape_skeleton(model), data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort, see docstring
        inferred = None
    if inferred is not None:
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            shape = value_info_shape(vi)
            if shape is not None:
                shapes[vi.name] = shape
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return {k: v for k, v in shapes.items() if v is not None}


def value_info_shape(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def value_info_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    """Declared dims of a graph input: ints, symbolic names, or None for an unnamed unknown dim."""
    t = vi.type.tensor_type
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def elem_numpy_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


FOLDED_OPS = ("Identity", "Transpose", "Cast")


class Constants:
    """The constant tensors of a graph: initializers and ``Constant`` nodes, read lazily, and what
    ``Identity``, ``Transpose`` and ``Cast`` nodes make of them. Exporters write a weight shared by
    copied layers (as ``nn.TransformerEncoder``'s are at first) once and hand the copies an Identity
    of it; others store a weight transposed, or in float32 cast to the model's float16 at run time."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        inputs = {i.name for i in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}
        # IR >= 4 lets a graph input shadow an initializer: a default the caller may override.
        self.overridable = {name for name in self.initializers if name in inputs}
        self.constant_nodes = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and len(node.output) == 1:
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None and value.HasField("t"):
                    self.constant_nodes[node.output[0]] = value.t
        self.folded: dict[str, onnx.NodeProto] = {}  # output -> the node that makes it of a constant
        for node in graph.node:  # in order: a chain resolves to its first constant
            if (node.op_type in FOLDED_OPS and node.domain in DEFAULT_DOMAINS and len(node.input) == 1
                    and len(node.output) == 1 and self.has(node.input[0]) and node.input[0] not in self.overridable
                    and _foldable(node, self)):
                self.folded[node.output[0]] = node
        self._cache: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.initializers or name in self.constant_nodes or name in self.folded

    def proto(self, name: str) -> onnx.TensorProto | None:
        found = self.initializers.get(name) or self.constant_nodes.get(name)
        if found is None and name in self.folded:
            node = self.folded[name]
            source = self.proto(node.input[0])
            if node.op_type == "Identity":
                found = source
            else:
                array = numpy_helper.to_array(source)
                if node.op_type == "Transpose":
                    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                    array = np.transpose(array, perm)
                else:
                    array = array.astype(elem_numpy_dtype(_cast_to(node)))
                found = numpy_helper.from_array(np.ascontiguousarray(array), name)
            self.constant_nodes[name] = found  # made once
        return found

    def dims(self, name: str) -> list[int] | None:
        t = self.proto(name)
        return None if t is None else list(t.dims)

    def elem_type(self, name: str) -> int | None:
        t = self.proto(name)
        return None if t is None else int(t.data_type)

    def array(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = numpy_helper.to_array(self.proto(name))
        return self._cache[name]


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


FLOAT_ELEMS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _foldable(node: onnx.NodeProto, constants: "Constants") -> bool:
    """Identity and Transpose always; Cast between float types only (a weight changing precision)."""
    if node.op_type != "Cast":
        return True
    return _cast_to(node) in FLOAT_ELEMS and constants.elem_type(node.input[0]) in FLOAT_ELEMS


# -- onnxruntime --------------------------------------------------------------------------------


def session(model: onnx.ModelProto, provider: str = "CPUExecutionProvider", threads: int | None = None,
            workdir: str | None = None):
    """An onnxruntime session for an in-memory model (through a temporary file when it is large).

    ``threads``: intra-op threads (None or 0: onnxruntime's default, one per physical core).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        if serialized_bytes(model) < EXTERNAL_DATA_BYTES:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        folder = tempfile.mkdtemp(prefix="sparsec-ort-", dir=workdir)
        try:
            path = os.path.join(folder, "model.onnx")
            staged = onnx.ModelProto()
            staged.CopyFrom(model)  # saving with external data rewrites the tensors it saves in place
            onnx.save_model(staged, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data")
            return ort.InferenceSession(path, opts, providers=providers)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0]}") from None


def runner(sess, feed: dict, provider: str):
    """A callable that runs ``sess`` on ``feed`` the way a deployment does, for timing.

    On the CPU provider that is ``session.run``. On a GPU provider inputs and outputs stay on the
    device (I/O binding), as they do in a served model: ``session.run`` with host arrays would time
    the copies to and from the device along with the model, and the copies do not shrink when a
    layer does. onnxruntime synchronises the device at the end of each run, so a host clock around
    the call times the work.
    """
    if provider == "CPUExecutionProvider":
        return lambda: sess.run(None, feed)
    import onnxruntime as ort

    binding = sess.io_binding()
    inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
              for name, value in feed.items()}
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run():
        sess.run_with_iobinding(binding)

    run.inputs = inputs  # the device copies live as long as the callable
    return run


def best_provider() -> str:
    """The onnxruntime provider a model will run on here: CUDA when it really loads, else CPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "CPUExecutionProvider"
    try:
        import torch

        if not torch.cuda.is_available():
            return "CPUExecutionProvider"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "CPUExecutionProvider"
    try:
        s = session(_identity_model(8), "CUDAExecutionProvider")
    except ModelError:
        return "CPUExecutionProvider"
    return "CUDAExecutionProvider" if s.get_providers()[0] == "CUDAExecutionProvider" else "CPUExecutionProvider"


# -- writing --------------------------------------------------------------------------------------


def check_writable(output) -> Path:
    """The output path, after checking its folder exists and can be written (before any work)."""
    return paths.check_writable(output, ModelError, "model.sparsec.onnx")


def save_checked(model: onnx.ModelProto, output, *, external_data: bool | None = None, check=None) -> list[Path]:
    """Write ``model`` to ``output`` atomically, after ``onnx.checker`` (full) and ``check(path)`` pass.

    The model (and, when it is large or ``external_data`` is set, its data file
    ``<output>.data``) is first written into a temporary folder beside the output, checked there,
    then renamed into place, data first. Returns the paths written. Saving with external data
    converts ``model``'s tensors to external references (onnx does that in place): pass a model
    that is not used afterwards.
    """
    output = check_writable(output)
    folder = output.parent if str(output.parent) else Path(".")
    large = serialized_bytes(model) >= EXTERNAL_DATA_BYTES
    use_external = large if external_data is None else (external_data or large)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=folder))
    except OSError as exc:
        raise ModelError(f"cannot write {output}: {exc.strerror}") from None
    try:
        staged = tmpdir / output.name
        data_name = f"{output.name}.data"
        try:
            if use_external:
                onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
            else:
                onnx.save_model(model, str(staged))
        except OSError as exc:
            raise ModelError(f"cannot write {output}: {exc.strerror or exc}") from None
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"the rewritten model fails onnx.checker, so it was not written: {_first_line(exc)}") from None
        if check is not None:
            check(staged)
        written = []
        interrupts.check()
        if use_external:
            os.replace(tmpdir / data_name, folder / data_name)
            written.append(folder / data_name)
        os.replace(staged, output)
        written.insert(0, output)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _first_line(exc: Exception) -> str:
    from sparsec.errors import first_line

    return first_line(exc) or type(exc).__name__
