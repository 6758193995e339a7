"""Expert banks (mixture of experts): y[t] = sum over the token's top-k experts e of
w[t, e] * down_e(silu(gate_e(x[t])) * up_e(x[t])), the SwiGLU experts of Mixtral, Qwen-MoE and
DeepSeek-MoE, as one op with four implementations.

Layout, as transformers 5.x stores a bank: ``gate_up`` (E, 2I, H) with each expert's gate rows
first and its up rows after, ``down`` (E, H, I); ``top_k_index`` (T, k) integer and
``top_k_weights`` (T, k) from the router. Which implementation is fastest depends on the tokens
per expert, so the op takes it as an argument:

- ``loop``: one pair of GEMMs per expert that received tokens (found on the host: a sync per
  bank, no CUDA graph). The plain reading, and the reference.
- ``batched``: every (token, slot) pair gathers its expert's weights and multiplies them
  (batched matrix-vector products): no sync, but it moves T k (3 I H) weight values, so it pays
  only at a few tokens.
- ``dense_all``: every token through every expert (E batched GEMMs), the outputs combined with
  the routing weights (zero for experts not chosen): E/k times the FLOPs, no gather, no sync.
- ``grouped``: the (token, slot) pairs sorted by expert and one Triton grouped GEMM per
  projection over the runs (as vLLM's fused MoE): each expert's weights read once, a launch grid
  sized by T k and E alone (CUDA-graph safe). Without Triton (a CPU without the interpreter) the
  same grouping runs as one GEMM per expert on its run.

Where torch has a grouped GEMM (``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm``:
CUTLASS on CUDA, bf16), a bank of dense or factored experts also has ``grouped_mm``
(``TORCH_IMPLS``): the same sorted runs through torch's grouped GEMM, the kernel transformers'
default ``grouped_mm`` implementation calls. At a few hundred tokens and more it is the fastest
form on an H100 (transformers' ``grouped_mm`` ran a Mixtral-shaped stack 2.3x faster than
sparsec's Triton grouped GEMM at 2048 tokens, docs/benchmarks.md), so the planner must be able to
keep it.

Every bank has a sixth, ``rows`` (``ROWS_IMPLS``): the pairs sorted by expert as in ``grouped``,
then each row through its expert by a matrix-vector kernel, no tensor cores, the SwiGLU of the
gate and up halves fused into the gate_up launch (``_rows_kernel`` for dense weights and for each
factor of low-rank ones, codegen/twofour.py's word kernel for 2:4, codegen/block.py's GEMV for
block). It is aimed at about a token per expert, where a tensor-core tile of 16 rows is mostly
padding (and for 2:4, expanding values into it costs more than the bytes saved); rows of one
expert run side by side, so their reads of it meet in L2. The planner times it with the others
where it plans on this device (``rows_worth_timing``), or reads it from a fingerprint that
measured it.

On CUDA a dense bank also has ``inline`` (``INLINE_IMPLS``): ``grouped_mm``'s ops written into the
graph in place of the op (``passes/experts_fx.py`` ``inline_banks``), so that inductor compiles the
sort, gathers and weighted sum around the grouped GEMMs with the rest of the graph, as it does
transformers' own forward. At prefill this is what the model as it came runs (an H100 ran
transformers' default 1.35x faster than the same GEMMs inside the op at 2048 tokens), so with it
among the candidates the planner can keep the form the model came with: on an H100 the automatic
choice took it at 256 and 2048 tokens and measured 0.99x and 0.98x of transformers' own (docs/experts.md).

Every implementation accumulates in float32 and returns x's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsec.errors import SparsecError

from ._common import LazyKernel, tl_dot_precision, triton_usable

IMPLS = ("loop", "batched", "dense_all", "grouped")


def check_bank(x, top_k_index, top_k_weights, gate_up, down) -> None:
    """Raise SparsecError naming the first tensor whose shape or dtype does not fit a bank."""
    if gate_up.dim() != 3 or down.dim() != 3:
        raise SparsecError(f"expert weights must be 3-D: gate_up (E, 2I, H), down (E, H, I); got "
                           f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
    E, two_i, H = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
        raise SparsecError(f"down must be (E, H, I) = ({E}, {H}, {two_i // 2}) for gate_up {tuple(gate_up.shape)}, "
                           f"got {tuple(down.shape)}")
    if x.dim() != 2 or x.shape[1] != H:
        raise SparsecError(f"x must be (tokens, {H}), got {tuple(x.shape)}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise SparsecError(f"top_k_index and top_k_weights must both be (tokens, k) with {x.shape[0]} tokens, got "
                           f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise SparsecError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class PackedWeights:
    """A bank projection's experts stored in a sparse form: ``shape`` (E, N, K) as dense, ``dense()``
    the dense weights (the loop, batched and dense_all paths read them through ``_native``, expanded
    once); the grouped implementation reads the packed form."""

    shape: tuple[int, int, int]
    _dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self._expand()
        return self._dense

    def _expand(self) -> torch.Tensor:
        raise NotImplementedError


class TwoFourWeights(PackedWeights):
    """2:4 experts: ``values`` (E, N, K/2) and ``meta`` (E, N, bytes), as codegen/twofour.py packs one weight."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor):
        self.values, self.meta = values, meta
        E, N, half = values.shape
        self.shape = (E, N, 2 * half)

    def _expand(self) -> torch.Tensor:
        from .twofour import expand

        E, N, K = self.shape
        return torch.stack([expand(self.values[e], self.meta[e], K) for e in range(E)])


