"""Expert banks in a fingerprint: every implementation of ``sparsec::experts_swiglu`` timed over a
grid of bank shapes and token counts (the ``experts`` section), and the time of a bank predicted
from it, for planning a model on a machine other than the one it will run on.

An entry: ``{"impl", "experts": E, "top_k": k, "I", "H", "M", "dtype", "mode", "us"}`` for a bank of
E experts of H -> 2I -> H, k of them per token, M tokens, routed by a random router (softmax of
unit-normal logits: every expert gets tokens at large M, as trained routers spread them). Under
``mode="graph"`` the ``loop`` implementation is not timed (it reads the routing on the host), nor
any implementation whose intermediates would not fit (``codegen.experts.memory_reason``).

A prediction takes the measured bank nearest in (log E, log k, log I H), interpolates its curve in
log time against log M (extending the last segment, never falling with M), and scales by the
ratio of weight sizes I H; the note says which bank stood in.
"""

from __future__ import annotations

import math

import torch

# (E, top_k, I, H): Mixtral-, Qwen-MoE- and DeepSeek-MoE-like banks on a GPU; small ones on a CPU
GRIDS = {
    "cuda": {"banks": [(8, 2, 14336, 4096), (8, 2, 3584, 1024), (64, 8, 1408, 2048)],
             "M": (1, 2, 4, 8, 16, 64, 256, 1024, 4096)},
    "cpu": {"banks": [(8, 2, 512, 256), (16, 4, 256, 256)], "M": (1, 4, 16, 64, 256)},
    "tiny": {"banks": [(4, 2, 64, 32)], "M": (1, 8)},
}


def _bank(E: int, k: int, I: int, H: int, M: int, device, dtype, gen):
    gate_up = (torch.randn(E, 2 * I, H, generator=gen, device=device) / math.sqrt(H)).to(dtype)
    down = (torch.randn(E, H, I, generator=gen, device=device) / math.sqrt(I)).to(dtype)
    x = torch.randn(M, H, generator=gen, device=device).to(dtype)
    probs = torch.softmax(torch.randn(M, E, generator=gen, device=device), dim=-1)
    weights, index = probs.topk(k, dim=-1)
    return x, index, weights.to(dtype), gate_up, down


def measure(device: torch.device, grid: str, policy, dtype: torch.dtype, progress=None) -> list[dict]:
    """Every implementation over ``GRIDS[grid]`` on ``device``, eager and (on CUDA) graph-replayed."""
    from sparsec.codegen.experts import IMPLS, experts_op, extra_impls, memory_reason
    from sparsec.fingerprint.timing import Clock

    clock = Clock(device, policy)
    gen = torch.Generator(device=device).manual_seed(0)
    modes = ("eager", "graph") if clock.cuda else ("eager",)
    name = str(dtype).removeprefix("torch.")
    entries = []
    with torch.no_grad():
        for E, k, I, H in GRIDS[grid]["banks"]:
            for M in GRIDS[grid]["M"]:
                x, index, weights, gate_up, down = _bank(E, k, I, H, M, device, dtype, gen)
                # grouped_mm and rows only where their kernels run (elsewhere each would time grouped)
                for impl in IMPLS + extra_impls(x, k, gate_up, down):
                    if memory_reason(impl, E, k, I, H, M, device):
                        continue  # e.g. batched at thousands of tokens: terabytes of gathered weights
                    calls = [lambda impl=impl: experts_op(x, index, weights, gate_up, down, impl)]
                    single = clock.warm(calls)
                    for mode in modes:
                        if mode == "graph" and impl == "loop":
                            continue
                        us = clock.graph(calls, single) if mode == "graph" else clock.eager(calls, single)
                        entries.append({"impl": impl, "experts": E, "top_k": k, "I": I, "H": H, "M": M,
                                        "dtype": name, "mode": mode, "us": round(float(us), 3)})
                if progress is not None:
                    progress(f"bank {E}x{H}->{I}->{H} top-{k} M={M}")
                del x, index, weights, gate_up, down
    return entries


def predict(entries: list[dict], impl: str, E: int, k: int, I: int, H: int, M: int, dtype: str,
            mode: str) -> tuple[float, str] | None:
    """(microseconds, note) for ``impl`` on this bank, or None where nothing of it was measured."""
    rows = [e for e in entries if e["impl"] == impl and e["dtype"] == dtype and e["mode"] == mode]
    if not rows:
        return None
    banks = {(e["experts"], e["top_k"], e["I"], e["H"]) for e in rows}

    def distance(b):
        return (abs(math.log(b[0] / E)) + abs(math.log(b[1] / k)) + abs(math.log(b[2] * b[3] / (I * H))))

    near = min(banks, key=lambda b: (distance(b), b))
    curve = sorted((e["M"], e["us"]) for e in rows if (e["experts"], e["top_k"], e["I"], e["H"]) == near)
    log_us = _along_m(curve, M)
    scale = (I * H) / (near[2] * near[3])
    note = "" if near == (E, k, I, H) else (
        f"measured bank of {near[0]} experts of {near[3]}->{near[2]}, top-{near[1]} used, scaled by weight size")
    return math.exp(log_us) * scale, note


def _along_m(curve: list[tuple[int, float]], M: int) -> float:
    """Log time at M by piecewise-linear interpolation in log-log; beyond the ends the nearest
    segment's slope, never negative (more tokens never take less time)."""
    pts = [(math.log(m), math.log(us)) for m, us in curve]
    if len(pts) == 1:
        return pts[0][1]
    x = math.log(M)
    i = max(0, min(len(pts) - 2, next((j for j in range(len(pts) - 1) if x <= pts[j + 1][0]), len(pts) - 2)))
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    slope = (y1 - y0) / (x1 - x0)
    if x < x0 or x > x1:
        slope = max(slope, 0.0)
    return y0 + slope * (x - x0)
