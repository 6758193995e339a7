"""The onnxruntime fingerprint: the harness writes a valid file the planner reads; the shipped one is whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsec.fingerprint import load_fingerprint
from sparsec.fingerprint.ort import GRIDS, THREADS_KEY, main, subgraph_model
from sparsec.formats import parse_spec
from sparsec.onnx_entry import dense_ratio, is_onnxruntime_fingerprint
from sparsec.passes.onnx_model import session


def test_tiny_grid_writes_a_fingerprint_the_planner_reads(tmp_path, capsys):
    out = tmp_path / "ort-test.json"
    assert main(["-o", str(out), "--grid", "tiny"]) == 0
    fp = load_fingerprint(out)
    assert fp.name == "ort-test" and fp.complete and is_onnxruntime_fingerprint(fp)
    assert sorted(fp.families()) == sorted(["dense", "lowrank", "monarch", "2:4", "block"])
    assert fp.data["grid"][THREADS_KEY] == 1 and "thread_time" in fp.data["method"]["timer"]
    assert fp.data["measured"]["launch_us"]["eager"] > 0
    tiny = GRIDS["tiny"]
    assert len(fp.data["kernels"]["dense"]) == len(tiny.Ms) * len(tiny.shapes)
    assert fp.predict("lowrank:16", 16, 256, 256, dtype="float32") > 0
    assert fp.can_predict("dense", "float16") is not None  # only float32 is measured
    assert "wrote" in capsys.readouterr().out


def test_unknown_provider_is_refused(tmp_path, capsys):
    assert main(["-o", str(tmp_path / "x.json"), "--grid", "tiny", "--provider", "NoSuchExecutionProvider"]) == 2
    assert "has no NoSuchExecutionProvider" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("fmt", ["dense", "lowrank:8", "monarch:4", "2:4", "block:32:0.5"])
def test_timed_subgraphs_compute_their_product(fmt):
    """What is timed runs: each copy's output has the right shape, for any token count."""
    model = subgraph_model(parse_spec(fmt), 128, 64, 2, np.random.default_rng(0))
    outs = session(model, threads=1).run(None, {"x": np.ones((5, 64), np.float32)})
    assert [o.shape for o in outs] == [(5, 128), (5, 128)] and all(np.isfinite(o).all() for o in outs)


def test_the_shipped_ort_cpu_fingerprint_is_complete_and_measured_here():
    fp = load_fingerprint("ort-cpu")
    assert fp.complete and is_onnxruntime_fingerprint(fp) and fp.device["kind"] == "cpu"
    assert sorted(fp.families()) == sorted(["dense", "lowrank", "monarch", "2:4", "block"])
    grid = GRIDS["cpu"]
    assert len(fp.data["kernels"]["dense"]) == len(grid.Ms) * len(grid.shapes)
    # pruned weights run as dense MatMuls in onnxruntime: within noise of dense, never a real gain
    for family in ("2:4", "block"):
        ratio, points = dense_ratio(fp, family)
        assert 0.85 < ratio < 1.15 and points >= len(grid.shapes)
    assert json.loads(json.dumps(fp.data)) == fp.data


@pytest.mark.parametrize("fmt", ["dense", "lowrank:8", "monarch:4", "block:32:0.5"])
def test_float16_subgraphs_are_half_precision_and_compute_their_product(fmt):
    """The GPU grid times float16 models: inputs, weights and outputs in float16 throughout."""
    import onnx

    model = subgraph_model(parse_spec(fmt), 128, 64, 2, np.random.default_rng(0), dtype="float16")
    onnx.checker.check_model(model, full_check=True)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    assert {t.data_type for t in model.graph.initializer if t.data_type in floats} == {onnx.TensorProto.FLOAT16}
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float16)
    outs = session(model, threads=1).run(None, {"x": x})
    assert all(o.dtype == np.float16 and o.shape == (5, 128) and np.isfinite(o).all() for o in outs)


def test_the_cuda_grid_covers_both_float_widths_and_llm_shapes():
    grid = GRIDS["cuda"]
    assert grid.dtypes == ("float16", "float32") and grid.threads == 0
    assert (14336, 4096) in grid.shapes and (4096, 14336) in grid.shapes and 1 in grid.Ms


def test_a_shipped_onnxruntime_gpu_fingerprint_is_found_by_device_name(monkeypatch, tmp_path):
    """On an H200 the CUDA provider is planned with ort-cuda-h200 when no fingerprint of one's own exists."""
    from sparsec import fingerprints
    from sparsec.fingerprint import device
    from sparsec.onnx_entry import _ort_fingerprint

    if fingerprints.shipped_path("ort-cuda-h200") is None:
        pytest.skip("no ort-cuda-h200 shipped")
    monkeypatch.setenv("SPARSEC_HOME", str(tmp_path))
    monkeypatch.setattr(device, "current_device_name", lambda kind=None: "NVIDIA H200")
    fp = _ort_fingerprint("CUDAExecutionProvider")
    assert fp.name == "ort-cuda-h200" and fp.device["kind"] == "cuda" and is_onnxruntime_fingerprint(fp)
    assert fp.can_predict("dense", "float16") is None and fp.can_predict("dense", "float32") is None
    monkeypatch.setattr(device, "current_device_name", lambda kind=None: "NVIDIA A100-SXM4-80GB")
    other = _ort_fingerprint("CUDAExecutionProvider")  # none, or the generic one: never another device's
    assert other is None or other.name != "ort-cuda-h200"


def test_the_cuda_provider_measures_with_device_resident_inputs(tmp_path, monkeypatch):
    """On a machine whose onnxruntime has a working CUDA provider: the tiny grid in float16 there."""
    import dataclasses

    from sparsec.fingerprint import ort as ort_fp
    from sparsec.passes.onnx_model import best_provider

    if best_provider() != "CUDAExecutionProvider":
        pytest.skip("onnxruntime's CUDA provider does not load here")
    tiny = dataclasses.replace(GRIDS["tiny"], name="tiny-cuda", dtypes=("float16", "float32"), threads=0)
    monkeypatch.setitem(ort_fp.GRIDS, "tiny-cuda", tiny)
    out = tmp_path / "ort-cuda-test.json"
    ort_fp.measure(out, grid="tiny-cuda", provider="CUDAExecutionProvider")
    fp = load_fingerprint(out)
    assert fp.device["kind"] == "cuda" and "I/O binding" in fp.data["method"]["statistic"]
    assert fp.predict("dense", 16, 256, 256, dtype="float16") > 0
    assert set(fp.data["measured"]["peak_tflops"]) == {"float16", "float32"}


def test_a_run_stopped_after_its_first_shape_leaves_that_shape_marked_incomplete(tmp_path):
    from sparsec.fingerprint import ort as ort_fp

    out = tmp_path / "ort-cut.json"
    seen = []

    def log(msg):  # called once per shape and dtype measured: stop after the first
        seen.append(msg)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ort_fp.measure(out, grid="tiny", log=log)
    doc = json.loads(out.read_text())
    first = GRIDS["tiny"].shapes[0]
    assert doc["complete"] is False
    assert {(e["N"], e["K"]) for e in doc["kernels"]["dense"]} == {tuple(first)}
    assert len(doc["kernels"]["dense"]) == len(GRIDS["tiny"].Ms)
