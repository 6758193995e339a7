"""Activation sparsity (``act:S``): the weight dense, each token's inputs under a threshold skipped.

Layout for W (N, K):
  weight_t  (K, N)  W transposed, so the N outputs an input feeds are one contiguous row: a
                    skipped input is a row not read;
  threshold (1,)    float32, the magnitude under which an input counts as zero.

y[m] = (x[m] masked to |x[m]| >= threshold) @ W^T + bias: every token its own mask, so a token's
output never depends on the other tokens of its launch.

The Triton path (up to GEMV_MAX_M tokens) is two launches and a reduction. The first lists, per
K-split, the inputs any token keeps (the union of their kept inputs), packed to the front, with
their count. The second gives each program BLOCK_N output columns of one split and loops over
that list only, gathering the kept rows of ``weight_t``: skipped rows cost neither memory traffic
nor loop steps. (Masking the rows of a loop over all of K saved almost nothing on an H200: the
loop was bound by its steps, not its bytes; docs/benchmarks.md.) The threshold is read on the
device and every launch size depends only on shapes: no host sync, CUDA-graph safe. Split-K
partial sums go to a float32 buffer that one small launch reduces, adding the bias. Above
GEMV_MAX_M tokens the union of kept inputs is most of them, and the layer runs as the masked
input times the dense weight (cuBLAS).
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
                      pdl_enabled, register_input_grad, tl_dot_precision)
from .packed import FormatKernels, register
from .partials import sum_partials

GEMV_MAX_M = 16
# Output columns a program takes: at one token narrow slices (many programs, each with many
# rows in flight), at more the tensor-core tiles want wide ones. With programs per SM (K split
# until the launch has that many) and the token count up to which the product runs on the CUDA
# cores, these are the settings that came first on an H200 (bf16, Llama-3-8B MLP shapes, S = 0.5,
# bench/act_sweep.py, docs/benchmarks.md).
BLOCK_N_ONE, BLOCK_N_MANY = 32, 128
K_ALIGN = 256         # each split's K range is a multiple of this
PROGRAMS_PER_SM = 4
MAX_SPAN = 4096       # most inputs one split lists (one program compacts them)
FMA_MAX_M = 1         # up to here products on the CUDA cores; above, tensor-core tiles of 16 tokens


def _compact_kernel(x_ptr, t_ptr, idx_ptr, cnt_ptr, M, K, K_PER_SPLIT, stride_xm, stride_xk,
                    SPAN: tl.constexpr, BLOCK_M: tl.constexpr, PDL: tl.constexpr):
    """Program s: the inputs of split s that any token keeps (|x| >= threshold), their indices
    packed to the front of idx[s] and their count in cnt[s]."""
    if PDL:  # the input comes from the launch ahead; the product may launch at once and wait for this one
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_s = tl.program_id(0)
    local = tl.arange(0, SPAN)
    offs = pid_s * K_PER_SPLIT + local
    valid = (local < K_PER_SPLIT) & (offs < K)
    t = tl.load(t_ptr)
    needed = tl.zeros((SPAN,), dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):  # BLOCK_M tokens' loads in flight at once
        offs_m = m0 + tl.arange(0, BLOCK_M)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & valid[None, :], other=0.0)
        live = tl.max((tl.abs(x.to(tl.float32)) >= t).to(tl.int32), axis=0)
        needed = tl.maximum(needed, live)
    needed = tl.where(valid, needed, 0)
    pos = tl.cumsum(needed, axis=0) - 1
    tl.store(idx_ptr + pid_s * SPAN + pos, offs, mask=needed > 0)
    tl.store(cnt_ptr + pid_s, tl.sum(needed, axis=0))


def _act_kernel(x_ptr, w_ptr, t_ptr, idx_ptr, cnt_ptr, b_ptr, y_ptr, M, N, SPAN,
                stride_xm, stride_xk, stride_wk, stride_ys, stride_ym,
                M_BUCKET, HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                EVEN_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                STAGES: tl.constexpr, PDL: tl.constexpr):
    """Program (n, s, m): outputs n*BLOCK_N.. of tokens m*BLOCK_M.. over the kept inputs of split s
    (``_compact_kernel``'s list: the loop runs over kept rows only), written to y[s] (a float32
    partial when K is split, the output itself when not). Each token masks its own inputs."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if PDL:  # launched early (programmatic dependent launch): wait for the list
        tl.extra.cuda.gdc_wait()
    t = tl.load(t_ptr)
    count = tl.load(cnt_ptr + pid_s)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # the CUDA-core product accumulates per lane and is reduced over K once, after the loop
    acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N) if not USE_DOT else (1, 1, 1), dtype=tl.float32)
    # the rows a step reads come from the list: naming a stage count lets Triton's pipeliner
    # issue later steps' index and weight loads before this step's products (a loop without a
    # dot is not pipelined otherwise)
    for j0 in tl.range(0, count, BLOCK_K, num_stages=STAGES):
        offs_j = j0 + tl.arange(0, BLOCK_K)
        ok = offs_j < count
        rows = tl.load(idx_ptr + pid_s * SPAN + offs_j, mask=ok, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + rows[None, :].to(tl.int64) * stride_xk,
                    mask=mask_m[:, None] & ok[None, :], other=0.0)
        x = tl.where(tl.abs(x.to(tl.float32)) >= t, x, tl.zeros_like(x))
        w_mask = ok[:, None] if EVEN_N else ok[:, None] & mask_n[None, :]
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wk + offs_n[None, :], mask=w_mask, other=0.0,
                    eviction_policy="evict_first")
        if USE_DOT:
            acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PREC)
        else:
            acc3 += x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if not USE_DOT:
        acc = tl.sum(acc3, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _configs():
    out = []
    for bk, w, s in ((64, 4, 4), (32, 2, 4), (16, 1, 6), (32, 4, 6), (64, 2, 3), (128, 4, 3), (16, 2, 8),
                     (32, 1, 8), (64, 8, 4), (128, 8, 3), (16, 4, 4), (32, 2, 2), (64, 4, 6)):
        out.append(triton.Config({"BLOCK_K": bk, "STAGES": s}, num_warps=w, num_stages=s))
    return out


def _keep(config, args) -> bool:
    """The CUDA-core product holds BLOCK_M x BLOCK_K x BLOCK_N values: within 64 registers a thread;
    tensor-core tiles need BLOCK_K >= 16 (every config has)."""
    if args["USE_DOT"]:
        return config.kwargs["BLOCK_K"] >= 16
    per_thread = args["BLOCK_M"] * config.kwargs["BLOCK_K"] * args["BLOCK_N"] // (32 * config.num_warps)
    return per_thread <= 64


_KERNEL = LazyKernel(_act_kernel, _configs(), key=["M_BUCKET", "N", "SPAN", "USE_DOT", "BLOCK_N"], prune=_keep)
_COMPACT = LazyKernel(_compact_kernel)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits_for(M: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(splits, inputs per split): split K until the launch has PROGRAMS_PER_SM programs per SM."""
    sms = 4 if (interpret_mode() or device.type != "cuda") else _sm_count(device.index or 0)
    tiles = triton.cdiv(N, _block_n(M)) * triton.cdiv(M, _block_m(M))
    splits = max(1, min(math.ceil(PROGRAMS_PER_SM * sms / tiles), triton.cdiv(K, K_ALIGN)), triton.cdiv(K, MAX_SPAN))
    per = triton.cdiv(triton.cdiv(K, splits), K_ALIGN) * K_ALIGN
    return triton.cdiv(K, per), per


def _block_n(M: int) -> int:
    return BLOCK_N_ONE if M <= FMA_MAX_M else BLOCK_N_MANY


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
    span = triton.next_power_of_2(per)
    idx = torch.empty(splits, span, device=x.device, dtype=torch.int32)
    count = torch.empty(splits, device=x.device, dtype=torch.int32)
    pdl = pdl_enabled(x)
    launch = {"launch_pdl": True} if pdl else {}
    _COMPACT[(splits,)](x, threshold, idx, count, M, K, per, x.stride(0), x.stride(1), SPAN=span,
                        BLOCK_M=min(block_m, 4), PDL=pdl, num_warps=8 if span >= 2048 else 4, **launch)
    block_n = _block_n(M)
    grid = (triton.cdiv(N, block_n), splits, triton.cdiv(M, block_m))
    _KERNEL[grid](x, weight_t, threshold, idx, count, bias if (bias is not None and splits == 1) else y, partial,
                  M, N, span, x.stride(0), x.stride(1), weight_t.stride(0),
                  0 if splits == 1 else partial.stride(0), N, m_bucket(M),
                  HAS_BIAS=bias is not None and splits == 1, USE_DOT=use_dot, DOT_PREC=tl_dot_precision(x.dtype),
                  EVEN_N=N % block_n == 0, BLOCK_M=block_m, BLOCK_N=block_n, PDL=pdl, **launch)
    if splits > 1:
        sum_partials(partial, bias, x.dtype, out=y, pdl=pdl)
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
