"""Sequential recovery (option ``recovery``): rewrites refitted block after block to the inputs
they receive once earlier blocks run their rewrites."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.errors import OptionError


class Stack(nn.Module):
    """Three blocks of one linear layer each, with a nonlinearity between them."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.up, self.down = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class ResidualStack(nn.Module):
    """Three residual blocks of two stages each (up, then down on what up made)."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(MLP(d) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def correlated(rows: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, 1, d)
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed + 1)) @ mix / d ** 0.5


def plan(recovery: str, fmt: str = "lowrank:16", rows: int = 256, model_class=Stack):
    torch.manual_seed(3)
    model = model_class().eval()
    calib = [(correlated(rows, 64, seed=10 + i),) for i in range(4)]
    held = [(correlated(256, 64, seed=50 + i),) for i in range(2)]
    result = sparsec.optimize(model, calib[0], fingerprint="cpu", calibration=calib, heldout=held,
                              plan={"layers": {"_default": fmt}}, recovery=recovery, lower=False)
    return result.report.to_dict()


def test_recovery_refits_later_blocks_to_the_inputs_they_receive_and_lowers_the_error():
    one_shot, recovered = plan("none"), plan("sequential")
    assert all("recovery" not in layer for layer in one_shot["layers"])
    first, *later = recovered["layers"]
    # the first block's inputs are the model's: the same statistics, the same fit, the same error
    assert first["recovery"]["one_shot_error"] == pytest.approx(first["predicted_error"], rel=1e-6)
    assert first["recovery"]["recovered_error"] == first["recovery"]["one_shot_error"]
    for layer in later:
        r = layer["recovery"]
        # its inputs changed upstream: the one-shot fit's error on them is not its planned one
        assert r["one_shot_error"] != pytest.approx(layer["predicted_error"], rel=1e-3)
        assert r["recovered_error"] <= r["one_shot_error"]  # never worse than one shot
    assert any(l["recovery"]["recovered_error"] < 0.95 * l["recovery"]["one_shot_error"] for l in later)
    assert recovered["end_to_end"]["measured_error"] < one_shot["end_to_end"]["measured_error"]
    assert recovered["end_to_end"]["heldout_error"] <= one_shot["end_to_end"]["heldout_error"]
    summary = recovered["planning"]["recovery"]
    assert summary["mode"] == "sequential" and summary["passes"] == 3
    assert summary["refit"] + summary["kept_one_shot"] == 3 and summary["refit"] >= 1
    assert "recover" in recovered["planning"]["timing"]["steps_s"]


def test_a_blocks_stages_are_the_inputs_its_layers_read_in_graph_order():
    from types import SimpleNamespace

    from sparsec.candidates import Layer
    from sparsec.recovery import blocks_in_order, stages_of

    layers = [Layer(site=SimpleNamespace(name=name, input_key=key), stats=None, dense=None,
                    chosen=SimpleNamespace(is_dense=False))
              for name, key in [("b.3.q", "n1"), ("b.3.k", "n1"), ("b.3.o", "attn"), ("b.3.gate", "n2"),
                                ("b.3.up", "n2"), ("b.3.down", "act"), ("b.4.q", "n3")]]
    blocks = blocks_in_order(layers)
    assert [[l.name for l in b] for b in blocks] == [[l.name for l in layers[:6]], ["b.4.q"]]
    assert [[l.name for l in s] for s in stages_of(blocks[0])] == [["b.3.q", "b.3.k"], ["b.3.o"], ["b.3.gate", "b.3.up"],
                                                                   ["b.3.down"]]


def test_sequential_recovery_visits_a_blocks_stages_in_order():
    recovered = plan("sequential", model_class=ResidualStack)
    summary = recovered["planning"]["recovery"]
    assert summary["passes"] == 6  # one per stage: up, then down on the refitted up's outputs
    assert summary["refit"] + summary["kept_one_shot"] == 6


@pytest.fixture
def local_refits_only(monkeypatch):
    """``full`` without its distillation: what the local refits alone do (tests/test_distill.py has the rest)."""
    import sparsec.distill

    monkeypatch.setattr(sparsec.distill, "EPOCHS", 0)


@pytest.mark.parametrize("fmt", ["lowrank:16", "2:4", "block:16:0.5", "2:4+lowrank:8"])
def test_full_recovery_lets_a_later_stage_make_up_for_an_earlier_one_and_beats_sequential(fmt, local_refits_only):
    one_shot = plan("none", fmt, model_class=ResidualStack)
    sequential, full = plan("sequential", fmt, model_class=ResidualStack), plan("full", fmt, model_class=ResidualStack)
    for layer in full["layers"]:
        assert layer["recovery"]["recovered_error"] <= layer["recovery"]["one_shot_error"]  # never worse
    first = {l["name"]: l for l in full["layers"]}["blocks.0.up"]
    # nothing runs before it: the model's own inputs, the sequential target, no gain on one shot
    assert first["recovery"]["one_shot_error"] == pytest.approx(first["predicted_error"], rel=1e-6)
    # each down projection also makes up for what its block's rewritten up projection changed
    assert full["end_to_end"]["measured_error"] < sequential["end_to_end"]["measured_error"]
    assert full["end_to_end"]["measured_error"] < 0.95 * one_shot["end_to_end"]["measured_error"]
    assert full["end_to_end"]["heldout_error"] < one_shot["end_to_end"]["heldout_error"]
    assert full["planning"]["recovery"]["passes"] == 9  # a reference pass for each down projection


def test_full_recovery_with_few_rows_per_input_refits_sequentially_and_says_so(local_refits_only):
    # 4 x 16 rows for 64 inputs: a target that makes up for upstream changes would be chased along
    # directions 64 rows barely span
    sequential = plan("sequential", rows=16, model_class=ResidualStack)
    full = plan("full", rows=16, model_class=ResidualStack)
    assert full["planning"]["recovery"]["sequential_only"] == 3  # the down projections
    assert full["planning"]["recovery"]["passes"] == 6  # and no reference pass for them
    assert [l["recovery"] for l in full["layers"]] == [l["recovery"] for l in sequential["layers"]]
    assert any("3 layer(s) saw fewer than 2 calibration rows per input" in w and "make up for" in w for w in full["warnings"])


def test_recovery_is_refused_by_name_when_unknown():
    with pytest.raises(OptionError, match="option 'recovery' must be one of 'none', 'sequential', 'full'; got 'full-ish'"):
        sparsec.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), recovery="full-ish")


def test_the_onnx_entry_recovers_too(tmp_path):
    pytest.importorskip("onnxruntime")
    np = pytest.importorskip("numpy")
    from sparsec.onnx_entry import optimize_onnx

    torch.manual_seed(3)
    model = ResidualStack().eval()
    path = tmp_path / "stack.onnx"
    torch.onnx.export(model, (correlated(8, 64, seed=1),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "rows"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=np.stack([correlated(256, 64, seed=10 + i).numpy() for i in range(4)]))
    np.savez(tmp_path / "held.npz", x=np.stack([correlated(256, 64, seed=50 + i).numpy() for i in range(2)]))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text('{"schema": "sparsec.plan/1", "layers": {"_default": "lowrank:16"}}')
    reports = {}
    for recovery in ("none", "full"):
        result = optimize_onnx(path, tmp_path / f"{recovery}.onnx", fingerprint="ort-cpu", plan=plan_file,
                               calibration=tmp_path / "calib.npz", heldout=tmp_path / "held.npz", recovery=recovery)
        reports[recovery] = result.report.to_dict()
    none, full = reports["none"], reports["full"]
    assert "recovery" not in none["planning"]
    summary = full["planning"]["recovery"]
    assert summary["mode"] == "full" and summary["passes"] == 9 and summary["refit"] >= 3
    assert full["end_to_end"]["measured_error"] < 0.95 * none["end_to_end"]["measured_error"]
    assert full["end_to_end"]["heldout_error"] < none["end_to_end"]["heldout_error"]
    assert not any("cannot yet gather statistics" in w for w in full["warnings"])


def auto(recovery: str, budget: float, formats=("2:4",), fingerprint=None):
    """The automatic plan of ResidualStack under ``budget`` on a scenario fingerprint, held-out data
    binding too."""
    torch.manual_seed(3)
    model = ResidualStack().eval()
    calib = [(correlated(256, 64, seed=10 + i),) for i in range(4)]
    held = [(correlated(256, 64, seed=50 + i),) for i in range(2)]
    result = sparsec.optimize(model, calib[0], fingerprint=fingerprint, calibration=calib, heldout=held,
                              error_budget=budget, formats=list(formats), recovery=recovery, lower=False)
    return result.report.to_dict()


def rewritten(report) -> list[str]:
    return [layer["name"] for layer in report["layers"] if layer["format"] != "dense"]


def test_the_planner_spends_what_recovery_saves_and_stays_within_the_budget(monkeypatch, scenario_fp):
    import sparsec.pipeline as pipeline

    budget, fp = 0.1, scenario_fp()
    monkeypatch.setattr(pipeline, "REPLAN_ROUNDS", 0)
    one_shot = auto("none", budget, fingerprint=fp)
    recovered_only = auto("full", budget, fingerprint=fp)
    monkeypatch.undo()
    spent = auto("full", budget, fingerprint=fp)
    # recovery alone keeps the one-shot plan and lowers its error below what the budget allows
    assert rewritten(recovered_only) == rewritten(one_shot)
    worst = max(recovered_only["end_to_end"]["measured_error"], recovered_only["end_to_end"]["heldout_error"])
    assert worst < 0.9 * budget
    # spending the saving rewrites more layers, predicted faster, still within the budget on both data sets
    assert set(rewritten(spent)) > set(rewritten(one_shot))
    assert spent["end_to_end"]["predicted_speedup"] > recovered_only["end_to_end"]["predicted_speedup"]
    assert max(spent["end_to_end"]["measured_error"], spent["end_to_end"]["heldout_error"]) <= budget
    replans = spent["planning"]["replans"]
    kept = [r for r in replans if r["kept"]]
    assert kept and kept[-1]["one_shot_budget"] > budget and kept[-1]["one_shot_error"] > budget
    assert kept[-1]["error"] <= budget
    assert any("re-planned at a one-shot budget" in line for line in spent["planner_log"])
    # every evaluation is counted against the step that ran it, re-planning's own among them
    by_step = spent["planning"]["evaluations_by_step"]
    assert sum(n["calibration"] for n in by_step.values()) == spent["planning"]["model_evaluations"]
    assert sum(n["heldout"] for n in by_step.values()) == spent["planning"]["heldout_evaluations"]
    assert by_step["verify"]["calibration"] > 0 and by_step["replan"]["calibration"] > 0
    # the report's recovery is the kept plan's, its passes counted over every plan recovered
    summary = spent["planning"]["recovery"]
    assert summary["refit"] + summary["kept_one_shot"] == len(rewritten(spent))
    assert summary["passes"] > recovered_only["planning"]["recovery"]["passes"]
    # without recovery the plan is made again only for what the allocation left, which here is
    # too little to buy a rewrite: the one-shot plan stands
    monkeypatch.setattr(pipeline, "REPLAN_ROUNDS", 2)
    assert rewritten(auto("none", budget, fingerprint=fp)) == rewritten(one_shot)
    # every layer kept reports its recovered fit, and none left dense carries one
    for layer in spent["layers"]:
        assert ("recovery" in layer) == (layer["format"] != "dense")


def test_a_replan_over_the_budget_is_not_kept_and_the_plan_before_stands_unchanged(monkeypatch, scenario_fp):
    import sparsec.pipeline as pipeline

    budget, fp = 0.05, scenario_fp()
    monkeypatch.setattr(pipeline, "REPLAN_ROUNDS", 0)
    before = auto("full", budget, fingerprint=fp)
    monkeypatch.setattr(pipeline, "REPLAN_ROUNDS", 1)
    monkeypatch.setattr(pipeline, "stretched_budget", lambda planned_at, recovered, budget: 4 * budget)
    after = auto("full", budget, fingerprint=fp)
    (row,) = after["planning"]["replans"]
    assert not row["kept"] and row["error"] > budget
    assert [l["format"] for l in after["layers"]] == [l["format"] for l in before["layers"]]
    for a, b in zip(after["layers"], before["layers"]):
        assert a.get("recovery") == b.get("recovery") and a["measured_error"] == b["measured_error"]
    for key in ("measured_error", "heldout_error", "predicted_speedup"):
        assert after["end_to_end"][key] == before["end_to_end"][key]


def test_a_plan_recovery_cannot_improve_is_not_planned_again(scenario_fp):
    report = auto("full", 0.1, formats=("lowrank",), fingerprint=scenario_fp())  # low rank: recovery saves almost nothing here
    assert "replans" not in report["planning"]


def test_without_recovery_a_plan_that_left_budget_is_made_again_to_spend_it(monkeypatch, scenario_fp):
    import sparsec.pipeline as pipeline

    budget, fp = 0.12, scenario_fp()
    monkeypatch.setattr(pipeline, "REPLAN_ROUNDS", 0)
    first = auto("none", budget, formats=("lowrank",), fingerprint=fp)
    monkeypatch.undo()
    again = auto("none", budget, formats=("lowrank",), fingerprint=fp)
    kept = [r for r in again["planning"]["replans"] if r["kept"]]
    assert kept and kept[-1]["one_shot_budget"] > budget >= kept[-1]["error"]
    assert again["end_to_end"]["predicted_speedup"] > first["end_to_end"]["predicted_speedup"]
    assert max(again["end_to_end"]["measured_error"], again["end_to_end"]["heldout_error"]) <= budget
    assert "recovery" not in again["planning"]


def test_a_plan_whose_every_layer_takes_its_fastest_candidate_is_not_made_again(scenario_fp):
    report = auto("none", 0.2, fingerprint=scenario_fp())  # every layer 2:4, the only format allowed
    assert {layer["format"] for layer in report["layers"]} == {"2:4"}
    assert "replans" not in report["planning"]
