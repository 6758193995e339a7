"""Low-rank: W ~= U @ V with U (N, R) and V (R, K); y = (x @ V^T) @ U^T + bias.

Packing projects by plain truncated SVD, the singular values split evenly (sqrt) between the
factors so neither factor's range grows with the weight's scale.

Two implementations:
- ``fused`` (small M): one Triton launch. Program (r, s, m) computes the rank slice
  t = x @ V[r-slice]^T on chip, multiplies it by U[n-range s, r-slice]^T and atomically adds
  the partial product into an fp32 output; every weight byte is read once per n-split and the
  rank-R intermediate never goes to memory.
- ``gemm2`` (large M): two GEMMs (cuBLAS through torch), where the work is compute-bound and the
  intermediate is small next to x and y.
``triton`` (and ``auto`` on the GPU) picks ``fused`` below ``crossover_m`` tokens, else ``gemm2``
(by default always ``gemm2``: see DEFAULT_CROSSOVER_M).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sparsec.errors import SparsecError

from ._common import (LazyKernel, check_input, compute_dtype, expect_tensor, grad_matmul, m_bucket, match_dtype,
                      register_input_grad, tl_dot_precision)
from .packed import FormatKernels, register

# fused below this M when no planner set one. On an H200 (docs/benchmarks.md) the two cuBLAS
# GEMMs beat the fused kernel at every M from 1 on, so the fused kernel is opt-in (impl="fused").
DEFAULT_CROSSOVER_M = 1


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (U, V) of ``weight`` in Frobenius norm, in the weight's dtype."""
    w = weight.to(compute_dtype(weight))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    U = (u[:, :rank] * root).to(weight.dtype).contiguous()
    V = (root[:, None] * vh[:rank]).to(weight.dtype).contiguous()
    return U, V


def _fused_kernel(x_ptr, u_ptr, v_ptr, y_ptr, M, N, K, R,
                  stride_xm, stride_xk, stride_un, stride_ur, stride_vr, stride_vk, stride_ym, stride_yn,
                  M_BUCKET, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLIT: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x K may pass 2**31
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + offs_r[:, None] * stride_vr + offs_k[None, :] * stride_vk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        t = tl.dot(x, tl.trans(v), t, input_precision=DOT_PREC)
    t_in = t.to(u_ptr.dtype.element_ty)
    n_span = tl.cdiv(tl.cdiv(N, N_SPLIT), BLOCK_N) * BLOCK_N
    n_lo = pid_s * n_span
    n_hi = tl.minimum(n_lo + n_span, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        u = tl.load(u_ptr + offs_n[:, None] * stride_un + offs_r[None, :] * stride_ur,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        part = tl.dot(t_in, tl.trans(u), input_precision=DOT_PREC)
        tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, part,
                      mask=mask_m[:, None] & mask_n[None, :])


def _fused_configs():
    # (rank slice, n-splits): more programs for small ranks at the price of re-reading V slices
    shapes = ((16, 1), (16, 2), (16, 4), (32, 2), (32, 4))
    return [triton.Config({"BLOCK_M": 16, "BLOCK_R": br, "BLOCK_K": 256, "BLOCK_N": 64, "N_SPLIT": split},
                          num_warps=4, num_stages=3) for br, split in shapes]


def _fused_keep(config, args) -> bool:
    """Keep configs whose rank slice fits R and that give at least ~1 program per SM-sized share."""
    kw = config.kwargs
    R, K, N = args["R"], args["K"], args["N"]
    if kw["BLOCK_R"] > max(16, triton.next_power_of_2(R)) or kw["BLOCK_K"] > max(16, triton.next_power_of_2(K)):
        return False
    return kw["N_SPLIT"] == 1 or N >= 1024 * kw["N_SPLIT"]


_FUSED = LazyKernel(_fused_kernel, _fused_configs(), key=["M_BUCKET", "N", "K", "R"], prune=_fused_keep,
                    reset_to_zero=["y_ptr"])


def _grid(meta, R, N, M):
    return (triton.cdiv(R, meta["BLOCK_R"]), meta["N_SPLIT"], triton.cdiv(M, meta["BLOCK_M"]))


def lowrank_fused(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One Triton launch (plus the fp32 output's zero fill and the final cast with bias)."""
    M, K = x.shape
    N, R = u.shape
    acc = torch.zeros(M, N, device=x.device, dtype=torch.float32)

    def grid(meta):
        return _grid(meta, R, N, M)

    _FUSED[grid](x, u, v, acc, M, N, K, R,
                 x.stride(0), x.stride(1), u.stride(0), u.stride(1), v.stride(0), v.stride(1),
                 acc.stride(0), acc.stride(1), m_bucket(M), DOT_PREC=tl_dot_precision(x.dtype))
    if bias is not None:
        acc += bias
    return acc.to(x.dtype)


def lowrank_gemm2(x, u, v, bias):
    h = x @ v.t()
    if bias is None:
        return h @ u.t()
    return torch.addmm(bias, h, u.t())


@torch.library.custom_op("sparsec::lowrank_linear", mutates_args=())
def lowrank_linear_op(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                      fused: bool) -> torch.Tensor:
    """y = (x @ v^T) @ u^T + bias for 2-D x; ``fused`` picks the one-launch small-M kernel."""
    if fused:
        return lowrank_fused(x, u, v, bias)
    return lowrank_gemm2(x, u, v, bias)


@lowrank_linear_op.register_fake
def lowrank_linear_fake(x, u, v, bias, fused):
    return x.new_empty(x.shape[0], u.shape[0])


register_input_grad(lowrank_linear_op, lambda dy, u, v, n_in: grad_matmul(grad_matmul(dy, u), v),
                    saved=(1, 2), bias_index=3)


class LowRankKernels(FormatKernels):
    family = "lowrank"
    names = ("u", "v")
    impls = ("triton", "fused", "gemm2")

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

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        t = packed.tensors()
        u, v = match_dtype(t["u"], x2d.dtype), match_dtype(t["v"], x2d.dtype)
        if impl == "triton":
            crossover = packed.crossover_m if packed.crossover_m is not None else DEFAULT_CROSSOVER_M
            impl = "fused" if x2d.shape[0] < crossover else "gemm2"
        return lowrank_linear_op(x2d, u, v, None if bias is None else bias.to(x2d.dtype), impl == "fused")


register(LowRankKernels())
