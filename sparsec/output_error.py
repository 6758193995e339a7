"""The end-to-end error of a rewritten graph: one rule for every front-end.

Per graph output, the squared difference from the dense graph's output and the output's own
energy are summed over every calibration call (in float64); the error is the worst output's
relative L2 norm. Per output, not pooled: a small output (a classifier's logits) must not hide
behind a large one (a hidden state). Outputs may be torch tensors (FX) or numpy arrays (ONNX).
"""

from __future__ import annotations

import math

import numpy as np


class OutputError:
    """Accumulates ``add(outputs, references)`` call by call; ``value()`` is the worst output's ratio."""

    def __init__(self):
        self.num: list[float] = []
        self.den: list[float] = []

    def add(self, outs, refs) -> None:
        if not self.num:
            self.num, self.den = [0.0] * len(refs), [0.0] * len(refs)
        for i, (o, r) in enumerate(zip(outs, refs)):
            diff, energy = _squared_sums(o, r)
            self.num[i] += diff
            self.den[i] += energy

    def value(self) -> float:
        return max((relative(n, d) for n, d in zip(self.num, self.den)), default=0.0)


def relative_l2(outputs, references) -> float:
    """The error of whole runs at once: ``outputs[call][output]`` against ``references`` alike."""
    total = OutputError()
    for outs, refs in zip(outputs, references):
        total.add(outs, refs)
    return total.value()


def relative(num: float, den: float) -> float:
    """sqrt(num / den); a zero reference matched exactly is no error, missed it is an infinite one."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return (num / den) ** 0.5


def _squared_sums(out, ref) -> tuple[float, float]:
    if isinstance(out, np.ndarray) or isinstance(ref, np.ndarray):
        o64, r64 = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        return float(np.sum((o64 - r64) ** 2)), float(np.sum(r64 ** 2))
    o64, r64 = out.double(), ref.double()  # torch tensors, summed where they live
    return float(((o64 - r64) ** 2).sum()), float((r64 ** 2).sum())
