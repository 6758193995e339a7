"""Expert banks with block-sparse experts.

Each expert's gate_up and down keep a share D of their B x B blocks, chosen and refitted as every
block-sparse layer in sparsec (``passes/block.py``: blocks scored by their activation-weighted
norm, the kept weights refitted to the calibration statistics) on the tokens the first
calibration call routes to the expert (its down projection on what its block-sparse gate_up gives
it); an expert no token reached keeps its largest blocks. Every expert of a bank keeps the same
number of blocks, so the bank stores as one stack of BSR weights (``codegen.experts.BlockWeights``)
and runs as ``sparsec::experts_swiglu_block``, whose grouped implementation reads the kept blocks
alone: the share D of the dense experts' bytes, one launch per projection for the whole bank.

B is the largest of ``SIDES`` that tiles both projections into at least 2 x 2 blocks. Whether a
bank runs so, and at which D, is decided with the other formats of experts
(``passes/experts_formats.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from sparsec.errors import SparsecError

DENSITIES = (0.25, 0.5)  # kept share of each expert's blocks, smallest (fastest) first
SIDES = (64, 32, 16)     # block sides tried, largest first (the grouped kernel's tile is the block)


@dataclass
class BlockBank:
    """A bank's (kept) experts block-sparse: per projection the kept blocks (E, nnzb, B, B), their
    block columns (E, nnzb) and each expert's block-row starts (E, N/B + 1)."""

    block: int
    density: float
    gate_up_values: torch.Tensor
    gate_up_cols: torch.Tensor
    gate_up_row_ptr: torch.Tensor
    down_values: torch.Tensor
    down_cols: torch.Tensor
    down_row_ptr: torch.Tensor
    remap: torch.Tensor | None = None
    impl: str | None = None

    @property
    def form(self) -> str:
        """As a plan's ``experts`` entry names it."""
        return f"block:{self.block}:{self.density:g}"

    @property
    def label(self) -> str:
        return self.form

    def tensors(self) -> dict[str, torch.Tensor]:
        """The op's weight arguments, in order, by name (for the lowered graph's constants)."""
        return {"gate_up_values": self.gate_up_values, "gate_up_cols": self.gate_up_cols,
                "gate_up_row_ptr": self.gate_up_row_ptr, "down_values": self.down_values,
                "down_cols": self.down_cols, "down_row_ptr": self.down_row_ptr}

    def op(self):
        return torch.ops.sparsec.experts_swiglu_block.default

    def rows_runs(self, x) -> bool:
        """Whether codegen/experts.py's ``rows`` runs its own kernel on this bank for inputs like ``x``."""
        from sparsec.codegen.experts import BlockWeights, rows_usable

        inner = (self.gate_up_row_ptr.shape[1] - 1) * self.block // 2  # I: gate_up has 2I rows
        return rows_usable(x, BlockWeights(self.gate_up_values, self.gate_up_cols, self.gate_up_row_ptr, x.shape[-1]),
                           BlockWeights(self.down_values, self.down_cols, self.down_row_ptr, inner))

    def stored(self) -> int:
        """Stored values (the block indices, one per B x B values, are not counted)."""
        return self.gate_up_values.numel() + self.down_values.numel()

    def run(self, x, top_k_index, top_k_weights, impl: str) -> torch.Tensor:
        from sparsec.codegen.experts import experts_block_op, route_kept

        if self.remap is not None:
            top_k_index, top_k_weights = route_kept(top_k_index, top_k_weights, self.remap.to(top_k_index.device))
        t = [v.to(x.device) for v in self.tensors().values()]
        return experts_block_op(x, top_k_index, top_k_weights, *t, self.impl or impl)


def tiles(H: int, I: int, B: int) -> bool:  # noqa: E741
    """Whether B x B blocks tile gate_up (2I x H) and down (H x I) of a bank at least 2 x 2."""
    return H % B == 0 and I % B == 0 and H // B >= 2 and I // B >= 2


