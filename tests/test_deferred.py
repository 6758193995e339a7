"""Multi-step fits (Monarch, block) wait until verification has measured how much error each
layer can carry, and stop where their first step is already over it."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

import sparsec
from sparsec import pipeline
from sparsec.passes.monarch import from_blocks


def planted_monarch(d: int, nb: int, seed: int) -> torch.Tensor:
    """A d x d weight whose every Monarch sub-block has rank d / nb^2: exactly monarch:nb."""
    g = torch.Generator().manual_seed(seed)
    n = p = d // nb
    r = d // (nb * nb)
    blocks = torch.randn(nb, nb, n, r, generator=g) @ torch.randn(nb, nb, r, p, generator=g) / d ** 0.5
    return from_blocks(blocks)


def mlp(weights: list[torch.Tensor]) -> nn.Sequential:
    mods = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        mods += [lin, nn.GELU()]
    return nn.Sequential(*mods[:-1])


def rows_of(result) -> dict[str, dict]:
    return {layer["name"]: layer for layer in result.report.layers}


def test_an_exact_monarch_layer_is_still_found_when_its_fit_waits_for_the_sensitivities(scenario_fp):
    g = torch.Generator().manual_seed(5)
    d = 256
    model = mlp([torch.randn(d, d, generator=g) / d ** 0.5, planted_monarch(d, 4, seed=6)])
    x = torch.randn(1024, d, generator=g)
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.01,
                              formats=["lowrank", "monarch"], lower=False, recovery="none")
    rows = list(rows_of(result).values())
    assert rows[1]["format"] == "monarch:4", rows[1]["reason"]
    assert rows[1]["predicted_error"] < 1e-4
    assert rows[0]["format"] == "dense"
    assert "deferred" in result.report["planning"]["timing"]["steps_s"]
    for row in rows:  # nothing is left waiting
        assert not any((c["rejected_because"] or "").startswith("deferred") for c in row["candidates"])


def test_a_fit_over_what_its_layer_can_carry_stops_after_its_first_step_naming_the_sensitivity(scenario_fp):
    g = torch.Generator().manual_seed(7)
    d = 256
    model = mlp([torch.randn(d, d, generator=g) / d ** 0.5 for _ in range(2)])
    x = torch.randn(1024, d, generator=g)
    budget = 0.01
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=budget,
                              formats=["lowrank", "monarch"], lower=False, recovery="none")
    stopped = 0
    for row in rows_of(result).values():
        assert row["format"] == "dense"
        for c in row["candidates"]:
            why = c["rejected_because"] or ""
            if c["format"].startswith("monarch") and why.startswith("over budget: after the first step"):
                stopped += 1
                assert "end-to-end sensitivity" in why and "measured" in why, why
                # full-rank Gaussian weights: Monarch keeps a small share of them, far over a 1% budget
                assert c["predicted_error"] > pipeline.ABANDON_MARGIN * budget
    assert stopped >= 2


def test_a_forced_layer_fits_its_format_whole_without_waiting(scenario_fp):
    g = torch.Generator().manual_seed(8)
    d = 256
    model = mlp([torch.randn(d, d, generator=g) / d ** 0.5 for _ in range(2)])
    x = torch.randn(1024, d, generator=g)
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.01, lower=False,
                              plan={"layers": {"_default": "monarch:4"}}, recovery="none")
    for row in rows_of(result).values():
        assert row["format"] == "monarch:4"
        assert math.isfinite(row["predicted_error"]) and 0.0 < row["predicted_error"] < 1.0


def test_a_fit_over_what_the_allocation_left_its_layer_stops_naming_that_budget(scenario_fp):
    g = torch.Generator().manual_seed(9)
    d = 256
    exact = torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g) / d ** 0.5  # lowrank:8 loses nothing
    model = mlp([exact, torch.randn(d, d, generator=g) / d ** 0.5])
    x = torch.randn(1024, d, generator=g)
    budget = 0.05
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=budget,
                              formats=["lowrank", "monarch"], lower=False, recovery="none")
    first, second = rows_of(result).values()
    assert first["format"] == "lowrank:8"
    assert second["format"] == "dense"
    # lowrank:8 spent nothing, so the second layer may take the whole budget and no more: a lossy
    # Monarch fit of a Gaussian layer is far over it after its first step, and stops there
    stopped = [c for c in second["candidates"] if (c["rejected_because"] or "").startswith(
        "over budget: after the first step") and "the budget the allocation left this layer" in c["rejected_because"]]
    assert stopped, [c["rejected_because"] for c in second["candidates"]]
    assert all(c["predicted_error"] > pipeline.ABANDON_MARGIN * budget for c in stopped)
