"""Fingerprint loader, validator and predictor.

The fingerprints here are synthetic: their times follow a known formula, so that interpolation
can be checked against the formula itself (a pure power law is reproduced exactly by log-log
interpolation, on and off the grid) and edge behaviour against the documented rule.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import sparsec.fingerprint.predict as fpmod
from sparsec.errors import FingerprintError
from sparsec.fingerprint import Fingerprint, load_fingerprint, normalize_dtype

GRID_M = [2**i for i in range(15)]  # 1 .. 16384
SHAPES = [(s, s) for s in (512, 1024, 2048, 4096)] + [(2048, 512), (4096, 1024), (512, 2048), (1024, 4096)]
# Interpolation is exact in log space, so only float rounding separates prediction and formula.
EXACT = 1e-9


def power_law(a=0.7, b=0.6, c=0.8, scale=1e-3):
    return lambda M, N, K, p=1.0: scale * M**a * N**b * K**c * p


def synthetic(time=None, *, kind="cpu", name="synthetic", device_name="Test CPU", families=("dense",),
              dtypes=("float32",), modes=("eager",), block_params=((32, 0.25), (32, 0.5), (64, 0.5)),
              rank_fracs=(0.125, 0.25), nblocks=(4, 16)):
    """A valid fingerprint dict whose times are ``time(M, N, K, param_factor)``."""
    time = time or (lambda M, N, K, p=1.0: 3.0 + p * M * N * K / 2e5)
    kernels = {}

    def add(family, kernel, extra, factor):
        for dtype in dtypes:
            for mode in modes:
                for N, K in SHAPES:
                    for M in GRID_M:
                        e = {"M": M, "N": N, "K": K, "dtype": dtype, "mode": mode,
                             "us": time(M, N, K, factor(N, K)), "kernel": kernel}
                        e.update(extra(N, K))
                        kernels.setdefault(family, []).append(e)

    if "dense" in families:
        add("dense", "torch-dense", lambda N, K: {}, lambda N, K: 1.0)
    if "2:4" in families:
        add("2:4", "cusparselt", lambda N, K: {}, lambda N, K: 0.6)
    if "block" in families:
        for B, D in block_params:
            add("block", f"sparsec-block-{B}", lambda N, K, B=B, D=D: {"block": B, "density": D},
                lambda N, K, D=D: D)
    if "lowrank" in families:
        for f in rank_fracs:
            add("lowrank", "sparsec-lowrank", lambda N, K, f=f: {"rank": int(f * min(N, K))},
                lambda N, K, f=f: f)
    if "monarch" in families:
        for nb in nblocks:
            add("monarch", "sparsec-monarch", lambda N, K, nb=nb: {"nblocks": nb}, lambda N, K, nb=nb: 1 / nb)
    return {
        "schema": "sparsec.fingerprint/1",
        "name": name,
        "created": "2025-01-01T00:00:00Z",
        "complete": True,
        "device": {"kind": kind, "name": device_name, "capability": None if kind == "cpu" else [9, 0],
                   "sms": None if kind == "cpu" else 132, "l2_bytes": 1 << 20, "memory_bytes": 1 << 34,
                   "cores": 2 if kind == "cpu" else None},
        "software": {"torch": "2.11.0", "triton": "3.6.0", "cuda": None, "driver": None},
        "measured": {"copy_GBps": 10.0, "peak_tflops": {"float32": 0.2}, "launch_us": {"eager": 3.0, "graph": None}},
        "granules": {"cache_line_bytes": 64},
        "kernels": kernels,
        "method": {"repeats": 9, "statistic": "median", "timer": "time.perf_counter"},
    }


def write(tmp_path, data, name="fp.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


# ------------------------------------------------------------------- loading
def test_round_trip_through_file(tmp_path):
    data = synthetic(families=("dense", "block"))
    fp = load_fingerprint(write(tmp_path, data))
    assert fp.data == data
    assert fp.name == "synthetic" and fp.device["name"] == "Test CPU"
    assert fp.source == str(tmp_path / "fp.json")
    assert len(fp.hash) == 12
    again = load_fingerprint(str(tmp_path / "fp.json"))
    assert again.hash == fp.hash
    changed = copy.deepcopy(data)
    changed["kernels"]["dense"][0]["us"] *= 1.01
    assert Fingerprint(changed).hash != fp.hash


def test_truncated_file_is_refused_with_clear_message(tmp_path):
    text = json.dumps(synthetic())
    p = tmp_path / "cut.json"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(FingerprintError, match=r"cut\.json is not valid JSON .*truncated or corrupted"):
        load_fingerprint(p)


@pytest.mark.parametrize(
    "mutate, field, problem",
    [
        (lambda d: d["kernels"]["dense"].__getitem__(3).update(us=-1.0), r"kernels\.dense\[3\]\.us", "must be > 0"),
        (lambda d: d["device"].pop("name"), r"device\.name", "required field is missing"),
        (lambda d: d["kernels"]["block"][0].pop("density"), r"kernels\.block\[0\]\.density", "required for block"),
        (lambda d: d["kernels"]["dense"][0].update(rank=4), r"kernels\.dense\[0\]\.rank", "not a parameter of dense"),
        (lambda d: d["kernels"].update(sparse=[]), r"kernels\.sparse", "unexpected key"),
        (lambda d: d["kernels"]["dense"][0].update(dtype="int8"), r"kernels\.dense\[0\]\.dtype", "must be one of"),
        (lambda d: d["kernels"]["dense"][0].update(M="8"), r"kernels\.dense\[0\]\.M", "expected integer"),
        (lambda d: d.update(schema="sparsec.fingerprint/0"), "schema", "this sparsec reads"),
    ],
)
def test_invalid_field_is_named(tmp_path, mutate, field, problem):
    data = synthetic(families=("dense", "block"))
    mutate(data)
    with pytest.raises(FingerprintError, match=f"field {field}: .*{problem}"):
        load_fingerprint(write(tmp_path, data))


def test_unknown_name_lists_what_exists(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEC_HOME", str(tmp_path))
    with pytest.raises(FingerprintError, match=r"unknown fingerprint 'nope': shipped are .*or pass the path"):
        load_fingerprint("nope")
    with pytest.raises(FingerprintError, match="does not exist"):
        load_fingerprint(tmp_path / "missing.json")


# ---------------------------------------------------------------- predicting
def test_grid_points_are_reproduced_exactly():
    fp = Fingerprint(synthetic(families=("dense", "2:4", "block", "lowrank", "monarch"), modes=("eager", "graph")))
    rng = random.Random(0)
    entries = [(f, e) for f, es in fp.data["kernels"].items() for e in es]
    for family, e in rng.sample(entries, 400):
        fmt = {"dense": "dense", "2:4": "2:4"}.get(family) or {
            "block": lambda: f"block:{e.get('block')}:{e.get('density')}",
            "lowrank": lambda: f"lowrank:{e.get('rank')}",
            "monarch": lambda: f"monarch:{e.get('nblocks')}",
        }[family]()
        got = fp.predict_detail(fmt, e["M"], e["N"], e["K"], e["dtype"], e["mode"])
        assert got.us == pytest.approx(e["us"], rel=EXACT), (fmt, e)
        assert got.kernel == e["kernel"] and got.note == ""


def test_power_law_is_exact_off_grid():
    law = power_law()
    fp = Fingerprint(synthetic(law))
    rng = random.Random(1)
    for _ in range(200):
        M = rng.randint(1, 16384)
        K = rng.randint(512, 4096)
        N = int(K * 2 ** rng.uniform(-2, 2))
        N = min(max(N, 512), 4096)
        if not (1 / 4 <= N / K <= 4) or N * K > 4096 * 4096 or N * K < 512 * 512:
            continue
        # Non-square lines span 512x2048 .. 1024x4096; outside them the size axis extrapolates.
        if N != K and not (512 * 2048 <= N * K <= 1024 * 4096):
            continue
        pred = fp.predict_detail("dense", M, N, K, "float32")
        assert pred.us == pytest.approx(law(M, N, K), rel=EXACT), (M, N, K)
        assert pred.note == ""


def test_prediction_is_monotone_between_grid_points():
    fp = Fingerprint(synthetic())  # 3 us + work: increasing in M, N and K
    prev = 0.0
    for M in range(1, 3000, 7):
        t = fp.predict("dense", M, 1500, 3000, "float32")
        assert t > prev
        prev = t
    lo, hi = fp.predict("dense", 64, 1024, 1024, "float32"), fp.predict("dense", 128, 1024, 1024, "float32")
    assert lo < fp.predict("dense", 100, 1024, 1024, "float32") < hi
    assert fp.predict("dense", 8, 1500, 1024, "float32") < fp.predict("dense", 8, 1600, 1024, "float32")


def test_beyond_the_grid_slope_is_clamped_and_noted():
    # beyond the last M: fixed cost + cost per token from the last two points (8192, 16384)
    affine = lambda M, N, K, f=1.0: 7.0 + 0.01 * M * (N * K) / 1e6  # noqa: E731
    fp = Fingerprint(synthetic(affine))
    p = fp.predict_detail("dense", 65536, 1024, 1024, "float32")
    assert p.us == pytest.approx(affine(65536, 1024, 1024), rel=EXACT)  # an affine law is exact
    assert "extrapolated beyond M=16384" in p.note
    flat_then_down = lambda M, N, K, f=1.0: 10.0 / M**0.2 * N * K / 1e6  # falls with M
    fp = Fingerprint(synthetic(flat_then_down))
    p = fp.predict_detail("dense", 65536, 1024, 1024, "float32")
    assert p.us == pytest.approx(flat_then_down(16384, 1024, 1024), rel=EXACT)  # no negative cost per token
    big = fp.predict_detail("dense", 4, 8192, 8192, "float32")
    assert "extrapolated beyond N*K=4096x4096" in big.note
    assert big.us == pytest.approx(flat_then_down(4, 4096, 4096) * 4, rel=EXACT)
    thin = fp.predict_detail("dense", 4, 4096, 256, "float32")
    assert "aspect N/K=16 outside measured 0.25..4; nearest used" in thin.note


def test_beyond_the_largest_weight_a_fixed_cost_is_not_scaled_up():
    # a launch's fixed cost plus bytes streamed: beyond the largest measured weight only the bytes grow,
    # so two stacked weights cost twice the bytes and one fixed cost (a log-log slope through the
    # smaller shapes, where the fixed cost weighs more, would price them cheaper than that)
    streamed = lambda M, N, K, f=1.0: 20.0 + (N * K + M * K) / 4e5  # noqa: E731
    fp = Fingerprint(synthetic(streamed))
    stacked = fp.predict_detail("dense", 1, 8192, 4096, "float32")
    assert "extrapolated beyond N*K=4096x4096" in stacked.note
    assert stacked.us == pytest.approx(streamed(1, 8192, 4096), rel=1e-3)


def test_below_the_smallest_weight_no_time_falls_under_the_fastest_timed():
    # a launch's fixed cost plus bytes streamed: below the smallest measured weight the time stays at
    # least the smallest weight's (a log-log slope through the smallest shapes carries it towards zero)
    streamed = lambda M, N, K, f=1.0: 3.0 + (N * K + M * K) / 4e5  # noqa: E731
    fp = Fingerprint(synthetic(streamed))
    for M in (1, 64):
        small = fp.predict_detail("dense", M, 128, 128, "float32")
        assert "extrapolated below N*K" in small.note
        assert small.us == pytest.approx(streamed(M, 512, 512), rel=EXACT)
    assert fp.predict("dense", 1, 1024, 1024, "float32") == pytest.approx(streamed(1, 1024, 1024), rel=EXACT)


def test_a_weight_never_costs_more_than_a_measured_weight_that_contains_it():
    # a library slow at one exact shape (cuBLAS at 512 x 2048 and one token on an H100): the aspects
    # interpolated around it must not carry that into a smaller weight, which could run padded as
    # any measured weight at least as large in both dimensions
    streamed = lambda M, N, K, f=1.0: 3.0 + (N * K + M * K) / 4e5  # noqa: E731
    slow_at = lambda M, N, K, f=1.0: streamed(M, N, K) * (3.0 if (N, K) == (512, 2048) else 1.0)  # noqa: E731
    fp = Fingerprint(synthetic(slow_at))
    assert fp.predict("dense", 1, 512, 2048, "float32") == pytest.approx(slow_at(1, 512, 2048), rel=EXACT)  # measured: kept
    p = fp.predict_detail("dense", 1, 192, 576, "float32")
    assert "capped at the time of the larger measured weight 1024x1024" in p.note
    assert p.us == pytest.approx(streamed(1, 1024, 1024), rel=EXACT)
    # where the interpolation is already under every containing weight, nothing is capped
    q = fp.predict_detail("dense", 1, 1024, 2048, "float32")
    assert "capped" not in q.note and q.us < streamed(1, 2048, 2048)


def test_format_parameters_interpolate_and_extrapolate():
    fp = Fingerprint(synthetic(power_law(), families=("dense", "block", "lowrank", "monarch")))
    law = power_law()
    # kept fraction enters as a factor: log-log in the parameter reproduces it between 0.25 and 0.5
    assert fp.predict("block:32:0.35", 64, 1024, 1024, "float32") == pytest.approx(law(64, 1024, 1024, 0.35), rel=EXACT)
    p = fp.predict_detail("block:32:0.1", 64, 1024, 1024, "float32")
    assert "kept fraction 0.1 below measured 0.25; extrapolated" in p.note
    assert p.us == pytest.approx(law(64, 1024, 1024, 0.1), rel=EXACT)  # slope 1 is within [0, 1]
    p = fp.predict_detail("block:16:0.5", 64, 1024, 1024, "float32")
    assert "block 32 measurements used for block 16" in p.note
    assert fp.predict("lowrank:192", 64, 1024, 1024, "float32") == pytest.approx(
        law(64, 1024, 1024, 192 / 1024), rel=EXACT)
    assert fp.predict("monarch:8", 64, 1024, 1024, "float32") == pytest.approx(law(64, 1024, 1024, 1 / 8), rel=EXACT)
    # beyond 16 monarch blocks the time may fall at most in proportion: slope -1 is kept
    p = fp.predict_detail("monarch:32", 64, 1024, 1024, "float32")
    assert p.us == pytest.approx(law(64, 1024, 1024, 1 / 32), rel=EXACT) and "monarch blocks 32 above" in p.note


def test_lowrank_is_composed_from_dense_when_not_measured():
    fp = Fingerprint(synthetic(families=("dense",)))
    p = fp.predict_detail("lowrank:256", 512, 2048, 4096, "float32")
    expected = fp.predict("dense", 512, 256, 4096, "float32") + fp.predict("dense", 512, 2048, 256, "float32")
    assert p.us == pytest.approx(expected, rel=EXACT)
    assert p.kernel == "torch-dense x2"
    assert p.note.startswith("composed from two dense GEMMs (512x4096->256, 512x256->2048)")
    assert "extrapolated below N*K" in p.note  # rank 256 is below the smallest measured N


def test_refusals_say_why():
    fp = Fingerprint(synthetic(families=("dense", "block")))
    assert fp.can_predict("dense", "float32") is None
    assert fp.can_predict("2:4", "float32") == "no 2:4 measurements on cpu"
    assert fp.can_predict("block:32:0.5", "bfloat16").startswith(
        "no block measurements for bfloat16 in eager mode on cpu (measured: float32 eager)")
    assert "is not one a fingerprint describes" in fp.can_predict("dense", "int8")
    assert "unknown format" in fp.can_predict("sparse", "float32")
    assert fp.can_predict("lowrank:8", "float32") is None
    with pytest.raises(FingerprintError, match="cannot predict 2:4 on fingerprint 'synthetic': no 2:4 measurements"):
        fp.predict("2:4", 8, 512, 512, "float32")
    with pytest.raises(FingerprintError, match="M must be a positive integer"):
        fp.predict("dense", 0, 512, 512, "float32")
    with pytest.raises(FingerprintError, match="mode 'compiled' is not one of eager, graph"):
        fp.predict("dense", 1, 512, 512, "float32", mode="compiled")


def test_dtype_names_and_stand_ins():
    assert normalize_dtype(torch.float32) == "float32"
    assert normalize_dtype("bf16") == "bfloat16" and normalize_dtype(torch.half) == "float16"
    fp = Fingerprint(synthetic(dtypes=("bfloat16",)))
    a = fp.predict_detail("dense", 8, 512, 512, torch.bfloat16)
    b = fp.predict_detail("dense", 8, 512, 512, "float16")
    assert a.us == b.us and b.note == "bfloat16 measurements used for float16 (same width)"
    g = fp.predict_detail("dense", 8, 512, 512, "bfloat16", mode="graph")
    assert g.us == a.us and g.note == "CPU has no CUDA graphs; eager time used"
    gpu = Fingerprint(synthetic(kind="cuda", device_name="NVIDIA H200", dtypes=("bfloat16",)))
    assert gpu.can_predict("dense", "bfloat16", mode="graph").startswith("no dense measurements for bfloat16 in graph")


# ------------------------------------------------------- resolution, device
@pytest.fixture
def fake_shipped(tmp_path, monkeypatch):
    """A shipped directory with cpu, h100 and h200 fingerprints, and an empty user directory."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for name, kind, dev in (("cpu", "cpu", "Some CPU"), ("h100", "cuda", "NVIDIA H100 80GB HBM3"),
                            ("h200", "cuda", "NVIDIA H200")):
        write(shipped, synthetic(name=name, kind=kind, device_name=dev), f"{name}.json")

    class Shipped:
        @staticmethod
        def shipped_names():
            return sorted(p.stem for p in shipped.glob("*.json"))

        @staticmethod
        def shipped_path(name):
            p = shipped / f"{name}.json"
            return p if p.is_file() else None

    monkeypatch.setattr(fpmod, "_shipped", lambda: Shipped)
    monkeypatch.setenv("SPARSEC_HOME", str(tmp_path / "home"))
    return tmp_path


