"""Block-sparse pruning: exact kept-block count, global selection, least-squares optimality."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of, weight

from sparsec import codegen
from sparsec.formats import Block
from sparsec.passes import block as block_pass
from sparsec.passes.block import HANDLER
from sparsec.passes.calibrate import damped
from sparsec.sites import relative_output_error


def block_energy(W: torch.Tensor, B: int) -> torch.Tensor:
    N, K = W.shape
    return W.reshape(N // B, B, K // B, B).pow(2).sum(dim=(1, 3))


@pytest.mark.parametrize("method", HANDLER.methods)
@pytest.mark.parametrize("spec", [Block(16, 0.125), Block(16, 0.75), Block(32, 0.5)])
def test_exactly_the_kept_blocks_are_nonzero_and_pack_losslessly(method, spec):
    W = weight(96, 128, seed=1)
    st = stats_of(activations(128, 2048, seed=2))
    (approx,) = HANDLER.approximate([spec], W, st, method=method)
    assert approx.dtype == torch.float32 and approx.shape == W.shape
    assert int((block_energy(approx, spec.block) > 0).sum()) == spec.kept_blocks(96, 128)
    assert torch.equal(codegen.pack(spec, approx).to_dense(), approx)


def test_planted_block_sparse_weight_is_recovered_by_every_method():
    spec = Block(16, 0.25)
    N, K = 64, 128
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(N // 16 * (K // 16), dtype=torch.bool)
    mask[torch.randperm(mask.numel(), generator=g)[: spec.kept_blocks(N, K)]] = True
    W = weight(N, K, seed=4) * block_pass.expand_mask(mask.reshape(N // 16, K // 16), 16)
    st = stats_of(activations(K, 2048, seed=5))
    for method in HANDLER.methods:
        (approx,) = HANDLER.approximate([spec], W, st, method=method)
        # the refit solves a linear system whose exact answer is W itself: float32 rounding only
        torch.testing.assert_close(approx, W, rtol=0, atol=1e-5)
        assert torch.equal(approx != 0, W != 0)


def test_least_squares_refit_is_the_optimum_for_its_mask():
    """Gradient of ||(W - W_hat) S||^2 (damped Gram) vanishes on every kept weight."""
    W = weight(64, 96, seed=6)
    st = stats_of(activations(96, 2048, seed=7))
    (approx,) = HANDLER.approximate([Block(16, 0.5)], W, st)
    G = damped(st.gram, block_pass.DAMPING)
    grad = (W.double() - approx.double()) @ G
    kept = approx != 0
    scale = float((W.double() @ G).abs().max())
    # float32 result of a float64 solve: gradient zero up to float32 rounding of the weights
    assert float(grad[kept].abs().max()) < 1e-5 * scale
    assert float(grad[~kept].abs().max()) > 1e-3 * scale  # the dropped ones were not free


def test_refit_beats_activation_scores_beats_magnitude():
    N, K = 128, 192
    W = weight(N, K, seed=8)
    calib = stats_of(activations(K, 4096, seed=9))
    held = stats_of(activations(K, 4096, seed=9, sample_seed=10))
    for spec in (Block(16, 0.25), Block(32, 0.5)):
        errs = {m: HANDLER.approximate([spec], W, calib, method=m)[0] for m in HANDLER.methods}
        for st in (calib, held):
            e = {m: relative_output_error(W, a, st) for m, a in errs.items()}
            assert e["least-squares"] < 0.9 * e["activation"] < 0.9 * e["magnitude"], (spec, e)


def test_blocks_are_chosen_over_the_whole_matrix_not_per_block_row():
    N, K, B = 64, 64, 16
    W = weight(N, K, seed=11) * 0.01
    W[:16] *= 100.0  # all the weight in the first block row
    spec = Block(B, 0.25)  # 4 of 16 blocks
    (approx,) = HANDLER.approximate([spec], W, None, method="magnitude")
    per_row = (block_energy(approx, B) > 0).sum(dim=1)
    assert per_row.tolist() == [4, 0, 0, 0]


def test_grid_filters_block_sizes_by_shape():
    assert {s.block for s in HANDLER.grid(384, 1536)} == {16, 32, 64, 128}
    assert {s.block for s in HANDLER.grid(48, 96)} == {16}  # 32 does not divide 48; 64, 128 too large
    assert HANDLER.grid(8, 8) == []
    assert {s.density for s in HANDLER.grid(64, 64)} == {0.125, 0.25, 0.5, 0.75}


def test_unknown_method_and_untileable_spec_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown block method 'random'; known: least-squares, activation, magnitude"):
        HANDLER.approximate([Block(16, 0.5)], weight(32, 32, seed=0), None, method="random")
    with pytest.raises(ValueError, match="N=40 not divisible by block 16"):
        HANDLER.approximate([Block(16, 0.5)], weight(40, 32, seed=0), None)


def test_refit_keeps_the_better_of_activation_and_obs_block_choices():
    """Inputs of the second 128-wide block are a (loud) linear function of the first block's: an
    activation score keeps the loud block, the OBS score sees that it is the one to drop."""
    g = torch.Generator().manual_seed(12)
    X0 = torch.randn(4096, 128, generator=g)
    X1 = 1.5 * X0 @ (torch.randn(128, 64, generator=g) @ torch.randn(64, 128, generator=g) / 64)
    X = torch.cat([X0, X1 + 0.01 * torch.randn(4096, 128, generator=g)], dim=1)
    st = stats_of(X)
    W = weight(128, 256, seed=13)
    spec = Block(128, 0.5)
    (approx,) = HANDLER.approximate([spec], W, st)
    assert (block_energy(approx, 128) > 0).tolist() == [[True, False]]
    refit = block_pass.Refit(W, st.gram.double())
    by_activation = refit(torch.tensor([[False, True]]), 128)
    assert relative_output_error(W, approx, st) < 0.5 * relative_output_error(W, by_activation, st)
    for spec in (Block(16, 0.25), Block(32, 0.5), Block(64, 0.75)):  # never worse than the activation choice
        (approx,) = HANDLER.approximate([spec], W, st)
        norms = st.gram.diagonal().sqrt().float()
        act = refit(block_pass.kept_block_mask((W * norms).pow(2), spec.block, spec.kept_blocks(128, 256)), spec.block)
        assert refit.error(approx) <= refit.error(act) * (1 + 1e-12)


def test_batched_refit_matches_a_solve_per_block_row():
    """Block rows keep different numbers of blocks (selection is global): every row, solved on
    its own in the form the refit picks by size, gives the same weights as the batched solves."""
    from sparsec.passes.calibrate import damped

    N, K, B = 96, 128, 16
    W = weight(N, K, seed=21)
    st = stats_of(activations(K, 2048, seed=22))
    refit = block_pass.Refit(W, st.gram.double())
    g = torch.Generator().manual_seed(23)
    mask = torch.rand(N // B, K // B, generator=g) < torch.linspace(0.05, 0.95, N // B)[:, None]
    mask[0] = False
    mask[1] = True  # a row with nothing kept, one with everything
    mask[2, :2] = True
    got = refit(mask, B).double()
    G = damped(st.gram.double(), block_pass.DAMPING)
    for i in range(N // B):
        rows = slice(i * B, (i + 1) * B)
        J = torch.nonzero(mask[i].repeat_interleave(B)).flatten()
        expected = torch.zeros(B, K, dtype=torch.float64)
        if J.numel():
            expected[:, J] = torch.linalg.solve(G[J[:, None], J], (W[rows].double() @ G)[:, J].T).T
        torch.testing.assert_close(got[rows], expected.float().double(), rtol=1e-5, atol=1e-6)
    assert refit.error(got) < refit.error(W * block_pass.expand_mask(mask, B))


def test_a_layers_refit_serves_its_specs_until_forgotten():
    """The planner asks for a layer's block candidates one spec at a time: they share one Refit,
    which is rebuilt when the statistics change and dropped by ``forget``."""
    W = weight(64, 96, seed=31)
    st = stats_of(activations(96, 2048, seed=32))
    HANDLER.forget()
    (a,) = HANDLER.approximate([Block(16, 0.5)], W, st)
    first = HANDLER._last[-1]
    (b,) = HANDLER.approximate([Block(16, 0.25)], W, st)
    assert HANDLER._last[-1] is first
    st.add(activations(96, 512, seed=33))  # more calibration rows: a new Gram, a new refit
    HANDLER.approximate([Block(16, 0.5)], W, st)
    assert HANDLER._last[-1] is not first
    HANDLER.forget()
    assert HANDLER._last is None
    alone = block_pass.BlockHandler()
    torch.testing.assert_close(alone.approximate([Block(16, 0.25)], W, stats_of(activations(96, 2048, seed=32)))[0], b)


def test_a_fit_abandoned_after_its_activation_mask_returns_none_and_one_kept_is_unchanged():
    N, K = 64, 128
    W = weight(N, K, seed=31)
    st = stats_of(activations(K, 1024, seed=32))
    specs = [Block(16, 0.25), Block(16, 0.5)]
    asked = []

    def abandon(spec, approx):
        asked.append((spec, approx.clone()))
        return spec.density == 0.25

    given = HANDLER.approximate(specs, W, st, abandon=abandon)
    HANDLER.forget()
    plain = HANDLER.approximate(specs, W, st)
    HANDLER.forget()
    assert given[0] is None
    torch.testing.assert_close(given[1], plain[1], rtol=0, atol=0)
    # asked with the activation mask's refit: exactly the kept blocks, no better than what is returned
    spec, first = asked[1]
    nonzero = first.reshape(N // 16, 16, K // 16, 16).abs().sum(dim=(1, 3)) > 0
    assert int(nonzero.sum()) == spec.kept_blocks(N, K)
    assert relative_output_error(W, first, st) >= relative_output_error(W, plain[1], st)
