"""Dropping the experts that calibration routes almost nothing to, within the error budget.

An expert is a candidate only when calibration makes it rare with confidence: the upper end of
the rule of three, (pairs routed to it + 3) / pairs routed in all, is under ``RARE`` of the share
every expert would get under uniform routing. Too little calibration data therefore drops nothing
(an expert calibration never saw is not known to be rare), and the report says how many pairs
would be needed. A dropped expert's weights leave the bank and its tokens keep their other chosen
experts, reweighted to the same total (``codegen.experts.route_kept``).

A bank's candidates count only if dropping them all measures faster than the bank as it runs now
(its chosen implementation, on its own calibration routing; or the fingerprint's prediction when
planning for another device). Then the rarest candidates over every bank are dropped, the largest
set (rarest first) whose measured end-to-end error, in the user's metric, on calibration and
held-out data, stays within the share of the budget that ``expert_pruning`` gives: the full set
first, then a bisection, a few model evaluations in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RARE = 0.25          # of the uniform share 1/E: under it, an expert counts as rarely used
CONFIDENCE_PAIRS = 3  # the rule of three: with c of n pairs seen, the share is under (c + 3) / n at ~95%


@dataclass
class Pruning:
    """A bank without some of its experts: ``keep`` the experts left, in order; ``remap`` (E,) each
    expert's index among them, -1 where dropped."""

    keep: list[int]
    remap: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, gate_up: torch.Tensor, down: torch.Tensor, dropped: set[int]) -> "Pruning":
        E = gate_up.shape[0]
        keep = [e for e in range(E) if e not in dropped]
        remap = torch.full((E,), -1, dtype=torch.int64)
        remap[keep] = torch.arange(len(keep))
        index = torch.tensor(keep, device=gate_up.device)
        return cls(keep, remap, gate_up.index_select(0, index).contiguous(), down.index_select(0, index).contiguous())

    impl = None  # a pruned bank keeps the implementation chosen for it

    def tensors(self) -> dict[str, torch.Tensor]:
        """The op's weight arguments, in order, by name (for the lowered graph's constants)."""
        return {"gate_up": self.gate_up, "down": self.down}

    def op(self):
        return torch.ops.sparsec.experts_swiglu.default

    @property
    def dropped(self) -> list[int]:
        return [e for e, to in enumerate(self.remap.tolist()) if to < 0]

    def run(self, x, top_k_index, top_k_weights, impl: str) -> torch.Tensor:
        from sparsec.codegen.experts import experts_op, route_kept

        index, weights = route_kept(top_k_index, top_k_weights, self.remap.to(top_k_index.device))
        return experts_op(x, index, weights, self.gate_up.to(x.device), self.down.to(x.device), impl)


def shares(counts: torch.Tensor) -> list[float]:
    total = int(counts.sum())
    return [int(c) / total if total else 0.0 for c in counts.tolist()]


def rare_experts(counts: torch.Tensor, top_k: int) -> list[tuple[float, int]]:
    """(share, expert) of each expert rare with confidence, rarest first; at least ``top_k`` kept."""
    E, total = counts.numel(), int(counts.sum())
    if total == 0:
        return []
    limit = RARE / E
    rare = sorted((int(c) / total, e) for e, c in enumerate(counts.tolist())
                  if (int(c) + CONFIDENCE_PAIRS) / total < limit)
    return rare[:max(0, E - top_k)]


def pairs_needed(E: int) -> int:
    """Routed pairs calibration must show before an expert it never reached can count as rare."""
    return math.floor(CONFIDENCE_PAIRS * E / RARE) + 1


def why_none_rare(counts: torch.Tensor) -> str:
    E, total = counts.numel(), int(counts.sum())
    rarest = int(counts.min())
    if total < pairs_needed(E):
        return (f"no expert dropped: calibration routed {total} (token, expert) pairs, too few to call any of the "
                f"{E} experts rare (at least {pairs_needed(E)} are needed; give more calibration tokens)")
    return (f"no expert dropped: the rarest got {rarest} of {total} routed pairs ({100 * rarest / total:.1f}%), not "
            f"clearly under {100 * RARE / E:.1f}% ({RARE:g} of the uniform share)")


