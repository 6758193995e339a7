"""2:4: two of every four consecutive inputs kept, in a layout made for coalesced loads.

Layout for W (N, K), G = K/4 groups per row:
  values (N, K/2)   the two kept values of every group, in position order;
  meta   (N, 2 * ceil(G/4)) uint8: per quad of four groups, a byte of their first positions
         then a byte of their second positions, two bits a group (group 4i + q at bits 2q of
         bytes 2i and 2i + 1). Read as a 32-bit word, eight groups' positions sit so that one
         shift and one mask put a group's two positions eight bits apart, from which one
         multiply-add makes the byte-permute selector that picks the group's two inputs (the
         word kernel). A 128-column tile of a row is 64 values and 16 metadata bytes, each one
         16-byte-aligned load when K is a multiple of 128.

Two implementations:
- ``triton``: three kernels. At M <= GEMV_MAX_M (16-bit values), an MMA-free GEMV: the word
  kernel where x, values and metadata can all be read as int32 words (unit-stride x, K a
  multiple of 32), which picks each group's inputs out of its two x words in registers (values
  and metadata through tensor descriptors on sm_90+ where ``tma_usable``); else, up to
  GATHER_MAX_M, a gathering kernel that reads two metadata bytes and gathers two inputs per
  group. Above
  GEMV_MAX_M, a kernel loads the packed tile, expands it to the dense tile in registers and feeds
  the tensor-core dot. All read about 56% of the dense weight bytes, so they serve the
  memory-bound regime (small M).
- ``cusparselt``: torch's cuSPARSELt binding on a compressed copy kept in ``Packed.aux``
  (``twofour_cslt.py``); it uses the sparse tensor cores and wins where the layer is
  compute-bound (large M).
``auto`` on the GPU picks ``cusparselt`` from ``crossover_m`` tokens on (the Packed's, set by a
planner from the fingerprint, else DEFAULT_CROSSOVER_M), when cuSPARSELt can take the shape and
dtype; ``triton`` otherwise.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsec.errors import SparsecError

from . import epilogue
from ._common import (LazyKernel, check_input, expect_tensor, grad_matmul, interpret_mode, m_bucket, match_dtype,
                      pdl_enabled, register_input_grad, split_count, tl_dot_precision)
from .packed import FormatKernels, register
from .partials import sum_partials
from .twofour_cslt import cslt_compressed, cslt_reason, output_layout, twofour_cslt_op

# cuSPARSELt from this M on when no planner set one: where it overtook the Triton kernel on the
# 14336x4096 layer on an H200 (docs/benchmarks.md; 128 on 4096x4096 and 4096x14336).
DEFAULT_CROSSOVER_M = 1024
# The MMA-free kernels serve M up to GEMV_MAX_M. On an H200 (bf16, docs/benchmarks.md, 2026-11) the
# word kernel beat the expansion + MMA kernel at M = 1 on all three benchmark shapes (1.6-2.0x).
# On an H100 (bf16, bench/small_m.py, 2026-12-05) it still won at M = 2 on all three (1.05-1.51x
# of cuBLAS against the MMA kernel's 0.76-1.04x) and lost from M = 4; the gathering GEMV, used
# where the word kernel cannot view its inputs, lost at M = 2 (0.80-0.99x), so it keeps M = 1
# (GATHER_MAX_M). GEMV_BLOCK_M caps the tokens a program of the gathering kernel takes.
GEMV_MAX_M = 2
GATHER_MAX_M = 1
# An expert bank's rows (``twofour_rows``) go one a program up to this many rows per expert on
# average, in tiles of one expert's rows above: on an H100 (Mixtral bank, 2026-12-05) one row a
# program won at 1 and 4 tokens (0.25 and 1 row an expert) and lost to the grouped kernel at 16
# (4 rows an expert), re-reading each expert's weight once per row. The tiles are not yet timed.
ROWS_TILES_FROM = 2
GEMV_BLOCK_M = 16
# Above GEMV_MAX_M and up to SPLIT_MAX_M tokens (16-bit inputs) the MMA kernel cuts K over
# several programs ("dot_split") where its unsplit launch leaves most SMs idle, that is where
# ``split_for`` asks for at least SPLIT_FROM chunks. On an H100 (bf16, bench/small_m.py,
# 2026-12-05) at M = 4-16 the split kernel ran 0.89-0.90x of cuBLAS against 0.77x unsplit on
# 4096x14336 (split 5) and 0.91-0.95x against 0.88-0.90x on 4096x4096 (5), and lost on 14336x4096
# (split 2: 0.93-0.98x against 1.05-1.13x); in a transformers Llama at 16 tokens the unsplit
# kernel ran the 1024x4096 down projection (16 programs of 64 rows) at 0.20x of cuBLAS.
SPLIT_MAX_M = 16
SPLIT_FROM = 3
# The expansion kernel reads metadata as int32 words where K is a multiple of 32 (False: bytes).
# On an H200 (bf16, M = 2 and 16, docs/history.md) words took from 1% more to 12%
# less time than bytes on the Llama-3-8B shapes; one int16 word per group took 2-3x as long.
DOT_META_WORDS = True
# The word kernel reads each weight byte once: its loads ask the cache to evict them first, so
# the input (read by every program) stays resident.
WEIGHT_EVICTION = "evict_first"


def _quad_shifts(device, dtype) -> torch.Tensor:
    """The bit offsets of the four groups a metadata byte pair holds, (4, 1), made on ``device``
    itself: a copy from the host is not allowed while a CUDA graph is being captured."""
    return (torch.arange(4, device=device, dtype=dtype) * 2)[:, None]


def meta_cols(groups: int) -> int:
    """Metadata bytes a row of ``groups`` groups takes: two per quad of groups."""
    return 2 * ((groups + 3) // 4)


def encode_positions(pos: torch.Tensor) -> torch.Tensor:
    """(N, G, 2) kept positions in 0..3 -> (N, meta_cols(G)) uint8 metadata."""
    N, G, _ = pos.shape
    p = pos.to(torch.int32)
    if G % 4:
        p = torch.cat([p, p.new_zeros(N, 4 - G % 4, 2)], dim=1)
    quads = p.reshape(N, -1, 4, 2) << _quad_shifts(p.device, torch.int32)
    return quads.sum(dim=2).reshape(N, -1).to(torch.uint8).contiguous()


def decode_positions(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``encode_positions``: (N, meta_cols(G)) uint8 -> (N, G, 2) int64 positions."""
    m = meta.to(torch.int64).reshape(meta.shape[0], -1, 1, 2)
    return ((m >> _quad_shifts(meta.device, torch.int64)) & 3).reshape(meta.shape[0], -1, 2)[:, :groups]


