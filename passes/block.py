"""Block-sparse pruning: W[N, K] tiled in B x B blocks, exactly ``Block.kept_blocks(N, K)`` kept.

Which blocks survive is decided globally over the whole matrix (not per block row), as the BSR
kernels allow any number of blocks in a row: a layer whose important weights cluster in a few
output rows keeps more blocks there. This is also the rule codegen's packer applies to a weight
that already has the structure (the kept blocks are exactly its nonzero blocks).

Methods:

- ``least-squares`` (default): blocks are scored by their activation-weighted norm
  ||W_blk diag(||X_j||)||_F (the block analogue of Wanda), the top ones are kept, and then the
  kept weights of every output row are refit to the calibration statistics. For the rows of
  block row i, whose kept input columns are J, the output error ||(W - W_hat) X^T|| is minimised
  over W_hat[:, J] in closed form (``Refit``), with G = X^T X damped by 1% of its mean diagonal
  (the same damping as SparseGPT's Hessian): the exact optimum for this mask under the Gram, into
  which the dropped weights' contribution to the outputs is folded. A second mask is scored the
  OBS way, by the output error of dropping each block alone with the rest of its row refit,
  tr(W_blk [H_bb]^-1 W_blk^T) with H = G^-1; it is also refit, and the refit with the lower
  (undamped) calibration error is returned (the activation score wins on most MiniLM layers, the OBS score
  where large blocks cover strongly correlated inputs).
- ``activation``: the same activation-weighted selection, kept weights unchanged.
- ``magnitude``: blocks ranked by ||W_blk||_F, kept weights unchanged (the packer's own rule).
"""

from __future__ import annotations

import numpy as np
import torch

from sparsec.formats import BLOCK_SIZES, Block
from sparsec.passes.calibrate import activation_norms, damped, damped_diagonal, diagonal_of, gram
from sparsec.passes.onnx_emit import MatMulForm
from sparsec.sites import SiteStats

DENSITIES = (0.125, 0.25, 0.5, 0.75)
DAMPING = 0.01


class BlockHandler:
    family = "block"
    methods = ("least-squares", "activation", "magnitude")
    default_method = "least-squares"
    can_abandon = True  # ``approximate(..., abandon=)``: a fit may stop after its first mask's refit

    def grid(self, N: int, K: int) -> list[Block]:
        """Every kernel block size that tiles N x K into at least 2 x 2 blocks, at each kept fraction."""
        specs = []
        for B in BLOCK_SIZES:
            if N % B or K % B or N // B < 2 or K // B < 2:
                continue
            specs.extend(Block(B, d) for d in DENSITIES)
        return specs

    def tunable(self, spec, approx):
        """The kept blocks' values, on the block mask (recovery's distillation)."""
        from sparsec.passes.tunable import Masked

        return Masked(approx)

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None,
                    abandon=None):
        """One float32 N x K weight per spec, nonzero only in exactly its kept blocks.

        ``abandon(spec, approx) -> bool``, asked with the refit of the activation-scored mask before
        the OBS-scored one is made: where it says yes, that spec's entry is None."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown block method {method!r}; known: {', '.join(self.methods)}")
        N, K = weight.shape
        W = weight.detach().to(torch.float32)
        G = gram(stats, K).to(W.device) if method != "magnitude" else None
        refit = self._refit(weight, stats, W, G) if method == "least-squares" else None
        out = []
        for spec in specs:
            why = spec.check(N, K)
            if why:
                raise ValueError(why)
            if method == "magnitude":
                score = W.pow(2)
            else:
                score = (W * activation_norms(G).to(W.dtype)).pow(2)
            keep = kept_block_mask(score, spec.block, spec.kept_blocks(N, K))
            if method == "least-squares":
                by_activation = refit(keep, spec.block)
                if abandon is not None and abandon(spec, by_activation):
                    out.append(None)
                    continue
                by_obs = refit(kept_block_mask(refit.obs_scores(spec.block), 1, spec.kept_blocks(N, K)), spec.block)
                out.append(min(by_activation, by_obs, key=refit.error))
            else:
                out.append(W * expand_mask(keep, spec.block))
        return out


    _last: tuple | None = None

    def forget(self) -> None:
        """Drop the layer's Refit kept for its next spec (its products with the Gram are as large as
        the weight, and larger): called once the planner is done with a layer's candidates."""
        self._last = None

    def _refit(self, weight, stats, W, G) -> "Refit":
        """The layer's Refit, shared by the specs the planner asks for one at a time (its products
        with the Gram and the inverse Gram are the expensive part, and the same for every spec)."""
        gram_now = None if stats is None else stats.gram
        versions = (weight._version, None if stats is None else (gram_now._version, stats.rows))
        last = self._last
        if last is not None and last[0] is weight and last[1] is stats and last[2] is gram_now and last[3] == versions:
            return last[4]
        refit = Refit(W, G)
        self._last = (weight, stats, gram_now, versions, refit)
        return refit


