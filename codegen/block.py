"""Block-sparse: W tiled in B x B blocks, the kept ones stored as BSR.

Layout for W (N, K), NR = N/B block rows, NC = K/B block columns, nnzb kept blocks:
  values  (nnzb, B, B)  kept blocks, row-major by (block row, block column);
  col_idx (nnzb,) int32 block column of each kept block;
  row_ptr (NR+1,) int32 kept blocks of block row i are row_ptr[i]:row_ptr[i+1];
  order   (NR,) int32   block rows by decreasing kept count: the kernel's work list, so the
                        longest rows start first and short or empty rows fill in behind them.

The Triton kernel launches one program per (work item, token tile), a work item being a slice of
BLOCK_N output rows of one block row (BLOCK_N divides B, so a wide block row feeds several
programs and a weight of few block rows still fills the GPU). A program walks its row's kept
blocks only; an empty row's programs just write the bias (or zeros), so no program is idle.
Two kernels share that work list: up to GEMV_MAX_M tokens (16-bit inputs) an MMA-free GEMV on
narrow row slices and few warps that takes several kept blocks per step, so that many programs
stream the weight at once, each with many loads in flight; above, the tensor-core kernel with
16-token tiles and up, which up to SPLIT_MAX_M tokens also splits each work item's kept blocks
over several programs where the work items alone would leave SMs idle.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import triton
import triton.language as tl

from sparsec.errors import SparsecError

from . import epilogue
from ._common import (LazyKernel, check_input, compute_dtype, expect_tensor, grad_matmul, m_bucket, match_dtype,
                      pdl_enabled, register_input_grad, split_count, tl_dot_precision)
from .packed import FormatKernels, register
from .partials import sum_partials

_REFERENCE_CHUNK_ELEMS = 1 << 25  # bound on the reference's gathered intermediate (M x nnzb x B)
# The MMA-free kernel serves 16-bit inputs up to GEMV_MAX_M tokens: on an H200 (bf16,
# docs/benchmarks.md) it beat the MMA kernel at M = 1, 2 and 4 on all three benchmark shapes
# (1.1-3.4x) and lost at M = 16 (1.2-2.4x slower: M FMAs per weight element on the CUDA
# cores). fp32 was not measured, so it keeps the MMA (tf32) kernel. GEMV_BLOCK_M caps the tokens
# a program takes.
GEMV_MAX_M = 4
GEMV_BLOCK_M = 16
# Above GEMV_MAX_M and up to SPLIT_MAX_M tokens (16-bit inputs) the MMA kernel splits each block
# row's kept blocks over several programs ("dot_split") where a block row alone leaves SMs idle:
# on an H100 (bf16, bench/small_m.py, 2026-12-05) at M = 8 and 16 it ran 1.40-2.20x of cuBLAS
# against 0.94-2.0x unsplit (1.43x vs 0.96x on 4096x4096, 2.10x vs 1.09x on 4096x14336 at M = 16).
SPLIT_MAX_M = 16
GEMV_DTYPES = (torch.float16, torch.bfloat16)
# The GEMV reads each kept block once: its weight loads ask the cache to evict them first, so the
# input slices (read by every program of a block column) stay resident.
WEIGHT_EVICTION = "evict_first"


def bsr_to_dense(values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor, K: int) -> torch.Tensor:
    """The dense (..., N, K) weights of BSR layouts with leading dimensions in common (one weight,
    or a bank of experts each keeping as many blocks): ``values`` (..., nnzb, B, B), ``col_idx``
    (..., nnzb), ``row_ptr`` (..., N/B + 1). Each block's row is found by search, so every shape
    follows from the inputs' shapes: no host sync, safe in a CUDA graph."""
    lead, (nnzb, B, _) = values.shape[:-3], values.shape[-3:]
    nr, nc = row_ptr.shape[-1] - 1, K // B
    ends = row_ptr[..., 1:].reshape(-1, nr).contiguous()
    blocks = torch.arange(nnzb, device=row_ptr.device, dtype=row_ptr.dtype).expand(ends.shape[0], nnzb).contiguous()
    rows = torch.searchsorted(ends, blocks, right=True).to(torch.int64)
    weight = torch.arange(ends.shape[0], device=row_ptr.device)[:, None]
    slot = ((weight * nr + rows) * nc + col_idx.reshape(-1, nnzb).to(torch.int64)).reshape(-1)
    dense = values.new_zeros(ends.shape[0] * nr * nc, B, B)
    dense[slot] = values.reshape(-1, B, B)
    return dense.reshape(*lead, nr, nc, B, B).transpose(-3, -2).reshape(*lead, nr * B, K).contiguous()


