"""A textbook mixture of experts (a loop over an nn.ModuleList, each expert's tokens picked with
torch.where) breaks Dynamo's graph; each expert's layers are planned under their own names, and
the report says which experts no graph showed."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec


class Expert(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LoopMoE(nn.Module):
    def __init__(self, d: int = 64, h: int = 96, experts: int = 4, k: int = 2):
        super().__init__()
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(Expert(d, h) for _ in range(experts))
        self.k = k

    def forward(self, x):
        weights, index = torch.softmax(self.gate(x), dim=-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            out[token] += weights[token, slot, None] * expert(x[token])
        return out


def test_each_expert_a_graph_break_separates_is_planned_under_its_own_name_and_the_model_still_runs():
    torch.manual_seed(0)
    model = LoopMoE().eval()
    x = torch.randn(32, 64)
    torch._dynamo.reset()
    result = sparsec.optimize(model, (x,), fingerprint="cpu", plan={"layers": {"_default": "dense", "experts.2.w2": "2:4"}})
    names = {row["name"]: row["format"] for row in result.report.layers}
    assert {f"experts.{e}.{w}" for e in range(4) for w in ("w1", "w2", "w3")} <= set(names)
    assert names["experts.2.w2"] == "2:4" and names["experts.1.w2"] == "dense"
    assert not [w for w in result.report.warnings if "appear in no compiled graph" in w]
    with torch.no_grad():
        got, ref = result.module(x), model(x)
    assert not torch.equal(got, ref)  # expert 2's down projection runs as 2:4
    assert float((got - ref).norm() / ref.norm()) < 0.5


def test_experts_no_graph_showed_are_named():
    from sparsec.experts import banks_outside_graphs

    model = LoopMoE()
    report = {"layers": [{"name": f"experts.{e}.{w}"} for e in (0, 1) for w in ("w1", "w2", "w3")]}
    (warning,) = banks_outside_graphs(model, report)
    assert warning.startswith("experts experts.2, experts.3 of experts appear in no compiled graph")
