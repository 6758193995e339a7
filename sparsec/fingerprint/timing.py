"""The one timer of sparsec and its benchmarks: a kernel timed the way a model runs it (back to
back, on rotated buffers, eager or graph-replayed: ``Clock``), and host-side runs such as
onnxruntime sessions timed in interleaved rounds (``interleaved``).

A measurement is given a list of calls, each running the same layer on its own input and weight
copy, so that cycling through them touches more memory than the last-level cache holds (a small
layer whose weight stays cached would otherwise look faster than it runs inside a model).

* eager: one sample is a batch of ``inner`` back-to-back calls; its time, divided by ``inner``,
  is the realised time per call (host dispatch overlaps the previous kernels, as in a model).
* graph (CUDA only): the same batch captured once in a CUDA graph; a sample is one replay.

The reported figure is the median of the samples after warm-up (on a CPU shared with other
work, the minimum: contention only ever adds time, so the fastest sample is the device's own). ``inner`` is chosen so a sample
lasts at least ``min_sample_s`` (timer resolution), and the sample count is cut, never below
``min_repeats``, so one point costs about ``point_budget_s`` at most.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["TimingPolicy", "Clock", "rotation_count", "quick_autotune", "QUICK_AUTOTUNE", "Timing", "interleaved",
           "HOST_CLOCKS"]

# Triton benchmarks every autotuning config for 25 ms + 100 ms by default; over a grid of
# thousands of (shape, M) keys that alone would take an hour. During a measurement each config
# gets 3 ms + 15 ms: still hundreds of runs for a small kernel, a few for a large one.
QUICK_AUTOTUNE = {"warmup": 3, "rep": 15}

Call = Callable[[], object]


@dataclass(frozen=True)
class TimingPolicy:
    repeats: int = 15  # samples per point when time allows
    min_repeats: int = 5  # never fewer
    warmup: int = 2  # passes over the rotated calls before timing (autotuning happens here)
    min_sample_s: float = 5e-4
    point_budget_s: float = 0.04
    max_inner: int = 1000
    statistic: str = "median"  # or "min"

    def reduce(self, samples) -> float:
        samples = list(samples)
        return min(samples) if self.statistic == "min" else statistics.median(samples)

    def describe(self, timer: str) -> dict:
        return {
            "repeats": self.repeats,
            "statistic": (
                f"{self.statistic} over {self.min_repeats}..{self.repeats} samples; a sample is the mean time "
                f"per call of a back-to-back batch lasting >= {self.min_sample_s * 1e3:g} ms"
            ),
            "timer": timer,
            "warmup": self.warmup,
        }


def rotation_count(bytes_per_call: int, rotation_bytes: int, cap: int = 32) -> int:
    """How many buffer copies make one pass touch at least ``rotation_bytes``."""
    return max(1, min(cap, math.ceil(rotation_bytes / max(1, bytes_per_call))))


@contextlib.contextmanager
def quick_autotune():
    """Within the block, Triton autotuners created here benchmark configs for QUICK_AUTOTUNE ms.
    Restored on exit; a no-op when Triton has no active GPU driver."""
    try:
        import triton.testing
        from triton.runtime import driver

        drv = driver.active
    except Exception:  # noqa: BLE001 - no GPU backend: nothing is autotuned
        yield None
        return
    had = "get_benchmarker" in vars(drv)
    old = vars(drv).get("get_benchmarker")
    bench = functools.partial(triton.testing.do_bench, **QUICK_AUTOTUNE)
    drv.get_benchmarker = lambda: bench
    try:
        yield f"Triton autotuning benchmarked each config {QUICK_AUTOTUNE['warmup']} ms warm-up + {QUICK_AUTOTUNE['rep']} ms"
    finally:
        if had:
            drv.get_benchmarker = old
        else:
            del drv.get_benchmarker


class Clock:
    """Times rotated calls on one device; ``graph`` is available on CUDA only."""

    def __init__(self, device: torch.device, policy: TimingPolicy):
        self.device = device
        self.policy = policy
        self.cuda = device.type == "cuda"

    @property
    def timer_name(self) -> str:
        return "torch.cuda.Event around the batch (graph: around one replay)" if self.cuda else "time.perf_counter"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _batch_seconds(self, calls: Sequence[Call], inner: int) -> float:
        r = len(calls)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(inner):
                calls[i % r]()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        for i in range(inner):
            calls[i % r]()
        return time.perf_counter() - t0

    def _plan(self, single_s: float) -> tuple[int, int]:
        p = self.policy
        inner = max(1, min(p.max_inner, math.ceil(p.min_sample_s / max(single_s, 1e-9))))
        samples = int(p.point_budget_s / max(single_s * inner, 1e-9))
        return inner, max(p.min_repeats, min(p.repeats, samples))

    def warm(self, calls: Sequence[Call]) -> float:
        """Run every call ``warmup`` times; return a rough seconds-per-call estimate."""
        for _ in range(max(1, self.policy.warmup - 1)):
            for c in calls:
                c()
        self.sync()
        n = max(len(calls), 3)
        return self._batch_seconds(calls, n) / n

    def eager(self, calls: Sequence[Call], single_s: float) -> float:
        """Median microseconds per call, eager, back to back."""
        inner, samples = self._plan(single_s)
        self.sync()
        return self.policy.reduce(self._batch_seconds(calls, inner) / inner for _ in range(samples)) * 1e6

    def graph(self, calls: Sequence[Call], single_s: float, lead: bool = False) -> float:
        """Median microseconds per call when a batch of calls is replayed as one CUDA graph.

        ``lead``: each call follows a small elementwise kernel of its own, as a layer in a model
        follows the norm or activation that made its input, and that kernel's time, replayed alone
        the same way, is taken off. Back to back with itself, a kernel that launches
        programmatically (PDL) starts while the copy ahead of it finishes; behind a kernel that does
        not let it (inductor's, cuBLAS's), it waits, and that wait is part of its time in a model."""
        if not self.cuda:
            raise RuntimeError("CUDA graphs need a CUDA device")
        inner, samples = self._plan(single_s)
        inner = max(inner, len(calls))
        if not lead:
            return self._replayed(calls, inner, samples)
        scratch = torch.zeros(256, device=self.device)
        step = lambda: scratch.add_(1.0)  # noqa: E731
        paired = [lambda c=c: (step(), c()) for c in calls]
        both = self._replayed(paired, inner, samples)
        alone = self._replayed([step], inner, samples)
        # never zero: a ratio of two such times must stay finite (their noise can exceed a tiny kernel)
        return max(both - alone, both * 1e-3)

    def _replayed(self, calls: Sequence[Call], inner: int, samples: int) -> float:
        """Median microseconds per call over ``samples`` replays of one graph of ``inner`` calls."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.sync()
        g = torch.cuda.CUDAGraph()
        r = len(calls)
        with torch.cuda.graph(g):
            for i in range(inner):
                calls[i % r]()
        try:
            g.replay()
            self.sync()
            times = []
            for _ in range(samples):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
            return self.policy.reduce(times) * 1e6
        finally:
            del g

    def replays(self, calls: Sequence[Call], replays: int) -> float:
        """Median microseconds per call over ``replays`` replays of one CUDA graph that makes every
        call once (eager batches of one pass on a CPU), after one warm-up pass."""
        policy = TimingPolicy(repeats=replays, min_repeats=replays, warmup=1, min_sample_s=0.0,
                              point_budget_s=1e9, max_inner=len(calls), statistic=self.policy.statistic)
        clock = Clock(self.device, policy)
        single = clock.warm(calls)
        return clock.graph(calls, single) if self.cuda else clock.eager(calls, single)

    def sustained(self, calls: Sequence[Call], seconds: float) -> float:
        """Microseconds per call over ``seconds`` of back-to-back replays of one CUDA graph of
        ``calls``: the clock a long run settles at (the device at its power limit), where short
        synchronised replays let it rest between them."""
        if not self.cuda:
            raise RuntimeError("sustained replay needs a CUDA device")
        for c in calls:
            c()
        self.sync()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        try:
            g.replay()
            self.sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            n = max(3, int(seconds * 1e3 / max(start.elapsed_time(end), 1e-3)))
            start.record()
            for _ in range(n):
                g.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / n / len(calls)
        finally:
            del g