def work_order(row_ptr: torch.Tensor) -> torch.Tensor:
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)


def _block_kernel(x_ptr, val_ptr, col_ptr, rowptr_ptr, order_ptr, b_ptr, y_ptr, M, N, K,
                  stride_xm, stride_xk, stride_ym, stride_yn,
                  M_BUCKET, B: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT=1, stride_ys=0, PARTIAL: tl.constexpr = False):
    """Y = X W^T over a block row's kept blocks. With ``PARTIAL`` each block row's kept blocks are
    cut into SPLIT chunks, a program each, and each writes its float32 partial product to
    y_ptr + chunk * stride_ys (no bias), for the caller to sum: more programs streaming the weight
    where block rows are few and long."""
    SUB: tl.constexpr = B // BLOCK_N
    pid_w = tl.program_id(0)
    pid_m = tl.program_id(1)
    chunk = pid_w % SPLIT
    pid_w = pid_w // SPLIT
    row = tl.load(order_ptr + pid_w // SUB)
    sub = pid_w % SUB
    start = tl.load(rowptr_ptr + row)
    end = tl.load(rowptr_ptr + row + 1)
    if PARTIAL:
        per = tl.cdiv(end - start, SPLIT)
        start = tl.minimum(start + chunk * per, end)
        end = tl.minimum(start + per, end)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x K may pass 2**31
    offs_r = sub * BLOCK_N + tl.arange(0, BLOCK_N)   # output rows inside the block row
    offs_c = tl.arange(0, B)                           # input columns inside a block
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_ptrs = val_ptr + start.to(tl.int64) * (B * B) + offs_r[:, None] * B + offs_c[None, :]
    c_ptr = col_ptr + start
    for _ in range(start, end):
        col = tl.load(c_ptr)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (col * B + offs_c)[None, :] * stride_xk,
                    mask=mask_m[:, None], other=0.0)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        w_ptrs += B * B
        c_ptr += 1
    offs_n = row * B + offs_r
    if PARTIAL:
        tl.store(y_ptr + chunk.to(tl.int64) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc, mask=mask_m[:, None])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


