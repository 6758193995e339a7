"""actrot:S through the planner: axes from the calibration Gram, thresholds from rows held apart,
the predicted error against the measured one, the report, refusals with their reason, and the
automatic choice against act where a fingerprint says both pay."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import sparsec
from sparsec.passes.actrot import HANDLER
from sparsec.rotation import HELD_EVERY, principal_axes, rotated_threshold
from sparsec.sites import SiteStats


class MLP(nn.Module):
    def __init__(self, K: int = 64):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(K, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def in_subspace(n: int, rows: int, seed: int, K: int = 64, r: int = 16):
    """Inputs of K features that lie exactly in an r-dimensional subspace (planted structure): in
    their principal axes all but r of them are zero."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(r, K, generator=torch.Generator().manual_seed(99))
    return [(torch.randn(rows, r, generator=gen) @ mix,) for _ in range(n)]


def layers_of(report_path) -> dict:
    return {l["name"]: l for l in json.loads(report_path.read_text())["layers"]}


def test_inputs_in_a_subspace_are_skipped_losslessly_where_act_loses(tmp_path):
    """fc1's inputs span 16 of 64 dimensions: actrot:0.7 skips 70% of its rotated inputs for no
    error (predicted and measured), act:0.7 on the inputs as they are costs tens of percent."""
    torch.manual_seed(0)
    model = MLP().eval()
    calib = in_subspace(32, 32, 1)
    x = calib[0][0]
    with torch.no_grad():
        dense = model(x)
    errors = {}
    for fmt in ("actrot:0.7", "act:0.7"):
        out = sparsec.optimize(model, (x,), calibration=calib, fingerprint="cpu", plan={"layers": {"fc1": fmt}},
                               recovery="none", report=str(tmp_path / "r.json"))
        fc1 = layers_of(tmp_path / "r.json")["fc1"]
        assert fc1["format"] == fmt
        errors[fmt] = fc1["measured_error"]
        if fmt.startswith("actrot"):
            cal = fc1["calibrated"]
            assert cal["rows_held_apart"] == 32 * 32 // HELD_EVERY
            assert cal["skipped_on_calibration"] == pytest.approx(0.7, abs=0.01)
            assert fc1["predicted_error"] < 1e-4
            with torch.no_grad():
                got = out.module(x)
            assert float((got - dense).norm() / dense.norm()) < 1e-4
    assert errors["actrot:0.7"] < 1e-4 < 0.1 < errors["act:0.7"]


def test_thresholds_from_rows_held_apart_skip_the_asked_fraction_of_new_inputs():
    """Axes fitted to few rows concentrate those rows' energy more than new inputs': a threshold
    taken on the rows Q was fitted to skips much less than S of new inputs. Taken on the rows held
    apart it skips S of them (within sampling)."""
    K, S = 96, 0.5
    gen = torch.Generator().manual_seed(7)
    scales = torch.logspace(0, -2, K, dtype=torch.float64)
    mix, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=torch.float64))

    def draw(rows):
        return ((torch.randn(rows, K, generator=gen, dtype=torch.float64) * scales) @ mix.T).float()

    stats = SiteStats.empty(K)
    for _ in range(4):
        stats.add(draw(40))  # 160 rows: 120 for the axes (barely more than K), 40 held apart
    assert stats.held.count == 40
    weight = torch.randn(32, K, generator=gen)
    (approx,) = HANDLER.approximate([HANDLER.grid(32, K)[2]], weight, stats)
    assert HANDLER.grid(32, K)[2].skip == S
    new = draw(4000) @ approx.rotation
    held_apart = float((new.abs() < approx.threshold).float().mean())
    assert held_apart == pytest.approx(S, abs=0.05)
    # the same rotation, its threshold taken on rows it was fitted to: far fewer new inputs skipped
    fit_rows = torch.cat([r for i, r in enumerate(draw(160).split(1)) if i % HELD_EVERY != HELD_EVERY - 1])
    q_fit = principal_axes(fit_rows.double().T @ fit_rows.double())
    naive = rotated_threshold(fit_rows @ q_fit, S)
    assert float(((draw(4000) @ q_fit).abs() < naive).float().mean()) < S - 0.1


