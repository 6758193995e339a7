"""Sparse plus low-rank: W ~= S + U V, S in 2:4 or block-sparse form and U V of rank R
(``2:4+lowrank:R``, ``block:B:D+lowrank:R``).

A sparse pattern drops what it cannot hold; a small rank-R term fitted to that residual, weighted
by the calibration activations (whitened as the low-rank pass fits, EoRA's idea), buys much of it
back for R (N + K) more stored values. The two parts are fitted in turn: S is the base format's
own activation-aware fit (SparseGPT, the block refit) to W - U V, then U V the whitened best
rank-R fit to W - S, which is exact for that S. Rounds follow the first fit while they pay
(``MIN_GAIN``), and the round with the lowest calibration error is kept. For 2:4 a last step
solves each row's kept values and low-rank coefficients together (``joint``). On SmolLM2-135M's layers (4096 calibration
rows, held-out relative output error, docs/accuracy.md) 2:4 alone gives 0.21 on a gate
projection; the first fit with rank 32 0.195 and four more rounds 0.172.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.formats import Block, BlockPlusLowRank, PlusLowRank, TwoFour, TwoFourPlusLowRank
from sparsec.passes import block, calibrate, lowrank, twofour
from sparsec.passes.onnx_emit import MatMulForm
from sparsec.sites import SiteStats, relative_output_error

# Rounds after the first fit stop once one lowers the layer's calibration error by under MIN_GAIN
# (real layers: 3-5 rounds), at MAX_ROUNDS, or when the fit is exact (a weight that is a sparse and
# a low-rank matrix summed: the error falls by about a quarter a round until it is).
MIN_GAIN = 0.02
MAX_ROUNDS = 40
EXACT = 1e-6
# After the rounds, 2:4's composite solves each row's kept values and low-rank coefficients
# together (``joint``): on SmolLM2's layers one such solve lowered the held-out error by 6-8%
# more (0.172 -> 0.161 on a gate projection at rank 32), a second by nothing. Each row's system
# is m = K/2 + R wide, N of them cost N m^3 / 3 flops: the solve runs where that is at most
# JOINT_FLOPS (a 1536 x 576 gate projection at rank 32: 1.7e10, 2.3 s on 2 CPU cores; a 576 x 1536
# down projection: 9.8e10, 6 s, left out there; a Llama-3-8B 14336 x 4096 one, 4.9e13, everywhere).
JOINT_FLOPS = {"cpu": 3e10, "cuda": 3e12}
JOINT_BYTES = 32 << 20  # float64 systems held at once (1536 x 576: 1.5 s at 32 MB, 2.8 s at 256 MB on 2 cores)
BLOCK_BASES = tuple(Block(b, d) for b in (32, 64) for d in (0.25, 0.5))  # what block+lowrank tries


class SparsePlusLowRank:
    """The approximation a composite candidate stands for: a sparse weight and the factors of its
    low-rank term, kept apart so that codegen packs each part losslessly."""

    __slots__ = ("sparse", "u", "v", "alone")

    def __init__(self, sparse: torch.Tensor, u: torch.Tensor, v: torch.Tensor, alone: float | None = None):
        self.sparse, self.u, self.v = sparse, u, v
        self.alone = alone  # the calibration error of the base format's own fit, without the low-rank term

    def to(self, *args, **kwargs) -> "SparsePlusLowRank":
        return SparsePlusLowRank(*(t.to(*args, **kwargs) for t in (self.sparse, self.u, self.v)), self.alone)

    @property
    def shape(self):
        return self.sparse.shape

    @property
    def device(self):
        return self.sparse.device

    @property
    def dtype(self):
        return self.sparse.dtype

    def numel(self) -> int:
        return self.sparse.numel() + self.u.numel() + self.v.numel()

    def element_size(self) -> int:
        return self.sparse.element_size()

    def dense(self) -> torch.Tensor:
        """S + U V as one weight, in the parts' dtype."""
        product = self.u.to(torch.float32) @ self.v.to(torch.float32)
        return (self.sparse.to(torch.float32) + product).to(self.sparse.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        low = (x @ self.v.to(x.dtype).t()) @ self.u.to(x.dtype).t()
        return F.linear(x, self.sparse.to(x.dtype), bias) + low

    def packed(self, spec: PlusLowRank):
        """The codegen weight: the sparse part packed in the base format, the factors as they are."""
        from sparsec.codegen import Packed, pack

        base = pack(spec.base, self.sparse)
        return Packed.from_tensors(spec, tuple(self.sparse.shape), {**base.tensors(), "u": self.u, "v": self.v})


class PlusLowRankHandler:
    """The pass for one composite family: its base format's handler, and the low-rank fit."""

    methods = ("alternating", "residual")  # residual: the first fit only (sparse, then the rank-R term)
    default_method = "alternating"
    shares_work_across_specs = True  # the first sparse fit and the whitening serve every rank

    def __init__(self, spec_cls: type[PlusLowRank], base_handler, bases, joint_solve: bool = False):
        self.family = spec_cls.family
        self.spec_cls = spec_cls
        self.base_handler = base_handler
        self.joint_solve = joint_solve  # each row of the sparse part keeps the same count of values
        self._bases = bases  # (N, K) -> the base settings the grid pairs with ranks

    def grid(self, N: int, K: int) -> list[PlusLowRank]:
        """Ranks from min(N, K)/64 (at least 8) to min(N, K)/8, powers of two, on each base setting."""
        low, high = max(8, min(N, K) / 64), min(N, K) / 8
        ranks, r = [], 8
        while r <= high:
            if r >= low:
                ranks.append(r)
            r *= 2
        out = []
        for base in self._bases(N, K):
            if base.check(N, K) is None:
                out.extend(self.spec_cls.of(base, r) for r in ranks)
        return out

    def forget(self) -> None:
        getattr(self.base_handler, "forget", lambda: None)()

    def tunable(self, spec, approx):
        """The sparse part's kept values and the low-rank factors (recovery's distillation)."""
        from sparsec.passes.tunable import SparsePlusFactors

        return SparsePlusFactors(approx)

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None):
        """One ``SparsePlusLowRank`` (float32) per spec."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown {self.family} method {method!r}; known: {', '.join(self.methods)}")
        if not specs:
            return []
        W = weight.detach().to(torch.float32)
        N, K = W.shape
        whiten = _Whitening(stats, K, W.device)
        firsts: dict[str, tuple[torch.Tensor, float | None]] = {}
        out = []
        for spec in specs:
            why = spec.check(N, K)
            if why:
                raise ValueError(why)
            key = str(spec.base)
            if key not in firsts:
                first = self._sparse(spec.base, W, stats)
                firsts[key] = (first, None if stats is None else relative_output_error(W, first, stats))
            sparse, alone = firsts[key]
            u, v = whiten.fit(W - sparse, spec.rank)
            best = (self._error(W, sparse, u, v, stats), sparse, u, v)
            for _ in range(MAX_ROUNDS if method == "alternating" else 0):
                if best[0] <= EXACT:
                    break
                sparse = self._sparse(spec.base, W - u @ v, stats)
                u, v = whiten.fit(W - sparse, spec.rank)
                error = self._error(W, sparse, u, v, stats)
                gained = error < best[0] * (1.0 - MIN_GAIN)
                if error < best[0]:
                    best = (error, sparse, u, v)
                if not gained:
                    break
            if method == "alternating" and self.joint_solve and _joint_affordable(W, spec, stats):
                sparse, _ = joint(W, best[1], best[3], stats)
                u, v = whiten.fit(W - sparse, spec.rank)
                error = self._error(W, sparse, u, v, stats)
                if error < best[0]:
                    best = (error, sparse, u, v)
            out.append(SparsePlusLowRank(*best[1:], alone))
        return out

    def describe(self, approx: SparsePlusLowRank, stats: SiteStats | None) -> dict:
        """What the report shows for the layer: the error its sparse part had alone (the base
        format's own fit), which the low-rank term and the rounds after it brought down."""
        return {"sparse_alone_error": approx.alone}

    def _sparse(self, base, target: torch.Tensor, stats) -> torch.Tensor:
        self.forget()  # a refit kept for another target would be reused for this one
        (sparse,) = self.base_handler.approximate([base], target, stats)
        return sparse.to(torch.float32)

    @staticmethod
    def _error(W, sparse, u, v, stats) -> float:
        if stats is None:
            return float(torch.linalg.matrix_norm(W - sparse - u @ v))
        return relative_output_error(W, sparse + u @ v, stats)


def _joint_affordable(W: torch.Tensor, spec, stats) -> bool:
    if stats is None or stats.uncorrelated or calibrate.diagonal_of(calibrate.gram(stats, W.shape[1])) is not None:
        return False
    N, K = W.shape
    m = K // 2 + spec.rank
    return N * m ** 3 / 3 <= JOINT_FLOPS["cuda" if W.is_cuda else "cpu"]


def joint(W: torch.Tensor, sparse: torch.Tensor, v: torch.Tensor, stats: SiteStats) -> tuple[torch.Tensor, torch.Tensor]:
    """For the sparse part's pattern and the low-rank row space V fixed: every row's kept values s and
    low-rank coefficients u at once, the least-squares optimum of ||(w - s - u V) X^T|| (damped Gram,
    as every fit). A row's design is its kept inputs and V's rows; every row keeps K/2 values (2:4).
    Returns (S, U)."""
    N, K = W.shape
    R = v.shape[0]
    G = calibrate.damped(calibrate.gram(stats, K).to(device=W.device, dtype=torch.float64), lowrank.DAMPING)
    kept = sparse != 0
    counts = kept.sum(dim=1)
    width = int(counts.max())
    # rows with fewer kept values (weights already zero) pad with an input of theirs whose value is
    # pinned to zero by a unit row: the system stays square and that value solves to the target's zero
    order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]
    V = v.to(torch.float64)
    GV = G @ V.T
    VGV = V @ GV
    WG = W.to(torch.float64) @ G
    WGV = WG @ V.T
    S = torch.zeros(N, K, dtype=torch.float64, device=W.device)
    U = torch.zeros(N, R, dtype=torch.float64, device=W.device)
    rows = max(1, JOINT_BYTES // (8 * (width + R) ** 2))
    for a in range(0, N, rows):
        idx = order[a:a + rows]
        real = kept[a:a + rows].gather(1, idx)
        c, m = idx.shape[0], width + R
        A = torch.empty(c, m, m, dtype=torch.float64, device=W.device)
        A[:, :width, :width] = G[idx[:, :, None], idx[:, None, :]]
        A[:, :width, width:] = GV[idx]
        A[:, width:, :width] = GV[idx].transpose(1, 2)
        A[:, width:, width:] = VGV
        b = torch.cat([WG[a:a + rows].gather(1, idx), WGV[a:a + rows]], dim=1)
        pad = ~real
        if bool(pad.any()):
            rows, cols = pad.nonzero(as_tuple=True)
            A[rows, cols, :] = 0.0
            A[rows, :, cols] = 0.0
            A[rows, cols, cols] = 1.0
            b[rows, cols] = 0.0
        z = torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)
        S[a:a + rows].scatter_(1, idx, z[:, :width] * real)
        U[a:a + rows] = z[:, width:]
    return S.to(torch.float32), U.to(torch.float32)