def _pretend_device(monkeypatch, kind, name):
    import sparsec.fingerprint.device as dev

    monkeypatch.setattr(fpmod, "current_device_kind", lambda: kind)
    monkeypatch.setattr(fpmod, "current_device_name", lambda k=None: name)
    monkeypatch.setattr(dev, "current_device_name", lambda k=None: name)
    monkeypatch.setattr(fpmod, "device_slug", lambda k=None: dev.slugify(name) if kind == "cuda" else "cpu-" + dev.slugify(name))


def test_auto_prefers_own_measurement_then_shipped_gpu_then_cpu(fake_shipped, monkeypatch):
    _pretend_device(monkeypatch, "cuda", "NVIDIA H100 80GB HBM3")
    assert load_fingerprint("auto").name == "h100"
    _pretend_device(monkeypatch, "cuda", "NVIDIA A100-SXM4-80GB")
    assert load_fingerprint("auto").name == "cpu"
    own = fake_shipped / "home" / "fingerprints"
    own.mkdir(parents=True)
    write(own, synthetic(name="mine", kind="cuda", device_name="NVIDIA A100-SXM4-80GB"), "nvidia-a100-sxm4-80gb.json")
    fp = load_fingerprint("auto")
    assert fp.name == "mine" and fp.matches_current_device() is None
    assert load_fingerprint("nvidia-a100-sxm4-80gb").name == "mine"  # user files load by name too
    h200 = load_fingerprint("h200")
    assert h200.matches_current_device() == (
        "fingerprint 'h200' was measured on NVIDIA H200 but this device is NVIDIA A100-SXM4-80GB; "
        "measure this one with 'sparsec fingerprint measure'")
    _pretend_device(monkeypatch, "cpu", "Some CPU")
    assert "describes a cuda device (NVIDIA H200) but this process runs on cpu" in h200.matches_current_device()


