"""Spend the error budget where it buys the most time.

Selection is a multiple-choice knapsack: each layer picks one of its candidates (dense costs
nothing and saves nothing), the value is predicted time saved and the weight is the layer's
squared relative output error. The end-to-end error model is

    e2e^2 = amplification * (fixed + sum over layers of sensitivity * error^2)

(squared errors add when layer errors are independent; ``fixed`` is what layers a plan forces
spend). Nothing in it is guessed; both factors are measured on this network:

- ``sensitivity``: how much of a layer's squared error reaches the output. An error in a query
  projection passes through a softmax, one in an early output projection is carried by every
  later block, one in a pooler nobody reads vanishes. ``probe_sensitivity`` measures it per role
  of layer (layers whose names differ only in their numbers, such as
  ``encoder.layer.3.attention.self.query``), per run of consecutive blocks, then alone for the
  few layers the allocation picks with the most time at stake: a few dozen model evaluations
  whatever the layer count.
- ``amplification``: how layer errors combine when several layers are rewritten at once.
  ``fit_to_budget`` measures the end-to-end error of an allocation, sets the amplification to
  what was observed, re-allocates, and keeps the allocation with the most predicted saving that
  measured within the budget. If none did, it backs off one hull step at a time until one does.

The knapsack itself is solved greedily on each layer's upper convex hull of (error cost, saving),
the classic near-optimal rule for this problem; ``back_off`` walks it in reverse, one hull step
of the layer with the worst ratio of error to saving at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from sparsec.candidates import Candidate, Layer

CALIBRATION_ROUNDS = 4  # end-to-end measurements spent calibrating the amplification
GOOD_FILL = 0.85  # an allocation measuring at least this share of the budget is not re-allocated
MIN_AMPLIFICATION = 1e-3
MAX_PROBES = 32  # roles probed one by one; a model with more starts from sensitivity 1
MAX_SEGMENTS = 6  # depth probes: runs of consecutive blocks whose layers are measured together
PROBE_ROUNDS = 3  # refills after which picked layers are no longer probed alone
PROBE_MARGIN = 4.0  # a layer whose least lossy step costs up to this much of the budget is probed alone
# layers probed alone in all, those with the most predicted time at stake first; the others keep
# their role and depth estimate, corrected by their role's median ratio of measured to estimated.
# Probing every layer alone, a 211-layer LLM measured nearly every layer (2153 model evaluations to
# plan SmolLM2-135M, docs/frontier.md): planning must grow with roles and depth, not with layers
MAX_ALONE = 12
# When an allocation measures over the budget, the layers it rewrites that were never measured alone
# are probed (most time at stake first, this many in all) before the error model is recalibrated:
# one layer far more sensitive than its role and depth say (SmolLM2-135M's block-11 down
# projection measured 480 alone, its role 0.58, docs/frontier.md) otherwise reads as a uniform
# amplification of every layer, and the re-allocations never fit
LATE_ALONE = 6


@dataclass
class Hull:
    """A layer's efficient candidates, in increasing error cost and increasing saving."""

    layer: Layer
    points: list[Candidate]  # points[0] is the dense candidate
    index: int = 0
    sensitivity: float = 1.0  # end-to-end squared error per unit of this layer's squared error
    measured_alone: bool = False  # the sensitivity was measured with this layer alone rewritten


    @property
    def current(self) -> Candidate:
        return self.points[self.index]

    def cost(self, i: int | None = None) -> float:
        i = self.index if i is None else i
        return self.sensitivity * self.points[i].predicted_error ** 2

    def gain(self, i: int | None = None) -> float:
        i = self.index if i is None else i
        return self.layer.saving(self.points[i])


