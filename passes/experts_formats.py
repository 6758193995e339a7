"""Structured formats inside expert banks, chosen within the error budget expert rewrites may spend.

A bank's experts may run in a structured form: factored to low rank (``passes/experts_lowrank.py``),
2:4 sparse (``passes/experts_twofour.py``) or block-sparse (``passes/experts_block.py``), each a
bank op of its own with the same four
implementations as the dense bank (codegen/experts.py). Every candidate form is fitted per expert
on the tokens the first calibration call routes to it (``routed``, ``stats_of``). Its speed does not
depend on the fitted values, so it is timed first on a stand-in of the same shapes and structure
filled with random values (``Form.standin``: no fitting, which for Mixtral-sized banks would take
minutes per form), in each implementation, on the bank's calibration routing; a form counts for a
bank only if its fastest implementation beats the bank as it runs now, and only forms that count
are fitted. Then the forms are tried fastest first
(their measured time summed over the banks where they pay), each with every such bank rewritten
(and the experts pruning dropped), and the first whose end-to-end error, in the user's metric on
calibration and held-out data, is within the share of the budget ``expert_pruning`` gives is kept:
one model evaluation per form tried. A fingerprint of another device has no figures for these
forms yet: planning for one, no bank is rewritten and the report says why.

Fits are made again for the evaluation rather than held from the timing, so that only one form's
weights for every bank exist at a time.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Form(NamedTuple):
    """A structured form experts may take: ``fit(bank)`` the bank's experts fitted to it (on its
    calibration rows), ``standin(bank)`` the same shapes and structure with random values, for
    timing without fitting (None: time the fit)."""

    label: str
    fit: Callable
    standin: Callable | None = None


def kept(bank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(gate_up, down, remap): the bank's kept experts as stored, and the pruning's remap (or None)."""
    pruning = getattr(bank, "pruning", None)
    if pruning is None:
        return bank.gate_up, bank.down, None
    return pruning.gate_up, pruning.down, pruning.remap


