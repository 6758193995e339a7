"""The measuring harness on the CPU with its 'tiny' grid: output, resumption, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from sparsec.errors import FingerprintError
from sparsec.fingerprint import load_fingerprint
from sparsec.fingerprint.families import Family, Variant, check_output, dense_family
from sparsec.fingerprint.measure import GRIDS, measure
from sparsec.fingerprint.timing import rotation_count


def quiet():
    return Console(file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "tiny-cpu.json"
    measure(out, grid="tiny", console=quiet(), device="cpu")
    return out


def test_tiny_measurement_is_a_complete_valid_fingerprint(tiny):
    fp = load_fingerprint(tiny)
    assert fp.complete and fp.name == "tiny-cpu" and fp.device["kind"] == "cpu"
    grid = GRIDS["tiny"]
    dense = [e for e in fp.data["kernels"]["dense"] if e["dtype"] == "float32"]
    assert {(e["M"], e["N"], e["K"]) for e in dense} == {(M, N, K) for M in grid.Ms for N, K in grid.shapes}
    assert all(e["mode"] == "eager" and e["kernel"] == "torch-cpu" and e["us"] > 0 for e in dense)
    # every sparsec family runs its plain-torch reference on the CPU
    for family in ("2:4", "block", "lowrank", "monarch"):
        kernels = {e["kernel"] for e in fp.data["kernels"][family]}
        assert kernels == {f"sparsec-reference-{family}"}, family
    assert "2:4 [cusparselt]" in fp.data["skipped"]
    m = fp.data["measured"]
    assert m["copy_GBps"] > 0 and m["peak_tflops"]["float32"] > 0 and m["launch_us"]["graph"] is None
    assert set(m["rest_us"]) == {"norm", "attention"}
    assert all(v["eager"] > 0 and v["graph"] is None for v in m["rest_us"].values())  # a CPU has no CUDA graphs
    assert set(fp.data["granules"]["tile"]) == {"M", "N", "K"}
    assert fp.data["method"]["statistic"].startswith("min over")
    # predictions on grid points give back the measurement
    e = dense[-1]
    assert fp.predict("dense", e["M"], e["N"], e["K"], "float32") == pytest.approx(e["us"], rel=1e-9)


def test_rerun_of_complete_file_is_refused(tiny):
    with pytest.raises(FingerprintError, match="already a complete fingerprint; pass --fresh"):
        measure(tiny, grid="tiny", console=quiet(), device="cpu")


def test_partial_run_resumes_without_repeating_work(tmp_path):
    out = tmp_path / "part.json"
    measure(out, grid="tiny", budget_s=0.0, console=quiet(), device="cpu")  # probes only, then out of budget
    part = json.loads(out.read_text())
    assert part["complete"] is False and part["grid"]["done"] == [] and part["kernels"] == {}
    assert part["measured"]["copy_GBps"] > 0
    assert load_fingerprint(out).complete is False  # a partial file still loads
    measure(out, grid="tiny", console=quiet(), device="cpu")
    full = json.loads(out.read_text())
    assert full["complete"] is True
    # probes are not run again; peaks can only rise, to the best rate the dense grid reached
    assert full["measured"]["copy_GBps"] == part["measured"]["copy_GBps"]
    assert full["measured"]["launch_us"] == part["measured"]["launch_us"]
    for dtype, peak in part["measured"]["peak_tflops"].items():
        assert full["measured"]["peak_tflops"][dtype] >= peak
    keys = [(f, e["M"], e["N"], e["K"], e["dtype"], e["mode"], e["kernel"], e.get("block"), e.get("rank"))
            for f, es in full["kernels"].items() for e in es]
    assert len(keys) == len(set(keys)) > 0


def test_partial_file_of_another_grid_or_garbage_is_refused(tmp_path):
    out = tmp_path / "part.json"
    measure(out, grid="tiny", budget_s=0.0, console=quiet(), device="cpu")
    with pytest.raises(FingerprintError, match="different grid; pass --fresh"):
        measure(out, grid="cpu", budget_s=0.0, console=quiet(), device="cpu")
    out.write_text("{ truncated")
    with pytest.raises(FingerprintError, match="not a readable fingerprint"):
        measure(out, grid="tiny", console=quiet(), device="cpu")


def test_wrong_kernel_is_caught_before_timing():
    gen = torch.Generator().manual_seed(0)
    good = dense_family(torch.device("cpu"))
    w, dense = good.build(Variant("dense"), 64, 32, torch.float32, "cpu", gen)
    assert check_output(good, w, dense, 64, 32, torch.float32, "cpu", gen) is None
    halved = Family("dense", "broken", good.build, lambda x, w: 0.5 * (x @ w.t()), ("float32",), good.variants)
    reason = check_output(halved, w, dense, 64, 32, torch.float32, "cpu", gen)
    assert reason.startswith("relative error 0.5 of y against the dense equivalent exceeds 0.01")


def test_rotation_covers_the_cache():
    assert rotation_count(1 << 20, 64 << 20) == 32  # capped
    assert rotation_count(3 << 20, 8 << 20) == 3
    assert rotation_count(1 << 30, 8 << 20) == 1


def test_implausible_points_are_found_along_M():
    from sparsec.fingerprint.measure import implausible_points

    def curve(times, **extra):
        return [{"M": M, "N": 64, "K": 32, "dtype": "float32", "mode": "eager", "us": t, "kernel": "k", **extra}
                for M, t in zip((1, 2, 4, 8, 16), times)]

    smooth = curve([10, 10.5, 12, 20, 39])  # flat, then proportional: nothing to redo
    assert implausible_points({"dense": smooth}) == {}
    # M=2 slower than M=4 by more than 30%: the smaller M is suspect;
    # M=16 more than 1.3x proportional growth over M=8: the larger one is
    spiky = curve([10, 40, 12, 20, 60])
    assert implausible_points({"dense": spiky}) == {"dense|k|float32|dense|64x32": {2, 16}}
    blocks = curve([10, 40, 12, 20, 39], block=16, density=0.5)
    assert implausible_points({"block": blocks}) == {"block|k|float32|block:16:0.5|64x32": {2}}


def test_redo_measures_one_family_again_and_keeps_the_rest(tmp_path):
    out = tmp_path / "fp.json"
    measure(out, grid="tiny", console=quiet(), device="cpu")
    before = json.loads(out.read_text())
    measure(out, grid="tiny", redo=["block"], console=quiet(), device="cpu")
    after = json.loads(out.read_text())
    assert after["complete"] is True
    assert after["kernels"]["dense"] == before["kernels"]["dense"]  # untouched
    assert len(after["kernels"]["block"]) == len(before["kernels"]["block"]) > 0
    assert after["kernels"]["block"] != before["kernels"]["block"]  # timed anew: times differ
    assert sorted(after["grid"]["done"]) == sorted(before["grid"]["done"])


def test_redo_works_on_a_file_measured_before_a_family_existed_and_leaves_that_family_out(tiny, tmp_path):
    """A fingerprint from before ``act`` was a family: redoing block is not refused as "a different
    grid", times block again, and does not start measuring act (that takes --redo act)."""
    doc = json.loads(tiny.read_text())
    assert doc["kernels"].get("act")
    doc["kernels"].pop("act")
    doc["grid"]["params"].pop("act")
    doc["grid"]["done"] = [k for k in doc["grid"]["done"] if not k.startswith("act|")]
    out = tmp_path / "old.json"
    out.write_text(json.dumps(doc))
    measure(out, grid="tiny", redo=["block"], console=quiet(), device="cpu")
    after = json.loads(out.read_text())
    assert after["complete"] is True and not after["kernels"].get("act") and "act" not in after["grid"]["params"]
    assert after["kernels"]["block"] != doc["kernels"]["block"] and after["kernels"]["dense"] == doc["kernels"]["dense"]
    measure(out, grid="tiny", redo=["act"], console=quiet(), device="cpu")
    assert json.loads(out.read_text())["kernels"]["act"]


