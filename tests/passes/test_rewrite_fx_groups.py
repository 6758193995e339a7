"""Sites that read the same input are lowered as one launch over their stacked weights."""

from __future__ import annotations

import logging

import torch

import sparsec
from fx_models import GatedMlp
from sparsec.codegen import PackedGroup, PackedLinear


def planted_twofour(model, gen):
    with torch.no_grad():
        for lin in (model.gate, model.up, model.down):
            N, K = lin.weight.shape
            w = torch.randn(N, K // 4, 4, generator=gen)
            drop = torch.rand(N, K // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
            lin.weight.copy_(w.scatter(2, drop, 0.0).reshape(N, K) / K ** 0.5)
    return model


def spy_on_rewrite(monkeypatch) -> dict:
    """What the FX lowering hands ``rewrite`` and the graph it gets back."""
    from sparsec.passes import rewrite_fx

    seen = {}
    real = rewrite_fx.rewrite

    def spy(gm, nodes, sites, modules, **kwargs):
        seen["modules"] = dict(modules)
        seen["gm"] = real(gm, nodes, sites, modules, **kwargs)
        return seen["gm"]

    monkeypatch.setattr(rewrite_fx, "rewrite", spy)
    return seen


def test_gate_and_up_run_as_one_group_and_stay_exact(caplog, monkeypatch):
    """Planted 2:4 weights, forced 2:4: gate and up become one group (one launch, stacked rows,
    sliced per layer), down stays its own layer, and the output equals the dense model's."""
    gen = torch.Generator().manual_seed(0)
    model = planted_twofour(GatedMlp(64, 128), gen).eval()
    x = torch.randn(6, 64, generator=gen)
    seen = spy_on_rewrite(monkeypatch)
    with caplog.at_level(logging.INFO, logger="sparsec"):
        result = sparsec.optimize(model, x, fingerprint="cpu", plan={"layers": {"_default": "2:4"}})
    gm = seen["gm"]
    called = [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert sorted(c.__name__ for c in called) == ["PackedGroup", "PackedLinear"]
    group = next(gm.get_submodule(n.target) for n in gm.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PackedGroup))
    assert group.sizes == (128, 128) and isinstance(group.linear, PackedLinear)
    assert any("gate" in r.getMessage() and "one launch" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), atol=1e-5, rtol=1e-5)
    assert [l["format"] for l in result.report.layers] == ["2:4", "2:4", "2:4"]
    assert any("gate, up: one launch over their stacked 2:4 weights (256 x 64" in line
               for line in result.report.to_dict()["planner_log"])


def test_layers_with_different_settings_are_not_grouped(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    model = planted_twofour(GatedMlp(64, 128), gen).eval()
    x = torch.randn(6, 64, generator=gen)
    seen = spy_on_rewrite(monkeypatch)
    sparsec.optimize(model, x, fingerprint="cpu", error_budget=0.9,
                     plan={"layers": {"gate": "2:4", "up": "block:16:0.5", "down": "2:4"}})
    assert all(isinstance(m, PackedLinear) for m in seen["modules"].values())


def test_block_layers_are_stacked_only_at_the_token_counts_where_that_was_measured_to_pay(monkeypatch):
    """Block stacks at M <= block.GEMV_MAX_M (one GEMV launch), not above (measured slower)."""
    from sparsec.codegen import GroupMember, block

    for M, grouped in ((block.GEMV_MAX_M, True), (block.GEMV_MAX_M + 4, False)):
        model = GatedMlp(64, 128).eval()
        seen = spy_on_rewrite(monkeypatch)
        sparsec.optimize(model, torch.randn(M, 64), fingerprint="cpu", error_budget=0.99,
                         plan={"layers": {"_default": "block:16:0.5"}})
        kinds = {name: isinstance(m, GroupMember) for name, m in seen["modules"].items()}
        assert kinds == {"gate": grouped, "up": grouped, "down": False}, M
