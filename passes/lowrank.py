"""Low-rank factoring: W (N x K) ~= U (N x R) @ V (R x K).

The default is activation-aware truncated SVD (as in SVD-LLM): the weight is whitened by the
Cholesky factor S of the calibration Gram matrix (X^T X = S S^T), so that truncating the SVD of
W S minimises the layer's output error on the calibration activations, not the weight error.
Plain SVD of W is kept as the baseline it must beat.

The Gram is damped by a small fraction of its mean diagonal before factoring (``DAMPING``): the
calibration tokens rarely span every input direction, and without damping the inverse whitening
S^-1 would amplify the truncation error along directions calibration never saw, which is the
error held-out inputs then pay.
"""

from __future__ import annotations

import math

import torch

from sparsec.formats import LowRank
from sparsec.passes import calibrate
from sparsec.passes.onnx_emit import MatMulForm, randn
from sparsec.sites import SiteStats, relative_output_error

DAMPING = 0.01  # relative to the mean diagonal, as the other passes


class LowRankHandler:
    family = "lowrank"
    shares_work_across_specs = True  # one SVD serves every rank of the grid
    methods = ("activation-aware", "plain")
    default_method = "activation-aware"

    def grid(self, N: int, K: int) -> list[LowRank]:
        """Ranks worth trying: powers of two and their 1.5x midpoints that store fewer values than W."""
        limit = (N * K) / float(N + K)
        ranks, r = [], 8
        while r < limit:
            ranks.append(r)
            half = r + r // 2
            if half < limit and half < 2 * r:
                ranks.append(half)
            r *= 2
        return [LowRank(rank) for rank in sorted(set(ranks)) if rank < min(N, K)]

    def tunable(self, spec, approx):
        """The two factors (recovery's distillation)."""
        from sparsec.passes.tunable import Factored

        return Factored(approx, spec.rank)

    def __init__(self) -> None:
        # per reconstruction ``approximate`` returned for the layer at hand: (it, the weight and the
        # statistics it was fitted to, the numerator of its error on them)
        self._numerators: dict[int, tuple[torch.Tensor, torch.Tensor, SiteStats, float]] = {}

    def forget(self) -> None:
        self._numerators.clear()

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None):
        """One dense reconstruction (float32, N x K, exactly rank R) per spec."""
        self._numerators = {}  # a caller that never calls ``forget`` holds one call's reconstructions at most
        factors, tails, damping = self._factors(specs, weight, stats, method, with_tails=True)
        W = weight.detach().to(device=damping.device, dtype=torch.float64) if damping is not None else None
        out = []
        for (u, v), tail in zip(factors, tails):
            w_hat = (u @ v).float()
            if damping is not None:
                # ||D S||^2 = tr(D G D^T) + sum_j damping_j ||D_j||^2, S S^T the damped Gram, D = W - w_hat
                D = W - w_hat.to(damping.device)
                self._numerators[id(w_hat)] = (w_hat, weight, stats, tail - float(D.pow(2).sum(dim=0) @ damping))
            out.append(w_hat)
        return out

    def output_error(self, weight: torch.Tensor, approx: torch.Tensor, stats: SiteStats, energy: float) -> float:
        """``relative_output_error``, its numerator tr(D G D^T) (D = W - approx) read off the
        factorisation where ``approximate`` just made this reconstruction from this very weight and
        statistics: the whitened truncation's tail less the damping's share, O(N K) where the product
        with the Gram is O(N K^2)."""
        memo = self._numerators.get(id(approx))
        if memo is None or memo[0] is not approx or memo[1] is not weight or memo[2] is not stats:
            return relative_output_error(weight, approx, stats, None, energy)
        if energy <= 0.0:
            return 0.0 if memo[3] <= 0.0 else math.inf
        return math.sqrt(max(memo[3], 0.0) / energy)

    def factored(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None):
        """Per spec, the factors (U (N x R), V (R x K), float32) of ``approximate``'s reconstruction,
        straight from the singular basis (no decomposition of the N x K product), each column of U
        and row of V scaled to equal norms so that neither underflows in 16 bits."""
        return [(u.float(), v.float()) for u, v in self._factors(specs, weight, stats, method)]

    def _factors(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None,
                 with_tails: bool = False):
        """``factored``'s factors in float64; ``with_tails``: (them, per spec the squared norm of what
        the truncation left of the whitened weight, the damped Gram less the Gram as a vector (its
        diagonal), or None where the weight was not whitened by the Gram)."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown low-rank method {method!r}; known: {', '.join(self.methods)}")
        W = weight.detach().to(torch.float64)
        damping = None  # the whitened Gram less the Gram: a diagonal
        if method == "plain" or stats is None:
            A, unwhiten = W, None
        else:
            G = calibrate.gram(stats, W.shape[1])
            diag = calibrate.diagonal_of(G)
            if diag is not None:  # whitening by a diagonal is a column scaling
                damped = calibrate.damped_diagonal(diag, DAMPING)
                root = damped.sqrt().to(W.device)
                damping = (damped - diag).to(W.device)
                A = W * root

                def unwhiten(v):
                    return v / root
            else:
                root, H = calibrate.damped_cholesky(G, DAMPING)
                root = root.to(W.device)
                damping = (torch.diagonal(H) - torch.diagonal(G)).to(W.device)
                A = W @ root

                def unwhiten(v):  # v S^-1, by a triangular solve (R K^2, where S^-1 itself costs K^3)
                    return torch.linalg.solve_triangular(root, v, upper=False, left=False)
        if not specs:
            return ([], [], damping) if with_tails else []
        # every rank's factors are the trailing columns / rows of the largest rank's: made (and
        # unwhitened, a K x K product) once for the whole chain
        U_all, V_all = truncated_factors(A, top_basis(A), max(spec.rank for spec in specs))
        tails = None
        if with_tails:
            # ||A - A_R||^2 = ||A||^2 - ||A_R||^2 (an orthogonal projection), A_R's energy that of the
            # factor on the larger side, taken before unwhitening
            kept = (V_all if A.shape[0] <= A.shape[1] else U_all.T).pow(2).sum(dim=1)
            whole = float(A.pow(2).sum())
            tails = [whole - float(kept[-spec.rank:].sum()) for spec in specs]
        if unwhiten is not None:
            V_all = unwhiten(V_all)
        factors = [balanced(U_all[:, -spec.rank:], V_all[-spec.rank:]) for spec in specs]
        return (factors, tails, damping) if with_tails else factors


def top_basis(A: torch.Tensor) -> torch.Tensor:
    """Singular vectors of A on its smaller side, in ascending order of singular value.

    From the symmetric eigendecomposition of the smaller Gram (A A^T or A^T A), in A's float64: one
    eigendecomposition of min(N, K) square instead of an SVD of the whole N x K. Squaring loses the
    singular values below about 1e-8 of the largest, far under any rank the grid offers.
    """
    N, K = A.shape
    return torch.linalg.eigh(A @ A.T if N <= K else A.T @ A).eigenvectors


def truncated_factors(A: torch.Tensor, basis: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V the best rank-``rank`` approximation of A: its projection on the top singular
    subspace (``basis`` from ``top_basis``), factored on A's smaller side."""
    top = basis[:, -rank:]
    if A.shape[0] <= A.shape[1]:
        return top, top.T @ A
    return A @ top, top.T


