"""Activation sparsity: what calibration learns about input magnitudes, and the layer it yields.

``Magnitudes`` is a histogram of a site's input magnitudes over the calibration data, in
log-spaced bins (BINS_PER_OCTAVE per octave from 2**LOW_EXP to 2**HIGH_EXP, one bin below for
zeros and tiny values, one above), holding per bin the count of all inputs and, per input channel,
their energy (sum of squares). From it, without keeping the activations:

* ``threshold(skip)``: the magnitude under which a fraction ``skip`` of calibration inputs lie
  (interpolated geometrically inside its bin, linearly in the bottom one, so that exact zeros are
  always under any positive threshold);
* ``dropped_energy(t)``: per channel, the energy of the inputs under ``t``, which with the weight's
  column norms predicts the layer's output error.

``Thresholded`` is the approximation an ``act:S`` candidate stands for: the dense weight and its
threshold. Where the planner evaluates candidates it runs as ``linear`` (inputs under the
threshold zeroed, per token); codegen packs it with ``pack_approximation``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BINS_PER_OCTAVE = 4
LOW_EXP, HIGH_EXP = -16, 16
EDGES = (HIGH_EXP - LOW_EXP) * BINS_PER_OCTAVE  # log-spaced bins; plus one below and one above
BINS = EDGES + 2


def _bin_lower(b: int) -> float:
    """Lower edge of bin ``b`` (bin 0 starts at zero)."""
    if b <= 0:
        return 0.0
    return 2.0 ** (LOW_EXP + (b - 1) / BINS_PER_OCTAVE)


@dataclass
class Magnitudes:
    counts: torch.Tensor   # (BINS,) inputs per bin, all channels together
    energy: torch.Tensor   # (K, BINS) sum of x^2 per channel and bin

    @classmethod
    def empty(cls, K: int, dtype=torch.float64) -> "Magnitudes":
        return cls(torch.zeros(BINS, dtype=dtype), torch.zeros(K, BINS, dtype=dtype))

    def add(self, x2d: torch.Tensor) -> None:
        if self.counts.device != x2d.device:
            self.counts, self.energy = self.counts.to(x2d.device), self.energy.to(x2d.device)
        x = x2d.detach().to(torch.float32)
        mag = x.abs()
        # in place on one temporary: calibration histograms every site's inputs, batch after batch
        b = mag.clamp_min(2.0 ** (LOW_EXP - 1)).log2_().sub_(LOW_EXP).mul_(BINS_PER_OCTAVE).floor_().add_(1)
        # clamped as integers: a non-finite input (refused later, naming its layer) still lands in a bin
        b = b.to(torch.int64).clamp_(0, BINS - 1).masked_fill_(mag < 2.0 ** LOW_EXP, 0)
        self.counts += torch.bincount(b.reshape(-1), minlength=BINS).to(self.counts.dtype)
        K = x.shape[1]
        flat = b.add_(torch.arange(0, K * BINS, BINS, device=x.device)).reshape(-1)
        sq = x.to(self.energy.dtype).square().reshape(-1)
        self.energy += torch.bincount(flat, weights=sq, minlength=K * BINS).reshape(K, BINS)

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def threshold(self, skip: float) -> float:
        """The magnitude under which a fraction ``skip`` of the calibration inputs lie."""
        total = self.total
        if total <= 0:
            return 0.0
        cum = torch.cumsum(self.counts.double(), 0).cpu()
        want = skip * total
        b = int(torch.searchsorted(cum, torch.tensor([want], dtype=cum.dtype)).item())
        b = min(b, BINS - 1)
        below = float(cum[b - 1]) if b > 0 else 0.0
        inside = float(self.counts[b])
        frac = 0.0 if inside <= 0 else min(max((want - below) / inside, 0.0), 1.0)
        lo = _bin_lower(b)
        if b == 0:
            return frac * _bin_lower(1)
        if b == BINS - 1:
            return lo
        hi = _bin_lower(b + 1)
        return lo * (hi / lo) ** frac

    def _position(self, t: float) -> tuple[int, float]:
        """Bin holding ``t`` and the fraction of that bin's mass taken as under it."""
        if t <= 0.0:
            return 0, 0.0
        edge1 = _bin_lower(1)
        if t < edge1:
            return 0, t / edge1
        b = min(int(math.floor((math.log2(t) - LOW_EXP) * BINS_PER_OCTAVE)) + 1, BINS - 1)
        if b == BINS - 1:
            return b, 0.0
        lo, hi = _bin_lower(b), _bin_lower(b + 1)
        return b, min(max(math.log(t / lo) / math.log(hi / lo), 0.0), 1.0)

    def skipped_fraction(self, t: float) -> float:
        """Fraction of the calibration inputs under ``t``."""
        total = self.total
        if total <= 0:
            return 0.0
        b, frac = self._position(t)
        return (float(self.counts[:b].sum()) + frac * float(self.counts[b])) / total

    def dropped_energy(self, t: float) -> torch.Tensor:
        """(K,) per channel, the energy of the calibration inputs under ``t``."""
        b, frac = self._position(t)
        return self.energy[:, :b].sum(1) + frac * self.energy[:, b]