def test_redo_of_a_name_nothing_here_measures_is_refused_and_the_file_left_as_it_was(tiny, tmp_path):
    out = tmp_path / "fp.json"
    out.write_text(tiny.read_text())
    with pytest.raises(FingerprintError, match=r"--redo blok: no family or kernel of that name.*known here: .*block"):
        measure(out, grid="tiny", redo=["blok"], console=quiet(), device="cpu")
    with pytest.raises(FingerprintError, match=r"--redo sparsec-triton-block: it cannot be measured on this cpu "
                                               r"device \(Triton kernels need a CUDA device\)"):
        measure(out, grid="tiny", redo=["sparsec-triton-block"], console=quiet(), device="cpu")
    assert out.read_text() == tiny.read_text()


def test_extend_continues_a_curve_stopped_early_from_where_it_stopped(tiny, tmp_path):
    from sparsec.fingerprint.measure import _entry_key

    doc = json.loads(tiny.read_text())
    Ms = GRIDS["tiny"].Ms
    block = doc["kernels"]["block"]
    key = _entry_key("block", block[0])
    stop = Ms[1]
    before = [e for e in block if _entry_key("block", e) == key and e["M"] <= stop]
    doc["kernels"]["block"] = [e for e in block if _entry_key("block", e) != key or e["M"] <= stop]
    doc["skipped"][f"{key} M>{stop}"] = "9.9x slower than dense at M=2 in every mode; larger M not measured"
    out = tmp_path / "cut.json"
    out.write_text(json.dumps(doc))
    others = {f: len(v) for f, v in doc["kernels"].items() if f != "block"}

    measure(out, grid="tiny", extend=True, console=quiet(), device="cpu")
    after = json.loads(out.read_text())
    assert after["complete"] and not any(k.startswith(key) for k in after["skipped"])
    curve = [e for e in after["kernels"]["block"] if _entry_key("block", e) == key]
    assert sorted((e["M"], e["mode"]) for e in curve) == sorted((M, "eager") for M in Ms)  # each point once
    assert len(before) == 2  # M=1 and M=2 stayed; the harness measured only the rest
    assert {f: len(v) for f, v in after["kernels"].items() if f != "block"} == others  # nothing else re-run

    with pytest.raises(FingerprintError, match="no curve stopped early"):
        measure(out, grid="tiny", extend=True, console=quiet(), device="cpu")