# -- host-side runs (onnxruntime sessions) ------------------------------------------------------

HOST_CLOCKS = {"wall": (time.perf_counter, "time.perf_counter (wall time)"),
               "thread": (time.thread_time, "time.thread_time (CPU time of the thread running onnxruntime)")}


@dataclass
class Timing:
    us: list[float]  # per runnable: min over rounds of the mean microseconds per run
    rounds: int
    inner: int
    clock: str = "wall"

    def speedup(self, i: int = 1) -> float:
        """time(runnable 0) / time(runnable i), both as minima over rounds."""
        return self.us[0] / self.us[i]

    def describe(self) -> str:
        return (f"min over {self.rounds} interleaved rounds of the mean of {self.inner} back-to-back runs, "
                f"timed with {HOST_CLOCKS[self.clock][1]} (speed-up: ratio of those minima)")


def interleaved(runs: Sequence[Call], *, budget_s: float = 2.0, min_rounds: int = 5, max_rounds: int = 50,
                round_s: float = 0.02, warmup: int = 2, clock: str = "wall") -> Timing:
    """Time host-side ``runs`` in interleaved rounds within about ``budget_s`` (never fewer than
    ``min_rounds``), so that a machine's drift and its neighbours' load fall on all of them alike.

    ``budget_s`` and ``round_s`` are in the chosen clock's seconds."""
    now = HOST_CLOCKS[clock][0]
    for _ in range(warmup):
        for run in runs:
            run()
    single = []
    for run in runs:
        best = float("inf")
        for _ in range(3):
            t0 = now()
            run()
            best = min(best, now() - t0)
        single.append(best)
    slowest = max(max(single), 1e-7)
    inner = max(1, int(round_s / slowest))
    per_round = sum(single) * inner
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(per_round, 1e-9))))
    means: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, run in enumerate(runs):
            t0 = now()
            for _ in range(inner):
                run()
            means[i].append((now() - t0) / inner * 1e6)
    return Timing(us=[min(m) for m in means], rounds=rounds, inner=inner, clock=clock)