def _block_gemv_kernel(x_ptr, val_ptr, col_ptr, rowptr_ptr, order_ptr, b_ptr, r_ptr, t_ptr, u_ptr, y_ptr, M, N, K,
                       GATE_ROW, UP_ROW, R, stride_xm, stride_xk, stride_rm, stride_rn, stride_tm, stride_un,
                       stride_ym, stride_yn,
                       M_BUCKET, B: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                       HAS_RES: tl.constexpr, LOWRANK: tl.constexpr, BLOCK_R: tl.constexpr,
                       WEIGHT_EVICTION: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr,
                       e_ptr=None, stride_ve=0, stride_ce=0, stride_re=0, EXPERTS: tl.constexpr = False):
    """Small-M path: same work items as the MMA kernel, but narrow row slices (BLOCK_N rows of a
    block are BLOCK_N * B contiguous values) and BLOCK_J kept blocks per step, their column
    indices read as one vector: the weight loads of a step depend on nothing, so each program
    keeps BLOCK_J * BLOCK_N * B values in flight instead of waiting on one block at a time.
    STAGES > 1 asks Triton's pipeliner to issue the loads of the next steps before this one's
    products (a loop without a dot is pipelined only when its range names a stage count).
    Products accumulate per lane in fp32, reduced once at the end.

    GATED (codegen/epilogue.py): output block row r is silu(gate) * up of the stacked weight's
    block rows GATE_ROW + r and UP_ROW + r, walked one after the other (walking both in the same
    steps measured no faster at M = 1 and 16% slower at M = 4 on an H200); HAS_RES adds r_ptr's
    tile before the store; LOWRANK (a sparse-plus-low-rank weight, codegen/plus_lowrank.py) adds
    U t for the tokens' t = V x (M x R, computed before), from the program's own rows of U. PDL (``pdl_enabled``): wait for the launch ahead before the first
    load; once a program has streamed its weights, let the next launch start, so that launch
    overlaps this one's tail without holding resources while this one streams.

    EXPERTS (codegen/experts.py, BLOCK_M = 1): the weight is a bank of BSR experts stacked by
    expert (values, columns and row starts ``stride_ve``, ``stride_ce``, ``stride_re`` apart), and
    token row m is multiplied by expert ``e_ptr[m]``'s."""
    SUB: tl.constexpr = B // BLOCK_N
    HALVES: tl.constexpr = 2 if GATED else 1
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid_w = tl.program_id(0)
    pid_m = tl.program_id(1)
    if EXPERTS:
        e = tl.load(e_ptr + pid_m).to(tl.int64)
        val_ptr += e * stride_ve
        col_ptr += e * stride_ce
        rowptr_ptr += e * stride_re
    row = tl.load(order_ptr + pid_w // SUB)
    sub = pid_w % SUB
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    offs_r = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, B)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in tl.static_range(HALVES):
        src = row + GATE_ROW + h * (UP_ROW - GATE_ROW)
        start = tl.load(rowptr_ptr + src)
        end = tl.load(rowptr_ptr + src + 1)
        acc = tl.zeros((BLOCK_M, BLOCK_J, BLOCK_N, B), dtype=tl.float32)
        w_ptrs = (val_ptr + start.to(tl.int64) * (B * B)
                  + (offs_j[:, None, None] * (B * B) + offs_r[None, :, None] * B + offs_c[None, None, :]))
        for j0 in tl.range(start, end, BLOCK_J, num_stages=STAGES):
            kept = j0 + offs_j < end
            col = tl.load(col_ptr + j0 + offs_j, mask=kept, other=0)
            w = tl.load(w_ptrs, mask=kept[:, None, None], other=0.0, eviction_policy=WEIGHT_EVICTION)
            x = tl.load(x_rows + (col[:, None] * B + offs_c[None, :])[None, :, :] * stride_xk,
                        mask=mask_m[:, None, None] & kept[None, :, None], other=0.0)
            acc += x.to(tl.float32)[:, :, None, :] * w.to(tl.float32)[None, :, :, :]
            w_ptrs += BLOCK_J * B * B
        part = tl.sum(tl.sum(acc, axis=3), axis=1)
        if HAS_BIAS:
            part += tl.load(b_ptr + src * B + offs_r).to(tl.float32)[None, :]
        if h == 0:
            out = part
        else:
            out = out * tl.sigmoid(out) * part
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n = row * B + offs_r
    if LOWRANK:
        offs_k = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_k
            t = tl.load(t_ptr + offs_m[:, None] * stride_tm + rr[None, :], mask=mask_m[:, None] & (rr < R)[None, :],
                        other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs_n[:, None].to(tl.int64) * stride_un + rr[None, :], mask=(rr < R)[None, :],
                        other=0.0).to(tl.float32)
            out += tl.sum(t[:, None, :] * u[None, :, :], axis=2)
    if HAS_RES:
        out += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                       mask=mask_m[:, None], other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