def kept_block_mask(score: torch.Tensor, B: int, kept: int) -> torch.Tensor:
    """(N/B, K/B) boolean mask of the ``kept`` blocks with the largest summed ``score``, over the whole matrix."""
    N, K = score.shape
    nr, nc = N // B, K // B
    block_score = score.reshape(nr, B, nc, B).sum(dim=(1, 3)).reshape(-1)
    mask = torch.zeros(nr * nc, dtype=torch.bool, device=score.device)
    mask[block_score.topk(kept).indices] = True
    return mask.reshape(nr, nc)


def expand_mask(block_mask: torch.Tensor, B: int) -> torch.Tensor:
    return block_mask.repeat_interleave(B, 0).repeat_interleave(B, 1)


class Refit:
    """Least-squares refit of each block row's kept weights to the damped calibration Gram G.

    ``gram`` is X^T X as gathered; the solves use G = gram + damping (ridge towards the original
    weights, for inputs calibration barely saw); ``error`` measures on the gram itself.

    For kept columns J and dropped columns D of a block row, the optimum of
    ||(W - W_hat) S||^2 (S S^T = G) is W_hat[:, J] = W G[:, J] G[J, J]^-1, or equivalently (the
    OBS form, with H = G^-1) W_hat[:, J] = W[:, J] - W[:, D] H[D, D]^-1 H[D, J]. Each row solves
    whichever system is smaller, so no solve is larger than half the inputs. W G and H are
    computed once per layer and shared by every spec.
    """

    def __init__(self, W: torch.Tensor, gram: torch.Tensor, damping: float = DAMPING):
        self.W = W
        self.W64 = W.to(torch.float64)
        self.gram = gram
        # With a diagonal Gram every row's optimum keeps its weights unchanged, H_bb^-1 is the
        # damped diagonal and the error a weighted sum of squares: no solves at all.
        diag = diagonal_of(gram)
        self.diag = None if diag is None else diag.to(torch.float64)
        self.damped_diag = None if diag is None else damped_diagonal(self.diag, damping)
        self.G = damped(gram, damping) if diag is None else None
        self._WG = None
        self._H = None
        self._obs: dict[int, torch.Tensor] = {}

    @property
    def WG(self) -> torch.Tensor:
        if self._WG is None:
            self._WG = self.W64 @ self.G
        return self._WG

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            self._H = torch.cholesky_inverse(torch.linalg.cholesky(self.G))
        return self._H

    def obs_scores(self, B: int) -> torch.Tensor:
        """(N/B, K/B): output error of dropping each block alone, tr(W_blk [H_bb]^-1 W_blk^T)."""
        if B not in self._obs:
            self._obs[B] = self._obs_scores(B)
        return self._obs[B]

    def _obs_scores(self, B: int) -> torch.Tensor:
        N, K = self.W.shape
        nc = K // B
        if self.damped_diag is not None:
            return (self.W64.pow(2) * self.damped_diag).reshape(N // B, B, nc, B).sum(dim=(1, 3))
        H = self.H
        H_bb = torch.stack([H[b * B : (b + 1) * B, b * B : (b + 1) * B] for b in range(nc)])
        Wb = self.W64.reshape(N, nc, B).permute(1, 0, 2)  # [c, row, j]
        per_row = torch.einsum("cnb,cbd,cnd->cn", Wb, torch.linalg.inv(H_bb), Wb)
        return per_row.T.reshape(N // B, B, nc).sum(dim=1)

    def error(self, approx: torch.Tensor) -> float:
        """||(W - approx) X^T||^2 on the calibration activations (undamped Gram)."""
        diff = self.W64 - approx.to(torch.float64)
        if self.diag is not None:
            return float(torch.sum(diff * diff * self.diag))
        return float(torch.sum((diff @ self.gram) * diff))

    def __call__(self, block_mask: torch.Tensor, B: int) -> torch.Tensor:
        W = self.W
        if self.diag is not None:
            return W * expand_mask(block_mask, B)
        N, K = W.shape
        kept = block_mask.to(W.device).repeat_interleave(B, dim=1)  # (N/B, K): each block row's kept inputs
        counts = kept.sum(dim=1)
        W3 = self.W64.reshape(-1, B, K)
        out = torch.zeros_like(W3)
        out[counts == K] = W3[counts == K]
        # Block rows with as many kept inputs solve systems of one size: one batched solve each.
        for count in torch.unique(counts).tolist():
            if count == 0 or count == K:
                continue
            rows = torch.nonzero(counts == count).flatten()
            if count <= K - count:  # W_hat[:, J] = (W G)[:, J] G[J, J]^-1
                J = _true_columns(kept[rows], count)
                WG3 = self.WG.reshape(-1, B, K)
                for part in _chunks(rows.numel(), count):
                    r, j = rows[part], J[part]
                    sol = _spd_solve_batched(self.G[j[:, :, None], j[:, None, :]],
                                             torch.gather(WG3[r], 2, j[:, None, :].expand(-1, B, -1)).transpose(1, 2))
                    out[r] = out[r].scatter(2, j[:, None, :].expand(-1, B, -1), sol.transpose(1, 2))
            else:  # the OBS form, on the dropped inputs D: W_hat[:, J] = W[:, J] - W[:, D] H[D, D]^-1 H[D, J]
                H = self.H
                D = _true_columns(~kept[rows], K - count)
                for part in _chunks(rows.numel(), K - count):
                    r, d = rows[part], D[part]
                    sol = _spd_solve_batched(H[d[:, :, None], d[:, None, :]],
                                             torch.gather(W3[r], 2, d[:, None, :].expand(-1, B, -1)).transpose(1, 2))
                    out[r] = (W3[r] - sol.transpose(1, 2) @ H[d]) * kept[r][:, None, :]
        out = out.reshape(N, K).to(W.dtype)
        _guarantee_nonzero(out, W, block_mask, B)
        return out


SOLVE_BYTES = 256 << 20  # float64 systems solved at once, at most


def _chunks(rows: int, size: int) -> list[slice]:
    """Slices of ``rows`` systems of ``size`` x ``size`` that each fit in ``SOLVE_BYTES``."""
    step = max(1, SOLVE_BYTES // (8 * size * size))
    return [slice(i, i + step) for i in range(0, rows, step)]


def _true_columns(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(rows, count): the column indices where each row of ``mask`` is True (each has ``count``), ascending."""
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]


def _spd_solve_batched(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """A^-1 rhs for a batch of symmetric positive definite A (least squares for any whose
    definiteness rounding broke)."""
    L, info = torch.linalg.cholesky_ex(A)
    sol = torch.cholesky_solve(rhs, L)
    broken = torch.nonzero(info).flatten()
    if broken.numel():
        sol[broken] = torch.linalg.lstsq(A[broken], rhs[broken]).solution
    return sol


def _guarantee_nonzero(out: torch.Tensor, W: torch.Tensor, block_mask: torch.Tensor, B: int) -> None:
    """A kept block the refit happened to zero keeps its original weights, so exactly the kept count stays nonzero."""
    nr, nc = block_mask.shape
    energy = out.reshape(nr, B, nc, B).pow(2).sum(dim=(1, 3))
    for i, j in torch.nonzero(block_mask & (energy == 0)).tolist():
        out[i * B : (i + 1) * B, j * B : (j + 1) * B] = W[i * B : (i + 1) * B, j * B : (j + 1) * B]


class BlockOnnx(MatMulForm):
    """Written to ONNX as the pruned weight in one MatMul, its format in the node's metadata."""

    label = "MatMul on a pruned block initializer (runs dense)"

    def mask(self, spec, N, K, rng):
        B = spec.block
        keep = np.zeros((N // B) * (K // B))
        keep[rng.permutation(keep.size)[: spec.kept_blocks(N, K)]] = 1.0
        return np.repeat(np.repeat(keep.reshape(N // B, K // B), B, axis=0), B, axis=1)

    def note(self, spec):
        return f"{spec}: {spec.block}x{spec.block} blocks of W [N, K], fraction {spec.density:g} kept, the rest zero"


HANDLER = BlockHandler()
HANDLER.onnx = BlockOnnx()
