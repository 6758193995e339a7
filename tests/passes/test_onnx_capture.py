"""Capturing MatMul / Gemm layers from ONNX graphs: weights, biases, names, and what is refused why."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx_builders import lowrank_mlp, make_model, tensor, vi

from sparsec.passes.capture_onnx import capture


def by_name(items):
    return {s.name: s for s in items}


def test_matmul_with_following_add_is_a_site_with_that_bias():
    model, truth = lowrank_mlp(d=64, rank=4, layers=2)
    sites, skipped, layers = capture(model)
    assert [s.name for s in sites] == ["fc0", "fc1"] and not skipped
    for s in sites:
        w, b = truth[s.name]
        assert (s.N, s.K) == w.shape and s.op == "MatMul"
        assert torch.equal(s.weight, torch.from_numpy(w))  # [K, N] initializer read back as (N, K)
        assert torch.equal(s.bias, torch.from_numpy(b))
    assert sites[1].input_key == "g0:h0" and layers["fc1"].weight_kn


def test_gemm_trans_b_alpha_beta_fold_into_weight_and_bias():
    model, truth = lowrank_mlp(d=32, rank=4, layers=2, gemm_last=True)
    sites, _, layers = capture(model)
    site, info = by_name(sites)["fc1"], layers["fc1"]
    w, b = truth["fc1"]  # stored as 2w with alpha 0.5, bias b/2 with beta 2
    assert site.op == "Gemm" and not info.weight_kn and info.c_is_bias
    torch.testing.assert_close(site.weight, torch.from_numpy(w), rtol=0, atol=1e-7)
    torch.testing.assert_close(site.bias, torch.from_numpy(b), rtol=0, atol=1e-7)


def test_gemm_without_trans_b_and_with_a_scalar_c():
    rng = np.random.default_rng(0)
    w_kn = rng.standard_normal((8, 5)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g")
    model = make_model([node], [vi("x", [3, 8])], [vi("y", [3, 5])], [tensor("w", w_kn), tensor("c", np.array([0.5], np.float32))])
    (site,), _, layers = capture(model)
    assert torch.equal(site.weight, torch.from_numpy(w_kn.T.copy()))
    assert torch.equal(site.bias, torch.full((5,), 0.5)) and layers["g"].weight_kn


def test_weight_from_a_constant_node_and_unnamed_nodes_get_op_index_names():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    const = helper.make_node("Constant", [], ["w"], value=tensor("w", w))
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])  # no name
    model = make_model([const, mm], [vi("x", [2, 6])], [vi("y", [2, 4])])
    (site,), _, _ = capture(model)
    assert site.name == "MatMul_1" and torch.equal(site.weight, torch.from_numpy(w.T.copy()))


def test_repeated_node_names_are_made_unique():
    rng = np.random.default_rng(0)
    inits = [tensor("w0", rng.standard_normal((4, 4)).astype(np.float32)),
             tensor("w1", rng.standard_normal((4, 4)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm"), helper.make_node("MatMul", ["h", "w1"], ["y"], name="mm")]
    sites, _, _ = capture(make_model(nodes, [vi("x", [2, 4])], [vi("y", [2, 4])], inits))
    assert [s.name for s in sites] == ["mm", "mm#2"]


def test_refusals_name_their_reason():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "x_t"], ["a"], name="both_runtime"),
        helper.make_node("MatMul", ["w_left", "x"], ["b"], name="left_constant"),
        helper.make_node("MatMul", ["x", "w3d"], ["c"], name="three_d"),
        helper.make_node("MatMul", ["x", "w_int"], ["d"], name="integer"),
        helper.make_node("Gemm", ["x", "w2"], ["e"], name="trans_a", transA=1),
        helper.make_node("MatMul", ["x", "w_over"], ["g"], name="overridable"),
        helper.make_node("MatMulInteger", ["xq", "wq"], ["h"], name="quantized"),
        helper.make_node("Einsum", ["x", "w_ein"], ["i"], name="einsum", equation="bk,nk->bn"),
    ]
    inits = [tensor("w_left", f(4, 4)), tensor("w3d", f(2, 4, 4)), tensor("w_int", np.ones((4, 4), np.int32)),
             tensor("w2", f(4, 4)), tensor("w_over", f(4, 4)), tensor("wq", np.ones((4, 4), np.int8)),
             tensor("w_ein", f(4, 4))]
    inputs = [vi("x", [4, 4]), vi("x_t", [4, 4]), vi("w_over", [4, 4]), vi("xq", [4, 4], TensorProto.INT8)]
    outs = [vi(n, None) for n in "abcdeghi"]
    sites, skipped, _ = capture(make_model(nodes, inputs, outs, inits))
    reasons = {s.name: s.reason for s in skipped}
    assert not sites
    assert "both operands are computed at run time" in reasons["both_runtime"]
    assert "left operand" in reasons["left_constant"]
    assert "3-D" in reasons["three_d"]
    assert "int32 not supported" in reasons["integer"]
    assert "transA=1" in reasons["trans_a"]
    assert "graph input with a default" in reasons["overridable"]
    assert "quantized MatMulInteger" in reasons["quantized"]
    assert "an Einsum with a constant weight is not rewritten" in reasons["einsum"]


def test_an_add_that_is_not_a_per_output_bias_is_not_taken_as_one():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Add", ["m", "full"], ["y"])]
    inits = [tensor("w", w), tensor("full", np.ones((3, 6), np.float32))]
    (site,), _, _ = capture(make_model(nodes, [vi("x", [3, 4])], [vi("y", [3, 6])], inits))
    assert site.bias is None


def test_captured_weights_do_not_alias_the_model():
    model, _ = lowrank_mlp(d=16, rank=2, layers=1)
    before = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    (site,), _, _ = capture(model)
    site.weight.add_(1.0)  # a pass writing to it by mistake must not reach the model
    assert np.array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), before)


def test_gemm_inside_an_if_branch_is_skipped_as_control_flow_and_the_cli_says_so(tmp_path, capsys):
    rng = np.random.default_rng(5)
    w = tensor("w", rng.standard_normal((8, 8)).astype(np.float32))
    then = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["t"], name="branch_gemm")], "then", [],
                             [vi("t", [4, 8])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="skip")], "else", [], [vi("e", [4, 8])])
    node = helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=then, else_branch=other)
    model = make_model([node], [vi("cond", [], TensorProto.BOOL), vi("x", [4, 8])], [vi("y", [4, 8])], [w])
    onnx.checker.check_model(model, full_check=True)
    sites, skipped, _ = capture(model)
    assert sites == [] and [(s.name, s.op) for s in skipped] == [("branch_gemm", "Gemm")]
    assert "inside the 'then_branch' branch of If node 'gate'" in skipped[0].reason

    import json

    from sparsec.cli import main

    onnx.save_model(model, str(tmp_path / "vad.onnx"))
    np.savez(tmp_path / "c.npz", cond=np.ones((2,), dtype=bool), x=rng.standard_normal((2, 4, 8)).astype(np.float32))
    rc = main(["optimize", str(tmp_path / "vad.onnx"), "-o", str(tmp_path / "out.onnx"), "--quiet",
               "--calibration", str(tmp_path / "c.npz"), "--report", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    warnings = json.loads((tmp_path / "r.json").read_text())["warnings"]
    assert not any("no MatMul or Gemm" in w for w in warnings)
    assert any("1 MatMul/Gemm-like op(s) were left as they are" in w for w in warnings)


def test_expert_weights_gathered_per_token_are_reported_as_an_expert_bank():
    """A MatMul whose weight is gathered from a 3-D initializer by the router's indices (how an
    exported transformers batched_mm bank looks) is skipped as op 'experts', naming the bank."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 24, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["experts.w", "idx"], ["picked"], axis=0),
             helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
             helper.make_node("MatMul", ["picked", "x3"], ["y"], name="bank_mm")]
    model = make_model(nodes, [vi("x", [5, 16]), vi("idx", [5], TensorProto.INT64)], [vi("y", [5, 24, 1])],
                       [tensor("experts.w", w), tensor("axes", np.array([2], dtype=np.int64))])
    sites, skipped, _ = capture(model)
    assert not sites
    (bank,) = skipped
    assert bank.op == "experts" and "'experts.w' [4, 24, 16]" in bank.reason and "use_sparsec_experts" in bank.reason