def balanced(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U D^-1, D V), D making each column of U as long as the matching row of V."""
    scale = (U.norm(dim=0) / V.norm(dim=1).clamp_min(1e-300)).clamp_min(1e-300).sqrt()
    return U / scale, V * scale[:, None]


def whitening(stats: SiteStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S^-1) with S lower-triangular and S S^T = X^T X + damping."""
    K = int(stats.gram.shape[0])
    return calibrate.whitening(stats, K, DAMPING)


class LowRankOnnx(MatMulForm):
    """Written to ONNX as two MatMuls, x @ V^T [K, R] then @ U^T [R, N]."""

    label = "two MatMuls"

    def factors(self, spec, approx, dtype):
        from sparsec.passes.onnx_emit import lowrank_factors

        u, v = lowrank_factors(approx, spec.rank)
        return {"v_kr": v.T.numpy().astype(dtype), "u_rn": u.T.numpy().astype(dtype)}

    def random(self, spec, N, K, rng, dtype):
        return {"v_kr": randn(rng, dtype, K, spec.rank), "u_rn": randn(rng, dtype, spec.rank, N)}

    def emit(self, em, spec, x, out, tensors, N, K, x_shape):
        h = em.node("MatMul", [x, em.const("v_t", tensors["v_kr"])])
        return em.node("MatMul", [h, em.const("u_t", tensors["u_rn"])], out)


HANDLER = LowRankHandler()
HANDLER.onnx = LowRankOnnx()
