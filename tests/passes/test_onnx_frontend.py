"""The ONNX front-end: calibration statistics and error evaluation through onnxruntime, checked by numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx_builders import lowrank_mlp, make_model, tensor, vi

from sparsec.passes.onnx_data import Feeds
from sparsec.passes.onnx_frontend import OnnxFrontend
from sparsec.passes.onnx_model import LoadedModel


def frontend(model, runs, calls=None, heldout=None):
    loaded = LoadedModel(model=model, path=__import__("pathlib").Path("test.onnx"), opset=17, external_data=False)
    feeds = Feeds(runs=runs, calls=calls or [1] * len(runs), source="test")
    return OnnxFrontend(loaded, feeds, heldout, threads=1)


def numpy_mlp(x, truth, names):
    acts, h = {}, x.astype(np.float64)
    for i, name in enumerate(names):
        acts[name] = h
        w, b = truth[name]
        h = h @ w.T.astype(np.float64) + b
        if i < len(names) - 1:
            h = np.maximum(h, 0.0)
    return acts, h


def test_calibration_statistics_are_the_gram_of_each_layers_input():
    model, truth = lowrank_mlp(d=32, rank=4, layers=3, tokens=16)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((16, 32)).astype(np.float32) for _ in range(3)]
    fe = frontend(model, [{"x": x} for x in xs])
    sites, skipped = fe.capture()
    stats = fe.calibrate(sites)
    names = ["fc0", "fc1", "fc2"]
    for site in sites:
        st = stats[site.input_key]
        acts = np.concatenate([numpy_mlp(x, truth, names)[0][site.name] for x in xs])
        # float32 activations from onnxruntime vs float64 numpy: relative 1e-5 of the Gram's scale
        np.testing.assert_allclose(st.gram.numpy(), acts.T @ acts, rtol=1e-4, atol=1e-4 * np.abs(acts.T @ acts).max())
        assert st.rows == 48 and st.tokens == 16 and st.calls == [16, 16, 16]


def test_runs_holding_several_calls_are_split_back_per_call():
    model, _ = lowrank_mlp(d=16, rank=2, layers=1, tokens=12)
    x = np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32)
    fe = frontend(model, [{"x": x}], calls=[3])  # three calls of 4 rows run as one
    sites, _ = fe.capture()
    st = fe.calibrate(sites)[sites[0].input_key]
    assert st.calls == [4, 4, 4] and st.tokens == 4


def test_layers_reading_one_input_share_one_statistic_counted_once():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    inits = [tensor(f"w{i}", rng.standard_normal((8, 8)).astype(np.float32)) for i in range(3)]
    model = make_model(nodes, [vi("x", [5, 8])], [vi(f"y{i}", [5, 8]) for i in range(3)], inits)
    fe = frontend(model, [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(2)])
    sites, _ = fe.capture()
    stats = fe.calibrate(sites)
    assert len(stats) == 1 and next(iter(stats.values())).rows == 10


def test_evaluate_measures_the_worst_output_and_each_layers_own_error():
    model, truth = lowrank_mlp(d=32, rank=4, layers=2, tokens=8)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((8, 32)).astype(np.float32) for _ in range(2)]
    fe = frontend(model, [{"x": x} for x in xs])
    sites, _ = fe.capture()
    fe.calibrate(sites)
    w0 = sites[0].weight.clone()
    approx = w0 + 0.01 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))
    error, local = fe.evaluate({"fc0": approx})
    names = ["fc0", "fc1"]
    perturbed = {**truth, "fc0": (approx.numpy(), truth["fc0"][1])}
    num = den = lnum = lden = 0.0
    for x in xs:
        _, ref = numpy_mlp(x, truth, names)
        acts, out = numpy_mlp(x, perturbed, names)
        num, den = num + np.sum((out - ref) ** 2), den + np.sum(ref ** 2)
        a = acts["fc0"]
        lnum += np.sum((a @ (approx.double().numpy() - w0.double().numpy()).T) ** 2)
        lden += np.sum((a @ w0.double().numpy().T + truth["fc0"][1]) ** 2)
    # float32 onnxruntime vs float64 numpy on an error of ~1%: agreement to 1e-3 of it
    assert error == pytest.approx(np.sqrt(num / den), rel=1e-3)
    assert local["fc0"] == pytest.approx(np.sqrt(lnum / lden), rel=1e-3)
    assert fe.evaluate({})[0] == 0.0


def test_a_small_output_is_not_hidden_by_a_large_one():
    """Two outputs: a wide one untouched, a 1-value one through the replaced layer."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "w_big"], ["big"], name="big"),
             helper.make_node("MatMul", ["x", "w_small"], ["small"], name="small")]
    inits = [tensor("w_big", rng.standard_normal((16, 512)).astype(np.float32)),
             tensor("w_small", rng.standard_normal((16, 1)).astype(np.float32))]
    model = make_model(nodes, [vi("x", [4, 16])], [vi("big", [4, 512]), vi("small", [4, 1])], inits)
    fe = frontend(model, [{"x": rng.standard_normal((4, 16)).astype(np.float32)}])
    sites, _ = fe.capture()
    fe.calibrate(sites)
    small = next(s for s in sites if s.name == "small")
    error, local = fe.evaluate({"small": small.weight * 1.1})
    assert error == pytest.approx(0.1, rel=1e-4)  # 10% on 'small', though 'big' carries most energy
    assert local["small"] == pytest.approx(0.1, rel=1e-4)