def _gemv_configs():
    out = []
    # Pipelined: on an H200 at M = 1 these won on all three benchmark shapes (docs/benchmarks.md),
    # few blocks per step with several steps in flight; listed first so the interpreter runs one.
    # (8, 2, 1, 4), (4, 4, 1, 2) and (4, 2, 1, 2) came first, third and fourth of 62 on the gated
    # gate/up launch (28672 x 4096 stacked, M = 1, docs/history.md, the fused-epilogue sweeps).
    for bn, bj, w, s in ((4, 2, 1, 4), (8, 2, 1, 4), (4, 4, 1, 2), (4, 2, 1, 2), (8, 2, 2, 4), (2, 4, 1, 3),
                         (4, 4, 2, 3), (8, 4, 4, 3), (16, 4, 4, 3), (4, 2, 1, 6), (2, 2, 1, 6), (4, 1, 1, 8),
                         (8, 2, 2, 6), (2, 4, 1, 5), (16, 2, 4, 4), (1, 8, 1, 3), (1, 4, 1, 4)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "STAGES": s}, num_warps=w, num_stages=s))
    for bn, bj, w in ((1, 8, 1), (2, 8, 2), (4, 8, 4), (4, 4, 2), (8, 4, 4),
                      (2, 1, 1), (4, 1, 1), (8, 1, 1), (8, 1, 2), (16, 1, 2), (16, 1, 4), (32, 1, 4)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "STAGES": 1}, num_warps=w, num_stages=4))
    return out


def _gemv_keep(config, args) -> bool:
    """BLOCK_N divides the block; the fp32 accumulator within 64 registers a thread."""
    kw = config.kwargs
    per_thread = args["BLOCK_M"] * kw["BLOCK_J"] * kw["BLOCK_N"] * args["B"] // (32 * config.num_warps)
    return kw["BLOCK_N"] <= args["B"] and per_thread <= 64


_GEMV_KERNEL = LazyKernel(_block_gemv_kernel, _gemv_configs(),
                          key=["M_BUCKET", "N", "K", "B", "GATED", "LOWRANK", "EXPERTS"], prune=_gemv_keep)


def _configs():
    out = []
    for bn in (16, 32, 64):
        out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn}, num_warps=4, num_stages=4))
    for bm, bn, w in ((64, 64, 4), (128, 64, 4), (128, 128, 8), (64, 128, 4), (64, 32, 4), (128, 32, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=3))
    return out


def _keep(config, args) -> bool:
    """BLOCK_N must divide the block; BLOCK_M 16 up to M=16, then no larger than M's bucket."""
    kw = config.kwargs
    if kw["BLOCK_N"] > args["B"]:
        return False
    bucket = args["M_BUCKET"]
    return kw["BLOCK_M"] == 16 if bucket <= 16 else 16 < kw["BLOCK_M"] <= max(64, bucket)


_KERNEL = LazyKernel(_block_kernel, _configs(), key=["M_BUCKET", "N", "K", "B", "PARTIAL"], prune=_keep)


