"""2:4: two of every four consecutive inputs kept, in a layout made for coalesced loads.

Layout for W (N, K), G = K/4 groups per row:
  values (N, K/2)   the two kept values of every group, in position order;
  meta   (N, ceil(G/2)) uint8: a 4-bit code per group (bits 0-1: first position, bits 2-3:
         second), group 2i in the low nibble of byte i. A 128-column tile of a row is 64 values
         and 16 metadata bytes, each one 16-byte-aligned load when K is a multiple of 128.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.errors import SparsecError

from ._common import expect_tensor, match_dtype
from .packed import FormatKernels, register


def encode_positions(pos: torch.Tensor) -> torch.Tensor:
    """(N, G, 2) kept positions in 0..3 -> (N, ceil(G/2)) uint8 metadata."""
    N, G, _ = pos.shape
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int32)
    if G % 2:
        nib = torch.cat([nib, nib.new_zeros(N, 1)], dim=1)
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).contiguous()


def decode_positions(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of ``encode_positions``: (N, ceil(G/2)) uint8 -> (N, G, 2) int64 positions."""
    m = meta.to(torch.int64)
    nib = torch.stack([m & 15, m >> 4], dim=-1).reshape(m.shape[0], -1)[:, :groups]
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def expand(values: torch.Tensor, meta: torch.Tensor, K: int) -> torch.Tensor:
    """The dense (N, K) weight: kept values scattered back to their positions, zeros elsewhere."""
    N = values.shape[0]
    pos = decode_positions(meta, K // 4)
    dense = values.new_zeros(N, K // 4, 4)
    dense.scatter_(2, pos, values.reshape(N, K // 4, 2))
    return dense.reshape(N, K)


class TwoFourKernels(FormatKernels):
    family = "2:4"
    names = ("values", "meta")
    impls = ("reference",)

    def pack(self, spec, weight):
        N, K = weight.shape
        groups = weight.reshape(N, K // 4, 4)
        pos = groups.abs().topk(2, dim=-1).indices.sort(dim=-1).values
        return {"values": groups.gather(2, pos).reshape(N, K // 2).contiguous(),
                "meta": encode_positions(pos)}

    def validate(self, spec, shape, tensors):
        N, K = shape
        values = expect_tensor(tensors, "values", (N, K // 2), floating=True)
        meta = expect_tensor(tensors, "meta", (N, (K // 4 + 1) // 2), floating=False)
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


register(TwoFourKernels())