def test_too_few_rows_fall_back_to_a_diagonal_gram_and_are_named():
    from sparsec.options import parse_options
    from sparsec.pipeline import calibrate, calibration_warnings, candidates

    model, _ = lowrank_mlp(d=32, rank=4, layers=1, tokens=4)
    rng = np.random.default_rng(5)
    fe = frontend(model, [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(2)])
    sites, _ = fe.capture()
    stats, facts = calibrate(fe, sites)  # the pipeline's steps, the same for every front-end
    warnings = calibration_warnings(facts, candidates(sites, stats, parse_options({}), None))
    st = stats[sites[0].input_key]
    assert [w for w in warnings if w.startswith("fc0: 8 calibration rows for 32 inputs, too few")]
    # each input keeps the energy the rows showed (damped by 1% of the mean), correlations are dropped
    from sparsec.sites import DIAGONAL_DAMPING

    x = np.concatenate([f["x"].astype(np.float64) for f in fe.calibration.runs])
    energy = torch.from_numpy((x ** 2).sum(0)).to(st.gram.dtype)
    expected = torch.diag(energy + DIAGONAL_DAMPING * energy.mean())
    torch.testing.assert_close(st.gram, expected, rtol=1e-5, atol=0)
    assert st.uncorrelated


def test_replacing_a_tied_weight_changes_only_that_layer():
    rng = np.random.default_rng(6)
    table = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "table"], ["y"], name="proj"),
             helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup")]
    model = make_model(nodes, [vi("x", [2, 16]), vi("ids", [3], TensorProto.INT64)],
                       [vi("y", [2, 8]), vi("rows", [3, 8])], [tensor("table", table)])
    feed = {"x": rng.standard_normal((2, 16)).astype(np.float32), "ids": np.array([1, 2, 3])}
    fe = frontend(model, [feed])
    sites, _ = fe.capture()
    fe.calibrate(sites)
    outs, _ = fe._run(feed, {fe._eval_weight["proj"]: np.zeros((16, 8), np.float32)})
    y, rows = outs
    assert np.all(y == 0.0) and np.array_equal(rows, table[[1, 2, 3]])


def test_under_the_cuda_provider_statistics_live_on_the_gpu_and_the_model_is_rewritten(tmp_path):
    """Where onnxruntime's CUDA provider loads: calibration gathered on the GPU, candidates fitted
    there, the rewritten model (weights back on the host) written, checked and timed with that provider."""
    import onnx

    from sparsec.onnx_entry import optimize_onnx
    from sparsec.passes.onnx_model import best_provider

    if best_provider() != "CUDAExecutionProvider":
        pytest.skip("onnxruntime's CUDA provider does not load here")
    model, truth = lowrank_mlp(d=256, rank=16, layers=3, tokens=64)
    src, out = tmp_path / "mlp.onnx", tmp_path / "mlp.sparsec.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(3)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((8, 64, 256)).astype(np.float32))
    result = optimize_onnx(str(src), str(out), provider="cuda", fingerprint="ort-cpu", calibration=str(calib),
                           plan={"layers": {"_default": "lowrank:16"}})
    report = result.report.to_dict()
    assert report["executor"]["provider"] == "CUDAExecutionProvider"
    assert [l["format"] for l in report["layers"]] == ["lowrank:16"] * 3
    # the planted rank-16 weights are factored losslessly, on the GPU as on the CPU
    # onnxruntime's CUDA provider multiplies float32 in TF32 (10-bit mantissa) by default
    assert report["end_to_end"]["measured_error"] < 5e-3
    assert report["end_to_end"]["measured_us"] > 0 and out.is_file()
    fe = frontend(model, [{"x": rng.standard_normal((64, 256)).astype(np.float32)}])
    fe.provider = "CUDAExecutionProvider"
    assert fe.statistics_device() == "cuda"


@pytest.mark.parametrize("calls", [[1, 1], [2]])
def test_positions_an_attention_mask_input_masks_stay_out_of_the_statistics(calls):
    # x [B, T, 8] through one MatMul; the mask keeps 3 of 5 positions: only those rows are counted,
    # also when two calls run as one (their batches stacked)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Unsqueeze", ["m", "axes"], ["m3"], name="unsq"),
             helper.make_node("Mul", ["y", "m3"], ["out"], name="mul")]
    model = make_model(nodes, [vi("x", ["B", 5, 8]), vi("attention_mask", ["B", 5], TensorProto.INT64)],
                       [vi("out", ["B", 5, 6])], [tensor("w", w), tensor("axes", np.array([2], dtype=np.int64))])
    xs = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(2)]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 1]], dtype=np.int64)
    runs = [{"x": x, "attention_mask": mask} for x in xs] if calls == [1, 1] else \
        [{"x": np.concatenate(xs), "attention_mask": np.concatenate([mask, mask])}]
    fe = frontend(model, runs, calls=calls)
    sites, _ = fe.capture()
    st = fe.calibrate(sites)[sites[0].input_key]
    kept = np.concatenate([x[mask != 0] for x in xs]).astype(np.float64)
    assert st.rows == 12 and st.calls == [6, 6]
    np.testing.assert_allclose(st.gram.numpy(), kept.T @ kept, rtol=1e-5, atol=1e-5)