def test_redo_up_to_measures_only_small_m_and_keeps_a_cut_curve_cut(tiny, tmp_path, monkeypatch):
    from sparsec.fingerprint.measure import Harness, _entry_key

    doc = json.loads(tiny.read_text())
    Ms = GRIDS["tiny"].Ms
    up_to, stop = Ms[0], Ms[1]
    block = doc["kernels"]["block"]
    cut_key = _entry_key("block", block[0])
    doc["kernels"]["block"] = [e for e in block if _entry_key("block", e) != cut_key or e["M"] <= stop]
    doc["skipped"][f"{cut_key} M>{stop}"] = "9.9x slower than dense at M=2 in every mode; larger M not measured"
    out = tmp_path / "small.json"
    out.write_text(json.dumps(doc))

    timed = []
    point = Harness._point

    def recording(self, job, weights, M, gen):
        timed.append((job.key, M))
        return point(self, job, weights, M, gen)

    monkeypatch.setattr(Harness, "_point", recording)
    measure(out, grid="tiny", redo=["block"], redo_up_to=up_to, console=quiet(), device="cpu")
    after = json.loads(out.read_text())
    assert after["complete"]
    old = {(_entry_key("block", e), e["M"], e["mode"]): e["us"] for e in doc["kernels"]["block"]}
    new = {(_entry_key("block", e), e["M"], e["mode"]): e["us"] for e in after["kernels"]["block"]}
    assert set(new) == set(old)  # the same points, none added past the cut
    assert all(new[k] == old[k] for k in old if k[1] > up_to)  # larger M untouched
    # every block curve timed anew at small M, and nothing else timed at all
    assert {key for key, _ in timed} == {k[0] for k in old} and all(M <= up_to for _, M in timed)
    assert f"{cut_key} M>{stop}" in after["skipped"]
    assert after["kernels"]["dense"] == doc["kernels"]["dense"]


