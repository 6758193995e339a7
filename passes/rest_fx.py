"""The dense rest of an FX graph as inductor would run it, from the shapes Dynamo traced.

Inductor fuses connected pointwise and reduction ops into kernels that read what enters the
region once and write what leaves it once; matmul-like ops that are not sites (batched matmul,
attention, convolution) run as library kernels of their own. So the rest is: each connected
region of non-site compute nodes (views pass through) between the same sites and library
kernels one kernel moving the bytes entering and leaving it, and each matmul-like node one
kernel with its FLOPs. Nodes that
depend on weights alone are constants, not work. Without traced shapes the rest is unknown.
"""

from __future__ import annotations

import math
import operator

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsec.rest import RestKernel, RestOfGraph

from .capture_fx import ConstantFolder

VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.t, torch.squeeze,
                  torch.unsqueeze, torch.flatten, torch.narrow, torch.unflatten, torch.Tensor.view,
                  torch.Tensor.reshape, torch.Tensor.transpose, torch.Tensor.permute, torch.Tensor.expand}
VIEW_METHODS = {"view", "reshape", "transpose", "permute", "t", "squeeze", "unsqueeze", "flatten", "unflatten",
                "expand", "narrow", "contiguous", "view_as", "expand_as", "__getitem__", "split", "chunk",
                "unbind", "size", "dim"}
MATMUL_FUNCTIONS = {torch.bmm, torch.matmul, operator.matmul, torch.Tensor.matmul, torch.Tensor.bmm, torch.baddbmm,
                    torch.einsum, F.scaled_dot_product_attention, F.conv1d, F.conv2d, F.conv3d, torch.conv2d,
                    torch.mm, torch.addmm, F.linear}
MATMUL_METHODS = {"bmm", "matmul", "__matmul__", "mm", "baddbmm"}
MATMUL_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear, torch.nn.MultiheadAttention)
# ops whose kernel reduces along a dimension: a region holding one runs as a reduction kernel
REDUCTIONS = {"sum", "mean", "var", "std", "var_mean", "std_mean", "amax", "amin", "max", "min", "prod",
              "softmax", "log_softmax", "layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm",
              "norm", "logsumexp", "cumsum", "cumprod", "argmax", "argmin", "all", "any", "normalize"}
REDUCTION_MODULES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.Softmax, torch.nn.LogSoftmax,
                     torch.nn.modules.batchnorm._BatchNorm) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())


def rest_of_graph(gm: fx.GraphModule, example_inputs, site_nodes, absorbed=()) -> RestOfGraph | None:
    """The kernels of ``gm`` outside ``site_nodes``; None if a compute node has no traced shape.
    ``absorbed``: nodes a rewritten layer's launch does too (its epilogue), priced as part of it."""
    sites = set(site_nodes) | set(absorbed)
    constants = set(ConstantFolder(gm, example_inputs).values)
    dynamic: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node not in constants:
                dynamic.add(node)
        elif node.op != "get_attr" and any(i in dynamic for i in node.all_input_nodes):
            dynamic.add(node)
    base: dict[fx.Node, fx.Node] = {}
    compute, library = [], []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            base[node] = node
            continue
        tensor_inputs = [i for i in node.all_input_nodes if _is_tensor(i)]
        if _is_view(node) and len(tensor_inputs) == 1:
            base[node] = base.get(tensor_inputs[0], tensor_inputs[0])
            continue
        base[node] = node
        if node in sites or node not in dynamic:
            continue
        if _value(node) is None:
            return None
        if not _has_shape(node):
            continue                                  # sizes and other scalars: no kernel
        (library if _is_matmul(gm, node) else compute).append(node)
    kernels = [RestKernel(bytes=sum(_bytes(i) for i in node.all_input_nodes) + _bytes(node),
                          flops=_flops(gm, node), dtype=_dtype(node), kind=_library_kind(gm, node))
               for node in library]
    # A region cannot span a site or library kernel: a node after one (its stage counts them on
    # the longest path from the inputs) only fuses with nodes of its own stage.
    stage: dict[fx.Node, int] = {}
    kernels_at = sites | set(library)
    for node in gm.graph.nodes:
        stage[node] = max((stage.get(i, 0) + (i in kernels_at) for i in node.all_input_nodes), default=0)
    fused = nx.Graph()
    fused.add_nodes_from(compute)
    members = set(compute)
    for node in compute:
        for i in node.all_input_nodes:
            b = base.get(i, i)
            if b in members and stage[b] == stage[node]:
                fused.add_edge(node, b)
    for region in nx.connected_components(fused):
        entering: dict[fx.Node, int] = {}
        for node in region:
            for i in node.all_input_nodes:
                b = base.get(i, i)
                if b not in region and _is_tensor(i):
                    entering[b] = max(entering.get(b, 0), _bytes(i))
        leaving = sum(_bytes(n) for n in region if any(base.get(u, u) not in region or _leaves(u, region, base)
                                                       for u in n.users))
        kind = "reduction" if any(_is_reduction(gm, n) for n in region) else "pointwise"
        kernels.append(RestKernel(bytes=sum(entering.values()) + leaving, dtype=_dtype(next(iter(region))),
                                  kind=kind))
    return RestOfGraph(kernels)


