"""Second-order statistics the pruning and factoring passes share.

Every pass minimises (or scores by) the layer's output error on the calibration activations X,
which the pipeline keeps only as the Gram matrix G = X^T X. The helpers here turn that Gram into
the float64 forms the passes need: the Gram itself with relative damping (so that solves are
defined when some inputs never vary), its Cholesky factor (the whitening S with S S^T = G), and
the activation norms ||X_j|| that activation-aware scores weight each input column by.

Without calibration statistics the passes fall back to G = I, which turns every
activation-aware method into its weight-only counterpart.
"""

from __future__ import annotations

import torch

from sparsec.sites import SiteStats

__all__ = ["gram", "damped", "damped_cholesky", "activation_norms", "whitening", "diagonal_of", "damped_diagonal"]


def gram(stats: SiteStats | None, K: int) -> torch.Tensor:
    """X^T X in float64 on the CPU or device it was gathered on; identity without statistics."""
    if stats is None or stats.rows == 0:
        return torch.eye(K, dtype=torch.float64)
    G = stats.gram.to(torch.float64)
    if G.shape != (K, K):
        raise ValueError(f"calibration Gram is {tuple(G.shape)}, expected {(K, K)} for this weight")
    return G


def damped(G: torch.Tensor, relative: float) -> torch.Tensor:
    """G + relative * mean(diag G) * I, with zero-variance inputs given a unit diagonal first.

    An input that is zero on every calibration token has a zero row and column in G; giving it a
    unit diagonal keeps the matrix positive definite without letting it pull on anything else.
    """
    G = G.clone()
    diag = torch.diagonal(G)
    diag.copy_(damped_diagonal(diag, relative))
    return G


def damped_diagonal(diag: torch.Tensor, relative: float) -> torch.Tensor:
    """The diagonal ``damped`` gives a Gram with this diagonal."""
    diag = diag.clone()
    dead = diag <= 0
    if bool(dead.any()):
        diag[dead] = 1.0
    scale = float(diag.mean()) if diag.numel() else 1.0
    return diag.add_(relative * (scale if scale > 0 else 1.0))


def diagonal_of(G: torch.Tensor) -> torch.Tensor | None:
    """G's diagonal when G is diagonal, else None.

    A Gram calibrated as uncorrelated (fewer rows than inputs, ``SiteStats.fall_back_to_diagonal``)
    is diagonal, and then every fit the passes make has a closed form that costs O(N K) where the
    general one costs O(N K^2) or more (one 1024 -> 3584 Llama block at 512 rows, 2 CPU cores: the
    approximate step 50.5 s before, 7.9 s after; docs/frontier.md).
    """
    diag = torch.diagonal(G)
    if int(torch.count_nonzero(G)) != int(torch.count_nonzero(diag)):
        return None
    return diag


def damped_cholesky(G: torch.Tensor, relative: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower Cholesky factor of the damped G, the damped G), raising the damping until it factors."""
    for _ in range(8):
        H = damped(G, relative)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            return L, H
        relative = max(relative * 10.0, 1e-8)
    raise ArithmeticError("calibration Gram matrix could not be factored even with damping")


def whitening(stats: SiteStats | None, K: int, relative: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S lower-triangular and S S^T = the damped Gram."""
    G = gram(stats, K)
    diag = diagonal_of(G)
    if diag is not None:
        root = damped_diagonal(diag, relative).sqrt()
        return torch.diag(root), torch.diag(1.0 / root)
    S, _ = damped_cholesky(G, relative)
    eye = torch.eye(K, dtype=S.dtype, device=S.device)
    return S, torch.linalg.solve_triangular(S, eye, upper=False)


def activation_norms(G: torch.Tensor) -> torch.Tensor:
    """||X_j|| for every input column j (the square root of G's diagonal)."""
    return torch.diagonal(G).clamp_min(0.0).sqrt()