def split_for(N: int, device) -> int:
    """Chunks per block row for the "dot_split" path: ``_common.split_count`` over the narrowest
    work items (16 rows)."""
    return split_count(-(-N // 16), device)


def block_triton(x, values, col_idx, row_ptr, order, bias, N, path: str | None = None, residual=None,
                 gate_row: int = -1, up_row: int = -1, width: int = 0, lowrank=None):
    """``path``: "gemv" (small-M kernel), "dot" (MMA), "dot_split" (MMA, each block row's kept blocks
    split over several programs, ``split_for``; float32 partials summed after) or None (by M, see
    GEMV_MAX_M and SPLIT_MAX_M).

    ``residual``, ``gate_row``, ``up_row``, ``width``: the epilogue (codegen/epilogue.py), fused
    in the GEMV; ``order`` then lists the output's block rows (``gated_order``). The MMA kernel
    writes its product and the epilogue follows in torch. ``lowrank``: (t, u), a low-rank term
    U t added per token (t = x V^T, M x R; u, N x R), in the GEMV's epilogue; elsewhere as a
    residual made in torch."""
    M, K = x.shape
    B = values.shape[1]
    gated = gate_row >= 0
    if path is None:
        small = x.dtype in GEMV_DTYPES
        path = "gemv" if (M <= GEMV_MAX_M and small) else "dot_split" if (M <= SPLIT_MAX_M and small) else "dot"
    if lowrank is not None and (path != "gemv" or gated):
        low = (lowrank[0] @ lowrank[1].t()).to(x.dtype)
        residual = low if residual is None else residual + low
        lowrank = None
    if path != "gemv" and (gated or residual is not None):
        rows = (row_ptr.shape[0] - 1) * B
        z = block_triton(x, values, col_idx, row_ptr, work_order(row_ptr) if gated else order, bias, rows, path)
        return epilogue.apply(z, gate_row, up_row, width, residual)
    y = torch.empty(M, width if gated else N, device=x.device, dtype=x.dtype)
    if path == "gemv":
        block_m = min(triton.next_power_of_2(M), GEMV_BLOCK_M)
        r = y if residual is None else residual
        pdl = pdl_enabled(x)

        def grid_gemv(meta):
            return (order.shape[0] * (B // meta["BLOCK_N"]), triton.cdiv(M, block_m))

        t, u = (lowrank[0].contiguous(), lowrank[1].contiguous()) if lowrank is not None else (y, y)
        R = u.shape[1] if lowrank is not None else 0
        _GEMV_KERNEL[grid_gemv](x, values, col_idx, row_ptr, order, y if bias is None else bias, r, t, u, y, M, y.shape[1],
                                K, max(gate_row, 0) // B, max(up_row, 0) // B, R, x.stride(0), x.stride(1),
                                r.stride(0), r.stride(1), t.stride(0), u.stride(0), y.stride(0), y.stride(1),
                                m_bucket(M), B=B, HAS_BIAS=bias is not None, GATED=gated, HAS_RES=residual is not None,
                                LOWRANK=lowrank is not None, BLOCK_R=16,
                                WEIGHT_EVICTION=WEIGHT_EVICTION, PDL=pdl, BLOCK_M=block_m, EXPERTS=False,
                                **({"launch_pdl": True} if pdl else {}))
        return y

    split = split_for(N, x.device) if path == "dot_split" else 1

    def grid(meta):
        return (order.shape[0] * (B // meta["BLOCK_N"]) * split, triton.cdiv(M, meta["BLOCK_M"]))

    if split > 1:
        parts = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
        _KERNEL[grid](x, values, col_idx, row_ptr, order, parts, parts, M, N, K,
                      x.stride(0), x.stride(1), parts.stride(1), parts.stride(2), m_bucket(M), B=B,
                      HAS_BIAS=False, DOT_PREC=tl_dot_precision(x.dtype), SPLIT=split, stride_ys=parts.stride(0),
                      PARTIAL=True)
        return sum_partials(parts, bias, x.dtype)
    _KERNEL[grid](x, values, col_idx, row_ptr, order, y if bias is None else bias, y, M, N, K,
                  x.stride(0), x.stride(1), y.stride(0), y.stride(1), m_bucket(M), B=B,
                  HAS_BIAS=bias is not None, DOT_PREC=tl_dot_precision(x.dtype))
    return y


def block_rows(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
               expert_of_row: torch.Tensor, K: int, up_row: int = -1) -> torch.Tensor:
    """Row s of x times expert ``expert_of_row[s]``'s block-sparse weight (``values`` (E, nnzb, B, B),
    ``col_idx`` (E, nnzb), ``row_ptr`` (E, N/B + 1): codegen/experts.py's ``BlockWeights``), by the
    GEMV kernel one row a program: an expert bank at decode. With ``up_row`` >= 0 (a multiple of B),
    silu(rows n) * (rows up_row + n) for n < up_row (gate_up's SwiGLU). 16-bit x and values."""
    S = x.shape[0]
    E, _, B, _ = values.shape
    gated = up_row >= 0
    N = up_row if gated else (row_ptr.shape[1] - 1) * B
    y = torch.empty(S, N, device=x.device, dtype=x.dtype)
    if S == 0:
        return y
    order = torch.arange(N // B, device=x.device, dtype=torch.int32)
    values = values.to(x.dtype)

    def grid(meta):
        return (order.shape[0] * (B // meta["BLOCK_N"]), S)

    _GEMV_KERNEL[grid](x, values, col_idx, row_ptr, order, y, y, y, y, y, S, N, K, 0, max(up_row, 0) // B, 0,
                       x.stride(0), x.stride(1), y.stride(0), y.stride(1), y.stride(0), y.stride(0),
                       y.stride(0), y.stride(1), m_bucket(1), B=B, HAS_BIAS=False, GATED=gated, HAS_RES=False,
                       LOWRANK=False, BLOCK_R=16, WEIGHT_EVICTION=WEIGHT_EVICTION, PDL=False, BLOCK_M=1,
                       e_ptr=expert_of_row.to(torch.int32), stride_ve=values.stride(0), stride_ce=col_idx.stride(0),
                       stride_re=row_ptr.stride(0), EXPERTS=True)
    return y


def gated_order(row_ptr: torch.Tensor, gate_row: int, up_row: int, rows: int) -> torch.Tensor:
    """The work list of a gated launch: output block rows by decreasing kept blocks of the gate's
    and the up projection's rows together (in block rows: ``gate_row``, ``up_row``, ``rows``)."""
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    both = counts[gate_row:gate_row + rows] + counts[up_row:up_row + rows]
    return torch.sort(both, descending=True, stable=True).indices.to(torch.int32)


@torch.library.custom_op("sparsec::block_linear", mutates_args=())
def block_linear_op(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                    order: torch.Tensor, bias: Optional[torch.Tensor], n_out: int) -> torch.Tensor:
    """y = x @ W^T + bias for the BSR weight (values, col_idx, row_ptr) walked in ``order``."""
    return block_triton(x, values, col_idx, row_ptr, order, bias, n_out)


@block_linear_op.register_fake
def block_linear_fake(x, values, col_idx, row_ptr, order, bias, n_out):
    return x.new_empty(x.shape[0], n_out)


@torch.library.custom_op("sparsec::block_linear_epilogue", mutates_args=())
def block_epilogue_op(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                      order: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                      gate_row: int, up_row: int, width: int) -> torch.Tensor:
    """The BSR linear with its epilogue (codegen/epilogue.py) in the launch where the GEMV serves
    it; ``order`` lists the output's block rows."""
    rows = (row_ptr.shape[0] - 1) * values.shape[1]
    return block_triton(x, values, col_idx, row_ptr, order, bias, rows, residual=residual,
                        gate_row=gate_row, up_row=up_row, width=width)


@block_epilogue_op.register_fake
def block_epilogue_fake(x, values, col_idx, row_ptr, order, bias, residual, gate_row, up_row, width):
    return x.new_empty(x.shape[0], width if gate_row >= 0 else (row_ptr.shape[0] - 1) * values.shape[1])


@torch.library.custom_op("sparsec::block_linear_input_grad", mutates_args=())
def block_input_grad_op(dy: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                        n_in: int) -> torch.Tensor:
    """dx = dy @ W for the BSR weight (its expansion has a data-dependent shape: kept opaque)."""
    spec = SimpleNamespace(block=values.shape[1])
    w = BlockKernels().to_dense(spec, (dy.shape[1], n_in), {"values": values, "col_idx": col_idx, "row_ptr": row_ptr})
    return grad_matmul(dy, w)


@block_input_grad_op.register_fake
def block_input_grad_fake(dy, values, col_idx, row_ptr, n_in):
    return dy.new_empty(dy.shape[0], n_in)


register_input_grad(block_linear_op, block_input_grad_op, saved=(1, 2, 3), bias_index=5)


@torch.library.custom_op("sparsec::block_to_dense", mutates_args=())
def block_to_dense_op(values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor, n_in: int) -> torch.Tensor:
    """The (rows, n_in) weight of a BSR layout, for the epilogue op's gradient (``bsr_to_dense``),
    one opaque node to tracing."""
    spec = SimpleNamespace(block=values.shape[1])
    rows = (row_ptr.shape[0] - 1) * values.shape[1]
    return BlockKernels().to_dense(spec, (rows, n_in), {"values": values, "col_idx": col_idx, "row_ptr": row_ptr})


@block_to_dense_op.register_fake
def block_to_dense_fake(values, col_idx, row_ptr, n_in):
    return values.new_empty((row_ptr.shape[0] - 1) * values.shape[1], n_in)


epilogue.register_grad(block_epilogue_op, block_to_dense_op, saved=(1, 2, 3), bias_index=5, residual_index=6)


@torch.library.custom_op("sparsec::block_lowrank_linear", mutates_args=())
def block_lowrank_op(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
                     order: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor, u: torch.Tensor,
                     n_out: int) -> torch.Tensor:
    """y = x @ W^T + bias + t @ u^T: the block-sparse product with a low-rank term (t = x V^T computed
    before) added in the GEMV's epilogue (codegen/plus_lowrank.py)."""
    return block_triton(x, values, col_idx, row_ptr, order, bias, n_out, lowrank=(t, u))


@block_lowrank_op.register_fake
def block_lowrank_fake(x, values, col_idx, row_ptr, order, bias, t, u, n_out):
    return x.new_empty(x.shape[0], n_out)


class BlockKernels(FormatKernels):
    family = "block"
    names = ("values", "col_idx", "row_ptr", "order")
    derived = ("order",)

    def stack_pays(self, M: int) -> bool:
        """On an H200 (Llama MLP stack, docs/benchmarks.md) gate and up stacked made the MLP at M=1
        1.10x faster (the GEMV's fixed cost paid once) but at M=2048 5% slower (one call each, the
        tensor-core kernel), so stacking is kept to the GEMV's token counts."""
        return M <= GEMV_MAX_M

    def epilogue_pays(self, M: int) -> bool:
        return M <= GEMV_MAX_M

    def epilogue_aux(self, packed, ep):
        B = packed.spec.block
        if ep.gated:
            return {"order": gated_order(packed.tensors()["row_ptr"], ep.gate_row // B, ep.up_row // B, ep.width // B)}
        return {}

    def fast_epilogue(self, x2d, packed, bias, ep, residual, impl, aux):
        if impl != "triton":
            return super().fast_epilogue(x2d, packed, bias, ep, residual, impl, aux)
        check_input(x2d)
        t = packed.tensors()
        return block_epilogue_op(x2d, match_dtype(t["values"], x2d.dtype), t["col_idx"], t["row_ptr"],
                                 aux.get("order", t["order"]), None if bias is None else bias.to(x2d.dtype),
                                 residual, ep.gate_row, ep.up_row, ep.width)

    def fast_lowrank(self, x2d, packed, bias, t, u, impl):
        """The product plus t @ u^T in one launch where the GEMV serves it (up to GEMV_MAX_M tokens,
        16-bit), no gradient wanted (the fused op has none; the unfused path does)."""
        M = x2d.shape[0]
        if (impl != "triton" or M > GEMV_MAX_M or x2d.dtype not in GEMV_DTYPES
                or (torch.is_grad_enabled() and x2d.requires_grad)):
            return None
        check_input(x2d)
        t_ = packed.tensors()
        return block_lowrank_op(x2d, match_dtype(t_["values"], x2d.dtype), t_["col_idx"], t_["row_ptr"], t_["order"],
                                None if bias is None else bias.to(x2d.dtype), t, u, packed.shape[0])

    def stack_rows(self, spec, parts):
        """Block rows follow one another: kept blocks concatenate, each part's row pointers shift by
        the blocks before it, and the work list is rebuilt over all block rows."""
        row_ptr, offset = [parts[0]["row_ptr"][:1]], 0
        for p in parts:
            row_ptr.append(p["row_ptr"][1:] + offset)
            offset += int(p["row_ptr"][-1])
        row_ptr = torch.cat(row_ptr).to(torch.int32)
        return {"values": torch.cat([p["values"] for p in parts]).contiguous(),
                "col_idx": torch.cat([p["col_idx"] for p in parts]).contiguous(),
                "row_ptr": row_ptr.contiguous(), "order": work_order(row_ptr)}

    def pack(self, spec, weight):
        N, K = weight.shape
        B = spec.block
        nr, nc = N // B, K // B
        blocks = weight.reshape(nr, B, nc, B).permute(0, 2, 1, 3).reshape(nr * nc, B, B)
        score = blocks.to(compute_dtype(weight)).pow(2).sum(dim=(1, 2))
        keep = score.topk(spec.kept_blocks(N, K)).indices.sort().values
        counts = torch.bincount(keep // nc, minlength=nr)
        row_ptr = torch.zeros(nr + 1, dtype=torch.int32, device=weight.device)
        row_ptr[1:] = counts.cumsum(0)
        return {"values": blocks[keep].contiguous(), "col_idx": (keep % nc).to(torch.int32),
                "row_ptr": row_ptr, "order": work_order(row_ptr)}

    def validate(self, spec, shape, tensors):
        N, K = shape
        B = spec.block
        nr, nc = N // B, K // B
        nnzb = spec.kept_blocks(N, K)
        values = expect_tensor(tensors, "values", (nnzb, B, B), floating=True)
        col_idx = expect_tensor(tensors, "col_idx", (nnzb,), floating=False).to(torch.int32)
        row_ptr = expect_tensor(tensors, "row_ptr", (nr + 1,), floating=False).to(torch.int32)
        if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnzb or bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise SparsecError(f"packed 'row_ptr' must rise from 0 to {nnzb} kept blocks")
        if nnzb and (int(col_idx.min()) < 0 or int(col_idx.max()) >= nc):
            raise SparsecError(f"packed 'col_idx' must lie in [0, {nc})")
        order = tensors.get("order")
        if order is None:
            order = work_order(row_ptr)
        else:
            order = expect_tensor(tensors, "order", (nr,), floating=False).to(torch.int32)
            if not torch.equal(order.sort().values.cpu(), torch.arange(nr, dtype=torch.int32)):
                raise SparsecError("packed 'order' must be a permutation of the block rows")
        return {"values": values.contiguous(), "col_idx": col_idx.contiguous(),
                "row_ptr": row_ptr.contiguous(), "order": order.contiguous()}

    def to_dense(self, spec, shape, tensors):
        return bsr_to_dense(tensors["values"], tensors["col_idx"], tensors["row_ptr"], shape[1])

    def reference(self, x2d, packed, bias):
        """Gather each kept block's input slice, one batched matmul, index_add into block rows."""
        N, K = packed.shape
        t = packed.tensors()
        values = match_dtype(t["values"], x2d.dtype)
        nnzb, B, _ = values.shape
        nr = N // B
        row_ptr = t["row_ptr"]
        rows = torch.repeat_interleave(torch.arange(nr, device=values.device),
                                       (row_ptr[1:] - row_ptr[:-1]).to(torch.int64))
        cols = t["col_idx"].to(torch.int64)
        M = x2d.shape[0]
        xb = x2d.reshape(M, K // B, B)
        y = x2d.new_zeros(M, nr, B, dtype=torch.float32 if x2d.dtype in (torch.float16, torch.bfloat16) else None)
        step = max(1, _REFERENCE_CHUNK_ELEMS // max(1, nnzb * B))
        for m0 in range(0, M, step):
            xg = xb[m0:m0 + step, cols, :].transpose(0, 1)               # [nnzb, m, B]
            part = torch.bmm(xg, values.transpose(1, 2))                  # [nnzb, m, B]
            y[m0:m0 + step].index_add_(1, rows, part.transpose(0, 1).to(y.dtype))
        y = y.reshape(M, N)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(x2d.dtype)

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        t = packed.tensors()
        return block_linear_op(x2d, match_dtype(t["values"], x2d.dtype), t["col_idx"], t["row_ptr"], t["order"],
                               None if bias is None else bias.to(x2d.dtype), packed.shape[0])


register(BlockKernels())
