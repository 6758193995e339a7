"""Low-rank factoring: exact rank, Eckart-Young for plain SVD, activation-aware wins at every rank."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of, weight

from sparsec import codegen
from sparsec.formats import LowRank
from sparsec.passes.lowrank import HANDLER
from sparsec.sites import relative_output_error


@pytest.mark.parametrize("method", HANDLER.methods)
def test_reconstruction_has_exactly_the_rank_and_packs_losslessly(method):
    W = weight(96, 64, seed=1)
    st = stats_of(activations(64, 1024, seed=2))
    specs = [LowRank(4), LowRank(16)]
    for spec, approx in zip(specs, HANDLER.approximate(specs, W, st, method=method)):
        assert approx.dtype == torch.float32 and approx.shape == W.shape
        sv = torch.linalg.svdvals(approx.double())
        assert float(sv[spec.rank - 1]) > 1e-3 * float(sv[0])
        assert float(sv[spec.rank :].max()) < 1e-5 * float(sv[0])  # float32 rounding only
        torch.testing.assert_close(codegen.pack(spec, approx).to_dense(), approx, rtol=0, atol=1e-5)


def test_plain_svd_error_is_the_eckart_young_tail():
    W = weight(48, 80, seed=3)
    (approx,) = HANDLER.approximate([LowRank(10)], W, None, method="plain")
    sv = torch.linalg.svdvals(W.double())
    tail = float(sv[10:].pow(2).sum().sqrt())
    assert abs(float((W.double() - approx.double()).norm()) - tail) < 1e-5 * tail


@pytest.mark.parametrize("method", HANDLER.methods)
def test_planted_low_rank_weight_is_recovered(method):
    g = torch.Generator().manual_seed(4)
    W = torch.randn(64, 8, generator=g) @ torch.randn(8, 96, generator=g) / 8
    st = stats_of(activations(96, 1024, seed=5))
    (approx,) = HANDLER.approximate([LowRank(8)], W, st, method=method)
    torch.testing.assert_close(approx, W, rtol=0, atol=1e-5)


def test_activation_aware_beats_plain_svd_at_every_rank_of_the_grid():
    N, K = 96, 160
    W = weight(N, K, seed=6)
    calib = stats_of(activations(K, 4096, seed=7))
    held = stats_of(activations(K, 4096, seed=7, sample_seed=8))
    specs = HANDLER.grid(N, K)
    assert len(specs) >= 4
    aware = HANDLER.approximate(specs, W, calib, method="activation-aware")
    plain = HANDLER.approximate(specs, W, calib, method="plain")
    for spec, a, p in zip(specs, aware, plain):
        for st in (calib, held):
            assert relative_output_error(W, a, st) < 0.9 * relative_output_error(W, p, st), spec


def test_unknown_method_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown low-rank method 'qr'; known: activation-aware, plain"):
        HANDLER.approximate([LowRank(2)], weight(8, 8, seed=0), None, method="qr")


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["tall", "wide"])
@pytest.mark.parametrize("method", HANDLER.methods)
def test_factors_multiply_to_the_reconstruction_balanced_and_representable_in_fp16(method, shape):
    N, K = shape
    W = weight(N, K, seed=6)
    st = stats_of(activations(K, 4096, seed=7) * 30.0)  # large activations: an unbalanced V would sit near underflow
    specs = [LowRank(8), LowRank(24)]
    for spec, approx, (U, V) in zip(specs, HANDLER.approximate(specs, W, st, method=method),
                                    HANDLER.factored(specs, W, st, method=method)):
        assert U.shape == (N, spec.rank) and V.shape == (spec.rank, K) and U.dtype == V.dtype == torch.float32
        torch.testing.assert_close(U.double() @ V.double(), approx.double(), rtol=0, atol=1e-6 * float(approx.abs().max()))
        torch.testing.assert_close(U.norm(dim=0), V.norm(dim=1), rtol=1e-4, atol=0)
        half = U.half().double() @ V.half().double()  # 16-bit factors keep the product to fp16 rounding
        assert float((half - approx.double()).norm() / approx.double().norm()) < 3e-3


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
@pytest.mark.parametrize("rows", [1024, 48], ids=["gram", "too-few-rows-diagonal"])
def test_error_read_off_the_factorisation_is_the_gram_form(shape, rows, monkeypatch):
    import sparsec.passes.lowrank as lowrank

    gram_forms = []
    monkeypatch.setattr(lowrank, "relative_output_error", lambda *a: gram_forms.append(a) or relative_output_error(*a))
    N, K = shape
    W = weight(N, K, seed=11)
    st = stats_of(activations(K, rows, seed=12))
    st.fall_back_to_diagonal()  # only below K rows
    assert st.uncorrelated == (rows < K)
    energy = float(torch.sum((W.double() @ st.gram.double()) * W.double()))
    specs = [LowRank(8), LowRank(24), LowRank(40)]
    approx = HANDLER.approximate(specs, W, st)
    try:
        for a in approx:
            read = HANDLER.output_error(W, a, st, energy)
            direct = relative_output_error(W, a, st, None, energy)
            assert 0.0 < direct < 1.0
            # float64 on both sides; they differ by the float32 rounding of the reconstruction alone
            assert abs(read - direct) <= 1e-7 * direct
        assert not gram_forms  # read off the factorisation, not through the Gram
        # another tensor of the same values, or other statistics: the Gram form itself
        other = stats_of(activations(K, 1024, seed=13))
        assert HANDLER.output_error(W, approx[0], other, energy) == relative_output_error(W, approx[0], other, None, energy)
        copy = approx[0].clone()
        assert HANDLER.output_error(W, copy, st, energy) == relative_output_error(W, copy, st, None, energy)
        # fitted to another weight (recovery fits a target): its error against this one is not the tail
        moved = W + 0.1
        assert HANDLER.output_error(moved, approx[0], st, energy) == relative_output_error(moved, approx[0], st, None, energy)
        assert len(gram_forms) == 3
    finally:
        HANDLER.forget()
