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

import torch

from sparsec.formats import LowRank
from sparsec.passes import calibrate
from sparsec.passes.onnx_emit import MatMulForm, randn
from sparsec.sites import SiteStats

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

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None):
        """One dense reconstruction (float32, N x K, exactly rank R) per spec."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown low-rank method {method!r}; known: {', '.join(self.methods)}")
        W = weight.detach().to(torch.float64)
        if method == "plain" or stats is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            return [((U[:, : s.rank] * S[: s.rank]) @ Vh[: s.rank]).float() for s in specs]
        root, inv_root = whitening(stats)
        root, inv_root = root.to(W.device), inv_root.to(W.device)
        U, S, Vh = torch.linalg.svd(W @ root, full_matrices=False)
        out = []
        for s in specs:
            out.append(((U[:, : s.rank] * S[: s.rank]) @ (Vh[: s.rank] @ inv_root)).float())
        return out


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