def _leaves(user: fx.Node, region, base) -> bool:
    """A view of a region node that something outside the region reads."""
    if base.get(user, user) is user:
        return False
    return any(base.get(u, u) not in region or _leaves(u, region, base) for u in user.users)


def _value(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _is_tensor(node) -> bool:
    return isinstance(_value(node), torch.Tensor)


def _has_shape(node) -> bool:
    v = _value(node)
    if isinstance(v, (tuple, list)):
        return all(isinstance(t, torch.Tensor) or t is None for t in v)
    return isinstance(v, torch.Tensor)


def _sizes(t: torch.Tensor) -> list[int]:
    out = []
    for d in t.shape:
        if isinstance(d, torch.SymInt):
            hint = getattr(d.node, "hint", None)
            out.append(int(hint) if isinstance(hint, int) else 0)
        else:
            out.append(int(d))
    return out


def _bytes(node) -> int:
    v = _value(node)
    tensors = v if isinstance(v, (tuple, list)) else [v]
    return sum(math.prod(_sizes(t)) * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _dtype(node) -> str:
    v = _value(node)
    if isinstance(v, (tuple, list)):
        v = next((t for t in v if isinstance(t, torch.Tensor)), None)
    return str(v.dtype).replace("torch.", "") if isinstance(v, torch.Tensor) else "float32"


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in VIEW_FUNCTIONS
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    return False


def _is_matmul(gm, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in MATMUL_FUNCTIONS
    if node.op == "call_method":
        return node.target in MATMUL_METHODS
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), MATMUL_MODULES)
    return False


def _library_kind(gm, node: fx.Node) -> str:
    """"attention" for scaled-dot-product or multi-head attention, else "matmul"."""
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        return "attention"
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.MultiheadAttention):
        return "attention"
    return "matmul"


def _is_reduction(gm, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), REDUCTION_MODULES)
    if node.op == "call_method":
        return node.target in REDUCTIONS
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) in REDUCTIONS
    return False


def _flops(gm, node: fx.Node) -> float:
    """Multiply-adds times two of a matmul-like node, from its operand and output shapes."""
    out = _value(node)
    if isinstance(out, (tuple, list)):
        out = out[0]
    args = [_value(a) for a in node.args if isinstance(a, fx.Node)]
    if not isinstance(out, torch.Tensor) or not args or not isinstance(args[0], torch.Tensor):
        return 0.0
    target = node.target
    if node.op == "call_module":
        target = type(gm.get_submodule(node.target))
    if target in (F.scaled_dot_product_attention,) and len(args) >= 3:
        q, k = _sizes(args[0]), _sizes(args[1])
        return 4.0 * math.prod(q[:-1]) * k[-2] * q[-1]          # QK^T and PV
    if target in (F.conv1d, F.conv2d, F.conv3d, torch.conv2d, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d):
        if node.op == "call_module":
            w = gm.get_submodule(node.target).weight
            return 2.0 * math.prod(_sizes(out)) * math.prod(w.shape[1:])
        w = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        return 2.0 * math.prod(_sizes(out)) * (math.prod(_sizes(w)[1:]) if w is not None else 1)
    a = _sizes(args[0])
    return 2.0 * math.prod(_sizes(out)) * (a[-1] if a else 1)
