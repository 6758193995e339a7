"""Lower chosen formats into an FX graph: each rewritten site becomes a packed linear module.

The user's graph module is copied first; the copy gets one ``PackedLinear`` submodule per
rewritten site (packed weights as buffers, built from the approximation, never from the user's
tensor in place), and the site's node calls it on its input made row-major. Sites that read the
same input with the same stackable format share one ``PackedGroup`` instead, called once, its
output sliced per site. Where it pays, the SiLU-gate or residual add right after a packed call
is folded into that call (``epilogue_fx``); the rest of the graph is untouched, so the dense
remainder can be handed to inductor as before.

A Dynamo graph carries metadata that tells AOTAutograd which inputs are parameters (static
addresses for CUDA graphs); the copy keeps it and names the new packed buffers too. Without it
every CUDA-graph replay would copy every weight into the graph's input buffers.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsec.candidates import Layer
from sparsec.passes import capture_fx
from sparsec.sites import Site


def packed_modules(layers: list[Layer]) -> dict:
    """Site name -> module for every rewritten site, built from its approximation in the site's dtype.

    Sites that read the same input with the same format setting (gate and up, q/k/v) and a
    format whose layout stacks along N become ``GroupMember``s of one ``PackedGroup``: one launch
    over their stacked weights, each keeping exactly its own packed values. Others get a
    ``PackedLinear`` each."""
    from sparsec.activation import pack_approximation
    from sparsec.codegen import GroupMember, PackedGroup, PackedLinear, stack_rows
    from sparsec.logs import logger

    built: dict[tuple, list] = {}
    for layer in layers:
        if layer.chosen is None or layer.chosen.is_dense:
            continue
        site = layer.site
        approx = layer.chosen.weight().to(device=site.weight.device, dtype=site.dtype)
        packed = pack_approximation(layer.chosen.spec, approx)
        impl = layer.chosen.impl if (approx.device.type == "cuda" and layer.chosen.impl in packed.handler.impls) else "auto"
        key = (site.input_key, str(layer.chosen.spec), impl, site.dtype, site.K, site.bias is None, str(approx.device))
        if not packed.handler.stack_pays(max(layer.tokens or 1, 1)):
            key += (site.name,)                       # on its own
        built.setdefault(key, []).append((site, packed, impl))
    modules = {}
    for members in built.values():
        stacked = stack_rows([p for _, p, _ in members]) if len(members) > 1 else None
        if stacked is None:
            for site, packed, impl in members:
                bias = None if site.bias is None else site.bias.detach().clone()
                modules[site.name] = PackedLinear(packed, bias, impl=impl)
            continue
        sites = [m[0] for m in members]
        bias = None if sites[0].bias is None else torch.cat([s.bias.detach() for s in sites]).clone()
        group = PackedGroup(PackedLinear(stacked, bias, impl=members[0][2]), [s.N for s in sites])
        for i, site in enumerate(sites):
            modules[site.name] = GroupMember(group, i)
        logger.info("%s: one launch over their stacked %s weights (%d rows, same input)",
                    ", ".join(s.name for s in sites), stacked.spec, stacked.shape[0])
    return modules


def rewrite(gm: fx.GraphModule, nodes: dict[str, fx.Node], sites: dict[str, Site], modules: dict,
            notes: dict | None = None) -> fx.GraphModule:
    """A copy of ``gm`` whose sites named in ``modules`` call those modules instead, with the
    SiLU-gates and residual adds that follow them folded into their launches where that pays
    (``epilogue_fx``). ``notes``, if given, receives "epilogues" (planner-log lines) and
    "absorbed" (the nodes of ``gm`` a launch now does)."""
    from .epilogue_fx import fuse_epilogues

    if not modules:
        return gm
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, node_map))
    new_gm = fx.GraphModule(gm, graph)
    order = {n: i for i, n in enumerate(new_gm.graph.nodes)}
    grouped = _groups_in_graph(modules, sites, nodes, node_map)
    done: set[str] = set()
    layer_names: dict[str, str] = {}
    for i, (name, module) in enumerate(modules.items()):
        if name in done:
            continue
        group = grouped.get(name)
        if group is not None:
            members, x = group
            first = min((node_map[nodes[m]] for m in members), key=order.__getitem__)
            attr = f"sparsec_{i}_group_{_safe(members[0])}"
            new_gm.add_submodule(attr, module.group)
            layer_names[attr] = ", ".join(members)
            with new_gm.graph.inserting_before(first):
                stacked = new_gm.graph.call_module(attr, (_row_major(new_gm, x),))
            for m in members:
                node = node_map[nodes[m]]
                start, end = modules[m].group.bounds(modules[m].index)
                with new_gm.graph.inserting_before(node):
                    piece = new_gm.graph.call_function(operator.getitem, (stacked, (Ellipsis, slice(start, end))))
                piece.meta = dict(node.meta)
                node.replace_all_uses_with(piece)
                new_gm.graph.erase_node(node)
                done.add(m)
            continue
        site = sites[name]
        node = node_map[nodes[name]]
        attr = f"sparsec_{i}_{_safe(name)}"
        new_gm.add_submodule(attr, module)
        layer_names[attr] = name
        x = _site_input(site, node)
        with new_gm.graph.inserting_before(node):
            replacement = new_gm.graph.call_module(attr, (_row_major(new_gm, x),))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        new_gm.graph.erase_node(node)
    lines, absorbed = fuse_epilogues(new_gm, layer_names)
    _row_major_outputs(new_gm)
    if notes is not None:
        original = {new: old for old, new in node_map.items()}
        notes["epilogues"] = lines
        notes["absorbed"] = [original[n] for n in absorbed if n in original]
    finish_rewrite(gm, new_gm, node_map)
    return new_gm


def finish_rewrite(gm: fx.GraphModule, new_gm: fx.GraphModule, node_map: dict[fx.Node, fx.Node]) -> None:
    """Drop what the rewrite left unused (never a write to state), recompile, carry Dynamo's metadata."""
    new_gm.graph.eliminate_dead_code(is_impure_node=_impure)
    new_gm.delete_all_unused_submodules()
    new_gm.recompile()
    _keep_dynamo_metadata(gm, new_gm, node_map)


