"""Dropping rarely routed experts within the error budget: the routing rewrite, the decision (taken
when the budget allows, refused with the reason when it does not, when calibration is too thin to
call an expert rare, or when the bank runs no faster without them), and the lowered graph."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.codegen.experts import experts_loop, route_kept
from sparsec.errors import OptionError
from sparsec.passes import experts_fx
from sparsec.passes.experts_prune import Pruning, pairs_needed, rare_experts

RARE = [6, 7]


class RoutedMoE(nn.Module):
    """A linear layer, a top-2 router over 8 SwiGLU experts (``sparsec::experts_swiglu``) and a
    linear layer; the router's bias sends experts 6 and 7 about 1.5% of the (token, expert) pairs."""

    def __init__(self, H: int = 32, I: int = 48, E: int = 8, bias: float = -0.5):
        super().__init__()
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        self.inp, self.out = nn.Linear(H, H), nn.Linear(H, H)
        self.router = nn.Linear(H, E)
        with torch.no_grad():
            self.router.bias.zero_()
            self.router.bias[RARE] = bias
        self.gate_up = nn.Parameter(torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5)
        self.down = nn.Parameter(torch.randn(E, H, I, generator=gen) / I ** 0.5)

    def forward(self, x):
        h = self.inp(x).reshape(-1, x.shape[-1])
        weights, index = torch.softmax(self.router(h), -1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        y = torch.ops.sparsec.experts_swiglu(h, index, weights, self.gate_up, self.down, "grouped")
        return self.out(y.reshape(x.shape))


def batches(n: int, seed: int, tokens: int = 128):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, tokens // 2, 32, generator=gen),) for _ in range(n)]


DENSE = {"layers": {"_default": "dense"}}


@pytest.fixture(autouse=True)
def structured_no_faster(monkeypatch):
    """Structured experts (passes/experts_formats.py) measure no faster: these tests see pruning alone."""
    monkeypatch.setattr(experts_fx, "structured_speed", lambda bank, rewrite, impls, replay: (2.0, "grouped", 1.0))


@pytest.fixture
def faster(monkeypatch):
    """The bank without its rare experts runs in half the time (timing is the benchmark's job)."""
    monkeypatch.setattr(experts_fx, "pruned_speed", lambda bank, pruning, *a, **k: (1.0, 2.0, "measured"))


def optimize(model, **options):
    options.setdefault("plan", DENSE)
    return sparsec.optimize(model, batches(1, 99)[0], calibration=batches(8, 1), fingerprint="cpu", **options)


def test_route_kept_renormalises_each_token_over_the_experts_it_keeps():
    index = torch.tensor([[0, 6], [6, 7], [2, 3]])
    weights = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.5, 0.5]])
    remap = torch.tensor([0, 1, 2, 3, 4, 5, -1, -1])
    new_index, new_weights = route_kept(index, weights, remap)
    assert new_weights.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.5, 0.5]]
    assert new_index[0].tolist() == [0, 0] and new_index[2].tolist() == [2, 3]
    assert int(new_index.min()) >= 0 and int(new_index.max()) < 6  # every slot names a kept expert


