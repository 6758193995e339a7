"""Fused attention calls expanded into the linear layers they hide, so they can be planned.

``nn.MultiheadAttention`` reaches Dynamo's graph as one ``F.multi_head_attention_forward`` call,
and ``nn.TransformerEncoderLayer`` in inference as one ``torch._transformer_encoder_layer_fwd``
call (PyTorch's fused fast path). Their projections (the attention's in and out projections, the
feed-forward layers) are ordinary linear layers inside them, invisible to capture: left fused, a
Transformer built from these modules would be planned as if it had no layers at all. Each call
is replaced by the same computation written out as ``F.linear`` calls around one attention core
(``attention_core``: scaled dot-product attention, masks merged as PyTorch merges them). A call
using something the expansion does not cover (bias_k/bias_v, zero attention, static keys, dropout
in training, unbatched inputs) is left as it is, and capture
lists its weights as skipped with ``refusal``'s reason.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

MHA = F.multi_head_attention_forward
ENCODER = getattr(torch, "_transformer_encoder_layer_fwd", None)
_MHA_SIGNATURE = inspect.signature(MHA)
PART = "sparsec_part"  # node meta: which part of a packed weight a slice is
_ENCODER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "use_gelu",
                 "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2", "norm_bias_2",
                 "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")


def attention_core(q, k, v, num_heads: int, key_padding_mask=None, attn_mask=None, need_weights: bool = False,
                   average_attn_weights: bool = True, is_causal: bool = False, batch_first: bool = False):
    """Multi-head attention between projected ``q`` (L, N, E) and ``k``, ``v`` (S, N, E) — (N, L, E)
    with ``batch_first`` — as ``F.multi_head_attention_forward`` computes it between its projections
    (no dropout). Returns the heads' output in the layout of ``q`` and the attention weights
    (averaged over heads unless told otherwise) when ``need_weights``, else None."""
    if batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    L, N, E = q.shape
    S = k.shape[0]
    head = E // num_heads
    q = q.reshape(L, N * num_heads, head).transpose(0, 1)
    k = k.reshape(S, N * num_heads, head).transpose(0, 1)
    v = v.reshape(S, N * num_heads, head).transpose(0, 1)
    if is_causal and key_padding_mask is None and not need_weights:
        mask = None
    else:
        is_causal = False
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        elif mask is not None and mask.dim() == 4:  # (N, heads, L, S), as the encoder's fast path merges masks
            mask = mask.reshape(N * num_heads, L, S)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(N, 1, 1, S).expand(-1, num_heads, -1, -1).reshape(N * num_heads, 1, S)
            mask = padding if mask is None else mask + padding
    weights = None
    if need_weights:
        scores = torch.bmm(q * head ** -0.5, k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        out = torch.bmm(attn, v)
        weights = attn.view(N, num_heads, L, S)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.size(0) == 1 else mask.view(N, num_heads, -1, S)
        out = F.scaled_dot_product_attention(q.view(N, num_heads, L, head), k.view(N, num_heads, S, head),
                                             v.view(N, num_heads, S, head), attn_mask=mask, is_causal=is_causal)
        out = out.view(N * num_heads, L, head)
    out = out.transpose(0, 1).reshape(L, N, E)
    return (out.transpose(0, 1) if batch_first else out), weights


def _additive(mask, dtype):
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def refusal(node: fx.Node) -> str | None:
    """Why a fused attention call stays fused (None when it is expanded, or is no such call)."""
    if node.op != "call_function":
        return None
    if node.target is MHA:
        return _mha_refusal(_mha_args(node))
    if ENCODER is not None and node.target is ENCODER:
        return _encoder_refusal(_encoder_args(node))
    return None


def expand(gm: fx.GraphModule) -> bool:
    """Replace every expandable fused attention call of ``gm`` in place; whether any was."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or refusal(node) is not None:
            continue
        if node.target is MHA:
            _expand_mha(gm.graph, node)
            changed = True
        elif ENCODER is not None and node.target is ENCODER:
            _expand_encoder(gm.graph, node)
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


# -- nn.MultiheadAttention ---------------------------------------------------------------------


def _mha_args(node: fx.Node) -> dict:
    bound = _MHA_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _mha_refusal(a: dict) -> str | None:
    if a["bias_k"] is not None or a["bias_v"] is not None:
        return "nn.MultiheadAttention with add_bias_kv is not expanded into its projections"
    if a["add_zero_attn"]:
        return "nn.MultiheadAttention with add_zero_attn is not expanded into its projections"
    if a["static_k"] is not None or a["static_v"] is not None:
        return "multi-head attention with static keys or values is not expanded into its projections"
    if a["training"] and a["dropout_p"] > 0.0:
        return "multi-head attention with dropout active (training mode) is not expanded; call model.eval()"
    if _rank(a["query"]) != 3 or _rank(a["key"]) != 3 or _rank(a["value"]) != 3:
        return "multi-head attention on unbatched (2-D) inputs is not expanded into its projections"
    if a["use_separate_proj_weight"]:
        if any(a[w] is None for w in ("q_proj_weight", "k_proj_weight", "v_proj_weight")):
            return "multi-head attention without its separate projection weights is not expanded"
    elif a["in_proj_weight"] is None:
        return "multi-head attention without an input projection weight is not expanded"
    return None


