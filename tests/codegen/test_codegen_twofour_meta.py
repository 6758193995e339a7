"""2:4 metadata layout and the word kernel's byte-permute selector, checked bit by bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsec.codegen import twofour

PAIRS = [(a, b) for a, b in itertools.combinations(range(4), 2)]


def test_positions_sit_at_their_documented_bits():
    """Group 4i + q: first position at bits 2q of byte 2i, second at bits 2q of byte 2i + 1."""
    pos = torch.tensor([[[0, 1], [1, 3], [2, 3], [0, 2], [1, 2]]])   # five groups: a second, partial quad
    meta = twofour.encode_positions(pos)
    assert meta.shape == (1, twofour.meta_cols(5)) == (1, 4)
    first = 0 | 1 << 2 | 2 << 4 | 0 << 6
    second = 1 | 3 << 2 | 3 << 4 | 2 << 6
    assert meta.tolist() == [[first, second, 1, 2]]


@pytest.mark.parametrize("groups", [1, 4, 7, 8, 18, 33])
def test_positions_round_trip(groups, gen):
    pick = torch.randint(0, len(PAIRS), (5, groups), generator=gen)
    pos = torch.tensor(PAIRS)[pick]
    assert torch.equal(twofour.decode_positions(twofour.encode_positions(pos), groups), pos)


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): result byte i is byte (selector nibble i & 7) of b:a."""
    source = (b << 32 | a).to_bytes(8, "little")
    return int.from_bytes(bytes(source[(selector >> 4 * i) & 7] for i in range(4)), "little")


def test_selector_picks_each_groups_two_inputs(gen):
    """The kernel reads a run's metadata word, shifts group e's positions to p0 | p1 << 8 and makes
    the selector (p0 | p1 << 8) * 0x22 + 0x1010; the permute of the group's input words
    (x0, x1), (x2, x3) must give (x[p0], x[p1]). Six words: every position pair in every slot."""
    for k in range(len(PAIRS)):
        pos = torch.tensor([[PAIRS[(e + k) % len(PAIRS)] for e in range(8)]])
        word = int.from_bytes(bytes(twofour.encode_positions(pos)[0].tolist()), "little")
        x = torch.randint(0, 1 << 16, (8, 4), generator=gen).tolist()
        for e in range(8):
            both = (word >> ((e // 4) * 16 + (e % 4) * 2)) & 0x0303
            lo, hi = x[e][0] | x[e][1] << 16, x[e][2] | x[e][3] << 16
            p0, p1 = pos[0, e].tolist()
            assert _prmt(lo, hi, both * 0x22 + 0x1010) == x[e][p0] | x[e][p1] << 16, (k, e, p0, p1)


def test_word_kernel_tries_descriptor_tiles_only_where_descriptors_are_passed():
    """Where the weight can be read through tensor descriptors the autotuner times only those
    tiles (each beat every pointer configuration on a device sweep), else only pointer loads."""
    configs = twofour._WORDS_KERNEL.configs
    for tma in (True, False):
        kept = [c for c in configs if twofour._words_keep(c, {"TMA": tma, "G8": 128, "N": 4096})]
        assert kept and all(c.kwargs["USE_TMA"] == tma for c in kept)
        if tma:
            assert all(4 <= c.kwargs["BLOCK_J"] <= 32 for c in kept)
    # the smallest weight that takes descriptors (8 rows, 8 runs) keeps a tile inside it
    small = [c for c in configs if twofour._words_keep(c, {"TMA": True, "G8": 8, "N": 8})]
    assert small and all(c.kwargs["BLOCK_N"] <= 8 and c.kwargs["BLOCK_J"] <= 8 for c in small)


def test_descriptors_refused_for_weights_smaller_than_a_tile():
    pairs, meta = torch.zeros(8, 64, dtype=torch.int32), torch.zeros(8, 8, dtype=torch.int32)
    x = torch.zeros(1, 256, dtype=torch.int32)
    assert twofour.tma_usable(x, pairs, meta, 8)
    assert not twofour.tma_usable(x, pairs, meta, 4)
    assert not twofour.tma_usable(x, torch.zeros(8, 32, dtype=torch.int32), torch.zeros(8, 4, dtype=torch.int32), 8)


@pytest.mark.parametrize("words", [True, False])
@pytest.mark.parametrize("K", [72, 96])
def test_expansion_kernel_spreads_each_quads_metadata_to_its_groups(words, K, gen, monkeypatch):
    """The expansion + MMA kernel, reading metadata as int32 words of two quads or as bytes, gives
    the product. K = 72: 18 groups, a partial last quad (no int32 view: bytes);
    K = 96: 24 groups, three int32 words; M = 3 and 17 (a partial and a second token tile); rows
    sliced from a taller weight (a row offset into the metadata)."""
    from sparsec.codegen import pack

    monkeypatch.setattr(twofour, "DOT_META_WORDS", words)
    packed = pack("2:4", torch.randn(48, K, generator=gen).to(torch.float16))
    t = packed.tensors()
    dense = packed.to_dense().double()
    for M in (3, 17):
        x = torch.randn(M, K, generator=gen).to(torch.float16)
        for rows in (slice(0, 48), slice(5, 45)):
            ref = x.double() @ dense[rows].t()
            y = twofour.twofour_triton(x, t["values"][rows], t["meta"][rows], None, path="dot")
            # fp16 inputs, fp32 accumulation, one fp16 rounding of the output
            torch.testing.assert_close(y.double(), ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3)


@pytest.mark.parametrize("swap", [True, False], ids=["weight-first", "tokens-first"])
def test_every_small_m_expansion_config_computes_the_product_in_either_orientation(swap, gen):
    """The small-M configurations of the expansion + MMA kernel, each run alone, in both
    orientations of the MMA (``SWAP``: Y^T = W X^T), at a partial token tile and a full one."""
    from sparsec.codegen import pack

    configs = [c for c in twofour._KERNEL.configs
               if c.kwargs["BLOCK_M"] == 16 and bool(c.kwargs.get("SWAP", False)) == swap]
    assert configs
    K = 256
    packed = pack("2:4", torch.randn(136, K, generator=gen).to(torch.float16))
    t = packed.tensors()
    dense = packed.to_dense().double()
    for config in configs:
        with twofour._KERNEL.only(config):
            for M in (5, 16):
                x = torch.randn(M, K, generator=gen).to(torch.float16)
                ref = x.double() @ dense.t()
                y = twofour.twofour_triton(x, t["values"], t["meta"], None, path="dot")
                torch.testing.assert_close(y.double(), ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3,
                                           msg=lambda m: f"{config}: {m}")