@dataclass
class Allocation:
    hulls: list[Hull]
    budget: float
    amplification: float = 1.0
    fixed: float = 0.0  # squared error spent by layers outside the knapsack (forced by a plan)
    history: list[str] = field(default_factory=list)

    def model_cost(self) -> float:
        """fixed + sum of squared layer errors: the end-to-end squared error before amplification."""
        return self.fixed + sum(h.cost() for h in self.hulls)

    def predicted_error(self) -> float:
        return math.sqrt(self.amplification * self.model_cost())

    def saving(self) -> float:
        return sum(h.gain() for h in self.hulls)

    def budget_left_for(self, hull: Hull) -> float:
        """Error (not squared) still available to ``hull``'s layer given every other choice."""
        others = self.amplification * (self.fixed + sum(h.cost() for h in self.hulls if h is not hull))
        if hull.sensitivity <= 0.0:
            return math.inf
        return math.sqrt(max(self.budget ** 2 - others, 0.0) / (self.amplification * hull.sensitivity))

    def snapshot(self) -> tuple[int, ...]:
        return tuple(h.index for h in self.hulls)

    def restore(self, snapshot: tuple[int, ...]) -> None:
        for h, i in zip(self.hulls, snapshot):
            h.index = i

    def fill(self, amplification: float | None = None) -> None:
        """Greedy knapsack from all-dense: repeatedly take the hull step with the best saving per cost."""
        if amplification is not None:
            self.amplification = amplification
        for h in self.hulls:
            h.index = 0
        capacity = self.budget ** 2 / self.amplification - self.fixed
        spent = 0.0
        while True:
            best, best_slope = None, 0.0
            for h in self.hulls:
                if h.index + 1 >= len(h.points):
                    continue
                dc = h.cost(h.index + 1) - h.cost()
                if spent + dc > capacity * (1.0 + 1e-12):
                    continue
                slope = (h.gain(h.index + 1) - h.gain()) / dc if dc > 0 else math.inf
                if slope > best_slope:
                    best, best_slope = h, slope
            if best is None:
                return
            spent += best.cost(best.index + 1) - best.cost()
            best.index += 1


def efficient_hull(layer: Layer, viable: list[Candidate]) -> list[Candidate]:
    """Dense plus the candidates on the upper concave hull of (squared error, saving)."""
    pts = sorted(viable, key=lambda c: (c.predicted_error ** 2, -layer.saving(c)))
    hull = [layer.dense]
    for c in pts:
        if not math.isfinite(c.predicted_error) or layer.saving(c) <= layer.saving(hull[-1]):
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


def allocate(layers: list[Layer], viable: dict[str, list[Candidate]], budget: float,
             amplification: float = 1.0, fixed: float = 0.0) -> Allocation:
    """Greedy multiple-choice knapsack over each layer's hull under ``budget`` end-to-end error."""
    hulls = [Hull(layer, efficient_hull(layer, viable.get(layer.name, []))) for layer in layers]
    alloc = Allocation(hulls=hulls, budget=budget, amplification=amplification, fixed=fixed)
    alloc.fill()
    return alloc


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
    model = alloc.model_cost()
    if model <= 0.0:
        return alloc.amplification
    return max(measured_error ** 2 / model, MIN_AMPLIFICATION)


Measure = Callable[[], "tuple[float, dict[str, float]]"]
MeasureAlone = Callable[["dict[str, Candidate]"], float]


def role_of(name: str) -> str:
    """Layers whose names differ only in numbers play one role: 'encoder.layer.#.attention.self.query'."""
    return re.sub(r"\d+", "#", name)


def depth_of(name: str) -> int | None:
    """The block a layer belongs to: the first number in its name ('model.layers.12.mlp.up' -> 12)."""
    m = re.search(r"\d+", name)
    return int(m.group()) if m else None


