"""Monarch: W = blockdiag(R) @ P @ blockdiag(L), the layout of ``sparsec.formats.Monarch``.

For NB blocks, p = K/NB, n = N/NB and r = p/NB: block (c, b) of W (rows c*n.., columns b*p..)
is the product of R[c][:, b + NB*t] and L[b][c*r + t, :] over t < r, and no factor entry feeds
two blocks. So the best Monarch approximation of a dense weight (Frobenius norm) is, in closed
form, a rank-r truncated SVD of each of its NB x NB blocks (rank 1 when K = NB^2).

Two Triton implementations, the permutation folded into address arithmetic in both:
- ``two_launch``: block-diagonal GEMM 1 writes z (M, K) block by block; block-diagonal GEMM 2
  reads chunk c of the permuted z by gathering z[:, (f % NB) * p + f // NB] for f in c's range.
- ``fused`` (small M, one launch): chunk c of the permuted intermediate only needs rows
  c*r..c*r+r-1 of every L block, so program (c, n-tile) computes chunk c from x on chip, then
  multiplies it by R[c]; no intermediate goes to memory.
``triton`` (and ``auto`` on the GPU) picks ``fused`` below ``crossover_m`` tokens (by default never:
see DEFAULT_CROSSOVER_M).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sparsec.errors import SparsecError

from ._common import (LazyKernel, check_input, compute_dtype, expect_tensor, m_bucket, match_dtype, next_pow2,
                      register_input_grad, tl_dot_precision)
from .packed import FormatKernels, register

# fused below this M when no planner set one. On an H200 (docs/benchmarks.md) two launches beat
# the fused kernel at every M from 1 on (its programs each re-read all of x), so fused is opt-in.
DEFAULT_CROSSOVER_M = 1
FUSED_TILE_ELEMS = 8192   # bound on the fused kernel's (BLOCK_M x p x BLOCK_Q) product tile
FUSED_MAX_P = 256         # the fused kernel holds a (BLOCK_N x p) tile of R in registers


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


def _bd_gemm_kernel(a_ptr, w_ptr, b_ptr, c_ptr, M, NOUT, KIN, NB,
                    stride_am, stride_ak, stride_wb, stride_wn, stride_cm, stride_cn,
                    M_BUCKET, PERMUTE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[:, blk*NOUT + n] = sum_l A[:, col(blk, l)] * W[blk, n, l] (+ bias), one block per grid z."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    blk = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x K may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KIN, BLOCK_K):
        offs_l = k0 + tl.arange(0, BLOCK_K)
        mask_l = offs_l < KIN
        if PERMUTE:
            f = blk * KIN + offs_l
            cols = (f % NB) * KIN + f // NB
        else:
            cols = blk * KIN + offs_l
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + cols[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_l[None, :], other=0.0)
        w = tl.load(w_ptr + blk * stride_wb + offs_n[:, None] * stride_wn + offs_l[None, :],
                    mask=mask_n[:, None] & mask_l[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PREC)
    out_cols = blk * NOUT + offs_n
    if HAS_BIAS:
        acc += tl.load(b_ptr + out_cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + out_cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _bd_configs():
    out = [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=4, num_stages=3) for bn in (32, 64)]
    for bm, bn, bk, w in ((64, 64, 64, 4), (128, 64, 64, 4), (128, 128, 32, 8), (64, 128, 64, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3))
    return out


def _bd_keep(config, args) -> bool:
    kw = config.kwargs
    if kw["BLOCK_N"] > max(32, next_pow2(args["NOUT"])) or kw["BLOCK_K"] > max(32, next_pow2(args["KIN"])):
        return False
    bucket = args["M_BUCKET"]
    return kw["BLOCK_M"] == 16 if bucket <= 16 else 16 < kw["BLOCK_M"] <= max(64, bucket)


_BD_GEMM = LazyKernel(_bd_gemm_kernel, _bd_configs(), key=["M_BUCKET", "NOUT", "KIN", "NB", "PERMUTE"],
                      prune=_bd_keep)


def _bd_gemm(a, w, bias, out, permute: bool):
    M = a.shape[0]
    nb, nout, kin = w.shape

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(nout, meta["BLOCK_N"]), nb)

    _BD_GEMM[grid](a, w, out if bias is None else bias, out, M, nout, kin, nb,
                   a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
                   m_bucket(M), PERMUTE=permute, HAS_BIAS=bias is not None, DOT_PREC=tl_dot_precision(a.dtype))
    return out


def monarch_two_launch(x, L, R, bias):
    M, K = x.shape
    nb, n, _ = R.shape
    z = torch.empty(M, K, device=x.device, dtype=x.dtype)
    _bd_gemm(x, L, None, z, permute=False)
    y = torch.empty(M, nb * n, device=x.device, dtype=x.dtype)
    return _bd_gemm(z, R, bias, y, permute=True)


def _fused_kernel(x_ptr, l_ptr, r_ptr, b_ptr, y_ptr, M, NB, P, NOUT, RB,
                  stride_xm, stride_xk, stride_ym, stride_yn,
                  M_BUCKET, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, P_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr):
    n_tiles = tl.cdiv(NOUT, BLOCK_N)
    pid = tl.program_id(0)
    c = pid // n_tiles
    nt = pid % n_tiles
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x K may pass 2**31
    mask_m = offs_m < M
    offs_l = tl.arange(0, P_PAD)          # position inside chunk c
    mask_l = offs_l < P
    src_b = offs_l % NB                    # first-stage block feeding it
    l_rows = src_b * P * P + (c * RB + offs_l // NB) * P   # its row of L[src_b]
    x_cols = src_b * P
    chunk = tl.zeros((BLOCK_M, P_PAD), dtype=tl.float32)
    for q0 in range(0, P, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_lq = mask_l[:, None] & (offs_q[None, :] < P)
        lt = tl.load(l_ptr + l_rows[:, None] + offs_q[None, :], mask=mask_lq, other=0.0).to(tl.float32)
        xt = tl.load(x_ptr + offs_m[:, None, None] * stride_xm
                     + (x_cols[None, :, None] + offs_q[None, None, :]) * stride_xk,
                     mask=mask_m[:, None, None] & mask_lq[None, :, :], other=0.0).to(tl.float32)
        chunk += tl.sum(xt * lt[None, :, :], axis=2)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NOUT
    rt = tl.load(r_ptr + c * NOUT * P + offs_n[:, None] * P + offs_l[None, :],
                 mask=mask_n[:, None] & mask_l[None, :], other=0.0)
    acc = tl.dot(chunk.to(r_ptr.dtype.element_ty), tl.trans(rt), input_precision=DOT_PREC)
    out_cols = c * NOUT + offs_n
    if HAS_BIAS:
        acc += tl.load(b_ptr + out_cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + out_cols[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _fused_configs():
    return [triton.Config({"BLOCK_M": 16, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bn, w in ((32, 4), (64, 4), (64, 8), (128, 8))]


def _fused_keep(config, args) -> bool:
    return config.kwargs["BLOCK_N"] <= max(32, next_pow2(args["NOUT"]))


_FUSED = LazyKernel(_fused_kernel, _fused_configs(), key=["M_BUCKET", "NB", "P", "NOUT"], prune=_fused_keep)


def monarch_fused(x, L, R, bias):
    M, K = x.shape
    nb, n, p = R.shape
    p_pad = max(16, next_pow2(p))
    block_m = 16
    block_q = max(1, min(next_pow2(p), FUSED_TILE_ELEMS // (block_m * p_pad)))
    y = torch.empty(M, nb * n, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (nb * triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))

    _FUSED[grid](x, L, R, y if bias is None else bias, y, M, nb, p, n, p // nb,
                 x.stride(0), x.stride(1), y.stride(0), y.stride(1), m_bucket(M),
                 HAS_BIAS=bias is not None, DOT_PREC=tl_dot_precision(x.dtype), P_PAD=p_pad, BLOCK_Q=block_q)
    return y


@torch.library.custom_op("sparsec::monarch_linear", mutates_args=())
def monarch_linear_op(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor, bias: Optional[torch.Tensor],
                      fused: bool) -> torch.Tensor:
    """y = monarch(L, R) x + bias for 2-D x; ``fused`` picks the one-launch small-M kernel."""
    if fused:
        return monarch_fused(x, L, R, bias)
    return monarch_two_launch(x, L, R, bias)


@monarch_linear_op.register_fake
def monarch_linear_fake(x, L, R, bias, fused):
    return x.new_empty(x.shape[0], R.shape[0] * R.shape[1])


def monarch_input_grad(dy: torch.Tensor, L: torch.Tensor, R: torch.Tensor, n_in: int) -> torch.Tensor:
    """dx for y = monarch_reference(x, L, R): the same two block products, transposed, in reverse."""
    acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
    M = dy.shape[0]
    nb, p, _ = L.shape
    n = R.shape[1]
    dyb = dy.to(acc).reshape(M, nb, n).transpose(0, 1)                     # [c, M, j]
    dchunks = torch.bmm(dyb, R.to(acc))                                    # [c, M, l]
    dz = dchunks.transpose(0, 1).reshape(M, p, nb).permute(2, 0, 1)        # [b, M, i]
    dxb = torch.bmm(dz, L.to(acc))                                         # [b, M, p]
    return dxb.transpose(0, 1).reshape(M, nb * p).to(dy.dtype)


register_input_grad(monarch_linear_op, monarch_input_grad, saved=(1, 2), bias_index=3)


class MonarchKernels(FormatKernels):
    family = "monarch"
    names = ("L", "R")
    impls = ("triton", "fused", "two_launch")

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

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        t = packed.tensors()
        p = packed.shape[1] // packed.spec.nblocks
        if impl == "triton":
            crossover = packed.crossover_m if packed.crossover_m is not None else DEFAULT_CROSSOVER_M
            impl = "fused" if (x2d.shape[0] < crossover and p <= FUSED_MAX_P) else "two_launch"
        elif impl == "fused" and p > FUSED_MAX_P:
            raise SparsecError(f"impl 'fused' needs K/NB <= {FUSED_MAX_P}, got {p}; use 'two_launch'")
        return monarch_linear_op(x2d, match_dtype(t["L"], x2d.dtype), match_dtype(t["R"], x2d.dtype),
                                 None if bias is None else bias.to(x2d.dtype), impl == "fused")


register(MonarchKernels())
