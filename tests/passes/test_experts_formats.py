"""Structured experts within the error budget: the fits (exact on planted low-rank, 2:4 and
block-sparse experts), the decision (the fastest form that measures faster and fits the budget; refused with
the reason when none does), and the lowered graph running the form's op."""

from __future__ import annotations

import json
import re
import types

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.codegen.experts import experts_loop
from sparsec.passes import experts_fx
from sparsec.passes import experts_block, experts_lowrank, experts_twofour
from sparsec.passes.experts_lowrank import FRACTIONS, fit, rank_of

H, I, E, PLANTED = 32, 48, 8, 8


def planted_bank(gen, rank: int | None | str = PLANTED):
    """(gate_up, down) of E experts, each projection exactly of rank ``rank``, exactly 2:4 where
    ``rank`` is "2:4", or keeping exactly a quarter of its 16 x 16 blocks where it is "block" (None:
    dense, full rank)."""
    def weight(N, K):
        if rank == "block":
            nr, nc = N // 16, K // 16
            kept = max(1, round(0.25 * nr * nc))
            mask = torch.zeros(E, nr * nc)
            mask.scatter_(1, torch.rand(E, nr * nc, generator=gen).argsort(-1)[:, :kept], 1.0)
            mask = mask.reshape(E, nr, nc).repeat_interleave(16, 1).repeat_interleave(16, 2)
            return mask * torch.randn(E, N, K, generator=gen) / (K * 0.25) ** 0.5
        if rank == "2:4":
            dense = torch.randn(E, N, K // 4, 4, generator=gen) / (K / 2) ** 0.5
            keep = torch.rand(E, N, K // 4, 4, generator=gen).argsort(-1)[..., :2]
            return torch.zeros_like(dense).scatter_(3, keep, dense.gather(3, keep)).reshape(E, N, K)
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
    options.setdefault("plan", {"layers": {"_default": "dense"}})
    return sparsec.optimize(model, batches(1, 99)[0], calibration=batches(4, 1), fingerprint="cpu", **options)


@pytest.fixture(autouse=True)
def _measured_here(monkeypatch):
    """The shipped cpu fingerprint names one machine; these tests time the forms on whichever runs
    them (the one test of another device's fingerprint sets its own answer)."""
    monkeypatch.setattr(experts_fx, "_other_device", lambda fingerprint, x: None)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def speeds(monkeypatch, **us):
    """Each form's time (by its label's first word: lowrank, 2:4, block) against 2.0 us for the bank as it runs
    (timing is the benchmark's job); forms not named take 3.0 us."""
    def speed(bank, rewrite, impls, replay):
        return us.get(re.match(r"2:4|[a-z]+", rewrite.label).group().replace(":", "_"), 3.0), "grouped", 2.0
    monkeypatch.setattr(experts_fx, "structured_speed", speed)


@pytest.fixture
def faster(monkeypatch):
    """Low-rank experts run in half the time, 2:4 ones are no faster."""
    speeds(monkeypatch, lowrank=1.0)


def routed(T, gen):
    weights, index = torch.softmax(torch.randn(T, E, generator=gen), -1).topk(2, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def assert_runs_the_bank(rewrite, gate_up, down, gen):
    """``rewrite`` computes the bank (gate_up, down) on fresh tokens in every implementation (float32
    accumulation either way: rounding only)."""
    fresh = torch.randn(30, H, generator=gen)
    index, weights = routed(30, gen)
    want = experts_loop(fresh, index, weights, gate_up, down)
    for impl in ("loop", "batched", "dense_all", "grouped"):
        torch.testing.assert_close(rewrite.run(fresh, index, weights, impl), want, rtol=1e-4, atol=1e-5)


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
    assert_runs_the_bank(factoring, gate_up, down, gen)


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
    entry = row["expert_format"]
    assert entry["format"] == "lowrank 16/16" and entry["implementation"] == "grouped"
    assert entry["measured_error"] < 1e-5 and "experts run lowrank 16/16 (lowrank 0.25 of break-even)" in entry["reason"]
    assert [t["format"] for t in entry["tried"]] == ["lowrank 0.25 of break-even", "lowrank 0.5 of break-even", "2:4",
                                                     "block 0.25 of blocks", "block 0.5 of blocks"]
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
    assert any("experts_swiglu_lowrank" in t for t in seen)  # the form's own op in place of the bank
    assert not any(t.startswith("sparsec.experts_swiglu.") for t in seen)


def test_factoring_over_the_budget_is_refused_with_the_measured_error(faster):
    model = MoE(rank=None)
    result = optimize(model, error_budget=0.001)
    (row,) = result.report.to_dict()["experts"]
    entry = row["expert_format"]
    assert entry["format"] is None and "over the" in entry["reason"]
    lowrank = [t for t in entry["tried"] if t["format"].startswith("lowrank")]
    assert len(lowrank) == len(FRACTIONS) and all(t["measured_error"] > entry["allowed_error"] for t in lowrank)
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_bank_no_form_makes_faster_stays_dense(monkeypatch):
    speeds(monkeypatch)
    for module in (experts_lowrank, experts_twofour, experts_block):  # timed on stand-ins: no form is fitted
        monkeypatch.setattr(module, "fit", lambda *a, **k: pytest.fail("a form no bank gains from was fitted"))
    (row,) = optimize(MoE(), error_budget=0.01).report.to_dict()["experts"]
    entry = row["expert_format"]
    assert entry["format"] is None and "no structured form measured faster" in entry["reason"]
    assert all(t["measured_error"] is None for t in entry["tried"])  # never evaluated: nothing to gain


def test_planted_two_four_experts_fit_exactly_in_every_implementation(gen):
    gate_up, down = planted_bank(gen, "2:4")
    x = torch.randn(40, H, generator=gen)
    index, weights = routed(40, gen)
    bank = types.SimpleNamespace(gate_up=gate_up, down=down, inputs=(x, index, weights), pruning=None)
    sparse = experts_twofour.fit(bank)
    assert sparse.gate_up_values.shape == (E, 2 * I, H // 2) and sparse.stored() < (gate_up.numel() + down.numel()) * 0.6
    assert_runs_the_bank(sparse, gate_up, down, gen)


def test_the_fastest_form_within_the_budget_is_chosen_and_a_faster_one_over_it_is_not(monkeypatch):
    speeds(monkeypatch, lowrank=0.5, **{"2_4": 1.0})  # low rank fastest, but lossy on 2:4 experts
    model = MoE(rank="2:4")
    result = optimize(model, error_budget=0.01)
    (row,) = result.report.to_dict()["experts"]
    entry = row["expert_format"]
    assert entry["format"] == "2:4" and entry["measured_error"] < 1e-5
    lowrank = [t for t in entry["tried"] if t["format"].startswith("lowrank")]
    assert min(t["measured_error"] for t in lowrank) > entry["allowed_error"]  # tried first, over the budget
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_fingerprint_of_another_device_factors_nothing_and_says_why(faster, monkeypatch):
    monkeypatch.setattr(experts_fx, "_other_device", lambda fingerprint, x: "it describes NVIDIA H200")
    (row,) = optimize(MoE(), error_budget=0.01).report.to_dict()["experts"]
    assert row["expert_format"]["format"] is None and "another device" in row["expert_format"]["reason"]


def test_the_speed_of_a_structured_bank_is_measured_on_its_calibration_routing(gen):
    from sparsec.passes.experts_fx import structured_speed

    gate_up, down = planted_bank(gen)
    x = torch.randn(16, H, generator=gen)
    index, weights = routed(16, gen)
    node = types.SimpleNamespace(args=(None,) * 5 + ("grouped",))
    bank = types.SimpleNamespace(gate_up=gate_up, down=down, inputs=(x, index, weights), pruning=None, node=node,
                                 timings={})
    us, impl, now = structured_speed(bank, fit(bank, FRACTIONS[0]), ["batched", "grouped"], False)
    assert us > 0 and now > 0 and impl in ("batched", "grouped")


def test_a_plan_pins_a_banks_form_whatever_it_measures_and_the_result_replays_it(monkeypatch):
    speeds(monkeypatch, **{"2_4": 9.0})  # slower than dense: the plan's word stands, the reason says so
    model = MoE(rank="2:4")
    result = sparsec.optimize(model, batches(1, 99)[0], calibration=batches(4, 1), fingerprint="cpu",
                              plan={"layers": {"_default": "dense"}, "experts": {"_default": "2:4"}}, expert_pruning=0)
    (row,) = result.report.to_dict()["experts"]
    entry = row["expert_format"]
    assert entry["format"] == "2:4" and entry["forced_by"] == "plan"
    assert "as the plan asks" in entry["reason"] and entry["reason"].endswith("slower")
    assert result.plan.experts == {row["name"]: "2:4"}
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)  # planted 2:4: lossless


def test_a_plan_can_keep_a_bank_dense_while_sparsec_would_rewrite_it(faster):
    result = optimize(MoE(), error_budget=0.01, plan={"layers": {"_default": "dense"}, "experts": {"re:.*": "dense"}})
    entry = result.report.to_dict()["experts"][0]["expert_format"]
    assert entry["format"] is None and entry["reason"] == "experts kept dense: the plan asks for dense"


def test_a_plan_naming_a_bank_the_model_lacks_is_refused_with_the_nearest_names():
    from sparsec.errors import PlanError

    with pytest.raises(PlanError, match=r"'experts gate_upp' \(nearest: gate_up\) matches no layer"):
        optimize(MoE(), plan={"layers": {"_default": "dense"}, "experts": {"gate_upp": "2:4"}})


@pytest.mark.parametrize("form", ["lowrank:1.5", "lowrank:0", "block:48:0.25", "block:64:1", "sparse"])
def test_a_form_no_bank_takes_is_refused_naming_the_forms(form):
    from sparsec.errors import PlanError
    from sparsec.plan import Plan

    with pytest.raises(PlanError, match="is not a form of expert bank; use dense, 2:4, lowrank:F"):
        Plan.from_dict({"layers": {}, "experts": {"_default": form}})


def test_bank_entries_resolve_by_name_then_pattern_then_default_and_round_trip():
    from sparsec.plan import Plan

    plan = Plan.from_dict({"layers": {}, "experts": {"a.experts": "2:4", "re:b\\..*": "lowrank:0.25", "_default": "dense"}})
    assert [plan.resolve_bank(n) for n in ("a.experts", "b.experts", "c.experts")] == ["2:4", "lowrank:0.25", "dense"]
    assert Plan.from_dict(json.loads(plan.to_json())).experts == plan.experts
    assert Plan.from_dict({"layers": {}}).resolve_bank("a.experts") == "auto"


def test_a_bank_the_models_root_holds_is_named_after_its_weight_and_not_reported_missing(faster):
    result = optimize(MoE(), error_budget=0.01)
    (row,) = result.report.to_dict()["experts"]
    assert row["name"] == "gate_up"
    assert not [w for w in result.report.warnings if "ran outside the compiled graphs" in w]


def test_planted_block_sparse_experts_fit_exactly_in_every_implementation_including_an_idle_expert(gen):
    gate_up, down = planted_bank(gen, "block")
    x = torch.randn(40, H, generator=gen)
    index, weights = routed(40, gen)
    index[index == 3] = 2  # expert 3 gets no token: its largest blocks are kept
    bank = types.SimpleNamespace(gate_up=gate_up, down=down, inputs=(x, index, weights), pruning=None)
    sparse = experts_block.fit(bank, 0.25)
    assert sparse.form == "block:16:0.25" and sparse.gate_up_values.shape == (E, 3, 16, 16)
    assert sparse.stored() == E * (3 + 2) * 16 * 16  # gate_up keeps 3 of 12 blocks, down 2 of 6 (round(1.5))
    assert_runs_the_bank(sparse, gate_up, down, gen)


def test_block_sides_tile_both_projections_at_least_two_by_two():
    assert experts_block.side_for(4096, 14336) == 64
    assert experts_block.side_for(32, 48) == 16      # 32 is one block of 32 high
    assert experts_block.side_for(40, 48) is None    # 40 is no multiple of 16


def test_a_plan_pins_block_sparse_experts_and_the_planted_bank_runs_losslessly():
    model = MoE(rank="block")
    result = sparsec.optimize(model, batches(1, 99)[0], calibration=batches(4, 1), fingerprint="cpu",
                              plan={"layers": {"_default": "dense"}, "experts": {"_default": "block:16:0.25"}},
                              expert_pruning=0)
    (row,) = result.report.to_dict()["experts"]
    entry = row["expert_format"]
    assert entry["format"] == "block:16:0.25" and entry["forced_by"] == "plan"
    assert result.plan.experts == {row["name"]: "block:16:0.25"}
    x = batches(1, 5)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_block_side_that_does_not_tile_the_bank_is_refused_naming_the_shape():
    from sparsec.errors import SparsecError

    with pytest.raises(SparsecError, match=r"2 x 2 blocks of side 64; the bank is H=32, I=48"):
        sparsec.optimize(MoE(rank="block"), batches(1, 99)[0], calibration=batches(4, 1), fingerprint="cpu",
                         plan={"layers": {"_default": "dense"}, "experts": {"_default": "block:64:0.25"}},
                         expert_pruning=0)


def test_block_sparse_experts_are_chosen_when_fastest_within_the_budget(monkeypatch):
    speeds(monkeypatch, lowrank=1.5, block=1.0)  # block fastest; low rank is lossy on these experts
    model = MoE(rank="block")
    result = optimize(model, error_budget=0.01)
    (row,) = result.report.to_dict()["experts"]
    entry = row["expert_format"]
    assert entry["format"] == "block:16:0.25" and entry["measured_error"] < 1e-5
    assert "experts run block:16:0.25 (block 0.25 of blocks)" in entry["reason"]


@pytest.mark.parametrize("form", experts_lowrank.candidates() + experts_twofour.candidates()
                         + experts_block.candidates(), ids=lambda f: f.label)
def test_a_forms_timing_stand_in_has_its_fits_shapes_and_structure_and_no_zeros(form, gen):
    gate_up, down = planted_bank(gen, None)
    x = torch.randn(40, H, generator=gen)
    index, weights = routed(40, gen)
    bank = types.SimpleNamespace(gate_up=gate_up.half(), down=down.half(), inputs=(x, index, weights), pruning=None)
    fitted, standin = form.fit(bank), form.standin(bank)
    assert standin.label == fitted.label and standin.stored() == fitted.stored()
    for name, t in fitted.tensors().items():
        s = standin.tensors()[name]
        assert (s.shape, s.dtype) == (t.shape, t.dtype), name
        if s.is_floating_point():
            assert bool((s != 0).all()) and s.abs().max() < 10, name
    if hasattr(standin, "down_row_ptr"):  # every expert keeps the fit's number of blocks per projection
        assert torch.equal(standin.down_row_ptr[:, -1], fitted.down_row_ptr[:, -1])


def test_sparse_experts_are_also_timed_row_by_row_at_a_few_rows_per_expert_and_run_so_when_fastest(monkeypatch):
    from sparsec.codegen import experts as ex

    timed = {}

    def speed(bank, rewrite, impls, replay):
        timed[rewrite.label.split()[0]] = list(impls)
        return (1.0, "rows", 2.0) if "rows" in impls else (3.0, "grouped", 2.0)
    monkeypatch.setattr(experts_fx, "structured_speed", speed)
    optimize(MoE(rank="2:4"), error_budget=0.01)
    assert not any("rows" in impls for impls in timed.values())  # its kernels cannot run here: never timed
    monkeypatch.setattr(ex, "rows_usable", lambda x, gate_up, down: True)  # as on a GPU
    monkeypatch.setitem(ex._RUN, "rows", ex.experts_grouped)  # no GPU here to run its kernels
    timed.clear()
    model = MoE(rank="2:4")
    # 32 tokens, top-2 over 8 experts: 8 rows an expert, within ROWS_MAX_PER_EXPERT
    result = sparsec.optimize(model, batches(1, 99, 32)[0], calibration=batches(4, 1, 32), fingerprint="cpu",
                              error_budget=0.01, plan={"layers": {"_default": "dense"}})
    assert all("rows" in timed[form] for form in ("2:4", "block:16:0.25", "lowrank"))
    (row,) = result.report.to_dict()["experts"]
    assert (row["expert_format"]["format"], row["expert_format"]["implementation"]) == ("2:4", "rows")
    x = batches(1, 5, 32)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-4, atol=1e-5)
    timed.clear()
    optimize(MoE(rank="2:4"), error_budget=0.01)  # 128 tokens: 32 rows an expert, past it
    assert "rows" not in timed["2:4"]


def test_factored_experts_are_also_timed_through_torchs_grouped_gemm_and_sparse_ones_are_not(monkeypatch):
    from sparsec.codegen import experts as ex

    timed = {}

    def speed(bank, rewrite, impls, replay):
        timed[rewrite.label.split()[0]] = list(impls)
        return (3.0, "grouped", 2.0)
    monkeypatch.setattr(experts_fx, "structured_speed", speed)
    monkeypatch.setattr(ex, "grouped_mm_usable", lambda x, gate_up, down: True)  # a torch that has one
    optimize(MoE(rank="2:4"), error_budget=0.01)
    assert "grouped_mm" in timed["lowrank"]
    assert "grouped_mm" not in timed["2:4"] and "grouped_mm" not in timed["block:16:0.25"]
    monkeypatch.setattr(ex, "grouped_mm_usable", lambda x, gate_up, down: False)  # one that has none
    timed.clear()
    optimize(MoE(rank="2:4"), error_budget=0.01)
    assert not any("grouped_mm" in impls for impls in timed.values())


def test_a_form_that_runs_in_no_implementation_here_never_measures_faster(gen):
    from sparsec.passes.experts_fx import structured_speed

    x = torch.randn(16, H, generator=gen)
    index, weights = routed(16, gen)
    node = types.SimpleNamespace(args=(None,) * 5 + ("grouped",))
    bank = types.SimpleNamespace(inputs=(x, index, weights), pruning=None, node=node, timings={"grouped": 5.0})

    def run(*args):
        raise RuntimeError("out of resources")

    us, impl, now = structured_speed(bank, types.SimpleNamespace(run=run), ["batched", "grouped"], False)
    assert us == float("inf") and impl == "batched" and now == 5.0


def test_each_form_says_whether_the_rows_kernels_can_read_it(gen, monkeypatch):
    from sparsec.codegen import experts as ex

    monkeypatch.setattr(ex, "triton_usable", lambda x: True)  # as on a GPU
    x = torch.randn(4, H, generator=gen).half()
    index, weights = routed(4, gen)

    def bank_of(rank):
        gate_up, down = planted_bank(gen, rank)
        return types.SimpleNamespace(gate_up=gate_up.half(), down=down.half(), inputs=(x, index, weights), pruning=None)

    assert experts_block.standin(bank_of("block"), 0.25).rows_runs(x)
    assert experts_lowrank.standin(bank_of(None), FRACTIONS[0]).rows_runs(x)
    # down's 48 inputs are no whole number of the word kernel's 32-column words
    assert not experts_twofour.standin(bank_of("2:4")).rows_runs(x)
    assert not experts_block.standin(bank_of("block"), 0.25).rows_runs(x.float())  # 16-bit inputs only