@pytest.mark.parametrize("impl", ["loop", "batched", "dense_all", "grouped"])
def test_a_pruned_bank_computes_each_token_through_its_kept_experts(impl):
    gen = torch.Generator().manual_seed(3)
    E, I, H, T = 8, 24, 16, 40
    gate_up, down = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    x = torch.randn(T, H, generator=gen)
    index = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, 2, generator=gen), -1)
    pruning = Pruning.of(gate_up, down, set(RARE))
    got = pruning.run(x, index, weights, impl)
    want = torch.zeros(T, H)
    for t in range(T):
        kept = [(int(e), float(w)) for e, w in zip(index[t], weights[t]) if int(e) not in RARE]
        total = sum(kept_w for _, kept_w in kept)
        for e, w in kept:
            one = experts_loop(x[t:t + 1], torch.tensor([[e]]), torch.tensor([[w / total]]), gate_up, down)
            want[t] += one[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 accumulation either way


def test_only_experts_rare_with_confidence_are_candidates():
    counts = torch.tensor([300, 290, 310, 305, 295, 280, 10, 0])
    assert [e for _, e in rare_experts(counts, top_k=2)] == [7, 6]
    assert rare_experts(torch.tensor([15, 15, 15, 15, 15, 15, 0, 0]), top_k=2) == []  # 90 pairs: 0 seen is not rare
    assert pairs_needed(8) == 97


def test_rare_experts_are_dropped_when_the_budget_allows_and_the_lowered_bank_keeps_the_rest(faster):
    model = RoutedMoE()
    result = optimize(model, error_budget=0.2, expert_pruning=1.0)
    (row,) = result.report.to_dict()["experts"]
    pruning = row["pruning"]
    assert pruning["dropped"] == RARE, pruning
    assert 0 < pruning["measured_error"] <= pruning["allowed_error"] == pytest.approx(0.2)
    assert all(pruning["routing_share"][e] < 0.25 / 8 for e in RARE)
    assert pruning["weights_saved_bytes"] == 2 * (3 * 48 * 32) * 4
    assert "dropped experts [6, 7]" in pruning["reason"]
    end = result.report.to_dict()["end_to_end"]
    assert end["measured_error"] == pytest.approx(pruning["measured_error"], rel=1e-6)  # no layer changed
    # the module runs the kept experts, the dropped ones' tokens reweighted to the others
    x = batches(1, 5)[0][0]
    pruned = Pruning.of(model.gate_up.detach(), model.down.detach(), set(RARE))
    with torch.no_grad():
        h = model.inp(x).reshape(-1, 32)
        weights, index = torch.softmax(model.router(h), -1).topk(2, dim=-1)
        want = model.out(pruned.run(h, index, weights / weights.sum(-1, keepdim=True), "loop").reshape(x.shape))
        torch.testing.assert_close(result.module(x), want, rtol=1e-4, atol=1e-5)


def test_pruning_is_refused_with_the_measured_error_when_the_budget_does_not_allow_it(faster):
    model = RoutedMoE()
    result = optimize(model, error_budget=1e-4, expert_pruning=1.0)
    (row,) = result.report.to_dict()["experts"]
    pruning = row["pruning"]
    assert pruning["dropped"] == [] and "over the" in pruning["reason"]
    assert "[7, 6]" in pruning["reason"] or "[6, 7]" in pruning["reason"]
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_too_little_calibration_drops_nothing_and_says_how_much_is_needed(faster):
    result = sparsec.optimize(RoutedMoE(), batches(1, 99)[0], calibration=batches(2, 1, tokens=16),
                              fingerprint="cpu", plan=DENSE, error_budget=0.5, expert_pruning=1.0)
    reason = result.report.to_dict()["experts"][0]["pruning"]["reason"]
    assert "64 (token, expert) pairs, too few" in reason and "at least 97" in reason


def test_a_bank_no_faster_without_its_rare_experts_keeps_them(monkeypatch):
    monkeypatch.setattr(experts_fx, "pruned_speed", lambda bank, pruning, *a, **k: (2.0, 2.0, "measured"))
    (row,) = optimize(RoutedMoE(), error_budget=0.2, expert_pruning=1.0).report.to_dict()["experts"]
    assert row["pruning"]["dropped"] == [] and "no faster" in row["pruning"]["reason"]


def test_a_zero_share_never_drops_an_expert():
    (row,) = optimize(RoutedMoE(), error_budget=0.2, expert_pruning=0).report.to_dict()["experts"]
    assert row["pruning"]["dropped"] == [] and "expert_pruning is 0" in row["pruning"]["reason"]


def captured_bank(model):
    captured = []

    def backend(gm, inputs):
        captured.append((gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*batches(1, 2)[0])
    gm, inputs = captured[0]
    (bank,), _ = experts_fx.find_banks(gm, inputs)
    experts_fx.record(gm, [bank], [inputs])
    return gm, inputs, bank


def test_the_speed_of_a_pruned_bank_is_measured_on_its_calibration_routing():
    _, _, bank = captured_bank(RoutedMoE())
    after, now, how = experts_fx.pruned_speed(bank, Pruning.of(bank.gate_up, bank.down, set(RARE)), False)
    assert after > 0 and now > 0 and how == "measured"


def test_the_lowered_graph_holds_only_the_kept_experts_and_reroutes_their_tokens():
    gm, inputs, bank = captured_bank(RoutedMoE())
    pruning = Pruning.of(bank.gate_up, bank.down, set(RARE))
    lowered = experts_fx.apply_pruning(gm, {bank.node.name: pruning})
    shapes = {tuple(b.shape) for _, b in lowered.named_buffers()}
    assert (6, 96, 32) in shapes and (6, 32, 48) in shapes
    from sparsec.passes.interpret_fx import SiteInterpreter

    with torch.no_grad():
        want = SiteInterpreter(gm, {}, {}, banks={bank.node: pruning}).run(*inputs)
        torch.testing.assert_close(lowered(*inputs), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(gm(*inputs)[0], want[0], atol=1e-4)  # the dropped experts mattered


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_expert_pruning_outside_zero_to_one_is_refused(bad):
    with pytest.raises(OptionError, match="expert_pruning"):
        sparsec.optimize(RoutedMoE(), batches(1, 99)[0], expert_pruning=bad)


def test_calibration_of_other_shapes_counts_and_checks_the_pruned_banks_in_their_own_graphs(faster):
    calibration = batches(4, 1) + batches(4, 2, tokens=64)  # two token counts: two traced graphs
    result = sparsec.optimize(RoutedMoE(), batches(1, 99)[0], calibration=calibration, fingerprint="cpu", plan=DENSE,
                              error_budget=0.2, expert_pruning=1.0)
    report = result.report.to_dict()
    (row,) = report["experts"]
    assert sum(row["tokens_per_expert"]) == 2 * (4 * 128 + 4 * 64) and row["calibration_calls"] == 8
    assert row["pruning"]["dropped"] == RARE
    assert report["end_to_end"]["measured_error"] == pytest.approx(row["pruning"]["measured_error"], rel=1e-6)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor compiles C++ on the CPU: no C++ compiler here")
def test_a_pruned_bank_running_inline_is_timed_compiled_with_its_routing(monkeypatch):
    """A bank running ``inline`` is timed compiled by inductor; without its rare experts it must be
    timed the same way (routing included, as the lowered graph holds both), not eagerly against the
    compiled bank, which no pruning could ever beat."""
    _, _, bank = captured_bank(RoutedMoE())
    x, idx, wts = bank.inputs
    bank.inputs = x, idx, wts = x.bfloat16(), idx, wts.bfloat16()  # torch's grouped GEMM takes bf16
    pruning = Pruning.of(bank.gate_up.bfloat16(), bank.down.bfloat16(), set(RARE))
    compiled = []
    real = experts_fx.compiled_inline

    def counted(*args):
        compiled.append(len(args))
        return real(*args)

    monkeypatch.setattr(experts_fx, "compiled_inline", counted)
    bank.node.args = (*bank.node.args[:5], "inline")
    bank.timings["inline"] = 1.0
    after, now, how = experts_fx.pruned_speed(bank, pruning, False)
    assert how == "measured" and after > 0 and now == 1.0
    assert 6 in compiled  # the routing's remap went into the compiled function
    with torch.no_grad():
        got = experts_fx.pruned_call(pruning, x, idx, wts, "inline")()
        want = pruning.run(x, idx, wts, "loop")
    # bf16 products, float32 accumulation both ways: a few units of bf16's last place
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    index, _ = route_kept(idx, wts, pruning.remap)
    assert int(index.max()) < len(pruning.keep)
