"""The quality measure the error budget bounds: the metric a user judges the model by.

``rel_l2`` (the default) is the relative L2 error of the raw outputs, worst output first. The
others read one output (the first float one unless ``output`` names another) along its last
dimension, the way users of such models judge them:

* ``cosine``: 1 - mean cosine similarity of rewritten and dense rows (embeddings);
* ``kl``: mean over positions of KL(dense || rewritten) of the softmax over the last dimension,
  in nats (logits);
* ``top1``: 1 - the fraction of positions whose argmax is unchanged (logits);
* a callable ``(output, reference) -> float``: anything else (accuracy on labels, a task score);
  non-negative, 0 for identical outputs, averaged over the calibration calls.

Every metric accumulates call by call (``MetricSum``), its sums in float64, for torch tensors
(FX) and numpy arrays (ONNX) alike. A call computes in its outputs' precision, float32 at least:
float64 copies of a language model's logits (SmolLM2: 512 rows x 49152) made each evaluation of
a plan cost a fifth more than its forward pass.

The planner models end-to-end error as adding in quadrature over layers, on the scale of a
relative error. ``cosine`` and ``kl`` grow with the square of a small relative error of the
output (their ``order`` is 2), so the planner works on their square root (``to_error``) and the
report shows the metric itself (``from_error``); the others are taken as they are. The model
only guides the search: whatever it predicts, the budget binds on the metric as measured.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from sparsec.errors import OptionError

__all__ = ["Metric", "metric_of", "MetricSum", "METRICS"]


class Metric:
    name = ""
    reads_every_output = False  # without an output named: True, the worst of every output; False, the first
    order = 1  # the metric grows as (relative output error) ** order when that error is small
    ceiling = 1.0  # budgets lie in [0, ceiling): a fraction unless the metric has its own units

    def call(self, out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        """(sum, weight) of one call's contribution; the metric is sum / weight over all calls."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """A differentiable stand-in for one call's metric, which recovery's distillation descends: the
        metric itself where it has a gradient, else the closest one that does (``top1``: KL of the
        logits; a user's function: the relative squared error of the output it reads)."""
        o, r = _rows(out).float(), _rows(ref).float()
        return ((o - r) ** 2).sum() / (r * r).sum().clamp_min(torch.finfo(torch.float32).tiny)

    def to_error(self, value: float) -> float:
        return value ** (1.0 / self.order) if value > 0 else 0.0

    def from_error(self, error: float) -> float:
        return error ** self.order

    def describe(self) -> str:
        return self.name

    def show(self, value: float) -> str:
        """A value of this metric as a reader expects it (a percentage where it is a fraction)."""
        return f"{value:.3%}"


class RelL2(Metric):
    name = "rel_l2"
    reads_every_output = True

    def call(self, out, ref):
        return _sum_sq(out - ref), _sum_sq(ref)

    @staticmethod
    def ratio(num: float, den: float) -> float:
        """sqrt(num / den); a zero reference matched exactly is no error, missed it is an infinite one."""
        if den == 0.0:
            return 0.0 if num == 0.0 else math.inf
        return (num / den) ** 0.5


class Cosine(Metric):
    name = "cosine"
    order = 2

    def call(self, out, ref):
        o, r = _rows(out), _rows(ref)
        cos = torch.nn.functional.cosine_similarity(o, r, dim=-1, eps=1e-30)
        both_zero = (o.norm(dim=-1) == 0) & (r.norm(dim=-1) == 0)
        cos = torch.where(both_zero, torch.ones_like(cos), cos)
        return float((1.0 - cos).clamp_min(0.0).sum(dtype=torch.float64)), float(cos.numel())

    def loss(self, out, ref):
        o, r = _rows(out).float(), _rows(ref).float()
        return (1.0 - torch.nn.functional.cosine_similarity(o, r, dim=-1, eps=1e-12)).mean()


class KL(Metric):
    name = "kl"
    order = 2
    ceiling = math.inf  # nats

    def show(self, value: float) -> str:
        return f"{value:.4g} nats"

    def call(self, out, ref):
        o, r = _rows(out), _rows(ref)
        total = 0.0
        for rows in _cache_sized(o):
            log_p, log_q = torch.log_softmax(r[rows], dim=-1), torch.log_softmax(o[rows], dim=-1)
            total += float((log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0).sum(dtype=torch.float64))
        return total, float(o.shape[0])

    def loss(self, out, ref):
        return kl_loss(out, ref)


class Top1(Metric):
    name = "top1"

    def call(self, out, ref):
        o, r = _rows(out), _rows(ref)
        changed = (o.argmax(dim=-1) != r.argmax(dim=-1)).double()
        return float(changed.sum()), float(changed.numel())

    def loss(self, out, ref):
        return kl_loss(out, ref)  # agreement of the argmax has no gradient; the distributions' does


class UserMetric(Metric):
    """A callable ``(output, reference) -> float``, averaged over calls."""

    ceiling = math.inf  # the function's own units

    def __init__(self, fn: Callable[[Any, Any], float]):
        self.fn = fn
        self.name = getattr(fn, "__name__", None) or type(fn).__name__

    def call(self, out, ref):
        try:
            value = self.fn(out, ref)
            value = float(value)
        except Exception as exc:  # noqa: BLE001 - the user's function: say so, in one line
            raise OptionError(f"the metric function {self.name!r} failed on an output of shape {tuple(out.shape)}: "
                              f"{type(exc).__name__}: {exc}") from None
        if not math.isfinite(value) or value < 0.0:
            raise OptionError(f"the metric function {self.name!r} returned {value!r}; it must return a finite, "
                              "non-negative number, 0 for identical outputs")
        return value, 1.0

    def describe(self) -> str:
        return f"{self.name} (a user function)"

    def show(self, value: float) -> str:
        return f"{value:.4g}"


METRICS: dict[str, type[Metric]] = {cls.name: cls for cls in (RelL2, Cosine, KL, Top1)}


def metric_of(spec) -> Metric:
    """The metric an option names (or a callable's), refused with the names known otherwise."""
    if isinstance(spec, Metric):
        return spec
    if spec is None:
        return RelL2()
    if isinstance(spec, str):
        cls = METRICS.get(spec.strip().lower())
        if cls is None:
            raise OptionError(f"unknown metric {spec!r}; use one of {', '.join(METRICS)} or a function "
                              "(output, reference) -> float")
        return cls()
    if callable(spec):
        return UserMetric(spec)
    raise OptionError(f"option 'metric' must be one of {', '.join(METRICS)} or a function (output, reference) -> "
                      f"float, got {type(spec).__name__}")


class MetricSum:
    """Accumulates ``add(outputs, references)`` call by call; ``value()`` is the metric.

    ``output``: the index of the output the metric reads (None: the first float output, or, for
    ``rel_l2``, the worst of all outputs)."""

    def __init__(self, metric: Metric | None = None, output: int | None = None):
        self.metric = metric or RelL2()
        self.output = output
        self.sums: list[tuple[float, float]] = []

    def add(self, outs, refs) -> None:
        outs, refs = list(outs), list(refs)
        if self.output is None and isinstance(self.metric, RelL2):
            chosen = range(len(refs))
        else:
            index = self.output if self.output is not None else 0
            if index >= len(refs):
                raise OptionError(f"option 'output' is {index}, but the graph has {len(refs)} float output(s); "
                                  f"pick one of 0..{len(refs) - 1}")
            chosen = [index]
        if not self.sums:
            self.sums = [(0.0, 0.0)] * len(chosen)
        for k, i in enumerate(chosen):
            num, den = self.metric.call(_tensor(outs[i]), _tensor(refs[i]))
            self.sums[k] = (self.sums[k][0] + num, self.sums[k][1] + den)

    def value(self) -> float:
        if isinstance(self.metric, RelL2):
            return max((RelL2.ratio(n, d) for n, d in self.sums), default=0.0)
        return max((n / d if d else 0.0 for n, d in self.sums), default=0.0)


def loss_of(metric: Metric, outs, refs, output: int | None = None) -> torch.Tensor:
    """The differentiable stand-in (``Metric.loss``) for one call, on the outputs ``MetricSum`` reads:
    the one ``output`` names or the first, or for ``rel_l2`` without one, every output summed."""
    outs, refs = list(outs), list(refs)
    if output is None and isinstance(metric, RelL2):
        return sum(metric.loss(o, r) for o, r in zip(outs, refs))
    index = output if output is not None else 0
    return metric.loss(outs[index], refs[index])


def kl_loss(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(ref) || softmax(out)), differentiable in ``out``."""
    o, r = _rows(out).float(), _rows(ref).float()
    log_p, log_q = torch.log_softmax(r, dim=-1), torch.log_softmax(o, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def _tensor(x) -> torch.Tensor:
    """A float tensor of at least float32 precision."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    x = x.detach()
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _sum_sq(x: torch.Tensor) -> float:
    """Sum of squares, each row summed in the tensor's precision, the rows in float64."""
    rows = _rows(x)
    return float((rows * rows).sum(dim=-1).sum(dtype=torch.float64))


CHUNK_VALUES = 1 << 17  # 512 KB of float32 a tensor: a core's L2 holds the softmax's passes over a chunk


def _cache_sized(rows: torch.Tensor):
    """Slices of ``rows`` (2-D) to compute a row-wise metric over: on the CPU a few rows at a time, so
    that the several passes over each stay in cache (an LLM's 49152 logits a row: the KL of 256 rows
    took 0.16 s whole, 0.048 s two rows at a time, 0.12 s ten at a time, medians of 7 on 2 EPYC
    cores with 1 MB of L2 each); elsewhere all at once."""
    n, width = rows.shape
    step = max(1, CHUNK_VALUES // max(width, 1) if rows.device.type == "cpu" else n)
    return [slice(i, i + step) for i in range(0, n, step)] or [slice(0, 0)]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """The output as rows along its last dimension (a vector is one row)."""
    return x.reshape(1, -1) if x.dim() < 2 else x.reshape(-1, x.shape[-1])