def test_too_few_calibration_rows_refuse_it_saying_why(tmp_path):
    """16 rows for 64 inputs: no axes can be estimated; the candidate is refused with the reason,
    and a plan that forces it keeps the layer dense saying so."""
    torch.manual_seed(0)
    model = MLP().eval()
    calib = in_subspace(2, 8, 2)
    sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", formats=["actrot"],
                     report=str(tmp_path / "r.json"))
    fc1 = layers_of(tmp_path / "r.json")["fc1"]
    assert fc1["format"] == "dense"
    reasons = [c["rejected_because"] or "" for c in fc1["candidates"]]
    assert reasons and all("fewer calibration rows (16) than inputs (64)" in r for r in reasons)
    sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu", plan={"layers": {"fc1": "actrot:0.5"}},
                     report=str(tmp_path / "f.json"))
    forced = layers_of(tmp_path / "f.json")["fc1"]
    assert forced["format"] == "dense" and "principal axes cannot be estimated" in forced["reason"]


def test_the_onnx_path_refuses_actrot_naming_why(tmp_path):
    from sparsec.errors import OptionError
    from sparsec.onnx_entry import optimize_onnx

    model = tmp_path / "m.onnx"
    torch.onnx.export(MLP().eval(), (torch.randn(4, 64),), str(model), dynamo=False)
    with pytest.raises(OptionError, match="actrot:0.5 is not available on the ONNX path"):
        optimize_onnx(model, tmp_path / "out.onnx", plan={"layers": {"_default": "actrot:0.5"}})
    assert not (tmp_path / "out.onnx").exists()


def test_the_automatic_plan_prefers_the_rotation_where_it_keeps_the_budget(tmp_path):
    """A fingerprint where act and actrot both run at (1 - S) of dense (measured at S = 0.4 and 0.5
    on the CPU grid): on inputs in a subspace only the rotation skips anything within a 0.1% budget,
    so fc1 takes actrot:0.5 (it skips only empty axes) and act is refused as over budget; fc2 reads
    a ReLU, whose zeros act skips as they are, where a rotation would mix them with the rest."""
    from sparsec import fingerprints

    doc = json.loads(fingerprints.shipped_path("cpu").read_text())
    for fam in ("act", "actrot"):
        for e in doc["kernels"][fam]:
            dense = [d["us"] for d in doc["kernels"]["dense"] if (d["M"], d["N"], d["K"], d["dtype"], d["mode"])
                     == (e["M"], e["N"], e["K"], e["dtype"], e["mode"])]
            e["us"] = dense[0] * (1.0 - e["skip"]) if dense else e["us"]
    fp = tmp_path / "fast-act.json"
    fp.write_text(json.dumps({**doc, "name": "fast-act"}))
    torch.manual_seed(0)
    model = MLP().eval()
    calib = in_subspace(32, 32, 3)
    out = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=str(fp), error_budget=0.001,
                           formats=["act", "actrot"], report=str(tmp_path / "r.json"))
    fc1 = layers_of(tmp_path / "r.json")["fc1"]
    assert fc1["format"] == "actrot:0.5"
    assert fc1["measured_error"] < 1e-4
    assert all(c["rejected_because"] for c in fc1["candidates"] if c["format"].startswith("act:")
               and float(c["format"].split(":")[1]) >= 0.25)
    fc2 = layers_of(tmp_path / "r.json")["fc2"]
    assert fc2["format"] == "act:0.5"
    assert all("over budget" in c["rejected_because"] for c in fc2["candidates"] if c["format"].startswith("actrot:")
               and c["predicted_error"] is not None)
    assert out.report.to_dict()["end_to_end"]["measured_error"] <= 0.001


