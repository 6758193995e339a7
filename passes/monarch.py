"""Monarch factoring: W[N, K] ~= blockdiag(R) @ P @ blockdiag(L) in the layout of ``formats.Monarch``.

Under that layout (NB blocks, p = K/NB inputs per block, n = N/NB outputs per chunk, r = p/NB),
the (c, b) sub-block of W (output rows c*n.., input columns b*p..) is R_c[:, {t*NB + b}] @
L_b[{c*r + t}, :] over t < r: a rank-r product whose factor entries feed no other sub-block. So a
dense matrix is Monarch exactly when each of its NB x NB sub-blocks has rank at most r (rank 1
when K = NB^2), and the reconstructions returned here are such matrices: codegen recovers the
factors L and R from them by the same per-sub-block SVD, losslessly.

Methods:

- ``projection``: the closed-form Frobenius-optimal projection, a rank-r truncated SVD of every
  sub-block (Dao et al., 2022).
- ``als`` (default): activation-aware refinement of the projection minimising the layer's output
  error ||(W - W_hat) S||_F, S S^T = X^T X (damped by 1% of the mean diagonal). Output chunks are
  independent, but input blocks are coupled through the Gram, so the factors are refit by
  alternating least squares over input blocks: for block b, with the other blocks' factors held,
  the best unconstrained sub-block is M* = M_b + [residual @ G][:, b] G_bb^-1, and the best rank-r
  one is the truncated SVD of M* C_b mapped back by C_b^-1 (C_b C_b^T = G_bb), solved for every
  output chunk at once. Each step is the exact minimiser for its block, so the damped objective
  never increases from the projection it starts at; since the projection minimises the damping
  term alone, the calibration error of the result is never above the projection's.

A fit can be abandoned after any sweep but its last (``abandon``): the planner asks whether a
candidate already fitted and predicted faster is so much more accurate that the rest of the sweeps
could not make this one worth choosing, or whether it is too far over what the layer can carry
(``pipeline.approximate``). Its error then is read off the sweep's own running objective, so that
asking costs no product with the Gram.
"""

from __future__ import annotations

import math

import torch

from sparsec.formats import Monarch
from sparsec.passes.calibrate import damped, damped_diagonal, diagonal_of, gram
from sparsec.passes.onnx_emit import MatMulForm, output_shape, randn
from sparsec.sites import SiteStats

DAMPING = 0.01
SWEEPS = 4
TOLERANCE = 1e-3  # stop sweeping once a sweep improves the objective by less than this fraction


