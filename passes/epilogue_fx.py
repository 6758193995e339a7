"""Fold the SiLU-gate and the residual add into the launch of the packed linear before them.

Runs on a graph ``rewrite_fx.rewrite`` has lowered. Two patterns, matched on the graph's own
nodes, each taken only where every intermediate has no other reader and the format says the
fused epilogue pays at the traced token count (``epilogue_pays``, codegen/epilogue.py):

- gated: a ``PackedGroup`` of two equal-width layers, one slice through SiLU, the product of
  the two slices: ``silu(gate(x)) * up(x)`` becomes one launch writing the product;
- residual: a packed linear (or a gated launch) whose output is only added, without scaling,
  to a tensor of the same shape and dtype: ``r + f(x)`` becomes ``f(x, r)``.

Every fold is logged and returned as a line for the report's planner log, and the original
graph's nodes it absorbed are returned so the rest-of-graph estimate can leave them out.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

SILU_FUNCTIONS = {F.silu}
MUL_FUNCTIONS = {operator.mul, torch.mul, torch.Tensor.mul}
ADD_FUNCTIONS = {operator.add, torch.add, torch.Tensor.add}


def fuse_epilogues(gm: fx.GraphModule, names: dict[str, str]) -> tuple[list[str], list[fx.Node]]:
    """Fold epilogues in ``gm`` in place. ``names``: submodule target -> the layer names it runs,
    for the log. Returns the planner-log lines and the nodes absorbed (already erased)."""
    lines: list[str] = []
    absorbed: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and not getattr(node, "_erased", False):
            fused = _fold_gate(gm, node, names, lines, absorbed)
            _fold_residual(gm, fused or node, names, lines, absorbed)
    return lines, absorbed


def _fold_gate(gm, node, names, lines, absorbed):
    from sparsec.codegen import Epilogue, EpilogueLinear, PackedGroup

    group = gm.get_submodule(node.target)
    if not isinstance(group, PackedGroup) or len(group.sizes) != 2 or group.sizes[0] != group.sizes[1]:
        return None
    if not _pays(group.linear, node.args[0]):
        return None
    pieces = list(node.users)
    if len(pieces) != 2 or not all(_slice_of(p) is not None for p in pieces):
        return None
    for gate, up in (pieces, pieces[::-1]):
        silu = _only_user(gate)
        if silu is None or not _is_silu(gm, silu, gate):
            continue
        mul = _only_user(silu)
        if mul is None or _only_user(up) is not mul or not _is_binary(mul, MUL_FUNCTIONS, "mul", silu, up):
            continue
        width = group.sizes[0]
        gate_row, up_row = _slice_of(gate)[0], _slice_of(up)[0]
        module = EpilogueLinear(group.linear, Epilogue(gate_row=gate_row, up_row=up_row, width=width))
        attr = f"{node.target}_gated"
        gm.add_submodule(attr, module)
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_module(attr, (node.args[0],))
        fused.meta = dict(mul.meta)
        mul.replace_all_uses_with(fused)
        for n in (mul, silu, up, gate, node):
            absorbed.append(n)
            gm.graph.erase_node(n)
        layers = names.get(node.target, node.target)
        _note(lines, f"{layers}: SiLU-multiply in the stacked launch's epilogue")
        names[attr] = layers
        return fused
    return None


def _fold_residual(gm, node, names, lines, absorbed) -> None:
    from sparsec.codegen import Epilogue, EpilogueLinear, PackedLinear

    module = gm.get_submodule(node.target)
    if isinstance(module, EpilogueLinear) and not module.epilogue.residual and len(node.args) == 1:
        linear, epilogue = module.linear, module.epilogue
    elif isinstance(module, PackedLinear):
        linear, epilogue = module, Epilogue()
    else:
        return
    if not _pays(linear, node.args[0]):
        return
    add = _only_user(node)
    if add is None or add.op not in ("call_function", "call_method") or add.kwargs or len(add.args) != 2:
        return
    other = add.args[1] if add.args[0] is node else add.args[0]
    if not _is_binary(add, ADD_FUNCTIONS, "add", node, other) or not _same_tensor_type(node, other):
        return
    fused_module = EpilogueLinear(linear, Epilogue(epilogue.gate_row, epilogue.up_row, epilogue.width, residual=True))
    attr = f"{node.target}_residual"
    gm.add_submodule(attr, fused_module)
    with gm.graph.inserting_before(add):
        fused = gm.graph.call_module(attr, (node.args[0], other))
    fused.meta = dict(add.meta)
    add.replace_all_uses_with(fused)
    for n in (add, node):
        absorbed.append(n)
        gm.graph.erase_node(n)
    _note(lines, f"{names.get(node.target, node.target)}: residual add in the launch's epilogue")


def _note(lines: list[str], line: str) -> None:
    from sparsec.logs import logger

    logger.info("%s", line)
    lines.append(line)


def _pays(linear, x: fx.Node) -> bool:
    """Whether the format fuses at the traced token count (the input's rows)."""
    value = _value(x)
    if not isinstance(value, torch.Tensor) or value.dim() < 1:
        return False
    sizes = _sizes(value)
    if not sizes or sizes[-1] != linear.in_features or 0 in sizes:
        return False
    return linear.packed.handler.epilogue_pays(math.prod(sizes[:-1]))


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _slice_of(node: fx.Node) -> tuple[int, int] | None:
    """(start, stop) of ``x[..., start:stop]``, the slice a group's member reads."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    index = node.args[1]
    if (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and index[1].step in (None, 1)):
        return index[1].start, index[1].stop
    return None


def _is_silu(gm, node: fx.Node, arg: fx.Node) -> bool:
    if node.op == "call_function" and node.target in SILU_FUNCTIONS:
        return node.args[:1] == (arg,) and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.SiLU) and node.args == (arg,)
    return False


def _is_binary(node: fx.Node, functions, method: str, a, b) -> bool:
    """``node`` is a plain a (op) b, either order, no keyword (no ``alpha``) and no broadcast surprise."""
    if node.kwargs or len(node.args) != 2 or not all(isinstance(n, fx.Node) for n in node.args):
        return False
    if a is b or set(node.args) != {a, b}:
        return False
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def _same_tensor_type(a: fx.Node, b) -> bool:
    va, vb = _value(a), _value(b)
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    sizes = _sizes(va)
    return sizes is not None and sizes == _sizes(vb) and va.dtype == vb.dtype and va.device == vb.device


def _value(node):
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def _sizes(t: torch.Tensor) -> list[int] | None:
    out = []
    for d in t.shape:
        if isinstance(d, torch.SymInt):
            return None                               # a dynamic size: the token count is not known
        out.append(int(d))
    return out
