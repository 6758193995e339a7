"""Reading and writing ONNX files: each bad input is refused with its reason; writes are all or nothing."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx_builders import lowrank_mlp

from sparsec.errors import ModelError
from sparsec.passes import onnx_model
from sparsec.passes.onnx_model import check_writable, default_opset, load_model, ort_max_ir_version, save_checked


@pytest.fixture
def model_file(tmp_path):
    model, _ = lowrank_mlp(d=32, rank=4, layers=2)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    return path


def test_a_good_model_loads(model_file):
    loaded = load_model(model_file)
    assert loaded.opset == 17 and not loaded.external_data and len(loaded.model.graph.node) == 5


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"),
    ("empty", "is empty, not an ONNX model"),
    ("text", "is not an ONNX model"),
    ("truncated", "truncated or corrupted"),
    ("folder", "is a folder"),
])
def test_bad_files_are_refused_with_the_reason(tmp_path, model_file, case, expected):
    path = tmp_path / f"{case}.onnx"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("this is a README, not a model\n" * 20)
    elif case == "truncated":
        data = model_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "folder":
        path.mkdir()
    with pytest.raises(ModelError, match=expected):
        load_model(path)


def test_opset_older_than_13_is_read_as_13_with_a_note(tmp_path):
    model, _ = lowrank_mlp(d=8, rank=2, layers=1)
    model.opset_import[0].version = 11
    path = tmp_path / "old.onnx"
    onnx.save_model(model, str(path))
    loaded = load_model(path)
    assert loaded.opset == 13 and default_opset(loaded.model) == 13
    assert [n.name for n in loaded.model.graph.node] == [n.name for n in model.graph.node]
    assert any("opset 11, older than 13" in note for note in loaded.notes), loaded.notes


def test_an_old_opset_the_converter_cannot_convert_is_refused_with_its_reason(tmp_path, monkeypatch):
    from onnx import version_converter

    def fails(model, target):
        raise RuntimeError("No Previous Version of Frobnicate exists")

    monkeypatch.setattr(version_converter, "convert_version", fails)
    model, _ = lowrank_mlp(d=8, rank=2, layers=1)
    model.opset_import[0].version = 12
    path = tmp_path / "old.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match="opset 12 is older than 13.*could not convert it.*Frobnicate"):
        load_model(path)


def test_an_ir_version_newer_than_onnxruntime_reads_is_lowered_to_what_its_opsets_need(tmp_path):
    model, _ = lowrank_mlp(d=8, rank=2, layers=1)
    readable = ort_max_ir_version()
    model.ir_version = readable + 1
    path = tmp_path / "new.onnx"
    onnx.save_model(model, str(path))
    loaded = load_model(path)
    assert loaded.model.ir_version == readable
    (note,) = loaded.notes
    assert f"declares ONNX IR version {readable + 1}" in note and f"as IR version {readable}" in note
    import onnxruntime as ort

    ort.InferenceSession(loaded.model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_an_opset_that_needs_an_ir_version_onnxruntime_cannot_read_is_refused(tmp_path, monkeypatch):
    model, _ = lowrank_mlp(d=8, rank=2, layers=1)  # opset 17 needs IR version 8
    monkeypatch.setattr(onnx_model, "ort_max_ir_version", lambda: 7)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match="need ONNX IR version 8, but onnxruntime .* reads up to IR version 7"):
        load_model(path)
    assert onnx.load(str(path)).ir_version == model.ir_version  # the file is left as it was


def test_external_data_is_loaded_and_missing_data_is_named(tmp_path):
    model, _ = lowrank_mlp(d=64, rank=4, layers=2)
    expected = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    loaded = load_model(path)
    assert loaded.external_data
    assert np.array_equal(onnx.numpy_helper.to_array(loaded.model.graph.initializer[0]), expected)
    os.unlink(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelError, match="external weight data cannot be read"):
        load_model(path)


def test_unwritable_or_missing_output_folder_is_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_writable(tmp_path / "nope" / "out.onnx")
    with pytest.raises(ModelError, match="not writable"):
        check_writable("/proc/out.onnx")  # refuses even root
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            pytest.skip("this user can write to read-only folders")
        with pytest.raises(ModelError, match="not writable"):
            check_writable(locked / "out.onnx")
    finally:
        locked.chmod(0o700)


def test_save_is_checked_and_atomic(tmp_path):
    model, _ = lowrank_mlp(d=16, rank=2, layers=1)
    out = tmp_path / "out.onnx"

    def refuse(staged):
        assert staged.exists() and staged != out
        raise ModelError("refused by the check")

    with pytest.raises(ModelError, match="refused by the check"):
        save_checked(model, out, check=refuse)
    assert list(tmp_path.iterdir()) == []  # neither the model nor a temporary folder is left
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].input[1] = "does_not_exist"
    with pytest.raises(ModelError, match="fails onnx.checker"):
        save_checked(broken, out)
    assert list(tmp_path.iterdir()) == []
    written = save_checked(model, out, external_data=True)
    assert written == [out, tmp_path / "out.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)


def test_serialized_size_is_estimated_from_the_weights_without_serialising_them():
    """Within a few kB above protobuf's own count, for raw weights, typed-field weights and
    constants alike: it only decides between in-memory and external-data handling."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx_builders import lowrank_mlp

    from sparsec.passes.onnx_model import serialized_bytes

    model, _ = lowrank_mlp(d=256, rank=16, layers=3, tokens=8)
    typed = helper.make_tensor("typed", onnx.TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32).tolist())
    model.graph.initializer.append(typed)  # float_data, not raw_data
    const = numpy_helper.from_array(np.ones((32, 32), np.float32), "c")
    model.graph.node.append(helper.make_node("Constant", [], ["c_out"], value=const))
    exact = model.ByteSize()
    assert exact <= serialized_bytes(model) <= exact + 16 * 1024
    assert exact > 3 * 256 * 256 * 4  # the weights are most of it


def test_shapes_inferred_from_the_skeleton_match_inference_on_the_whole_model():
    """The skeleton declares large weights instead of storing them; a Reshape's target stays a value."""
    from onnx import TensorProto, helper
    from onnx_builders import make_model, tensor, vi

    from sparsec.passes.onnx_model import infer_shapes, shape_skeleton

    rng = np.random.default_rng(0)
    w = tensor("w", rng.standard_normal((256, 96)).astype(np.float32))  # 24576 values: declared only
    target = tensor("target", np.array([-1, 8, 12], dtype=np.int64))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "target"], ["y"])]
    model = make_model(nodes, [vi("x", ["M", 256])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                       [w, target])
    skeleton = shape_skeleton(model)
    assert [i.name for i in skeleton.graph.initializer] == ["target"]
    assert "w" in [i.name for i in skeleton.graph.input]
    full = onnx.shape_inference.infer_shapes(model, data_prop=True)
    expected = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in [*full.graph.value_info, *full.graph.output]}
    shapes = infer_shapes(model)
    assert shapes["h"] == expected["h"] == [None, 96]
    assert shapes["y"] == expected["y"] == [None, 8, 12]
    assert shapes["w"] == [256, 96]
    assert len(model.graph.initializer) == 2  # the user's model is untouched
