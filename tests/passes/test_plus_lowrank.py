"""Sparse plus low-rank: exact on a planted sum, never worse than the sparse part alone, each part
with its format's structure, and the whole path from a forced plan to a packed layer."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of, weight

from sparsec import codegen
from sparsec.formats import Block, BlockPlusLowRank, TwoFourPlusLowRank, parse_spec
from sparsec.passes import plus_lowrank
from sparsec.passes.registry import HANDLERS
from sparsec.sites import relative_output_error

N, K = 64, 128


def planted_sparse(spec, gen: torch.Generator) -> torch.Tensor:
    """A weight with exactly the base format's structure, entries of unit scale."""
    if spec.family == "2:4":
        w = torch.randn(N, K // 4, 4, generator=gen)
        drop = torch.rand(N, K // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
        return w.scatter(2, drop, 0.0).reshape(N, K)
    B = spec.block
    keep = torch.randperm((N // B) * (K // B), generator=gen)[: spec.kept_blocks(N, K)]
    mask = torch.zeros((N // B) * (K // B))
    mask[keep] = 1.0
    mask = mask.reshape(N // B, 1, K // B, 1).expand(N // B, B, K // B, B).reshape(N, K)
    return torch.randn(N, K, generator=gen) * mask


SPECS = [TwoFourPlusLowRank(4), BlockPlusLowRank(4, 16, 0.5)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_planted_sparse_plus_low_rank_weight_is_recovered(spec):
    """The sparse part holds the large entries, the low-rank term is a tenth of their size. The
    alternating fit converges linearly: with uncorrelated inputs to under 1e-3 of the output in its
    40 rounds. With correlated ones far more slowly (SparseGPT's compensation folds much of the
    low-rank term into the kept weights, and the rounds stop once one gains under 2%): for 2:4 the
    joint solve of kept values and coefficients then brings it to 3.8x under what the sparse part
    alone leaves (asserted 3x; 2.3x without it), block 7.4x (asserted 2x). Either way each part keeps
    its format's structure and the composite packs it losslessly."""
    gen = torch.Generator().manual_seed(3)
    sparse = planted_sparse(spec.base, gen)
    low = 0.1 * torch.randn(N, spec.rank, generator=gen) @ torch.randn(spec.rank, K, generator=gen) / spec.rank ** 0.5
    W = sparse + low
    handler = HANDLERS[spec.family]
    white = stats_of(torch.randn(2048, K, generator=gen))
    (approx,) = handler.approximate([spec], W, white)
    assert relative_output_error(W, approx.dense(), white) < 1e-3
    correlated = stats_of(activations(K, 2048, seed=4))
    (approx,) = handler.approximate([spec], W, correlated)
    assert relative_output_error(W, approx.dense(), correlated) < approx.alone / (3 if spec.family == "2:4+lowrank" else 2)
    packed = approx.packed(spec)
    torch.testing.assert_close(packed.to_dense(), approx.dense(), rtol=0, atol=1e-5)
    x = torch.randn(5, K, generator=gen)
    torch.testing.assert_close(codegen.linear(x, packed, impl="reference"), approx.linear(x, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_the_composite_is_never_worse_than_its_sparse_part_alone(spec):
    """On an unstructured weight: the report's sparse-alone error is the base format's own fit,
    and the composite's calibration error is under it (the low-rank term only ever adds)."""
    W = weight(N, K, seed=5)
    st = stats_of(activations(K, 2048, seed=6))
    handler = HANDLERS[spec.family]
    (approx,) = handler.approximate([spec], W, st)
    (alone,) = HANDLERS[spec.base.family].approximate([spec.base], W, st)
    base_error = relative_output_error(W, alone, st)
    assert approx.alone == pytest.approx(base_error, rel=1e-6)
    assert relative_output_error(W, approx.dense(), st) < 0.97 * base_error
    assert handler.describe(approx, st) == {"sparse_alone_error": approx.alone}


def test_later_rounds_lower_the_error_of_the_first_fit():
    """The alternating rounds beat the first fit (sparse, then the rank-R term on its residual)."""
    spec = TwoFourPlusLowRank(8)
    W = weight(N, K, seed=7)
    st = stats_of(activations(K, 2048, seed=8))
    handler = HANDLERS[spec.family]
    (first,) = handler.approximate([spec], W, st, method="residual")
    (alternating,) = handler.approximate([spec], W, st)
    assert relative_output_error(W, alternating.dense(), st) < relative_output_error(W, first.dense(), st)


def test_the_grid_pairs_every_base_setting_with_ranks_under_an_eighth_of_the_width():
    grid = HANDLERS["2:4+lowrank"].grid(1536, 576)
    assert [s.rank for s in grid] == [16, 32, 64]
    block_grid = HANDLERS["block+lowrank"].grid(1536, 576)
    assert {(s.block, s.density) for s in block_grid} == {(b.block, b.density) for b in plus_lowrank.BLOCK_BASES}
    assert all(s.check(1536, 576) is None for s in block_grid)


def test_impossible_composites_are_refused_with_the_reason():
    assert "not below min(N, K)" in TwoFourPlusLowRank(64).check(64, 128)
    assert "not divisible by 4" in TwoFourPlusLowRank(4).check(64, 126)
    assert "not divisible by block 32" in BlockPlusLowRank(4, 32, 0.5).check(48, 128)
    with pytest.raises(ValueError, match="must be 'lowrank:R'"):
        parse_spec("2:4+monarch:4")
    with pytest.raises(ValueError, match="no composite of monarch"):
        parse_spec("monarch:4+lowrank:8")
    assert parse_spec("block:32:0.5+lowrank:8") == BlockPlusLowRank(8, 32, 0.5)
    assert parse_spec("block:32:0.5+lowrank:8").base == Block(32, 0.5)


def test_a_forced_composite_plan_runs_the_packed_parts_and_matches_its_fit():
    """``sparsec.optimize`` with every layer forced to 2:4+lowrank: the rewritten model computes
    what the fitted parts compute, and is more accurate than plain 2:4 on the same calibration."""
    import sparsec

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 128))
    calib = [(activations(128, 256, seed=1, sample_seed=s),) for s in range(4)]
    x = activations(128, 64, seed=1, sample_seed=9)
    errors = {}
    for fmt in ("2:4", "2:4+lowrank:16"):
        result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", error_budget=0.9,
                                  plan={"layers": {"_default": fmt}})
        assert [row["format"] for row in result.report.to_dict()["layers"]] == [fmt, fmt]
        with torch.no_grad():
            ref = model(x)
            errors[fmt] = float((result.module(x) - ref).norm() / ref.norm())
    assert errors["2:4+lowrank:16"] < 0.9 * errors["2:4"]


def test_the_joint_solve_keeps_the_pattern_and_lowers_the_error_of_the_rounds():
    """2:4's last step: for the rounds' pattern and row space, each row's kept values and low-rank
    coefficients solved together; the pattern stays 2:4 and the error falls (real-like weights)."""
    from sparsec.passes import plus_lowrank as pl

    spec = TwoFourPlusLowRank(8)
    W = weight(N, K, seed=11)
    st = stats_of(activations(K, 2048, seed=12))
    handler = HANDLERS[spec.family]
    try:
        handler.joint_solve = False
        (rounds,) = handler.approximate([spec], W, st)
    finally:
        handler.joint_solve = True
    (polished,) = handler.approximate([spec], W, st)
    assert (polished.sparse.reshape(N, K // 4, 4) != 0).sum(-1).max() <= 2
    assert relative_output_error(W, polished.dense(), st) < relative_output_error(W, rounds.dense(), st)
    S, U = pl.joint(W, rounds.sparse, rounds.v, st)
    assert ((S != 0) <= (rounds.sparse != 0)).all() and U.shape == (N, spec.rank)
