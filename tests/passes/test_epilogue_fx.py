"""The FX lowering folds the SiLU-gate and the residual add into the launch of the layer before
them, only where each intermediate has no other reader and the format fuses at that token count."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import sparsec
from sparsec.codegen import twofour
from fx_models import GatedMlp
from test_rewrite_fx_groups import planted_twofour, spy_on_rewrite

PLAN_24 = {"layers": {"_default": "2:4"}}


def called(gm) -> list:
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def optimize(model, x, monkeypatch, plan=PLAN_24, **kw):
    seen = spy_on_rewrite(monkeypatch)
    result = sparsec.optimize(model, x, fingerprint="cpu", plan=plan, **kw)
    return result, seen["gm"]


def test_gate_and_residual_fold_at_one_token_and_stay_exact(monkeypatch, caplog):
    gen = torch.Generator().manual_seed(0)
    model = planted_twofour(GatedMlp(64, 128), gen).eval()
    x = torch.randn(1, 64, generator=gen)
    with caplog.at_level(logging.INFO, logger="sparsec"):
        result, gm = optimize(model, x, monkeypatch)
    modules = called(gm)
    assert [type(m).__name__ for m in modules] == ["EpilogueLinear", "EpilogueLinear"]
    gated, residual = modules
    assert gated.epilogue.gated and not gated.epilogue.residual and gated.epilogue.width == 128
    assert residual.epilogue.residual and not residual.epilogue.gated
    assert not any(n.op == "call_function" and n.target in (F.silu, torch.mul) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
    log = result.report.to_dict()["planner_log"]
    assert any("gate, up: SiLU-multiply in the stacked launch's epilogue" in line for line in log)
    assert any("down: residual add in the launch's epilogue" in line for line in log)


def test_nothing_folds_where_the_format_does_not_fuse_at_that_token_count(monkeypatch):
    """2:4 fuses up to GEMV_MAX_M only (its word kernel); above, gate and up stay one group, sliced."""
    gen = torch.Generator().manual_seed(1)
    model = planted_twofour(GatedMlp(64, 128), gen).eval()
    x = torch.randn(twofour.GEMV_MAX_M + 1, 64, generator=gen)
    _, gm = optimize(model, x, monkeypatch)
    assert sorted(type(m).__name__ for m in called(gm)) == ["PackedGroup", "PackedLinear"]


class SharedGate(torch.nn.Module):
    """The SiLU of the gate is read twice: folding it would lose the second reader."""

    def __init__(self, d=64, h=128):
        super().__init__()
        self.gate = torch.nn.Linear(d, h, bias=False)
        self.up = torch.nn.Linear(d, h, bias=False)

    def forward(self, x):
        a = F.silu(self.gate(x))
        return a * self.up(x), a.sum()


class ScaledResidual(torch.nn.Module):
    """Residual adds the fold must leave: scaled (alpha), and broadcast from a vector (the two
    layers read different inputs, so each is a layer of its own, as a residual fold needs)."""

    def __init__(self, d=64):
        super().__init__()
        self.a = torch.nn.Linear(d, d, bias=False)
        self.b = torch.nn.Linear(d, d, bias=False)
        self.shift = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.add(x, self.a(x), alpha=0.5), self.b(torch.relu(x)) + self.shift


@pytest.mark.parametrize("model_cls,left", [(SharedGate, ["PackedGroup"]),
                                            (ScaledResidual, ["PackedLinear", "PackedLinear"])])
def test_patterns_with_another_reader_or_another_meaning_are_left(model_cls, left, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    model = model_cls().eval()
    x = torch.randn(1, 64, generator=gen)
    result, gm = optimize(model, x, monkeypatch, error_budget=0.99)
    assert sorted(type(m).__name__ for m in called(gm)) == left
    with torch.no_grad():
        for got, want in zip(result.module(x), model(x)):
            assert got.shape == want.shape and bool(torch.isfinite(got).all())


def test_packed_layers_read_their_input_row_major(monkeypatch):
    """Each packed call's input goes through ``contiguous`` (free under inductor, a no-op on rows)."""
    gen = torch.Generator().manual_seed(3)
    model = planted_twofour(GatedMlp(64, 128), gen).eval()
    _, gm = optimize(model, torch.randn(1, 64, generator=gen), monkeypatch)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert node.args[0].op == "call_method" and node.args[0].target == "contiguous"


def test_end_to_end_prediction_takes_the_folded_kernels_off_the_rest(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    model = planted_twofour(GatedMlp(64, 128), gen).eval()
    result, _ = optimize(model, torch.randn(1, 64, generator=gen), monkeypatch)
    report = result.report.to_dict()
    e2e, totals = report["end_to_end"], report["totals"]
    assert 0 < e2e["predicted_us_fused"] <= e2e["predicted_us_rest"]
    expected = ((totals["predicted_us_dense"] + e2e["predicted_us_rest"])
                / (totals["predicted_us"] - e2e["predicted_us_stacked"]
                   + e2e["predicted_us_rest"] - e2e["predicted_us_fused"]))
    assert e2e["predicted_speedup"] == pytest.approx(expected)
    unfused, _ = optimize(model, torch.randn(twofour.GEMV_MAX_M + 1, 64, generator=gen), monkeypatch)
    assert unfused.report.to_dict()["end_to_end"]["predicted_us_fused"] == 0.0
