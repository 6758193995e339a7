"""Lower chosen formats into an FX graph: each rewritten site becomes a packed linear module.

The user's graph module is copied first; the copy gets one ``PackedLinear`` submodule per
rewritten site (packed weights as buffers, built from the approximation, never from the user's
tensor in place), and the site's node calls it. The rest of the graph is untouched, so the dense
remainder can be handed to inductor as before.

A Dynamo graph carries metadata that tells AOTAutograd which inputs are parameters (static
addresses for CUDA graphs); the copy keeps it and names the new packed buffers too. Without it
every CUDA-graph replay would copy every weight into the graph's input buffers.
"""

from __future__ import annotations

import torch.fx as fx

from sparsec.candidates import Layer
from sparsec.sites import Site


def packed_modules(layers: list[Layer]) -> dict:
    """Site name -> ``PackedLinear`` for every rewritten site, built from its approximation in the site's dtype."""
    from sparsec.codegen import PackedLinear, pack

    modules = {}
    for layer in layers:
        if layer.chosen is None or layer.chosen.is_dense:
            continue
        site = layer.site
        approx = layer.chosen.approx.to(device=site.weight.device, dtype=site.dtype)
        bias = None if site.bias is None else site.bias.detach().clone()
        packed = pack(layer.chosen.spec, approx)
        impl = layer.chosen.impl if (approx.device.type == "cuda" and layer.chosen.impl in packed.handler.impls) else "auto"
        modules[site.name] = PackedLinear(packed, bias, impl=impl)
    return modules


def rewrite(gm: fx.GraphModule, nodes: dict[str, fx.Node], sites: dict[str, Site], modules: dict) -> fx.GraphModule:
    """A copy of ``gm`` whose sites named in ``modules`` call those modules instead."""
    if not modules:
        return gm
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, node_map))
    new_gm = fx.GraphModule(gm, graph)
    for i, (name, module) in enumerate(modules.items()):
        site = sites[name]
        node = node_map[nodes[name]]
        attr = f"sparsec_{i}_{_safe(name)}"
        new_gm.add_submodule(attr, module)
        x = node.args[1] if site.op == "addmm" else node.args[0]
        with new_gm.graph.inserting_before(node):
            replacement = new_gm.graph.call_module(attr, (x,))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        new_gm.graph.erase_node(node)
    new_gm.graph.eliminate_dead_code()
    new_gm.recompile()
    _keep_dynamo_metadata(gm, new_gm, node_map)
    return new_gm


def _keep_dynamo_metadata(gm: fx.GraphModule, new_gm: fx.GraphModule, node_map: dict[fx.Node, fx.Node]) -> None:
    """Carry what AOTAutograd reads from a Dynamo graph (see its ``_try_get_metadata_from_dynamo``)."""
    if "dynamo_compile_id" not in gm.meta:
        return
    new_gm.meta.update(gm.meta)
    for old, new in node_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    if hasattr(gm, "_param_name_to_source"):
        from torch._dynamo.source import ConstantSource

        sources = dict(gm._param_name_to_source)
        names = [n for n, _ in new_gm.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in new_gm.named_buffers(remove_duplicate=False)]
        for name in names:
            sources.setdefault(name, ConstantSource(f"sparsec_packed.{name}"))
        new_gm._param_name_to_source = sources


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:60]