class BlockWeights(PackedWeights):
    """Block-sparse experts in B x B blocks, each expert keeping the same number of blocks (nnzb):
    ``values`` (E, nnzb, B, B) kept blocks by (block row, block column), ``col_idx`` (E, nnzb) int32
    their block columns, ``row_ptr`` (E, N/B + 1) int32 where each expert's block rows start in its
    own blocks (codegen/block.py's BSR, one per expert, stacked); K the input width."""

    def __init__(self, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor, K: int):
        self.values, self.col_idx, self.row_ptr = values, col_idx, row_ptr
        E, _, B, _ = values.shape
        self.block = B
        self.shape = (E, (row_ptr.shape[1] - 1) * B, int(K))

    def _expand(self) -> torch.Tensor:
        from .block import bsr_to_dense

        return bsr_to_dense(self.values, self.col_idx, self.row_ptr, self.shape[2])


def _factors(projection) -> tuple:
    """A projection as its factors: a dense (E, N, K) weight alone, or a tuple applied first to last."""
    return (projection,) if isinstance(projection, (torch.Tensor, PackedWeights)) else tuple(projection)


def _native(w) -> torch.Tensor:
    """A projection's (E, N, K) weights as stored (a packed one expanded), in their own dtype."""
    return w.dense() if isinstance(w, PackedWeights) else w


def _chain(a: torch.Tensor, factors, e) -> torch.Tensor:
    """``a`` (rows, K) through expert ``e``'s projection: its factors applied first to last, float32."""
    for w in factors:
        a = a @ _native(w)[e].float().t()
    return a


def experts_loop(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """``gate_up`` and ``down`` are projections (as every implementation takes them): an (E, N, K)
    weight, or a tuple of (E, n, m) factors applied first to last (a factored one's V then U)."""
    gate_up, down = _factors(gate_up), _factors(down)
    T, k = top_k_index.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    flat = top_k_index.reshape(-1)
    for e in torch.unique(flat).tolist():
        pairs = (flat == e).nonzero().reshape(-1)
        tokens = pairs // k
        h = _swiglu(_chain(x[tokens].float(), gate_up, e))
        y = _chain(h, down, e) * top_k_weights.reshape(-1)[pairs].float()[:, None]
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)


def _gathered(a: torch.Tensor, factors, flat) -> torch.Tensor:
    """Each row of ``a`` through the projection of its expert (``flat``), in the weights' dtype."""
    for w in factors:
        weights = _native(w)
        a = torch.bmm(weights[flat], a.to(weights.dtype)[:, :, None])[..., 0]
    return a