def predicted_error(weight: torch.Tensor, magnitudes: Magnitudes, t: float, energy: float) -> float:
    """Relative output error of zeroing the inputs under ``t``: the dropped inputs' energy through
    the weight's column norms, over the layer's output energy. Products between different dropped
    inputs are left out (they are small and of either sign, so they mostly cancel)."""
    dropped = magnitudes.dropped_energy(t).to(torch.float64)
    cols = (weight.to(device=dropped.device, dtype=torch.float64) ** 2).sum(0)
    num = float((cols * dropped).sum())
    if energy <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / energy)


def normal_threshold(skip: float) -> float:
    """The threshold that skips a fraction ``skip`` of standard-normal inputs: the default where no
    calibration data exists (unit-scale inputs, e.g. a timing on random activations)."""
    return math.sqrt(2.0) * float(torch.erfinv(torch.tensor(skip, dtype=torch.float64)))


class WeightBacked:
    """An approximation that keeps a dense ``weight``: it answers for its shape, device and size as
    the weight does (what the planner's caches and moves ask of any approximation)."""

    __slots__ = ()

    @property
    def shape(self):
        return self.weight.shape

    @property
    def device(self):
        return self.weight.device

    def numel(self) -> int:
        return self.weight.numel()

    def element_size(self) -> int:
        return self.weight.element_size()


class Thresholded(WeightBacked):
    """A dense weight whose layer treats inputs under ``threshold`` as zero (``act:S``)."""

    __slots__ = ("weight", "threshold")

    def __init__(self, weight: torch.Tensor, threshold: float):
        self.weight = weight
        self.threshold = float(threshold)

    def to(self, *args, **kwargs) -> "Thresholded":
        return Thresholded(self.weight.to(*args, **kwargs), self.threshold)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(masked(x, self.threshold), self.weight.to(x.dtype), bias)

    def packed(self, spec):
        from sparsec.codegen import pack

        return pack(spec, self.weight, threshold=self.threshold)


def masked(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with every entry whose magnitude is under ``threshold`` set to zero."""
    keep = x.abs().to(torch.float32) >= threshold  # compared in float32, as the kernel does
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def apply_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a replacement that is a weight, or an approximation that applies itself
    (a ``Thresholded``, a sparse-plus-low-rank pair)."""
    if hasattr(weight, "linear"):
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def pack_approximation(spec, approx):
    """The packed weight of a candidate's approximation (a tensor, or an object that packs itself)."""
    from sparsec.codegen import pack

    if hasattr(approx, "packed"):
        return approx.packed(spec)
    return pack(spec, approx)


def input_scale(spec, packed) -> float:
    """The scale of unit-normal timing inputs that makes a packed ``act:S`` layer skip a fraction S
    of them, as its calibration data did (1 for every other format)."""
    skip = getattr(spec, "skip", None)
    if skip is None:
        return 1.0
    threshold = float(packed.tensors()["threshold"].reshape(-1)[0])
    unit = normal_threshold(skip)
    return threshold / unit if unit > 0 else 1.0