def depth_segments(hulls: list["Hull"], most: int = MAX_SEGMENTS) -> list[list["Hull"]]:
    """Runs of consecutive blocks, at most ``most`` of them, as equal in blocks as can be; layers
    without a block number are in none. Empty where the layers span fewer than two blocks."""
    depths = sorted({d for d in (depth_of(h.layer.name) for h in hulls) if d is not None})
    if len(depths) < 2:
        return []
    count = min(most, len(depths))
    segment_of = {d: i * count // len(depths) for i, d in enumerate(depths)}
    segments: list[list[Hull]] = [[] for _ in range(count)]
    for h in hulls:
        d = depth_of(h.layer.name)
        if d is not None:
            segments[segment_of[d]].append(h)
    return [seg for seg in segments if seg]


def probe_point(hull: Hull, target: float) -> Candidate:
    """The hull candidate whose layer error is nearest ``target`` (in ratio): a typical perturbation."""
    return min(hull.points[1:], key=lambda c: abs(math.log(max(c.predicted_error, 1e-12) / target)))


def _measured_ratio(measure_alone: MeasureAlone, picks: dict[str, Candidate], hulls: dict[str, Hull]) -> float | None:
    """Measured end-to-end squared error of ``picks`` over what the current sensitivities predict."""
    model = sum(hulls[n].sensitivity * c.predicted_error ** 2 for n, c in picks.items())
    if model <= 0.0:
        return None
    return measure_alone(picks) ** 2 / model


def probe_sensitivity(alloc: Allocation, measure_alone: MeasureAlone, rounds: int = PROBE_ROUNDS) -> None:
    """Measure how much of a layer's squared error reaches the output, and refill the allocation.

    ``measure_alone`` evaluates the end-to-end error with only the given layers rewritten. Three
    kinds of probe, each a whole-model evaluation, so that planning grows with the model's roles
    and depth, not with its layers:

    - per role of layer (at most MAX_PROBES roles): every layer of the role at a typical
      perturbation gives the role's sensitivity;
    - per depth segment (at most MAX_SEGMENTS runs of consecutive blocks): every layer of the
      segment at once scales its layers' role sensitivities by what was measured there. The role
      average hides how much depth matters: in MiniLM an early output projection reaches the
      embedding several times more than the average of its role;
    - alone, for up to ``rounds`` refills: the layers the allocation picks (or whose least lossy
      candidate would cost at most PROBE_MARGIN times the budget) with the most predicted time at
      stake, MAX_ALONE in all, since their cost decides the plan. The role's other layers are
      corrected by the median ratio of measured to estimated sensitivity among those probed.
    """
    roles: dict[str, list[Hull]] = {}
    for h in alloc.hulls:
        if len(h.points) > 1:
            roles.setdefault(role_of(h.layer.name), []).append(h)
    if not roles:
        return
    by_name = {h.layer.name: h for hulls in roles.values() for h in hulls}
    target = max(alloc.budget, 1e-4)
    # a later allocation of the same plan (verified again after a refusal, or re-planned at another
    # budget) starts from what was probed before: a sensitivity is the layer's, not the budget's
    known = all(h.layer.sensitivity is not None for h in by_name.values())
    if known:
        for h in by_name.values():
            h.sensitivity, h.measured_alone = h.layer.sensitivity, h.layer.sensitivity_alone
        alloc.history.append("end-to-end sensitivities as probed earlier in this plan")
    elif len(roles) <= MAX_PROBES:
        found = []
        for role, hulls in roles.items():
            for h in hulls:
                h.sensitivity = 1.0
            ratio = _measured_ratio(measure_alone, {h.layer.name: probe_point(h, target) for h in hulls}, by_name)
            if ratio is None:
                continue
            for h in hulls:
                h.sensitivity = ratio
            found.append(f"{role} {ratio:.2g}")
        alloc.history.append("end-to-end sensitivity per role of layer (measured alone): " + ", ".join(found))
        found = []
        for segment in depth_segments(list(by_name.values())):
            ratio = _measured_ratio(measure_alone, {h.layer.name: probe_point(h, target) for h in segment}, by_name)
            if ratio is None:
                continue
            for h in segment:
                h.sensitivity *= ratio
            blocks = sorted({depth_of(h.layer.name) for h in segment})
            found.append(f"{blocks[0]}-{blocks[-1]} x{ratio:.2g}" if len(blocks) > 1 else f"{blocks[0]} x{ratio:.2g}")
        if found:
            alloc.history.append("end-to-end sensitivity by depth, blocks measured together (x role's): "
                                 + ", ".join(found))
    alloc.fill()
    alone: dict[int, float] = {}  # id(hull) -> measured over estimated sensitivity
    estimate = {id(h): h.sensitivity for h in alloc.hulls}
    earlier = {id(h) for h in by_name.values() if h.measured_alone}  # probed alone before: counted, not again
    for _ in range(rounds):
        if len(alone) + len(earlier) >= MAX_ALONE:
            break
        capacity = alloc.budget ** 2 / alloc.amplification - alloc.fixed
        todo = [h for h in alloc.hulls if id(h) not in alone and id(h) not in earlier and h.sensitivity > 0.0
                and len(h.points) > 1 and (h.index > 0 or h.cost(1) <= PROBE_MARGIN * capacity)]
        if not todo:
            break
        todo.sort(key=lambda h: -h.layer.saving(h.current if h.index > 0 else h.points[1]))
        for h in todo[: MAX_ALONE - len(alone) - len(earlier)]:
            cand = h.current if h.index > 0 else h.points[1]
            if cand.predicted_error <= 0.0:
                continue
            h.sensitivity = measure_alone({h.layer.name: cand}) ** 2 / cand.predicted_error ** 2
            h.measured_alone = True
            alone[id(h)] = h.sensitivity / estimate[id(h)] if estimate[id(h)] > 0.0 else 1.0
        for hulls in roles.values():  # the layers not probed alone: their estimate, corrected
            ratios = sorted(alone[id(h)] for h in hulls if id(h) in alone)
            if ratios:
                for h in hulls:
                    if id(h) not in alone and id(h) not in earlier:
                        h.sensitivity = estimate[id(h)] * ratios[len(ratios) // 2]
        alloc.fill()
    _remember(alloc)
    if alone:
        layers = ", ".join(f"{h.layer.name} {h.sensitivity:.2g}" for h in alloc.hulls if id(h) in alone)
        alloc.history.append(f"end-to-end sensitivity of the layers picked (measured alone): {layers}")


def probe_unmeasured(alloc: Allocation, measure_alone: MeasureAlone, most: int) -> list[Hull]:
    """Measure alone up to ``most`` of the layers the allocation rewrites whose sensitivity is
    still an estimate, those with the most predicted time at stake first; return them."""
    todo = [h for h in alloc.hulls if h.index > 0 and not h.measured_alone and h.current.predicted_error > 0.0]
    todo.sort(key=lambda h: -h.gain())
    for h in todo[:most]:
        h.sensitivity = measure_alone({h.layer.name: h.current}) ** 2 / h.current.predicted_error ** 2
        h.measured_alone = True
    _remember(alloc)
    return todo[:most]


def _remember(alloc: Allocation) -> None:
    """Keep each layer's probed sensitivity on the layer, for later allocations of the same plan."""
    for h in alloc.hulls:
        if len(h.points) > 1:
            h.layer.sensitivity, h.layer.sensitivity_alone = h.sensitivity, h.measured_alone


def fit_to_budget(alloc: Allocation, measure: Measure, rounds: int = CALIBRATION_ROUNDS,
                  measure_alone: MeasureAlone | None = None) -> tuple[float, dict[str, float]]:
    """Measure, calibrate the error model on this network, re-allocate; return the final measurement.

    ``measure`` evaluates the allocation's current choices end to end (error, per-layer errors);
    with ``measure_alone``, sensitivities are probed first (``probe_sensitivity``).
    The allocation left in place is the one with the largest predicted saving among those that
    measured within the budget, reached by at most ``rounds`` calibrated re-allocations and then,
    if none fitted, by backing off one hull step at a time. With ``measure_alone``, an allocation
    over budget first has its estimated layers measured alone (``probe_unmeasured``) and is
    re-allocated on what they show, before the amplification is blamed.
    """
    if measure_alone is not None:
        probe_sensitivity(alloc, measure_alone)
    seen: dict[tuple[int, ...], tuple[float, dict[str, float]]] = {}

    def run() -> tuple[float, dict[str, float]]:
        key = alloc.snapshot()
        if key not in seen:
            seen[key] = measure()
        return seen[key]

    error, _ = run()
    feasible: dict[tuple[int, ...], float] = {}
    if error <= alloc.budget:
        feasible[alloc.snapshot()] = alloc.saving()
    too_small, large_enough = 0.0, math.inf  # amplifications known to overshoot / to fit
    late = LATE_ALONE if measure_alone is not None else 0
    for _ in range(rounds):
        if error > alloc.budget and late > 0:
            probed = probe_unmeasured(alloc, measure_alone, late)
            late -= len(probed)
            if probed:
                before = alloc.snapshot()
                alloc.fill()
                changed = alloc.snapshot() != before
                alloc.history.append(
                    f"over budget ({error:.3%}): measured alone the rewritten layers only estimated, "
                    + ", ".join(f"{h.layer.name} {h.sensitivity:.2g}" for h in probed)
                    + ("; re-allocated" if changed else ""))
                if changed:
                    error, _ = run()
                    if error <= alloc.budget:
                        feasible[alloc.snapshot()] = alloc.saving()
                    continue
        amp = alloc.amplification
        if error <= alloc.budget:
            large_enough = min(large_enough, amp)
            if error >= GOOD_FILL * alloc.budget or alloc.model_cost() <= 0.0:
                break  # close enough, or nothing measured that says how far the model is off
        else:
            too_small = max(too_small, amp)
        proposal = calibrate_amplification(alloc, error)
        if abs(proposal - amp) <= 0.02 * amp:
            break  # the model already predicts what was measured
        if not too_small < proposal < large_enough:
            proposal = math.sqrt(max(too_small, MIN_AMPLIFICATION) * large_enough) \
                if math.isfinite(large_enough) else 2.0 * max(too_small, amp)
        before = alloc.snapshot()
        alloc.fill(proposal)
        if alloc.snapshot() == before:
            continue
        error, _ = run()
        alloc.history.append(
            f"end-to-end error model calibrated on this network (layer errors amplify {proposal:.2f}x): "
            f"re-allocated, measured {error:.3%} against a budget of {alloc.budget:.3%}"
        )
        if error <= alloc.budget:
            feasible[alloc.snapshot()] = alloc.saving()
    if feasible:
        alloc.restore(max(feasible, key=feasible.get))
        error, local = run()
    else:
        alloc.restore(min(seen, key=lambda key: seen[key][0]))
        error, local = run()
        while error > alloc.budget and back_off(alloc) is not None:
            error, local = run()
    alloc.amplification = calibrate_amplification(alloc, error)
    return error, local
