"""A textbook mixture of experts (a loop over an nn.ModuleList, each expert's tokens picked with
torch.where) breaks Dynamo's graph; the report says which experts no graph showed by name."""

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


def test_the_experts_a_graph_break_hides_are_named_and_the_model_still_runs():
    torch.manual_seed(0)
    model = LoopMoE().eval()
    x = torch.randn(32, 64)
    torch._dynamo.reset()
    result = sparsec.optimize(model, (x,), fingerprint="cpu", plan={"layers": {"_default": "dense"}})
    (warning,) = [w for w in result.report.warnings if "appear in no compiled graph" in w]
    assert warning.startswith("experts experts.0, experts.1, experts.2, experts.3 of experts")
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x))