class _Whitening:
    """The best rank-R fit of a residual E in the calibration metric ||E X^T||: the truncated SVD of
    E S (S S^T the damped Gram), mapped back by S^-1; plain SVD without statistics."""

    def __init__(self, stats: SiteStats | None, K: int, device):
        self.root = self.inv = self.scale = None
        if stats is None:
            return
        G = calibrate.gram(stats, K)
        diag = calibrate.diagonal_of(G)
        if diag is not None:  # too few rows: the Gram's diagonal only, a column scaling
            self.scale = calibrate.damped_diagonal(diag, lowrank.DAMPING).sqrt().to(device)
        else:
            root, inv = lowrank.whitening(stats)
            self.root, self.inv = root.to(device), inv.to(device)

    def fit(self, E: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        A = E.to(torch.float64)
        if self.scale is not None:
            A = A * self.scale
        elif self.root is not None:
            A = A @ self.root
        top = lowrank.top_basis(A)[:, -rank:]
        if A.shape[0] <= A.shape[1]:
            u, v = top, top.T @ A
        else:
            u, v = A @ top, top.T
        if self.scale is not None:
            v = v / self.scale
        elif self.inv is not None:
            v = v @ self.inv
        return _balanced(u, v)


def _balanced(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank's column of U and row of V of equal norm (neither factor's
    range then grows with the weight's scale, which 16-bit storage needs)."""
    nu, nv = u.norm(dim=0), v.norm(dim=1)
    s = torch.where((nu > 0) & (nv > 0), (nv / nu.clamp_min(1e-300)).sqrt(), torch.ones_like(nu))
    return (u * s).to(torch.float32).contiguous(), (v / s[:, None]).to(torch.float32).contiguous()


class PlusLowRankOnnx(MatMulForm):
    """Written to ONNX as the base format's form and two MatMuls, added."""

    def __init__(self, base_form):
        self.base_form = base_form
        self.label = f"{base_form.label} + two MatMuls"

    def factors(self, spec, approx, dtype):
        sparse = self.base_form.factors(spec.base, approx.sparse, dtype)
        return {**{f"base_{k}": v for k, v in sparse.items()},
                "v_kr": approx.v.detach().to(torch.float32).T.numpy().astype(dtype),
                "u_rn": approx.u.detach().to(torch.float32).T.numpy().astype(dtype)}

    def random(self, spec, N, K, rng, dtype):
        from sparsec.passes.onnx_emit import randn

        sparse = self.base_form.random(spec.base, N, K, rng, dtype)
        return {**{f"base_{k}": v for k, v in sparse.items()},
                "v_kr": randn(rng, dtype, K, spec.rank), "u_rn": randn(rng, dtype, spec.rank, N)}

    def emit(self, em, spec, x, out, tensors, N, K, x_shape):
        base = {k[len("base_"):]: v for k, v in tensors.items() if k.startswith("base_")}
        sparse = self.base_form.emit(em, spec.base, x, em.fresh("sparse"), base, N, K, x_shape)
        h = em.node("MatMul", [x, em.const("v_t", tensors["v_kr"])])
        low = em.node("MatMul", [h, em.const("u_t", tensors["u_rn"])])
        return em.node("Add", [sparse, low], out)

    def note(self, spec):
        base = self.base_form.note(spec.base)
        return f"{base}; plus a rank-{spec.rank} term" if base else None


def _block_bases(N: int, K: int) -> list[Block]:
    return [b for b in BLOCK_BASES if N // b.block >= 2 and K // b.block >= 2]


TWOFOUR = PlusLowRankHandler(TwoFourPlusLowRank, twofour.HANDLER, lambda N, K: [TwoFour()], joint_solve=True)
TWOFOUR.onnx = PlusLowRankOnnx(twofour.HANDLER.onnx)
BLOCK = PlusLowRankHandler(BlockPlusLowRank, block.HANDLER, _block_bases)
BLOCK.onnx = PlusLowRankOnnx(block.HANDLER.onnx)
HANDLERS = (TWOFOUR, BLOCK)
