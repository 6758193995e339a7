"""``sparsec fingerprint show`` and ``list`` on fingerprints with a known crossover."""

from __future__ import annotations

import argparse
import json

import pytest

from sparsec.commands import fingerprint as fp_cmd
from sparsec.fingerprint import Fingerprint

try:
    from test_fingerprint import synthetic
except ImportError:  # tests collected as a package
    from tests.test_fingerprint import synthetic


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="sparsec")
    fp_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def crossing(M, N, K, p=1.0):
    """Dense: 10 us + work. Block at kept fraction p < 1: 50 us + p * work. Block wins from
    M > 40 / ((1 - p) * N * K / 1e5): for 512x512 at p=0.25 that is M > 20.3, so from M=32."""
    return (10.0 if p == 1.0 else 50.0) + p * M * N * K / 1e5


@pytest.fixture
def fp_file(tmp_path):
    data = synthetic(crossing, families=("dense", "block"), block_params=((32, 0.25), (32, 0.5)))
    p = tmp_path / "cross.json"
    p.write_text(json.dumps(data))
    return p


def test_crossover_table_finds_where_the_format_wins(fp_file):
    fp = Fingerprint(json.loads(fp_file.read_text()))
    rows = {(n, k): (wins, best) for n, k, wins, best in fp_cmd.crossover_table(fp, "block:32:0.25", "float32", "eager")}
    assert rows[(512, 512)][0] == [(32, None)]
    # 4096x4096: 40 / (0.75 * 167.77) = 0.32, so block wins at every M including 1
    assert rows[(4096, 4096)][0] == [(1, None)]
    assert rows[(512, 512)][1] == pytest.approx(crossing(16384, 512, 512) / crossing(16384, 512, 512, 0.25))


def test_show_prints_device_ceilings_and_crossovers(fp_file, capsys):
    assert run_cli("fingerprint", "show", str(fp_file)) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "Test CPU" in out and "complete" in out
    assert "copy 10.0 GB/s" in out and "float32 0.2" in out
    assert "block vs dense, float32: the M where it is faster (eager; - never)" in out
    header = next(ln for ln in out.splitlines() if "N x K" in ln)
    assert [c.strip() for c in header.split("┃")[1:4]] == ["N x K", "block:32:0.25", "block:32:0.5"]
    cells = lambda shape: [c.strip() for c in next(ln for ln in out.splitlines() if shape in ln).split("│")[1:4]]  # noqa: E731
    # at kept fraction 0.5 the crossover on 512x512 is M > 40 / (0.5 * 2.62) = 30.5 -> 32 as well
    assert cells("512x512") == ["512x512", "≥32", "≥32"]
    # 1024x1024, p=0.5: M > 40 / (0.5 * 10.49) = 7.6 -> 8; p=0.25: M > 5.1 -> 8
    assert cells("1024x1024") == ["1024x1024", "≥8", "≥8"]


def small_m_winner(M, N, K, p=1.0):
    """Dense: 20 us + work. Sparse at p=0.25: 5 us + 1.5 * work: wins while work = M * N * K / 1e5 < 30."""
    return (20.0 if p == 1.0 else 5.0) + (1.0 if p == 1.0 else 6 * p) * M * N * K / 1e5


def test_a_format_winning_only_at_small_M_shows_that_range(tmp_path):
    data = synthetic(small_m_winner, families=("dense", "block"), block_params=((32, 0.25),))
    fp = Fingerprint(data)
    rows = {(n, k): wins for n, k, wins, _ in fp_cmd.crossover_table(fp, "block:32:0.25", "float32", "eager")}
    # 512x512 at p=0.25: wins while M * 2.62 < 30, i.e. M <= 11.4
    Ms = sorted({e["M"] for e in data["kernels"]["dense"] if (e["N"], e["K"]) == (512, 512)})
    last = max(m for m in Ms if m * 512 * 512 / 1e5 < 30)
    assert rows[(512, 512)] == [(Ms[0], last)]
    assert fp_cmd.render_wins(rows[(512, 512)]) == f"{Ms[0]}-{last}"
    assert fp_cmd.render_wins([(1, 16), (2048, None)]) == "1-16,≥2048" and fp_cmd.render_wins([]) == "-"


def test_show_rejects_corrupt_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "sparsec.fingerprint/1", "name": ')
    with pytest.raises(Exception, match="not valid JSON"):
        run_cli("fingerprint", "show", str(bad))