class SwiGLU(nn.Module):
    def __init__(self, K: int = 64, N: int = 256):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(K, N, bias=False), nn.Linear(K, N, bias=False), nn.Linear(N, K)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def rotation_priced(S: float, N: int = 256, K: int = 64):
    """The CPU fingerprint, but actrot:S priced as (1 - S) of dense plus a rotation of fixed cost,
    1.5 S of the N x K layer's dense time: alone (1 + S/2) of dense, slower; as gate and up's
    stacked launch about (1 - S/4) of dense each, faster."""
    from sparsec.fingerprint.predict import Fingerprint, load_fingerprint

    base = load_fingerprint("cpu")
    rotation = 1.5 * S * base.predict_detail("dense", 1, N, K, dtype="float32", mode="eager").us

    class Priced(Fingerprint):
        def predict_detail(self, format, M, N, K, dtype="bfloat16", mode="eager"):
            pred = super().predict_detail("dense" if format.startswith("actrot:") else format, M, N, K, dtype, mode)
            if format.startswith("actrot:"):
                pred = dataclasses.replace(pred, us=(1 - float(format.split(":")[1])) * pred.us + rotation,
                                           kernel="sparsec-triton-actrot")
            return pred

    return Priced(base.data, base.source)


def test_gate_and_up_take_the_rotation_that_pays_only_in_their_one_launch(tmp_path):
    """Priced alone, actrot:0.5 loses to dense on gate and on up; priced as their share of one
    launch, it wins on both: the plan takes it on both, the lowering runs them as one launch, and
    the report says how each was priced. down (a rotation four times its own reads) stays dense."""
    torch.manual_seed(0)
    model = SwiGLU().eval()
    gen = torch.Generator().manual_seed(6)
    calib = [(torch.randn(32, 64, generator=gen),) for _ in range(16)]
    fp = rotation_priced(0.5)
    alone = fp.predict_detail("actrot:0.5", 1, 256, 64, dtype="float32", mode="eager").us
    dense = fp.predict_detail("dense", 1, 256, 64, dtype="float32", mode="eager").us
    stacked = fp.predict_detail("actrot:0.5", 1, 512, 64, dtype="float32", mode="eager").us
    assert alone > dense > stacked / 2                  # the premise: pays only stacked
    out = sparsec.optimize(model, (torch.randn(1, 64, generator=gen),), calibration=calib, fingerprint=fp,
                           formats=["actrot"], error_budget=0.9, recovery="none", report=str(tmp_path / "r.json"))
    layers = layers_of(tmp_path / "r.json")
    fmt = layers["gate"]["format"]
    assert fmt.startswith("actrot:") and float(fmt.split(":")[1]) >= 0.4 and layers["up"]["format"] == fmt
    assert layers["down"]["format"] == "dense"
    assert "as its share of one launch with up; alone 0." in layers["gate"]["reason"]
    log = out.report.to_dict()["planner_log"]
    assert any(f"gate, up: one launch over their stacked {fmt} weights" in line and "priced so in selection" in line
               for line in log)


@pytest.mark.parametrize("alone_us, kept", [(10.5, True), (30.0, False)])
def test_measured_alone_a_shared_layer_is_held_to_its_share_of_what_it_measured(alone_us, kept, monkeypatch):
    """``measure: True`` times a layer alone; one priced as its share of a launch with its siblings
    stays where that share of its measured time beats dense (10.5 us alone against 10 us dense:
    kept), and is refused, saying so, where even its share does not (30 us)."""
    from sparsec import measure

    monkeypatch.setattr(measure, "time_layer", lambda layer, cand, options, rotation=None: (10.0, alone_us))
    monkeypatch.setattr(measure, "time_graph", lambda lowered, dense, inputs: (20.0, 10.0))
    torch.manual_seed(0)
    model = SwiGLU().eval()
    gen = torch.Generator().manual_seed(6)
    calib = [(torch.randn(32, 64, generator=gen),) for _ in range(16)]
    out = sparsec.optimize(model, (torch.randn(1, 64, generator=gen),), calibration=calib,
                           fingerprint=rotation_priced(0.5), formats=["actrot"], error_budget=0.9, recovery="none",
                           measure=True)
    gate = next(l for l in out.report.to_dict()["layers"] if l["name"] == "gate")
    if kept:
        assert gate["format"].startswith("actrot:")
    else:
        assert gate["format"] == "dense"
        assert any("as its share of one launch with its siblings" in (c["rejected_because"] or "")
                   for c in gate["candidates"])


