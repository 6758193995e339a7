"""act:S through the planner: calibrated thresholds, predicted against measured error, the report,
the automatic choice where a fingerprint says it pays, and the ONNX path's refusal."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsec
from sparsec.errors import OptionError


class ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(128, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 128, generator=gen),) for _ in range(n)]


def masked_reference(model, x, thresholds):
    h = x
    for name, lin, act in (("fc1", model.fc1, torch.relu), ("fc2", model.fc2, None)):
        t = thresholds[name]
        h = nn.functional.linear(torch.where(h.abs() >= t, h, torch.zeros_like(h)), lin.weight, lin.bias)
        h = act(h) if act else h
    return h


def test_forced_act_runs_the_masked_layers_with_calibrated_thresholds(tmp_path):
    torch.manual_seed(0)
    model = ReluMLP().eval()
    calib = data(64, 1)
    # one-shot: the thresholds as calibrated on the dense model's inputs, the weights untouched
    out = sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", plan={"layers": {"_default": "act:0.4"}},
                           recovery="none", report=str(tmp_path / "r.json"))
    rep = json.loads((tmp_path / "r.json").read_text())
    layers = {l["name"]: l for l in rep["layers"]}
    assert {l["format"] for l in layers.values()} == {"act:0.4"}
    thresholds = {}
    for name, l in layers.items():
        cal = l["calibrated"]
        thresholds[name] = cal["threshold"]
        # fc2 reads a ReLU: half its inputs are exactly zero, so 0.4 of them fall under any positive threshold
        assert cal["skipped_on_calibration"] == pytest.approx(0.4, abs=0.02) if name == "fc1" else cal["skipped_on_calibration"] >= 0.4
        assert l["predicted_error"] == pytest.approx(l["measured_error"], rel=0.15, abs=1e-6)
    assert thresholds["fc1"] > 0.1 and 0.0 < thresholds["fc2"] < 1e-3
    x = torch.randn(4, 128)
    with torch.no_grad():
        got = out.module(x)
        ref = masked_reference(model, x, thresholds)
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_the_automatic_plan_takes_act_where_the_fingerprint_says_it_pays_and_the_budget_allows(tmp_path):
    """A fingerprint in which act runs at a third of dense: the layer after the ReLU skips only
    zeros (lossless) and is rewritten at a budget of 0.1%; the first layer, whose inputs are
    Gaussian, would cost far more and stays dense, saying so."""
    from sparsec import fingerprints

    doc = json.loads(fingerprints.shipped_path("cpu").read_text())
    for e in doc["kernels"]["act"]:
        dense = [d["us"] for d in doc["kernels"]["dense"] if (d["M"], d["N"], d["K"], d["dtype"], d["mode"])
                 == (e["M"], e["N"], e["K"], e["dtype"], e["mode"])]
        e["us"] = dense[0] / 3.0 if dense else e["us"]
    fp = tmp_path / "fast-act.json"
    fp.write_text(json.dumps({**doc, "name": "fast-act"}))
    torch.manual_seed(0)
    model = ReluMLP().eval()
    calib = data(64, 2)
    out = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=str(fp), error_budget=0.001,
                           formats=["act"], report=str(tmp_path / "r.json"))
    layers = {l["name"]: l for l in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert layers["fc2"]["format"].startswith("act:")
    assert layers["fc2"]["measured_error"] < 1e-6
    assert layers["fc1"]["format"] == "dense"
    assert any("over budget" in (c["rejected_because"] or "") or "budget" in layers["fc1"]["reason"]
               for c in layers["fc1"]["candidates"])
    assert out.report.to_dict()["end_to_end"]["measured_error"] <= 0.001


def test_the_onnx_path_refuses_act_naming_why(tmp_path):
    from sparsec.onnx_entry import optimize_onnx

    model = tmp_path / "m.onnx"
    torch.onnx.export(ReluMLP().eval(), (torch.randn(4, 128),), str(model), dynamo=False)
    with pytest.raises(OptionError, match="act:0.5 is not available on the ONNX path: standard ONNX has no operator"):
        optimize_onnx(model, tmp_path / "out.onnx", plan={"layers": {"_default": "act:0.5"}})
    with pytest.raises(OptionError, match="--formats names act"):
        optimize_onnx(model, tmp_path / "out.onnx", formats=["act"])
    assert not (tmp_path / "out.onnx").exists()


def test_sequential_recovery_recalibrates_thresholds_to_the_inputs_layers_receive(tmp_path):
    """fc1 at act:0.5 changes what fc2 receives; recovered, fc2's threshold skips a fraction 0.5 of
    those inputs (its ReLU zeros included), and the report gives its error before and after."""
    torch.manual_seed(0)
    model = ReluMLP().eval()
    calib = data(64, 3)
    sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", plan={"layers": {"_default": "act:0.5"}},
                     recovery="sequential", report=str(tmp_path / "r.json"))
    rep = json.loads((tmp_path / "r.json").read_text())
    fc2 = next(l for l in rep["layers"] if l["name"] == "fc2")
    assert set(fc2["recovery"]) == {"one_shot_error", "recovered_error"}
    # fc2's inputs, with fc1 masked as it runs: the recalibrated threshold skips half of them
    t1 = next(l for l in rep["layers"] if l["name"] == "fc1")["calibrated"]["threshold"]
    h = torch.cat([torch.relu(nn.functional.linear(torch.where(x.abs() >= t1, x, torch.zeros_like(x)),
                                                   model.fc1.weight, model.fc1.bias)) for (x,) in calib])
    skipped = float((h.abs() < fc2["calibrated"]["threshold"]).double().mean())
    assert skipped == pytest.approx(0.5, abs=0.03)
    assert fc2["calibrated"]["skipped_on_calibration"] == pytest.approx(skipped, abs=0.03)


def correlated(n: int, rows: int, seed: int):
    """Inputs of 64 features driven by 16 factors (plus a little noise): what an act layer drops
    is largely predictable from what it keeps."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 64, generator=torch.Generator().manual_seed(99))
    return [(torch.randn(rows, 16, generator=gen) @ mix + 0.1 * torch.randn(rows, 64, generator=gen),)
            for _ in range(n)]