def choose(banks, evaluate, allowed: float, faster, show=lambda v: f"{v:.3g}") -> dict[str, dict]:
    """Decide which experts every bank drops; sets ``bank.pruning`` and returns, per bank name, the
    report's ``pruning`` entry.

    ``evaluate()`` measures the end-to-end error in the user's metric (the worse of calibration and
    held-out) with every bank's current ``pruning`` applied; ``allowed`` the error pruning may
    cause, in the same units (``show`` writes one); ``faster(bank, pruning)`` returns (pruned us,
    as-is us, how) for the bank, or None when it cannot tell."""
    out: dict[str, dict] = {}
    pool: list[tuple[float, int, int]] = []  # (share, bank index, expert) over every bank, rarest first
    for i, bank in enumerate(banks):
        entry = {"routing_share": shares(bank.counts) if bank.counts is not None else None,
                 "dropped": [], "allowed_error": allowed, "measured_error": None}
        out[bank.name] = entry
        if bank.counts is None:
            entry["reason"] = "no expert dropped: the bank was not reached on the calibration calls"
            continue
        rare = rare_experts(bank.counts, int(bank.inputs[1].shape[1]))
        if not rare:
            entry["reason"] = why_none_rare(bank.counts)
            continue
        if allowed <= 0:
            entry["reason"] = (f"no expert dropped: experts {[e for _, e in rare]} are rarely routed, but the error "
                               "budget leaves expert pruning nothing (error_budget or expert_pruning is 0)")
            continue
        timed = faster(bank, Pruning.of(bank.gate_up, bank.down, {e for _, e in rare}))
        if timed is not None:
            pruned_us, now_us, how = timed
            entry.update(pruned_us=pruned_us, unpruned_us=now_us)
            if pruned_us >= now_us:
                entry["reason"] = (f"no expert dropped: without its rare experts {[e for _, e in rare]} the bank "
                                   f"{how} {pruned_us:.1f} us against {now_us:.1f} us as it runs: no faster")
                continue
        pool.extend((share, i, e) for share, e in rare)
    if not pool:
        return out
    pool.sort()

    applied = [0]

    def apply(n: int) -> None:
        dropped: dict[int, set[int]] = {}
        for _, i, e in pool[:n]:
            dropped.setdefault(i, set()).add(e)
        for i, bank in enumerate(banks):
            bank.pruning = Pruning.of(bank.gate_up, bank.down, dropped[i]) if i in dropped else None
        applied[0] = n

    def error_of(n: int) -> float:
        apply(n)
        return evaluate()

    errors = {len(pool): error_of(len(pool))}
    lo, hi = (len(pool), len(pool)) if errors[len(pool)] <= allowed else (0, len(pool))
    while hi - lo > 1:  # the largest prefix, rarest first, within the allowance
        mid = (lo + hi) // 2
        errors[mid] = error_of(mid)
        lo, hi = (mid, hi) if errors[mid] <= allowed else (lo, mid)
    best = lo
    if applied[0] != best:
        apply(best)
    kept_error = errors[best] if best else 0.0
    chosen = {(i, e) for _, i, e in pool[:best]}
    for i, bank in enumerate(banks):
        entry = out[bank.name]
        mine = [(share, e) for share, j, e in pool if j == i]
        if not mine:
            continue
        entry["dropped"] = sorted(e for _, e in mine if (i, e) in chosen)
        refused = [e for _, e in mine if (i, e) not in chosen]
        entry["measured_error"] = kept_error if entry["dropped"] else None
        first_over = min((n for n, err in errors.items() if err > allowed), default=None)
        if entry["dropped"]:
            saved = (bank.gate_up.numel() + bank.down.numel()) // bank.shape[0] * len(entry["dropped"]) \
                * bank.gate_up.element_size()
            entry["weights_saved_bytes"] = int(saved)
            entry["reason"] = (f"dropped experts {entry['dropped']} (each got under {100 * RARE / bank.shape[0]:.1f}% "
                               f"of the routed pairs): end-to-end {show(kept_error)} within the "
                               f"{show(allowed)} expert pruning may spend")
            if refused:
                entry["reason"] += f"; kept rare experts {refused}: dropping them too measured over it"
        else:
            over = errors[first_over] if first_over is not None else float("nan")
            entry["reason"] = (f"no expert dropped: dropping the rare experts {refused} measured end to end "
                               f"{show(over)}, over the {show(allowed)} expert pruning may spend")
    return out
