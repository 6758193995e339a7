"""Synthetic but self-consistent ``sparsec.report/1`` reports for testing the report code.

The numbers come from a toy cost and error model with a seeded generator, not from any device:
they only have to be consistent the way the pipeline's are (speedup = dense time / predicted
time, declared sparsity from the format, the chosen candidate within the remaining budget and
faster than dense, every rejected candidate with its reason), so that renderers and ``extend``
can be checked against figures computed here independently.
"""

from __future__ import annotations

import math
import random

from sparsec.formats import family_of, parse_spec

# Toy substrate: a copy bandwidth in bytes per microsecond, a dense peak in flops per
# microsecond, a launch cost, and torch's 2:4 host overhead, in the spirit of DESIGN.md.
_BYTES_PER_US = 2.8e6
_FLOPS_PER_US = 7.0e8
_LAUNCH_US = 4.0
_SPARSE24_HOST_US = 40.0

LLAMA_BLOCK = (
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 1024, 4096),
    ("self_attn.v_proj", 1024, 4096),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 14336, 4096),
    ("mlp.up_proj", 14336, 4096),
    ("mlp.down_proj", 4096, 14336),
)
HOSTILE_NAMES = (
    '<script>window.__pwned = 1</script>',
    '"><img src=x onerror="window.__pwned=2">',
    "[bold red]markup[/] & ampersand",
)


def _dense_us(m: int, n: int, k: int) -> float:
    return _LAUNCH_US + max(2 * n * k / _BYTES_PER_US, 2 * m * n * k / _FLOPS_PER_US)


def _format_us(fmt: str, m: int, n: int, k: int, rng: random.Random) -> float:
    spec = parse_spec(fmt)
    kept = spec.stored_params(n, k) / (n * k)
    flops_share = kept
    extra = 0.0
    if fmt == "2:4":
        extra = _SPARSE24_HOST_US
    elif fmt.startswith("block"):
        flops_share = kept * 1.6  # irregular tiles run below peak
    elif fmt.startswith("monarch"):
        extra = _LAUNCH_US  # two launches
    elif fmt.startswith("lowrank"):
        extra = _LAUNCH_US
    base = _LAUNCH_US + extra + max(2 * n * k * kept / _BYTES_PER_US, 2 * m * n * k * flops_share / _FLOPS_PER_US)
    return base * rng.uniform(0.95, 1.1)


def _format_error(fmt: str, rng: random.Random) -> float:
    family = family_of(fmt)
    scale = {"2:4": 0.002, "block": 0.012, "lowrank": 0.004, "monarch": 0.02}[family]
    return scale * rng.uniform(0.3, 1.5)


def _candidate_formats(n: int, k: int) -> list[str]:
    return ["2:4", "block:64:0.25", f"lowrank:{max(1, min(n, k) // 4)}", "monarch:4"]