def random_like(shape, like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Gaussian values of ``shape`` in ``like``'s dtype and device, scaled by the last dimension so
    products stay of unit size (timing stand-ins: never zeros, never denormals)."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    t = torch.randn(shape, generator=g, device=like.device, dtype=torch.float32)
    return t.mul_(shape[-1] ** -0.5).to(like.dtype)


def routed(bank):
    """(gate_up, down, remap, x, index, weights): the bank's (kept) experts in float32 and its first
    calibration call's inputs and routing, through the kept experts where it was pruned."""
    gate_up, down, remap = kept(bank)
    gate_up, down = gate_up.float(), down.float()
    x, index, weights = bank.inputs
    if remap is not None:
        from sparsec.codegen.experts import route_kept

        index, weights = route_kept(index, weights, remap.to(index.device))
    device = gate_up.device
    return gate_up, down, remap, x.float().to(device), index.to(device), weights.to(device)


def rows_of(x, index, weights, e: int) -> torch.Tensor:
    """The rows of ``x`` routed to expert ``e`` with a nonzero weight."""
    return x[((index == e) & (weights != 0)).any(-1)]


def stats_of(rows: torch.Tensor):
    """Second-order statistics of an expert's input rows (None without rows); with fewer rows than
    inputs, each input's energy alone (``SiteStats.fall_back_to_diagonal``)."""
    from sparsec.sites import SiteStats

    if rows.shape[0] == 0:
        return None
    r = rows.double()
    stats = SiteStats(gram=r.t() @ r, total=r.sum(0), rows=int(rows.shape[0]))
    if stats.rows < rows.shape[1]:
        stats.fall_back_to_diagonal()
    return stats


def choose(banks, candidates, evaluate, allowed: float, speed, graph_replay: bool, elsewhere: str | None,
           show=lambda v: f"{v:.3g}", forced=None, refused: str | None = None) -> dict[str, dict]:
    """Decide which form each bank's experts run in; sets ``bank.structured`` and returns, per bank
    name, the report's ``expert_format`` entry.

    ``candidates``: the ``Form`` of each (or (label, fit) pairs, timed on their fits); ``evaluate()`` measures the
    end-to-end error in the user's metric (the worse of calibration and held-out) with every bank's
    pruning and ``structured`` rewrite applied; ``allowed`` is what expert rewrites may cost in all,
    in the same units; ``speed(bank, rewrite, impls)`` gives (us in the rewrite's fastest
    implementation, that implementation, us as the bank runs now); ``elsewhere`` why the fingerprint
    is of another device, or None. ``forced``: bank name -> (label, fit), or None for dense, of the
    banks a plan names: those run as it says (timed, not vetoed), the others are chosen for;
    ``refused``: why those others stay dense without being tried (no ``evaluate`` then)."""
    from sparsec.codegen.experts import IMPLS, ROWS_IMPLS, TORCH_IMPLS, rows_worth_timing

    forced = forced or {}
    impls = [i for i in IMPLS if not (graph_replay and i == "loop")]

    def extra(bank, rewrite) -> list[str]:  # torch's grouped GEMM where it takes the form; rows where worth timing
        x, index, _ = bank.inputs
        few = rows_worth_timing(int(x.shape[0]), int(index.shape[1]), int(bank.gate_up.shape[0]))
        runs = getattr(rewrite, "rows_runs", None)
        mm = getattr(rewrite, "grouped_mm_runs", None)
        return ((list(TORCH_IMPLS) if mm is not None and mm(x) else [])
                + (list(ROWS_IMPLS) if few and runs is not None and runs(x) else []))
    everything = [b for b in banks if b.inputs is not None]
    out = {b.name: {"format": None, "allowed_error": allowed, "tried": []} for b in everything}
    for bank in everything:
        bank.structured = None
        if bank.name not in forced:
            continue
        entry = out[bank.name]
        entry["forced_by"] = "plan"
        if forced[bank.name] is None:
            entry["reason"] = "experts kept dense: the plan asks for dense"
            continue
        label, fit = forced[bank.name]
        rewrite = fit(bank)
        us, impl, now = speed(bank, rewrite, impls + extra(bank, rewrite))
        rewrite.impl = impl
        bank.structured = rewrite
        entry.update(format=rewrite.label, form=rewrite.form, implementation=impl, measured_us=us, dense_us=now,
                     reason=(f"experts run {rewrite.label} ({label}) as the plan asks: {impl} measured {us:.1f} us "
                             f"against {now:.1f} us dense" + ("" if us < now else ", slower")))
    live = [b for b in everything if b.name not in forced]
    if not live:
        return out
    if refused is not None:
        return _refuse(out, refused, live)
    if elsewhere is not None:
        return _refuse(out, f"experts kept dense: the fingerprint describes another device ({elsewhere}) and has "
                            "no figures for structured experts; plan on that device to time them", live)
    if allowed <= 0:
        return _refuse(out, "experts kept dense: the error budget leaves expert rewrites nothing (error_budget or "
                            "expert_pruning is 0)", live)
    # (us summed over the banks it pays for, label, fit, {bank: tried})
    paying: list[tuple[float, str, object, dict]] = []
    for candidate in candidates:
        label, fit, standin = Form(*candidate)
        wins, total = {}, 0.0
        for bank in live:
            rewrite = (standin or fit)(bank)
            us, impl, now = speed(bank, rewrite, impls + extra(bank, rewrite))
            tried = {"format": label, "stored": _stored_share(bank, rewrite), "implementation": impl,
                     "measured_us": us, "dense_us": now, "measured_error": None}
            out[bank.name]["tried"].append(tried)
            if us < now:
                wins[bank.name] = (impl, tried)
                total += us - now
            del rewrite
        if wins:
            paying.append((total, label, fit, wins))
    for _, label, fit, wins in sorted(paying, key=lambda p: p[0]):
        rewrites = {}
        for bank in live:
            if bank.name in wins:
                rewrite = fit(bank)
                rewrite.impl = wins[bank.name][0]
                bank.structured = rewrites[bank.name] = rewrite
        error = evaluate()
        for _, tried in wins.values():
            tried["measured_error"] = error
        if error <= allowed:
            for bank in live:
                if bank.name not in wins:
                    continue
                entry, tried = out[bank.name], wins[bank.name][1]
                entry.update(format=rewrites[bank.name].label, form=rewrites[bank.name].form,
                             implementation=tried["implementation"],
                             measured_error=error, measured_us=tried["measured_us"], dense_us=tried["dense_us"],
                             reason=(f"experts run {rewrites[bank.name].label} ({label}): {tried['implementation']} "
                                     f"measured {tried['measured_us']:.1f} us against {tried['dense_us']:.1f} us as it "
                                     f"ran, end-to-end {show(error)} within the {show(allowed)} expert rewrites may "
                                     "spend"))
            break
        for bank in live:
            bank.structured = None
    for bank in everything:
        entry = out[bank.name]
        if entry["format"] is None and "reason" not in entry:
            entry["reason"] = _why_dense(entry["tried"], allowed, show)
    return out


def _stored_share(bank, rewrite) -> float:
    """The rewrite's stored values over the (kept) dense experts'."""
    pruning = getattr(bank, "pruning", None)
    dense = (pruning.gate_up.numel() + pruning.down.numel()) if pruning is not None else \
        (bank.gate_up.numel() + bank.down.numel())
    return rewrite.stored() / dense


def _why_dense(tries: list[dict], allowed: float, show) -> str:
    over = [t for t in tries if t["measured_error"] is not None and t["measured_error"] > allowed]
    if over:
        t = min(over, key=lambda t: t["measured_error"])
        return (f"experts kept dense: {t['format']} measured end to end {show(t['measured_error'])}, over the "
                f"{show(allowed)} expert rewrites may spend" + ("; no other form fitted" if len(tries) > 1 else ""))
    slower = [t for t in tries if t["measured_us"] >= t["dense_us"]]
    if slower and len(slower) == len(tries):
        t = min(slower, key=lambda t: t["measured_us"])
        return (f"experts kept dense: no structured form measured faster (fastest {t['format']}, "
                f"{t['measured_us']:.1f} us against {t['dense_us']:.1f} us as it runs)")
    return "experts kept dense"


def _refuse(out: dict[str, dict], reason: str, banks) -> dict[str, dict]:
    for bank in banks:
        out[bank.name]["reason"] = reason
    return out