def test_a_format_that_rounds_before_its_threshold_is_checked_in_its_own_dtype():
    """actrot rounds its rotated inputs to bfloat16, then skips those under the threshold: a float32
    reference skips other inputs near it (over 2% of y at S = 0.7), so the check runs the reference
    in the layer's dtype, where a right kernel agrees with it."""
    from sparsec.fingerprint.families import _randn, codegen_families

    family = next(f for f in codegen_families(torch.device("cpu"))[0] if f.family == "actrot")
    variant = next(v for v in family.variants(512, 512) if v.spec == "actrot:0.7")
    float32_errors = []
    for seed in range(3):
        w, dense = family.build(variant, 512, 512, torch.bfloat16, "cpu", torch.Generator().manual_seed(seed))
        assert check_output(family, w, dense, 512, 512, torch.bfloat16, "cpu",
                            torch.Generator().manual_seed(100 + seed)) is None
        x = _randn((8, 512), torch.bfloat16, "cpu", torch.Generator().manual_seed(100 + seed))
        y, ref = family.run(x, w).float(), family.reference(x.float(), w.to(dtype=torch.float32)).float()
        float32_errors.append(float((y - ref).norm() / ref.norm()))
    assert max(float32_errors) > 0.02  # the premise: a float32 reference would have refused it


@pytest.mark.parametrize("lead", [True, False])
def test_graph_points_are_timed_behind_a_lead_kernel_as_the_document_was(tiny, tmp_path, lead):
    # a document measured with each graph-replayed call behind a kernel of its own is extended that
    # way, and one measured back to back stays back to back: the points of one file agree
    from types import SimpleNamespace

    from sparsec.fingerprint.measure import Harness, Job

    doc = json.loads(tiny.read_text())
    doc["method"].pop("graph_lead", None)
    if lead:
        doc["method"]["graph_lead"] = "each call behind a kernel of its own"
    h = Harness(tmp_path / "x.json", GRIDS["tiny"], 60.0, doc, quiet())
    asked = []
    h.clock = SimpleNamespace(cuda=True, warm=lambda calls: 1e-5, eager=lambda calls, single: 1.0,
                              graph=lambda calls, single, lead=False: asked.append(lead) or 1.0)
    fam = dense_family(torch.device("cpu"))
    job = Job(fam, "float32", fam.variants(64, 64)[0], (64, 64), 0)
    gen = torch.Generator().manual_seed(0)
    weights = [fam.build(job.variant, 64, 64, torch.float32, torch.device("cpu"), gen)[0]]
    assert h._point(job, weights, 2, gen) == {"eager": 1.0, "graph": 1.0}
    assert asked == [lead]


def test_a_fresh_gpu_document_says_how_graph_points_are_timed_and_validates(monkeypatch):
    # a CUDA fingerprint begun afresh records graph_lead in its method, and the schema admits it
    import sparsec.fingerprint.measure as fm
    from sparsec.fingerprint.schema import validate_fingerprint
    from sparsec.fingerprint.timing import TimingPolicy

    shipped = load_fingerprint("h200").data
    monkeypatch.setattr(fm, "describe_device", lambda kind: dict(shipped["device"]))
    monkeypatch.setattr(fm, "software_versions", lambda kind: dict(shipped["software"]))
    doc = fm._new_document("gpu", GRIDS["tiny"], "cuda", TimingPolicy(), "torch.cuda.Event")
    assert "behind a small elementwise kernel" in doc["method"]["graph_lead"]
    validate_fingerprint(doc)
    cpu = fm._new_document("cpu", GRIDS["tiny"], "cpu", TimingPolicy(), "time.perf_counter")
    assert "graph_lead" not in cpu["method"]


