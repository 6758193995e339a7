"""Report data: validation with field-naming errors, atomic save, load, and extend."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
from report_factory import make_report

from sparsec.errors import ReportError
from sparsec.report import Report, report_schema, schema_errors

# Field names fixed by DESIGN.md "Report": the schema must require every one of them.
DESIGN_TOP = ["schema", "created", "sparsec_version", "entry", "fingerprint", "error_budget", "layers",
              "totals", "end_to_end"]
DESIGN_LAYER = ["name", "op", "shape", "tokens", "dtype", "format", "declared_sparsity", "predicted_us_dense",
                "predicted_us", "predicted_speedup", "predicted_error", "measured_error", "measured_speedup",
                "kernel", "reason", "candidates"]
DESIGN_CANDIDATE = ["format", "predicted_us", "predicted_error", "rejected_because"]


def test_schema_requires_every_field_design_names():
    schema = report_schema()
    assert schema["required"] == DESIGN_TOP
    assert schema["$defs"]["layer"]["required"] == DESIGN_LAYER
    assert schema["$defs"]["candidate"]["required"] == DESIGN_CANDIDATE
    assert set(schema["properties"]["fingerprint"]["required"]) == {"name", "device", "hash"}


def test_generated_report_is_valid_and_round_trips_through_json(tmp_path, report_dict):
    path = Report(report_dict).save(tmp_path / "r.json")
    loaded = Report.load(path)
    assert loaded.to_dict() == report_dict
    assert json.loads(path.read_text()) == report_dict


def test_report_keeps_its_own_copy(report_dict):
    report = Report(report_dict)
    report_dict["layers"][0]["format"] = "changed by the caller"
    out = report.to_dict()
    out["layers"][1]["format"] = "changed in the copy"
    assert report.layers[0]["format"] != "changed by the caller"
    assert report.layers[1]["format"] != "changed in the copy"


def test_nulls_where_values_may_be_unknown_and_extra_fields_are_accepted(report_dict):
    layer = report_dict["layers"][0]
    for key in ("tokens", "measured_error", "measured_speedup", "kernel", "predicted_error"):
        layer[key] = None
    layer["candidates"][0]["predicted_us"] = None
    report_dict["end_to_end"] = dict.fromkeys(report_dict["end_to_end"])
    report_dict["fingerprint"]["hash"] = None
    report_dict["mode"] = "reduce-overhead"  # a field added by a newer writer
    layer["method"] = "wanda"
    assert schema_errors(report_dict) == []
    Report(report_dict)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["layers"][2].pop("reason"), "$.layers[2]: missing required field 'reason'"),
        (lambda d: d["layers"][0].__setitem__("predicted_us", "fast"),
         "$.layers[0].predicted_us: expected number or null, got str"),
        (lambda d: d["layers"][1].__setitem__("shape", [4096, 4096, 1]),
         "$.layers[1].shape: allows at most 2 items, has 3"),
        (lambda d: d["layers"][1].__setitem__("tokens", True), "$.layers[1].tokens: expected integer or null, got bool"),
        (lambda d: d["layers"][0]["candidates"][1].pop("rejected_because"),
         "$.layers[0].candidates[1]: missing required field 'rejected_because'"),
        (lambda d: d.__setitem__("entry", "tensorflow"), "$.entry: must be one of 'torch.compile', 'optimize', 'onnx'"),
        (lambda d: d["totals"].__setitem__("predicted_speedup", math.nan), "$.totals.predicted_speedup: nan is not a finite"),
        (lambda d: d["layers"][3].__setitem__("declared_sparsity", 1.5), "$.layers[3].declared_sparsity: 1.5 is above"),
        (lambda d: d.pop("fingerprint"), "$: missing required field 'fingerprint'"),
        (lambda d: d.__setitem__("layers", {}), "$.layers: expected array, got dict"),
    ],
)
def test_invalid_reports_are_refused_naming_the_field(report_dict, change, expected):
    change(report_dict)
    with pytest.raises(ReportError) as info:
        Report(report_dict)
    assert expected in str(info.value)


def test_other_schemas_are_refused_with_what_they_are(report_dict):
    report_dict["schema"] = "sparsec.plan/1"
    with pytest.raises(ReportError, match="this is a plan, not a report"):
        Report(report_dict)
    report_dict["schema"] = "sparsec.report/2"
    with pytest.raises(ReportError, match="written by a newer sparsec"):
        Report(report_dict)


def test_load_names_the_file_and_the_problem(tmp_path, report_dict):
    with pytest.raises(ReportError, match=r"missing\.json: no such report file"):
        Report.load(tmp_path / "missing.json")
    text = json.dumps(report_dict)
    truncated = tmp_path / "truncated.json"
    truncated.write_text(text[: len(text) // 2])
    with pytest.raises(ReportError, match=r"truncated\.json: not valid JSON at line 1 column"):
        Report.load(truncated)
    page = tmp_path / "r.html"
    Report(report_dict).save(page)
    with pytest.raises(ReportError, match="an HTML report cannot be read back"):
        Report.load(page)
    bad = copy.deepcopy(report_dict)
    bad["layers"][4]["format"] = 24
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ReportError, match=r"bad\.json: not a valid sparsec.report/1 report: \$\.layers\[4\]\.format"):
        Report.load(path)


def test_save_is_atomic_and_refuses_unknown_suffixes(tmp_path, report_dict, monkeypatch):
    report = Report(report_dict)
    target = tmp_path / "r.json"
    target.write_text("previous report")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        report.save(target)
    monkeypatch.undo()
    assert target.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind
    with pytest.raises(ReportError, match=r"written as \.json \(data\) or \.html \(page\); got '\.txt'"):
        report.save(tmp_path / "r.txt")
    with pytest.raises(ReportError, match="does not exist"):
        report.save(tmp_path / "no" / "such" / "r.json")


# -- extend: graph breaks --------------------------------------------------------------------------

def _graph(seed: int, **kw) -> Report:
    return Report(make_report(seed=seed, blocks=1, tokens=64, **kw))


def _fingerprint_like(report: Report, other: dict) -> dict:
    other["fingerprint"] = copy.deepcopy(report.fingerprint)
    return other


def test_extend_appends_layers_and_numbers_graphs():
    a = _graph(1)
    b = Report(_fingerprint_like(a, make_report(seed=2, blocks=1, tokens=64)))
    b_before = b.to_dict()
    names_a, names_b = [x["name"] for x in a.layers], [x["name"] for x in b.layers]
    result = a.extend(b)
    assert result is a
    assert [x["name"] for x in a.layers] == names_a + names_b  # repeated names are both kept
    assert [x["graph"] for x in a.layers] == [0] * len(names_a) + [1] * len(names_b)
    assert b.to_dict() == b_before
    c = Report(_fingerprint_like(a, make_report(seed=3, blocks=1, tokens=64)))
    a.extend(c)
    assert sorted({x["graph"] for x in a.layers}) == [0, 1, 2]
    assert a.totals["layers"] == len(a.layers) == 3 * len(names_a)


def test_recompiles_are_recorded_said_among_the_warnings_and_kept_by_extend():
    a = _graph(1)
    entry = {"layers": ["blocks.0.up"], "formats": ["2:4"], "tokens": 1, "planned_tokens": [64], "dynamic": False,
             "predicted_speedup": 0.8, "fingerprint": "h200", "runs": "dense"}
    a.add_recompiles([entry])
    assert a["recompiles"] == [entry]
    assert any(w.startswith("blocks.0.up: recompiled for 1 token(s), planned at 64; 2:4 is predicted 0.80x")
               and "runs it dense" in w for w in a.warnings)
    b = Report(_fingerprint_like(a, make_report(seed=2, blocks=1, tokens=64)))
    a.extend(b)
    assert a["recompiles"] == [entry]
    c = Report(_fingerprint_like(a, make_report(seed=3, blocks=1, tokens=64)))
    c.add_recompiles([dict(entry, dynamic=True, runs="as planned")])
    a.extend(c)
    assert [e["runs"] for e in a["recompiles"]] == ["dense", "as planned"]


def test_extend_keeps_graph_indices_the_backend_already_set():
    first = make_report(seed=1, blocks=1)
    second = make_report(seed=2, blocks=1)
    second["fingerprint"] = first["fingerprint"]
    for layer in first["layers"]:
        layer["graph"] = 0
    for layer in second["layers"]:
        layer["graph"] = 1
    combined = Report(first).extend(Report(second))
    assert {x["graph"] for x in combined.layers} == {0, 1}


def test_extend_combines_totals_and_end_to_end_from_the_parts():
    a = _graph(4)
    b = Report(_fingerprint_like(a, make_report(seed=5, blocks=1, tokens=64)))
    parts = [a.to_dict(), b.to_dict()]
    a.extend(b)
    layers = [x for p in parts for x in p["layers"]]
    dense = sum(x["predicted_us_dense"] for x in layers)
    pred = sum(x["predicted_us"] for x in layers)
    measured_time = sum(x["predicted_us_dense"] / x["measured_speedup"] for x in layers)
    t = a.totals
    assert t["rewritten"] == sum(x["format"] != "dense" for x in layers)
    # Sums of a few dozen floats: equal to within rounding of the last bits.
    assert t["predicted_us_dense"] == pytest.approx(dense, rel=1e-12)
    assert t["predicted_us"] == pytest.approx(pred, rel=1e-12)
    assert t["predicted_speedup"] == pytest.approx(dense / pred, rel=1e-12)
    assert t["measured_speedup"] == pytest.approx(dense / measured_time, rel=1e-12)
    e2e = a.end_to_end
    errs = [p["end_to_end"]["measured_error"] for p in parts]
    assert e2e["measured_error"] == pytest.approx(math.sqrt(errs[0] ** 2 + errs[1] ** 2), rel=1e-12)
    weights = [p["totals"]["predicted_us_dense"] for p in parts]
    speeds = [p["end_to_end"]["predicted_speedup"] for p in parts]
    expected = sum(weights) / sum(w / s for w, s in zip(weights, speeds))
    assert e2e["predicted_speedup"] == pytest.approx(expected, rel=1e-12)
    assert min(speeds) < e2e["predicted_speedup"] < max(speeds)


def test_extend_is_associative_and_unknowns_stay_unknown():
    dicts = [make_report(seed=s, blocks=1, tokens=32) for s in (6, 7, 8)]
    for d in dicts[1:]:
        d["fingerprint"] = dicts[0]["fingerprint"]
    dicts[2]["end_to_end"]["heldout_error"] = None
    dicts[2]["totals"]["measured_speedup"] = None
    left = Report(dicts[0]).extend(Report(dicts[1])).extend(Report(dicts[2]))
    right = Report(dicts[0]).extend(Report(dicts[1]).extend(Report(dicts[2])))
    for key in ("predicted_us", "predicted_speedup"):
        assert left.totals[key] == pytest.approx(right.totals[key], rel=1e-12)
    assert left.end_to_end["measured_error"] == pytest.approx(right.end_to_end["measured_error"], rel=1e-12)
    assert left.end_to_end["heldout_error"] is None
    assert left.totals["measured_speedup"] is None
    assert [x["graph"] for x in left.layers] == [x["graph"] for x in right.layers]


def test_extend_refuses_reports_of_another_compilation():
    a = _graph(9)
    b = _graph(10)  # another fingerprint hash
    before = a.to_dict()
    with pytest.raises(ReportError, match="planned on another fingerprint"):
        a.extend(b)
    other_budget = Report(_fingerprint_like(a, make_report(seed=11, blocks=1, error_budget=0.05)))
    with pytest.raises(ReportError, match="another error_budget: 0.01 vs 0.05"):
        a.extend(other_budget)
    assert a.to_dict() == before


def test_extend_adds_the_rest_of_each_graph_and_weights_end_to_end_by_it():
    """Each part's end-to-end speedup is weighted by its dense time end to end (layers plus the
    rest of its graph); the rests add up; one unknown rest leaves the combined rest unknown."""
    a, b = make_report(seed=9, blocks=1, tokens=32), make_report(seed=10, blocks=1, tokens=64)
    b["fingerprint"] = a["fingerprint"]
    a["end_to_end"]["predicted_us_rest"], b["end_to_end"]["predicted_us_rest"] = 40.0, 900.0
    parts = [a, b]
    combined = Report(a).extend(Report(b))
    weights = [p["totals"]["predicted_us_dense"] + p["end_to_end"]["predicted_us_rest"] for p in parts]
    speeds = [p["end_to_end"]["predicted_speedup"] for p in parts]
    expected = sum(weights) / sum(w / s for w, s in zip(weights, speeds))
    assert combined.end_to_end["predicted_us_rest"] == pytest.approx(940.0)
    assert combined.end_to_end["predicted_speedup"] == pytest.approx(expected, rel=1e-12)
    b["end_to_end"]["predicted_us_rest"] = None
    assert Report(a).extend(Report(b)).end_to_end["predicted_us_rest"] is None


def test_extend_adds_what_each_graph_folded_into_its_launches():
    a, b = make_report(seed=9, blocks=1, tokens=1), make_report(seed=10, blocks=1, tokens=1)
    b["fingerprint"] = a["fingerprint"]
    for part, rest, fused, stacked in ((a, 40.0, 6.0, 5.0), (b, 30.0, 0.0, -1.0)):
        part["end_to_end"].update(predicted_us_rest=rest, predicted_us_fused=fused, predicted_us_stacked=stacked)
    combined = Report(a).extend(Report(b)).end_to_end
    assert combined["predicted_us_fused"] == pytest.approx(6.0)
    assert combined["predicted_us_stacked"] == pytest.approx(4.0)
    b["end_to_end"]["predicted_us_fused"] = None
    assert Report(a).extend(Report(b)).end_to_end["predicted_us_fused"] is None


def test_extend_adds_the_rest_kind_by_kind():
    a, b = make_report(seed=11, blocks=1, tokens=1), make_report(seed=12, blocks=1, tokens=1)
    b["fingerprint"] = a["fingerprint"]
    a["end_to_end"].update(predicted_us_rest=9.0, predicted_us_rest_by_kind={"pointwise": 4.0, "reduction": 5.0})
    b["end_to_end"].update(predicted_us_rest=7.0, predicted_us_rest_by_kind={"attention": 6.0, "pointwise": 1.0})
    combined = Report(a).extend(Report(b)).end_to_end
    assert combined["predicted_us_rest_by_kind"] == pytest.approx({"attention": 6.0, "pointwise": 5.0, "reduction": 5.0})
    b["end_to_end"]["predicted_us_rest_by_kind"] = None
    assert Report(a).extend(Report(b)).end_to_end["predicted_us_rest_by_kind"] is None


def _planning(calib: int, held: int, one_s: float | None, steps: dict) -> dict:
    return {"model_evaluations": calib, "heldout_evaluations": held,
            "timing": {"evaluation_s": one_s, "total_s": sum(steps.values()), "steps_s": steps}}


def test_extend_adds_up_what_planning_cost():
    a_data = make_report(seed=1, blocks=1)
    a_data["planning"] = _planning(10, 2, 0.5, {"approximate": 3.0, "verify": 5.0})
    a_data["planning"]["evaluations_by_step"] = {"verify": {"calibration": 8, "heldout": 2},
                                                 "replan": {"calibration": 2, "heldout": 0}}
    a = Report(a_data)
    b_data = _fingerprint_like(a, make_report(seed=2, blocks=1))
    b_data["planning"] = _planning(30, 0, 0.1, {"verify": 3.0, "lower": 1.0})
    b_data["planning"]["evaluations_by_step"] = {"verify": {"calibration": 30, "heldout": 0}}
    a.extend(Report(b_data))
    planning = a.get("planning")
    assert planning["model_evaluations"] == 40 and planning["heldout_evaluations"] == 2
    assert planning["evaluations_by_step"] == {"verify": {"calibration": 38, "heldout": 2},
                                               "replan": {"calibration": 2, "heldout": 0}}
    assert planning["timing"]["evaluation_s"] == pytest.approx((10 * 0.5 + 30 * 0.1) / 40)
    assert planning["timing"]["steps_s"] == {"approximate": 3.0, "verify": 8.0, "lower": 1.0}
    assert planning["timing"]["total_s"] == pytest.approx(12.0)
    assert schema_errors(a.to_dict()) == []
    bad = copy.deepcopy(a.to_dict())
    bad["planning"]["model_evaluations"] = -1
    assert any("model_evaluations" in e for e in schema_errors(bad))
