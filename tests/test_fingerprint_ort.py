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
