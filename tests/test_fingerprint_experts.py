"""The expert-bank section of a fingerprint: measured by the harness, validated by the schema,
predicted from across bank shapes and token counts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sparsec.codegen.experts import IMPLS, ROWS_IMPLS, TORCH_IMPLS, grouped_mm_usable
from sparsec.fingerprint import experts
from sparsec.fingerprint.predict import load_fingerprint
from sparsec.fingerprint.schema import SchemaViolation, validate_fingerprint
from sparsec.fingerprint.timing import TimingPolicy

FAST = TimingPolicy(repeats=3, min_repeats=2, warmup=1, min_sample_s=1e-4, point_budget_s=0.002, statistic="min")


def test_the_tiny_grid_times_every_implementation_at_every_token_count():
    entries = experts.measure(torch.device("cpu"), "tiny", FAST, torch.float32)
    (E, k, I, H), = experts.GRIDS["tiny"]["banks"]
    # grouped_mm where this torch has a grouped GEMM; rows needs Triton's GPU kernel
    timed = IMPLS + (TORCH_IMPLS if grouped_mm_usable(torch.ones(1, H), torch.ones(E, 2 * I, H), torch.ones(E, H, I)) else ())
    assert {(e["impl"], e["M"]) for e in entries} == {(i, m) for i in timed for m in experts.GRIDS["tiny"]["M"]}
    assert all(e["us"] > 0 and e["mode"] == "eager" and e["dtype"] == "float32" for e in entries)
    assert all((e["experts"], e["top_k"], e["I"], e["H"]) == (E, k, I, H) for e in entries)
    doc = copy.deepcopy(load_fingerprint("cpu").data)
    doc["experts"] = entries
    validate_fingerprint(doc)
    doc["experts"][0]["impl"] = "fused"
    with pytest.raises(SchemaViolation):
        validate_fingerprint(doc)


@pytest.mark.parametrize("impl", IMPLS + TORCH_IMPLS + ROWS_IMPLS)
def test_every_implementation_the_measurement_can_time_is_one_the_schema_accepts(impl):
    doc = copy.deepcopy(load_fingerprint("cpu").data)
    doc["experts"] = _curve(impl)
    validate_fingerprint(doc)


def _curve(impl="grouped", bank=(8, 2, 512, 256), points=((1, 10.0), (16, 20.0), (256, 200.0))):
    E, k, I, H = bank
    return [{"impl": impl, "experts": E, "top_k": k, "I": I, "H": H, "M": m, "dtype": "float32", "mode": "eager",
             "us": us} for m, us in points]


def test_a_measured_point_is_reproduced_and_between_points_the_log_log_line_is_followed():
    entries = _curve()
    us, note = experts.predict(entries, "grouped", 8, 2, 512, 256, 16, "float32", "eager")
    assert us == pytest.approx(20.0, rel=1e-12) and note == ""
    us, _ = experts.predict(entries, "grouped", 8, 2, 512, 256, 4, "float32", "eager")
    assert us == pytest.approx(math.sqrt(10.0 * 20.0))
    beyond, _ = experts.predict(entries, "grouped", 8, 2, 512, 256, 4096, "float32", "eager")
    assert beyond > 200.0  # never falls with more tokens


def test_another_bank_is_predicted_from_the_nearest_measured_one_scaled_by_weight_size():
    entries = _curve() + _curve(bank=(64, 8, 128, 256), points=((1, 50.0), (256, 500.0)))
    us, note = experts.predict(entries, "grouped", 8, 2, 1024, 256, 16, "float32", "eager")
    assert us == pytest.approx(40.0) and "8 experts of 256->512" in note
    assert experts.predict(entries, "loop", 8, 2, 512, 256, 16, "float32", "eager") is None


def test_the_shipped_cpu_fingerprint_predicts_banks_and_one_without_the_section_predicts_none():
    cpu = load_fingerprint("cpu")
    p = cpu.predict_experts("dense_all", 8, 2, 512, 256, 16, "float32", "graph")
    assert p is not None and p.us > 0 and p.kernel == "sparsec-dense_all-experts" and "eager time used" in p.note
    assert load_fingerprint("h200").predict_experts("grouped", 8, 2, 14336, 4096, 16) is None