def _impure(node: fx.Node) -> bool:
    """FX's own test, plus the in-place tensor methods it counts as pure: batch norm in training mode
    counts its batches with ``num_batches_tracked.add_(1)``, whose result nothing reads."""
    if node.op in ("call_method", "call_function"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            return True
    return node.is_impure()


def _row_major(gm: fx.GraphModule, x):
    """``x.contiguous()``: a packed layer reads its input row-major. cuSPARSELt took 1.28x as long
    on the Llama down projection (M=2048, H200) when handed the column-major product that a
    transposed cuSPARSELt output and the SiLU-multiply after it leave; the Triton kernels load
    rows. Inductor writes the producing pointwise kernel in that order, so it costs no copy;
    on a row-major input it is nothing."""
    if not isinstance(x, fx.Node):
        return x
    node = gm.graph.call_method("contiguous", (x,))
    node.meta = dict(x.meta)
    return node


def _row_major_outputs(gm: fx.GraphModule) -> None:
    """Every packed call's output (each slice of a group's) made row-major before anything reads it.

    cuSPARSELt's product comes back column-major (codegen/twofour_cslt.py). A linear layer after it
    reads either order, but attention does not: in a transformers Llama at 8 x 256 tokens (H100,
    bf16, forced 2:4, 2026-12-06) scaled-dot-product attention, handed q, k and v whose last
    dimension was strided, fell back from the fused kernel to its float32 matmul form, and the
    RMSNorms split into two kernels each: the model ran 0.62x of dense, where the product written
    row-major by the library ran 0.82x. ``x.contiguous()`` on a row-major output is nothing, and on
    a column-major one inductor writes the transposing copy into the pointwise kernel that reads it."""
    from sparsec.codegen import EpilogueLinear, PackedGroup, PackedLinear

    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, (PackedLinear, PackedGroup, EpilogueLinear)):
            continue
        for out in (list(node.users) if isinstance(module, PackedGroup) else [node]):
            with gm.graph.inserting_after(out):
                row = gm.graph.call_method("contiguous", (out,))
            row.meta = dict(out.meta)
            out.replace_all_uses_with(row, delete_user_cb=lambda user, row=row: user is not row)


def _site_input(site: Site, node: fx.Node):
    return capture_fx.linear_input(node)


def _groups_in_graph(modules: dict, sites: dict, nodes: dict, node_map: dict) -> dict:
    """Site name -> (member names, input node) for groups whose members are all here and read the
    same node; a member left out runs on its own (the whole group, sliced), never wrongly."""
    from sparsec.codegen import GroupMember

    by_group: dict[int, list[str]] = {}
    for name, module in modules.items():
        if isinstance(module, GroupMember):
            by_group.setdefault(id(module.group), []).append(name)
    out = {}
    for names in by_group.values():
        group = modules[names[0]].group
        inputs = {_site_input(sites[n], node_map[nodes[n]]) for n in names}
        if len(names) == len(group.sizes) and len(inputs) == 1:
            ordered = sorted(names, key=lambda n: modules[n].index)
            for n in names:
                out[n] = (ordered, next(iter(inputs)))
    return out


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