def experts_batched(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """Every (token, slot) pair through its expert's gathered weights: products in the weights' dtype
    (float32 accumulation, as the GEMMs do), the activation and the combine in float32."""
    gate_up, down = _factors(gate_up), _factors(down)
    T, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    xs = x.repeat_interleave(k, dim=0)                                  # (S, H)
    h = _swiglu(_gathered(xs, gate_up, flat).float())                   # (S, I)
    y = _gathered(h, down, flat).float()                                # (S, H)
    y = y * top_k_weights.reshape(-1, 1).float()
    return y.reshape(T, k, -1).sum(dim=1).to(x.dtype)


def routing_matrix(top_k_index, top_k_weights, E: int) -> torch.Tensor:
    """(T, E) float32: each token's routing weight per expert, zero where the expert is not chosen."""
    R = torch.zeros(top_k_index.shape[0], E, dtype=torch.float32, device=top_k_index.device)
    return R.scatter_add_(1, top_k_index.long(), top_k_weights.float())


def route_kept(top_k_index, top_k_weights, remap):
    """The routing of a bank some of whose experts were dropped: ``remap`` (E,) gives each expert's
    index in the kept bank, -1 where it was dropped.

    A token keeps its other chosen experts, their weights scaled so that they sum to what all k
    summed (the router renormalised over what is left: Mixtral's top-k weights still sum to 1). A
    slot whose expert was dropped points at the token's first kept expert with weight 0, so every
    implementation runs unchanged and reaches no expert the token does not already use; a token all
    of whose experts were dropped gets weight 0 everywhere. Device ops only, no host sync: safe in a CUDA graph."""
    new = remap.to(top_k_index.device)[top_k_index.long()]
    kept = new >= 0
    w = top_k_weights.float()
    kept_w = torch.where(kept, w, torch.zeros_like(w))
    total, left = w.sum(-1, keepdim=True), kept_w.sum(-1, keepdim=True)
    scale = torch.where(left != 0, total / torch.where(left != 0, left, torch.ones_like(left)), torch.zeros_like(left))
    first = torch.gather(new, 1, kept.to(torch.int8).argmax(-1, keepdim=True))
    fallback = torch.where(kept.any(-1, keepdim=True), first, torch.zeros_like(first))
    index = torch.where(kept, new, fallback).to(top_k_index.dtype)
    return index, (kept_w * scale).to(top_k_weights.dtype)


def experts_dense_all(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """Every token through every expert, combined by the routing weights: products in the weights'
    dtype (float32 accumulation), the activation and the combine in float32."""
    gate_up, down = _factors(gate_up), _factors(down)
    E = gate_up[0].shape[0]
    a = x[None]
    for w in gate_up:
        weights = _native(w)
        a = torch.matmul(a.to(weights.dtype), weights.transpose(1, 2))    # (E, T, .)
    h = _swiglu(a.float())                                                  # (E, T, I)
    for w in down:
        weights = _native(w)
        h = torch.bmm(h.to(weights.dtype), weights.transpose(1, 2))       # (E, T, .)
    R = routing_matrix(top_k_index, top_k_weights, E)                        # (T, E)
    return torch.einsum("te,eth->th", R, h.float()).to(x.dtype)


TORCH_IMPLS = ("grouped_mm",)  # timed besides IMPLS where ``grouped_mm_usable``
ROWS_IMPLS = ("rows",)  # timed besides IMPLS where a bank's implementation is measured here
INLINE_IMPLS = ("inline",)  # timed besides IMPLS where ``inline_usable``, compiled as the graph will be
ALL_IMPLS = IMPLS + TORCH_IMPLS + ROWS_IMPLS + INLINE_IMPLS


def extra_impls(x, k: int, gate_up, down) -> tuple:
    """The implementations a bank runs here besides ``IMPLS``: ``grouped_mm`` where torch's grouped
    GEMM takes its weights, ``rows`` where worth timing at these tokens and its kernel runs for them
    (elsewhere each would run ``grouped`` under its own name)."""
    E = _factors(gate_up)[0].shape[0]
    out = TORCH_IMPLS if grouped_mm_usable(x, gate_up, down) else ()
    if rows_worth_timing(int(x.shape[0]), k, E) and rows_usable(x, gate_up, down):
        out += ROWS_IMPLS
    return out


# ``rows`` reads an expert's weight once per row it serves (where L2 does not keep it between them),
# ``grouped`` once per 16 or 64 rows: past this many rows per expert on average it is not timed
ROWS_MAX_PER_EXPERT = 16


def rows_worth_timing(tokens: int, k: int, E: int) -> bool:
    """Whether ``rows`` is worth timing for ``tokens`` tokens routed top-``k`` over ``E`` experts."""
    return tokens * k <= ROWS_MAX_PER_EXPERT * E


def _rows_kernel(x_ptr, w_ptr, e_ptr, y_ptr, N, K, UP_ROW, stride_xm, stride_we, stride_wn, stride_ym,
                 GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[s, n] = W[e_s][n] . x[s] for sorted row s (grid axis 1) and BLOCK_N outputs (axis 0), with
    e_s = ``e_ptr[s]``; GATED: silu(rows n) * (rows UP_ROW + n) of W[e_s]. Products accumulate per
    lane in float32 over the K loop and are reduced once."""
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    e = tl.load(e_ptr + s).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + s.to(tl.int64) * stride_xm
    w_rows = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xv = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_rows + offs_k[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * xv
        if GATED:
            up = tl.load(w_rows + UP_ROW * stride_wn + offs_k[None, :], mask=mask, other=0.0,
                         eviction_policy="evict_first")
            acc_up += up.to(tl.float32) * xv
    out = tl.sum(acc, axis=1)
    if GATED:
        out = out * tl.sigmoid(out) * tl.sum(acc_up, axis=1)
    tl.store(y_ptr + s.to(tl.int64) * stride_ym + offs_n, out.to(y_ptr.dtype.element_ty), mask=mask_n)


def _rows_keep(config, args) -> bool:
    """No K tile wider than K; the float32 accumulators (two when gated) within 32 registers a thread."""
    kw = config.kwargs
    per_thread = kw["BLOCK_N"] * kw["BLOCK_K"] * (2 if args["GATED"] else 1) // (32 * config.num_warps)
    return kw["BLOCK_K"] <= max(64, triton.next_power_of_2(args["K"])) and per_thread <= 32


# not yet timed on a GPU: the autotuner picks among these, the planner between implementations
_ROWS = LazyKernel(_rows_kernel, [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=4)
                                  for n, k, w in ((4, 512, 4), (8, 256, 4), (2, 1024, 4), (16, 128, 4),
                                                  (8, 512, 8), (4, 1024, 8), (1, 2048, 4))],
                   key=["N", "K", "GATED"], prune=_rows_keep)


def dense_rows(x: torch.Tensor, w: torch.Tensor, expert_of_row: torch.Tensor, up_row: int = -1) -> torch.Tensor:
    """Row s of x (S, K) times expert ``expert_of_row[s]``'s weight (``w`` (E, N, K)); with ``up_row``
    >= 0, silu(rows n) * (rows up_row + n), n < up_row (gate_up's SwiGLU)."""
    S, K = x.shape
    gated = up_row >= 0
    N = up_row if gated else w.shape[1]
    y = torch.empty(S, N, dtype=x.dtype, device=x.device)
    if S == 0:
        return y
    _ROWS[lambda m: (triton.cdiv(N, m["BLOCK_N"]), S)](
        x, w, expert_of_row.to(torch.int32), y, N, K, max(up_row, 0), x.stride(0), w.stride(0), w.stride(1),
        y.stride(0), GATED=gated)
    return y


def sorted_runs(top_k_index, E: int, block_m: int):
    """The (token, slot) pairs in expert order and the tile map of a grouped launch.

    Returns ``order`` (S,) pair ids sorted by expert, ``ends`` (E,) the end of each expert's run in
    that order, and ``tile_expert`` (cdiv(S, block_m) + E,) the expert each row tile of ``block_m``
    sorted rows serves (E past the last tile). Device ops only, shapes from T, k and E alone."""
    flat = top_k_index.reshape(-1).long()
    S = flat.numel()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    tiles = torch.cumsum((counts + block_m - 1) // block_m, 0)
    max_tiles = (S + block_m - 1) // block_m + E
    tile_expert = torch.searchsorted(tiles, torch.arange(max_tiles, device=flat.device), right=True)
    return order, ends, tiles, tile_expert


def _grouped_kernel(a_ptr, w_ptr, meta_ptr, rowptr_ptr, c_ptr, ends_ptr, tiles_ptr, tile_expert_ptr, N, K, E,
                    META_COLS, stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_me, stride_mn, stride_re,
                    stride_cm, stride_cn, TWOFOUR: tl.constexpr, BLOCK: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr = False):
    """C[rows of expert e] = A[rows of e] @ W[e]^T for the row tile this program serves. With
    ``TWOFOUR`` W[e] is 2:4: its kept values (E, N, K/2) and position bytes (``meta_ptr``), each read
    once per row tile and expanded to the dense tile in registers (as codegen/twofour.py's kernel).
    With ``BLOCK`` W[e] is block-sparse in BLOCK_K x BLOCK_K blocks (``BlockWeights``): the program's
    BLOCK_N output rows lie in one block row, whose kept blocks (``rowptr_ptr``, block columns at
    ``meta_ptr``) are the only weights it reads, each with the matching slice of A's columns.
    ``SWAP`` (a configuration's choice): C^T = W A^T, the weight tile the MMA's first operand."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    run_start = tl.where(e > 0, tl.load(ends_ptr + e - 1, mask=e > 0, other=0), 0)
    run_end = tl.load(ends_ptr + e)
    first_tile = tl.where(e > 0, tl.load(tiles_ptr + e - 1, mask=e > 0, other=0), 0)
    offs_m = run_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < run_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    m_base = meta_ptr + e.to(tl.int64) * stride_me
    if BLOCK:
        block_row = (pid_n * BLOCK_N) // BLOCK_K
        offs_r = offs_n - block_row * BLOCK_K
        offs_c = tl.arange(0, BLOCK_K)
        start = tl.load(rowptr_ptr + e.to(tl.int64) * stride_re + block_row)
        end = tl.load(rowptr_ptr + e.to(tl.int64) * stride_re + block_row + 1)
        w_ptrs = w_base + start.to(tl.int64) * stride_wn + offs_r[:, None] * BLOCK_K + offs_c[None, :]
        c_ptrs = m_base + start
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
        for _ in range(start, end):
            col = tl.load(c_ptrs)
            a = tl.load(a_rows + (col * BLOCK_K + offs_c)[None, :] * stride_ak, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs)
            if SWAP:
                acc_t = tl.dot(w, tl.trans(a), acc_t, input_precision=DOT_PREC)
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PREC)
            w_ptrs += stride_wn
            c_ptrs += 1
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if TWOFOUR:
                G: tl.constexpr = BLOCK_K // 4
                offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                v = tl.load(w_base + offs_n[:, None] * stride_wn + offs_v[None, :],
                            mask=mask_n[:, None] & (offs_v[None, :] < K // 2), other=0.0)
                mb = tl.load(m_base + offs_n[:, None] * stride_mn + offs_b[None, :],
                             mask=mask_n[:, None] & (offs_b[None, :] < META_COLS), other=0).to(tl.int32)
                b0, b1 = tl.split(tl.reshape(mb, (BLOCK_N, G // 4, 2)))
                quad = tl.arange(0, 4)[None, None, :] * 2
                p0 = tl.reshape((b0[:, :, None] >> quad) & 3, (BLOCK_N, G))
                p1 = tl.reshape((b1[:, :, None] >> quad) & 3, (BLOCK_N, G))
                v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
                zero = tl.zeros_like(v0)
                # positions are ordered (p0 < p1): column 0 can only be p0's and column 3 only p1's
                d0 = tl.where(p0 == 0, v0, zero)
                d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
                d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
                d3 = tl.where(p1 == 3, v1, zero)
                w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))
            else:
                w = tl.load(w_base + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                            mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if SWAP:
                acc_t = tl.dot(w, tl.trans(a), acc_t, input_precision=DOT_PREC)
            else:
                acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PREC)
    if SWAP:
        acc = tl.trans(acc_t)
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def grouped_block_m(pairs: int, E: int) -> int:
    """Tokens per row tile: 16 while experts get a few tokens each (decode: a tile of 64 would be
    mostly padding), 64 once they average more than 32 (prefill: fewer tiles, each weight tile
    reused over more rows)."""
    return 16 if pairs <= 32 * E else 64


# the weight-first orientation (SWAP) is offered to the autotuner too; not yet timed on a GPU
_GROUPED = LazyKernel(_grouped_kernel, [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
                                        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=3),
                                        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
                                        triton.Config({"BLOCK_N": 64, "BLOCK_K": 128, "SWAP": True}, num_warps=4,
                                                      num_stages=3),
                                        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "SWAP": True}, num_warps=4,
                                                      num_stages=3)],
                      key=["N", "K", "E", "BLOCK_M", "TWOFOUR"])


def _block_keep(config, args) -> bool:
    """A program's rows must lie in one block row."""
    return config.kwargs["BLOCK_N"] <= args["BLOCK_K"]


# block-sparse weights fix BLOCK_K to the block's side; the configs choose how many of its rows a program takes
_GROUPED_BLOCK = LazyKernel(_grouped_kernel, [triton.Config({"BLOCK_N": n}, num_warps=4, num_stages=3)
                                              for n in (64, 32, 128, 16)]
                            + [triton.Config({"BLOCK_N": n, "SWAP": True}, num_warps=4, num_stages=3)
                               for n in (64, 128)],
                            key=["N", "K", "E", "BLOCK_M", "BLOCK_K"], prune=_block_keep)


def grouped_gemm(a, w, ends, tiles, tile_expert, block_m: int) -> torch.Tensor:
    """(S, N) = each expert's run of ``a`` (S, K; sorted by expert) times that expert's weight^T,
    ``w`` an (E, N, K) tensor, ``TwoFourWeights`` or ``BlockWeights`` (read in their packed form)."""
    S = a.shape[0]
    E, N, K = w.shape
    c = torch.empty(S, N, dtype=a.dtype, device=a.device)
    if S == 0:
        return c
    dot = tl_dot_precision(a.dtype)
    if isinstance(w, BlockWeights):
        values, cols, row_ptr = w.values.to(a.dtype), w.col_idx, w.row_ptr
        _GROUPED_BLOCK[lambda m: (tile_expert.numel(), N // m["BLOCK_N"])](
            a, values, cols, row_ptr, c, ends, tiles, tile_expert, N, K, E, 0,
            a.stride(0), a.stride(1), values.stride(0), values.stride(1), 0, cols.stride(0), 0, row_ptr.stride(0),
            c.stride(0), c.stride(1), TWOFOUR=False, BLOCK=True, DOT_PREC=dot, BLOCK_M=block_m, BLOCK_K=w.block)
        return c
    twofour = isinstance(w, TwoFourWeights)
    values = (w.values if twofour else w).to(a.dtype)
    m = w.meta if twofour else values

    def grid(meta_):
        return (tile_expert.numel(), triton.cdiv(N, meta_["BLOCK_N"]))

    _GROUPED[grid](a, values, m, ends, c, ends, tiles, tile_expert, N, K, E, m.shape[2] if twofour else 0,
                   a.stride(0), a.stride(1), values.stride(0), values.stride(1), values.stride(2),
                   m.stride(0) if twofour else 0, m.stride(1) if twofour else 0, 0, c.stride(0), c.stride(1),
                   TWOFOUR=twofour, BLOCK=False, DOT_PREC=dot, BLOCK_M=block_m)
    return c


def experts_grouped(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    gate_up, down = _factors(gate_up), _factors(down)
    T, k = top_k_index.shape
    E = gate_up[0].shape[0]
    block_m = grouped_block_m(T * k, E)
    order, ends, tiles, tile_expert = sorted_runs(top_k_index, E, block_m)
    xs = x[order // k]
    if triton_usable(x):
        def project(a, factors):  # one grouped launch per factor: each expert's factor read once
            for w in factors:
                a = grouped_gemm(a, w, ends, tiles, tile_expert, block_m)
            return a

        h = _swiglu(project(xs, gate_up).float()).to(x.dtype)
        y = project(h, down).float()
    else:  # one GEMM per expert on its run: the same grouping, through torch
        starts = torch.cat([ends.new_zeros(1), ends[:-1]]).tolist()
        y = torch.zeros(xs.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e, (s, t) in enumerate(zip(starts, ends.tolist())):
            if t > s:
                y[s:t] = _chain(_swiglu(_chain(xs[s:t].float(), gate_up, e)), down, e)
    y = y * top_k_weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, order // k, y).to(x.dtype)


def _torch_grouped_mm():
    """torch's grouped GEMM (``grouped_mm(a (S, K), b (E, K, N), offs=ends)``), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_usable(x, gate_up, down) -> bool:
    """Whether ``grouped_mm`` can run a bank: torch has a grouped GEMM, every projection is dense or
    factored (E, N, K) tensors, and on CUDA the inputs are bf16 (the dtype its kernel takes under
    every torch that has it) with each factor's sides in whole 16-byte rows."""
    if _torch_grouped_mm() is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    factors = _factors(gate_up) + _factors(down)
    if not all(isinstance(w, torch.Tensor) for w in factors):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and all(w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0 for w in factors)
    return x.device.type == "cpu" and _grouped_mm_runs_on_cpu(_torch_grouped_mm(), x.dtype)


@functools.lru_cache(maxsize=None)
def _grouped_mm_runs_on_cpu(mm, dtype: torch.dtype) -> bool:
    """Whether the grouped GEMM ``mm`` has a CPU kernel for ``dtype`` (some torch releases have none)."""
    try:
        a, b = torch.ones(3, 8, dtype=dtype), torch.ones(2, 8, 8, dtype=dtype)
        mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def experts_grouped_mm(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """``grouped_mm`` (module docstring): the pairs sorted by expert, each projection's factors
    through torch's grouped GEMM over the runs (float32 accumulation inside it, each product
    rounded to x's dtype); ``grouped`` where ``grouped_mm_usable`` says it cannot run. Device ops
    only, shapes from T, k and E alone: CUDA-graph safe."""
    if not grouped_mm_usable(x, gate_up, down):
        return experts_grouped(x, top_k_index, top_k_weights, gate_up, down)
    return _grouped_mm_runs(x, top_k_index, top_k_weights, _factors(gate_up), _factors(down))


def _grouped_mm_runs(x, top_k_index, top_k_weights, gate_up: tuple, down: tuple, gather: bool = False) -> torch.Tensor:
    """``grouped_mm``'s ops on factor tuples, without asking whether torch's grouped GEMM takes them.

    The weighted pairs are summed back into their tokens by an atomic ``index_add_``, or, with
    ``gather``, by putting the pairs back in token order and summing each token's k rows: one
    reduction inductor fuses with the weighting and the cast (no float32 buffer zeroed, then added
    to atomically, then cast), as transformers' own ``grouped_mm`` forward combines."""
    T, k = top_k_index.shape
    flat = top_k_index.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(gate_up[0].shape[0], dtype=torch.int64, device=flat.device)
    offs = torch.cumsum(counts.scatter_add_(0, flat, torch.ones_like(flat)), 0).to(torch.int32)  # each run's end
    mm = _torch_grouped_mm()

    def project(a, factors):
        for w in factors:
            a = mm(a, w.to(a.dtype).transpose(-2, -1), offs=offs)
        return a

    h = _swiglu(project(x[order // k], gate_up).float()).to(x.dtype)
    y = project(h, down).float() * top_k_weights.reshape(-1)[order].float()[:, None]
    if gather:
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
        return y[back].view(T, k, -1).sum(dim=1).to(x.dtype)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, order // k, y).to(x.dtype)


def inline_usable(x, gate_up, down) -> bool:
    """Whether a bank can run ``inline``: its graph is compiled by inductor (on CUDA), and torch's
    grouped GEMM takes its dense weights."""
    return x.is_cuda and isinstance(gate_up, torch.Tensor) and grouped_mm_usable(x, gate_up, down)


def experts_inline(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """``inline``: ``grouped_mm``'s plain torch ops (sort, gather, two grouped GEMMs, weighted sum),
    called from the graph itself rather than through the op, so that inductor compiles them with
    the ops around the bank (the gathers and the combine fused into their neighbours), as it
    compiles transformers' own ``grouped_mm`` forward. Outside a compiled graph it is ``grouped_mm``.
    Only where ``inline_usable``: traced, it cannot ask (a probe run on fake tensors proves nothing)."""
    return _grouped_mm_runs(x, top_k_index, top_k_weights, (gate_up,), (down,), gather=True)


def rows_usable(x, gate_up, down) -> bool:
    """Whether a bank can run ``rows``: Triton usable here, and each projection dense (E, N, K)
    tensors with unit stride along K (one, or a low-rank chain of factors), one 2:4 weight the word
    kernel can read (16-bit, inputs in whole 32-column words, contiguous), or one block-sparse
    weight (16-bit inputs, gate and up halves in whole block rows)."""
    from .twofour import words_usable

    gate_up, down = _factors(gate_up), _factors(down)
    if not triton_usable(x):
        return False
    if all(isinstance(w, torch.Tensor) and w.stride(2) == 1 for w in gate_up + down):  # dense, or factored
        return True
    if len(gate_up) != 1 or len(down) != 1:
        return False
    (gu,), (dn,) = gate_up, down
    if isinstance(gu, BlockWeights) and isinstance(dn, BlockWeights):
        return x.dtype in (torch.float16, torch.bfloat16) and (gu.shape[1] // 2) % gu.block == 0
    if not (isinstance(gu, TwoFourWeights) and isinstance(dn, TwoFourWeights)):
        return False
    h = x.new_empty(0, dn.shape[2])
    return (words_usable(x, gu.values[0], gu.meta[0]) and words_usable(h, dn.values[0], dn.meta[0])
            and all(t.is_contiguous() for t in (gu.values, gu.meta, dn.values, dn.meta)))


def experts_rows(x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """``rows`` (see the module's docstring); ``grouped`` where ``rows_usable`` says it cannot run.
    Device ops only, grid sized by T k: CUDA-graph safe."""
    if not rows_usable(x, gate_up, down):
        return experts_grouped(x, top_k_index, top_k_weights, gate_up, down)
    gate_up, down = _factors(gate_up), _factors(down)
    T, k = top_k_index.shape
    two_i = gate_up[-1].shape[1]
    flat = top_k_index.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # rows of one expert side by side: their reads meet in L2
    expert_of_row = flat[order]
    xs = x[order // k].contiguous()
    if all(isinstance(w, torch.Tensor) for w in gate_up + down):  # dense, or a chain of factors
        h = _dense_chain(xs, gate_up, expert_of_row, up_row=two_i // 2)
        y = _dense_chain(h, down, expert_of_row).float()
    else:
        y = _packed_rows(xs, gate_up[0], down[0], expert_of_row, two_i)
    y = y * top_k_weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, order // k, y).to(x.dtype)


def _dense_chain(xs, factors, expert_of_row, up_row: int = -1) -> torch.Tensor:
    """``xs`` through each row's expert's factors first to last, ``up_row`` (the SwiGLU) on the last."""
    h = xs
    for i, w in enumerate(factors):
        h = dense_rows(h, w.to(xs.dtype), expert_of_row, up_row=up_row if i == len(factors) - 1 else -1)
    return h


def _packed_rows(xs, gate_up, down, expert_of_row, two_i: int) -> torch.Tensor:
    """``rows`` of a 2:4 or block-sparse bank: float32 (S, H)."""
    from .twofour import twofour_rows

    if isinstance(gate_up, TwoFourWeights):
        h = twofour_rows(xs, gate_up.values, gate_up.meta, expert_of_row,
                         gate_row=0, up_row=two_i // 2, width=two_i // 2)
        y = twofour_rows(h, down.values, down.meta, expert_of_row).float()
    else:  # BlockWeights
        from .block import block_rows

        h = block_rows(xs, gate_up.values, gate_up.col_idx, gate_up.row_ptr, expert_of_row, gate_up.shape[2],
                       up_row=two_i // 2)
        y = block_rows(h, down.values, down.col_idx, down.row_ptr, expert_of_row, down.shape[2]).float()
    return y


def working_bytes(impl: str, E: int, k: int, I: int, H: int, M: int) -> int:  # noqa: E741
    """Bytes an implementation holds beyond its inputs and output at M tokens (float32 intermediates):
    ``batched`` gathers every pair's weights, ``dense_all`` keeps every expert's activations."""
    S = M * k
    if impl == "batched":
        return 4 * S * 3 * I * H
    if impl == "dense_all":
        return 4 * E * M * (3 * I + H)
    return 4 * S * (3 * I + H)


def memory_reason(impl: str, E: int, k: int, I: int, H: int, M: int, device) -> str | None:
    """Why ``impl`` should not run a bank this size here (it would hold more than a quarter of the
    device's free memory, or 4 GB on a CPU), or None."""
    need = working_bytes(impl, E, k, I, H, M)
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        limit = free // 4
    else:
        limit = 4 << 30
    if need <= limit:
        return None
    return f"would hold {need / 2**30:.1f} GiB of intermediates at {M} tokens (more than {limit / 2**30:.1f} GiB)"


_RUN = {"loop": experts_loop, "batched": experts_batched, "dense_all": experts_dense_all, "grouped": experts_grouped,
        "grouped_mm": experts_grouped_mm, "rows": experts_rows, "inline": experts_grouped_mm}


def _run(impl: str, x, top_k_index, top_k_weights, gate_up, down) -> torch.Tensor:
    """``impl`` on the bank; no tokens (an empty batch) give an empty output without a launch."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    return _RUN[impl](x, top_k_index, top_k_weights, gate_up, down)


@torch.library.custom_op("sparsec::experts_swiglu", mutates_args=())
def experts_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, impl: str) -> torch.Tensor:
    """One expert bank (module docstring) with implementation ``impl``."""
    return _run(impl, x, top_k_index, top_k_weights, (gate_up,), (down,))


@experts_op.register_fake
def experts_fake(x, top_k_index, top_k_weights, gate_up, down, impl):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparsec::experts_swiglu_lowrank", mutates_args=())
def experts_lowrank_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       gate_up_v: torch.Tensor, gate_up_u: torch.Tensor, down_v: torch.Tensor, down_u: torch.Tensor,
                       impl: str) -> torch.Tensor:
    """A bank whose experts are factored: expert e's gate_up is gate_up_u[e] @ gate_up_v[e]
    ((E, 2I, R1) @ (E, R1, H)) and its down down_u[e] @ down_v[e] ((E, H, R2) @ (E, R2, I)); each
    projection runs as two products on the R-wide middle, so a token reads R (N + K) weight values
    of an expert instead of N K. The same four implementations, two launches per projection."""
    return _run(impl, x, top_k_index, top_k_weights, (gate_up_v, gate_up_u), (down_v, down_u))


@experts_lowrank_op.register_fake
def experts_lowrank_fake(x, top_k_index, top_k_weights, gate_up_v, gate_up_u, down_v, down_u, impl):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparsec::experts_swiglu_twofour", mutates_args=())
def experts_twofour_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       gate_up_values: torch.Tensor, gate_up_meta: torch.Tensor, down_values: torch.Tensor,
                       down_meta: torch.Tensor, impl: str) -> torch.Tensor:
    """A bank whose experts are 2:4 sparse: each projection's kept values (E, N, K/2) and position
    bytes (E, N, meta bytes), as codegen/twofour.py packs one weight. ``grouped`` and ``rows`` read
    the packed experts (about 9/16 of the dense bytes at 16 bits); the other implementations expand
    them first (the reference paths)."""
    return _run(impl, x, top_k_index, top_k_weights, TwoFourWeights(gate_up_values, gate_up_meta),
                      TwoFourWeights(down_values, down_meta))


@experts_twofour_op.register_fake
def experts_twofour_fake(x, top_k_index, top_k_weights, gate_up_values, gate_up_meta, down_values, down_meta, impl):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparsec::experts_swiglu_block", mutates_args=())
def experts_block_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     gate_up_values: torch.Tensor, gate_up_cols: torch.Tensor, gate_up_row_ptr: torch.Tensor,
                     down_values: torch.Tensor, down_cols: torch.Tensor, down_row_ptr: torch.Tensor,
                     impl: str) -> torch.Tensor:
    """A bank whose experts are block-sparse (``BlockWeights``: kept blocks, their block columns and
    each expert's block-row starts, per projection). ``grouped`` reads the kept blocks alone (the
    kept share of the dense bytes); the other implementations expand them first (the reference paths)."""
    gate_up = BlockWeights(gate_up_values, gate_up_cols, gate_up_row_ptr, x.shape[1])
    down = BlockWeights(down_values, down_cols, down_row_ptr, gate_up.shape[1] // 2)
    return _run(impl, x, top_k_index, top_k_weights, gate_up, down)


@experts_block_op.register_fake
def experts_block_fake(x, top_k_index, top_k_weights, gate_up_values, gate_up_cols, gate_up_row_ptr, down_values,
                       down_cols, down_row_ptr, impl):
    return x.new_empty(x.shape)


def check_factors(gate_up_v, gate_up_u, down_v, down_u) -> None:
    """Raise SparsecError unless the four factors make a bank: (E, R1, H), (E, 2I, R1), (E, R2, I), (E, H, R2)."""
    shapes = [tuple(t.shape) for t in (gate_up_v, gate_up_u, down_v, down_u)]
    if any(len(sh) != 3 for sh in shapes):
        raise SparsecError(f"expert factors must be 3-D, got {shapes}")
    (E, r1, H), (E2, two_i, r1b), (E3, r2, I), (E4, H2, r2b) = shapes
    if not (E == E2 == E3 == E4 and r1 == r1b and r2 == r2b and H == H2 and two_i == 2 * I):
        raise SparsecError(f"expert factors do not make a bank: gate_up_v (E, R1, H), gate_up_u (E, 2I, R1), "
                           f"down_v (E, R2, I), down_u (E, H, R2) expected, got {shapes}")


def experts(x, top_k_index, top_k_weights, gate_up, down, impl: str = "grouped") -> torch.Tensor:
    """The bank's output for ``x`` (..., H), checked; ``impl`` one of IMPLS or "reference"."""
    x2d = x.reshape(-1, x.shape[-1])
    idx = top_k_index.reshape(x2d.shape[0], top_k_index.shape[-1])  # (no tokens: still k slots)
    wts = top_k_weights.reshape(x2d.shape[0], top_k_weights.shape[-1])
    check_bank(x2d, idx, wts, gate_up, down)
    if impl == "reference":
        return _run("loop", x2d, idx, wts, gate_up, down).reshape(x.shape)
    if impl not in ALL_IMPLS:
        raise SparsecError(f"unknown experts implementation {impl!r}; use one of: "
                           f"{', '.join(ALL_IMPLS)}, reference")
    return experts_op(x2d, idx, wts, gate_up, down, impl).reshape(x.shape)


def experts_lowrank(x, top_k_index, top_k_weights, gate_up_v, gate_up_u, down_v, down_u,
                    impl: str = "grouped") -> torch.Tensor:
    """The factored bank's output for ``x`` (..., H), checked (``experts_lowrank_op``)."""
    check_factors(gate_up_v, gate_up_u, down_v, down_u)
    x2d = x.reshape(-1, x.shape[-1])
    idx = top_k_index.reshape(x2d.shape[0], top_k_index.shape[-1])  # (no tokens: still k slots)
    wts = top_k_weights.reshape(x2d.shape[0], top_k_weights.shape[-1])
    if impl not in ALL_IMPLS:
        raise SparsecError(f"unknown experts implementation {impl!r}; use one of: {', '.join(ALL_IMPLS)}")
    return experts_lowrank_op(x2d, idx, wts, gate_up_v, gate_up_u, down_v, down_u, impl).reshape(x.shape)
