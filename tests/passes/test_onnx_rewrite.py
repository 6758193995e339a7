"""Lowering chosen formats into ONNX: every family, MatMul and Gemm forms, checked by running onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from onnx_builders import make_model, run, tensor, vi

from sparsec.candidates import Candidate, Layer
from sparsec.codegen import pack
from sparsec.formats import Dense, parse_spec
from sparsec.passes.capture_onnx import capture
from sparsec.passes.onnx_model import infer_shapes
from sparsec.passes.rewrite_onnx import MODEL_KEY, rewrite
from sparsec.sites import SiteStats

FORMATS = ["lowrank:8", "monarch:4", "2:4", "block:16:0.5"]
# float32 products of the rewritten factors vs numpy's float64 reference: a few ulps of the sums.
RTOL = 2e-5


def choose(sites, formats: dict[str, str]) -> list[Layer]:
    """Layers whose chosen candidate is the format's exact projection of the site's weight."""
    layers = []
    for site in sites:
        layer = Layer(site=site, stats=SiteStats.empty(site.K), dense=Candidate(Dense(), None, None, 0.0))
        fmt = formats.get(site.name)
        if fmt:
            spec = parse_spec(fmt)
            approx = pack(spec, site.weight.float()).to_dense()
            layer.chosen = Candidate(spec, approx, None, 0.0)
        layers.append(layer)
    return layers


def expected(x, layer):
    w = (layer.chosen.approx if layer.chosen else layer.site.weight).double().numpy()
    y = x.astype(np.float64) @ w.T
    return y if layer.site.bias is None else y + layer.site.bias.double().numpy()


def matmul_add_model(N=64, K=64, lead=(2, 5), seed=0):
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="proj"), helper.make_node("Add", ["b", "m"], ["y"], name="proj_bias")]
    inits = [tensor("w", rng.standard_normal((K, N)).astype(np.float32)), tensor("b", rng.standard_normal(N).astype(np.float32))]
    return make_model(nodes, [vi("x", [*lead, K])], [vi("y", [*lead, N])], inits)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_on_3d_input_computes_the_chosen_weight(fmt):
    model = matmul_add_model()
    before = model.SerializeToString()
    sites, _, info = capture(model)
    layers = choose(sites, {"proj": fmt})
    new = rewrite(model, info, layers, infer_shapes(model))
    assert model.SerializeToString() == before  # the user's model is never changed
    onnx.checker.check_model(new, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 5, 64)).astype(np.float32)
    (y,) = run(new, {"x": x})
    np.testing.assert_allclose(y, expected(x, layers[0]), rtol=RTOL, atol=RTOL * 10)
    written = [n for n in new.graph.node if any(p.key == "sparsec.format" for p in n.metadata_props)]
    assert written and all({p.key: p.value for p in n.metadata_props}["sparsec.format"] == fmt for n in written)
    assert "w" not in {t.name for t in new.graph.initializer}  # the replaced weight is dropped
    assert json.loads({p.key: p.value for p in new.metadata_props}[MODEL_KEY])["layers"] == {"proj": fmt}
    ops = [n.op_type for n in written]
    if fmt.startswith("lowrank"):
        assert ops == ["MatMul", "MatMul"]
    elif fmt.startswith("monarch"):
        assert ops.count("MatMul") == 2 and ops.count("Transpose") == 3
    else:
        assert ops == ["MatMul"]  # pruned weight, same node


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("c_kind", ["vector", "full", "runtime", "none"])
def test_gemm_with_trans_b_alpha_beta_and_every_kind_of_c(fmt, c_kind):
    rng = np.random.default_rng(2)
    M, N, K = 6, 32, 64
    w_nk = rng.standard_normal((N, K)).astype(np.float32)
    inits = [tensor("w", w_nk)]
    inputs = [vi("x", [M, K])]
    c_inputs = []
    c_value = None
    if c_kind == "vector":
        c_value = rng.standard_normal(N).astype(np.float32)
        inits.append(tensor("c", c_value))
    elif c_kind == "full":
        c_value = rng.standard_normal((M, N)).astype(np.float32)
        inits.append(tensor("c", c_value))
    elif c_kind == "runtime":
        inputs.append(vi("c", [M, N]))
    if c_kind != "none":
        c_inputs = ["c"]
    node = helper.make_node("Gemm", ["x", "w", *c_inputs], ["y"], name="head", alpha=0.5, beta=1.5, transB=1)
    model = make_model([node], inputs, [vi("y", [M, N])], inits)
    sites, _, info = capture(model)
    layers = choose(sites, {"head": fmt})
    new = rewrite(model, info, layers, infer_shapes(model))
    onnx.checker.check_model(new, full_check=True)
    x = rng.standard_normal((M, K)).astype(np.float32)
    feeds = {"x": x}
    if c_kind == "runtime":
        c_value = rng.standard_normal((M, N)).astype(np.float32)
        feeds["c"] = c_value
    (y,) = run(new, feeds)
    ref = x.astype(np.float64) @ layers[0].chosen.approx.double().numpy().T  # approx has alpha folded in
    if c_value is not None:
        ref = ref + 1.5 * c_value
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * 10)


def test_dynamic_leading_dims_reach_the_monarch_output_shape():
    model = matmul_add_model(lead=("batch", "seq"))
    sites, _, info = capture(model)
    layers = choose(sites, {"proj": "monarch:4"})
    new = rewrite(model, info, layers, infer_shapes(model))
    onnx.checker.check_model(new, full_check=True)
    x = np.random.default_rng(3).standard_normal((3, 7, 64)).astype(np.float32)
    (y,) = run(new, {"x": x})
    assert y.shape == (3, 7, 64)
    np.testing.assert_allclose(y, expected(x, layers[0]), rtol=RTOL, atol=RTOL * 10)


def test_a_weight_shared_with_another_node_stays_for_it():
    rng = np.random.default_rng(4)
    table = rng.standard_normal((64, 32)).astype(np.float32)  # [K=64, N=32] for the MatMul, also gathered
    nodes = [helper.make_node("MatMul", ["x", "table"], ["y"], name="proj"),
             helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup")]
    model = make_model(nodes, [vi("x", [4, 64]), vi("ids", [3], TensorProto.INT64)],
                       [vi("y", [4, 32]), vi("rows", [3, 32])], [tensor("table", table)])
    sites, _, info = capture(model)
    layers = choose(sites, {"proj": "lowrank:4"})
    new = rewrite(model, info, layers)
    x, ids = rng.standard_normal((4, 64)).astype(np.float32), np.array([0, 5, 63])
    y, rows = run(new, {"x": x, "ids": ids})
    np.testing.assert_array_equal(rows, table[ids])
    np.testing.assert_allclose(y, expected(x, layers[0]), rtol=RTOL, atol=RTOL * 10)


@pytest.mark.parametrize("rewritten", [("first", "second"), ("second",)])
def test_a_weight_exported_once_and_handed_on_through_identity_is_captured_for_each_layer(rewritten):
    """Exporters write identical weights once and give the copies an Identity of them (as
    nn.TransformerEncoder's deep-copied layers come out): each product is a layer of its own, and
    the dense weight leaves the file only once no product reads it, Identity and all."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("Identity", ["w"], ["w_copy"], name="share"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w_copy"], ["y"], name="second")]
    model = make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 64])], [tensor("w", w)])
    sites, skipped, info = capture(model)
    assert [s.name for s in sites] == ["first", "second"] and not skipped
    layers = choose(sites, {name: "lowrank:4" for name in rewritten})
    new = rewrite(model, info, layers)
    onnx.checker.check_model(new, full_check=True)
    left = {t.name for t in new.graph.initializer}
    assert ("w" in left) == ("first" not in rewritten)
    assert any(n.op_type == "Identity" for n in new.graph.node) == ("second" not in rewritten)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    (y,) = run(new, {"x": x})
    h = np.maximum(expected(x, layers[0]), 0.0).astype(np.float32)
    np.testing.assert_allclose(y, expected(h, layers[1]), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("form", ["transposed", "cast"])
def test_a_weight_stored_transposed_or_in_another_precision_is_captured_and_leaves_with_its_node(form):
    """MatMul(x, Transpose(W)) with W stored [N, K], and a float32 weight Cast to the float16 the
    model computes in: constants, so layers; the rewrite drops the node and the stored weight."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 64)).astype(np.float32)  # [N, K]
    elem = TensorProto.FLOAT16 if form == "cast" else TensorProto.FLOAT
    if form == "transposed":
        nodes = [helper.make_node("Transpose", ["w_nk"], ["w_kn"], perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "w_kn"], ["y"], name="proj")]
        inits = [tensor("w_nk", w)]
    else:
        nodes = [helper.make_node("Cast", ["w_kn"], ["w_half"], to=TensorProto.FLOAT16),
                 helper.make_node("MatMul", ["x", "w_half"], ["y"], name="proj")]
        inits = [tensor("w_kn", np.ascontiguousarray(w.T))]
    model = make_model(nodes, [vi("x", [4, 64], elem)], [vi("y", [4, 32], elem)], inits)
    sites, skipped, info = capture(model)
    assert [s.name for s in sites] == ["proj"] and not skipped
    assert sites[0].dtype == (torch.float16 if form == "cast" else torch.float32)
    np.testing.assert_allclose(sites[0].weight.float().numpy(), w, rtol=1e-3, atol=1e-3)
    layers = choose(sites, {"proj": "lowrank:8"})
    new = rewrite(model, info, layers)
    onnx.checker.check_model(new, full_check=True)
    assert not new.graph.initializer or all(t.name.startswith("proj") for t in new.graph.initializer)
    assert [n.op_type for n in new.graph.node if n.op_type in ("Transpose", "Cast")] == []
    x = rng.standard_normal((4, 64)).astype(np.float16 if form == "cast" else np.float32)
    (y,) = run(new, {"x": x})
    np.testing.assert_allclose(y.astype(np.float64), expected(x, layers[0]), rtol=2e-2 if form == "cast" else 1e-4,
                               atol=5e-2 if form == "cast" else 1e-3)


def test_dense_choices_leave_the_graph_as_it_was_but_name_unnamed_nodes():
    model = matmul_add_model()
    model.graph.node[0].name = ""
    sites, _, info = capture(model)
    new = rewrite(model, info, choose(sites, {}))
    assert [n.op_type for n in new.graph.node] == ["MatMul", "Add"]
    assert new.graph.node[0].name == sites[0].name == "MatMul_0"
    assert {t.name for t in new.graph.initializer} == {"w", "b"}


def test_float16_weights_are_written_in_float16():
    rng = np.random.default_rng(5)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="half")
    model = make_model([node], [vi("x", [4, 64], TensorProto.FLOAT16)], [vi("y", [4, 64], TensorProto.FLOAT16)],
                       [tensor("w", rng.standard_normal((64, 64)).astype(np.float16))])
    sites, _, info = capture(model)
    assert sites[0].dtype == torch.float16
    new = rewrite(model, info, choose(sites, {"half": "lowrank:8"}))
    onnx.checker.check_model(new, full_check=True)
    assert {t.data_type for t in new.graph.initializer} == {TensorProto.FLOAT16}
