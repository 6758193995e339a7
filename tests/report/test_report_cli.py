"""``sparsec report show | html | diff`` on saved reports."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
from report_factory import make_report

from sparsec.commands import report as report_command
from sparsec.errors import ReportError
from sparsec.report import Report


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sparsec")
    sub = parser.add_subparsers(dest="command", required=True)
    report_command.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def saved(tmp_path, report_dict):
    return Report(report_dict).save(tmp_path / "r.json")


def test_show_prints_the_table(saved, report_dict, capsys):
    assert _run(["report", "show", str(saved), "--width", "220"]) == 0
    out = capsys.readouterr().out
    assert all(layer["name"] in out for layer in report_dict["layers"])
    assert f"{report_dict['totals']['rewritten']} of {report_dict['totals']['layers']} layers rewritten" in out


def test_html_writes_the_page_next_to_the_report_or_where_asked(saved, tmp_path, capsys):
    assert _run(["report", "html", str(saved)]) == 0
    default = saved.with_suffix(".html")
    assert default.read_text(encoding="utf-8").startswith("<!doctype html>")
    target = tmp_path / "page.html"
    assert _run(["report", "html", str(saved), "-o", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    with pytest.raises(ReportError, match=r"must be written to a \.html file"):
        _run(["report", "html", str(saved), "-o", str(tmp_path / "page.json")])
    with pytest.raises(ReportError, match="folder .* does not exist"):
        _run(["report", "html", str(saved), "-o", str(tmp_path / "nope" / "page.html")])
    with pytest.raises(ReportError, match="folder /proc is not writable"):
        _run(["report", "html", str(saved), "-o", "/proc/page.html"])


def test_diff_text_json_and_exit_code(saved, report_dict, tmp_path, capsys):
    after = copy.deepcopy(report_dict)
    after["layers"][0]["format"] = "lowrank:7"
    other = Report(after).save(tmp_path / "after.json")
    assert _run(["report", "diff", str(saved), str(saved), "--exit-code"]) == 0
    assert "no differences" in capsys.readouterr().out
    assert _run(["report", "diff", str(saved), str(other), "--exit-code", "--width", "220"]) == 1
    assert "lowrank:7" in capsys.readouterr().out
    assert _run(["report", "diff", str(saved), str(other), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    changed = [x for x in data["layers"] if x["status"] == "format"]
    assert [x["format_after"] for x in changed] == ["lowrank:7"]


def test_bad_report_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**make_report(blocks=1), "error_budget": "one percent"}))
    with pytest.raises(ReportError, match=r"bad\.json: .*\$\.error_budget: expected number, got str"):
        _run(["report", "show", str(bad)])


def test_the_sparsec_command_reports_errors_in_one_line(tmp_path, capsys):
    cli = pytest.importorskip("sparsec.cli")
    try:
        cli.build_parser()
    except ImportError as exc:  # another subcommand has not landed in this checkout
        pytest.skip(f"the sparsec parser cannot be built yet: {exc}")
    assert cli.main(["report", "show", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"sparsec: error: {tmp_path / 'missing.json'}: no such report file"
