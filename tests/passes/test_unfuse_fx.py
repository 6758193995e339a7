"""Fused attention calls written out as linear layers: same outputs, projections visible to capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.passes import capture_fx, unfuse_fx

# float32 attention over <= 64 features: the expansion and PyTorch's fused kernels differ only in
# summation order, ~1e-6 relative; 1e-4 leaves room without hiding a wrong mask or head layout
TOL = dict(rtol=1e-4, atol=1e-5)


def through_expansion(fn, *args):
    """``fn(*args)`` compiled by a backend that expands the graph and runs it as expanded."""
    seen = {}

    def backend(gm, inputs):
        seen["expanded"] = unfuse_fx.expand(gm)
        seen["sites"], seen["skipped"], _ = capture_fx.capture(gm, inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return out, seen


def mha(batch_first=True, kdim=None, **kw):
    torch.manual_seed(0)
    return nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, **kw).eval()


@pytest.mark.parametrize("case", ["self", "cross", "padding", "float_mask", "causal", "weights", "head_weights",
                                  "separate", "seq_first"])
def test_multi_head_attention_expands_to_the_same_outputs(case):
    m = mha(batch_first=case != "seq_first", kdim=16 if case == "separate" else None)
    x = torch.randn(3, 7, 32) if case != "seq_first" else torch.randn(7, 3, 32)
    mem = torch.randn(3, 5, 16 if case == "separate" else 32)
    kwargs = {"need_weights": case in ("weights", "head_weights")}
    if case == "head_weights":
        kwargs["average_attn_weights"] = False
    if case == "padding":
        pad = torch.zeros(3, 7, dtype=torch.bool)
        pad[0, 5:] = True
        kwargs["key_padding_mask"] = pad
    if case == "float_mask":
        kwargs["attn_mask"] = torch.randn(7, 7)
    if case == "causal":
        kwargs.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(7), is_causal=True)
    keys = mem if case in ("cross", "separate") else x

    def fn(q, k):
        return m(q, k, k, **kwargs)

    (out, weights), seen = through_expansion(fn, x, keys)
    want_out, want_weights = fn(x, keys)
    assert seen["expanded"]
    torch.testing.assert_close(out, want_out, **TOL)
    if kwargs["need_weights"]:
        torch.testing.assert_close(weights, want_weights, **TOL)
    else:
        assert weights is None and want_weights is None
    names = sorted(s.name for s in seen["sites"])
    if case == "cross":  # q, k and v are slices of one packed weight, each its own layer
        assert names == ["in_proj_weight.k", "in_proj_weight.q", "in_proj_weight.v", "out_proj"], names
    elif case == "separate":
        assert names == ["k_proj_weight", "out_proj", "q_proj_weight", "v_proj_weight"], names
    else:
        assert names == ["in_proj_weight", "out_proj"], names


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_the_encoder_layer_fast_path_expands_into_its_four_layers(norm_first, activation):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, norm_first=norm_first, activation=activation).eval()
    x = torch.randn(2, 9, 32)
    out, seen = through_expansion(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), **TOL)
    assert sorted(tuple(s.weight.shape) for s in seen["sites"]) == [(32, 32), (32, 64), (64, 32), (96, 32)]


def test_a_variant_it_does_not_cover_stays_fused_and_its_weights_are_listed_with_the_reason():
    m = mha(add_bias_kv=True)
    x = torch.randn(2, 5, 32)
    out, seen = through_expansion(lambda q: m(q, q, q, need_weights=False)[0], x)
    torch.testing.assert_close(out, m(x, x, x, need_weights=False)[0], **TOL)
    assert not seen["expanded"] and not seen["sites"]
    reasons = {s.reason for s in seen["skipped"]}
    assert reasons == {"nn.MultiheadAttention with add_bias_kv is not expanded into its projections"}
    assert len(seen["skipped"]) >= 2  # the in- and out-projection weights, at least


def test_a_transformer_encoder_is_planned_layer_by_layer():
    torch.manual_seed(2)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2,
                                    enable_nested_tensor=False).eval()
    x = torch.randn(4, 16, 64)
    result = sparsec.optimize(encoder, (x,), fingerprint="cpu", plan={"layers": {"_default": "lowrank:16"}})
    names = sorted(l["name"] for l in result.report["layers"])
    assert names == sorted(f"layers.{i}.{n}" for i in range(2)
                           for n in ("self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2"))
    assert all(l["format"] == "lowrank:16" for l in result.report["layers"])
    with torch.no_grad():
        err = (result.module(x) - encoder(x)).norm() / encoder(x).norm()
    assert 0.0 < float(err) < 1.0  # rewritten (not the dense graph), and still the same model


def test_a_direct_functional_call_with_a_boolean_padding_mask_expands_to_the_same_outputs():
    m = mha(batch_first=False)
    x = torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 4:] = True  # nn.MultiheadAttention turns masks into floats first; a direct call need not

    def fn(q):
        return torch.nn.functional.multi_head_attention_forward(
            q, q, q, 32, 4, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0, m.out_proj.weight,
            m.out_proj.bias, training=False, key_padding_mask=pad, need_weights=False)[0]

    out, seen = through_expansion(fn, x)
    assert seen["expanded"]
    with torch.no_grad():
        torch.testing.assert_close(out, fn(x), **TOL)


@pytest.mark.parametrize("masks", ["padding", "causal"])
def test_the_encoder_fast_path_with_a_mask_expands_to_the_same_outputs(masks):
    torch.manual_seed(3)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                    enable_nested_tensor=False).eval()
    x = torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, 6:] = True
    kwargs = {"src_key_padding_mask": pad} if masks == "padding" else {
        "mask": nn.Transformer.generate_square_subsequent_mask(9)}

    def fn(src):
        return encoder(src, **kwargs)

    out, seen = through_expansion(fn, x)
    assert seen["expanded"] and len(seen["sites"]) == 8 and not seen["skipped"]
    with torch.no_grad():
        want = fn(x)
    keep = ~pad[..., None] if masks == "padding" else torch.ones(1, dtype=torch.bool)  # padded rows are don't-care
    torch.testing.assert_close(out * keep, want * keep, **TOL)