def test_sequential_recovery_fits_axes_and_threshold_to_the_inputs_layers_receive(tmp_path):
    """fc2 reads what fc1 (itself skipping half its rotated inputs, at a cost: the inputs are not
    exactly in a subspace) gives; recovered, its axes and threshold come from those inputs, which
    lowers its error on them, and the report gives its error before and after."""
    torch.manual_seed(0)
    model = MLP().eval()
    gen = torch.Generator().manual_seed(4)
    calib = [(x + 0.3 * torch.randn(x.shape, generator=gen),) for (x,) in in_subspace(32, 32, 4)]
    sparsec.optimize(model, calib[0], calibration=calib, fingerprint="cpu",
                     plan={"layers": {"_default": "actrot:0.5"}}, recovery="sequential", report=str(tmp_path / "r.json"))
    layers = layers_of(tmp_path / "r.json")
    assert {l["format"] for l in layers.values()} == {"actrot:0.5"}
    fc2 = layers["fc2"]
    assert fc2["recovery"]["recovered_error"] < fc2["recovery"]["one_shot_error"]
    assert fc2["calibrated"]["skipped_on_calibration"] == pytest.approx(0.5, abs=0.02)
    assert fc2["measured_error"] == pytest.approx(fc2["recovery"]["recovered_error"], rel=0.05)


def test_rows_held_apart_are_kept_only_for_inputs_an_actrot_candidate_reads():
    """Calibration holds rows apart for every input; once the candidates are known, the inputs no
    standing actrot candidate reads let them go (up to 1024 rows each)."""
    from sparsec.options import parse_options
    from sparsec.pipeline import candidates, drop_unread_rows
    from sparsec.sites import Site

    gen = torch.Generator().manual_seed(5)
    stats = {}
    for key in ("a", "b"):
        stats[key] = SiteStats.empty(64)
        stats[key].add(torch.randn(256, 64, generator=gen))
        assert stats[key].held.count == 64
    sites = [Site(name, "linear", torch.randn(32, 64, generator=gen), None, torch.float32, key)
             for name, key in (("first", "a"), ("second", "b"))]
    options = parse_options({"formats": ["act", "actrot"]})
    plan = sparsec.Plan.from_dict({"layers": {"first": "actrot:0.5", "second": "act:0.5"}})
    layers = candidates(sites, stats, options, plan)
    drop_unread_rows(layers)
    assert stats["a"].held is not None and stats["a"].held.count == 64
    assert stats["b"].held is None


def test_axes_are_never_taken_from_other_statistics():
    """Two inputs calibrated in turn (as recovery does, stage after stage, each with statistics of
    its own): each gets the axes of its own rows, however the objects are made and freed."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(16, 32, generator=gen)
    for scale in (torch.logspace(0, -3, 32), torch.logspace(-3, 0, 32)):
        stats = SiteStats.empty(32)
        stats.add(torch.randn(512, 32, generator=gen) * scale)
        (approx,) = HANDLER.approximate([HANDLER.grid(16, 32)[0]], w, stats)
        loudest = int(approx.rotation[:, 0].abs().argmax())  # the first axis: the loudest input
        assert loudest == int(scale.argmax())
        del stats, approx
