"""Monarch factoring: the layout's rank structure, lossless planted recovery, ALS beats projection."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of, weight

from sparsec import codegen
from sparsec.codegen.monarch import monarch_reference
from sparsec.formats import Monarch
from sparsec.passes import monarch as monarch_pass
from sparsec.passes.calibrate import damped
from sparsec.passes.monarch import HANDLER
from sparsec.sites import relative_output_error


def sub_block_singular_values(W: torch.Tensor, nb: int) -> torch.Tensor:
    return torch.linalg.svdvals(monarch_pass.to_blocks(W.double(), nb))


def planted(N: int, K: int, nb: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(nb, K // nb, K // nb, generator=g, dtype=torch.float64) / (K // nb) ** 0.5
    R = torch.randn(nb, N // nb, K // nb, generator=g, dtype=torch.float64) / (K // nb) ** 0.5
    return monarch_reference(torch.eye(K, dtype=torch.float64), L, R).t().float()


@pytest.mark.parametrize("method", HANDLER.methods)
@pytest.mark.parametrize("shape,nb", [((64, 64), 4), ((128, 64), 4), ((64, 128), 4), ((64, 256), 8)])
def test_every_sub_block_has_the_layout_rank_and_packs_losslessly(method, shape, nb):
    N, K = shape
    W = weight(N, K, seed=1)
    st = stats_of(activations(K, 1024, seed=2))
    spec = Monarch(nb)
    (approx,) = HANDLER.approximate([spec], W, st, method=method)
    r = K // (nb * nb)
    sv = sub_block_singular_values(approx, nb)
    # beyond rank r only float32 rounding of the stored result remains
    assert float(sv[..., r:].max()) < 1e-5 * float(sv.max())
    torch.testing.assert_close(codegen.pack(spec, approx).to_dense(), approx, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", HANDLER.methods)
def test_planted_monarch_weight_is_recovered(method):
    N, K, nb = 96, 64, 4
    W = planted(N, K, nb, seed=3)
    st = stats_of(activations(K, 1024, seed=4))
    (approx,) = HANDLER.approximate([Monarch(nb)], W, st, method=method)
    torch.testing.assert_close(approx, W, rtol=0, atol=1e-5)  # float32 rounding of an exact fit


def test_projection_is_the_frobenius_optimum_codegen_also_computes():
    W = weight(64, 64, seed=5)
    (approx,) = HANDLER.approximate([Monarch(4)], W, None, method="projection")
    torch.testing.assert_close(approx, codegen.pack(Monarch(4), W).to_dense(), rtol=0, atol=1e-5)


def test_als_beats_projection_on_calibration_and_held_out_data():
    N, K = 128, 256
    W = weight(N, K, seed=6)
    calib = stats_of(activations(K, 4096, seed=7))
    held = stats_of(activations(K, 4096, seed=7, sample_seed=8))
    specs = HANDLER.grid(N, K)
    assert [s.nblocks for s in specs] == [4, 8, 16]
    als = HANDLER.approximate(specs, W, calib, method="als")
    proj = HANDLER.approximate(specs, W, calib, method="projection")
    for spec, a, p in zip(specs, als, proj):
        for st in (calib, held):
            assert relative_output_error(W, a, st) < 0.8 * relative_output_error(W, p, st), spec


def test_each_als_sweep_lowers_the_damped_objective():
    W = weight(64, 64, seed=9).double()
    st = stats_of(activations(64, 1024, seed=10))
    G = damped(st.gram, monarch_pass.DAMPING)
    target = monarch_pass.to_blocks(W, 4)
    start = monarch_pass.project(target, 4)

    def objective(blocks):
        diff = W - monarch_pass.from_blocks(blocks)
        return float(torch.sum((diff @ G) * diff))

    values = [objective(start)]
    for sweeps in (1, 2, 3, 4):
        values.append(objective(monarch_pass.refine(target, start, G, 4, sweeps=sweeps, tolerance=0.0)))
    assert all(b < a for a, b in zip(values, values[1:])), values


def test_grid_keeps_powers_of_two_that_divide_and_store_less():
    assert [s.nblocks for s in HANDLER.grid(1536, 384)] == [4, 8]  # 16^2 does not divide 384
    assert [s.nblocks for s in HANDLER.grid(384, 1536)] == [8, 16]  # monarch:4 would store more than W
    assert [s.nblocks for s in HANDLER.grid(384, 384)] == [4, 8]
    assert HANDLER.grid(30, 64) == []  # no power of two from 4 divides N=30


def test_unknown_method_and_impossible_spec_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown monarch method 'svd'; known: als, projection"):
        HANDLER.approximate([Monarch(4)], weight(16, 16, seed=0), None, method="svd")
    with pytest.raises(ValueError, match="K=40 not divisible by 4x4=16"):
        HANDLER.approximate([Monarch(4)], weight(16, 40, seed=0), None)


def test_a_fit_abandoned_after_a_sweep_returns_none_and_one_kept_is_unchanged():
    N, K = 64, 64
    W = weight(N, K, seed=11)
    st = stats_of(activations(K, 1024, seed=12))
    asked = []

    def abandon(spec, approx, step, numerator):
        asked.append((spec, step, approx.clone(), numerator))
        return spec.nblocks == 8

    given = HANDLER.approximate([Monarch(4), Monarch(8)], W, st, abandon=abandon)
    plain = HANDLER.approximate([Monarch(4), Monarch(8)], W, st)
    assert given[1] is None
    torch.testing.assert_close(given[0], plain[0], rtol=0, atol=0)
    # a fit kept is asked after every sweep but its last, one given up after its first alone
    steps = {nb: [step for s, step, _, _ in asked if s.nblocks == nb] for nb in (4, 8)}
    assert steps[8] == [1]
    assert steps[4] == list(range(1, len(steps[4]) + 1)) and 1 <= len(steps[4]) < monarch_pass.SWEEPS
    energy = float(torch.sum((W.double() @ st.gram) * W.double()))
    errors = []
    for spec, _, approx, numerator in asked:
        # with a weight of the format's structure, and the error's numerator on the undamped Gram
        r = K // (spec.nblocks ** 2)
        sv = sub_block_singular_values(approx, spec.nblocks)
        assert float(sv[..., r:].max()) < 1e-5 * float(sv.max())
        # float32 sweeps keep their objective current incrementally: 1e-4 of it (float64 reference)
        assert numerator == pytest.approx(relative_output_error(W, approx, st) ** 2 * energy, rel=1e-4)
        if spec.nblocks == 4:
            errors.append(relative_output_error(W, approx, st))
    # each sweep lowers the error, and the finished fit is below every unfinished one
    assert errors == sorted(errors, reverse=True)
    assert relative_output_error(W, plain[0], st) < errors[-1]


def test_refine_gives_up_only_when_asked_after_a_sweep_another_would_follow():
    W = weight(64, 64, seed=13)
    st = stats_of(activations(64, 1024, seed=14))
    G = damped(st.gram, monarch_pass.DAMPING).float()
    target = monarch_pass.to_blocks(W, 4)
    start = monarch_pass.project(target, 4)
    sweeps = []
    assert monarch_pass.refine(target, start, G, 4, sweeps=3, tolerance=0.0,
                               after_sweep=lambda s, b, n: sweeps.append(s) or s == 2) is None
    assert sweeps == [1, 2]
    sweeps.clear()
    kept = monarch_pass.refine(target, start, G, 4, sweeps=3, tolerance=0.0,
                               after_sweep=lambda s, b, n: sweeps.append(s) or False)
    assert sweeps == [1, 2]  # never after the last
    torch.testing.assert_close(kept, monarch_pass.refine(target, start, G, 4, sweeps=3, tolerance=0.0), rtol=0, atol=0)
