"""The planner stops fitting a candidate that a faster, already fitted one of its layer dominates."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "passes"))
from accuracy_data import activations, stats_of  # noqa: E402

from sparsec import pipeline  # noqa: E402
from sparsec.candidates import Candidate, Layer  # noqa: E402
from sparsec.formats import Dense, LowRank, Monarch  # noqa: E402
from sparsec.options import Options  # noqa: E402
from sparsec.sites import Site, relative_output_error  # noqa: E402


def planted_low_rank(N: int, K: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, rank, generator=g) @ torch.randn(rank, K, generator=g)) / K ** 0.5


def layer_of(W: torch.Tensor, requested: str, times: dict[str, float]) -> Layer:
    K = W.shape[1]
    site = Site("fc", "linear", W, None, torch.float32, "x")
    layer = Layer(site=site, stats=stats_of(activations(K, 1024, seed=21)),
                  dense=Candidate(Dense(), None, None, 0.0, predicted_us=100.0), requested=requested)
    for spec in (LowRank(8), LowRank(16), Monarch(4), Monarch(8)):
        layer.candidates.append(Candidate(spec, None, None, math.nan, predicted_us=times[str(spec)]))
    return layer


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(pipeline, "_APPROXIMATIONS", pipeline._BoundedCache())


def by_fmt(layer: Layer) -> dict[str, Candidate]:
    return {c.fmt: c for c in layer.candidates}


def test_a_fit_a_faster_exact_candidate_dominates_is_refused_as_dominated_with_the_figures():
    W = planted_low_rank(64, 64, 8, seed=20)  # lowrank:8 fits exactly
    layer = layer_of(W, "auto", {"lowrank:8": 20.0, "lowrank:16": 45.0, "monarch:4": 40.0, "monarch:8": 25.0})
    pipeline.approximate([layer], Options(error_budget=0.5))
    c = by_fmt(layer)
    assert c["lowrank:8"].rejected_because is None and c["lowrank:8"].predicted_error < 1e-5
    for fmt in ("monarch:4", "monarch:8"):
        why = c[fmt].rejected_because
        assert why is not None and why.startswith("dominated: after the first step of its fit"), why
        assert "of lowrank:8, which is predicted at least as fast (5.00x against" in why
        assert c[fmt].predicted_error > pipeline.ABANDON_MARGIN * c["lowrank:8"].predicted_error


def test_no_rival_at_least_as_fast_or_a_forced_layer_keeps_the_fit_whole():
    W = planted_low_rank(64, 64, 8, seed=20)
    slow_rivals = {"lowrank:8": 60.0, "lowrank:16": 70.0, "monarch:4": 40.0, "monarch:8": 25.0}
    for layer in (layer_of(W, "auto", slow_rivals),
                  layer_of(W, "monarch:8", {"lowrank:8": 20.0, "lowrank:16": 30.0, "monarch:4": 40.0, "monarch:8": 25.0})):
        pipeline.approximate([layer], Options(error_budget=0.5))
        c = by_fmt(layer)
        assert not any((x.rejected_because or "").startswith("dominated") for x in layer.candidates)
        assert not math.isnan(c["monarch:8"].predicted_error)
        assert c["monarch:8"].predicted_error > 0.0


def test_a_fit_within_the_margin_of_its_rival_is_finished():
    g = torch.Generator().manual_seed(22)
    W = torch.randn(64, 64, generator=g) / 8.0  # full rank: lowrank:8 is far worse than Monarch
    layer = layer_of(W, "auto", {"lowrank:8": 20.0, "lowrank:16": 50.0, "monarch:4": 40.0, "monarch:8": 25.0})
    pipeline.approximate([layer], Options(error_budget=0.5))
    c = by_fmt(layer)
    for fmt in ("monarch:4", "monarch:8"):
        assert c[fmt].rejected_because is None
        assert c[fmt].predicted_error < pipeline.ABANDON_MARGIN * c["lowrank:8"].predicted_error


def test_without_a_price_for_dense_the_reason_gives_the_predicted_times():
    W = planted_low_rank(64, 64, 8, seed=20)
    layer = layer_of(W, "auto", {"lowrank:8": 20.0, "lowrank:16": 45.0, "monarch:4": 40.0, "monarch:8": 25.0})
    layer.dense.predicted_us = None
    pipeline.approximate([layer], Options(error_budget=0.5))
    why = by_fmt(layer)["monarch:8"].rejected_because
    assert why is not None and why.endswith("(20.0 us against 25.0 us)"), why


def test_a_fit_over_budget_after_its_first_step_stops_and_the_lossier_ones_are_not_fitted():
    g = torch.Generator().manual_seed(23)
    W = torch.randn(64, 64, generator=g) / 8.0  # full rank: Monarch at 4 blocks loses most of it
    slow_rivals = {"lowrank:8": 60.0, "lowrank:16": 70.0, "monarch:4": 40.0, "monarch:8": 25.0}
    budget = 0.05
    layer = layer_of(W, "auto", slow_rivals)
    pipeline.approximate([layer], Options(error_budget=budget))
    c = by_fmt(layer)
    why = c["monarch:4"].rejected_because
    assert why is not None and why.startswith("over budget: after the first step of its fit"), why
    assert c["monarch:4"].predicted_error > pipeline.ABANDON_MARGIN * pipeline.OVER_BUDGET * budget
    # monarch:8 keeps fewer values than monarch:4: refused with it, never fitted
    assert c["monarch:8"].rejected_because.startswith("over budget: the less lossy monarch:4 already costs over")
    assert math.isnan(c["monarch:8"].predicted_error)

    # the same weight with a budget its first step is within: the fit is finished and weighed
    roomy = layer_of(W, "auto", slow_rivals)
    pipeline.approximate([roomy], Options(error_budget=c["monarch:4"].predicted_error))
    assert by_fmt(roomy)["monarch:4"].rejected_because is None
    assert by_fmt(roomy)["monarch:4"].predicted_error < c["monarch:4"].predicted_error


def test_a_deferred_fit_its_saving_would_not_pay_for_at_the_allocations_rate_stops_naming_that_rate():
    from sparsec.passes import select as knapsack

    def layer(name, W, times):
        site = Site(name, "linear", W, None, torch.float32, "x")
        out = Layer(site=site, stats=stats_of(activations(W.shape[1], 1024, seed=24)),
                    dense=Candidate(Dense(), None, None, 0.0, predicted_us=100.0))
        for fmt, us in times.items():
            spec = LowRank(int(fmt.split(":")[1])) if fmt.startswith("lowrank") else Monarch(int(fmt.split(":")[1]))
            out.candidates.append(Candidate(spec, None, None, math.nan, predicted_us=us))
        return out

    g = torch.Generator().manual_seed(25)
    near = planted_low_rank(64, 64, 8, seed=26) + 0.02 * torch.randn(64, 64, generator=g)
    a = layer("a", near, {"lowrank:8": 10.0})  # saves 90 us
    # Monarch saves 1-2 us here; low rank is slower than it, so no rival makes it dominated
    b = layer("b", torch.randn(64, 64, generator=g) / 8.0,
              {"lowrank:8": 99.5, "lowrank:16": 99.8, "monarch:4": 99.0, "monarch:8": 98.0})
    options = Options(error_budget=1.0)
    pipeline.approximate([a, b], options, defer=True)
    assert all(c.rejected_because == pipeline.DEFERRED for c in b.candidates if c.fmt.startswith("monarch"))
    # a budget lowrank:8 of the first layer spends to the last hair: the second layer has almost none left
    options = Options(error_budget=a.candidates[0].predicted_error * 1.0001)
    alloc = knapsack.allocate([a, b], {l.name: [c for c in l.candidates if c.rejected_because is None]
                                       for l in (a, b)}, options.error_budget)
    assert [h.current.fmt for h in alloc.hulls] == ["lowrank:8", "dense"]
    before = pipeline.EndToEnd(measured_error=0.0)
    kept, e2e = pipeline.fit_deferred(None, [a, b], options, None, alloc, before)
    assert kept is alloc and e2e is before  # nothing fitted stands: no allocation again, no evaluation
    for c in b.candidates:
        if c.fmt.startswith("monarch"):
            assert c.rejected_because.startswith("over budget: after the first step"), c.rejected_because
            assert "least rate the allocation took" in c.rejected_because
            # over 1.5x sqrt(2 x its saving / the least rate), under what the whole budget allows the layer
            rate = 90.0 / a.candidates[0].predicted_error ** 2
            limit = math.sqrt(2.0 * (100.0 - c.predicted_us) / rate)
            assert c.predicted_error > pipeline.ABANDON_MARGIN * limit


def test_what_a_layer_memoises_is_made_again_when_weight_or_statistics_change():
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(30))
    layer = layer_of(W.clone(), "auto", {"lowrank:8": 10.0, "lowrank:16": 20.0, "monarch:4": 30.0, "monarch:8": 20.0})
    first = pipeline._weight_identity(layer)
    energy = pipeline._layer_energy(layer, layer.site.weight)
    assert pipeline._weight_identity(layer) == first and pipeline._layer_energy(layer, layer.site.weight) == energy
    layer.site.weight.mul_(2.0)  # in place: a new version of the same tensor
    assert pipeline._weight_identity(layer) != first
    doubled = pipeline._layer_energy(layer, layer.site.weight)
    assert doubled == pytest.approx(4.0 * energy, rel=1e-9)
    layer.stats = stats_of(activations(64, 1024, seed=31))
    again = pipeline._layer_energy(layer, layer.site.weight)
    assert again != doubled
    assert again == pytest.approx(pipeline.output_energy(layer.site.weight, layer.stats, None), rel=1e-12)


def test_low_rank_errors_in_approximate_are_read_off_the_fit_not_the_gram(monkeypatch):
    import sparsec.passes.lowrank as lowrank

    gram_forms = []
    original = lowrank.relative_output_error
    monkeypatch.setattr(lowrank, "relative_output_error", lambda *a: gram_forms.append(a) or original(*a))
    W = planted_low_rank(64, 128, 8, seed=32) + 0.01 * torch.randn(64, 128, generator=torch.Generator().manual_seed(33))
    layer = layer_of(W, "auto", {"lowrank:8": 10.0, "lowrank:16": 20.0, "monarch:4": 30.0, "monarch:8": 20.0})
    pipeline._approximate_layer(layer, Options(), 1.0, "test cap")
    made = by_fmt(layer)
    assert not gram_forms
    for fmt in ("lowrank:8", "lowrank:16"):
        direct = pipeline.relative_output_error(W, made[fmt].weight(), layer.stats, None)
        assert made[fmt].predicted_error == pytest.approx(direct, rel=1e-7)


def test_the_margin_a_fit_is_given_shrinks_with_each_step_it_has_made():
    assert [pipeline.abandon_margin(s) for s in (1, 2, 3)] == [pipeline.ABANDON_MARGIN, 1.25, 1.125]
    g = torch.Generator().manual_seed(24)
    W = torch.randn(64, 64, generator=g) / 8.0
    layer = layer_of(W, "auto", {"lowrank:8": 20.0, "lowrank:16": 50.0, "monarch:4": 40.0, "monarch:8": 25.0})
    rival = layer.candidates[0]
    rival.predicted_error = 0.1  # lowrank:8, faster than both Monarch candidates
    energy = pipeline._layer_energy(layer, W)
    abandoned = {}
    abandon = pipeline._dominated(layer, None, W, layer.stats, energy, abandoned, cap=10.0, cap_note="")
    # 1.3x the rival's error, given as the numerator a sweep reads off its objective (no Gram product)
    numerator = (1.3 * 0.1) ** 2 * energy
    assert not abandon(Monarch(4), None, step=1, numerator=numerator)  # under 1.5x: the fit goes on
    assert abandon(Monarch(4), None, step=2, numerator=numerator)  # over 1.25x after two sweeps: it stops
    stopped = abandoned["monarch:4"]
    assert stopped.rival is rival and stopped.step == 2 and stopped.margin == 1.25
    assert stopped.error == pytest.approx(0.13)


def test_a_fit_within_the_margin_after_its_early_sweeps_but_not_a_later_one_stops_there():
    from sparsec.passes import monarch as monarch_pass
    from sparsec.passes.calibrate import damped

    g = torch.Generator().manual_seed(25)
    # near a Monarch matrix, where each sweep gains less than the one before (a Gaussian weight's
    # sweeps gain too evenly for any margin to stop one)
    near = monarch_pass.from_blocks(monarch_pass.project(monarch_pass.to_blocks(torch.randn(64, 64, generator=g), 4), 4))
    W = (near + 0.2 * torch.randn(64, 64, generator=g)) / 8.0
    layer = layer_of(W, "auto", {"lowrank:8": 20.0, "lowrank:16": 50.0, "monarch:4": 40.0, "monarch:8": 25.0})
    # the fit's errors after each sweep but the last, as the planner's would be
    target = monarch_pass.to_blocks(W, 4)
    Gd = damped(layer.stats.gram, monarch_pass.DAMPING).float()
    blocks = monarch_pass.project(target, 4)
    errors = []
    for _ in range(monarch_pass.SWEEPS - 1):
        blocks = monarch_pass.refine(target, blocks, Gd, 4, sweeps=1, tolerance=0.0)
        errors.append(relative_output_error(W, monarch_pass.from_blocks(blocks), layer.stats))
    # the first later sweep whose limit a rival can sit under while every earlier sweep is within its own
    step = next(k for k in range(2, len(errors) + 1)
                if errors[k - 1] / pipeline.abandon_margin(k) > max(errors[j - 1] / pipeline.abandon_margin(j) for j in range(1, k)))
    rival = layer.candidates[0]  # lowrank:8, faster, fitted already
    earlier = max(errors[j - 1] / pipeline.abandon_margin(j) for j in range(1, step))
    rival.predicted_error = 0.5 * (earlier + errors[step - 1] / pipeline.abandon_margin(step))
    layer.candidates[1].rejected_because = "not this test's"
    pipeline.approximate([layer], Options(error_budget=10.0))
    c = by_fmt(layer)
    why = c["monarch:4"].rejected_because
    names = {2: "two steps", 3: "three steps"}
    assert why is not None and why.startswith(f"dominated: after {names[step]} of its fit its error is "), why
    assert f"over {pipeline.abandon_margin(step):g}x the {100.0 * rival.predicted_error:.2f}% of lowrank:8" in why
    assert c["monarch:4"].predicted_error == pytest.approx(errors[step - 1], rel=1e-3)
