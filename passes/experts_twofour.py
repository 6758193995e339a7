"""Expert banks with 2:4 sparse experts.

Each expert's gate_up and down keep two of every four consecutive input weights, fitted as every
2:4 layer in sparsec (``passes/twofour.py``) on the tokens the first calibration call routes to the
expert (its down projection on what its 2:4 gate_up gives it); an expert no token reached keeps
its largest weights. The bank then runs as ``sparsec::experts_swiglu_twofour`` (codegen/experts.py),
whose grouped implementation reads the kept values and their position bytes, about 9/16 of the
dense experts' bytes at 16 bits. Whether a bank runs so is decided with the other formats of
experts (``passes/experts_formats.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LABEL = "2:4"


@dataclass
class TwoFourBank:
    """A bank's (kept) experts in 2:4 form: values (E, N, K/2) and position bytes per projection."""

    gate_up_values: torch.Tensor
    gate_up_meta: torch.Tensor
    down_values: torch.Tensor
    down_meta: torch.Tensor
    remap: torch.Tensor | None = None
    impl: str | None = None
    label: str = LABEL
    form: str = LABEL  # as a plan's ``experts`` entry names it

    def tensors(self) -> dict[str, torch.Tensor]:
        """The op's weight arguments, in order, by name (for the lowered graph's constants)."""
        return {"gate_up_values": self.gate_up_values, "gate_up_meta": self.gate_up_meta,
                "down_values": self.down_values, "down_meta": self.down_meta}

    def op(self):
        return torch.ops.sparsec.experts_swiglu_twofour.default

    def rows_runs(self, x) -> bool:
        """Whether codegen/experts.py's ``rows`` runs its own kernel on this bank for inputs like ``x``."""
        from sparsec.codegen.experts import TwoFourWeights, rows_usable

        return rows_usable(x, TwoFourWeights(self.gate_up_values, self.gate_up_meta),
                           TwoFourWeights(self.down_values, self.down_meta))

    def stored(self) -> int:
        """Stored values, the position bytes counted at their share of a value of this dtype."""
        per_byte = 1.0 / self.gate_up_values.element_size()
        return int(self.gate_up_values.numel() + self.down_values.numel()
                   + per_byte * (self.gate_up_meta.numel() + self.down_meta.numel()))

    def run(self, x, top_k_index, top_k_weights, impl: str) -> torch.Tensor:
        from sparsec.codegen.experts import experts_twofour_op, route_kept

        if self.remap is not None:
            top_k_index, top_k_weights = route_kept(top_k_index, top_k_weights, self.remap.to(top_k_index.device))
        t = [v.to(x.device) for v in self.tensors().values()]
        return experts_twofour_op(x, top_k_index, top_k_weights, *t, self.impl or impl)


def fit(bank) -> TwoFourBank:
    """The bank's (kept) experts pruned to 2:4, each fitted on its routed rows."""
    from sparsec.passes.experts_formats import routed, rows_of

    gate_up, down, remap, x, index, weights = routed(bank)
    E = gate_up.shape[0]
    if gate_up.shape[2] % 4 or down.shape[2] % 4:
        raise ValueError(f"2:4 experts need inputs in fours; the bank has H={gate_up.shape[2]}, I={down.shape[2]}")
    parts = [[], [], [], []]
    for e in range(E):
        rows = rows_of(x, index, weights, e)
        w1 = _fit(gate_up[e], rows)
        gate, up = (rows @ w1.t()).chunk(2, dim=-1)
        w2 = _fit(down[e], F.silu(gate) * up)
        for part, t in zip(parts, (*_pack(w1), *_pack(w2))):
            part.append(t)
    dtype = bank.gate_up.dtype
    gv, gm, dv, dm = (torch.stack(p).contiguous() for p in parts)
    return TwoFourBank(gv.to(dtype), gm, dv.to(dtype), dm, remap)


def _fit(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    from sparsec.formats import TwoFour
    from sparsec.passes.experts_formats import stats_of
    from sparsec.passes.registry import HANDLERS

    handler = HANDLERS["2:4"]
    stats = stats_of(rows)
    method = None if stats is not None else "magnitude"
    (approx,) = handler.approximate([TwoFour()], weight, stats, method=method)
    return approx.float()


def _pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (N, K/2), position bytes) of a weight with at most two nonzeros in every four."""
    from sparsec.codegen.twofour import encode_positions

    N, K = weight.shape
    groups = weight.reshape(N, K // 4, 4)
    pos = groups.abs().topk(2, dim=-1).indices.sort(dim=-1).values
    return groups.gather(2, pos).reshape(N, K // 2).contiguous(), encode_positions(pos)


def standin(bank) -> TwoFourBank:
    """Random 2:4 experts of the bank's shapes, for timing (``experts_formats.Form``)."""
    from sparsec.passes.experts_formats import kept, random_like

    gate_up, down, remap = kept(bank)
    parts = [[], [], [], []]
    for e in range(gate_up.shape[0]):  # one expert's dense stand-in at a time
        w1, w2 = random_like(gate_up.shape[1:], gate_up, seed=2 * e), random_like(down.shape[1:], down, seed=2 * e + 1)
        for part, t in zip(parts, (*_pack(w1), *_pack(w2))):
            part.append(t)
    gv, gm, dv, dm = (torch.stack(p).contiguous() for p in parts)
    return TwoFourBank(gv, gm, dv, dm, remap)


def candidates() -> list:
    """The ``experts_formats.Form`` of 2:4."""
    from sparsec.passes.experts_formats import Form

    return [Form(LABEL, fit, standin)]