class MonarchHandler:
    family = "monarch"
    methods = ("als", "projection")
    default_method = "als"
    can_abandon = True  # ``approximate(..., abandon=)``: a fit may stop after any sweep but its last

    def grid(self, N: int, K: int) -> list[Monarch]:
        """NB = 4, 8, ... up to sqrt(K) with NB^2 | K and NB | N, storing fewer values than W."""
        specs, nb = [], 4
        while nb * nb <= K:
            spec = Monarch(nb)
            if spec.check(N, K) is None and spec.stored_params(N, K) < N * K:
                specs.append(spec)
            nb *= 2
        return specs

    def tunable(self, spec, approx):
        """Every sub-block's two rank-r factors (recovery's distillation)."""
        from sparsec.passes.tunable import BlockFactored

        return BlockFactored(to_blocks(approx.detach().float(), spec.nblocks), rank_of(spec, approx.shape[1]), from_blocks)

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None,
                    abandon=None):
        """One float32 N x K weight per spec whose every Monarch sub-block has rank <= K/NB^2.

        ``abandon(spec, approx, step=, numerator=) -> bool``, asked during each alternating-least-squares
        fit after every sweep but the last, with the weight so far, the number of sweeps made and
        tr((W - approx) G (W - approx)^T) on the calibration Gram: where it says yes, that spec's entry
        is None (the fit is not finished, and no unfinished fit is returned as if it were)."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown monarch method {method!r}; known: {', '.join(self.methods)}")
        N, K = weight.shape
        W = weight.detach().to(torch.float64)
        G = gram(stats, K).to(W.device) if method == "als" else None
        diag = diagonal_of(G) if G is not None else None
        Gd = damped(G, DAMPING) if G is not None and diag is None else None
        out = []
        for spec in specs:
            why = spec.check(N, K)
            if why:
                raise ValueError(why)
            if diag is not None:
                # input blocks do not interact under a diagonal Gram: the weighted truncation of each
                # sub-block is the optimum alternating least squares would converge to
                scale = damped_diagonal(diag, DAMPING).sqrt().reshape(1, spec.nblocks, 1, K // spec.nblocks)
                blocks = project(to_blocks(W, spec.nblocks) * scale, rank_of(spec, K)) / scale
                out.append(from_blocks(blocks).to(torch.float32))
                continue
            if method == "als":
                # float32 start and sweeps: the same fits to five digits on SmolLM2's layers, in about 60%
                # of the time
                target = to_blocks(W.float(), spec.nblocks)
                ask = None if abandon is None else (
                    lambda sweep, b, numerator, spec=spec: abandon(spec, from_blocks(b), step=sweep, numerator=numerator))
                blocks = refine(target, project(target, rank_of(spec, K)), Gd.float(), rank_of(spec, K),
                                after_sweep=ask, damping=torch.diagonal(Gd) - torch.diagonal(G))
                if blocks is None:
                    out.append(None)
                    continue
            else:
                blocks = project(to_blocks(W, spec.nblocks), rank_of(spec, K))
            out.append(from_blocks(blocks).to(torch.float32))
        return out


def rank_of(spec: Monarch, K: int) -> int:
    return K // (spec.nblocks * spec.nblocks)


def to_blocks(W: torch.Tensor, nb: int) -> torch.Tensor:
    """(NB, NB, n, p) view: [c, b] is the sub-block of output chunk c and input block b."""
    N, K = W.shape
    return W.reshape(nb, N // nb, nb, K // nb).permute(0, 2, 1, 3).contiguous()


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    nb, _, n, p = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(nb * n, nb * p)


def truncate(M: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation of each matrix of a batch: projection on its top-r singular subspace.

    The subspace comes from the symmetric eigendecomposition of the smaller Gram (M^T M or M M^T),
    which is several times faster than a batched SVD of small matrices on CPU; the result is a
    product with an r-dimensional projector, so its rank is at most r exactly.
    """
    n, p = M.shape[-2:]
    if n >= p:
        V = torch.linalg.eigh(M.mT @ M).eigenvectors[..., -r:]
        return (M @ V) @ V.mT
    U = torch.linalg.eigh(M @ M.mT).eigenvectors[..., -r:]
    return U @ (U.mT @ M)


def project(blocks: torch.Tensor, r: int) -> torch.Tensor:
    return truncate(blocks, r)


