"""Golden snapshots: the plan and the report (less timings, dates, paths and the machine's name) of
the shipped sample and of planted models, checked in under tests/golden/. Any change in what
sparsec decides or says shows up as a difference here.

Figures are kept to 4 significant digits (and those under 1e-5, float32 noise, as 0), so that
another CPU's float rounding does not count as a change while any change of plan, format, reason
or error does. To accept a deliberate change,
regenerate with ``SPARSEC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` and say in the
commit which behaviour changed and why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparsec

pytestmark = pytest.mark.usefixtures("cpu_onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("SPARSEC_UPDATE_GOLDEN") == "1"

# machine- and run-dependent: timings, dates, versions, paths, the device this runs on
DROPPED = {"created", "sparsec_version", "device", "executor", "model", "measured_speedup", "measured_us",
           "measured_us_dense", "timing", "hash", "seconds"}


def stable(value):
    """The snapshot form: dropped keys gone, floats to 4 significant digits, warnings without paths."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in DROPPED}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, float):  # below 1e-5: float32 rounding noise (a planted structure's exact fit)
        return 0.0 if abs(value) < 1e-5 else float(f"{value:.4g}")
    if isinstance(value, str):  # figures in sentences: the same float32 noise written out ("5.9e-06%")
        return re.sub(r"\d+(?:\.\d+)?e-(?:0[5-9]|[1-9]\d)", "0", value.replace(str(ROOT), "<root>"))
    return value


def check(name: str, plan, report) -> None:
    data = {"plan": stable(plan.to_dict()), "report": stable(report.to_dict())}
    e2e = data["report"]["end_to_end"]
    if "predicted_us_rest_source" in e2e:  # the rest was timed in onnxruntime: a measurement, not a decision
        for key in ("predicted_us_rest", "predicted_speedup"):
            e2e.pop(key, None)
    data["report"]["warnings"] = [w for w in data["report"].get("warnings", [])
                                  if "was measured on" not in w and "describes a" not in w]
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    path = GOLDEN / f"{name}.json"
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"{path} is missing; generate it with SPARSEC_UPDATE_GOLDEN=1")
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert text == path.read_text(), (
        f"{name}: plan or report differs from {path.relative_to(ROOT)}; if the change is meant, "
        "regenerate with SPARSEC_UPDATE_GOLDEN=1 and say why in the commit")


def planted_model(kind: str) -> nn.Module:
    """Two 128x128 layers with planted structure (exact low rank 8, exact 2:4) and a ReLU between."""
    g = torch.Generator().manual_seed(11)
    first, second = nn.Linear(128, 128), nn.Linear(128, 128)
    with torch.no_grad():
        if kind == "lowrank":
            first.weight.copy_(torch.randn(128, 8, generator=g) @ torch.randn(8, 128, generator=g) / 128 ** 0.5)
        else:
            w = torch.randn(128, 128, generator=g) / 128 ** 0.5
            groups = w.reshape(128, 32, 4)
            drop = groups.abs().argsort(dim=-1)[..., :2]
            first.weight.copy_(groups.scatter(-1, drop, 0.0).reshape(128, 128))
        second.weight.copy_(torch.randn(128, 128, generator=g) / 128 ** 0.5)
        first.bias.zero_()
        second.bias.copy_(torch.randn(128, generator=g) * 0.1)
    return nn.Sequential(first, nn.ReLU(), second).eval()


def test_the_shipped_sample_through_the_onnx_entry(tmp_path):
    from sparsec.onnx_entry import optimize_onnx

    result = optimize_onnx(ROOT / "samples" / "tiny_encoder.onnx", tmp_path / "out.onnx", fingerprint="ort-cpu",
                           calibration=ROOT / "samples" / "tiny_encoder_calib.npz",
                           heldout=ROOT / "samples" / "tiny_encoder_heldout.npz")
    check("tiny_encoder_onnx", result.plan, result.report)


@pytest.mark.parametrize("kind, dtype, options", [
    ("lowrank", torch.float32, {"formats": ["lowrank", "monarch"], "error_budget": 0.01}),
    ("twofour", torch.bfloat16, {"plan": {"0": "2:4", "_default": "dense"}, "error_budget": 0.01}),
    ("twofour", torch.bfloat16, {"error_budget": 0.05, "decode": True}),
    ("lowrank", torch.float32, {"error_budget": 0.2, "formats": ["2:4", "block", "lowrank", "monarch"]}),
], ids=["lowrank-auto", "twofour-forced", "twofour-auto-bf16", "all-formats-loose"])
def test_planted_models_through_optimize(kind, dtype, options, request):
    options = dict(options)
    torch.manual_seed(0)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(12)).to(dtype)
    if options.pop("decode", False):  # priced at one token, calibrated on 256 (a graph traced for those)
        options["calibration"], x = [(x,)], x[:1]
    result = sparsec.optimize(planted_model(kind).to(dtype), (x,), fingerprint="h200", lower=False, **options)
    check(f"planted_{request.node.callspec.id}", result.plan, result.report)


def test_snapshots_are_stable_to_rounding_only():
    assert stable({"a": 0.123456789, "created": "now", "b": [1.0000001e-7, 2e-5]}) == {"a": 0.1235, "b": [0.0, 2e-5]}
    assert np.isclose(stable(2.0 / 3.0), 0.6667)
