"""Factoring the experts of a bank to low rank, within the error budget expert rewrites may spend.

Each expert's gate_up (2I x H) and down (H x I) become rank-R products, and the bank runs as
``sparsec::experts_swiglu_lowrank`` (codegen/experts.py): the same four implementations, each
projection as two products on the R-wide middle, so a token reads R (N + K) values of an
expert's projection instead of N K. At a few tokens a bank is bound by the bytes of the experts it
reads, so that is the time it saves; with many tokens per expert it saves FLOPs too.

The ranks are one ``FRACTIONS`` share of each projection's break-even rank N K / (N + K) (the rank
whose factors store as many values as the weight), so every expert of every bank reads that share
of its weights. Each expert is fitted activation-aware, as every low-rank layer in sparsec, on the
tokens the first calibration call routes to it: the Gram of those rows, or, with fewer rows than
inputs, each input's energy alone (``SiteStats.fall_back_to_diagonal``); its down projection on
the inputs the factored gate_up gives it. An expert no token reached is fitted on its weights
alone. A bank already without some experts (``passes/experts_prune.py``) has its kept experts
factored.

Whether and at which share a bank runs factored is decided with the other formats of experts
(``passes/experts_formats.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

FRACTIONS = (0.25, 0.5)  # of each projection's break-even rank, smallest (fastest) first
ALIGN = 16               # ranks in multiples of a tensor-core tile's side


@dataclass
class Factoring:
    """A bank's experts as rank ``ranks`` products (``gate_up_u @ gate_up_v``, ``down_u @ down_v``),
    of its kept experts where ``remap`` (the pruning it was fitted on) is given."""

    fraction: float
    ranks: tuple[int, int]
    gate_up_v: torch.Tensor
    gate_up_u: torch.Tensor
    down_v: torch.Tensor
    down_u: torch.Tensor
    remap: torch.Tensor | None = None
    impl: str | None = None  # the implementation measured fastest for the factored bank

    @property
    def factors(self) -> tuple[torch.Tensor, ...]:
        return self.gate_up_v, self.gate_up_u, self.down_v, self.down_u

    def run(self, x, top_k_index, top_k_weights, impl: str) -> torch.Tensor:
        from sparsec.codegen.experts import experts_lowrank_op, route_kept

        if self.remap is not None:
            top_k_index, top_k_weights = route_kept(top_k_index, top_k_weights, self.remap.to(top_k_index.device))
        factors = [t.to(x.device) for t in self.factors]
        return experts_lowrank_op(x, top_k_index, top_k_weights, *factors, self.impl or impl)

    def rows_runs(self, x) -> bool:
        """Whether codegen/experts.py's ``rows`` runs its own kernel on this bank for inputs like ``x``."""
        from sparsec.codegen.experts import rows_usable

        return rows_usable(x, (self.gate_up_v, self.gate_up_u), (self.down_v, self.down_u))

    def grouped_mm_runs(self, x) -> bool:
        """Whether torch's grouped GEMM (codegen/experts.py's ``grouped_mm``) takes these factors."""
        from sparsec.codegen.experts import grouped_mm_usable

        return grouped_mm_usable(x, (self.gate_up_v, self.gate_up_u), (self.down_v, self.down_u))

    def stored(self) -> int:
        return sum(t.numel() for t in self.factors)

    @property
    def label(self) -> str:
        return f"lowrank {self.ranks[0]}/{self.ranks[1]}"

    @property
    def form(self) -> str:
        """As a plan's ``experts`` entry names it."""
        return f"lowrank:{self.fraction:g}"

    def op(self):
        return torch.ops.sparsec.experts_swiglu_lowrank.default

    def tensors(self) -> dict[str, torch.Tensor]:
        """The op's weight arguments, in order, by name (for the lowered graph's constants)."""
        return dict(zip(("gate_up_v", "gate_up_u", "down_v", "down_u"), self.factors))


def rank_of(fraction: float, N: int, K: int) -> int:
    """``fraction`` of the break-even rank N K / (N + K), in multiples of ``ALIGN``, at least one."""
    rank = int(fraction * N * K / (N + K)) // ALIGN * ALIGN
    return max(1, min(max(rank, ALIGN), min(N, K) - 1))


def fit(bank, fraction: float) -> Factoring:
    """The bank's (kept) experts factored at ``fraction`` of each projection's break-even rank."""
    from sparsec.passes.experts_formats import routed, rows_of

    gate_up, down, remap, x, index, weights = routed(bank)
    E, two_i, H = gate_up.shape
    r1, r2 = rank_of(fraction, two_i, H), rank_of(fraction, H, two_i // 2)
    out = [[], [], [], []]
    for e in range(E):
        rows = rows_of(x, index, weights, e)
        v1, u1 = _factor(gate_up[e], rows, r1)
        gate, up = (rows @ (u1 @ v1).t()).chunk(2, dim=-1)
        v2, u2 = _factor(down[e], F.silu(gate) * up, r2)
        for part, t in zip(out, (v1, u1, v2, u2)):
            part.append(t)
    dtype = bank.gate_up.dtype
    v1, u1, v2, u2 = (torch.stack(p).to(dtype).contiguous() for p in out)
    return Factoring(fraction, (r1, r2), v1, u1, v2, u2, remap)


def standin(bank, fraction: float) -> Factoring:
    """Random factors of the ranks ``fit`` gives, for timing (``experts_formats.Form``)."""
    from sparsec.passes.experts_formats import kept, random_like

    gate_up, down, remap = kept(bank)
    E, two_i, H = gate_up.shape
    r1, r2 = rank_of(fraction, two_i, H), rank_of(fraction, H, two_i // 2)
    shapes = ((E, r1, H), (E, two_i, r1), (E, r2, two_i // 2), (E, H, r2))
    v1, u1, v2, u2 = (random_like(s, gate_up, seed=i) for i, s in enumerate(shapes))
    return Factoring(fraction, (r1, r2), v1, u1, v2, u2, remap)


def _factor(weight: torch.Tensor, rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, U), V (rank, K) and U (N, rank), with U V the activation-aware rank-``rank`` fit of
    ``weight`` on ``rows`` (passes/lowrank.py)."""
    from sparsec.formats import LowRank
    from sparsec.passes.experts_formats import stats_of
    from sparsec.passes.registry import HANDLERS

    stats = stats_of(rows)
    # straight from the singular basis: decomposing the N x K product again took most of planning
    ((U, V),) = HANDLERS["lowrank"].factored([LowRank(rank)], weight, stats)
    return V, U


def candidates() -> list:
    """The ``experts_formats.Form`` of each rank share."""
    from sparsec.passes.experts_formats import Form

    return [Form(f"lowrank {fraction:g} of break-even", partial(fit, fraction=fraction),
                 partial(standin, fraction=fraction)) for fraction in FRACTIONS]