def refine(target: torch.Tensor, blocks: torch.Tensor, Gd: torch.Tensor, r: int,
           sweeps: int | None = None, tolerance: float | None = None, after_sweep=None,
           damping: torch.Tensor | None = None) -> torch.Tensor | None:
    """Alternating least squares over input blocks on ||(W - W_hat) S||, from ``blocks``; None where
    ``after_sweep(sweep, blocks, numerator)``, asked after every sweep that another would follow,
    says to give up. ``numerator``: the objective less the damping's share (``damping``, the damped
    Gram's diagonal less the Gram's; none given, none taken), tr(D G D^T) for D = W - W_hat."""
    sweeps = SWEEPS if sweeps is None else sweeps
    tolerance = TOLERANCE if tolerance is None else tolerance
    nb, _, n, p = blocks.shape
    blocks = blocks.clone()
    residual = from_blocks(target - blocks)  # (N, K)
    RG = residual @ Gd  # (N, K): kept current as blocks change
    diag_blocks = torch.stack([Gd[b * p : (b + 1) * p, b * p : (b + 1) * p] for b in range(nb)])
    C = torch.linalg.cholesky(diag_blocks.double())  # (NB, p, p), C_b C_b^T = G_bb
    eye = torch.eye(p, dtype=C.dtype, device=C.device).expand(nb, p, p)
    C_inv = torch.linalg.solve_triangular(C, eye, upper=False)
    # G_bb^-1 = C_b^-T C_b^-1 once, so that each step is a product rather than two triangular solves
    G_inv = (C_inv.mT @ C_inv).to(blocks.dtype)
    C, C_inv = C.to(blocks.dtype), C_inv.to(blocks.dtype)
    objective = float(torch.sum(RG * residual, dtype=torch.float64))
    for sweep in range(sweeps):
        if sweep > 0 and after_sweep is not None:
            share = 0.0 if damping is None else float(residual.pow(2).sum(dim=0, dtype=torch.float64) @ damping.double())
            if after_sweep(sweep, blocks, objective - share):
                return None
        for b in range(nb):
            cols = slice(b * p, (b + 1) * p)
            rg_b = RG[:, cols].reshape(nb, n, p)  # per output chunk c
            best = blocks[:, b] + rg_b @ G_inv[b]
            new = truncate(best @ C[b], r) @ C_inv[b]
            delta = (new - blocks[:, b]).reshape(nb * n, p)
            RG -= delta @ Gd[cols, :]
            residual[:, cols] -= delta
            blocks[:, b] = new
        previous, objective = objective, float(torch.sum(RG * residual, dtype=torch.float64))
        if not math.isfinite(objective) or previous - objective <= tolerance * max(previous, 1e-300):
            break
    return blocks


class MonarchOnnx(MatMulForm):
    """Written to ONNX in the layout of ``sparsec.formats.Monarch`` (p = K/NB, n = N/NB, r = p/NB)::

        x [.., K] -Reshape-> [M, NB, p] -Transpose(1,0,2)-> [NB, M, p] -MatMul L^T-> z [NB, M, p]
        z -Reshape-> [NB, M, NB, r] -Transpose(2,1,3,0)-> [NB, M, r, NB] -Reshape-> [NB, M, p]
          -MatMul R^T-> [NB, M, n] -Transpose(1,0,2)-> [M, NB, n] -Reshape-> [.., N]

    The middle Reshape/Transpose/Reshape is the permutation P: chunk c takes z[b, :, c*r + t] at
    position t*NB + b.
    """

    label = "Monarch subgraph (2 batched MatMuls, 3 Transposes, 4 Reshapes)"

    def factors(self, spec, approx, dtype):
        from sparsec.codegen import pack

        t = pack(spec, approx.detach().to(torch.float32)).tensors()
        return {"l_t": t["L"].transpose(1, 2).numpy().astype(dtype), "r_t": t["R"].transpose(1, 2).numpy().astype(dtype)}

    def random(self, spec, N, K, rng, dtype):
        nb = spec.nblocks
        p, n = K // nb, N // nb
        return {"l_t": randn(rng, dtype, nb, p, p), "r_t": randn(rng, dtype, nb, p, n)}

    def emit(self, em, spec, x, out, tensors, N, K, x_shape):
        nb = spec.nblocks
        p = K // nb
        r = p // nb
        xb = em.node("Reshape", [x, em.shape("shape_in", [-1, nb, p])])
        xb = em.node("Transpose", [xb], perm=[1, 0, 2])
        z = em.node("MatMul", [xb, em.const("l_t", tensors["l_t"])])
        z = em.node("Reshape", [z, em.shape("shape_split", [nb, -1, nb, r])])
        z = em.node("Transpose", [z], perm=[2, 1, 3, 0])
        z = em.node("Reshape", [z, em.shape("shape_chunks", [nb, -1, p])])
        y = em.node("MatMul", [z, em.const("r_t", tensors["r_t"])])
        y = em.node("Transpose", [y], perm=[1, 0, 2])
        return em.node("Reshape", [y, output_shape(em, x, N, x_shape)], out)


HANDLER = MonarchHandler()
HANDLER.onnx = MonarchOnnx()
