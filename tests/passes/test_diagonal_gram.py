"""Fits under a diagonal Gram (inputs calibrated as uncorrelated) take closed forms: they must give
what the general solves give on the same Gram."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of, weight

from sparsec.formats import Block, LowRank, Monarch, TwoFour
from sparsec.passes import block, lowrank, monarch, twofour
from sparsec.passes.calibrate import diagonal_of
from sparsec.sites import relative_output_error

N, K = 128, 256


def diagonal_and_general(seed: int):
    """Stats calibrated on fewer rows than inputs (a diagonal Gram), and the same Gram with a
    negligible off-diagonal pair, which sends every pass down its general path."""
    diag = stats_of(activations(K, K // 2, seed=seed))
    assert diag.fall_back_to_diagonal()
    general = stats_of(activations(K, K // 2, seed=seed))
    general.gram = diag.gram.clone()
    eps = 1e-10 * float(torch.diagonal(diag.gram).mean())
    general.gram[0, 1] = general.gram[1, 0] = eps
    assert diagonal_of(diag.gram) is not None and diagonal_of(general.gram) is None
    return diag, general


@pytest.mark.parametrize("handler, specs", [
    (twofour.HANDLER, [TwoFour()]),
    (block.HANDLER, [Block(16, 0.25), Block(32, 0.5), Block(16, 0.75)]),
    (lowrank.HANDLER, [LowRank(8), LowRank(48)]),
    (monarch.HANDLER, [Monarch(4), Monarch(8)]),
])
def test_closed_forms_match_the_general_fit(handler, specs):
    diag, general = diagonal_and_general(seed=11)
    W = weight(N, K, seed=12) * torch.exp(torch.randn(K, generator=torch.Generator().manual_seed(13)))
    fast = handler.approximate(specs, W, diag)
    slow = handler.approximate(specs, W, general)
    for spec, a, b in zip(specs, fast, slow):
        assert a.shape == W.shape and a.dtype == torch.float32
        # the general path works through float64 solves of the same system: agreement to float32 rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(W.abs().max()), msg=str(spec))
        error_fast = relative_output_error(W, a, diag)
        assert error_fast == pytest.approx(relative_output_error(W, b, general), rel=1e-4)
        assert 0.0 < error_fast < 1.0


def test_output_error_under_a_diagonal_gram_is_the_weighted_sum_of_squares():
    diag, general = diagonal_and_general(seed=21)
    W, approx = weight(N, K, seed=22), weight(N, K, seed=23)
    d = torch.diagonal(diag.gram)
    expected = (float(((W.double() - approx.double()) ** 2 * d).sum()) / float((W.double() ** 2 * d).sum())) ** 0.5
    assert relative_output_error(W, approx, diag) == pytest.approx(expected, rel=1e-7)
    assert relative_output_error(W, approx, general) == pytest.approx(expected, rel=1e-8)
