"""Small ONNX models for the ONNX front-end tests, built node by node so every case is explicit."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def tensor(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def planted_lowrank(n, k, rank, rng, scale=1.0) -> np.ndarray:
    """An exactly rank-``rank`` (n, k) weight with entries of about ``scale / sqrt(k)``."""
    u = rng.standard_normal((n, rank))
    v = rng.standard_normal((rank, k))
    w = u @ v
    return (w / w.std() * scale / np.sqrt(k)).astype(np.float32)


def lowrank_mlp(d=256, rank=16, layers=3, tokens=64, seed=0, gemm_last=False) -> tuple[onnx.ModelProto, dict]:
    """x [tokens, d] -> layers of (MatMul + Add bias, Relu); weights of exact rank ``rank``.

    With ``gemm_last`` the last layer is a Gemm with transB=1 (W stored [N, K]), alpha 0.5, beta 2.
    Returns the model and the (N, K) effective weights and biases by layer node name.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, truth = [], [], {}
    x = "x"
    for i in range(layers):
        w = planted_lowrank(d, d, rank, rng)
        b = (0.1 * rng.standard_normal(d)).astype(np.float32)
        last = i == layers - 1
        out = "y" if last else f"h{i}"
        if gemm_last and last:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", alpha=0.5, beta=2.0, transB=1))
            inits += [tensor(f"w{i}", 2.0 * w), tensor(f"b{i}", b / 2.0)]
            truth[f"fc{i}"] = (w, b)
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"pre{i}" if not last else out], name=f"fc{i}_bias"))
            inits += [tensor(f"w{i}", w.T), tensor(f"b{i}", b)]
            truth[f"fc{i}"] = (w, b)
            if not last:
                nodes.append(helper.make_node("Relu", [f"pre{i}"], [out], name=f"act{i}"))
        x = out
    model = make_model(nodes, [vi("x", [tokens, d])], [vi("y", [tokens, d])], inits)
    onnx.checker.check_model(model, full_check=True)
    return model, truth


def run(model: onnx.ModelProto, feeds: dict, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
