"""Lower chosen formats into an ONNX model: new nodes and initializers, never the user's in place.

The model is copied first. In the copy, each rewritten layer becomes the standard-op subgraph of
``onnx_emit`` (low-rank, Monarch), or keeps its node with a pruned weight initializer (2:4,
block). Either way the layer's output tensor keeps its name, so the rest of the graph is
untouched. Every node written for a layer carries ``sparsec.format`` and ``sparsec.layer`` in its
metadata_props; the model carries a ``sparsec`` entry listing every rewritten layer. A weight
initializer (or Constant) no node reads any more is dropped.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch

from sparsec.candidates import Layer
from sparsec.passes.capture_onnx import OnnxLayer, node_names
from sparsec.passes.onnx_emit import FORMAT_KEY, LAYER_KEY, Emitter
from sparsec.passes.onnx_forms import declared_format_note, emit_product, factors
from sparsec.passes.onnx_model import FOLDED_OPS, Constants, elem_numpy_dtype
from sparsec.sites import as_weight

MODEL_KEY = "sparsec"


def rewrite(model: onnx.ModelProto, layers_info: dict[str, OnnxLayer], layers: list[Layer],
            shapes: dict[str, list[int | None]] | None = None, provenance: dict | None = None) -> onnx.ModelProto:
    """A new model with every layer whose chosen format is not dense rewritten into it."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    shapes = shapes or {}
    _name_unnamed(graph, layers_info)
    chosen = [l for l in layers if l.chosen is not None and not l.chosen.is_dense]
    if not chosen:
        return new
    taken = _all_names(graph)
    constants = Constants(model)
    replacement: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    for layer in chosen:
        info = layers_info[layer.name]
        node = graph.node[info.node_index]
        spec = layer.chosen.spec
        dtype = elem_numpy_dtype(constants.elem_type(info.weight))
        em = Emitter(prefix=f"{layer.name}/sparsec_{spec.family.replace(':', '_')}", taken=taken,
                     metadata={FORMAT_KEY: str(spec), LAYER_KEY: layer.name})
        if spec.prunes:
            replacement[info.node_index] = [_pruned_node(em, node, info, layer, dtype)]
        else:
            replacement[info.node_index] = _subgraph(em, node, info, layer, dtype, shapes.get(info.x))
        new_inits.extend(em.initializers)
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replacement.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    drop_unused(graph, {layers_info[l.name].weight for l in chosen})
    _record(new, chosen, provenance)
    return new


def _name_unnamed(graph: onnx.GraphProto, layers_info: dict[str, OnnxLayer]) -> None:
    """Give captured nodes the names the report uses for them (only where the model has none or repeats)."""
    names = node_names(graph)
    for info in layers_info.values():
        node = graph.node[info.node_index]
        if node.name != names[info.node_index]:
            node.name = names[info.node_index]


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def weight_in_node_layout(approx: torch.Tensor, info: OnnxLayer, dtype) -> np.ndarray:
    """The dense approximation (N, K) back in the node's own orientation and scale."""
    w = as_weight(approx).detach().to(torch.float64)
    if info.alpha != 1.0:
        w = w / info.alpha
    w = w.T if info.weight_kn else w
    return np.ascontiguousarray(w.numpy().astype(dtype))


def _pruned_node(em: Emitter, node: onnx.NodeProto, info: OnnxLayer, layer: Layer, dtype) -> onnx.NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    new.input[1] = em.const("weight", weight_in_node_layout(layer.chosen.weight(), info, dtype))
    note = declared_format_note(layer.chosen.spec)
    for key, value in {**em.metadata, "sparsec.note": note or ""}.items():
        prop = new.metadata_props.add()
        prop.key, prop.value = key, value
    return new


def _subgraph(em: Emitter, node: onnx.NodeProto, info: OnnxLayer, layer: Layer, dtype, x_shape) -> list[onnx.NodeProto]:
    site, spec = layer.site, layer.chosen.spec
    tensors = factors(spec, layer.chosen.weight(), dtype)
    if info.op == "MatMul" or info.c is None:
        emit_product(em, spec, info.x, info.output, tensors, site.N, site.K, x_shape)
        return em.nodes
    product = emit_product(em, spec, info.x, em.fresh("product"), tensors, site.N, site.K, x_shape)
    c = info.c
    if info.beta != 1.0:
        beta = em.const("beta", np.asarray(info.beta, dtype=dtype))
        c = em.node("Mul", [c, beta])
    em.node("Add", [product, c], info.output)
    return em.nodes


def drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the replaced weights nothing reads any more: initializers, ``Constant`` nodes, and
    the ``Identity`` / ``Transpose`` / ``Cast`` nodes over them (with what those read, when nothing
    else does)."""
    candidates = set(candidates)
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = {name for name in candidates if name not in used}
        if not dead:
            return
        keep = [t for t in graph.initializer if t.name not in dead]
        gone = [n for n in graph.node if n.op_type in ("Constant", *FOLDED_OPS) and len(n.output) == 1
                and n.output[0] in dead]
        if len(keep) == len(graph.initializer) and not gone:
            return
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = [n for n in graph.node if not any(n is g for g in gone)]
        del graph.node[:]
        graph.node.extend(nodes)
        candidates = {name for g in gone for name in g.input}


def _record(model: onnx.ModelProto, chosen: list[Layer], provenance: dict | None) -> None:
    record = dict(provenance or {})
    record["layers"] = {l.name: str(l.chosen.spec) for l in chosen}
    text = json.dumps(record, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == MODEL_KEY:
            prop.value = text
            return
    prop = model.metadata_props.add()
    prop.key, prop.value = MODEL_KEY, text
