"""Calibration activations with the structure trained networks show, for the accuracy-pass tests.

Inputs of real layers are correlated (they live near a lower-dimensional subspace) and their
columns differ in scale by orders of magnitude (a few outlier features dominate). Both matter:
correlation is what SparseGPT's and the least-squares updates exploit, scale spread is what
activation-aware scores exploit. Gaussian i.i.d. inputs have neither, and every method would tie.
"""

from __future__ import annotations

import torch

from sparsec.sites import SiteStats


def activations(K: int, tokens: int, seed: int, *, sample_seed: int | None = None,
                rank_fraction: float = 0.25, outliers: int = 4) -> torch.Tensor:
    """``tokens`` rows of a K-wide activation distribution fixed by ``seed``.

    Rows drawn with another ``sample_seed`` come from the same distribution (held-out data).
    """
    g = torch.Generator().manual_seed(seed)
    r = max(1, int(K * rank_fraction))
    basis = torch.randn(r, K, generator=g) / r ** 0.5
    scale = torch.exp(0.8 * torch.randn(K, generator=g))
    scale[torch.randperm(K, generator=g)[:outliers]] *= 10.0
    s = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed + 7919)
    X = torch.randn(tokens, r, generator=s) @ basis + 0.3 * torch.randn(tokens, K, generator=s)
    return X * scale


def stats_of(X: torch.Tensor) -> SiteStats:
    st = SiteStats.empty(X.shape[1])
    st.add(X)
    return st


def weight(N: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g) / K ** 0.5
