"""The HTML report in a real headless browser (Debian's chromium): loads cleanly, draws the
chart's marks, sorts and expands, and runs none of the markup hidden in layer names."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from headless_browser import console_errors, dump_dom
from report_factory import make_report

from sparsec.report import Report


class _Status(HTMLParser):
    """Attributes of #render-status and the text inside #js-errors, from the dumped DOM."""

    def __init__(self):
        super().__init__()
        self.status: dict = {}
        self.errors = ""
        self._in_errors = 0
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if attrs.get("id") == "render-status":
            self.status = attrs
        if self._in_errors or attrs.get("id") == "js-errors":
            self._in_errors += 1

    def handle_endtag(self, tag):
        if self._in_errors:
            self._in_errors -= 1

    def handle_data(self, data):
        if self._in_errors:
            self.errors += data


def _open(chromium, page, fragment: str = "") -> _Status:
    run = dump_dom(chromium, page, fragment)
    assert console_errors(run.console) == []
    parsed = _Status()
    parsed.feed(run.dom)
    assert parsed.errors.strip() == ""
    assert parsed.status.get("data-rows"), "the page script did not finish: " + run.dom[-500:]
    return parsed


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    data = make_report(seed=3, blocks=2, tokens=2048, error_budget=0.03, hostile=True,
                       fingerprint_device="NVIDIA H100 80GB HBM3")
    data["layers"][1]["measured_speedup"] = None  # one layer not timed
    path = tmp_path_factory.mktemp("html") / "report.html"
    Report(data).save(path)
    return path, data


def test_page_loads_without_errors_and_draws_one_mark_per_layer(chromium, page):
    path, data = page
    status = _open(chromium, path).status
    rejected = sum(1 for x in data["layers"] for c in x["candidates"]
                   if c["rejected_because"] is not None and c["predicted_us"] is not None)
    assert int(status["data-layer-marks"]) == len(data["layers"])
    assert int(status["data-measured-marks"]) == len(data["layers"]) - 1
    assert int(status["data-rejected-marks"]) == rejected > 0
    assert int(status["data-rows"]) == len(data["layers"])
    assert status["data-expanded"] == "0"


def test_sorting_and_expanding_from_the_address(chromium, page):
    path, data = page
    status = _open(chromium, path, "sort=predicted_speedup:desc&expand=all").status
    expected = sorted(range(len(data["layers"])), key=lambda i: -data["layers"][i]["predicted_speedup"])
    assert status["data-order"] == ",".join(map(str, expected))
    assert int(status["data-expanded"]) == len(data["layers"])
    by_name = _open(chromium, path, "sort=name:asc").status["data-order"].split(",")
    names = [data["layers"][int(i)]["name"] for i in by_name]
    assert names[0] < names[-1]


def test_names_from_the_model_stay_text(chromium, page):
    path, _ = page
    parsed = _open(chromium, path)
    assert parsed.tags.count("script") == 1  # only the page's own
    assert "img" not in parsed.tags


def test_unknown_sort_column_is_reported_on_the_page(chromium, page):
    path, _ = page
    run = dump_dom(chromium, path, "sort=bogus:asc")
    assert re.search(r'<div id="js-errors"[^>]*><div>unknown sort column bogus</div>', run.dom)