def test_full_recovery_refits_an_act_weight_to_the_inputs_it_keeps(tmp_path):
    """``full`` fits W' = (W X^T S + lam W)(S^T S + lam I)^-1 (S: the kept inputs): the compiled
    layer runs exactly that weight behind its threshold, its calibration error falls in the report,
    and on held-out inputs it is closer to the dense layer than the sequential plan (W unchanged)."""
    from sparsec.activation import masked
    from sparsec.recovery import ACT_RIDGE

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    calib = correlated(64, 8, 1)
    outs, reports = {}, {}
    for mode in ("sequential", "full"):
        outs[mode] = sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu",
                                      plan={"layers": {"_default": "act:0.5"}}, recovery=mode,
                                      report=str(tmp_path / f"{mode}.json"))
        reports[mode] = json.loads((tmp_path / f"{mode}.json").read_text())["layers"][0]
    full = reports["full"]
    t = full["calibrated"]["threshold"]
    assert t == reports["sequential"]["calibrated"]["threshold"]
    assert full["recovery"]["recovered_error"] < 0.9 * full["recovery"]["one_shot_error"]
    X = torch.cat([x for (x,) in calib]).double()
    S = masked(X, t)
    W, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    G = S.T @ S
    lam = ACT_RIDGE * float(G.diagonal().mean())
    refit = torch.linalg.solve(G + lam * torch.eye(64, dtype=G.dtype), (W @ X.T @ S + lam * W).T).T
    (x,) = correlated(1, 256, 7)[0]
    with torch.no_grad():
        dense = model(x).double()
        got = outs["full"].module(x).double()
        plain = outs["sequential"].module(x).double()
    want = masked(x.double(), t) @ refit.T + b
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert float((got - dense).norm()) < 0.9 * float((plain - dense).norm())


def test_few_calibration_rows_are_warned_of_only_where_a_fit_reads_the_gram():
    """Fewer rows than inputs make Gram-weighted fits fall back to a diagonal (and the report says
    so); act reads only its inputs' magnitudes, so an act-only plan carries no such warning."""
    torch.manual_seed(0)
    model = ReluMLP().eval()
    few = [(torch.randn(8, 128),)]  # 8 rows for 128 inputs
    warned = lambda fmt: [w for w in sparsec.optimize(  # noqa: E731
        model, few[0], calibration=few, fingerprint="cpu", plan={"layers": {"_default": fmt}},
        lower=False).report.to_dict()["warnings"] if "too few to weight a fit" in w]
    assert warned("act:0.5") == []
    assert len(warned("lowrank:8")) >= 1