def test_list_shows_shipped_and_user(fake_shipped):
    own = fake_shipped / "home" / "fingerprints"
    own.mkdir(parents=True)
    write(own, synthetic(name="mine"), "mine.json")
    (own / "broken.json").write_text("{")
    rows = {r["name"]: r for r in fpmod.list_fingerprints()}
    assert {n: rows[n]["origin"] for n in rows} == {"cpu": "shipped", "h100": "shipped", "h200": "shipped",
                                                     "mine": "user", "broken": "user"}
    assert rows["h100"]["device"] == "NVIDIA H100 80GB HBM3" and rows["h100"]["complete"] is True
    assert "not valid JSON" in rows["broken"]["error"]


def test_fastest_implementation_answers_and_is_named():
    """Two implementations of one format: the faster one at the query answers, by name."""
    data = synthetic(families=("dense", "lowrank"), rank_fracs=(0.25,))
    launchy = [dict(e, kernel="two-launch", us=e["us"] * 0.5 + 40.0) for e in data["kernels"]["lowrank"]]
    data["kernels"]["lowrank"] += launchy  # slower at small M (+40 us), twice as fast at large M
    fp = Fingerprint(data)
    small = fp.predict_detail("lowrank:256", 1, 1024, 1024, "float32")
    large = fp.predict_detail("lowrank:256", 8192, 1024, 1024, "float32")
    assert small.kernel == "sparsec-lowrank" and large.kernel == "two-launch"
    base = Fingerprint(synthetic(families=("dense", "lowrank"), rank_fracs=(0.25,)))
    assert small.us == pytest.approx(base.predict("lowrank:256", 1, 1024, 1024, "float32"), rel=EXACT)
    assert large.us == pytest.approx(base.predict("lowrank:256", 8192, 1024, 1024, "float32") * 0.5 + 40, rel=EXACT)


def test_integer_like_sizes_are_accepted():
    import numpy as np

    fp = Fingerprint(synthetic())
    assert fp.predict("dense", np.int64(64), torch.tensor(512), 512, "float32") == fp.predict("dense", 64, 512, 512, "float32")
    with pytest.raises(FingerprintError, match="N must be a positive integer, got 512.5"):
        fp.predict("dense", 64, 512.5, 512, "float32")


def test_prediction_names_the_codegen_impl():
    from sparsec.fingerprint import Prediction

    assert Prediction(1.0, "sparsec-gemm2-lowrank").impl == "gemm2"
    assert Prediction(1.0, "sparsec-triton-2:4").impl == "triton"
    assert Prediction(1.0, "cusparselt").impl == "cusparselt"
    assert Prediction(1.0, "cublas").impl is None and Prediction(1.0, "cublas x2").impl is None


def test_the_free_memory_beside_the_weights_is_read_on_this_machine():
    from sparsec.fingerprint.device import _cpu_memory_bytes, free_memory_bytes

    free = free_memory_bytes(torch.device("cpu"))
    assert 0 < free <= _cpu_memory_bytes()  # what is available, not what is installed
    assert free_memory_bytes(torch.device("meta")) == 0  # a device it cannot ask
