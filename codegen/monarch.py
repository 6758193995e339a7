"""Monarch: W = blockdiag(R) @ P @ blockdiag(L), the layout of ``sparsec.formats.Monarch``.

For NB blocks, p = K/NB, n = N/NB and r = p/NB: block (c, b) of W (rows c*n.., columns b*p..)
is the product of R[c][:, b + NB*t] and L[b][c*r + t, :] over t < r, and no factor entry feeds
two blocks. So the best Monarch approximation of a dense weight (Frobenius norm) is, in closed
form, a rank-r truncated SVD of each of its NB x NB blocks (rank 1 when K = NB^2).
"""

from __future__ import annotations

import torch

from sparsec.errors import SparsecError

from ._common import compute_dtype, expect_tensor, match_dtype
from .packed import FormatKernels, register


def monarch_dims(spec, shape) -> tuple[int, int, int, int]:
    """(NB, p, n, r) for an (N, K) weight: block count, input block, output block, block rank."""
    N, K = shape
    nb = spec.nblocks
    p = K // nb
    return nb, p, N // nb, p // nb


def project(weight: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form Monarch projection: per-block rank-r SVD, scattered into the factors L and R."""
    N, K = weight.shape
    nb, p, n, r = monarch_dims(spec, (N, K))
    w = weight.to(compute_dtype(weight)).reshape(nb, n, nb, p).permute(0, 2, 1, 3)  # [c, b, n, p]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    keep = min(r, s.shape[-1])
    root = torch.zeros(nb, nb, r, dtype=w.dtype, device=w.device)
    root[..., :keep] = s[..., :keep].sqrt()
    uf = torch.zeros(nb, nb, n, r, dtype=w.dtype, device=w.device)
    uf[..., :keep] = u[..., :keep]
    vf = torch.zeros(nb, nb, r, p, dtype=w.dtype, device=w.device)
    vf[..., :keep, :] = vh[..., :keep, :]
    r_fac = (uf * root[:, :, None, :]).permute(0, 2, 3, 1).reshape(nb, n, p)      # R[c, j, t*NB + b]
    l_fac = (root[..., None] * vf).permute(1, 0, 2, 3).reshape(nb, p, p)          # L[b, c*r + t, q]
    return l_fac.to(weight.dtype).contiguous(), r_fac.to(weight.dtype).contiguous()


def monarch_reference(x2d: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Two batched block matmuls with the permutation between them, as plain torch."""
    M = x2d.shape[0]
    nb, p, _ = L.shape
    n = R.shape[1]
    xb = x2d.reshape(M, nb, p).transpose(0, 1)                   # [b, M, p]
    z = torch.bmm(xb, L.transpose(1, 2))                          # [b, M, i]
    chunks = z.permute(1, 2, 0).reshape(M, nb, p).transpose(0, 1)  # [c, M, l], l-th of chunk c
    y = torch.bmm(chunks, R.transpose(1, 2))                      # [c, M, j]
    return y.transpose(0, 1).reshape(M, nb * n)


class MonarchKernels(FormatKernels):
    family = "monarch"
    names = ("L", "R")
    impls = ("reference",)

    def pack(self, spec, weight):
        L, R = project(weight, spec)
        return {"L": L, "R": R}

    def validate(self, spec, shape, tensors):
        nb, p, n, _ = monarch_dims(spec, shape)
        L = expect_tensor(tensors, "L", (nb, p, p), floating=True)
        R = expect_tensor(tensors, "R", (nb, n, p), floating=True)
        if L.dtype != R.dtype or L.device != R.device:
            raise SparsecError("packed tensors 'L' and 'R' must share dtype and device")
        return {"L": L.contiguous(), "R": R.contiguous()}

    def to_dense(self, spec, shape, tensors):
        L, R = tensors["L"], tensors["R"]
        cd = compute_dtype(L)
        eye = torch.eye(shape[1], dtype=cd, device=L.device)
        return monarch_reference(eye, L.to(cd), R.to(cd)).t().to(L.dtype).contiguous()

    def reference(self, x2d, packed, bias):
        t = packed.tensors()
        y = monarch_reference(x2d, match_dtype(t["L"], x2d.dtype), match_dtype(t["R"], x2d.dtype))
        return y if bias is None else y + bias.to(x2d.dtype)


register(MonarchKernels())
