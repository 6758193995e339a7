"""Budget allocation: convex hulls, the greedy knapsack against brute force, calibration by measurement."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn as nn

import sparsec
from accuracy_data import activations
from sparsec.candidates import Candidate, Layer
from sparsec.formats import Dense, LowRank
from sparsec.passes import select
from sparsec.sites import Site, SiteStats


def layer(name: str, points: list[tuple[float, float]], dense_us: float = 100.0) -> tuple[Layer, list[Candidate]]:
    """A layer whose candidates have the given (predicted error, predicted us)."""
    site = Site(name=name, op="linear", weight=torch.zeros(1, 1), bias=None, dtype=torch.float32, input_key=name)
    dense = Candidate(Dense(), None, None, 0.0, predicted_us=dense_us)
    cands = [Candidate(LowRank(i + 1), None, "test", err, predicted_us=us) for i, (err, us) in enumerate(points)]
    return Layer(site=site, stats=SiteStats.empty(1), dense=dense, candidates=cands), cands


def random_instance(rng: random.Random, n_layers: int, n_cands: int):
    layers, viable = [], {}
    for i in range(n_layers):
        pts = [(rng.uniform(0.001, 0.05), rng.uniform(10.0, 99.0)) for _ in range(n_cands)]
        lay, cands = layer(f"l{i}", pts)
        layers.append(lay)
        viable[lay.name] = cands
    return layers, viable


def test_hull_keeps_only_efficient_candidates_in_order():
    lay, cands = layer("a", [(0.01, 80.0), (0.02, 90.0), (0.015, 60.0), (0.03, 50.0), (0.04, 55.0), (math.nan, 10.0)])
    hull = select.efficient_hull(lay, cands)
    assert hull[0] is lay.dense
    # (0.02, 90) saves less than (0.015, 60) for more error; (0.04, 55) is dominated by (0.03, 50);
    # the NaN-error candidate has no prediction to trust
    assert [c.predicted_error for c in hull[1:]] == [0.01, 0.015, 0.03]
    slopes = [select._slope(lay, a, b) for a, b in zip(hull, hull[1:])]
    assert all(s1 > s2 for s1, s2 in zip(slopes, slopes[1:])), slopes


def test_greedy_allocation_fits_and_is_near_the_brute_force_optimum():
    rng = random.Random(0)
    for _ in range(40):
        layers, viable = random_instance(rng, n_layers=4, n_cands=3)
        budget = rng.uniform(0.005, 0.06)
        alloc = select.allocate(layers, viable, budget)
        assert alloc.predicted_error() <= budget * (1 + 1e-9)
        best = 0.0
        options = [[layer.dense] + viable[layer.name] for layer in layers]
        for combo in itertools.product(*options):
            if math.sqrt(sum(c.predicted_error ** 2 for c in combo)) <= budget:
                best = max(best, sum(l.saving(c) for l, c in zip(layers, combo)))
        # greedy on convex hulls is within one hull step of the (fractional) optimum
        max_step = max(h.gain(i + 1) - h.gain(i) for h in alloc.hulls for i in range(len(h.points) - 1)) if any(
            len(h.points) > 1 for h in alloc.hulls) else 0.0
        assert alloc.saving() >= best - max_step - 1e-9
        assert alloc.saving() <= best + 1e-9


def test_fixed_cost_of_forced_layers_is_charged_to_the_budget():
    layers, viable = random_instance(random.Random(1), n_layers=3, n_cands=3)
    free = select.allocate(layers, viable, 0.03)
    charged = select.allocate(layers, viable, 0.03, fixed=0.025 ** 2)
    assert charged.predicted_error() <= 0.03 * (1 + 1e-9)
    assert sum(h.cost() for h in charged.hulls) <= 0.03 ** 2 - 0.025 ** 2 + 1e-12
    assert charged.saving() <= free.saving()


def test_back_off_undoes_the_least_efficient_step_first():
    a, ca = layer("a", [(0.01, 50.0)])  # saves 50 for 1e-4
    b, cb = layer("b", [(0.01, 90.0)])  # saves 10 for 1e-4: worst ratio
    alloc = select.allocate([a, b], {"a": ca, "b": cb}, 1.0)
    assert alloc.snapshot() == (1, 1)
    assert select.back_off(alloc).layer is b
    assert alloc.history[-1] == "backed off b: lowrank:1 -> dense"
    assert select.back_off(alloc).layer is a
    assert select.back_off(alloc) is None


@pytest.mark.parametrize("true_amp", [0.2, 1.0, 4.0])
def test_fit_to_budget_calibrates_the_error_model_on_measurements(true_amp):
    layers, viable = random_instance(random.Random(2), n_layers=8, n_cands=4)
    budget = 0.03
    alloc = select.allocate(layers, viable, budget)
    calls = []

    def measure():
        calls.append(alloc.snapshot())
        return math.sqrt(true_amp * alloc.model_cost()), {}

    error, _ = select.fit_to_budget(alloc, measure)
    assert error <= budget
    # a network whose errors add up exactly as amplification * sum gets the allocation of that model
    ideal = select.allocate(layers, viable, budget, amplification=true_amp)
    assert alloc.snapshot() == ideal.snapshot()
    assert len(calls) == len(set(calls)) <= 1 + select.CALIBRATION_ROUNDS
    assert alloc.amplification == pytest.approx(true_amp)


def test_fit_to_budget_backs_off_when_one_layer_hurts_far_more_than_predicted():
    layers, viable = random_instance(random.Random(3), n_layers=6, n_cands=3)
    budget = 0.03
    alloc = select.allocate(layers, viable, budget)

    def measure():  # layer l0's error is 20x worse end to end than its own error says
        costs = [h.cost() * (400.0 if h.layer.name == "l0" else 1.0) for h in alloc.hulls]
        return math.sqrt(sum(costs)), {}

    error, _ = select.fit_to_budget(alloc, measure)
    assert error <= budget
    assert alloc.saving() > 0.0


def test_all_dense_allocation_is_measured_once_and_kept():
    layers, _ = random_instance(random.Random(4), n_layers=3, n_cands=2)
    alloc = select.allocate(layers, {}, 0.01)
    calls = []
    error, _ = select.fit_to_budget(alloc, lambda: (calls.append(1), (0.0, {}))[1])
    assert error == 0.0 and len(calls) == 1 and alloc.saving() == 0.0


def attenuating_mlp(seed: int) -> nn.Module:
    """Linear layers between LayerNorms and residual paths, like a transformer block."""
    g = torch.Generator().manual_seed(seed)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(128)
            self.up = nn.Linear(128, 256)
            self.down = nn.Linear(256, 128)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(self.norm(x))))

    model = nn.Sequential(Block(), Block(), nn.LayerNorm(128))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("budget", [0.02, 0.05])
def test_optimize_measures_within_budget_on_calibration_and_reports_held_out(scenario_fp, budget):
    torch.manual_seed(5)
    model = attenuating_mlp(6)
    calib = [activations(128, 256, seed=7, sample_seed=i).reshape(4, 64, 128) for i in range(4)]
    held = [activations(128, 256, seed=7, sample_seed=100 + i).reshape(4, 64, 128) for i in range(2)]
    result = sparsec.optimize(model, (calib[0],), lower=False, fingerprint=scenario_fp(), error_budget=budget,
                              calibration=calib, heldout=held)
    e2e = result.report.end_to_end
    assert e2e["measured_error"] <= budget
    assert e2e["heldout_error"] is not None and e2e["heldout_error"] <= 1.5 * budget
    # layer errors are damped by the residual paths and norms here: a layer may exceed the budget
    rewritten = [l for l in result.report.layers if l["format"] != "dense"]
    assert rewritten and max(l["predicted_error"] for l in rewritten) > budget


def test_probed_sensitivities_weight_each_role_and_free_dead_layers():
    rng = random.Random(5)
    layers, viable = [], {}
    for i in range(3):
        for role in ("block.#.query", "block.#.value", "pooler"):
            if role == "pooler" and i:
                continue
            name = role.replace("#", str(i))
            low, high = (0.005, 0.03) if role == "block.#.value" else (0.05, 0.3)
            lay, cands = layer(name, [(rng.uniform(low, high), rng.uniform(10.0, 99.0)) for _ in range(3)])
            layers.append(lay)
            viable[name] = cands
    true = {"block.#.query": 0.05, "block.#.value": 1.0, "pooler": 0.0}  # the pooler's output is unused

    def true_error(choices):
        return math.sqrt(sum(true[select.role_of(n)] * c.predicted_error ** 2 for n, c in choices.items()))

    budget = 0.03
    alloc = select.allocate(layers, viable, budget)
    probes = []
    error, _ = select.fit_to_budget(
        alloc, lambda: (true_error({h.layer.name: h.current for h in alloc.hulls if h.index}), {}),
        measure_alone=lambda choices: (probes.append(set(choices)), true_error(choices))[1])
    # one probe per role, one per block (three blocks: each its own depth segment), then picked layers alone
    assert [len({select.role_of(n) for n in p}) for p in probes[:3]] == [1, 1, 1]
    assert [{select.depth_of(n) for n in p} for p in probes[3:6]] == [{0}, {1}, {2}]
    assert all(len(p) == 1 for p in probes[6:])
    assert {select.role_of(h.layer.name): h.sensitivity for h in alloc.hulls} == pytest.approx(true)
    assert error <= budget
    pooler = next(h for h in alloc.hulls if h.layer.name == "pooler")
    assert pooler.index == len(pooler.points) - 1  # free end to end: the most saving candidate
    unprobed = select.allocate(layers, viable, budget)
    select.fit_to_budget(unprobed, lambda: (true_error({h.layer.name: h.current for h in unprobed.hulls if h.index}), {}))
    assert alloc.saving() > unprobed.saving()


def test_a_later_allocation_of_the_same_plan_starts_from_the_sensitivities_probed():
    """Verified again (after a refusal) or re-planned at a larger budget, the same layers are not
    probed per role, per depth or alone again: a sensitivity is the layer's, not the allocation's."""
    rng = random.Random(5)
    layers, viable = [], {}
    for i in range(3):
        for role in ("block.#.query", "block.#.value"):
            name = role.replace("#", str(i))
            lay, cands = layer(name, [(rng.uniform(0.005, 0.3), rng.uniform(10.0, 99.0)) for _ in range(3)])
            layers.append(lay)
            viable[name] = cands
    true = {"block.#.query": 0.05, "block.#.value": 1.0}

    def true_error(choices):
        return math.sqrt(sum(true[select.role_of(n)] * c.predicted_error ** 2 for n, c in choices.items()))

    first_probes, later_probes = [], []
    first = select.allocate(layers, viable, 0.03)
    select.fit_to_budget(first, lambda: (true_error({h.layer.name: h.current for h in first.hulls if h.index}), {}),
                         measure_alone=lambda c: (first_probes.append(set(c)), true_error(c))[1])
    assert first_probes
    for budget in (0.03, 0.06):
        later = select.allocate(layers, viable, budget)
        select.fit_to_budget(later, lambda: (true_error({h.layer.name: h.current for h in later.hulls if h.index}), {}),
                             measure_alone=lambda c: (later_probes.append(set(c)), true_error(c))[1])
        assert {h.layer.name: h.sensitivity for h in later.hulls} == {h.layer.name: h.sensitivity for h in first.hulls}
        assert "end-to-end sensitivities as probed earlier in this plan" in later.history
    alone_before = {frozenset(p) for p in first_probes if len(p) == 1}
    assert all(len(p) == 1 and frozenset(p) not in alone_before for p in later_probes)


def test_layers_picked_are_probed_alone_when_depth_matters_more_than_role():
    """Six blocks of one role; the first block's errors reach the output 40x more than the others'.
    The role probe averages that away; probing picked layers alone finds it before measuring."""
    layers, viable = [], {}
    for i in range(6):
        lay, cands = layer(f"block.{i}.out", [(0.02, 60.0), (0.04, 40.0)])
        layers.append(lay)
        viable[lay.name] = cands
    true = {f"block.{i}.out": (4.0 if i == 0 else 0.1) for i in range(6)}

    def error_of(choices):
        return math.sqrt(sum(true[n] * c.predicted_error ** 2 for n, c in choices.items()))

    budget = 0.03
    alloc = select.allocate(layers, viable, budget)
    measured = []

    def measure():
        e = error_of({h.layer.name: h.current for h in alloc.hulls if h.index})
        measured.append(e)
        return e, {}

    error, _ = select.fit_to_budget(alloc, measure, measure_alone=error_of)
    assert measured[0] <= budget  # the first allocation measured already fits
    assert error <= budget
    first = alloc.hulls[0]
    assert first.index == 0 or first.sensitivity == pytest.approx(4.0)
    assert all(h.current.predicted_error == 0.04 for h in alloc.hulls[1:])  # the others go all the way


def test_probing_grows_with_roles_and_depth_not_with_layers():
    """Two hundred layers of three roles in 67 blocks: one probe per role, one per run of blocks
    (at most MAX_SEGMENTS), and at most MAX_ALONE layers alone, those with the most time at stake first."""
    layers, viable = [], {}
    for i in range(200):
        lay, cands = layer(f"block.{i // 3}.{('q', 'up', 'down')[i % 3]}", [(0.001, 60.0 - i * 0.1)])
        layers.append(lay)
        viable[lay.name] = cands
    calls = []

    def alone(choices):
        calls.append(sorted(choices))
        return math.sqrt(sum(c.predicted_error ** 2 for c in choices.values()))

    alloc = select.allocate(layers, viable, 0.01)
    select.probe_sensitivity(alloc, alone)
    singles = [c for c in calls if len(c) == 1]
    groups = [c for c in calls if len(c) > 1]
    assert len(groups) == 3 + select.MAX_SEGMENTS
    segments = [sorted({select.depth_of(n) for n in c}) for c in groups[3:]]
    assert [s[0] for s in segments] == sorted(s[0] for s in segments)  # runs of consecutive blocks, in order
    assert sum(len(s) for s in segments) == 67
    assert 0 < len(singles) <= select.MAX_ALONE
    order = [l.name for l in layers]
    first = [order.index(c[0]) for c in singles]
    assert first == list(range(199, 199 - len(singles), -1))  # later layers save more here: first


def test_depth_probes_find_a_block_that_matters_more_among_many():
    """Thirty blocks of two roles; blocks 0-4 reach the output 20x more. The role probes average
    that away, the depth segment of blocks 0-4 finds it without probing each layer alone."""
    layers, viable = [], {}
    for i in range(30):
        for role in ("q", "up"):
            lay, cands = layer(f"layers.{i}.{role}", [(0.01, 50.0), (0.03, 80.0)])
            layers.append(lay)
            viable[lay.name] = cands
    true = {l.name: (20.0 if select.depth_of(l.name) < 5 else 1.0) for l in layers}

    def error_of(choices):
        return math.sqrt(sum(true[n] * c.predicted_error ** 2 for n, c in choices.items()))

    alloc = select.allocate(layers, viable, 0.05)
    select.probe_sensitivity(alloc, error_of, rounds=0)
    for h in alloc.hulls:
        assert h.sensitivity == pytest.approx(true[h.layer.name])


@pytest.mark.parametrize("late", [0, select.LATE_ALONE])
def test_an_over_budget_allocation_probes_its_unmeasured_layers_before_blaming_all(monkeypatch, late):
    """Thirty layers whose errors reach the output at a hundredth of their size, except one layer's
    lossiest candidate, which reaches it 500x (a layer whose few huge inputs that candidate drops).
    The role and depth probes use a milder candidate and see nothing; no layer is probed alone
    while estimating (MAX_ALONE 0), so the first allocation takes that candidate and overshoots.
    Measuring the rewritten layers alone finds the one to keep back; calibrating one amplification
    for every layer instead (LATE_ALONE 0) ends all dense, as SmolLM2 did at a KL budget of 0.05."""
    monkeypatch.setattr(select, "MAX_ALONE", 0)
    monkeypatch.setattr(select, "LATE_ALONE", late)
    layers, viable = [], {}
    for i in range(30):
        lay, cands = layer(f"layers.{i}.down", [(0.005, 70.0), (0.01, 50.0), (0.02, 20.0 - 0.1 * i)])
        layers.append(lay)
        viable[lay.name] = cands
    outlier = "layers.29.down"  # the most time at stake: first in line

    def true_error(choices):
        return math.sqrt(sum((500.0 if (n == outlier and c.predicted_error == 0.02) else 0.01) * c.predicted_error ** 2
                             for n, c in choices.items()))

    alloc = select.allocate(layers, viable, 0.012)

    def measure():
        return true_error({h.layer.name: h.current for h in alloc.hulls if h.index}), {}

    error, _ = select.fit_to_budget(alloc, measure, measure_alone=true_error)
    assert error <= 0.012
    chosen = {h.layer.name: h.current.predicted_error for h in alloc.hulls}
    lossiest = sum(e == 0.02 for e in chosen.values())
    if late:
        assert chosen[outlier] < 0.02 and lossiest == 29
        assert any("measured alone the rewritten layers only estimated, layers.29.down 5e+02" in line
                   for line in alloc.history)
    else:
        assert lossiest == 0
