"""Report diff: plan, predicted time, fingerprint and budget changes between two runs."""

from __future__ import annotations

import copy

import pytest
from report_factory import make_report
from rich.console import Console

from sparsec.report import Report, diff, render_diff


def _render(d, **kw) -> str:
    console = Console(record=True, width=220, color_system=None)
    console.print(render_diff(d, **kw))
    return console.export_text()


def test_identical_reports_have_no_differences(report_dict):
    d = diff(Report(report_dict), Report(copy.deepcopy(report_dict)))
    assert not d.changed and d.settings == [] and d.figures == []
    assert {c.status for c in d.layers} == {"same"}
    assert _render(d).strip() == "no differences"


def test_format_time_budget_and_fingerprint_changes_are_reported(report_dict):
    after = copy.deepcopy(report_dict)
    target = after["layers"][5]
    old_format, old_us = target["format"], target["predicted_us"]
    target["format"] = "lowrank:512" if old_format != "lowrank:512" else "dense"
    target["predicted_us"] = old_us * 0.5
    after["layers"][6]["predicted_us"] += 10.0
    after["error_budget"] = 0.05
    after["fingerprint"] = {"name": "h100", "device": "NVIDIA H100 80GB HBM3", "hash": "abc"}
    d = diff(report_dict, after)  # dicts are accepted too
    settings = {c.field: (c.before, c.after) for c in d.settings}
    assert settings["error_budget"] == (0.03, 0.05)
    assert settings["fingerprint.name"] == ("h200", "h100")
    assert settings["fingerprint.device"] == ("NVIDIA H200", "NVIDIA H100 80GB HBM3")
    by_name = {c.name: c for c in d.layers}
    changed = by_name[target["name"]]
    assert changed.status == "format"
    assert (changed.format_before, changed.format_after) == (old_format, target["format"])
    assert changed.predicted_us_delta == pytest.approx(-0.5 * old_us, rel=1e-12)
    assert by_name[after["layers"][6]["name"]].status == "time"
    assert by_name[after["layers"][6]["name"]].predicted_us_delta == pytest.approx(10.0, rel=1e-9)
    assert [c.name for c in d.plan_changes] == [target["name"]]
    text = _render(d)
    assert "error_budget: 0.03 -> 0.05" in text
    assert "fingerprint.name: h200 -> h100" in text
    row = next(line for line in text.splitlines() if target["name"] in line)
    assert old_format in row and target["format"] in row and "format" in row
    assert "1 plan change(s)" in text


def test_added_removed_and_repeated_layers_are_matched_by_graph_and_order():
    before = make_report(seed=1, blocks=1)
    after = copy.deepcopy(before)
    removed = after["layers"].pop(2)
    added = dict(copy.deepcopy(after["layers"][0]), name="model.extra_proj")
    after["layers"].append(added)
    repeat = dict(copy.deepcopy(before["layers"][0]), format="lowrank:7")
    before["layers"].append(copy.deepcopy(before["layers"][0]))  # the same name twice in graph 0
    after["layers"].append(repeat)
    d = diff(before, after)
    status = {(c.name, c.status) for c in d.layers}
    assert (removed["name"], "removed") in status
    assert ("model.extra_proj", "added") in status
    first_name = before["layers"][0]["name"]
    repeats = [c for c in d.layers if c.name == first_name]
    assert [c.status for c in repeats] == ["same", "format"]
    assert repeats[1].format_after == "lowrank:7"
    d_json = d.to_dict()
    assert {x["status"] for x in d_json["layers"]} >= {"added", "removed"}


def test_same_name_in_another_graph_is_another_layer():
    before = make_report(seed=1, blocks=1)
    after = copy.deepcopy(before)
    for layer in after["layers"]:
        layer["graph"] = 1
    d = diff(before, after)
    assert {c.status for c in d.layers} == {"added", "removed"}
