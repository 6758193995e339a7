"""Capture linear layers from an FX graph (as Dynamo hands it, or from symbolic tracing).

Dynamo lifts parameters into graph inputs: placeholders whose example value is an
``nn.Parameter``. Those, ``get_attr`` tensors, and pure view/cast chains over them (``w.T``,
``w.t()[:, :k]``) count as constants. Every ``F.linear`` / ``nn.Linear`` / ``addmm`` / ``mm`` /
``matmul``, and every ``einsum`` that is a linear layer (``"...k,nk->...n"`` and its spellings),
whose weight folds to a constant 2-D tensor becomes a Site; everything else that looks like one is
listed as skipped with the reason, and left as it was.
"""

from __future__ import annotations

import math
import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsec.passes import unfuse_fx
from sparsec.sites import Site, Skipped

LINEAR_TARGETS = {F.linear, torch._C._nn.linear}
MATMUL_TARGETS = {torch.matmul, torch.mm, operator.matmul, torch.Tensor.matmul, torch.Tensor.mm}
ADDMM_TARGETS = {torch.addmm, torch.Tensor.addmm}
MATMUL_METHODS = {"matmul", "mm", "__matmul__"}
FOLDABLE_METHODS = {
    "t", "transpose", "permute", "contiguous", "view", "reshape", "to", "float", "half",
    "bfloat16", "detach", "clone", "__getitem__", "expand", "squeeze", "unsqueeze",
}
FOLDABLE_FUNCTIONS = {
    getattr, operator.getitem, torch.t, torch.transpose, torch.permute, torch.reshape,
    torch.zeros, torch.ones, torch.full, torch.squeeze, torch.unsqueeze,
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CONV = "a convolution's weight: sparsec rewrites linear layers and matrix products, not convolutions"
OTHER_WEIGHT_TARGETS = {
    torch.einsum: ("an einsum with a constant operand is rewritten only where it is a linear layer (the input "
                   "'...k', the weight 'nk' or 'kn', the output '...n'); write it so, or as F.linear, to have it planned"),
    torch.bmm: "a batched product with a constant operand (one weight per batch entry) is not rewritten",
    torch.baddbmm: "a batched product with a constant operand (one weight per batch entry) is not rewritten",
    **{f: _CONV for f in (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d,
                          F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
}


class ConstantFolder:
    """Resolves nodes that depend only on parameters, buffers and literals to real tensors."""

    def __init__(self, gm: fx.GraphModule, example_inputs, names: dict[int, str] | None = None):
        self.gm = gm
        # id of each of the user's parameters and buffers -> its name in the whole model: Dynamo's
        # sources are relative to the frame traced, so a graph that resumes inside a submodule
        # after a graph break would otherwise name ``down_proj`` where the model has
        # ``model.layers.3.mlp.down_proj``
        self.names = names or {}
        self.values: dict[fx.Node, object] = {}
        self.sources: dict[fx.Node, str] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs or []):
            if isinstance(value, torch.nn.Parameter) or _is_module_state(node):
                self.values[node] = value
                self.sources[node] = self.names.get(id(value)) or _source_name(node)

    def resolve(self, node) -> tuple[bool, object]:
        if not isinstance(node, fx.Node):
            return True, node
        if node in self.values:
            return True, self.values[node]
        ok, value = self._fold(node)
        if ok:
            self.values[node] = value
        return ok, value

    def source(self, node: fx.Node) -> str | None:
        """The qualified name of the parameter a constant node was folded from, if one."""
        seen = node
        while isinstance(seen, fx.Node):
            if seen in self.sources:
                return self.sources[seen]
            args = [a for a in seen.args if isinstance(a, fx.Node)]
            if len(args) < 1:
                return None
            seen = args[0]
        return None

    def _fold(self, node: fx.Node):
        if node.op == "get_attr":
            value = _fetch_attr(self.gm, node.target)
            if isinstance(value, torch.Tensor):
                self.sources[node] = self.names.get(id(value)) or str(node.target)
                return True, value
            return False, None
        if node.op == "call_function" and node.target in FOLDABLE_FUNCTIONS:
            fn = node.target
        elif node.op == "call_method" and node.target in FOLDABLE_METHODS:
            fn = None
        else:
            return False, None
        args, kwargs = [], {}
        for a in node.args:
            ok, v = self._resolve_arg(a)
            if not ok:
                return False, None
            args.append(v)
        for k, a in node.kwargs.items():
            ok, v = self._resolve_arg(a)
            if not ok:
                return False, None
            kwargs[k] = v
        with torch.no_grad():
            try:
                if fn is None:
                    return True, getattr(args[0], node.target)(*args[1:], **kwargs)
                return True, fn(*args, **kwargs)
            except Exception:  # a fold that fails is simply not a constant
                return False, None

    def _resolve_arg(self, a):
        if isinstance(a, fx.Node):
            return self.resolve(a)
        if isinstance(a, (list, tuple)):
            out = []
            for item in a:
                ok, v = self._resolve_arg(item)
                if not ok:
                    return False, None
                out.append(v)
            return True, type(a)(out)
        return True, a


def parameter_sources(gm: fx.GraphModule, example_inputs) -> list:
    """Dynamo's sources of the graph inputs that are the model's parameters and buffers."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs or []):
        source = getattr(node.meta.get("grapharg"), "source", None)
        if source is not None and (isinstance(value, torch.nn.Parameter) or _is_module_state(node)):
            out.append(source)
    return out


def _is_module_state(node: fx.Node) -> bool:
    ga = node.meta.get("grapharg")
    source = getattr(ga, "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return isinstance(name, str) and ("_parameters[" in name or "_buffers[" in name)


def _source_name(node: fx.Node) -> str:
    ga = node.meta.get("grapharg")
    source = getattr(ga, "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return qualified_name(name) if isinstance(name, str) else node.name


def qualified_name(dynamo_source: str) -> str:
    """``L['self']._modules['enc']._modules['0']._parameters['weight']`` -> ``enc.0.weight``."""
    s = re.sub(r"^L\['[^']+'\]\.?", "", dynamo_source)
    s = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", "." + s)
    s = re.sub(r"\[(\d+)\]", r".\1", s)
    s = re.sub(r"\['([^']+)'\]", r".\1", s)
    return s.strip(".")


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def layer_name(weight_source: str | None, node: fx.Node, frame_relative: bool = False) -> str:
    """The layer's name: its weight's, less ``.weight``; else the module that ran it; else the node's.
    ``frame_relative``: the weight's name is Dynamo's (relative to the traced frame, as the module
    stack's paths are), so a ``torch.nn.Linear`` that runs a weight another module owns (a head
    tied to the embedding table) is named as that linear layer, as the whole model's names do."""
    if weight_source:
        name = weight_source[: -len(".weight")] if weight_source.endswith(".weight") else weight_source
        if frame_relative:
            module = _running_linear(node)
            return module if module is not None else name
        return name
    stack = node.meta.get("nn_module_stack")
    if stack:
        return qualified_name(list(stack.values())[-1][0])
    return node.name


def _running_linear(node: fx.Node) -> str | None:
    """The qualified path of the ``torch.nn.Linear`` whose call the node is, if it is one."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    if isinstance(kind, type) and issubclass(kind, torch.nn.Linear):
        return qualified_name(path)
    return None


def capture(gm: fx.GraphModule, example_inputs, graph: int = 0, names: dict[int, str] | None = None,
            ) -> tuple[list[Site], list[Skipped], dict[str, fx.Node]]:
    """Sites of ``gm`` (weights as real tensors), what was skipped, and each site's node; ``names``
    (see ``ConstantFolder``) names weights as the whole model does."""
    unfuse_fx.expand(gm)
    folder = ConstantFolder(gm, example_inputs, names)
    sites: list[Site] = []
    skipped: list[Skipped] = []
    nodes: dict[str, fx.Node] = {}
    names: dict[str, int] = {}
    for node in gm.graph.nodes:
        match = _match_linear(gm, node)
        if match is None:
            skipped += _hidden_weights(folder, node)
            continue
        op, x, w_node, b_node, transposed = match
        ok_w, w = folder.resolve(w_node)
        if isinstance(w_node, torch.Tensor):
            ok_w, w = True, w_node
        if node.op == "call_module":
            source = f"{node.target}.weight"
        else:
            source = folder.source(w_node) if isinstance(w_node, fx.Node) else None
        name = layer_name(source, node, frame_relative=not folder.names)
        if isinstance(w_node, fx.Node) and unfuse_fx.PART in w_node.meta:
            name = f"{name}.{w_node.meta[unfuse_fx.PART]}"
        if not ok_w or not isinstance(w, torch.Tensor):
            if _is_tensor_valued(w_node):
                skipped.append(Skipped(name, op, "no constant weight: both operands are computed at run time"))
            continue
        reason = None
        if w.dim() != 2:
            reason = f"weight is {w.dim()}-D; only 2-D weights are rewritten"
        elif w.dtype not in SUPPORTED_DTYPES:
            reason = f"weight dtype {w.dtype} not supported; float32, float16 and bfloat16 are"
        elif w.is_sparse or w.layout != torch.strided:
            reason = f"weight layout {w.layout} is already not dense"
        bias = None
        if reason is None and b_node is not None:
            ok_b, bias = folder.resolve(b_node)
            if not ok_b or not isinstance(bias, torch.Tensor):
                reason = "bias is computed at run time"
            elif bias.dim() != 1 or bias.shape[0] != (w.shape[1] if transposed else w.shape[0]):
                reason = f"bias of shape {tuple(bias.shape)} is broadcast, not one value per output"
        if reason is None and _activation_rank(x) not in (None, 2, 3, 4):
            reason = f"activation is {_activation_rank(x)}-D; layers whose input has 2 to 4 dimensions (…, K) are rewritten"
        if reason is not None:
            skipped.append(Skipped(name, op, reason))
            continue
        weight = w.detach().T if transposed else w.detach()
        count = names.get(name, 0)
        names[name] = count + 1
        unique = name if count == 0 else f"{name}#{count + 1}"
        sites.append(
            Site(
                name=unique,
                op=op,
                weight=weight,
                bias=None if bias is None else bias.detach(),
                dtype=weight.dtype,
                input_key=f"g{graph}:{x.name}" if isinstance(x, fx.Node) else f"g{graph}:{unique}",
                graph=graph,
                tokens=_rows(x),
                tokens_vary=_rows_vary(x),
            )
        )
        nodes[unique] = node
    linear_nodes = set(nodes.values())
    for site in sites:
        site.read_by_linears = read_by_linears(nodes[site.name], linear_nodes)
    return sites, skipped, nodes


ELEMENTWISE_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
                         torch.sigmoid, torch.tanh, torch.relu, F.silu, F.gelu, F.relu, F.sigmoid, F.tanh,
                         operator.getitem}
ELEMENTWISE_METHODS = {"add", "mul", "sub", "div", "sigmoid", "tanh", "relu", "contiguous", "to", "float", "half",
                       "bfloat16", "type_as"}


def read_by_linears(node: fx.Node, linears: set, depth: int = 6) -> bool:
    """Whether every path from ``node``'s output ends in one of ``linears`` after at most ``depth``
    elementwise ops (slices included): the readers a product's memory order does not slow."""
    users = list(node.users)
    if not users or depth == 0:
        return False
    for user in users:
        if user in linears:
            continue
        elementwise = ((user.op == "call_function" and user.target in ELEMENTWISE_FUNCTIONS)
                       or (user.op == "call_method" and user.target in ELEMENTWISE_METHODS))
        if not elementwise or not read_by_linears(user, linears, depth - 1):
            return False
    return True


def _hidden_weights(folder: ConstantFolder, node: fx.Node) -> list[Skipped]:
    """The 2-D weights of a call capture cannot plan (a fused attention call left fused, an einsum,
    a convolution), each listed as skipped with the reason, so none goes unmentioned."""
    reason = unfuse_fx.refusal(node)
    if reason is None and node.op == "call_function" and node.target in OTHER_WEIGHT_TARGETS:
        reason = OTHER_WEIGHT_TARGETS[node.target]
    if reason is None:
        return []
    out = []
    for arg in node.all_input_nodes:
        ok, w = folder.resolve(arg)
        if ok and isinstance(w, torch.Tensor) and w.dim() >= 2:
            out.append(Skipped(layer_name(folder.source(arg), node), getattr(node.target, "__name__", str(node.target)),
                               reason))
    return out


def _is_tensor_valued(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    val = node.meta.get("example_value", node.meta.get("val"))
    return val is None or isinstance(val, torch.Tensor)


def _rows(x) -> int | None:
    """Rows of the flattened activation (the M a kernel sees) from the traced example value.

    A dynamic dimension counts at the size it was traced with; its hint is read without
    ``int()``, which would install a guard and make Dynamo specialise the graph to that size.
    """
    val = _traced_value(x)
    if not isinstance(val, torch.Tensor) or val.dim() < 1:
        return None
    sizes = [_size_hint(d) for d in val.shape]
    if any(d is None for d in sizes) or not sizes[-1]:
        return None
    return math.prod(sizes[:-1])


def concrete_inputs(values) -> list:
    """A graph's example inputs with every symbolic size (a dynamic dimension's SymInt, which
    Dynamo passes for the graph's size inputs) replaced by the size it was traced with, so the
    graph can be run on them; read from the hint, so Dynamo installs no guard."""
    out = []
    for v in values:
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            hint = getattr(v.node, "hint", None)
            v = hint if hint is not None else v
        out.append(v)
    return out


def _rows_vary(x) -> bool:
    """Whether the rows of the flattened activation are a dynamic dimension of the graph."""
    val = _traced_value(x)
    return isinstance(val, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in val.shape[:-1])


def _size_hint(d) -> int | None:
    if isinstance(d, torch.SymInt):
        hint = getattr(d.node, "hint", None)
        return int(hint) if isinstance(hint, int) else None
    return int(d)


def _activation_rank(x) -> int | None:
    val = _traced_value(x)
    return val.dim() if isinstance(val, torch.Tensor) else None


def _traced_value(x):
    """The example value Dynamo (or tracing) recorded for a node, None for a constant."""
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else None


def linear_input(node: fx.Node):
    """The activation operand of a node ``_match_linear`` matched."""
    if (node.op == "call_function" and node.target in ADDMM_TARGETS) or (node.op == "call_method" and node.target == "addmm"):
        return node.args[1]
    if node.op == "call_function" and node.target is torch.einsum:
        return _einsum_linear(node)[0]
    return node.args[0]


def _einsum_linear(node: fx.Node):
    """(x, weight, weight_is_K_by_N) where the einsum is a linear layer, else None: two operands, one
    of two letters (the weight: ``nk`` or ``kn``), the other ending in the contracted letter ``k``
    (its leading letters or ``...`` kept in order), the output those leading letters then ``n``."""
    args = list(node.args)
    if len(args) == 2 and isinstance(args[1], (list, tuple)):
        args = [args[0], *args[1]]
    if len(args) != 3 or not isinstance(args[0], str) or node.kwargs:
        return None
    equation = args[0].replace(" ", "")
    if equation.count("->") != 1:
        return None
    left, out = equation.split("->")
    subs = left.split(",")
    if len(subs) != 2:
        return None
    for xi, wi in ((0, 1), (1, 0)):
        x_sub, w_sub = subs[xi], subs[wi]
        if len(w_sub) != 2 or not w_sub.isalpha() or w_sub[0] == w_sub[1] or not x_sub:
            continue
        k = x_sub[-1]
        lead = x_sub[:-1]
        if k not in w_sub or any(c in lead for c in w_sub):
            continue
        n = w_sub.replace(k, "")
        if out == lead + n and len(set(lead.replace(".", ""))) == len(lead.replace(".", "")):
            return args[1 + xi], args[1 + wi], w_sub == k + n
    return None


def _match_linear(gm: fx.GraphModule, node: fx.Node):
    """(op, x, weight, bias, weight_is_K_by_N) for a linear-like node, else None."""
    if node.op == "call_function" and node.target is torch.einsum:
        found = _einsum_linear(node)
        return None if found is None else ("einsum", found[0], found[1], None, found[2])
    if node.op == "call_function" and node.target in LINEAR_TARGETS:
        x = node.args[0]
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return "linear", x, w, b, False
    if node.op == "call_module":
        mod = _fetch_attr(gm, node.target)
        if isinstance(mod, torch.nn.Linear) and len(node.args) == 1:
            return "linear", node.args[0], mod.weight, mod.bias, False
        return None
    is_mm = (node.op == "call_function" and node.target in MATMUL_TARGETS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    )
    if is_mm and len(node.args) == 2 and not node.kwargs:
        op = "mm" if node.target in (torch.mm, torch.Tensor.mm, "mm") else "matmul"
        return op, node.args[0], node.args[1], None, True
    is_addmm = (node.op == "call_function" and node.target in ADDMM_TARGETS) or (
        node.op == "call_method" and node.target == "addmm"
    )
    if is_addmm and len(node.args) == 3 and all(node.kwargs.get(k, 1) == 1 for k in ("beta", "alpha")):
        return "addmm", node.args[1], node.args[2], node.args[0], True
    return None
