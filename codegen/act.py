"""Activation sparsity (``act:S``): the weight dense, each token's inputs under a threshold skipped.

Layout for W (N, K):
  weight_t  (K, N)  W transposed, so the N outputs an input feeds are one contiguous row: a
                    skipped input is a row not read;
  threshold (1,)    float32, the magnitude under which an input counts as zero.

y[m] = (x[m] masked to |x[m]| >= threshold) @ W^T + bias: every token its own mask, so a token's
output never depends on the other tokens of its launch.

The Triton kernel (up to GEMV_MAX_M tokens) gives each program BLOCK_N output columns of one
K-split; per BLOCK_K inputs it reads the tokens' inputs, keeps the rows of ``weight_t`` that any
token needs (the union of their kept inputs) and loads only those, so the skipped rows cost no
memory traffic. The threshold is read on the device and every launch size depends only on
shapes: no host sync, CUDA-graph safe. Split-K partial sums go to a float32 buffer that one
small launch reduces, adding the bias. Above GEMV_MAX_M tokens the union of kept inputs is most
of them, and the layer runs as the masked input times the dense weight (cuBLAS).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from sparsec.errors import SparsecError

from ._common import (LazyKernel, check_input, expect_tensor, grad_matmul, interpret_mode, m_bucket, match_dtype,
                      register_input_grad, tl_dot_precision)
from .packed import FormatKernels, register

GEMV_MAX_M = 16
BLOCK_N = 64          # 128 bytes of a 16-bit row: one full cache line per kept input
K_ALIGN = 256         # each split's K range is a multiple of every BLOCK_K tried
PROGRAMS_PER_SM = 4   # split K until the launch has at least this many programs per SM
FMA_MAX_M = 4         # up to here products on the CUDA cores; above, tensor-core tiles of 16 tokens


def _act_kernel(x_ptr, w_ptr, t_ptr, b_ptr, y_ptr, M, N, K, K_PER_SPLIT,
                stride_xm, stride_xk, stride_wk, stride_ys, stride_ym,
                M_BUCKET, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n, s, m): outputs n*BLOCK_N.. of tokens m*BLOCK_M.. over inputs of split s, written
    to y[s] (a float32 partial when K is split, the output itself when not)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    t = tl.load(t_ptr)
    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        live = tl.abs(x.to(tl.float32)) >= t
        x = tl.where(live, x, tl.zeros_like(x))
        needed = tl.max(live.to(tl.int32), axis=0) > 0
        w_mask = needed[:, None] if EVEN_N else needed[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :], mask=w_mask, other=0.0,
                    eviction_policy="evict_first")
        if USE_DOT:
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PREC)
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y = sum over splits of the float32 partials p (SPLITS, M*N), plus bias, in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _configs():
    out = []
    for bk, w, s in ((64, 4, 4), (128, 4, 3), (32, 2, 4), (64, 2, 4), (128, 8, 3), (256, 8, 2), (32, 1, 6),
                     (64, 8, 4), (128, 4, 5)):
        out.append(triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s))
    return out


def _keep(config, args) -> bool:
    """The CUDA-core product holds BLOCK_M x BLOCK_K x BLOCK_N values: within 64 registers a thread;
    tensor-core tiles need BLOCK_K >= 16 (every config has)."""
    if args["USE_DOT"]:
        return True
    per_thread = args["BLOCK_M"] * config.kwargs["BLOCK_K"] * args["BLOCK_N"] // (32 * config.num_warps)
    return per_thread <= 64


_KERNEL = LazyKernel(_act_kernel, _configs(), key=["M_BUCKET", "N", "K", "USE_DOT"], prune=_keep)
_REDUCE = LazyKernel(_reduce_kernel)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits_for(M: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(splits, inputs per split): split K until the launch has PROGRAMS_PER_SM programs per SM."""
    sms = 4 if (interpret_mode() or device.type != "cuda") else _sm_count(device.index or 0)
    tiles = triton.cdiv(N, BLOCK_N) * triton.cdiv(M, _block_m(M))
    splits = max(1, min(math.ceil(PROGRAMS_PER_SM * sms / tiles), triton.cdiv(K, K_ALIGN)))
    per = triton.cdiv(triton.cdiv(K, splits), K_ALIGN) * K_ALIGN
    return triton.cdiv(K, per), per


def _block_m(M: int) -> int:
    return 16 if M > FMA_MAX_M else triton.next_power_of_2(M)


