"""2:4 pruning: exact structure, lossless on planted weights, and SparseGPT < Wanda < magnitude."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of, weight

from sparsec import codegen
from sparsec.formats import TwoFour
from sparsec.passes.twofour import HANDLER, keep_two_of_four
from sparsec.sites import relative_output_error

METHODS = HANDLER.methods


def nonzeros_per_group(W: torch.Tensor) -> torch.Tensor:
    return (W != 0).reshape(W.shape[0], -1, 4).sum(-1)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_two_of_four_and_packs_losslessly(method):
    W = weight(64, 128, seed=1)
    st = stats_of(activations(128, 2048, seed=2))
    (approx,) = HANDLER.approximate([TwoFour()], W, st, method=method)
    assert approx.dtype == torch.float32 and approx.shape == W.shape
    assert bool((nonzeros_per_group(approx) == 2).all())
    # codegen keeps the two largest of each group: exactly these values, bit for bit
    assert torch.equal(codegen.pack(TwoFour(), approx).to_dense(), approx)


@pytest.mark.parametrize("method", METHODS)
def test_planted_two_four_weight_is_returned_unchanged(method):
    W = keep_two_of_four(weight(48, 96, seed=3), torch.rand(48, 96, generator=torch.Generator().manual_seed(4)))
    st = stats_of(activations(96, 1024, seed=5))
    (approx,) = HANDLER.approximate([TwoFour()], W, st, method=method)
    # a zero weight has zero saliency under every score and nothing to compensate
    assert torch.equal(approx, W)


def test_sparsegpt_beats_wanda_beats_magnitude_on_calibration_and_held_out_data():
    N, K = 96, 192
    W = weight(N, K, seed=6)
    calib = stats_of(activations(K, 4096, seed=7))
    held = stats_of(activations(K, 4096, seed=7, sample_seed=8))
    errors = {}
    for method in METHODS:
        (approx,) = HANDLER.approximate([TwoFour()], W, calib, method=method)
        errors[method] = (relative_output_error(W, approx, calib), relative_output_error(W, approx, held))
    for data in (0, 1):
        # margins of 10%: on these inputs the methods differ by far more than sampling noise
        assert errors["sparsegpt"][data] < 0.9 * errors["wanda"][data], errors
        assert errors["wanda"][data] < 0.9 * errors["magnitude"][data], errors


def test_sparsegpt_compensation_helps_but_cannot_beat_the_optimum_for_its_mask():
    N, K = 32, 64
    W = weight(N, K, seed=9)
    X = activations(K, 2048, seed=10).double()
    st = stats_of(X)
    (approx,) = HANDLER.approximate([TwoFour()], W, st)
    mask = approx != 0
    unchanged = W * mask
    optimum = torch.zeros(N, K, dtype=torch.float64)
    for i in range(N):  # least squares over each row's kept inputs, on the activations themselves
        keep = mask[i]
        optimum[i, keep] = torch.linalg.lstsq(X[:, keep], X @ W[i].double()).solution
    e_sparsegpt = relative_output_error(W, approx, st)
    assert e_sparsegpt < 0.8 * relative_output_error(W, unchanged, st)
    # SparseGPT updates only the columns to the right of each pruned one (and is damped)
    e_optimum = relative_output_error(W, optimum, st)
    assert e_sparsegpt >= e_optimum * (1 - 1e-9)
    # the refit of the same mask closes much of that gap; its damping (REFIT_DAMPING, 10%: it holds
    # out better) keeps it off the optimum for the very rows it is fitted to
    (refit,) = HANDLER.approximate([TwoFour()], W, st, method="sparsegpt-refit")
    assert torch.equal(refit != 0, mask)
    e_refit = relative_output_error(W, refit, st)
    assert e_optimum * (1 - 1e-9) <= e_refit < e_sparsegpt
    assert e_refit - e_optimum < 0.5 * (e_sparsegpt - e_optimum)


def test_without_calibration_statistics_every_method_is_magnitude_pruning():
    W = weight(32, 64, seed=11)
    results = [HANDLER.approximate([TwoFour()], W, None, method=m)[0] for m in METHODS]
    # with an identity Hessian the OBS saliency is w^2 and no column update has a coefficient
    for r in results[1:]:
        assert torch.equal(r, results[0])
    assert torch.equal(results[0], keep_two_of_four(W, W.abs()))


def test_inputs_never_seen_in_calibration_are_pruned_to_zero_and_stay_finite():
    X = activations(64, 1024, seed=12)
    X[:, 5] = 0.0
    W = weight(16, 64, seed=13)
    (approx,) = HANDLER.approximate([TwoFour()], W, stats_of(X))
    assert bool(torch.isfinite(approx).all())
    assert bool((approx[:, 5] == 0).all())
    assert bool((nonzeros_per_group(approx) <= 2).all())


def test_unknown_method_and_bad_shape_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown 2:4 method 'obs'; known: sparsegpt, sparsegpt-refit, wanda, magnitude"):
        HANDLER.approximate([TwoFour()], weight(8, 8, seed=0), None, method="obs")
    with pytest.raises(ValueError, match="K divisible by 4, got K=6"):
        HANDLER.approximate([TwoFour()], weight(8, 6, seed=0), None)


def test_grid_is_the_single_two_four_spec():
    assert HANDLER.grid(384, 1536) == [TwoFour()]


def test_the_kept_weights_refit_reaches_the_exact_per_row_solution():
    from sparsec.passes.block import Refit
    from sparsec.passes.block import DAMPING
    from sparsec.passes.twofour import refit_kept, sparsegpt_two_four

    W = weight(48, 128, seed=14)
    st = stats_of(activations(128, 2048, seed=15))
    start = sparsegpt_two_four(W, st.gram)
    exact = Refit(W, st.gram)(start != 0, 1)  # one solve of each row's kept system, damped by DAMPING
    # 64 kept weights a row: conjugate gradients reach the solution in 64 steps, up to rounding
    fitted = refit_kept(W, start, st.gram, damping=DAMPING, steps=128)
    assert torch.equal(fitted != 0, start != 0)
    torch.testing.assert_close(fitted, exact.to(torch.float32), rtol=1e-4, atol=1e-5)
    # the default steps stop short on these badly conditioned inputs, with most of the gain
    e_start, e_exact = relative_output_error(W, start, st), relative_output_error(W, exact, st)
    e_default = relative_output_error(W, refit_kept(W, start, st.gram, damping=DAMPING), st)
    assert e_exact <= e_default * (1 + 1e-9) and e_default - e_exact < 0.1 * (e_start - e_exact)


def test_the_refits_damping_trades_calibration_fit_for_held_out_error_on_few_rows():
    from sparsec.passes.twofour import DAMPING, REFIT_DAMPING, refit_kept, sparsegpt_two_four

    W = weight(64, 128, seed=21)
    calib = stats_of(activations(128, 192, seed=22))   # 1.5 rows per input: the refit can chase them
    held = stats_of(activations(128, 4096, seed=23))   # the same distribution, new inputs
    start = sparsegpt_two_four(W, calib.gram)
    light, pulled = (refit_kept(W, start, calib.gram, damping=d) for d in (DAMPING, REFIT_DAMPING))
    assert relative_output_error(W, light, calib) < relative_output_error(W, pulled, calib)
    assert relative_output_error(W, pulled, held) < relative_output_error(W, light, held)