def make_layer(name: str, n: int, k: int, tokens: int, budget_left: float, rng: random.Random,
               *, measured: bool, fingerprint: str = "h200") -> tuple[dict, float]:
    """One layer planned the way the selector does it; returns the layer and the budget it used."""
    dense_us = _dense_us(tokens, n, k)
    costed = []
    candidates = []
    for fmt in _candidate_formats(n, k):
        why_not = parse_spec(fmt).check(n, k)
        if why_not:
            candidates.append({"format": fmt, "predicted_us": None, "predicted_error": None,
                               "rejected_because": why_not})
            continue
        costed.append((fmt, _format_us(fmt, tokens, n, k, rng), _format_error(fmt, rng)))
    eligible = [c for c in costed if c[1] < dense_us and c[2] <= budget_left]
    best = min(eligible, key=lambda c: c[1]) if eligible else None
    for fmt, us, err in costed:
        if best is not None and fmt == best[0]:
            continue
        if us >= dense_us:
            why = f"predicted {dense_us / us:.2f}x on {fingerprint} at M={tokens}: slower than dense"
        elif err > budget_left:
            why = f"over budget: {100 * err:.2f}% > {100 * budget_left:.2f}% left"
        else:
            why = f"saves less than {best[0]} ({us:.1f} us vs {best[1]:.1f} us)"
        candidates.append({"format": fmt, "predicted_us": us, "predicted_error": err, "rejected_because": why})
    if best is None:
        fmt, us, err = "dense", dense_us, 0.0
        reason = (f"no format is faster than dense within the budget at M={tokens} on {fingerprint}"
                  if costed else "no structured format fits this shape")
    else:
        fmt, us, err = best
        reason = f"{fmt} predicted {dense_us / us:.2f}x at M={tokens} on {fingerprint} for {100 * err:.2f}% error"
    candidates.insert(0, {"format": fmt, "predicted_us": us, "predicted_error": err, "rejected_because": None})
    speedup = dense_us / us
    layer = {
        "name": name, "op": "linear", "shape": [n, k], "tokens": tokens, "dtype": "bfloat16",
        "format": fmt, "declared_sparsity": parse_spec(fmt).declared_sparsity(n, k),
        "predicted_us_dense": dense_us, "predicted_us": us, "predicted_speedup": speedup,
        "predicted_error": err,
        "measured_error": err * rng.uniform(0.7, 1.2) if measured else None,
        "measured_speedup": speedup * rng.uniform(0.85, 1.05) if measured else None,
        "kernel": None if fmt == "dense" else f"sparsec::{family_of(fmt).replace(':', '')}_linear",
        "reason": reason, "candidates": candidates,
    }
    return layer, err


def make_report(*, seed: int = 0, blocks: int = 2, tokens: int = 16, error_budget: float = 0.01,
                measured: bool = True, heldout: bool = True, device: str = "NVIDIA H200",
                fingerprint_device: str = "NVIDIA H200", hostile: bool = False,
                prefix: str = "model.layers") -> dict:
    """A whole report for ``blocks`` Llama-3-8B-shaped decoder blocks at ``tokens`` rows."""
    rng = random.Random(seed)
    spent_sq = 0.0  # errors of independent rewrites add in squares, as the planner budgets them
    layers = []
    shapes = [(f"{prefix}.{b}.{suffix}", n, k) for b in range(blocks) for suffix, n, k in LLAMA_BLOCK]
    shapes.append(("lm_head", 1000, 4096))  # N=1000: block 64 and monarch cannot take it
    if hostile:
        shapes += [(name, 512, 512) for name in HOSTILE_NAMES]
    for name, n, k in shapes:
        left = math.sqrt(max(error_budget ** 2 - spent_sq, 0.0))
        layer, used = make_layer(name, n, k, tokens, left, rng, measured=measured)
        spent_sq += used ** 2
        layers.append(layer)
    dense = sum(x["predicted_us_dense"] for x in layers)
    pred = sum(x["predicted_us"] for x in layers)
    meas_time = sum(x["predicted_us_dense"] / x["measured_speedup"] for x in layers) if measured else None
    other_us = dense * 0.15  # attention, norms: untouched work end to end
    e2e_meas_err = math.sqrt(spent_sq) * rng.uniform(0.6, 0.9)
    warnings = ["calibration data was generated: pass real inputs for a trustworthy error"]
    return {
        "schema": "sparsec.report/1", "created": "2026-05-09T10:00:00Z", "sparsec_version": "0.1.0",
        "entry": "torch.compile", "device": device,
        "fingerprint": {"name": "h200", "device": fingerprint_device, "hash": f"{rng.getrandbits(64):016x}"},
        "error_budget": error_budget, "warnings": warnings, "layers": layers,
        "totals": {
            "layers": len(layers), "rewritten": sum(x["format"] != "dense" for x in layers),
            "predicted_us_dense": dense, "predicted_us": pred, "predicted_speedup": dense / pred,
            "measured_speedup": dense / meas_time if measured else None,
        },
        "end_to_end": {
            "measured_error": e2e_meas_err,
            "heldout_error": e2e_meas_err * rng.uniform(1.0, 1.3) if heldout else None,
            "predicted_speedup": (dense + other_us) / (pred + other_us),
            "measured_speedup": (dense + other_us) / (meas_time + other_us) if measured else None,
        },
    }
