"""The command line as a shell user meets it: Ctrl-C at any moment and a closed pipe give one line
or nothing, never a traceback."""

from __future__ import annotations

import pytest

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "report"))
from report_factory import make_report  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "tiny_encoder.onnx"
CLI = [sys.executable, "-c", "import sys; from sparsec.cli import main; sys.exit(main())"]  # as the console script
# the same, saying when main() is about to run, so that a signal can be sent at a known moment
CLI_READY = [sys.executable, "-c", "import sys; from sparsec.cli import main; sys.stderr.write('ready\\n'); "
                                   "sys.stderr.flush(); sys.exit(main())"]


def test_importing_the_command_line_loads_no_torch():
    code = "import sys, sparsec.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_ctrl_c_while_the_first_imports_run_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.Popen([*CLI_READY, "optimize", str(SAMPLE), "-o", str(tmp_path / "out.onnx")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline() == "ready\n"
    time.sleep(0.3)  # main() has begun (its handler is set up at once); torch alone takes longer to import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["sparsec: interrupted; nothing was written"]
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(make_report(seed=1, blocks=4)))
    b.write_text(json.dumps(make_report(seed=2, blocks=4)))
    proc = subprocess.Popen([*CLI, "report", "diff", str(a), str(b), "--json", "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` having read enough
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_an_interrupt_the_interpreter_swallowed_still_stops_the_command_before_it_writes(tmp_path):
    """SIGINT raised inside a finaliser is printed as "ignored" by Python and lost; the command line
    remembers it and stops at its next file write with the one line, status 130, nothing written;
    and gives Python's handler back when it returns."""
    code = ("import os, signal, sys, weakref\n"
            "from sparsec.cli import main\n"
            "import sparsec.interrupts as i\n"
            "import contextlib\n"
            "real = i.installed\n"
            "@contextlib.contextmanager\n"
            "def installed():\n"
            "    with real():\n"
            "        class Held: pass\n"
            "        held = Held()\n"
            "        weakref.finalize(held, lambda: os.kill(os.getpid(), signal.SIGINT))\n"
            "        del held\n"  # the finaliser runs here, the KeyboardInterrupt it raises is swallowed
            "        yield\n"
            "i.installed = installed\n"
            "sys.exit(main())\n")
    proc = subprocess.run([sys.executable, "-c", code, "optimize", str(SAMPLE), "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "sparsec: interrupted; nothing was written"
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_gives_the_interrupt_handler_back():
    from sparsec.cli import main

    before = signal.getsignal(signal.SIGINT)
    assert main(["report", "--help"]) == 0
    assert signal.getsignal(signal.SIGINT) is before