def side_for(H: int, I: int) -> int | None:  # noqa: E741
    """The block side for a bank of H -> 2I -> H experts: the largest of ``SIDES`` that ``tiles`` it, or None."""
    return next((B for B in SIDES if tiles(H, I, B)), None)


def fit(bank, density: float, block: int | None = None) -> BlockBank:
    """The bank's (kept) experts keeping ``density`` of their ``block``-sided blocks (``side_for``
    by default), each fitted on its routed rows."""
    from sparsec.passes.experts_formats import routed, rows_of

    gate_up, down, remap, x, index, weights = routed(bank)
    E, two_i, H = gate_up.shape
    B = block or side_for(H, two_i // 2)
    if B is None or not tiles(H, two_i // 2, B):
        raise SparsecError(f"block-sparse experts need both projections tiled by at least 2 x 2 blocks of side "
                           f"{block or ' or '.join(map(str, SIDES))}; the bank is H={H}, I={two_i // 2}: "
                           "use another form for it (dense, 2:4, lowrank:F)")
    parts: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for e in range(E):
        rows = rows_of(x, index, weights, e)
        w1 = _fit(gate_up[e], rows, B, density)
        gate, up = (rows @ w1.t()).chunk(2, dim=-1)
        w2 = _fit(down[e], F.silu(gate) * up, B, density)
        for part, t in zip(parts, (*_pack(w1, B, density), *_pack(w2, B, density))):
            part.append(t)
    dtype = bank.gate_up.dtype
    gv, gc, gr, dv, dc, dr = (torch.stack(p).contiguous() for p in parts)
    return BlockBank(B, density, gv.to(dtype), gc, gr, dv.to(dtype), dc, dr, remap)


def _fit(weight: torch.Tensor, rows: torch.Tensor, B: int, density: float) -> torch.Tensor:
    from sparsec.formats import Block
    from sparsec.passes.experts_formats import stats_of
    from sparsec.passes.registry import HANDLERS

    handler = HANDLERS["block"]
    stats = stats_of(rows)
    try:
        (approx,) = handler.approximate([Block(B, density)], weight, stats,
                                        method=None if stats is not None else "magnitude")
    finally:
        handler.forget()
    return approx.float()


def _pack(weight: torch.Tensor, B: int, density: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept blocks, their block columns, block-row starts) of a weight with exactly its kept blocks nonzero."""
    from sparsec.codegen.block import BlockKernels
    from sparsec.formats import Block

    packed = BlockKernels().pack(Block(B, density), weight)
    return packed["values"], packed["col_idx"], packed["row_ptr"]


def applicable(banks) -> bool:
    """Whether every bank tiles into blocks of one of ``SIDES``."""
    return all(side_for(b.gate_up.shape[2], b.down.shape[2]) is not None for b in banks)


def standin(bank, density: float) -> BlockBank:
    """Random block-sparse experts as ``fit`` would shape them (the kept blocks of random weights),
    for timing (``experts_formats.Form``)."""
    from sparsec.passes.experts_formats import kept, random_like

    gate_up, down, remap = kept(bank)
    B = side_for(gate_up.shape[2], down.shape[2])
    parts: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for e in range(gate_up.shape[0]):  # one expert's dense stand-in at a time
        w1, w2 = random_like(gate_up.shape[1:], gate_up, seed=2 * e), random_like(down.shape[1:], down, seed=2 * e + 1)
        for part, t in zip(parts, (*_pack(w1, B, density), *_pack(w2, B, density))):
            part.append(t)
    gv, gc, gr, dv, dc, dr = (torch.stack(p).contiguous() for p in parts)
    return BlockBank(B, density, gv, gc, gr, dv, dc, dr, remap)


def candidates() -> list:
    """The ``experts_formats.Form`` of each kept share."""
    from sparsec.passes.experts_formats import Form

    return [Form(f"block {density:g} of blocks", partial(fit, density=density), partial(standin, density=density))
            for density in DENSITIES]
