"""Capture the linear layers of an ONNX graph as Sites: MatMul and Gemm with a constant weight.

Every layer reduces to the Site form ``y = x @ W.T + b`` with W of shape (N, K):

* ``MatMul(x, B)`` with B a constant [K, N]: W = B^T. A following ``Add`` of a constant with one
  value per output is its bias (the Add itself stays in the graph; only the product is rewritten).
* ``Gemm(x, B, C)``: W = alpha * (B if transB else B^T); C times beta is the bias when it holds
  one value per output (or one value in all); any other C (a full [M, N] constant, or one computed
  at run time) is kept as an addition after the rewritten product.

Constants are initializers or ``Constant`` nodes. Layer names are node names (``op_index`` for an
unnamed node, ``#2`` appended to a repeated one). Everything that looks weight-bearing but cannot
be rewritten is returned as Skipped with the reason; no ONNX type leaves this module in a Site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from sparsec.passes.onnx_model import DEFAULT_DOMAINS, Constants
from sparsec.sites import Site, Skipped

FLOAT_TYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16}
QUANTIZED_OPS = {"MatMulInteger", "QLinearMatMul", "MatMulNBits", "QGemm", "DynamicQuantizeMatMul",
                 "MatMulIntegerToFloat", "QAttention"}
CONV_OPS = {"Conv", "ConvTranspose", "QLinearConv", "ConvInteger"}


@dataclass
class OnnxLayer:
    """Where a Site lives in the graph, so that it can be calibrated, replaced and rewritten."""

    name: str
    node_index: int
    op: str
    x: str  # activation tensor
    weight: str  # constant holding the weight, in the node's own orientation
    weight_kn: bool  # stored as [K, N] (MatMul, Gemm without transB) rather than [N, K]
    alpha: float = 1.0
    c: str | None = None  # Gemm's C input
    beta: float = 1.0
    c_is_bias: bool = False  # C (times beta) is the Site's per-output bias
    output: str = ""


def node_names(graph: onnx.GraphProto) -> list[str]:
    """The name each node goes by in reports and plans: its own, else ``op_index``; repeats get ``#n``."""
    seen: dict[str, int] = {}
    names = []
    for i, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{i}"
        count = seen.get(base, 0)
        seen[base] = count + 1
        names.append(base if count == 0 else f"{base}#{count + 1}")
    return names


def _subgraph_layers(node: onnx.NodeProto, owner: str):
    """MatMul/Gemm nodes inside the subgraphs of a control-flow node (If, Loop, Scan), at any depth:
    listed as skipped, since sparsec rewrites the main graph only."""
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for j, inner in enumerate(sub.node):
                if inner.op_type in ("MatMul", "Gemm") and inner.domain in DEFAULT_DOMAINS:
                    label = inner.name or f"{owner}/{attr.name}/{inner.op_type}_{j}"
                    yield Skipped(label, inner.op_type,
                                  f"inside the '{attr.name}' branch of {node.op_type} node {owner!r}: layers under "
                                  "control flow are left as they are; sparsec rewrites the main graph")
                yield from _subgraph_layers(inner, inner.name or f"{owner}/{attr.name}/{inner.op_type}_{j}")


def capture(model: onnx.ModelProto, constants: Constants | None = None, graph: int = 0):
    """(sites, skipped, layers by name) for the main graph of ``model``."""
    constants = constants or Constants(model)
    g = model.graph
    names = node_names(g)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in g.output}
    sites: list[Site] = []
    skipped: list[Skipped] = []
    layers: dict[str, OnnxLayer] = {}
    for i, node in enumerate(g.node):
        name = names[i]
        if node.domain not in DEFAULT_DOMAINS:
            if node.op_type in QUANTIZED_OPS or node.op_type == "FusedMatMul":
                skipped.append(Skipped(name, node.op_type, _foreign_reason(node)))
            continue
        if node.op_type in QUANTIZED_OPS:
            skipped.append(Skipped(name, node.op_type, _foreign_reason(node)))
            continue
        if node.op_type in CONV_OPS:
            skipped.append(Skipped(name, node.op_type, "convolutions are not rewritten; only MatMul and Gemm are"))
            continue
        if node.op_type == "Einsum" and any(constants.has(t) and len(constants.dims(t) or ()) == 2 for t in node.input):
            skipped.append(Skipped(name, "Einsum", "an Einsum with a constant weight is not rewritten; export the layer "
                                   "as a MatMul (F.linear, or x @ W.T) to have it planned"))
            continue
        nested = list(_subgraph_layers(node, name))
        if nested:
            skipped.extend(nested)
            continue
        if node.op_type == "MatMul":
            found = _matmul(node, i, name, constants, consumers, outputs, g)
        elif node.op_type == "Gemm":
            found = _gemm(node, i, name, constants)
        else:
            continue
        if isinstance(found, Skipped):
            skipped.append(found)
            continue
        layer, weight, bias = found
        sites.append(Site(name=name, op=node.op_type, weight=weight, bias=bias, dtype=weight.dtype,
                          input_key=f"g{graph}:{layer.x}", graph=graph))
        layers[name] = layer
    return sites, skipped, layers


