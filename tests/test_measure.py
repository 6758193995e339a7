"""``measure: True``: what is timed against what."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec import measure
from sparsec.passes.fx_frontend import FxFrontend


def test_an_all_dense_plan_is_not_compiled_a_second_time_to_time_dense(scenario_fp, monkeypatch):
    # nothing rewritten: the lowered graph is the dense graph, so its one timing is both sides
    def no_twin(*args):
        raise AssertionError("a dense twin was compiled for a graph with nothing rewritten")

    monkeypatch.setattr(FxFrontend, "original", no_twin)
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))  # random: nothing fits 0.1%
    result = sparsec.optimize(model, (torch.randn(32, 128),), fingerprint=scenario_fp(), error_budget=0.001,
                              formats=["lowrank"], measure=True)
    assert [l["format"] for l in result.report.layers] == ["dense", "dense"]
    e2e = result.report.end_to_end
    assert e2e["measured_speedup"] == 1.0 and e2e["measured_us"] == e2e["measured_us_dense"] > 0


def rank8_layer() -> tuple[nn.Module, torch.Tensor]:
    """One 256x256 layer of exactly rank 8 (low rank fits it losslessly), and an input."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(256, 8) @ torch.randn(8, 256) / 8)
    return model, torch.randn(256, 256)


def test_a_rewritten_graph_is_timed_against_its_dense_self(scenario_fp, monkeypatch):
    twins = []
    real = FxFrontend.original

    def counted(self):
        twins.append(1)
        return real(self)

    monkeypatch.setattr(FxFrontend, "original", counted)
    monkeypatch.setattr(measure, "time_graph", lambda lowered, dense, inputs: (20.0, 10.0))
    # the layer's own timing decides whether the rewrite stays; fixed here so that what is under
    # test (the graph timed against its dense twin) does not hang on this machine's speed
    monkeypatch.setattr(measure, "time_layer", lambda layer, cand, options, rotation=None: (10.0, 5.0))
    model, x = rank8_layer()
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.01, formats=["lowrank"],
                              measure=True)
    assert result.report.layers[0]["format"].startswith("lowrank:")
    assert twins == [1]
    e2e = result.report.end_to_end
    assert e2e["measured_speedup"] == pytest.approx(2.0) and e2e["measured_us_dense"] == 20.0


def test_a_rewritten_graph_that_times_slower_end_to_end_runs_dense_saying_why(scenario_fp, monkeypatch):
    monkeypatch.setattr(measure, "time_layer", lambda layer, cand, options, rotation=None: (10.0, 5.0))
    monkeypatch.setattr(measure, "time_graph", lambda lowered, dense, inputs: (10.0, 20.0))
    model, x = rank8_layer()
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.01, formats=["lowrank"],
                              measure=True)
    layer = result.report.layers[0]
    assert layer["format"] == "dense" and "was planned, but the rewritten model measured 0.50x" in layer["reason"]
    assert result.plan.layers == {layer["name"]: "dense"}
    assert any("measured 0.50x of the original end to end, slower" in w for w in result.report.warnings)
    e2e = result.report.end_to_end
    assert e2e["kept_dense_measured_speedup"] == 0.5 and e2e["measured_error"] == 0.0
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))  # the dense graph, exactly


def test_a_forced_rewrite_that_times_slower_end_to_end_is_kept_with_the_figure(scenario_fp, monkeypatch):
    monkeypatch.setattr(measure, "time_layer", lambda layer, cand, options, rotation=None: (10.0, 5.0))
    monkeypatch.setattr(measure, "time_graph", lambda lowered, dense, inputs: (10.0, 20.0))
    model, x = rank8_layer()
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.5,
                              plan={"layers": {"_default": "lowrank:8"}}, measure=True)
    layer = result.report.layers[0]
    assert layer["format"] == "lowrank:8"
    assert any("measured 0.50x of the original end to end, slower; kept because the plan forces 1 of its 1" in w
               for w in result.report.warnings)
    assert "kept_dense_measured_speedup" not in result.report.end_to_end
    assert result.report.end_to_end["measured_speedup"] == pytest.approx(0.5)


