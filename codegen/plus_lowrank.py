"""Sparse plus low-rank: y = x S^T + (x V^T) U^T + bias, S in 2:4 or block form (``2:4+lowrank:R``,
``block:B:D+lowrank:R``).

Stored as the base format's tensors beside ``u`` (N, R) and ``v`` (R, K). The fast path runs the
low-rank term first, as the low-rank format does (two GEMMs: at small R they move R (N + K)
values, a few percent of the sparse part), and hands its output to the base format's kernel as the
residual its epilogue adds (codegen/epilogue.py): at the token counts where the base kernel fuses
the add, the composite costs no launch beyond its two small GEMMs. Where the base format takes
another path (cuSPARSELt at many tokens) the two outputs are added after it. Fewer launches still
where the base offers ``fast_lowrank`` (2:4's word kernel, the block GEMV, at the token counts they
serve, without gradients): t = x V^T is one small GEMM and the kernel adds U t in its epilogue, two
launches in all.

Packing a plain dense weight projects it: the base format's own rule, then the truncated SVD of
what that leaves out. A weight fitted by the planner arrives as its two parts and packs losslessly
(``Packed.from_tensors``).
"""

from __future__ import annotations

import torch

from sparsec.errors import SparsecError

from ._common import check_input, compute_dtype, expect_tensor, match_dtype
from .epilogue import Epilogue
from .lowrank import lowrank_linear_op, svd_factors
from .packed import FormatKernels, Packed, handler_for, register

_RESIDUAL = Epilogue(residual=True)


class PlusLowRankKernels(FormatKernels):
    """One composite family over the kernels of its base family."""

    def __init__(self, family: str, base_example):
        self.family = family
        self._base_example = base_example

    @property
    def base(self) -> FormatKernels:
        return handler_for(self._base_example)

    @property
    def names(self):  # type: ignore[override]
        return (*self.base.names, "u", "v")

    @property
    def derived(self):  # type: ignore[override]
        return self.base.derived

    # "auto" still follows the base's own choice of path (cuSPARSELt for 2:4 at many tokens)
    impls = ("triton", "reference")

    def _base_packed(self, packed: Packed) -> Packed:
        t = packed.tensors()
        base = Packed(packed.spec.base, packed.shape, {n: t[n] for n in self.base.names}, packed.crossover_m)
        base.aux = packed.aux  # one cache: a copy the base makes once (cuSPARSELt's) must outlive this view
        return base

    def pack(self, spec, weight):
        sparse = self.base.pack(spec.base, weight)
        residual = weight.to(compute_dtype(weight)) - self.base.to_dense(spec.base, weight.shape, sparse).to(
            compute_dtype(weight))
        u, v = _top_factors(residual, spec.rank, weight.dtype)
        return {**sparse, "u": u, "v": v}

    def validate(self, spec, shape, tensors):
        N, K = shape
        base = self.base.validate(spec.base, shape, {n: tensors[n] for n in self.base.names if n in tensors})
        u = expect_tensor(tensors, "u", (N, spec.rank), floating=True)
        v = expect_tensor(tensors, "v", (spec.rank, K), floating=True)
        values = next(t for t in base.values() if t.is_floating_point())
        if u.dtype != values.dtype or v.dtype != values.dtype or u.device != values.device or v.device != values.device:
            raise SparsecError(f"packed tensors 'u' and 'v' must share the sparse values' dtype {values.dtype} "
                               f"and device {values.device}")
        return {**base, "u": u.contiguous(), "v": v.contiguous()}

    def to_dense(self, spec, shape, tensors):
        sparse = self.base.to_dense(spec.base, shape, {n: tensors[n] for n in self.base.names})
        u, v = tensors["u"], tensors["v"]
        low = u.to(compute_dtype(u)) @ v.to(compute_dtype(v))
        return (sparse.to(low.dtype) + low).to(sparse.dtype)

    def kernel_reason(self, spec, N, K, dtype, device):
        return self.base.kernel_reason(spec.base, N, K, dtype, device)

    def reference(self, x2d, packed, bias):
        t = packed.tensors()
        u, v = match_dtype(t["u"], x2d.dtype), match_dtype(t["v"], x2d.dtype)
        y = self.base.reference(x2d, self._base_packed(packed), bias)
        return y + (x2d @ v.t()) @ u.t()

    def prepare(self, packed, impl):
        return self.base.prepare(self._base_packed(packed), impl)

    def auto_impl(self, x2d, packed):
        return self.base.auto_impl(x2d, self._base_packed(packed))

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        t = packed.tensors()
        u, v = match_dtype(t["u"], x2d.dtype), match_dtype(t["v"], x2d.dtype)
        base = self._base_packed(packed)
        fused = self.base.fast_lowrank(x2d, base, bias, x2d @ v.t(), u, impl)
        if fused is not None:
            return fused
        low = lowrank_linear_op(x2d, u, v, None, False)
        if impl == "triton":
            return self.base.fast_epilogue(x2d, base, bias, _RESIDUAL, low, impl, {})
        return self.base.fast(x2d, base, bias, impl) + low


def _top_factors(residual: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` truncated SVD of ``residual`` as balanced factors: exact for a rank a quarter
    of min(N, K) or more, else randomized (two power iterations, as exact on a matrix of that rank;
    a 16384 x 16384 full SVD would take the fingerprint's timings minutes per shape)."""
    if 4 * rank >= min(residual.shape):
        return svd_factors(residual.to(dtype), rank)
    u, s, v = torch.svd_lowrank(residual, q=rank + 8, niter=2)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(dtype).contiguous(), (root[:, None] * v[:, :rank].T).to(dtype).contiguous()


def _register():
    from sparsec.formats import BlockPlusLowRank, TwoFourPlusLowRank

    for cls in (TwoFourPlusLowRank, BlockPlusLowRank):
        register(PlusLowRankKernels(cls.family, cls.example().base))


_register()