def _foreign_reason(node: onnx.NodeProto) -> str:
    if node.op_type == "FusedMatMul":
        return "onnxruntime's fused FusedMatMul is left as is; export the model without onnxruntime's optimisations"
    return f"quantized {node.op_type} is left as is; sparsec rewrites float MatMul and Gemm"


def _weight_problem(constants: Constants, name: str) -> str | None:
    if name in constants.overridable:
        return f"weight {name!r} is a graph input with a default, so it may be replaced at run time"
    dims = constants.dims(name)
    if len(dims) != 2:
        return f"weight {name!r} is {len(dims)}-D; only 2-D weights are rewritten"
    elem = constants.elem_type(name)
    if elem not in FLOAT_TYPES:
        kind = onnx.TensorProto.DataType.Name(elem).lower()
        return f"weight dtype {kind} not supported; float32 and float16 are"
    return None


def _as_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor of its own: the model's buffer is read-only and is never shared with the pipeline."""
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def _matmul(node, index, name, constants: Constants, consumers, outputs, graph):
    a, b = node.input[0], node.input[1]
    if not constants.has(b):
        if constants.has(a):
            return Skipped(name, "MatMul", "the constant is the left operand (y = C @ x), not a weight over features")
        bank = _gathered_bank(b, constants, graph) or _gathered_bank(a, constants, graph)
        if bank is not None:
            return Skipped(name, "experts", (
                f"expert weights gathered per token from {bank[0]!r} {bank[1]} ([E, ...]): an expert bank, which "
                "the ONNX path does not rewrite yet; compile the PyTorch model with torch.compile and "
                "sparsec.experts.use_sparsec_experts (docs/experts.md)"))
        return Skipped(name, "MatMul", "no constant weight: both operands are computed at run time")
    if constants.has(a):
        return Skipped(name, "MatMul", "both operands are constant; nothing runs at inference time")
    why = _weight_problem(constants, b)
    if why:
        return Skipped(name, "MatMul", why)
    weight = _as_torch(constants.array(b)).T  # [K, N] -> (N, K)
    layer = OnnxLayer(name=name, node_index=index, op="MatMul", x=a, weight=b, weight_kn=True, output=node.output[0])
    return layer, weight, _following_bias(node, constants, consumers, outputs, graph, weight.shape[0], weight.dtype)


def _following_bias(node, constants: Constants, consumers, outputs, graph, N: int, dtype):
    """The constant per-output vector an Add right after the MatMul adds, if any."""
    out = node.output[0]
    users = consumers.get(out, [])
    if out in outputs or len(users) != 1:
        return None
    add = graph.node[users[0]]
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other == out or not constants.has(other) or other in constants.overridable:
        return None
    dims = constants.dims(other)
    if not dims or dims[-1] != N or any(d != 1 for d in dims[:-1]):
        return None
    return _as_torch(constants.array(other).reshape(N)).to(dtype)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _gemm(node, index, name, constants: Constants):
    a, b = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 and node.input[2] else None
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    if not constants.has(b):
        return Skipped(name, "Gemm", "no constant weight: both operands are computed at run time")
    if constants.has(a):
        return Skipped(name, "Gemm", "both operands are constant; nothing runs at inference time")
    if trans_a:
        return Skipped(name, "Gemm", "transA=1 (the activation is transposed) is not rewritten")
    why = _weight_problem(constants, b)
    if why:
        return Skipped(name, "Gemm", why)
    stored = _as_torch(constants.array(b))
    weight = stored if trans_b else stored.T
    if alpha != 1.0:
        weight = weight * alpha
    N = int(weight.shape[0])
    bias, c_is_bias = None, False
    if c is not None and constants.has(c) and c not in constants.overridable:
        values = constants.array(c).astype(np.float64) * beta
        dims = list(values.shape)
        if values.size == 1:
            bias, c_is_bias = torch.full((N,), float(values.reshape(())), dtype=torch.float64), True
        elif values.size == N and dims[-1] == N:
            bias, c_is_bias = torch.from_numpy(values.reshape(N)), True
    if bias is not None:
        bias = bias.to(weight.dtype)
    layer = OnnxLayer(name=name, node_index=index, op="Gemm", x=a, weight=b, weight_kn=not trans_b, alpha=alpha,
                      c=c, beta=beta, c_is_bias=c_is_bias, output=node.output[0])
    return layer, weight, bias


_PASS_THROUGH = {"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten"}


def _gathered_bank(tensor: str, constants: Constants, graph) -> tuple[str, list] | None:
    """(initializer, dims) where ``tensor`` is rows gathered from a constant of 3 or more dims (an
    expert bank's weights, indexed by the router's choices), through reshapes and casts."""
    producers = {out: node for node in graph.node for out in node.output}
    for _ in range(8):
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "Gather" and constants.has(node.input[0]) and len(constants.dims(node.input[0])) >= 3:
            return node.input[0], list(constants.dims(node.input[0]))
        if node.op_type not in _PASS_THROUGH or not node.input:
            return None
        tensor = node.input[0]
    return None