def test_each_layer_timing_call_reads_its_own_weight_copy(monkeypatch):
    # a weight read again and again by one call after another sits in the L2 and times faster than a
    # model's forward reads it: the calls must cycle through copies past the L2, sparse and dense alike
    from types import SimpleNamespace

    from sparsec import codegen
    from sparsec.formats import parse_spec

    torch.manual_seed(15)
    w = torch.randn(64, 128)
    site = SimpleNamespace(weight=w, bias=None, dtype=torch.float32, N=64, K=128)
    layer = SimpleNamespace(site=site, tokens=2)
    spec = parse_spec("2:4")
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    pruned = (groups * keep).reshape(w.shape)  # exactly 2:4
    cand = SimpleNamespace(spec=spec, weight=lambda: pruned, impl="auto")
    seen = {"dense": [], "packed": []}
    real_linear = codegen.linear

    def spy_linear(x, p, b=None, impl="auto"):
        seen["packed"].append(p)
        return real_linear(x, p, b, impl)

    def spy_f_linear(x, weight, bias=None):
        seen["dense"].append(weight)
        return torch.nn.functional.linear(x, weight, bias)

    monkeypatch.setattr(codegen, "linear", spy_linear)
    monkeypatch.setattr(measure, "F", SimpleNamespace(linear=spy_f_linear))
    monkeypatch.setattr(measure, "_time", lambda clock, calls, graph_mode, lead=False: [c() for c in calls] and 1.0)
    # on a CPU the two sides alternate in rounds: one round here, each call once
    monkeypatch.setattr(measure, "interleaved", lambda runs, **kw: SimpleNamespace(us=[r() and 1.0 for r in runs]))
    measure.time_layer(layer, cand, SimpleNamespace(mode="default"))

    dense_ptrs = {t.data_ptr() for t in seen["dense"]}
    packed_ptrs = {p.tensors()["values"].data_ptr() for p in seen["packed"]}
    assert len(dense_ptrs) == len(seen["dense"]) == measure.MAX_COPIES  # 32 KB a copy: the cap
    assert len(packed_ptrs) == len(seen["packed"]) == measure.MAX_COPIES
    assert all(torch.equal(t, w) for t in seen["dense"])
    first = seen["packed"][0].to_dense()
    assert all(torch.equal(p.to_dense(), first) for p in seen["packed"])

    # a model whose weights all fit the cache reads them from it in its forward: so do the calls
    seen["dense"].clear()
    model_bytes = measure.rotation_for([site, site])  # two such layers: 64 KB
    assert model_bytes == 2 * 64 * 128 * 4
    measure.time_layer(layer, cand, SimpleNamespace(mode="default"), model_bytes)
    assert len(seen["dense"]) == 2  # 32 KB of weight and 1 KB of input a call: two calls make 64 KB


def test_the_rotation_is_the_models_weight_bytes_up_to_its_cap():
    from types import SimpleNamespace

    big = SimpleNamespace(N=14336, K=4096, dtype=torch.bfloat16)
    small = SimpleNamespace(N=384, K=384, dtype=torch.float16)
    assert measure.rotation_for([small] * 36) == 36 * 384 * 384 * 2
    assert measure.rotation_for([big] * 8) == measure.ROTATION_BYTES


def test_a_whole_graph_on_a_cpu_is_timed_against_its_dense_twin_in_alternation():
    # two graphs of known cost: the ratio comes out right and the right way round, each side its
    # fastest interleaved round
    import time as _time

    calls = []

    def slow(*args):
        calls.append("dense")
        _time.sleep(0.004)

    def fast(*args):
        calls.append("lowered")
        _time.sleep(0.002)

    dense_us, us = measure.time_graph(fast, slow, (torch.zeros(1),))
    assert 1.5 < dense_us / us < 2.5, (dense_us, us)
    firsts = [calls[i] for i in range(len(calls) - 1) if calls[i] != calls[i + 1]]
    assert len(firsts) >= 8  # alternated round after round, not one graph's samples then the other's
    only_us = measure.time_graph(fast, None, (torch.zeros(1),))
    assert only_us[0] == only_us[1] and 1500 < only_us[0] < 4000
