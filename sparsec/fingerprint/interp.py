"""Interpolation over a measured grid of linear-layer times, in log space, with stated edges.

A kernel family's measurements at one parameter setting are curves t(M) for a set of weight
shapes N x K. A query (M, N, K) is answered in three steps, all piecewise linear in log-log:

1. along log M on every measured shape;
2. along log(N*K) (the weight's size) among shapes of the same aspect log(N/K);
3. linearly in log(N/K) between the two nearest measured aspects.

Beyond the largest measured M, time is a fixed cost plus a cost per token read off the last two
measured points; likewise beyond the largest measured weight, a fixed cost plus a cost per weight
element read off the last two sizes. Elsewhere outside the measured range the last measured
segment is extended with its log-log slope clamped to [0, 1]: time never falls when a size grows
and never grows faster than in proportion to it. Below the smallest measured weight the time is
never less than the fastest weight of any shape timed at that M: a launch keeps its fixed cost (a
slope read off bandwidth-bound sizes, carried towards zero, priced a 128 x 128 low-rank:8 layer on
an H200 at 18.9x dense). A single measured point is scaled in proportion. Aspects outside the
measured ones use the nearest aspect (size still scales as above). A weight that was not measured
never costs more than the fastest measured weight at least as large in both N and K (it could run
as that one, padded): interpolating across aspects carries a library's slow choice at one shape
into its neighbours (cuBLAS took 7.3 us for 512 x 2048 at one token on an H100, and priced a
192 x 576 weight at 5.4 us that ran in 3.4). Every such step is named in the notes.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

__all__ = ["loglog", "ShapeCurve", "ShapeGrid"]

_SLOPE_MIN, _SLOPE_MAX = 0.0, 1.0
_ASPECT_DIGITS = 6


def loglog(
    xs: list[float], logys: list[float], x: float, slopes: tuple[float, float] = (_SLOPE_MIN, _SLOPE_MAX)
) -> tuple[float, str | None]:
    """Piecewise-linear interpolation of log y over log x; returns (log y, edge) where edge is
    None inside the range, else 'below' or 'above'. ``xs`` sorted ascending and positive.
    Outside the range the edge segment's slope is clamped to ``slopes``; a single point is
    extended with the bound of ``slopes`` farthest from zero (proportional scaling)."""
    lx = math.log(x)
    lo_s, hi_s = slopes
    if len(xs) == 1:
        edge = None if x == xs[0] else ("below" if x < xs[0] else "above")
        return logys[0] + (hi_s if abs(hi_s) >= abs(lo_s) else lo_s) * (lx - math.log(xs[0])), edge
    if x < xs[0] or x > xs[-1]:
        lo = 0 if x < xs[0] else len(xs) - 2
        x0, x1 = math.log(xs[lo]), math.log(xs[lo + 1])
        slope = min(hi_s, max(lo_s, (logys[lo + 1] - logys[lo]) / (x1 - x0)))
        anchor = lo if x < xs[0] else lo + 1
        return logys[anchor] + slope * (lx - math.log(xs[anchor])), "below" if x < xs[0] else "above"
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:
        return logys[i], None
    x0, x1 = math.log(xs[i - 1]), math.log(xs[i])
    w = (lx - x0) / (x1 - x0)
    return logys[i - 1] * (1 - w) + logys[i] * w, None


@dataclass
class ShapeCurve:
    """Measured times of one weight shape over M."""

    N: int
    K: int
    Ms: list[int] = field(default_factory=list)
    log_us: list[float] = field(default_factory=list)


class ShapeGrid:
    """All measured shapes of one family at one (dtype, mode, parameter) setting."""

    def __init__(self, points: list[tuple[int, int, int, float]]):
        """``points``: (M, N, K, us) tuples; repeated points keep the last one."""
        by_shape: dict[tuple[int, int], dict[int, float]] = {}
        for M, N, K, us in points:
            by_shape.setdefault((N, K), {})[M] = us
        self.curves = []
        for (N, K), ms in sorted(by_shape.items()):
            Ms = sorted(ms)
            self.curves.append(ShapeCurve(N, K, Ms, [math.log(ms[m]) for m in Ms]))
        self.aspects: dict[float, list[ShapeCurve]] = {}
        for c in self.curves:
            self.aspects.setdefault(_aspect(c.N, c.K), []).append(c)
        for curves in self.aspects.values():
            curves.sort(key=lambda c: c.N * c.K)
        self.aspect_keys = sorted(self.aspects)
        self.shapes = {(c.N, c.K) for c in self.curves}

    def __bool__(self) -> bool:
        return bool(self.curves)

    def log_us(self, M: int, N: int, K: int, notes: set[str]) -> float:
        """Interpolated log-microseconds at (M, N, K); adds edge notes to ``notes``."""
        t = self._interpolated(M, N, K, notes)
        if (N, K) in self.shapes:
            return t
        bound = self._larger_bound(M, N, K)
        if bound is not None and bound[0] < t:
            t_cap, c, edge = bound
            notes.add(f"capped at the time of the larger measured weight {c.N}x{c.K}")
            if edge == "above":
                notes.add(f"extrapolated beyond M={c.Ms[-1]}")
            return t_cap
        return t

    def _larger_bound(self, M: int, N: int, K: int) -> tuple[float, ShapeCurve, str | None] | None:
        """The fastest measured weight at least N x K in both dimensions, at M tokens: a weight
        inside it runs as that one would with its rows and columns padded, so costs no more."""
        found = None
        for c in self.curves:
            if c.N >= N and c.K >= K:
                t, edge = _along_M(c, M)
                if found is None or t < found[0]:
                    found = (t, c, edge)
        return found

    def _interpolated(self, M: int, N: int, K: int, notes: set[str]) -> float:
        v = math.log2(N / K)
        keys = self.aspect_keys
        if v <= keys[0] or v >= keys[-1] or len(keys) == 1:
            nearest = min(keys, key=lambda k: abs(k - v))
            if abs(nearest - v) > 1e-6:
                notes.add(
                    f"aspect N/K={N / K:g} outside measured {2 ** keys[0]:g}..{2 ** keys[-1]:g}; nearest used"
                )
            return self._along_size(self.aspects[nearest], M, N * K, notes)
        j = bisect.bisect_left(keys, v)
        if abs(keys[j] - v) < 1e-9:
            return self._along_size(self.aspects[keys[j]], M, N * K, notes)
        v0, v1 = keys[j - 1], keys[j]
        w = (v - v0) / (v1 - v0)
        t0 = self._along_size(self.aspects[v0], M, N * K, notes)
        t1 = self._along_size(self.aspects[v1], M, N * K, notes)
        return t0 * (1 - w) + t1 * w

    def _fastest(self, M: int) -> float:
        """log us of the fastest weight timed, of any shape, at M tokens."""
        return min(_along_M(c, M)[0] for c in self.curves)

    def _along_size(self, curves: list[ShapeCurve], M: int, size: int, notes: set[str]) -> float:
        sizes, logs = [], []
        for c in curves:
            t, edge = _along_M(c, M)
            if edge == "above":
                notes.add(f"extrapolated beyond M={c.Ms[-1]}")
            elif edge == "below":
                notes.add(f"extrapolated below M={c.Ms[0]}")
            sizes.append(c.N * c.K)
            logs.append(t)
        t, edge = loglog(sizes, logs, size)
        if edge == "above":
            if len(sizes) > 1:
                t = _beyond_last_size(sizes, logs, size)
            notes.add(f"extrapolated beyond N*K={curves[-1].N}x{curves[-1].K}")
        elif edge == "below":
            notes.add(f"extrapolated below N*K={curves[0].N}x{curves[0].K}")
            t = max(t, self._fastest(M))  # a launch keeps its fixed cost
        return t


def _along_M(c: ShapeCurve, M: int) -> tuple[float, str | None]:
    if M > c.Ms[-1]:
        return _beyond_last_M(c, M), "above"
    return loglog(c.Ms, c.log_us, M)


def _beyond_last_M(c: ShapeCurve, M: int) -> float:
    """log us beyond the last measured M: a fixed cost plus a cost per token, both read off the
    last two measured points (the cost per token never negative). Unlike a log-log slope this
    holds when the last points are still partly launch- or weight-bound, e.g. a curve that stops
    early because its kernel was far slower than dense there."""
    if len(c.Ms) == 1:
        return c.log_us[0] + math.log(M / c.Ms[0])
    (m1, m2), (t1, t2) = c.Ms[-2:], (math.exp(c.log_us[-2]), math.exp(c.log_us[-1]))
    per_token = max(0.0, (t2 - t1) / (m2 - m1))
    return math.log(t2 + per_token * (M - m2))


def _beyond_last_size(sizes: list[int], logs: list[float], size: int) -> float:
    """log us beyond the largest measured weight: the last measured time plus a cost per weight
    element read off the last two sizes (never negative). A weight streamed from memory costs in
    proportion to its bytes once it is past the launch's fixed cost; a log-log slope through the
    smaller shapes, where the fixed cost still weighs, predicted gate and up of Llama-3-8B stacked
    (28672 x 4096) at 0.93x of two 14336 x 4096 launches for dense cuBLAS and 0.72x for a block
    GEMV at four tokens, where an H100 measured 1.1x and 0.9x (docs/benchmarks.md)."""
    (s1, s2), (t1, t2) = sizes[-2:], (math.exp(logs[-2]), math.exp(logs[-1]))
    per_element = max(0.0, (t2 - t1) / (s2 - s1))
    return math.log(t2 + per_element * (size - s2))


def _aspect(N: int, K: int) -> float:
    return round(math.log2(N / K), _ASPECT_DIGITS)
