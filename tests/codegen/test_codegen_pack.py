"""Packing: planted structure round-trips exactly, other weights follow each format's projection rule."""

from __future__ import annotations

import pytest
import torch
from codegen_planted import planted

from sparsec.codegen import Packed, pack
from sparsec.errors import SparsecError

SPECS = [("dense", 32, 48), ("2:4", 32, 48), ("block:16:0.25", 64, 64), ("block:32:0.5", 64, 96),
         ("lowrank:5", 40, 24), ("monarch:4", 32, 64), ("monarch:2", 24, 16)]


@pytest.mark.parametrize("spec,N,K", SPECS)
def test_planted_structure_packs_losslessly(spec, N, K, gen):
    w = planted(spec, N, K, gen)
    before = w.clone()
    packed = pack(spec, w)
    assert torch.equal(w, before), "pack must not modify the weight"
    assert packed.shape == (N, K) and packed.dtype == w.dtype and packed.device == w.device
    dense = packed.to_dense()
    if spec.startswith(("lowrank", "monarch")):
        # float64 SVD, factors stored in fp32: a few fp32 ulps (1.2e-7 each) of the weight's scale
        torch.testing.assert_close(dense, w, atol=1e-6 * w.abs().max().item(), rtol=0)
    else:
        assert torch.equal(dense, w)


@pytest.mark.parametrize("spec,N,K", [("2:4", 32, 48), ("block:16:0.25", 64, 64)])
def test_planted_structure_lossless_in_half_precision(spec, N, K, gen):
    w = planted(spec, N, K, gen).to(torch.float16)
    packed = pack(spec, w)
    assert packed.dtype == torch.float16
    assert torch.equal(packed.to_dense(), w)


def test_twofour_keeps_two_largest_magnitudes_per_group(gen):
    w = torch.randn(16, 32, generator=gen)
    dense = pack("2:4", w).to_dense().reshape(16, 8, 4)
    groups = w.reshape(16, 8, 4)
    top = groups.abs().topk(2, dim=-1).indices
    expected = torch.zeros_like(groups).scatter(2, top, groups.gather(2, top))
    assert torch.equal(dense, expected)
    assert ((dense != 0).sum(-1) == 2).all()


