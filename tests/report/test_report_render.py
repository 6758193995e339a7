"""Terminal table and HTML page, checked without a browser: content, escaping, chart geometry."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from report_factory import HOSTILE_NAMES, make_report
from rich.console import Console

from sparsec.report import Report, render_html, render_table
from sparsec.report import views as v


def _text(report, width: int = 240) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(render_table(report))
    return console.export_text()


def test_table_shows_every_layer_totals_and_fingerprint(report_dict):
    text = _text(Report(report_dict))
    for layer in report_dict["layers"]:
        assert layer["name"] in text
        assert f"{layer['shape'][0]}x{layer['shape'][1]}" in text
    t = report_dict["totals"]
    assert f"{t['rewritten']} of {t['layers']} layers rewritten" in text
    assert f"({t['predicted_speedup']:.2f}x), measured {t['measured_speedup']:.2f}x" in text
    assert "fingerprint h200, measured on NVIDIA H200" in text
    assert "warning: calibration data was generated" in text
    assert "was measured on" not in text  # same device: no mismatch warning


def test_table_row_carries_the_layer_figures(report_dict):
    layer = next(x for x in report_dict["layers"] if x["format"] != "dense")
    row = next(line for line in _text(Report(report_dict)).splitlines() if layer["name"] in line)
    for figure in (layer["format"], f"{100 * layer['declared_sparsity']:.0f}%", f"{layer['predicted_speedup']:.2f}x",
                   f"{layer['measured_speedup']:.2f}x", f"{100 * layer['predicted_error']:.2f}%",
                   f"{layer['tokens']:,}"):
        assert figure in row, figure


def test_table_warns_when_fingerprint_is_from_another_device():
    text = _text(Report(make_report(fingerprint_device="NVIDIA H100 80GB HBM3", device="NVIDIA H200")))
    assert ("warning: fingerprint 'h200' was measured on NVIDIA H100 80GB HBM3, but the model ran on "
            "NVIDIA H200") in " ".join(text.split())


def test_mismatch_warning_is_not_repeated_when_the_writer_gave_one():
    data = make_report(fingerprint_device="NVIDIA H100 80GB HBM3", device="NVIDIA H200")
    data["warnings"].append("fingerprint measured on NVIDIA H100 80GB HBM3 used on NVIDIA H200")
    assert len(v.all_warnings(Report(data))) == 2


def test_table_prints_user_names_literally_and_lists_skipped_ops():
    data = make_report(blocks=1, hostile=True)
    data["skipped"] = [{"name": "embed_tokens", "op": "embedding", "reason": "not a linear layer"}]
    text = _text(Report(data))
    for name in HOSTILE_NAMES:
        assert name in text
    assert "not considered: embed_tokens (embedding): not a linear layer" in text


def test_table_says_what_planning_cost_where_the_report_records_it():
    data = make_report(seed=4, blocks=1)
    assert "planning:" not in _text(data)
    data["planning"] = {"model_evaluations": 27, "heldout_evaluations": 3,
                        "timing": {"evaluation_s": 0.25, "total_s": 9.5,
                                   "steps_s": {"calibrate": 0.5, "approximate": 6.0, "verify": 3.0}}}
    text = _text(data)
    assert "planning: 27 model evaluations on calibration data and 3 on held-out data (one: 0.25 s); 9.5 s in all" in text
    assert "(approximate 6 s, verify 3 s, calibrate 0.5 s)" in text
    # where the report records which steps ran them, the line says so
    data["planning"]["evaluations_by_step"] = {"verify": {"calibration": 20, "heldout": 2},
                                               "replan": {"calibration": 7, "heldout": 1}}
    assert ("planning: 27 model evaluations on calibration data and 3 on held-out data (one: 0.25 s; verify ran 20, "
            "replan 7); 9.5 s in all") in " ".join(_text(data).split())


def test_table_says_what_recovery_did_and_what_distillation_kept():
    data = make_report(seed=4, blocks=1)
    data["planning"] = {"model_evaluations": 5, "heldout_evaluations": 0,
                        "timing": {"evaluation_s": 0.2, "total_s": 2.0, "steps_s": {}},
                        "recovery": {"mode": "full", "passes": 9, "refit": 5, "kept_one_shot": 1,
                                     "distillation": {"layers": 6, "epochs": 5, "kept_epoch": 3, "steps": 30,
                                                      "validation_loss": [0.0327, 0.0321], "seconds": 12.8}}}
    text = " ".join(_text(data).split())
    assert ("recovery: full: 5 layer(s) refitted, 1 kept one shot, 9 pass(es) over the calibration data; distilled 6 "
            "layer(s) end to end, epoch 3 of 5 kept (held-back calibration loss 0.0327 -> 0.0321) in 12.8 s") in text
    data["planning"]["recovery"]["distillation"] = {"layers": 6, "epochs": 0, "kept_epoch": 0, "steps": 0,
                                                    "note": "not run: the onnx entry cannot run its graph with gradients"}
    assert "distillation not run: the onnx entry cannot" in " ".join(_text(data).split())


def test_table_of_an_empty_model_says_so():
    data = make_report(blocks=0)
    data["layers"] = []
    data["totals"].update(layers=0, rewritten=0, predicted_us_dense=0.0, predicted_us=0.0,
                          predicted_speedup=None, measured_speedup=None)
    assert "no linear layers were found" in _text(Report(data))


# -- HTML, parsed ----------------------------------------------------------------------------------

class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def with_class(self, *classes: str) -> list[dict]:
        return [a for _, a in self.elements if set(classes) <= set((a.get("class") or "").split())]


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    return parser


def test_page_is_self_contained():
    page = render_html(Report(make_report(blocks=1)))
    assert not re.search(r"(src|href)\s*=", page)
    assert "http://" not in page and "https://" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    tags = [t for t, _ in _parse(page).elements]
    assert tags.count("script") == 1 and tags.count("style") == 1 and "link" not in tags


def test_page_escapes_names_from_user_models():
    page = render_html(Report(make_report(blocks=1, hostile=True)))
    assert "<script>window.__pwned" not in page
    assert '"><img' not in page
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    tags = [t for t, _ in _parse(page).elements]
    assert tags.count("script") == 1 and "img" not in tags


def _expected_marks(data: dict) -> tuple[int, int, int]:
    predicted = sum(1 for x in data["layers"] if x["declared_sparsity"] is not None and x["predicted_speedup"])
    measured = sum(1 for x in data["layers"] if x["declared_sparsity"] is not None and x["measured_speedup"])
    rejected = sum(1 for x in data["layers"] for c in x["candidates"]
                   if c["rejected_because"] is not None and c["predicted_us"] is not None)
    return predicted, measured, rejected


def test_chart_has_one_mark_per_layer_and_per_costed_rejected_candidate(report_dict):
    report_dict["layers"][0]["measured_speedup"] = None  # not timed: no measured mark
    elements = _parse(render_html(Report(report_dict)))
    predicted, measured, rejected = _expected_marks(report_dict)
    assert predicted == len(report_dict["layers"])
    assert rejected > 0
    assert len(elements.with_class("mark", "layer", "predicted")) == predicted
    assert len(elements.with_class("mark", "layer", "measured")) == measured == predicted - 1
    assert len(elements.with_class("mark", "candidate", "rejected")) == rejected


def test_chart_places_marks_by_sparsity_and_against_the_dense_line(report_dict):
    elements = _parse(render_html(Report(report_dict)))
    dense_y = float(next(a for t, a in elements.elements if a.get("id") == "dense-line")["y1"])
    marks = elements.with_class("mark", "layer", "predicted")
    layers = report_dict["layers"]
    for mark in marks:
        layer = layers[int(mark["data-layer"])]
        cy = float(mark["cy"])
        if layer["predicted_speedup"] > 1.0001:
            assert cy < dense_y, layer["name"]  # faster than dense sits above the line
        elif layer["predicted_speedup"] < 0.9999:
            assert cy > dense_y, layer["name"]
        else:
            assert abs(cy - dense_y) < 0.2
    by_sparsity = sorted(marks, key=lambda m: layers[int(m["data-layer"])]["declared_sparsity"])
    xs = [float(m["cx"]) for m in by_sparsity]
    assert xs == sorted(xs) and xs[0] < xs[-1]
    slow = [m for m in elements.with_class("mark", "candidate", "rejected")]
    assert any(float(m["cy"]) > dense_y for m in slow)  # candidates predicted slower than dense are shown


def test_budget_section_splits_the_combined_error_by_layer(report_dict):
    spend = v.budget_spend(Report(report_dict))
    rewritten = [x for x in report_dict["layers"] if x["format"] != "dense"]
    assert len(spend.shares) == len(rewritten)
    assert abs(sum(s.share for s in spend.shares) - 1.0) < 1e-12  # squared shares add up exactly
    combined = sum(x["predicted_error"] ** 2 for x in rewritten) ** 0.5
    assert abs(spend.predicted_combined - combined) < 1e-15
    page = render_html(Report(report_dict))
    assert f"to {v.fmt_error(combined)}" in page
    widths = [float(a["width"]) for a in _parse(page).with_class("budget-share")]
    assert len(widths) == len(rewritten)
    # Bar segments split the bar as the table's shares do (widths are rounded to 0.1 px).
    for width, share in zip(sorted(widths), sorted(s.share for s in spend.shares)):
        assert abs(width / sum(widths) - share) < 1e-3


def test_save_html_writes_the_page(tmp_path, report_dict):
    report = Report(report_dict)
    path = report.save(tmp_path / "r.html")
    assert path.read_text(encoding="utf-8") == render_html(report)


def test_device_kind_alone_is_compared_as_a_kind():
    same_kind = make_report(device="cpu", fingerprint_device="AMD EPYC 7B13 64-Core Processor")
    assert v.device_mismatch(Report(same_kind)) is None
    other_kind = make_report(device="cpu", fingerprint_device="NVIDIA H200")
    assert "ran on a cpu device" in v.device_mismatch(Report(other_kind))


def test_speedups_off_the_scale_are_drawn_on_its_edge(report_dict):
    layer = report_dict["layers"][0]
    layer["candidates"].append({"format": "2:4", "predicted_us": layer["predicted_us_dense"] * 400,
                                "predicted_error": None, "rejected_because": "predicted 0.0025x"})
    elements = _parse(render_html(Report(report_dict)))
    clipped = elements.with_class("mark", "candidate", "rejected", "clipped")
    assert len(clipped) == 1
    plot = next(a for t, a in elements.elements if (a.get("class") or "") == "plot")
    bottom = float(plot["y"]) + float(plot["height"])
    assert float(plot["y"]) < float(clipped[0]["cy"]) <= bottom
    assert not elements.with_class("mark", "layer", "predicted", "clipped")


def test_the_table_gives_the_rest_by_kind_where_it_has_several(report_dict):
    report_dict["end_to_end"].update(predicted_us_rest=12.0, predicted_us_fused=0.0,
                                     predicted_us_rest_by_kind={"attention": 5.0, "pointwise": 7.0})
    text = _text(Report(report_dict))
    assert f"rest of graph {v.fmt_us(12.0)} predicted: attention {v.fmt_us(5.0)}, pointwise {v.fmt_us(7.0)})" in text
    report_dict["end_to_end"]["predicted_us_rest_by_kind"] = {"pointwise": 12.0}  # one kind: the total says it
    assert f"rest of graph {v.fmt_us(12.0)} predicted)" in _text(Report(report_dict))


def test_table_and_page_say_how_much_of_the_rest_the_launches_absorb(report_dict):
    report_dict["end_to_end"]["predicted_us_rest"] = 12.0
    report_dict["end_to_end"]["predicted_us_fused"] = 4.5
    text = _text(Report(report_dict))
    assert f"rest of graph {v.fmt_us(12.0)} predicted, {v.fmt_us(4.5)} of it in the layers' epilogues" in text
    assert f"{v.fmt_us(4.5)} of it in the layers&#x27; epilogues" in render_html(Report(report_dict))
    report_dict["end_to_end"]["predicted_us_fused"] = 0.0
    assert "epilogues" not in _text(Report(report_dict))


@pytest.mark.parametrize("source, said", [
    ("measured: the original model with each layer's product cut to one input feature", "measured"),
    ("the original model's measured time less its layers' predicted dense time", "from the original model's measured time"),
    (None, "predicted"),
])
def test_the_table_says_where_the_rest_of_the_graph_came_from(report_dict, source, said):
    report_dict["end_to_end"]["predicted_us_rest"] = 30.0
    report_dict["end_to_end"].pop("predicted_us_rest_source", None)
    if source:
        report_dict["end_to_end"]["predicted_us_rest_source"] = source
    assert f"rest of graph {v.fmt_us(30.0)} {said}" in _text(Report(report_dict))
