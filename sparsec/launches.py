"""Layers the lowering runs as one launch over their stacked weights, and what that saves.

The planner prices each layer on its own, at its own shape. A stacked launch (gate and up, q/k/v)
streams the same bytes but pays a kernel's fixed cost once, so the plan's end-to-end prediction
takes off the difference between the members' own prices and the fingerprint's price of the
stacked shape (``end_to_end.predicted_us_stacked``, docs/report.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchGroup:
    names: tuple[str, ...]      # the layers, in the order their rows are stacked
    spec: str                   # their common format setting
    shape: tuple[int, int]      # the stacked weight: (sum of the layers' N, K)


def siblings(layers) -> list[list]:
    """Sets of two or more layers the lowering can run as one launch: one input, dtype, token count,
    K, and all with or all without a bias."""
    sets: dict[tuple, list] = {}
    for layer in layers:
        site = layer.site
        sets.setdefault((site.input_key, site.dtype_name, max(layer.tokens or 1, 1), site.K, site.bias is None),
                        []).append(layer)
    return [members for members in sets.values() if len(members) > 1]


def transposed_output_us(kernel: str | None, site, M: int, fingerprint) -> float:
    """What reading cuSPARSELt's column-major product row-major costs the layer's readers: one pass
    over it (read and written at the fingerprint's copy bandwidth), unless only linear layers read
    it (``Site.read_by_linears``). In a transformers Llama at 2048 tokens (H100, 2026-12-06,
    docs/benchmarks.md) the transposing reads folded into RoPE and the RMSNorms cost about 590 µs
    a replay over the 100 such projections; this prices them at 284 µs."""
    gbps = fingerprint.measured.get("copy_GBps") if kernel == "cusparselt" and not site.read_by_linears else None
    if not gbps:
        return 0.0
    return 2 * M * site.N * site.dtype.itemsize / (gbps * 1e3)


def price_shared(layers, fingerprint, mode: str) -> None:
    """Price the candidates of a format with work on the input alone (``shares_input_work``) as
    their share of one launch with the sibling layers that have the same candidate.

    Alone, each of gate and up would pay actrot's whole product with the rotation; run as one
    launch they pay it once, and priced alone a layer that pays only so would be refused. The price
    is a promise on the siblings' choices: ``settle_shared`` keeps it after selection."""
    from sparsec.codegen.packed import handler_for

    for members in siblings(layers):
        fmts = {c.fmt: c.spec for layer in members for c in layer.candidates if c.spec.shares_input_work}
        for fmt, spec in fmts.items():
            group = [(layer, c) for layer in members for c in layer.candidates
                     if c.fmt == fmt and c.rejected_because is None and c.predicted_us is not None]
            if len(group) > 1 and handler_for(spec).stack_pays(max(group[0][0].tokens or 1, 1)) \
                    and _share(group, fingerprint, mode):
                for layer, cand in group:
                    cand.siblings = cand.shared_with


def _share(group, fingerprint, mode: str) -> bool:
    """Set each candidate's price to its rows' share of the group's stacked launch (False, prices
    left alone, where the fingerprint cannot price that launch)."""
    layer0, cand0 = group[0]
    site, M = layer0.site, max(layer0.tokens or 1, 1)
    rows = sum(layer.site.N for layer, _ in group)
    pred = fingerprint.predict_detail(cand0.fmt, M, rows, site.K, dtype=site.dtype_name, mode=mode)
    if not math.isfinite(pred.us) or getattr(pred, "unmeasured", ""):
        return False
    names = [layer.name for layer, _ in group]
    for layer, cand in group:
        if cand.alone_us is None:
            cand.alone_us = cand.predicted_us
        cand.predicted_us = pred.us * layer.site.N / rows
        cand.shared_with = tuple(n for n in names if n != layer.name)
        cand.kernel, cand.impl = pred.kernel, pred.impl
    return True


def settle_shared(layers, fingerprint, mode: str) -> list[tuple]:
    """(layer, reason) for each chosen candidate priced with siblings: priced again on the siblings
    that chose the same setting now (alone where none did; as first priced where all did), and
    refused where those layers together are then predicted no faster than dense."""
    by_name = {layer.name: layer for layer in layers}
    refused, seen = [], set()
    for layer in layers:
        cand = layer.chosen
        if cand is None or not cand.siblings or layer.name in seen:
            continue
        mates = [by_name[n] for n in cand.siblings
                 if n in by_name and by_name[n].chosen is not None and by_name[n].chosen.fmt == cand.fmt]
        group = [(layer, cand)] + [(m, m.chosen) for m in mates]
        seen.update(m.name for m, _ in group)
        if set(cand.shared_with) == {m.name for m in mates}:
            continue  # priced on just these already
        left = [n for n in cand.siblings if n not in {m.name for m in mates}]
        if not left:  # all of them again (a later selection): the first price holds
            _share(group, fingerprint, mode)
            continue
        if len(group) == 1 or not _share(group, fingerprint, mode):
            for one, c in group:
                c.predicted_us, c.shared_with = c.alone_us, ()
        dense_us = sum(one.dense.predicted_us for one, _ in group)
        chosen_us = sum(c.predicted_us for _, c in group)
        if chosen_us >= dense_us:
            with_whom = f" with {', '.join(m.name for m in mates)}" if mates else ""
            why = (f"pays only in one launch with {', '.join(left)}, which chose otherwise: predicted "
                   f"{dense_us / chosen_us:.2f}x of dense{with_whom} at M={max(layer.tokens or 1, 1)}")
            refused += [(one, why) for one, _ in group]
    return refused


def price_groups(groups, layers, fingerprint, mode: str) -> tuple[float, list[str]]:
    """Microseconds the stacked launches save against their members' own predictions, and one
    planner-log line per group. A group the fingerprint cannot price saves nothing (said so)."""
    by_name = {layer.name: layer for layer in layers}
    saved, lines = 0.0, []
    for group in groups:
        members = [by_name[n] for n in group.names if n in by_name and by_name[n].chosen is not None]
        N, K = group.shape
        line = f"{', '.join(group.names)}: one launch over their stacked {group.spec} weights ({N} x {K}, same input)"
        if not members:
            lines.append(line)
            continue
        if all(layer.chosen.shared_with for layer in members):
            lines.append(f"{line}: priced so in selection ({sum(l.chosen.predicted_us for l in members):.1f} us)")
            continue
        apart = sum(layer.chosen.predicted_us for layer in members)
        M, dtype = max(members[0].tokens, 1), members[0].site.dtype_name
        why = fingerprint.can_predict(group.spec, dtype, mode)
        pred = None if why else fingerprint.predict_detail(group.spec, M, N, K, dtype=dtype, mode=mode)
        if pred is None or not math.isfinite(pred.us) or not math.isfinite(apart) or getattr(pred, "unmeasured", ""):
            lines.append(f"{line}; priced as {len(members)} launches (the fingerprint cannot price the stacked shape)")
            continue
        kernel = getattr(pred, "kernel", None)
        stacked_us = pred.us + sum(transposed_output_us(kernel, layer.site, M, fingerprint) for layer in members)
        saved += apart - stacked_us
        note = f" ({pred.note})" if getattr(pred, "note", "") else ""
        lines.append(f"{line}: predicted {stacked_us:.1f} us against {apart:.1f} us as {len(members)} launches{note}")
    return saved, lines
