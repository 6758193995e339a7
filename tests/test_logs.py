"""The ``sparsec`` logger: silent under the default logging setup, one line per graph on request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "report"))
from report_factory import make_report  # noqa: E402

from sparsec import logs  # noqa: E402
from sparsec.report import Report  # noqa: E402

# A fresh interpreter: logging as an application that never configured it, then what sparsec
# logs for one compiled graph, plus a warning from a child logger.
_SCRIPT = """
import json, logging, sys
from sparsec.logs import log_report
log_report(json.loads(sys.stdin.read()))
logging.getLogger("sparsec.pipeline").warning("a warning nobody asked to see")
"""


def _run(report: dict, level: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SPARSEC_LOG"}
    if level is not None:
        env["SPARSEC_LOG"] = level
    return subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(report), env=env,
                          capture_output=True, text=True, timeout=60, check=True)


def test_nothing_is_printed_by_default():
    done = _run(make_report(blocks=1), None)
    assert done.stdout == "" and done.stderr == ""


def test_info_prints_one_summary_line_per_graph():
    report = make_report(blocks=1)
    done = _run(report, "info")
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"sparsec INFO: {logs.summary_line(report)}",
        "sparsec.pipeline WARNING: a warning nobody asked to see",
    ]


def test_debug_adds_a_line_per_layer():
    report = make_report(blocks=1)
    lines = _run(report, "debug").stderr.splitlines()
    assert lines[0] == f"sparsec INFO: {logs.summary_line(report)}"
    for layer in report["layers"]:
        assert any(layer["name"] in line and layer["format"] in line for line in lines[1:])


def test_unknown_level_is_named():
    done = _run(make_report(blocks=1), "loud")
    assert "SPARSEC_LOG='loud' is not a level; use one of debug, info, warning, error" in done.stderr


def test_configuring_twice_installs_one_handler():
    logger = logging.getLogger("sparsec")
    try:
        assert logs.configure_from_env({"SPARSEC_LOG": "debug"}) == logging.DEBUG
        assert logs.configure_from_env({"SPARSEC_LOG": "info"}) == logging.INFO
        assert sum(isinstance(h, logs._EnvHandler) for h in logger.handlers) == 1
        assert not logger.propagate
    finally:
        assert logs.configure_from_env({}) is None
    assert not any(isinstance(h, logs._EnvHandler) for h in logger.handlers)
    assert logger.propagate and logger.level == logging.NOTSET
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


def test_summary_line_counts_layers_and_formats():
    report = make_report(seed=3, blocks=2, tokens=2048, error_budget=0.03)
    line = logs.summary_line(report)
    rewritten = [x["format"] for x in report["layers"] if x["format"] != "dense"]
    assert line.startswith(f"{len(rewritten)} of {len(report['layers'])} linear layers rewritten (")
    top = max(set(rewritten), key=rewritten.count)
    assert f"{top} x{rewritten.count(top)}" in line
    t = report["totals"]
    linear = f"{t['predicted_us_dense'] / t['predicted_us']:.2f}x on linear layers alone"
    e2e = report["end_to_end"]
    if e2e.get("predicted_speedup") is not None and e2e.get("predicted_us_rest") is not None:
        assert f"predicted {e2e['predicted_speedup']:.2f}x end to end ({linear}" in line  # headline end to end
    elif e2e.get("predicted_speedup") is not None:
        assert f"predicted {linear}" in line and "; the rest of the graph unpriced" in line
    else:
        assert f"predicted {linear}" in line
    assert "fingerprint h200" in line and "1 warning" in line
    assert logs.summary_line(Report(report)) == line


def test_summary_line_says_which_data_the_error_was_measured_on_and_when_slower():
    report = make_report(seed=3, blocks=2, tokens=2048, error_budget=0.03)
    e2e = report["end_to_end"]
    e2e.update(measured_error=0.0099, heldout_error=None, predicted_speedup=1.05, measured_speedup=0.99,
               predicted_us_rest=100.0)
    report["totals"]["rewritten"] = 2
    line = logs.summary_line(report)
    assert "predicted 1.05x end to end (" in line and "on linear layers alone" in line
    assert "measured 0.99x end to end: SLOWER than the original" in line
    assert "error 0.99% of 3.00% budget on calibration data only" in line
    e2e.update(heldout_error=0.02, calibration="generated-ids", measured_speedup=1.2)
    line = logs.summary_line(report)
    assert "error 0.99% on calibration, 2.00% held out, of 3.00% budget" in line and "SLOWER" not in line
    assert "made-up token ids, so the error figure means little" in line


def test_summary_line_of_bare_layers_with_graph_indices():
    layers = make_report(blocks=1)["layers"]
    for layer in layers:
        layer["graph"] = 2
    line = logs.summary_line(layers)
    assert line.startswith("graph 2: ")
    dense = sum(x["predicted_us_dense"] for x in layers)
    assert f"({dense:,.1f} ->" in line
    assert "fingerprint" not in line
    with pytest.raises(TypeError, match="takes a report or a list of layers"):
        logs.summary_line(42)


def test_without_a_priced_rest_the_headline_says_it_covers_the_linear_layers_only():
    report = make_report(seed=3, blocks=1)
    report["end_to_end"].update(predicted_speedup=6.28, predicted_us_rest=None)
    line = logs.summary_line(report)
    assert "end to end" not in line.split(";")[1] and "on linear layers alone" in line
    assert "the rest of the graph unpriced" in line
