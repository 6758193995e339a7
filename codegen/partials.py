"""The sum of a split launch's float32 partials, in one launch.

Kernels that cut K over several programs (2:4's and block's ``dot_split``, act's split loop) write
one float32 partial product per chunk, (chunks, M, N). Summing them with torch took two or three
launches (the reduction, the bias, the cast); on an H100 at 2 and 16 tokens the reduction alone ran
7 µs and the cast 3 µs next to block's 18 µs product (Nsight Compute, bench/profile_small_m.py,
14336 x 4096, block:64:0.25). Here one launch reads each partial once and writes the output in its
dtype, bias added.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LazyKernel, triton_usable

# outputs a program sums: few enough that a one- or two-token output (a few thousand values)
# still spreads over a hundred programs, the partials' loads of each in flight together
BLOCK = 256


def _sum_partials_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    """y = sum over chunks of p (SPLITS, M*N), plus the bias, in y's dtype."""
    if PDL:  # launched early (programmatic dependent launch): wait for the partials
        tl.extra.cuda.gdc_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_KERNEL = LazyKernel(_sum_partials_kernel)


def sum_partials(parts: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 out: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """The output of a split launch: its float32 partials (chunks, M, N) summed, the bias added, in
    ``dtype`` (into ``out``, a contiguous (M, N) tensor, where given). ``pdl``: the launch may start
    before the one that writes the partials ends (it waits for them)."""
    splits, M, N = parts.shape
    y = out if out is not None else torch.empty(M, N, device=parts.device, dtype=dtype)
    if not (triton_usable(parts) and parts.is_contiguous() and y.is_contiguous()):
        total = parts.sum(0) if bias is None else parts.sum(0) + bias.float()
        y.copy_(total.to(dtype))
        return y
    if M * N == 0:
        return y
    launch = {"launch_pdl": True} if pdl else {}
    _KERNEL[(triton.cdiv(M * N, BLOCK),)](parts, bias if bias is not None else y, y, M * N, N, splits,
                                         HAS_BIAS=bias is not None, BLOCK=BLOCK, PDL=pdl, num_warps=2, **launch)
    return y