def expand(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """The dense (N, K) weight: kept values scattered back to their positions, zeros elsewhere."""
    N = values.shape[0]
    pos = decode_positions(meta, K // 4)
    dense = values.new_zeros(N, K // 4, 4)
    dense.scatter_(2, pos, values.reshape(N, K // 4, 2))
    return dense.reshape(N, K)


def _twofour_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, META_COLS,
                    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym, stride_yn,
                    M_BUCKET, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, META_WORDS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr = False,
                    SPLIT=1, stride_ys=0, PARTIAL: tl.constexpr = False):
    """Expansion + MMA. Each quad's two metadata bytes are spread to its four groups in registers
    by shifting broadcast copies: ``META_WORDS``, of the int32 words holding two quads
    (``meta_ptr`` the metadata viewed as int32); otherwise of each byte. ``SWAP`` (a configuration's
    choice) computes Y^T = W X^T, the expanded weight tile the MMA's first operand, as
    dequantising GEMMs feed their weights to the tensor cores straight from registers; else
    Y = X W^T. ``PARTIAL``: K is cut into SPLIT chunks of whole BLOCK_K tiles, a program each
    (grid axis 0 over N tiles times chunks), each writing its float32 partial product to
    y_ptr + chunk * stride_ys (no bias) for the caller to sum."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    chunk = pid_n % SPLIT
    pid_n = pid_n // SPLIT
    k_lo = 0
    k_hi = K
    if PARTIAL:
        per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
        k_lo = chunk * per
        k_hi = tl.minimum(k_lo + per, K)
    G: tl.constexpr = BLOCK_K // 4
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x K may pass 2**31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :],
                    mask=mask_n[:, None] & (offs_v[None, :] < K // 2), other=0.0)
        if META_WORDS:  # int32 words of two quads: one shifted copy per group, one reshape
            offs_w = k0 // 32 + tl.arange(0, G // 8)
            mw = tl.load(meta_ptr + offs_n[:, None] * stride_mn + offs_w[None, :],
                         mask=mask_n[:, None] & (offs_w[None, :] < META_COLS), other=0)
            slot = tl.arange(0, 8)
            first = (slot // 4) * 16 + (slot % 4) * 2
            mw3 = mw[:, :, None]
            code = tl.reshape(((mw3 >> first[None, None, :]) & 3) | (((mw3 >> (first + 8)[None, None, :]) & 3) << 2),
                              (BLOCK_N, G))
            p0 = code & 3
            p1 = code >> 2
        else:
            mb = tl.load(meta_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
                         mask=mask_n[:, None] & (offs_b[None, :] < META_COLS), other=0).to(tl.int32)
            b0, b1 = tl.split(tl.reshape(mb, (BLOCK_N, G // 4, 2)))
            quad = tl.arange(0, 4)[None, None, :] * 2
            p0 = tl.reshape((b0[:, :, None] >> quad) & 3, (BLOCK_N, G))
            p1 = tl.reshape((b1[:, :, None] >> quad) & 3, (BLOCK_N, G))
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
        zero = tl.zeros_like(v0)
        # positions are ordered (p0 < p1), so column 0 can only be p0's and column 3 only p1's
        d0 = tl.where(p0 == 0, v0, zero)
        d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
        d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
        d3 = tl.where(p1 == 3, v1, zero)
        w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
        if SWAP:
            acc_t = tl.dot(w, tl.trans(x), acc_t, input_precision=DOT_PREC)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
    if SWAP:
        acc = tl.trans(acc_t)
    if PARTIAL:
        tl.store(y_ptr + chunk.to(tl.int64) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _twofour_gemv_kernel(x_ptr, pair_ptr, meta_ptr, b_ptr, y_ptr, M, N, G,
                         stride_xm, stride_xk, stride_pn, stride_mn, stride_ym, stride_yn,
                         M_BUCKET, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """Small-M path: no expansion, no MMA. Each group's two kept 16-bit values are read as one
    int32 (16-byte loads of four groups per thread), the group's two position fields (one in each
    byte of its quad's metadata pair) pick the two inputs the group multiplies (gathered from x, which stays in L1), and fp32 partial products accumulate
    per lane across the K loop; one reduction at the end."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    vdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_G), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None, None] * stride_xm
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask_ng = mask_n[:, None] & (offs_g[None, :] < G)
        pair = tl.load(pair_ptr + offs_n[:, None] * stride_pn + offs_g[None, :], mask=mask_ng, other=0)
        m_ptrs = meta_ptr + offs_n[:, None] * stride_mn + (offs_g[None, :] // 4) * 2
        shift = (offs_g[None, :] & 3) * 2
        p0 = (tl.load(m_ptrs, mask=mask_ng, other=0).to(tl.int32) >> shift) & 3
        p1 = (tl.load(m_ptrs + 1, mask=mask_ng, other=0).to(tl.int32) >> shift) & 3
        v0 = (pair & 0xFFFF).to(tl.uint16).to(vdt, bitcast=True).to(tl.float32)
        v1 = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(vdt, bitcast=True).to(tl.float32)
        col0 = (offs_g[None, :] * 4 + p0).to(tl.int64)
        col1 = (offs_g[None, :] * 4 + p1).to(tl.int64)
        mask3 = mask_m[:, None, None] & mask_ng[None, :, :]
        x0 = tl.load(x_rows + col0[None, :, :] * stride_xk, mask=mask3, other=0.0).to(tl.float32)
        x1 = tl.load(x_rows + col1[None, :, :] * stride_xk, mask=mask3, other=0.0).to(tl.float32)
        acc += x0 * v0[None, :, :] + x1 * v1[None, :, :]
    out = tl.sum(acc, axis=2)
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _twofour_words_kernel(x_ptr, pair_ptr, meta_ptr, pair_desc, meta_desc, b_ptr, r_ptr, t_ptr, u_ptr, y_ptr, e_ptr,
                          M, N, G8, GATE_ROW, UP_ROW, R, E_ROWS, stride_xm, stride_pn, stride_mn, stride_rm, stride_rn, stride_tm,
                          stride_un, stride_ym, stride_yn,
                          HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
                          LOWRANK: tl.constexpr, BLOCK_R: tl.constexpr, EXPERTS: tl.constexpr,
                          USE_PRMT: tl.constexpr, WEIGHT_EVICTION: tl.constexpr, PDL: tl.constexpr, TMA: tl.constexpr,
                          USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    """Small-M path for contiguous inputs with K a multiple of 32: everything is read as 32-bit
    words. A tile is BLOCK_N rows by BLOCK_J runs of eight groups; a run's metadata is one word,
    its values eight words (two per group), and the inputs of its 32 columns 16 words (a group's
    four inputs are two words). A group's two inputs are picked out of its two input words in
    registers, no gathers and no byte loads: with USE_PRMT (CUDA) by one byte permute whose
    selector is one multiply-add of the group's positions; else (the interpreter, which runs no
    inline assembly) by selects and shifts that compute the same word. One token per program
    (grid axis 1). STAGES > 1 has Triton's pipeliner issue the next steps' loads ahead of this
    one's products. USE_TMA (a configuration's choice where TMA, descriptors passed): values and
    metadata come through the tensor-memory engine (``pair_desc``, ``meta_desc``: BLOCK_N rows
    by BLOCK_J runs, zero past the edges), which the pipeliner keeps STAGES tiles ahead.

    GATED (codegen/epilogue.py): output row n is silu(gate) * up of the stacked weight's rows
    GATE_ROW + n and UP_ROW + n, walked one after the other; HAS_RES adds r_ptr's row. LOWRANK
    (a sparse-plus-low-rank weight, codegen/plus_lowrank.py) adds U t for the token's t = V x, R
    values computed before the launch: each program reads its rows of U (BLOCK_N x R). PDL
    (``pdl_enabled``): wait for the launch ahead before the first load; once a program has
    streamed its weights, let the next launch start, so that launch overlaps this one's tail
    without holding resources while this one streams.

    EXPERTS (codegen/experts.py): the weight is a bank of experts stacked by rows, E_ROWS rows each,
    and token row m is multiplied by expert ``e_ptr[m]``'s rows alone."""
    HALVES: tl.constexpr = 2 if GATED else 1
    if PDL:
        tl.extra.cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_J)
    offs_e = tl.arange(0, 8)
    mask_n = offs_n < N
    # group e of a run: its first position at bit (e // 4) * 16 + (e % 4) * 2, its second 8 bits up
    shift = ((offs_e // 4) * 16 + (offs_e % 4) * 2)[None, None, :]
    if EXPERTS:
        e_rows = tl.load(e_ptr + pid_m).to(tl.int64) * E_ROWS
    else:
        e_rows = pid_m.to(tl.int64) * 0
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for h in tl.static_range(HALVES):
        src = offs_n + GATE_ROW + h * (UP_ROW - GATE_ROW) + e_rows
        acc = tl.zeros((BLOCK_N, BLOCK_J, 8), dtype=tl.float32)
        p_ptrs = (pair_ptr + src[:, None, None].to(tl.int64) * stride_pn
                  + offs_j[None, :, None] * 8 + offs_e[None, None, :])
        m_ptrs = meta_ptr + src[:, None].to(tl.int64) * stride_mn + offs_j[None, :]
        x_ptrs = (x_ptr + pid_m.to(tl.int64) * stride_xm
                  + (offs_j[:, None, None] * 16 + offs_e[None, :, None] * 2 + tl.arange(0, 2)[None, None, :]))
        row0 = (pid_n * BLOCK_N + GATE_ROW + h * (UP_ROW - GATE_ROW) + e_rows).to(tl.int32)
        for j0 in tl.range(0, G8, BLOCK_J, num_stages=STAGES):
            run = j0 + offs_j < G8
            if USE_TMA and TMA:
                pair = tl.reshape(pair_desc.load([row0, j0 * 8]), (BLOCK_N, BLOCK_J, 8))
                word = meta_desc.load([row0, j0])
            else:
                mask_nj = mask_n[:, None] & run[None, :]
                pair = tl.load(p_ptrs, mask=mask_nj[:, :, None], other=0, eviction_policy=WEIGHT_EVICTION)
                word = tl.load(m_ptrs, mask=mask_nj, other=0, eviction_policy=WEIGHT_EVICTION)
            lo, hi = tl.split(tl.load(x_ptrs, mask=run[:, None, None], other=0))
            lo = tl.broadcast_to(lo[None, :, :], (BLOCK_N, BLOCK_J, 8))   # inputs (x0, x1) of each group
            hi = tl.broadcast_to(hi[None, :, :], (BLOCK_N, BLOCK_J, 8))   # and (x2, x3)
            both = (word[:, :, None] >> shift) & 0x0303                   # p0 | p1 << 8
            if USE_PRMT:
                # bytes 2p, 2p + 1 of (lo, hi) are input p: selector nibbles 2p0, 2p0+1, 2p1, 2p1+1
                picked = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                                   [lo, hi, both * 0x22 + 0x1010], dtype=tl.int32,
                                                   is_pure=True, pack=1)
            else:
                p0 = both & 3
                p1 = both >> 8
                xa = tl.where(p0 >= 2, hi, lo)
                xb = tl.where(p1 >= 2, hi, lo)
                picked = ((xa >> ((p0 & 1) * 16)) & 0xFFFF) | (((xb >> ((p1 & 1) * 16)) & 0xFFFF) << 16)
            # picked = (x[p0], x[p1]) as one word, like pair = (v0, v1)
            if IS_BF16:
                v0 = (pair << 16).to(tl.float32, bitcast=True)
                v1 = (pair & -65536).to(tl.float32, bitcast=True)
                x0 = (picked << 16).to(tl.float32, bitcast=True)
                x1 = (picked & -65536).to(tl.float32, bitcast=True)
            else:
                v0 = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                v1 = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                x0 = (picked & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                x1 = ((picked >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            acc += x0 * v0 + x1 * v1
            p_ptrs += BLOCK_J * 8
            m_ptrs += BLOCK_J
            x_ptrs += BLOCK_J * 16
        part = tl.sum(tl.sum(acc, axis=2), axis=1)
        if HAS_BIAS:
            part += tl.load(b_ptr + src, mask=mask_n, other=0.0).to(tl.float32)
        if h == 0:
            out = part
        else:
            out = out * tl.sigmoid(out) * part
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if LOWRANK:
        offs_r = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + offs_r
            t = tl.load(t_ptr + pid_m.to(tl.int64) * stride_tm + rr, mask=rr < R, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs_n[:, None].to(tl.int64) * stride_un + rr[None, :],
                        mask=mask_n[:, None] & (rr < R)[None, :], other=0.0).to(tl.float32)
            out += tl.sum(u * t[None, :], axis=1)
    if HAS_RES:
        out += tl.load(r_ptr + pid_m.to(tl.int64) * stride_rm + offs_n * stride_rn, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n * stride_yn, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def _twofour_tokens_kernel(x_ptr, pair_ptr, meta_ptr, b_ptr, r_ptr, y_ptr, ends_ptr, tiles_ptr, tile_expert_ptr,
                           M, N, G8, GATE_ROW, UP_ROW, E, E_ROWS, TILE,
                           stride_xm, stride_pn, stride_mn, stride_rm, stride_rn, stride_ym, stride_yn, M_BUCKET,
                           HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, GATED: tl.constexpr,
                           HAS_RES: tl.constexpr, EXPERTS: tl.constexpr, USE_PRMT: tl.constexpr,
                           WEIGHT_EVICTION: tl.constexpr, TOKENS: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_J: tl.constexpr):
    """The word kernel's reads for TOKENS tokens a program (grid axis 1 over token tiles): each
    weight and metadata word is loaded and decoded once and multiplied into every token's
    accumulator, so M tokens read the weight cdiv(M, TOKENS) times instead of M. Each token's
    inputs are picked from its own input words as the word kernel picks them (USE_PRMT: one byte
    permute). The word kernel's GATED and HAS_RES epilogues; no low-rank term, no descriptors.

    EXPERTS: the weight is a bank of experts stacked by rows, E_ROWS rows each; x's rows are sorted
    by expert and a program serves one tile of TOKENS (= TILE) rows of one expert (the tile map of
    ``codegen.experts.sorted_runs``: ``ends_ptr``, ``tiles_ptr``, ``tile_expert_ptr``), so an expert's
    weight is read once per tile of its rows."""
    HALVES: tl.constexpr = 2 if GATED else 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if EXPERTS:
        e = tl.load(tile_expert_ptr + pid_m)
        if e >= E:
            return
        run_start = tl.where(e > 0, tl.load(ends_ptr + e - 1, mask=e > 0, other=0), 0)
        run_end = tl.load(ends_ptr + e)
        first_tile = tl.where(e > 0, tl.load(tiles_ptr + e - 1, mask=e > 0, other=0), 0)
        offs_t = run_start + (pid_m - first_tile) * TOKENS + tl.arange(0, TOKENS)
        mask_t = offs_t < run_end
        e_rows = e.to(tl.int64) * E_ROWS
    else:
        offs_t = pid_m * TOKENS + tl.arange(0, TOKENS)
        mask_t = offs_t < M
        e_rows = pid_m.to(tl.int64) * 0
    offs_j = tl.arange(0, BLOCK_J)
    offs_e = tl.arange(0, 8)
    mask_n = offs_n < N
    shift = ((offs_e // 4) * 16 + (offs_e % 4) * 2)[None, None, :]
    full: tl.constexpr = (TOKENS, BLOCK_N, BLOCK_J, 8)
    out = tl.zeros((TOKENS, BLOCK_N), dtype=tl.float32)
    for h in tl.static_range(HALVES):
        src = offs_n + GATE_ROW + h * (UP_ROW - GATE_ROW) + e_rows
        acc = tl.zeros(full, dtype=tl.float32)
        p_ptrs = (pair_ptr + src[:, None, None].to(tl.int64) * stride_pn
                  + offs_j[None, :, None] * 8 + offs_e[None, None, :])
        m_ptrs = meta_ptr + src[:, None].to(tl.int64) * stride_mn + offs_j[None, :]
        x_ptrs = (x_ptr + offs_t[:, None, None, None].to(tl.int64) * stride_xm
                  + (offs_j[None, :, None, None] * 16 + offs_e[None, None, :, None] * 2
                     + tl.arange(0, 2)[None, None, None, :]))
        for j0 in range(0, G8, BLOCK_J):
            run = j0 + offs_j < G8
            mask_nj = mask_n[:, None] & run[None, :]
            pair = tl.load(p_ptrs, mask=mask_nj[:, :, None], other=0, eviction_policy=WEIGHT_EVICTION)
            word = tl.load(m_ptrs, mask=mask_nj, other=0, eviction_policy=WEIGHT_EVICTION)
            lo, hi = tl.split(tl.load(x_ptrs, mask=mask_t[:, None, None, None] & run[None, :, None, None], other=0))
            lo = tl.broadcast_to(lo[:, None, :, :], full)   # each token's inputs (x0, x1) of each group
            hi = tl.broadcast_to(hi[:, None, :, :], full)   # and (x2, x3)
            both = tl.broadcast_to(((word[:, :, None] >> shift) & 0x0303)[None, :, :, :], full)  # p0 | p1 << 8
            if USE_PRMT:
                picked = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                                   [lo, hi, both * 0x22 + 0x1010], dtype=tl.int32,
                                                   is_pure=True, pack=1)
            else:
                p0 = both & 3
                p1 = both >> 8
                xa = tl.where(p0 >= 2, hi, lo)
                xb = tl.where(p1 >= 2, hi, lo)
                picked = ((xa >> ((p0 & 1) * 16)) & 0xFFFF) | (((xb >> ((p1 & 1) * 16)) & 0xFFFF) << 16)
            if IS_BF16:
                v0 = (pair << 16).to(tl.float32, bitcast=True)
                v1 = (pair & -65536).to(tl.float32, bitcast=True)
                x0 = (picked << 16).to(tl.float32, bitcast=True)
                x1 = (picked & -65536).to(tl.float32, bitcast=True)
            else:
                v0 = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                v1 = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                x0 = (picked & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
                x1 = ((picked >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            acc += x0 * v0[None, :, :, :] + x1 * v1[None, :, :, :]
            p_ptrs += BLOCK_J * 8
            m_ptrs += BLOCK_J
            x_ptrs += BLOCK_J * 16
        part = tl.sum(tl.sum(acc, axis=3), axis=2)
        if HAS_BIAS:
            part += tl.load(b_ptr + src, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if h == 0:
            out = part
        else:
            out = out * tl.sigmoid(out) * part
    mask = mask_t[:, None] & mask_n[None, :]
    if HAS_RES:
        out += tl.load(r_ptr + offs_t[:, None].to(tl.int64) * stride_rm + offs_n[None, :] * stride_rn, mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_t[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn,
             out.to(y_ptr.dtype.element_ty), mask=mask)


def _tma_block_shapes(nargs) -> None:
    """Set the descriptors' tiles to the configuration's (a valid placeholder where it reads
    through pointers: the launch encodes every descriptor it is passed)."""
    if nargs.get("pair_desc") is None:
        return
    tma = nargs["USE_TMA"]
    nargs["pair_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_J"] * 8] if tma else [1, 8]
    nargs["meta_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_J"]] if tma else [1, 4]


def _words_configs():
    out = []
    # Through the tensor-memory engine, pipelined (listed first, so the interpreter checks one).
    # On an H200 at M = 1 (docs/history.md, the fused-epilogue sweeps) (16, 8, 2, 3) was fastest on
    # the gated 28672 x 4096 launch (35.3 us) and (8, 16, 2, 4) on the residual 4096 x 14336 one
    # (21.0 us), each 10% ahead of the best pointer configuration in the same sweep.
    for bn, bj, w, s in ((16, 8, 2, 3), (8, 16, 2, 4), (16, 16, 8, 3), (8, 8, 2, 4), (16, 8, 4, 6), (16, 8, 2, 4),
                         (16, 8, 4, 4), (8, 16, 4, 3), (8, 16, 2, 3), (32, 8, 4, 4), (8, 8, 2, 3)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "STAGES": s, "USE_TMA": True}, num_warps=w,
                                 num_stages=s, pre_hook=_tma_block_shapes))
    for bn, bj, w in ((4, 16, 4), (16, 8, 4), (1, 64, 4), (2, 32, 4), (8, 8, 4), (2, 64, 8), (4, 32, 8),
                      (1, 32, 2), (8, 16, 8), (4, 8, 2), (16, 16, 8), (32, 8, 8), (8, 32, 8), (16, 4, 2)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "STAGES": 1, "USE_TMA": False}, num_warps=w,
                                 num_stages=4, pre_hook=_tma_block_shapes))
    # Pipelined pointer loads lost on an H200 at M = 1 on all three benchmark shapes (best of ten:
    # 26.0 / 9.8 / 27.1 us against 23.1 / 9.6 / 25.4 us unpipelined, docs/benchmarks.md).
    return out


def _words_keep(config, args) -> bool:
    """No run tile wider than the row; the fp32 accumulator within 32 registers a thread; where
    descriptors were passed only the tiles through the tensor-memory engine (at most 256 words
    wide, at least 16 bytes, within the weight; each of these eleven beat every pointer
    configuration on one or both benchmark launches on an H200), else only pointer loads."""
    kw = config.kwargs
    per_thread = kw["BLOCK_N"] * kw["BLOCK_J"] * 8 // (32 * config.num_warps)
    if kw["USE_TMA"] != bool(args["TMA"]):
        return False
    if kw["USE_TMA"] and not (4 <= kw["BLOCK_J"] <= min(32, args["G8"]) and kw["BLOCK_N"] <= args["N"]):
        return False
    return kw["BLOCK_J"] <= max(8, triton.next_power_of_2(args["G8"])) and per_thread <= 32


_WORDS_KERNEL = LazyKernel(_twofour_words_kernel, _words_configs(),
                           key=["N", "G8", "IS_BF16", "GATED", "TMA", "LOWRANK", "EXPERTS"],
                           prune=_words_keep)


def _tokens_configs():
    out = []
    for t in (2, 4, 8, 16):
        for bn, bj, w in ((4, 8, 4), (2, 16, 4), (8, 4, 4), (1, 32, 4), (4, 16, 8), (2, 8, 2)):
            out.append(triton.Config({"TOKENS": t, "BLOCK_N": bn, "BLOCK_J": bj}, num_warps=w, num_stages=4))
    return out


def _tokens_keep(config, args) -> bool:
    """A token tile no larger than M's bucket (and at least half of it: smaller tiles read the
    weight more often), or for experts the tile the map was made for; TOKENS accumulators within 64
    registers a thread; no run tile wider than the row."""
    kw = config.kwargs
    bucket = args["M_BUCKET"]
    if args["EXPERTS"]:
        if kw["TOKENS"] != args["TILE"]:
            return False
    elif not (kw["TOKENS"] <= max(2, bucket) and 2 * kw["TOKENS"] >= min(bucket, 16)):
        return False
    per_thread = kw["TOKENS"] * kw["BLOCK_N"] * kw["BLOCK_J"] * 8 // (32 * config.num_warps)
    return kw["BLOCK_J"] <= max(8, triton.next_power_of_2(args["G8"])) and per_thread <= 64


# for one weight slower than the word and MMA kernels at every M on an H100 (docs/benchmarks.md): no
# automatic path of a layer takes it (twofour_triton(path="tokens") forces it); expert banks' rows
# implementation sends it tiles of one expert's rows (twofour_rows)
_TOKENS_KERNEL = LazyKernel(_twofour_tokens_kernel, _tokens_configs(),
                            key=["M_BUCKET", "N", "G8", "IS_BF16", "GATED", "HAS_RES", "EXPERTS", "TILE"],
                            prune=_tokens_keep)


def _gemv_configs():
    out = []
    for bn, bg, w in ((1, 512, 4), (2, 256, 4), (4, 128, 4), (8, 64, 4), (4, 256, 8), (2, 128, 4)):
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_G": bg}, num_warps=w, num_stages=4))
    return out


def _gemv_keep(config, args) -> bool:
    """No group tile wider than K; the fp32 accumulator within 32 registers a thread (the two
    gathered input tiles are as large again), so token tiles of 16 take the narrower tiles."""
    kw = config.kwargs
    per_thread = args["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_G"] // (32 * config.num_warps)
    return kw["BLOCK_G"] <= max(64, triton.next_power_of_2(args["G"])) and per_thread <= 32


_GEMV_KERNEL = LazyKernel(_twofour_gemv_kernel, _gemv_configs(), key=["M_BUCKET", "N", "G"], prune=_gemv_keep)


def _configs():
    out = []
    for bn in (16, 32, 64):  # small M: narrow N tiles so enough programs stream the weight
        for bk in (128, 256):
            out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=4))
    # small M with the weight tile as the MMA's first operand (``SWAP``): not yet timed on a GPU;
    # the autotuner keeps whichever orientation measures faster per shape
    for bn, bk, w in ((64, 128, 4), (64, 256, 4), (128, 128, 8), (32, 256, 4)):
        out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": True}, num_warps=w,
                                 num_stages=4))
    for bm, bn, bk, w in ((32, 64, 128, 4), (64, 64, 128, 4), (64, 128, 64, 8), (128, 128, 64, 8), (128, 64, 64, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3))
    return out


def _keep(config, args) -> bool:
    """Tiles sized to the token count: BLOCK_M 16 up to M=16, then no larger than M's bucket."""
    kw = config.kwargs
    bucket = args["M_BUCKET"]
    if kw["BLOCK_K"] > max(32, triton.next_power_of_2(args["K"])):
        return False
    if bucket <= 16:
        return kw["BLOCK_M"] == 16
    return 16 < kw["BLOCK_M"] <= bucket


_KERNEL = LazyKernel(_twofour_kernel, _configs(), key=["M_BUCKET", "N", "K", "META_WORDS", "PARTIAL"], prune=_keep)


def gemv_usable(x, values, M: int) -> bool:
    """Whether the small-M kernel serves this call: 16-bit values (read in pairs as int32), an
    int32-aligned contiguous values tensor, and M within GEMV_MAX_M."""
    return (M <= GEMV_MAX_M and x.dtype in (torch.float16, torch.bfloat16) and values.dtype == x.dtype
            and values.is_contiguous() and values.storage_offset() % 2 == 0)


def words_usable(x, values, meta) -> bool:
    """Whether the word-reading small-M kernel can view x, values and metadata as int32: 16-bit
    x with unit stride along K, K a multiple of 32 (whole metadata words), aligned storage."""
    K = x.shape[1]
    return (x.dtype in (torch.float16, torch.bfloat16) and values.dtype == x.dtype and K % 32 == 0
            and x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0
            and values.is_contiguous() and values.storage_offset() % 2 == 0
            and meta.is_contiguous() and meta.storage_offset() % 4 == 0)


def prmt_usable(x) -> bool:
    """Whether the word kernel may use the byte-permute instruction: compiled for an NVIDIA GPU,
    not run by the interpreter (which runs no inline assembly, even on CUDA tensors)."""
    return x.is_cuda and torch.version.hip is None and not interpret_mode()


def tma_usable(x, pairs, meta32, n_out: int | None = None) -> bool:
    """Whether the word kernel may read values and metadata through tensor descriptors: on sm_90+
    (or the interpreter, which emulates them), 16-byte aligned bases and row strides (K a multiple
    of 128 for the metadata's), and at least 8 output rows and 8 runs, so that the smallest tiles
    (8 x 8) fit inside the weight. ``SPARSEC_TMA=0`` turns it off."""
    if os.environ.get("SPARSEC_TMA", "1") == "0":
        return False
    if (pairs.shape[0] if n_out is None else n_out) < 8 or meta32.shape[1] < 8:
        return False
    if not interpret_mode():
        if not x.is_cuda or torch.version.hip is not None or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.stride(0) * 4) % 16 == 0 for t in (pairs, meta32))


def twofour_triton(x, values, meta, bias, path: str | None = None, residual=None,
                   gate_row: int = -1, up_row: int = -1, width: int = 0, lowrank=None):
    """``path``: "words" or "gemv" (small-M kernels), "tokens" (the word kernel's reads, several
    tokens a program: slower than the word and MMA kernels at every M on an H100, docs/benchmarks.md;
    never chosen by None), "dot" (expansion + MMA), "dot_split" (the same
    with K cut over several programs, ``split_for``; float32 partials summed after) or None (by M,
    see GEMV_MAX_M; "words" where ``words_usable``; "dot_split" where SPLIT_FROM says it pays).

    ``residual``, ``gate_row``, ``up_row``, ``width``: the epilogue (codegen/epilogue.py), fused
    in the word kernel; the other kernels write their product and the epilogue follows in torch.
    ``lowrank``: (t, u), a low-rank term U t added per token (t = x V^T, M x R; u, N x R), in the
    word kernel's epilogue; elsewhere as a residual made in torch."""
    M, K = x.shape
    N = values.shape[0]
    gated = gate_row >= 0
    if path is None:
        path = "dot"
        if gemv_usable(x, values, M):
            path = "words" if words_usable(x, values, meta) else ("gemv" if M <= GATHER_MAX_M else "dot")
        elif M <= SPLIT_MAX_M and x.dtype in (torch.float16, torch.bfloat16) and _chunks(N, K, x.device) >= SPLIT_FROM:
            path = "dot_split"
    if lowrank is not None and (path != "words" or gated):
        t, u = lowrank
        low = (t @ u.t()).to(x.dtype)
        residual = low if residual is None else residual + low
        lowrank = None
    if path not in ("words", "tokens") and (gated or residual is not None):
        return epilogue.apply(twofour_triton(x, values, meta, bias, path), gate_row, up_row, width, residual)
    y = torch.empty(M, width if gated else N, device=x.device, dtype=x.dtype)
    if path == "words":
        return _words(x, values, meta, y, bias, residual, lowrank, gate_row, up_row)
    if path == "tokens":
        return _tokens(x, values, meta, y, bias, residual, gate_row, up_row)
    if path == "gemv":
        pairs = values.view(torch.int32)
        block_m = min(triton.next_power_of_2(M), GEMV_BLOCK_M)

        def grid_gemv(meta_):
            return (triton.cdiv(N, meta_["BLOCK_N"]), triton.cdiv(M, block_m))

        _GEMV_KERNEL[grid_gemv](x, pairs, meta, y if bias is None else bias, y, M, N, K // 4,
                                x.stride(0), x.stride(1), pairs.stride(0), meta.stride(0), y.stride(0),
                                y.stride(1), m_bucket(M), HAS_BIAS=bias is not None, BLOCK_M=block_m)
        return y

    split = split_for(N, K, x.device) if path == "dot_split" else 1

    def grid(meta_):
        return (triton.cdiv(N, meta_["BLOCK_N"]) * split, triton.cdiv(M, meta_["BLOCK_M"]))

    words = (DOT_META_WORDS and K % 32 == 0 and meta.stride(1) == 1 and meta.stride(0) % 4 == 0
             and meta.storage_offset() % 4 == 0)
    m = meta.view(torch.int32) if words else meta
    if split > 1:
        parts = torch.empty(split, M, N, device=x.device, dtype=torch.float32)
        _KERNEL[grid](x, values, m, parts, parts, M, N, K, m.shape[1],
                      x.stride(0), x.stride(1), values.stride(0), m.stride(0), parts.stride(1), parts.stride(2),
                      m_bucket(M), HAS_BIAS=False, DOT_PREC=tl_dot_precision(x.dtype), META_WORDS=words,
                      SPLIT=split, stride_ys=parts.stride(0), PARTIAL=True)
        return sum_partials(parts, bias, x.dtype)
    _KERNEL[grid](x, values, m, y if bias is None else bias, y, M, N, K, m.shape[1],
                  x.stride(0), x.stride(1), values.stride(0), m.stride(0), y.stride(0), y.stride(1),
                  m_bucket(M), HAS_BIAS=bias is not None, DOT_PREC=tl_dot_precision(x.dtype), META_WORDS=words)
    return y


SPLIT_MIN_K = 1024  # "dot_split" cuts no chunk of K shorter: a few tiles would not pay their partial's write


def split_for(N: int, K: int, device) -> int:
    """Chunks of K for the "dot_split" path: ``_common.split_count`` over 16-row tiles, no chunk
    under ``SPLIT_MIN_K`` columns."""
    return _chunks(N, K, device)


def _chunks(N: int, K: int, device) -> int:
    """``split_for``'s count, read where the path is chosen (``split_for`` is what the split path calls)."""
    return max(1, min(split_count(-(-N // 16), device), K // SPLIT_MIN_K))


def _words(x, values, meta, y, bias, residual, lowrank, gate_row: int, up_row: int, experts=None):
    """Launch the word kernel into ``y`` (``twofour_triton``'s arguments); ``experts``: (the expert of
    each row of x, rows per expert) where values and metadata stack a bank's experts by rows."""
    M, K = x.shape
    x32 = x.view(torch.int32)
    pairs, meta32 = values.view(torch.int32), meta.view(torch.int32)
    gated = gate_row >= 0
    r = y if residual is None else residual
    pdl = pdl_enabled(x)

    def grid_words(meta_):
        return (triton.cdiv(y.shape[1], meta_["BLOCK_N"]), M)

    tma = tma_usable(x, pairs, meta32, y.shape[1])
    pair_desc = TensorDescriptor.from_tensor(pairs, [1, 8]) if tma else None
    meta_desc = TensorDescriptor.from_tensor(meta32, [1, 4]) if tma else None
    t, u = (lowrank[0].contiguous(), lowrank[1].contiguous()) if lowrank is not None else (y, y)
    R = u.shape[1] if lowrank is not None else 0
    expert_of_row, rows_per_expert = experts if experts is not None else (y, 0)
    _WORDS_KERNEL[grid_words](x32, pairs, meta32, pair_desc, meta_desc, y if bias is None else bias, r, t, u, y,
                              expert_of_row, M, y.shape[1], K // 32, max(gate_row, 0), max(up_row, 0), R,
                              rows_per_expert, x32.stride(0), pairs.stride(0), meta32.stride(0), r.stride(0),
                              r.stride(1), t.stride(0), u.stride(0), y.stride(0), y.stride(1),
                              HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16, GATED=gated,
                              HAS_RES=residual is not None, LOWRANK=lowrank is not None,
                              BLOCK_R=min(64, max(16, triton.next_power_of_2(max(R, 1)))), EXPERTS=experts is not None,
                              USE_PRMT=prmt_usable(x), WEIGHT_EVICTION=WEIGHT_EVICTION, PDL=pdl, TMA=tma,
                              **({"launch_pdl": True} if pdl else {}))
    return y


def _tokens(x, values, meta, y, bias, residual, gate_row: int, up_row: int, experts=None):
    """Launch the multi-token word kernel into ``y`` (``twofour_triton``'s arguments; inputs as
    ``words_usable`` asks); ``experts``: (the expert of each row of x, sorted; rows per expert; the
    number of experts; rows a tile) where values and metadata stack a bank's experts by rows."""
    if not words_usable(x, values, meta):
        raise ValueError("the 2:4 'tokens' path reads x, values and metadata as int32 words: it needs 16-bit x "
                         "with unit stride along K, K a multiple of 32 and aligned contiguous values and metadata")
    M, K = x.shape
    x32, pairs, meta32 = x.view(torch.int32), values.view(torch.int32), meta.view(torch.int32)

    r = y if residual is None else residual
    if experts is None:
        ends = tiles = tile_expert = y
        E = E_ROWS = tile = 0
    else:
        from .experts import sorted_runs

        expert_of_row, E_ROWS, E, tile = experts
        _, ends, tiles, tile_expert = sorted_runs(expert_of_row, E, tile)  # rows already in expert order

    def grid(meta_):
        tiles_ = tile_expert.shape[0] if experts is not None else triton.cdiv(M, meta_["TOKENS"])
        return (triton.cdiv(y.shape[1], meta_["BLOCK_N"]), tiles_)

    _TOKENS_KERNEL[grid](x32, pairs, meta32, y if bias is None else bias, r, y, ends, tiles, tile_expert, M, y.shape[1],
                         K // 32, max(gate_row, 0), max(up_row, 0), E, E_ROWS, tile, x32.stride(0), pairs.stride(0),
                         meta32.stride(0), r.stride(0), r.stride(1), y.stride(0), y.stride(1), m_bucket(M),
                         HAS_BIAS=bias is not None, IS_BF16=x.dtype == torch.bfloat16, GATED=gate_row >= 0,
                         HAS_RES=residual is not None, EXPERTS=experts is not None, USE_PRMT=prmt_usable(x),
                         WEIGHT_EVICTION=WEIGHT_EVICTION)
    return y


def twofour_rows(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, expert_of_row: torch.Tensor,
                 gate_row: int = -1, up_row: int = -1, width: int = 0) -> torch.Tensor:
    """Row s of x times expert ``expert_of_row[s]``'s 2:4 weight (``values`` (E, N, K/2), ``meta``
    (E, N, bytes)), by the word kernel: an expert bank at decode, where each expert serves about one
    token and a tensor-core tile would be mostly padding. Each row reads its expert's packed weight
    once; rows of one expert run side by side in the launch, so their reads of it meet in L2.
    ``gate_row``, ``up_row``, ``width``: the fused SwiGLU epilogue (``twofour_triton``).
    Needs ``words_usable`` (16-bit, K a multiple of 32). Past ROWS_TILES_FROM rows per expert on
    average the rows go in tiles of up to 16 rows of one expert to the multi-token word kernel,
    which reads the expert's weight once per tile."""
    E, N, half = values.shape
    S = x.shape[0]
    y = torch.empty(S, width if gate_row >= 0 else N, device=x.device, dtype=x.dtype)
    if S == 0:
        return y
    flat_values, flat_meta = values.reshape(E * N, half), meta.reshape(E * N, meta.shape[2])
    if S > ROWS_TILES_FROM * E:
        tile = min(16, triton.next_power_of_2(-(-S // E)))
        return _tokens(x, flat_values, flat_meta, y, None, None, gate_row, up_row, experts=(expert_of_row, N, E, tile))
    return _words(x, flat_values, flat_meta, y, None, None, None, gate_row, up_row,
                  experts=(expert_of_row.to(torch.int32), N))


@torch.library.custom_op("sparsec::twofour_linear", mutates_args=())
def twofour_linear_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ W^T + bias, W the 2:4 weight in the packed layout above, expanded on chip."""
    return twofour_triton(x, values, meta, bias)


@twofour_linear_op.register_fake
def twofour_linear_fake(x, values, meta, bias):
    return x.new_empty(x.shape[0], values.shape[0])


register_input_grad(twofour_linear_op, lambda dy, values, meta, n_in: grad_matmul(dy, expand(values, meta, n_in)),
                    saved=(1, 2), bias_index=3)


@torch.library.custom_op("sparsec::twofour_linear_epilogue", mutates_args=())
def twofour_epilogue_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                        residual: Optional[torch.Tensor], gate_row: int, up_row: int, width: int) -> torch.Tensor:
    """The 2:4 linear with its epilogue (codegen/epilogue.py) in the launch where the word kernel
    serves it."""
    return twofour_triton(x, values, meta, bias, residual=residual, gate_row=gate_row, up_row=up_row, width=width)


@twofour_epilogue_op.register_fake
def twofour_epilogue_fake(x, values, meta, bias, residual, gate_row, up_row, width):
    return x.new_empty(x.shape[0], width if gate_row >= 0 else values.shape[0])


epilogue.register_grad(twofour_epilogue_op, lambda values, meta, n_in: expand(values, meta, n_in),
                       saved=(1, 2), bias_index=3, residual_index=4)


@torch.library.custom_op("sparsec::twofour_lowrank_linear", mutates_args=())
def twofour_lowrank_op(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor],
                       t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T + bias + t @ u^T: the 2:4 product with a low-rank term (t = x V^T computed before)
    added in the word kernel's epilogue (codegen/plus_lowrank.py)."""
    return twofour_triton(x, values, meta, bias, lowrank=(t, u))


@twofour_lowrank_op.register_fake
def twofour_lowrank_fake(x, values, meta, bias, t, u):
    return x.new_empty(x.shape[0], values.shape[0])


class TwoFourKernels(FormatKernels):
    family = "2:4"
    names = ("values", "meta")
    impls = ("triton", "cusparselt")

    def epilogue_pays(self, M: int) -> bool:
        return M <= GEMV_MAX_M

    def fast_epilogue(self, x2d, packed, bias, ep, residual, impl, aux):
        if impl != "triton":
            return super().fast_epilogue(x2d, packed, bias, ep, residual, impl, aux)
        check_input(x2d)
        t = packed.tensors()
        return twofour_epilogue_op(x2d, match_dtype(t["values"], x2d.dtype), t["meta"],
                                   None if bias is None else bias.to(x2d.dtype), residual,
                                   ep.gate_row, ep.up_row, ep.width)

    def fast_lowrank(self, x2d, packed, bias, t, u, impl):
        """The product plus t @ u^T in one launch where the word kernel serves it (up to GEMV_MAX_M
        tokens), no gradient wanted (the fused op has none; the unfused path does)."""
        if impl != "triton" or x2d.shape[0] > GEMV_MAX_M or (torch.is_grad_enabled() and x2d.requires_grad):
            return None
        t_ = packed.tensors()
        values = match_dtype(t_["values"], x2d.dtype)
        if not (gemv_usable(x2d, values, x2d.shape[0]) and words_usable(x2d, values, t_["meta"])):
            return None
        check_input(x2d)
        return twofour_lowrank_op(x2d, values, t_["meta"], None if bias is None else bias.to(x2d.dtype), t, u)

    def stack_rows(self, spec, parts):
        """Row-major values and metadata: stacking rows is concatenating both along N."""
        return {name: torch.cat([p[name] for p in parts]).contiguous() for name in self.names}

    def pack(self, spec, weight):
        N, K = weight.shape
        groups = weight.reshape(N, K // 4, 4)
        pos = groups.abs().topk(2, dim=-1).indices.sort(dim=-1).values
        return {"values": groups.gather(2, pos).reshape(N, K // 2).contiguous(),
                "meta": encode_positions(pos)}

    def validate(self, spec, shape, tensors):
        N, K = shape
        values = expect_tensor(tensors, "values", (N, K // 2), floating=True)
        meta = expect_tensor(tensors, "meta", (N, meta_cols(K // 4)), floating=False)
        if meta.dtype != torch.uint8:
            raise SparsecError(f"packed tensor 'meta' must be uint8, got {meta.dtype}")
        pos = decode_positions(meta, K // 4)
        if bool((pos[..., 0] >= pos[..., 1]).any()):
            raise SparsecError("packed 2:4 metadata names the same or unordered positions in a group")
        return {"values": values.contiguous(), "meta": meta.contiguous()}

    def to_dense(self, spec, shape, tensors):
        return expand(tensors["values"], tensors["meta"], shape[1])

    def reference(self, x2d, packed, bias):
        t = packed.tensors()
        w = expand(match_dtype(t["values"], x2d.dtype), t["meta"], packed.shape[1])
        return F.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))

    def prepare(self, packed, impl):
        """On CUDA, the cuSPARSELt copy for 'auto' and 'cusparselt' (it costs ~half the dense weight)."""
        if impl in ("auto", "cusparselt") and cslt_reason(*packed.shape, packed.dtype, packed.device) is None:
            return {"cslt": cslt_compressed(packed)}
        return {}

    def auto_impl(self, x2d, packed):
        impl = super().auto_impl(x2d, packed)
        if impl == "triton" and x2d.is_cuda:
            crossover = packed.crossover_m if packed.crossover_m is not None else DEFAULT_CROSSOVER_M
            if x2d.shape[0] >= crossover and cslt_reason(*packed.shape, x2d.dtype, x2d.device) is None:
                return "cusparselt"
        return impl

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        b = None if bias is None else bias.to(x2d.dtype)
        if impl == "cusparselt" and torch.is_grad_enabled() and x2d.requires_grad:
            impl = "triton"  # cuSPARSELt's compressed weight has no transpose to pass a gradient back through
        if impl == "cusparselt":
            reason = cslt_reason(*packed.shape, x2d.dtype, x2d.device)
            if reason:
                raise SparsecError(f"impl 'cusparselt' cannot run: {reason}")
            if packed.dtype != x2d.dtype:
                raise SparsecError(f"impl 'cusparselt' needs x in the weight's dtype {packed.dtype}, got {x2d.dtype}")
            return twofour_cslt_op(x2d, cslt_compressed(packed), b, packed.shape[0], output_layout())
        t = packed.tensors()
        return twofour_linear_op(x2d, match_dtype(t["values"], x2d.dtype), t["meta"], b)


register(TwoFourKernels())