def _expand_mha(graph: fx.Graph, node: fx.Node) -> None:
    a = _mha_args(node)
    E = int(a["embed_dim_to_check"])
    emit = _Emitter(graph, node)
    bias = a["in_proj_bias"]
    biases = [None] * 3 if bias is None else [emit(operator.getitem, bias, slice(i * E, (i + 1) * E)) for i in range(3)]
    if a["use_separate_proj_weight"]:
        weights = [a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]]
    else:
        weights = None
    if weights is None and a["query"] is a["key"] is a["value"]:
        packed = emit(F.linear, a["query"], a["in_proj_weight"], bias)
        q, k, v = (emit(operator.getitem, packed, (Ellipsis, slice(i * E, (i + 1) * E))) for i in range(3))
    else:
        if weights is None:
            weights = [emit(operator.getitem, a["in_proj_weight"], slice(i * E, (i + 1) * E)) for i in range(3)]
            for weight, part in zip(weights, "qkv"):
                weight.meta[PART] = part  # capture names the layer after it: in_proj_weight.q, .k, .v
        q, k, v = (emit(F.linear, x, w, b) for x, w, b in zip((a["query"], a["key"], a["value"]), weights, biases))
    core = emit(attention_core, q, k, v, int(a["num_heads"]), a["key_padding_mask"], a["attn_mask"],
                bool(a["need_weights"]), bool(a["average_attn_weights"]), bool(a["is_causal"]))
    heads = emit(operator.getitem, core, 0)
    out = emit(F.linear, heads, a["out_proj_weight"], a["out_proj_bias"])
    attn = emit(operator.getitem, core, 1)
    result = emit(_pair, out, attn)
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _pair(a, b):
    return a, b


# -- nn.TransformerEncoderLayer's fast path ------------------------------------------------------


def _encoder_args(node: fx.Node) -> dict:
    return dict(zip(_ENCODER_ARGS, [*node.args, *[node.kwargs.get(k) for k in _ENCODER_ARGS[len(node.args):]]]))


def _encoder_refusal(a: dict) -> str | None:
    if a["mask"] is not None and a["mask_type"] not in (1, 2):
        return (f"nn.TransformerEncoderLayer's fused fast path with a mask of type {a['mask_type']} is not expanded "
                "into its layers")
    if _rank(a["src"]) != 3:
        return "nn.TransformerEncoderLayer's fused fast path on unbatched input is not expanded into its layers"
    return None


def _expand_encoder(graph: fx.Graph, node: fx.Node) -> None:
    a = _encoder_args(node)
    E, heads = int(a["embed_dim"]), int(a["num_heads"])
    emit = _Emitter(graph, node)

    def norm(x, i):
        return emit(F.layer_norm, x, (E,), a[f"norm_weight_{i}"], a[f"norm_bias_{i}"], float(a["eps"]))

    def attention(x):
        packed = emit(F.linear, x, a["qkv_weight"], a["qkv_bias"])
        q, k, v = (emit(operator.getitem, packed, (Ellipsis, slice(i * E, (i + 1) * E))) for i in range(3))
        padding, mask = (a["mask"], None) if a["mask_type"] == 1 else (None, a["mask"])
        core = emit(attention_core, q, k, v, heads, padding, mask, False, True, False, True)
        return emit(F.linear, emit(operator.getitem, core, 0), a["proj_weight"], a["proj_bias"])

    def feed_forward(x):
        hidden = emit(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
        hidden = emit(F.gelu if a["use_gelu"] else F.relu, hidden)
        return emit(F.linear, hidden, a["ffn_weight_2"], a["ffn_bias_2"])

    x = a["src"]
    if a["norm_first"]:
        x = emit(operator.add, x, attention(norm(x, 1)))
        x = emit(operator.add, x, feed_forward(norm(x, 2)))
    else:
        x = norm(emit(operator.add, x, attention(x)), 1)
        x = norm(emit(operator.add, x, feed_forward(x)), 2)
    node.replace_all_uses_with(x)
    graph.erase_node(node)


# -- writing nodes with Dynamo's metadata ---------------------------------------------------------


def _value(x):
    return x.meta.get("example_value", x.meta.get("val")) if isinstance(x, fx.Node) else x


def _rank(x) -> int | None:
    v = _value(x)
    return v.dim() if isinstance(v, torch.Tensor) else None


class _Emitter:
    """Inserts calls before ``node``, each with the example value Dynamo's nodes carry (computed on
    the fake tensors of its inputs), so capture reads shapes and token counts from them as usual."""

    def __init__(self, graph: fx.Graph, node: fx.Node):
        self.graph, self.node = graph, node
        # the example values' own mode: a backend runs under a tracing context with a mode of its own
        modes = [getattr(v, "fake_mode", None) for v in map(_value, node.all_input_nodes)]
        self.mode = next((m for m in modes if m is not None), None)

    def __call__(self, target, *args):
        with self.graph.inserting_before(self.node):
            new = self.graph.call_function(target, args)
        new.meta.update({k: v for k, v in self.node.meta.items() if k in ("stack_trace", "nn_module_stack", "source_fn_stack")})
        if self.mode is not None:
            inputs = [_value(a) for a in args]
            if not any(isinstance(a, fx.Node) and _value(a) is None for a in args):
                with self.mode:
                    value = target(*inputs)
                new.meta["example_value"] = value
        return new
