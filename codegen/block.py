"""Block-sparse: W tiled in B x B blocks, the kept ones stored as BSR.

Layout for W (N, K), NR = N/B block rows, NC = K/B block columns, nnzb kept blocks:
  values  (nnzb, B, B)  kept blocks, row-major by (block row, block column);
  col_idx (nnzb,) int32 block column of each kept block;
  row_ptr (NR+1,) int32 kept blocks of block row i are row_ptr[i]:row_ptr[i+1];
  order   (NR,) int32   block rows by decreasing kept count: the kernel's work list, so the
                        longest rows start first and short or empty rows fill in behind them.
"""

from __future__ import annotations

import torch

from sparsec.errors import SparsecError

from ._common import compute_dtype, expect_tensor, match_dtype
from .packed import FormatKernels, register

_REFERENCE_CHUNK_ELEMS = 1 << 25  # bound on the reference's gathered intermediate (M x nnzb x B)


def work_order(row_ptr: torch.Tensor) -> torch.Tensor:
    counts = (row_ptr[1:] - row_ptr[:-1]).to(torch.int64)
    return torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)


class BlockKernels(FormatKernels):
    family = "block"
    names = ("values", "col_idx", "row_ptr", "order")
    derived = ("order",)
    impls = ("reference",)

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
        N, K = shape
        B = spec.block
        nr, nc = N // B, K // B
        values, row_ptr = tensors["values"], tensors["row_ptr"]
        rows = torch.repeat_interleave(torch.arange(nr, device=values.device),
                                       (row_ptr[1:] - row_ptr[:-1]).to(torch.int64))
        dense = values.new_zeros(nr * nc, B, B)
        dense[rows * nc + tensors["col_idx"].to(torch.int64)] = values
        return dense.reshape(nr, nc, B, B).permute(0, 2, 1, 3).reshape(N, K).contiguous()

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
        y = x2d.new_zeros(M, nr, B)
        step = max(1, _REFERENCE_CHUNK_ELEMS // max(1, nnzb * B))
        for m0 in range(0, M, step):
            xg = xb[m0:m0 + step, cols, :].transpose(0, 1)               # [nnzb, m, B]
            part = torch.bmm(xg, values.transpose(1, 2))                  # [nnzb, m, B]
            y[m0:m0 + step].index_add_(1, rows, part.transpose(0, 1))
        y = y.reshape(M, N)
        return y if bias is None else y + bias.to(x2d.dtype)


register(BlockKernels())
