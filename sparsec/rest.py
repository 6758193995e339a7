"""The rest of a graph: the kernels its dense part outside the linear layers launches, and their price.

A rewrite speeds up the linear layers only; the activations, norms, residual adds and attention
around them take as long as before. An end-to-end prediction that leaves them out overstates
the speedup (a layer-only 1.40x measured 1.27x end to end on a Llama-shaped MLP at M=2048,
docs/benchmarks.md), so each front-end describes that rest as kernels (bytes moved, FLOPs) and
the fingerprint's measured copy bandwidth, peak throughput and launch overhead price it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


KINDS = ("pointwise", "reduction", "matmul", "attention")
# the fingerprint probe (``measured.rest_us``) whose time is the least a kernel of each kind costs
PROBE_OF = {"reduction": "norm", "attention": "attention"}
# where measured (in a CUDA graph), the kernels inductor makes of the rest answer for their kinds
# instead: a lowered graph's norms and activations are such kernels, not torch's own
FUSED_PROBE_OF = {"reduction": "fused_norm", "pointwise": "fused_pointwise"}


@dataclass(frozen=True)
class RestKernel:
    """One kernel of the dense rest: the bytes it reads and writes, its FLOPs (0 when pointwise),
    and its kind (one of ``KINDS``; by default a library matmul when it has FLOPs, else pointwise):
    a fused region with a reduction in it, and attention, have a measured least time of their own
    (the fingerprint's ``measured.rest_us``)."""

    bytes: float
    flops: float = 0.0
    dtype: str = "float32"
    kind: str = ""

    def __post_init__(self):
        if not self.kind:
            object.__setattr__(self, "kind", "matmul" if self.flops else "pointwise")
        if self.kind not in KINDS:
            raise ValueError(f"rest kernel kind {self.kind!r} is not one of {', '.join(KINDS)}")


def describe_probes(rest_us: dict | None, gpu: bool = False) -> str:
    """One line of a fingerprint's ``measured.rest_us``: each probe's times, and those missing
    (on a GPU's fingerprint the fused ones too: a CPU's lowering runs no fused kernel to time)."""
    rest_us = rest_us or {}
    expected = [*PROBE_OF.values(), *(FUSED_PROBE_OF.values() if gpu else ())]
    missing = [p for p in expected if p not in rest_us]
    shown = [f"{name} {t['eager'] if t['eager'] is not None else '-'} us eager, "
             f"{t['graph'] if t['graph'] is not None else '-'} us graph" for name, t in rest_us.items()]
    if missing:
        shown.append(f"{' and '.join(missing)} not measured (add with 'sparsec fingerprint measure --rest')")
    return "; ".join(shown)


@dataclass
class RestOfGraph:
    kernels: list[RestKernel] = field(default_factory=list)


def price_rest(rest: RestOfGraph | None, fingerprint, mode: str) -> float | None:
    """The sum of ``price_rest_by_kind``."""
    kinds = price_rest_by_kind(rest, fingerprint, mode)
    return None if kinds is None else sum(kinds.values(), 0.0)


def price_rest_by_kind(rest: RestOfGraph | None, fingerprint, mode: str) -> dict[str, float] | None:
    """Predicted microseconds of ``rest`` on the fingerprint's device in ``mode`` ("eager" or
    "graph"): per kernel its launch overhead plus the longer of moving its bytes at the measured
    copy bandwidth and doing its FLOPs at the measured peak, and never less than the least time
    the fingerprint measured for a kernel of its kind in that mode: a reduction the smallest norm's
    (inductor's fused norm where that was timed, and a pointwise kernel inductor's fused activation),
    attention the smallest attention call's (``measured.rest_us``), a library matmul (and attention
    where no probe was run) the fastest dense product timed. At one token such kernels cost their
    fixed latency (an H100 ran SmolLM2-shaped attention at 5.5 us a launch in a CUDA graph, which
    launch plus work priced at 1.3 us, docs/benchmarks.md). By kind (``KINDS``, those present), so
    that a profile of the graph can be set against each; None when the rest or a needed figure is
    unknown, so that no guess stands in for a measurement."""
    if rest is None:
        return None
    measured = fingerprint.measured
    bandwidth = measured.get("copy_GBps")
    launch = (measured.get("launch_us") or {}).get(mode)
    if launch is None:
        launch = (measured.get("launch_us") or {}).get("eager")
    if not rest.kernels:
        return {}
    if not bandwidth or launch is None:
        return None
    peaks = measured.get("peak_tflops") or {}
    probes = measured.get("rest_us") or {}
    library = fingerprint.fastest_dense_us(mode) or 0.0
    floors = {"pointwise": 0.0, "matmul": library}
    for kind, probe in PROBE_OF.items():
        timed = (probes.get(probe) or {}).get(mode)
        floors[kind] = timed if timed is not None else (0.0 if kind == "reduction" else library)
    for kind, probe in FUSED_PROBE_OF.items():
        timed = (probes.get(probe) or {}).get(mode)
        if timed is not None:
            floors[kind] = timed
    by_kind: dict[str, float] = {}
    for k in rest.kernels:
        cost = launch + k.bytes / (bandwidth * 1e3)
        if k.flops:
            peak = peaks.get(k.dtype)
            if not peak:
                return None
            cost = max(cost, launch + k.flops / (peak * 1e6))
        by_kind[k.kind] = by_kind.get(k.kind, 0.0) + max(cost, floors[k.kind])
    return by_kind