def test_rest_probes_are_measured_into_an_existing_fingerprint_and_nothing_else_changes(tiny, tmp_path):
    from sparsec.fingerprint.measure import measure_rest

    doc = json.loads(tiny.read_text())
    del doc["measured"]["rest_us"]                       # as a fingerprint measured before the probes
    out = tmp_path / "old.json"
    out.write_text(json.dumps(doc))
    measure_rest(out, device="cpu", console=quiet())
    after = json.loads(out.read_text())
    assert set(after["measured"].pop("rest_us")) == {"norm", "attention"}
    assert after == doc


def test_rest_probes_are_refused_for_a_missing_file_or_another_devices(tiny, tmp_path):
    from sparsec.fingerprint.measure import measure_rest

    with pytest.raises(FingerprintError, match="does not exist: measure the device's fingerprint first"):
        measure_rest(tmp_path / "none.json", device="cpu", console=quiet())
    doc = json.loads(tiny.read_text())
    doc["device"]["name"] = "another CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    before = other.read_text()
    with pytest.raises(FingerprintError, match="rest kernels are measured into the fingerprint of the device"):
        measure_rest(other, device="cpu", console=quiet())
    assert other.read_text() == before


def test_a_rest_probe_that_cannot_run_is_left_out_with_its_reason(monkeypatch):
    from sparsec.fingerprint import probes
    from sparsec.fingerprint.timing import Clock

    def no_attention(*args, **kwargs):
        raise RuntimeError("no kernel for this dtype\nmore detail")

    monkeypatch.setattr(probes.F, "scaled_dot_product_attention", no_attention)
    skipped = {}
    out = probes.rest_kernels(Clock(torch.device("cpu"), GRIDS["tiny"].policy), skipped)
    assert set(out) == {"norm"} and out["norm"]["eager"] > 0
    assert skipped == {"rest_us.attention": "RuntimeError: no kernel for this dtype"}


def _cpu_clock_with_graph_as_eager(monkeypatch):
    """A CPU clock whose ``graph`` times the calls eagerly: the fused probes' compile-and-call path
    runs here, where no CUDA graph can."""
    from sparsec.fingerprint.timing import Clock

    clock = Clock(torch.device("cpu"), GRIDS["tiny"].policy)
    monkeypatch.setattr(clock, "graph", lambda calls, single=None: clock.eager(calls, single))
    return clock


def test_the_fused_probes_time_what_inductor_makes_of_a_norm_and_an_activation(monkeypatch):
    import shutil

    from sparsec.fingerprint import probes

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler on a CPU")
    torch._dynamo.reset()
    skipped = {}
    out = probes.fused_rest_kernels(_cpu_clock_with_graph_as_eager(monkeypatch), skipped)
    assert skipped == {}
    assert set(out) == {"fused_norm", "fused_pointwise"}
    assert all(v["eager"] is None and v["graph"] > 0 for v in out.values())
    # a CPU's own measurement leaves them out: its lowering runs the rest eagerly
    from sparsec.fingerprint.timing import Clock

    assert not set(probes.rest_kernels(Clock(torch.device("cpu"), GRIDS["tiny"].policy))) & set(out)


def test_a_fused_probe_inductor_cannot_compile_is_left_out_with_its_reason(monkeypatch):
    from sparsec.fingerprint import probes

    def no_compiler(*args, **kwargs):
        raise OSError("no C compiler found\nmore detail")

    monkeypatch.setattr(probes.torch, "compile", no_compiler)
    skipped = {}
    assert probes.fused_rest_kernels(_cpu_clock_with_graph_as_eager(monkeypatch), skipped) == {}
    assert skipped == {"rest_us.fused_norm": "OSError: no C compiler found",
                       "rest_us.fused_pointwise": "OSError: no C compiler found"}