def act_triton(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    M, K = x.shape
    N = weight_t.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    splits, per = splits_for(M, N, K, x.device)
    block_m = _block_m(M)
    use_dot = M > FMA_MAX_M
    partial = y if splits == 1 else torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, BLOCK_N), splits, triton.cdiv(M, block_m))
    _KERNEL[grid](x, weight_t, threshold, bias if (bias is not None and splits == 1) else y, partial,
                  M, N, K, per, x.stride(0), x.stride(1), weight_t.stride(0),
                  0 if splits == 1 else partial.stride(0), N, m_bucket(M),
                  HAS_BIAS=bias is not None and splits == 1, USE_DOT=use_dot, DOT_PREC=tl_dot_precision(x.dtype),
                  EVEN_N=N % BLOCK_N == 0, BLOCK_M=block_m, BLOCK_N=BLOCK_N)
    if splits > 1:
        block = 1024
        _REDUCE[(triton.cdiv(M * N, block),)](partial, bias if bias is not None else y, y, M * N, N, splits,
                                              HAS_BIAS=bias is not None, BLOCK=block)
    return y


def act_masked_gemm(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """The masked input times the dense weight (cuBLAS on the GPU): many tokens, or no Triton."""
    xm = torch.where(x.abs() >= threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))  # compared in float32
    y = xm @ weight_t
    return y if bias is None else y + bias


@torch.library.custom_op("sparsec::act_linear", mutates_args=())
def act_linear_op(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = (x with entries under ``threshold`` in magnitude zeroed) @ weight_t + bias."""
    if x.shape[0] > GEMV_MAX_M:
        return act_masked_gemm(x, weight_t, threshold, bias)
    return act_triton(x, weight_t, threshold, bias)


@act_linear_op.register_fake
def act_linear_fake(x, weight_t, threshold, bias):
    return x.new_empty(x.shape[0], weight_t.shape[1])


@torch.library.custom_op("sparsec::act_linear_input_grad", mutates_args=())
def act_input_grad_op(dy: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
                      n_in: int) -> torch.Tensor:
    """dx = (dy @ W) where the input was kept, zero where it was skipped."""
    dx = grad_matmul(dy, weight_t.t())
    return torch.where(x.abs() >= threshold, dx, torch.zeros((), dtype=dx.dtype, device=dx.device))


@act_input_grad_op.register_fake
def act_input_grad_fake(dy, x, weight_t, threshold, n_in):
    return dy.new_empty(dy.shape[0], n_in)


register_input_grad(act_linear_op, act_input_grad_op, saved=(0, 1, 2), bias_index=3)


class ActKernels(FormatKernels):
    family = "act"
    names = ("weight_t", "threshold")

    def stack_rows(self, spec, parts):
        """Layers reading one input (gate and up) calibrate one threshold: their transposed weights
        sit side by side and one launch reads each kept input's row once for all of them."""
        first = parts[0]["threshold"]
        if any(not torch.equal(p["threshold"], first) for p in parts[1:]):
            return None
        return {"weight_t": torch.cat([p["weight_t"] for p in parts], dim=1).contiguous(), "threshold": first.clone()}

    def stack_pays(self, M: int) -> bool:
        return M <= GEMV_MAX_M

    def pack(self, spec, weight, threshold: float | None = None):
        """``threshold``: the calibrated magnitude under which inputs are skipped; without one, the
        magnitude that skips a fraction S of unit-normal inputs."""
        from sparsec.activation import normal_threshold

        t = normal_threshold(spec.skip) if threshold is None else float(threshold)
        if not math.isfinite(t) or t < 0.0:
            raise SparsecError(f"act threshold must be a finite non-negative number, got {threshold!r}")
        return {"weight_t": weight.t().contiguous().clone(),
                "threshold": torch.tensor([t], dtype=torch.float32, device=weight.device)}

    def validate(self, spec, shape, tensors):
        N, K = shape
        w = expect_tensor(tensors, "weight_t", (K, N), floating=True)
        t = expect_tensor(tensors, "threshold", (1,), floating=True).to(torch.float32)
        if not bool(torch.isfinite(t).all()) or float(t[0]) < 0.0:
            raise SparsecError("packed 'threshold' must be one finite non-negative value")
        return {"weight_t": w.contiguous(), "threshold": t.contiguous()}

    def to_dense(self, spec, shape, tensors):
        """The dense weight (the threshold is not a property of the weight)."""
        return tensors["weight_t"].t().contiguous()

    def reference(self, x2d, packed, bias):
        t = packed.tensors()
        w = match_dtype(t["weight_t"], x2d.dtype)
        return act_masked_gemm(x2d, w, t["threshold"].to(x2d.device),
                               None if bias is None else bias.to(x2d.dtype))

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        t = packed.tensors()
        return act_linear_op(x2d, match_dtype(t["weight_t"], x2d.dtype), t["threshold"],
                             None if bias is None else bias.to(x2d.dtype))


register(ActKernels())
