"""The planner's bounded cache of approximations: least recently used first, bounded by the memory free."""

from __future__ import annotations

import warnings

import pytest
import torch

from sparsec import pipeline

MB = 2 ** 20


def one_mb(seed: int) -> torch.Tensor:
    return torch.randn(MB // 4, generator=torch.Generator().manual_seed(seed))  # float32


def test_the_least_recently_used_entry_goes_first(monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_MB", "3")
    cache = pipeline._BoundedCache()
    for key in "abc":
        cache.put(key, one_mb(ord(key)))
    cache.get_recent("a")
    cache.put("d", one_mb(4))
    assert list(cache) == ["c", "a", "d"] and cache.held == 3 * MB


@pytest.mark.parametrize("free_mb, bound_mb", [(100_000, 4000), (8000, 2000), (4000, 1500), (0, 1500)])
def test_the_bound_grows_with_the_memory_free_beside_the_weights(monkeypatch, free_mb, bound_mb):
    # 1000 MB of weights: 1.5x of them always, up to 4x where a quarter of the free memory holds it
    monkeypatch.delenv("SPARSEC_CACHE_MB", raising=False)
    monkeypatch.setattr(pipeline, "free_memory_bytes", lambda device: free_mb * MB)
    cache = pipeline._BoundedCache()
    cache.reserve(1000 * MB, torch.device("cpu"))
    assert cache.limit() == bound_mb * MB
    cache.reserve(1000 * MB)  # no device named: nothing to ask
    assert cache.limit() == 1500 * MB


@pytest.mark.parametrize("fails", [False, True])
def test_planning_lets_go_of_what_it_held_beyond_the_resting_bound(monkeypatch, scenario_fp, fails):
    # the working set may reach a quarter of a GPU's free memory while a graph is planned; once it is
    # planned (or planning broke), only the resting bound may stay held, here nothing at all
    import torch.nn as nn

    import sparsec

    monkeypatch.delenv("SPARSEC_CACHE_MB", raising=False)
    monkeypatch.setattr(pipeline._BoundedCache, "BASE", 0)
    monkeypatch.setattr(pipeline, "_APPROXIMATIONS", pipeline._BoundedCache())
    held = []
    put = pipeline._APPROXIMATIONS.put
    monkeypatch.setattr(pipeline._APPROXIMATIONS, "put", lambda key, t: put(key, t) or held.append(
        pipeline._APPROXIMATIONS.held))
    if fails:
        def broken(*args, **kwargs):
            raise RuntimeError("planted failure after the fits")
        monkeypatch.setattr(pipeline, "select", broken)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
    x = torch.randn(256, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.05, formats=["lowrank", "2:4"])
    assert held and max(held) > 0  # the fits were held while planning
    assert pipeline._APPROXIMATIONS.held == 0 and not pipeline._APPROXIMATIONS
    assert pipeline._APPROXIMATIONS.floor == 0
    assert any("planted failure" in str(w.message) for w in caught) == fails