def test_block_keeps_highest_norm_blocks(gen):
    w = torch.randn(64, 64, generator=gen)
    packed = pack("block:16:0.25", w)
    dense = packed.to_dense()
    blocks = w.reshape(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(16, 256)
    kept_blocks = dense.reshape(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(16, 256).abs().sum(1) > 0
    expected = torch.zeros(16, dtype=torch.bool)
    expected[blocks.norm(dim=1).topk(4).indices] = True
    assert torch.equal(kept_blocks, expected)
    assert torch.equal(dense[dense != 0], w[dense != 0])  # kept blocks are copied, not rescaled


def test_lowrank_projection_is_truncated_svd(gen):
    w = torch.randn(40, 24, generator=gen)
    s = torch.linalg.svdvals(w)
    err = (pack("lowrank:5", w).to_dense() - w).norm()
    # Eckart-Young: the best rank-5 error is the norm of the discarded singular values
    torch.testing.assert_close(err, s[5:].norm(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("spec,N,K", [("monarch:4", 32, 64), ("lowrank:5", 40, 24)])
def test_projection_is_at_least_as_close_as_the_planted_part(spec, N, K, gen):
    """W = structured + noise: the projection can be no farther from W than the structured part."""
    structured = planted(spec, N, K, gen)
    w = structured + 0.3 * torch.randn(N, K, generator=gen)
    proj = pack(spec, w).to_dense()
    assert (proj - w).norm() <= (structured - w).norm() * (1 + 1e-5)
    # and it is a projection: packing its own output changes nothing
    torch.testing.assert_close(pack(spec, proj).to_dense(), proj, atol=1e-5, rtol=1e-5)


def test_monarch_projection_matches_per_block_svd(gen):
    """monarch:4 on 32x64: p=16, n=8, r=4; each 8x16 block's best rank-4 error adds up."""
    w = torch.randn(32, 64, generator=gen)
    blocks = w.reshape(4, 8, 4, 16).permute(0, 2, 1, 3)
    tail = torch.linalg.svdvals(blocks)[..., 4:]
    err = (pack("monarch:4", w).to_dense() - w).norm()
    torch.testing.assert_close(err, tail.norm(), rtol=1e-4, atol=0)


def test_nbytes_counts_values_and_metadata():
    w = torch.randn(64, 128, dtype=torch.float16)
    two_four = pack("2:4", w)
    assert two_four.nbytes == 64 * 64 * 2 + 64 * 16  # half the values + a nibble per group of 4
    block = pack("block:32:0.5", w)  # 8 blocks total, 4 kept
    assert block.nbytes == 4 * 32 * 32 * 2 + 4 * 4 + 3 * 4 + 2 * 4
    assert pack("lowrank:8", w).nbytes == 8 * (64 + 128) * 2


def test_to_changes_value_dtype_but_not_metadata(gen):
    packed = pack("2:4", torch.randn(16, 32, generator=gen))
    half = packed.to(dtype=torch.float16)
    assert half.tensors()["values"].dtype == torch.float16
    assert half.tensors()["meta"].dtype == torch.uint8
    assert torch.equal(half.to_dense(), packed.to_dense().half())


def test_from_tensors_round_trip_and_derived_order(gen):
    packed = pack("block:16:0.5", torch.randn(64, 64, generator=gen))
    tensors = packed.tensors()
    again = Packed.from_tensors("block:16:0.5", (64, 64), {k: v for k, v in tensors.items() if k != "order"})
    assert torch.equal(again.tensors()["order"], tensors["order"])
    assert torch.equal(again.to_dense(), packed.to_dense())


def test_from_tensors_names_what_is_wrong(gen):
    u, v = torch.randn(40, 5, generator=gen), torch.randn(5, 24, generator=gen)
    with pytest.raises(SparsecError, match=r"'v' has shape \(5, 24\), expected \(5, 25\)"):
        Packed.from_tensors("lowrank:5", (40, 25), {"u": u, "v": v})
    with pytest.raises(SparsecError, match="missing \\['v'\\]"):
        Packed.from_tensors("lowrank:5", (40, 24), {"u": u})
    bad = pack("2:4", torch.randn(8, 16, generator=gen)).tensors()
    bad["meta"] = torch.zeros_like(bad["meta"])  # both positions 0: not a valid 2:4 group
    with pytest.raises(SparsecError, match="same or unordered positions"):
        Packed.from_tensors("2:4", (8, 16), bad)


def test_pack_refuses_with_reason():
    with pytest.raises(SparsecError, match="N=1000 not divisible by block 64"):
        pack("block:64:0.25", torch.zeros(1000, 4096))
    with pytest.raises(SparsecError, match="unknown format 'sparse:3'"):
        pack("sparse:3", torch.zeros(8, 8))
    with pytest.raises(SparsecError, match="2-D floating-point"):
        pack("2:4", torch.zeros(8, 8, dtype=torch.int32))


@pytest.mark.parametrize("spec", ["2:4", "block:16:0.3"])
def test_stacked_rows_are_the_parts_one_after_another(spec, gen):
    """Stacking keeps each part's own packed values (no re-packing: block keeps each part's own
    blocks even where a joint top-k would pick others) and the stacked kernel computes both parts'
    outputs side by side, under the interpreter."""
    from sparsec.codegen import linear, stack_rows

    parts = [pack(spec, torch.randn(n, 64, generator=gen).half()) for n in (48, 32)]
    stacked = stack_rows(parts)
    assert stacked.shape == (80, 64)
    torch.testing.assert_close(stacked.to_dense(), torch.cat([p.to_dense() for p in parts]), atol=0, rtol=0)
    x = torch.randn(3, 64, generator=gen).half()
    y = linear(x, stacked, None, "triton")
    for part, (a, b) in zip(parts, ((0, 48), (48, 80))):
        ref = x.double() @ part.to_dense().double().t()
        # fp16 inputs, fp32 accumulation, one fp16 rounding of the output
        torch.testing.assert_close(y[:, a:b].double(), ref, atol=4e-3 * ref.abs().max().item(), rtol=4e-3)


def test_stacking_is_refused_for_factored_formats_and_mixed_settings(gen):
    from sparsec.codegen import stack_rows

    lowrank = [pack("lowrank:4", torch.randn(16, 32, generator=gen)) for _ in range(2)]
    assert stack_rows(lowrank) is None                       # stacked factors are not one rank-4 factorisation
    mixed = [pack("block:16:0.5", torch.randn(32, 32, generator=gen)), pack("block:16:0.25", torch.randn(32, 32, generator=gen))]
    assert stack_rows(mixed) is None
    assert stack_rows([pack("2:4", torch.randn(8, 32, generator=gen)), pack("2:4", torch.randn(8, 64, generator=gen))]) is None
