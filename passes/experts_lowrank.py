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

A bank is factored only if the factored bank measures faster here than the bank as it runs now
(each implementation is timed on the bank's calibration routing; the fastest is kept). Then the
smallest rank share whose end-to-end error, in the user's metric, with every faster bank factored
(and the experts pruning dropped), is within the share of the budget ``expert_pruning`` gives; one
model evaluation per share tried. A fingerprint of another device has no figures for factored
banks yet: planning for one, nothing is factored and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def stored(self) -> int:
        return sum(t.numel() for t in self.factors)


def rank_of(fraction: float, N: int, K: int) -> int:
    """``fraction`` of the break-even rank N K / (N + K), in multiples of ``ALIGN``, at least one."""
    rank = int(fraction * N * K / (N + K)) // ALIGN * ALIGN
    return max(1, min(max(rank, ALIGN), min(N, K) - 1))


def fit(bank, fraction: float) -> Factoring:
    """The bank's (kept) experts factored at ``fraction`` of each projection's break-even rank."""
    pruning = getattr(bank, "pruning", None)
    gate_up = (pruning.gate_up if pruning is not None else bank.gate_up).float()
    down = (pruning.down if pruning is not None else bank.down).float()
    E, two_i, H = gate_up.shape
    r1, r2 = rank_of(fraction, two_i, H), rank_of(fraction, H, two_i // 2)
    x, index, weights = bank.inputs
    if pruning is not None:
        from sparsec.codegen.experts import route_kept

        index, weights = route_kept(index, weights, pruning.remap.to(index.device))
    x = x.float().to(gate_up.device)
    index, weights = index.to(gate_up.device), weights.to(gate_up.device)
    out = [[], [], [], []]
    for e in range(E):
        rows = x[((index == e) & (weights != 0)).any(-1)]
        v1, u1 = _factor(gate_up[e], rows, r1)
        gate, up = (rows @ (u1 @ v1).t()).chunk(2, dim=-1)
        v2, u2 = _factor(down[e], F.silu(gate) * up, r2)
        for part, t in zip(out, (v1, u1, v2, u2)):
            part.append(t)
    dtype = bank.gate_up.dtype
    v1, u1, v2, u2 = (torch.stack(p).to(dtype).contiguous() for p in out)
    return Factoring(fraction, (r1, r2), v1, u1, v2, u2, None if pruning is None else pruning.remap)


def _factor(weight: torch.Tensor, rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, U), V (rank, K) and U (N, rank), with U V the activation-aware rank-``rank`` fit of
    ``weight`` on ``rows`` (passes/lowrank.py)."""
    from sparsec.passes.registry import HANDLERS
    from sparsec.formats import LowRank
    from sparsec.sites import SiteStats

    K = weight.shape[1]
    stats = None
    if rows.shape[0] > 0:
        r = rows.double()
        stats = SiteStats(gram=r.t() @ r, total=r.sum(0), rows=int(rows.shape[0]))
        if stats.rows < K:
            stats.fall_back_to_diagonal()
    (approx,) = HANDLERS["lowrank"].approximate([LowRank(rank)], weight, stats)
    U, S, Vh = torch.linalg.svd(approx.double(), full_matrices=False)
    return Vh[:rank].float(), (U[:, :rank] * S[:rank]).float()


def choose(banks, evaluate, allowed: float, speed, graph_replay: bool, elsewhere: str | None,
           show=lambda v: f"{v:.3g}") -> dict[str, dict]:
    """Decide which banks run factored, and at which rank share; sets ``bank.factoring`` and returns,
    per bank name, the report's ``factoring`` entry.

    ``evaluate()`` measures the end-to-end error in the user's metric (the worse of calibration and
    held-out) with every bank's pruning and factoring applied; ``allowed`` is what expert rewrites may
    cost in all, in the same units; ``speed(bank, factoring, impls)`` gives (us factored in its fastest
    implementation, that implementation, us as the bank runs now); ``elsewhere`` why the fingerprint
    is of another device, or None."""
    from sparsec.codegen.experts import IMPLS

    live = [b for b in banks if b.inputs is not None]
    out = {b.name: {"factored": False, "allowed_error": allowed, "tried": []} for b in live}
    for bank in live:
        bank.factoring = None
    if not live:
        return out
    if elsewhere is not None:
        return _refuse(out, f"not factored: the fingerprint describes another device ({elsewhere}) and has no "
                            "figures for factored banks; plan on that device to time them")
    if allowed <= 0:
        return _refuse(out, "not factored: the error budget leaves expert rewrites nothing (error_budget or "
                            "expert_pruning is 0)")
    impls = [i for i in IMPLS if not (graph_replay and i == "loop")]
    for fraction in FRACTIONS:
        faster = []
        for bank in live:
            factoring = fit(bank, fraction)
            us, impl, now = speed(bank, factoring, impls)
            factoring.impl = impl
            tried = {"rank_share": fraction, "ranks": list(factoring.ranks), "implementation": impl,
                     "measured_us": us, "unfactored_us": now, "measured_error": None}
            out[bank.name]["tried"].append(tried)
            if us < now:
                faster.append((bank, factoring, tried))
        if not faster:
            continue
        for bank, factoring, _ in faster:
            bank.factoring = factoring
        error = evaluate()
        for _, _, tried in faster:
            tried["measured_error"] = error
        if error <= allowed:
            for bank, factoring, tried in faster:
                entry = out[bank.name]
                r1, r2 = factoring.ranks
                entry.update(factored=True, rank_share=fraction, ranks=[r1, r2], implementation=factoring.impl,
                             measured_error=error, measured_us=tried["measured_us"],
                             unfactored_us=tried["unfactored_us"],
                             reason=(f"experts factored to ranks {r1} (gate_up) and {r2} (down), {fraction:g} of "
                                     f"break-even: {factoring.impl} measured {tried['measured_us']:.1f} us against "
                                     f"{tried['unfactored_us']:.1f} us as it ran, end-to-end {show(error)} within "
                                     f"the {show(allowed)} expert rewrites may spend"))
            break
        for bank, _, _ in faster:
            bank.factoring = None
    for bank in live:
        entry = out[bank.name]
        if entry["factored"]:
            continue
        tries = entry["tried"]
        slower = [t for t in tries if t["measured_us"] >= t["unfactored_us"]]
        over = [t for t in tries if t["measured_error"] is not None and t["measured_error"] > allowed]
        if over:
            worst = min(over, key=lambda t: t["measured_error"])
            entry["reason"] = (f"not factored: at {worst['rank_share']:g} of break-even rank the end-to-end error "
                               f"measured {show(worst['measured_error'])}, over the {show(allowed)} expert rewrites "
                               "may spend")
        elif slower:
            t = slower[0]
            entry["reason"] = (f"not factored: at {t['rank_share']:g} of break-even rank the factored bank measured "
                               f"{t['measured_us']:.1f} us against {t['unfactored_us']:.1f} us as it runs: no faster")
        else:
            entry["reason"] = "not factored"
    return out


def _refuse(out: dict[str, dict], reason: str) -> dict[str, dict]:
    for entry in out.values():
        entry["reason"] = reason
    return out
