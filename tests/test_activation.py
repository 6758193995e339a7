"""Calibrated thresholds and the predicted error of activation sparsity (sparsec/activation.py)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsec.activation import Magnitudes, Thresholded, normal_threshold, predicted_error
from sparsec.sites import SiteStats, output_energy


def llm_like(rows: int, K: int, gen) -> torch.Tensor:
    """Heavy-tailed inputs whose channels differ in scale by orders of magnitude, as in an LLM."""
    scale = torch.exp(torch.randn(K, generator=gen) * 1.5)
    return torch.distributions.StudentT(3.0).sample((rows, K)) * scale


@pytest.mark.parametrize("skip", [0.25, 0.4, 0.5, 0.7])
def test_threshold_skips_the_asked_fraction_of_calibration_inputs(skip):
    gen = torch.Generator().manual_seed(int(skip * 100))
    torch.manual_seed(int(skip * 100))
    x = llm_like(2048, 384, gen)
    hist = Magnitudes.empty(384)
    for part in x.split(500):
        hist.add(part)
    t = hist.threshold(skip)
    realised = float((x.abs() < t).double().mean())
    assert abs(realised - skip) < 0.02
    assert abs(hist.skipped_fraction(t) - skip) < 1e-6 + 0.001


def test_exact_zeros_are_under_every_threshold():
    x = torch.relu(torch.randn(512, 64))
    hist = Magnitudes.empty(64)
    hist.add(x)
    t = hist.threshold(0.3)  # inside the zeros' mass
    assert 0.0 < t < 2.0 ** -16
    assert float((x.abs() < t).double().mean()) == pytest.approx(float((x == 0).double().mean()))
    assert float(hist.dropped_energy(t).sum()) == 0.0


def test_predicted_error_follows_the_measured_one():
    """Uncorrelated inputs: the prediction (dropped energy through the weight's columns) is the
    expected error; measured on 4096 rows it is within 5%."""
    torch.manual_seed(3)
    N, K = 128, 256
    x = llm_like(4096, K, torch.Generator().manual_seed(3))
    w = torch.randn(N, K) / K ** 0.5
    st = SiteStats.empty(K)
    st.add(x)
    energy = output_energy(w, st)
    for skip in (0.3, 0.5, 0.7):
        t = st.magnitudes.threshold(skip)
        ref = x.double() @ w.double().t()
        got = Thresholded(w.double(), t).linear(x.double(), None)
        measured = float((got - ref).norm() / ref.norm())
        assert predicted_error(w, st.magnitudes, t, energy) == pytest.approx(measured, rel=0.05)


def test_normal_threshold():
    assert normal_threshold(0.5) == pytest.approx(0.6744897, rel=1e-6)
    assert math.isclose(float(torch.erf(torch.tensor(normal_threshold(0.4) / 2 ** 0.5))), 0.4, rel_tol=1e-6)


def test_masking_compares_in_float32_as_the_kernel_does():
    """A threshold between two bfloat16 neighbours: rounded to bfloat16 it would fall on the lower
    one and keep both; compared in float32 (the kernel's way) the lower one is skipped."""
    from sparsec.activation import masked

    x = torch.tensor([0.5977, 0.6016], dtype=torch.bfloat16)
    t = 0.599
    assert torch.equal(masked(x, t) != 0, x.float() >= t)
    assert masked(x, t)[0] == 0 and masked(x, t)[1] != 0
