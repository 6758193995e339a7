"""Pricing the rest of a graph, and the end-to-end prediction that includes it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsec
from sparsec.errors import FingerprintError
from sparsec.rest import RestKernel, RestOfGraph, price_rest


class Figures:
    def __init__(self, measured):
        self.measured = measured

    def fastest_dense_us(self, mode):
        return None  # no dense product timed: library kernels pay launch and work alone


FIGURES = {"copy_GBps": 1000.0, "launch_us": {"eager": 10.0, "graph": 2.0}, "peak_tflops": {"float32": 10.0}}


def test_a_reduction_or_attention_costs_at_least_its_probe_in_that_mode():
    """The probes' least times stand in for bytes and FLOPs that price a decode-sized kernel below
    what it costs; above them, bytes and FLOPs decide."""
    probes = {"norm": {"eager": 12.0, "graph": 3.0}, "attention": {"eager": 40.0, "graph": 5.0}}
    fp = Figures({**FIGURES, "rest_us": probes})
    small = RestOfGraph([RestKernel(bytes=1e3, kind="reduction"), RestKernel(bytes=1e3, kind="pointwise"),
                         RestKernel(bytes=1e3, flops=1e3, kind="attention"),
                         RestKernel(bytes=1e3, flops=1e3, kind="attention")])
    assert price_rest(small, fp, "graph") == pytest.approx(3 + 2.001 + 5 + 5)
    assert price_rest(small, fp, "eager") == pytest.approx(12 + 10.001 + 40 + 40)
    big = RestOfGraph([RestKernel(bytes=1e7, kind="reduction"), RestKernel(bytes=1e3, flops=1e9, kind="attention")])
    assert price_rest(big, fp, "graph") == pytest.approx(2 + 10 + 2 + 100)
    # a fingerprint without the probes prices a reduction as pointwise work and attention as a library matmul
    assert price_rest(small, Figures(FIGURES), "graph") == pytest.approx(4 * 2.001)  # launch and bytes each


def test_inductors_fused_kernels_answer_for_reductions_and_pointwise_work_in_a_graph_where_timed():
    """A lowered graph's norms and activations are kernels inductor made: where the fingerprint
    timed such kernels (graph mode only), they price their kinds instead of torch's own norm
    kernel (which costs about twice as much at decode sizes) and of a bare launch."""
    probes = {"norm": {"eager": 12.0, "graph": 3.0}, "attention": {"eager": 40.0, "graph": 5.0},
              "fused_norm": {"eager": None, "graph": 2.5}, "fused_pointwise": {"eager": None, "graph": 2.25}}
    fp = Figures({**FIGURES, "rest_us": probes})
    small = RestOfGraph([RestKernel(bytes=1e3, kind="reduction"), RestKernel(bytes=1e3, kind="pointwise")])
    assert price_rest(small, fp, "graph") == pytest.approx(2.5 + 2.25)
    assert price_rest(small, fp, "eager") == pytest.approx(12 + 10.001)  # no eager times: as before
    big = RestOfGraph([RestKernel(bytes=1e7, kind="reduction"), RestKernel(bytes=1e7, kind="pointwise")])
    assert price_rest(big, fp, "graph") == pytest.approx(2 * (2 + 10))  # bytes above the floor decide


def test_a_fingerprint_with_fused_probes_validates_and_shows_them():
    from sparsec.fingerprint import Fingerprint, load_fingerprint
    from sparsec.rest import describe_probes

    doc = json.loads(json.dumps(load_fingerprint("cpu").data))
    doc["measured"]["rest_us"] = {"norm": {"eager": 4.5, "graph": None}, "attention": {"eager": 9.0, "graph": None},
                                  "fused_norm": {"eager": None, "graph": 2.5}}
    Fingerprint(doc)
    assert describe_probes(doc["measured"]["rest_us"]).endswith("fused_norm - us eager, 2.5 us graph")
    # a GPU's fingerprint names the fused probe it lacks; a CPU's has none to time
    assert describe_probes(doc["measured"]["rest_us"], gpu=True).endswith(
        "fused_pointwise not measured (add with 'sparsec fingerprint measure --rest')")
    doc["measured"]["rest_us"]["fused_sum"] = {"eager": None, "graph": 1.0}
    with pytest.raises(FingerprintError, match="rest_us"):
        Fingerprint(doc)


def test_the_rest_is_priced_by_kind_and_the_kinds_add_up_to_it():
    from sparsec.rest import price_rest_by_kind

    probes = {"norm": {"eager": 12.0, "graph": 3.0}, "attention": {"eager": 40.0, "graph": 5.0}}
    fp = Figures({**FIGURES, "rest_us": probes})
    rest = RestOfGraph([RestKernel(bytes=1e3, kind="reduction"), RestKernel(bytes=1e3, kind="pointwise"),
                        RestKernel(bytes=1e3, kind="pointwise"), RestKernel(bytes=1e3, flops=1e3, kind="attention")])
    kinds = price_rest_by_kind(rest, fp, "graph")
    assert kinds == pytest.approx({"reduction": 3.0, "pointwise": 2 * 2.001, "attention": 5.0})
    assert price_rest(rest, fp, "graph") == pytest.approx(sum(kinds.values()))
    assert price_rest_by_kind(RestOfGraph(), fp, "graph") == {}
    assert price_rest_by_kind(rest, Figures({"launch_us": {"graph": 2.0}}), "graph") is None  # no bandwidth


def test_an_unknown_kind_is_refused_with_the_kinds_there_are():
    with pytest.raises(ValueError, match="pointwise, reduction"):
        RestKernel(bytes=1.0, kind="gather")


def test_each_kernel_pays_its_launch_and_the_longer_of_its_bytes_and_its_flops():
    rest = RestOfGraph([RestKernel(bytes=1e6), RestKernel(bytes=1e3, flops=1e9, dtype="float32")])
    # 1 MB at 1000 GB/s is 1 us; 1 GFLOP at 10 TFLOP/s is 100 us, above its 0.001 us of bytes
    assert price_rest(rest, Figures(FIGURES), "graph") == pytest.approx(2 + 1 + 2 + 100)
    assert price_rest(rest, Figures(FIGURES), "eager") == pytest.approx(10 + 1 + 10 + 100)


def test_a_library_kernel_costs_at_least_the_fastest_dense_product_timed():
    """At one token attention costs its fixed latency, not its few bytes and FLOPs: priced no lower
    than the fastest dense product the fingerprint timed in the mode asked; pointwise kernels unchanged."""
    class Timed(Figures):
        def fastest_dense_us(self, mode):
            return {"graph": 7.0, "eager": 30.0}[mode]

    tiny = RestOfGraph([RestKernel(bytes=1e6), RestKernel(bytes=1e3, flops=1e3, dtype="float32")])
    assert price_rest(tiny, Timed(FIGURES), "graph") == pytest.approx(2 + 1 + 7)
    assert price_rest(tiny, Timed(FIGURES), "eager") == pytest.approx(10 + 1 + 30)
    big = RestOfGraph([RestKernel(bytes=1e3, flops=1e9, dtype="float32")])  # its work is above the floor
    assert price_rest(big, Timed(FIGURES), "graph") == pytest.approx(2 + 100)


def test_the_fastest_dense_product_is_read_from_the_fingerprint_by_mode():
    from sparsec.fingerprint.predict import load_fingerprint

    fp = load_fingerprint("h100")
    graph = [e["us"] for e in fp.data["kernels"]["dense"] if e["mode"] == "graph"]
    assert fp.fastest_dense_us("graph") == min(graph)
    assert fp.fastest_dense_us("graph") < fp.fastest_dense_us("eager")
    assert load_fingerprint("cpu").fastest_dense_us("graph") is None  # a CPU times no CUDA graphs


def test_unknown_figures_leave_the_rest_unpriced_rather_than_guessed():
    rest = RestOfGraph([RestKernel(bytes=1e6)])
    assert price_rest(None, Figures(FIGURES), "graph") is None
    assert price_rest(rest, Figures({**FIGURES, "copy_GBps": None}), "graph") is None
    flops = RestOfGraph([RestKernel(bytes=1, flops=1e9, dtype="bfloat16")])   # no bf16 peak measured
    assert price_rest(flops, Figures(FIGURES), "graph") is None
    assert price_rest(RestOfGraph([]), Figures({}), "graph") == 0.0
    no_graph = {**FIGURES, "launch_us": {"eager": 10.0, "graph": None}}       # a CPU: eager launches stand in
    assert price_rest(rest, Figures(no_graph), "graph") == pytest.approx(10 + 1)


class Mlp(nn.Module):
    def __init__(self, d=64, h=256):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


def test_end_to_end_prediction_counts_the_rest_of_the_graph():
    """The report's end-to-end speedup is (layers dense + rest) / (layers chosen + rest), not the
    layers' own ratio; the rest is the CPU fingerprint's price of the GELU and the residual add."""
    torch.manual_seed(0)
    model = Mlp(d=512, h=2048).eval()  # weights the fingerprint timed: low rank pays there
    x = torch.randn(128, 512)
    options = {"fingerprint": "cpu", "plan": {"layers": {"_default": "lowrank:64"}}, "error_budget": 0.9}
    result = sparsec.optimize(model, x, **options)
    data = result.report.to_dict()
    kinds = data["end_to_end"]["predicted_us_rest_by_kind"]
    assert set(kinds) == {"pointwise"}  # the GELU and the residual add: two pointwise regions, no reduction
    assert sum(kinds.values()) == pytest.approx(data["end_to_end"]["predicted_us_rest"], rel=1e-3)
    t, e2e = data["totals"], data["end_to_end"]
    rest_us = e2e["predicted_us_rest"]
    assert rest_us is not None and rest_us > 0
    assert t["predicted_speedup"] > 1.0
    assert e2e["predicted_speedup"] == pytest.approx(
        (t["predicted_us_dense"] + rest_us) / (t["predicted_us"] + rest_us), rel=1e-6)
    assert 1.0 < e2e["predicted_speedup"] < t["predicted_speedup"]


def test_a_graph_the_estimate_cannot_read_still_compiles_with_the_rest_unpriced(monkeypatch, caplog):
    from sparsec.passes import fx_frontend

    def unreadable(self):
        raise KeyError("an op nobody expected")

    monkeypatch.setattr(fx_frontend.FxFrontend, "rest_of_graph", unreadable)
    model = Mlp().eval()
    x = torch.randn(16, 64)
    result = sparsec.optimize(model, x, fingerprint="cpu", plan={"layers": {"_default": "lowrank:16"}}, error_budget=0.9)
    e2e, totals = result.report.end_to_end, result.report.totals
    assert e2e["predicted_us_rest"] is None
    assert e2e["predicted_speedup"] == pytest.approx(totals["predicted_speedup"])
    assert any("rest of the graph was not priced" in r.getMessage() for r in caplog.records)
