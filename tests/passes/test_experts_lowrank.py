"""Factoring a bank's experts to low rank within the error budget: the fit (exact on planted
low-rank experts), the decision (taken when it measures faster and the budget allows, refused
with the reason when either fails), and the lowered graph running the factored op."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.codegen.experts import experts_loop
from sparsec.passes import experts_fx
from sparsec.passes.experts_lowrank import FRACTIONS, fit, rank_of

H, I, E, PLANTED = 32, 48, 8, 8


def planted_bank(gen, rank: int | None = PLANTED):
    """(gate_up, down) of E experts, each projection exactly of rank ``rank`` (None: full rank)."""
    def weight(N, K):
        if rank is None:
            return torch.randn(E, N, K, generator=gen) / K ** 0.5
        return torch.randn(E, N, rank, generator=gen) @ torch.randn(E, rank, K, generator=gen) / (rank * K) ** 0.5
    return weight(2 * I, H), weight(H, I)


class MoE(nn.Module):
    """A linear layer, a top-2 router over 8 SwiGLU experts (``sparsec::experts_swiglu``), a linear layer."""

    def __init__(self, rank: int | None = PLANTED):
        super().__init__()
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        self.inp, self.out, self.router = nn.Linear(H, H), nn.Linear(H, H), nn.Linear(H, E)
        gate_up, down = planted_bank(gen, rank)
        self.gate_up, self.down = nn.Parameter(gate_up), nn.Parameter(down)

    def forward(self, x):
        h = self.inp(x).reshape(-1, x.shape[-1])
        weights, index = torch.softmax(self.router(h), -1).topk(2, dim=-1)
        y = torch.ops.sparsec.experts_swiglu(h, index, weights / weights.sum(-1, keepdim=True),
                                             self.gate_up, self.down, "grouped")
        return self.out(y.reshape(x.shape))


def batches(n: int, seed: int, tokens: int = 128):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens // 2, H, generator=gen),) for _ in range(n)]


def optimize(model, **options):
    return sparsec.optimize(model, batches(1, 99)[0], calibration=batches(4, 1), fingerprint="cpu",
                            plan={"layers": {"_default": "dense"}}, **options)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def faster(monkeypatch):
    """The factored bank runs in half the time (timing is the benchmark's job)."""
    monkeypatch.setattr(experts_fx, "factored_speed", lambda bank, factoring, impls, replay: (1.0, "grouped", 2.0))


def routed(T, gen):
    weights, index = torch.softmax(torch.randn(T, E, generator=gen), -1).topk(2, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def test_ranks_are_a_share_of_the_break_even_rank_in_whole_tiles():
    assert rank_of(0.25, 14336 * 2, 4096) == 896   # 0.25 * 28672 * 4096 / 32768 = 896
    assert rank_of(0.5, 4096, 14336) == 1584       # 0.5 * 3185.8 = 1592.9 -> 99 tiles of 16
    assert rank_of(0.25, 96, 32) == 16             # never under one tile
    assert rank_of(0.5, 8, 8) == 7                 # never the full rank


def test_planted_low_rank_experts_are_factored_exactly_including_an_expert_no_token_reached(gen):
    gate_up, down = planted_bank(gen)
    x = torch.randn(40, H, generator=gen)
    index, weights = routed(40, gen)
    index[index == 5] = 4  # expert 5 gets no token: fitted on its weights alone
    bank = types.SimpleNamespace(gate_up=gate_up, down=down, inputs=(x, index, weights), pruning=None)
    factoring = fit(bank, FRACTIONS[0])
    assert factoring.ranks == (16, 16) and factoring.gate_up_v.shape == (E, 16, H)
    assert factoring.stored() < gate_up.numel() + down.numel()
    fresh = torch.randn(30, H, generator=gen)
    index, weights = routed(30, gen)
    want = experts_loop(fresh, index, weights, gate_up, down)
    for impl in ("loop", "batched", "dense_all", "grouped"):
        torch.testing.assert_close(factoring.run(fresh, index, weights, impl), want, rtol=1e-4, atol=1e-5)


def test_a_full_rank_bank_factored_loses_accuracy(gen):
    gate_up, down = planted_bank(gen, rank=None)
    x = torch.randn(64, H, generator=gen)
    index, weights = routed(64, gen)
    bank = types.SimpleNamespace(gate_up=gate_up, down=down, inputs=(x, index, weights), pruning=None)
    got = fit(bank, FRACTIONS[0]).run(x, index, weights, "loop")
    want = experts_loop(x, index, weights, gate_up, down)
    assert float((got - want).norm() / want.norm()) > 0.1


def test_planted_low_rank_experts_are_factored_when_faster_and_the_model_runs_them(faster):
    model = MoE()
    result = optimize(model, error_budget=0.01)
    (row,) = result.report.to_dict()["experts"]
    entry = row["factoring"]
    assert entry["factored"] and entry["ranks"] == [16, 16] and entry["rank_share"] == FRACTIONS[0]
    assert entry["measured_error"] < 1e-5 and "experts factored to ranks 16 (gate_up) and 16 (down)" in entry["reason"]
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_the_lowered_graph_runs_the_factored_op(faster):
    seen = []
    apply = experts_fx.apply_pruning

    def spy(gm, pruned):
        out = apply(gm, pruned)
        seen.extend(str(n.target) for n in out.graph.nodes if n.op == "call_function")
        return out

    experts_fx.apply_pruning = spy
    try:
        optimize(MoE(), error_budget=0.01)
    finally:
        experts_fx.apply_pruning = apply
    assert any("experts_swiglu_lowrank" in t for t in seen)
    assert not any(t.startswith("sparsec.experts_swiglu.") for t in seen)


def test_factoring_over_the_budget_is_refused_with_the_measured_error(faster):
    model = MoE(rank=None)
    result = optimize(model, error_budget=0.001)
    (row,) = result.report.to_dict()["experts"]
    entry = row["factoring"]
    assert not entry["factored"] and "over the" in entry["reason"]
    assert [t["rank_share"] for t in entry["tried"]] == list(FRACTIONS)
    assert all(t["measured_error"] > entry["allowed_error"] for t in entry["tried"])
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_factored_bank_no_faster_is_not_factored(monkeypatch):
    monkeypatch.setattr(experts_fx, "factored_speed", lambda bank, factoring, impls, replay: (3.0, "grouped", 2.0))
    (row,) = optimize(MoE(), error_budget=0.01).report.to_dict()["experts"]
    entry = row["factoring"]
    assert not entry["factored"] and "no faster" in entry["reason"]
    assert all(t["measured_error"] is None for t in entry["tried"])  # never evaluated: nothing to gain


def test_a_fingerprint_of_another_device_factors_nothing_and_says_why(faster, monkeypatch):
    monkeypatch.setattr(experts_fx, "_other_device", lambda fingerprint, x: "it describes NVIDIA H200")
    (row,) = optimize(MoE(), error_budget=0.01).report.to_dict()["experts"]
    assert not row["factoring"]["factored"] and "another device" in row["factoring"]["reason"]


def test_the_factored_speed_is_measured_on_the_banks_calibration_routing(gen):
    from sparsec.passes.experts_fx import factored_speed

    gate_up, down = planted_bank(gen)
    x = torch.randn(16, H, generator=gen)
    index, weights = routed(16, gen)
    node = types.SimpleNamespace(args=(None,) * 5 + ("grouped",))
    bank = types.SimpleNamespace(gate_up=gate_up, down=down, inputs=(x, index, weights), pruning=None, node=node,
                                 timings={})
    us, impl, now = factored_speed(bank, fit(bank, FRACTIONS[0]), ["batched", "grouped"], False)
    assert us > 0 and now > 0 and impl in ("batched", "grouped")
