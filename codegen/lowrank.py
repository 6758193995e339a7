"""Low-rank: W ~= U @ V with U (N, R) and V (R, K); y = (x @ V^T) @ U^T + bias.

Packing projects by plain truncated SVD, the singular values split evenly (sqrt) between the
factors so neither factor's range grows with the weight's scale.
"""

from __future__ import annotations

import torch

from sparsec.errors import SparsecError

from ._common import compute_dtype, expect_tensor, match_dtype
from .packed import FormatKernels, register


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (U, V) of ``weight`` in Frobenius norm, in the weight's dtype."""
    w = weight.to(compute_dtype(weight))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    U = (u[:, :rank] * root).to(weight.dtype).contiguous()
    V = (root[:, None] * vh[:rank]).to(weight.dtype).contiguous()
    return U, V


class LowRankKernels(FormatKernels):
    family = "lowrank"
    names = ("u", "v")
    impls = ("reference",)

    def pack(self, spec, weight):
        U, V = svd_factors(weight, spec.rank)
        return {"u": U, "v": V}

    def validate(self, spec, shape, tensors):
        N, K = shape
        u = expect_tensor(tensors, "u", (N, spec.rank), floating=True)
        v = expect_tensor(tensors, "v", (spec.rank, K), floating=True)
        if u.dtype != v.dtype or u.device != v.device:
            raise SparsecError("packed tensors 'u' and 'v' must share dtype and device")
        return {"u": u.contiguous(), "v": v.contiguous()}

    def to_dense(self, spec, shape, tensors):
        u, v = tensors["u"], tensors["v"]
        return (u.to(compute_dtype(u)) @ v.to(compute_dtype(v))).to(u.dtype)

    def reference(self, x2d, packed, bias):
        t = packed.tensors()
        u, v = match_dtype(t["u"], x2d.dtype), match_dtype(t["v"], x2d.dtype)
        h = x2d @ v.t()
        if bias is None:
            return h @ u.t()
        return torch.addmm(bias.to(x2d.dtype), h, u.t())


register(LowRankKernels())
