"""A real torch.compile run with a graph break: silent by default, one log line per compiled
graph with SPARSEC_LOG=info, and a report the renderers take as it comes from the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rich.console import Console

from sparsec.report import Report, render_html, render_table

# Compiles the same two-graph model twice in one interpreter (imports dominate the run time):
# first under Python's default logging setup, then after turning SPARSEC_LOG=info on.
_SCRIPT = """
import sys, torch, torch.nn as nn

class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)

torch.manual_seed(0)
model, x = Broken(), torch.randn(256, 64)
with torch.no_grad():
    torch.compile(model, backend="sparsec", options={"fingerprint": "cpu", "error_budget": 0.05,
                                                      "report": sys.argv[1]})(x)
    sys.stderr.write("=== now with SPARSEC_LOG=info\\n")
    sys.stderr.flush()
    from sparsec.logs import configure_from_env
    configure_from_env({"SPARSEC_LOG": "info"})
    torch._dynamo.reset()
    torch.compile(model, backend="sparsec", options={"fingerprint": "cpu", "error_budget": 0.05,
                                                      "report": sys.argv[2]})(x)
"""


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compiled")
    env = {k: v for k, v in os.environ.items() if k != "SPARSEC_LOG"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder / "a.json"), str(folder / "b.json")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    quiet, _, loud = done.stderr.partition("=== now with SPARSEC_LOG=info\n")
    return done.stdout, quiet, loud, folder / "a.json"


def test_torch_compile_prints_nothing_from_sparsec_by_default(compiled_run):
    stdout, quiet, _, _ = compiled_run
    assert "sparsec" not in stdout
    assert [line for line in quiet.splitlines() if "sparsec" in line] == []


def test_sparsec_log_info_gives_one_summary_line_per_compiled_graph(compiled_run):
    _, _, loud, _ = compiled_run
    lines = [line for line in loud.splitlines() if line.startswith("sparsec")]
    assert len(lines) == 2, loud
    assert lines[0].startswith("sparsec INFO: graph 0: ") and lines[1].startswith("sparsec INFO: graph 1: ")
    assert all("linear layer" in line and "fingerprint cpu" in line for line in lines)


def test_the_pipeline_report_renders(compiled_run):
    *_, path = compiled_run
    report = Report.load(path)
    assert [(x["name"], x["graph"]) for x in report.layers] == [("a", 0), ("b", 1)]
    console = Console(record=True, width=200, color_system=None)
    console.print(render_table(report))
    text = console.export_text()
    assert "fingerprint cpu" in text and "a " in text and "b " in text
    # the model runs on the CPU (whether or not the machine has a GPU): a warning only if the shipped
    # cpu fingerprint was measured on another processor than this one
    from sparsec.fingerprint import load_fingerprint

    assert "describes a cuda device" not in text
    if load_fingerprint("cpu").matches_current_device("cpu") is None:
        assert "was measured on" not in text and "was measured with" not in text
    page = render_html(report)
    assert page.count('class="mark layer predicted"') == 2
