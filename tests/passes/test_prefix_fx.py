"""Evaluations that start from the dense graph's state kept before the first replaced layer."""

import torch
import torch.nn as nn

from sparsec.passes import prefix_fx
from sparsec.passes.fx_frontend import FxFrontend
from sparsec.passes.interpret_fx import SiteInterpreter


class Stack(nn.Module):
    """Residual blocks whose state between layers holds more than one tensor (the input is read again
    by every block), with an in-place op after each layer that would corrupt a shared kept state."""

    def __init__(self, width=16, blocks=5):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        h = x
        for layer in self.layers:
            y = layer(h)
            y.mul_(0.5)
            h = h + torch.tanh(y) + 0.1 * x
        return h


def frontend(calls=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = Stack().eval()
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.3
    data = [[torch.randn(6, 16, generator=gen)] for _ in range(calls)]
    fe = FxFrontend(torch.fx.symbolic_trace(model), data[0], data)
    sites, _ = fe.capture()
    fe.calibrate(sites)
    return fe, sites


def replacements_from(fe, names, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {n: fe.sites[n].weight + 0.05 * torch.randn(fe.sites[n].weight.shape, generator=gen) for n in names}


def test_an_evaluation_from_a_kept_state_equals_one_from_the_top():
    fe, sites = frontend()
    assert fe._prefixes is not None and fe._prefixes.cuts
    for names in (["layers.4"], ["layers.2", "layers.4"], ["layers.0"], ["layers.3"]):
        reps = replacements_from(fe, names)
        resumed = fe.evaluate(reps)
        kept, fe._prefixes = fe._prefixes, None
        whole = fe.evaluate(reps)
        fe._prefixes = kept
        assert resumed[0] > 0.0
        assert resumed[0] == whole[0], names
        assert resumed[1] == whole[1], names  # each replaced layer's own error too
    again = fe.evaluate(replacements_from(fe, ["layers.4"]))  # the in-place op did not touch the kept state
    assert again == fe.evaluate(replacements_from(fe, ["layers.4"]))


def test_the_layers_before_the_first_replaced_one_do_not_run(monkeypatch):
    fe, sites = frontend(calls=2)
    ran = []
    original = SiteInterpreter.run_node

    def counting(self, n):
        if n in self.by_node:
            ran.append(self.by_node[n].name)
        return original(self, n)

    monkeypatch.setattr(SiteInterpreter, "run_node", counting)
    fe.evaluate(replacements_from(fe, ["layers.3"]))
    assert ran == ["layers.3", "layers.4"] * 2
    ran.clear()
    fe.evaluate(replacements_from(fe, ["layers.3"]), heldout=False, calls=1)
    assert ran == ["layers.3", "layers.4"]
    ran.clear()
    fe.evaluate({})  # nothing replaced: the whole graph (the dense reference itself)
    assert ran == [f"layers.{i}" for i in range(5)] * 2


def test_the_kept_states_stay_within_their_byte_budget(monkeypatch):
    monkeypatch.setattr(prefix_fx, "BUDGET_BYTES", 0)
    fe, _ = frontend()
    assert fe._prefixes.cuts == [] and fe._prefixes.start(0, fe.nodes["layers.4"]) is None
    assert fe._prefixes.states == [{}, {}, {}]  # the one state that sized the rest was not kept either
    reps = replacements_from(fe, ["layers.4"])
    error = fe.evaluate(reps)[0]
    assert error > 0.0
    monkeypatch.setattr(prefix_fx, "BUDGET_BYTES", 1 << 30)
    fe, _ = frontend()
    states = fe._prefixes.states[0]
    assert len(states) == 4  # before every layer but the first
    first = states[fe.nodes["layers.1"]]
    per_state = sum(prefix_fx._nbytes(v) for n, v in first.items() if not prefix_fx._given(n))
    # the first state taken sizes the rest; room for two a call: two cuts are kept, the first and the last
    monkeypatch.setattr(prefix_fx, "BUDGET_BYTES", int(3 * 2 * per_state) + 1)
    fe, _ = frontend()
    assert [c.name for c in fe._prefixes.cuts] == [fe.nodes["layers.1"].name, fe.nodes["layers.4"].name]
    assert fe.evaluate(reps)[0] == error