def test_list_names_user_fingerprints(tmp_path, monkeypatch, capsys, fp_file):
    monkeypatch.setenv("SPARSEC_HOME", str(tmp_path / "home"))
    own = tmp_path / "home" / "fingerprints"
    own.mkdir(parents=True)
    (own / "mine.json").write_text(fp_file.read_text())
    assert run_cli("fingerprint", "list") == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if "mine" in ln)
    assert "user" in row and "Test CPU" in row and "complete" in row


def test_redo_up_to_alone_or_on_a_missing_file_is_refused_before_measuring(tmp_path):
    from sparsec.errors import FingerprintError

    out = tmp_path / "fp.json"
    with pytest.raises(FingerprintError, match="--redo-up-to needs --redo KERNEL"):
        run_cli("fingerprint", "measure", "-o", str(out), "--grid", "tiny", "--redo-up-to", "4")
    assert not out.exists()
    with pytest.raises(FingerprintError, match="does not exist: --redo and --extend continue an existing"):
        run_cli("fingerprint", "measure", "-o", str(out), "--grid", "tiny", "--redo", "block", "--redo-up-to", "4")
    assert not out.exists()


@pytest.mark.parametrize("extra", [[], ["--onnxruntime"], ["--experts"], ["--rest"]])
def test_an_output_that_cannot_be_written_is_refused_before_measuring(tmp_path, extra):
    from sparsec.errors import FingerprintError

    with pytest.raises(FingerprintError, match="folder .* does not exist"):
        run_cli("fingerprint", "measure", "-o", str(tmp_path / "nope" / "fp.json"), "--grid", "tiny", *extra)
    with pytest.raises(FingerprintError, match="folder /proc is not writable"):
        run_cli("fingerprint", "measure", "-o", "/proc/fp.json", "--grid", "tiny", *extra)


def test_show_lists_the_fastest_expert_bank_implementation_per_token_count(capsys):
    assert run_cli("fingerprint", "show", "cpu") == 0
    out = capsys.readouterr().out
    assert "expert banks (float32): the fastest implementation per token count (eager)" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("│ 8, 2, 256 -> 512")]
    assert len(rows) == 5 and all(any(impl in r for impl in ("loop", "batched", "dense_all", "grouped")) for r in rows)


@pytest.mark.parametrize("lead", [True, False])
def test_show_says_how_a_gpu_fingerprints_graph_points_were_timed(lead, capsys, tmp_path):
    from sparsec.fingerprint import load_fingerprint

    shipped = load_fingerprint("h200")
    doc = json.loads(json.dumps(shipped.data))
    if lead:
        doc["method"]["graph_lead"] = "each call behind a small kernel of its own"
    else:
        doc["method"].pop("graph_lead", None)
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(doc))
    assert run_cli("fingerprint", "show", str(path)) == 0
    out = capsys.readouterr().out
    assert ("behind a small kernel of its own, taken off" in out) == lead
    assert ("graph points: back to back" in out) == (not lead)


def test_experts_and_rest_together_are_refused_before_measuring(tmp_path):
    from sparsec.errors import FingerprintError

    out = tmp_path / "fp.json"
    with pytest.raises(FingerprintError, match="--experts and --rest each add one section"):
        run_cli("fingerprint", "measure", "-o", str(out), "--experts", "--rest")
    assert not out.exists()


def test_show_says_whether_the_rest_kernels_were_measured(capsys, tmp_path):
    from sparsec.fingerprint import load_fingerprint

    doc = json.loads(json.dumps(load_fingerprint("cpu").data))
    doc["measured"].pop("rest_us", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    assert run_cli("fingerprint", "show", str(path)) == 0
    # whitespace normalised: the console wraps the line at whatever width the terminal has
    assert ("rest kernels: norm and attention not measured (add with 'sparsec fingerprint measure --rest')"
            in " ".join(capsys.readouterr().out.split()))
    doc["measured"]["rest_us"] = {"norm": {"eager": 4.5, "graph": None}}
    path.write_text(json.dumps(doc))
    assert run_cli("fingerprint", "show", str(path)) == 0
    assert ("rest kernels: norm 4.5 us eager, - us graph; attention not measured (add with 'sparsec fingerprint "
            "measure --rest')") in " ".join(capsys.readouterr().out.split())
