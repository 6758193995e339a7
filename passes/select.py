"""Spend the error budget where it buys the most time.

Selection is a multiple-choice knapsack: each layer picks one of its candidates (dense costs
nothing and saves nothing), the value is predicted time saved and the weight is the layer's
squared relative output error times an amplification factor. Squared errors add when layer errors
are independent (the end-to-end error model), and the amplification is calibrated on this model
by measuring how far the end-to-end error strays from that sum (``calibrate_amplification``).

The knapsack is solved greedily on each layer's upper convex hull of (error cost, saving), the
classic near-optimal rule for this problem; ``back_off`` walks it in reverse, one hull step of the
layer with the worst ratio of error to saving at a time, until the measured error fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sparsec.candidates import Candidate, Layer


@dataclass
class Hull:
    """A layer's efficient candidates, in increasing error cost and increasing saving."""

    layer: Layer
    points: list[Candidate]  # points[0] is the dense candidate
    index: int = 0

    @property
    def current(self) -> Candidate:
        return self.points[self.index]

    def cost(self, i: int | None = None) -> float:
        i = self.index if i is None else i
        return self.points[i].predicted_error ** 2

    def gain(self, i: int | None = None) -> float:
        i = self.index if i is None else i
        return self.layer.saving(self.points[i])


@dataclass
class Allocation:
    hulls: list[Hull]
    budget: float
    amplification: float = 1.0
    history: list[str] = field(default_factory=list)

    def predicted_error(self) -> float:
        return math.sqrt(self.amplification * sum(h.cost() for h in self.hulls))

    def budget_left_for(self, hull: Hull) -> float:
        """Error (not squared) still available to ``hull``'s layer given every other choice."""
        others = self.amplification * sum(h.cost() for h in self.hulls if h is not hull)
        return math.sqrt(max(self.budget ** 2 - others, 0.0) / self.amplification)


def efficient_hull(layer: Layer, viable: list[Candidate]) -> list[Candidate]:
    """Dense plus the candidates on the upper concave hull of (squared error, saving)."""
    pts = sorted(viable, key=lambda c: (c.predicted_error ** 2, -layer.saving(c)))
    hull = [layer.dense]
    for c in pts:
        if layer.saving(c) <= layer.saving(hull[-1]):
            continue  # dominated: no more saving for at least as much error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            slope_ab = _slope(layer, a, b)
            slope_bc = _slope(layer, b, c)
            if slope_bc >= slope_ab:
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _slope(layer: Layer, a: Candidate, b: Candidate) -> float:
    dc = b.predicted_error ** 2 - a.predicted_error ** 2
    ds = layer.saving(b) - layer.saving(a)
    if dc <= 0.0:
        return math.inf
    return ds / dc


def allocate(layers: list[Layer], viable: dict[str, list[Candidate]], budget: float, amplification: float = 1.0) -> Allocation:
    """Greedy multiple-choice knapsack over each layer's hull under ``budget`` end-to-end error."""
    hulls = [Hull(layer, efficient_hull(layer, viable.get(layer.name, []))) for layer in layers]
    alloc = Allocation(hulls=hulls, budget=budget, amplification=amplification)
    capacity = budget ** 2 / amplification
    spent = 0.0
    while True:
        best, best_slope = None, 0.0
        for h in hulls:
            if h.index + 1 >= len(h.points):
                continue
            dc = h.cost(h.index + 1) - h.cost()
            if spent + dc > capacity * (1.0 + 1e-12):
                continue
            slope = _slope(h.layer, h.current, h.points[h.index + 1])
            if slope > best_slope:
                best, best_slope = h, slope
        if best is None:
            return alloc
        spent += best.cost(best.index + 1) - best.cost()
        best.index += 1


def back_off(alloc: Allocation) -> Hull | None:
    """Step back the layer whose last step bought the least saving per unit of error; None if all dense."""
    worst, worst_ratio = None, -1.0
    for h in alloc.hulls:
        if h.index == 0:
            continue
        dc = h.cost() - h.cost(h.index - 1)
        ds = h.gain() - h.gain(h.index - 1)
        ratio = dc / ds if ds > 0 else math.inf
        if ratio > worst_ratio:
            worst, worst_ratio = h, ratio
    if worst is None:
        return None
    alloc.history.append(f"backed off {worst.layer.name}: {worst.current.fmt} -> {worst.points[worst.index - 1].fmt}")
    worst.index -= 1
    return worst


def calibrate_amplification(alloc: Allocation, measured_error: float) -> float:
    """How much larger the measured end-to-end error is than the independent-sum model predicts."""
    model = sum(h.cost() for h in alloc.hulls)
    if model <= 0.0 or measured_error <= 0.0:
        return alloc.amplification
    return max(measured_error ** 2 / model, 1e-3)
