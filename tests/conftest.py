"""Shared fixtures: a clean Dynamo cache per test, and small fingerprints for planner scenarios."""

from __future__ import annotations

import pytest
import torch

from sparsec.fingerprint import Prediction
from sparsec.formats import parse_spec


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def cpu_onnxruntime(monkeypatch):
    """onnxruntime's CPU provider as the one that loads: for tests of the ONNX entry written
    against the shipped ort-cpu fingerprint, which 'auto' would otherwise trade for the CUDA
    provider (and ort-cuda-*) on a machine where that loads. The CUDA provider has its own tests,
    which skip where it does not load."""
    from sparsec.passes import onnx_model

    monkeypatch.setattr(onnx_model, "best_provider", lambda: "CPUExecutionProvider")


class ScaledFingerprint:
    """A planner-scenario fingerprint: time proportional to stored values, times a per-family factor.

    Lets a test pose "low rank is predicted slower than dense here" without depending on the
    numbers measured on any particular machine.
    """

    device = {"name": "scenario"}
    hash = "scenario"
    measured: dict = {}   # no device figures: the rest of a graph stays unpriced

    def __init__(self, name="scenario", factors=None, launch_us=2.0, launches=None):
        self.name = name
        self.factors = factors or {}
        self.launch_us = launch_us
        self.launches = launches or {}  # per family, microseconds more a launch

    def can_predict(self, fmt, dtype="float32", mode="eager"):
        return None

    def matches_current_device(self, kind=None):
        return None

    def predict_detail(self, fmt, M, N, K, dtype="float32", mode="eager"):
        spec = parse_spec(fmt)
        if hasattr(spec, "parts"):  # a composite runs its parts in turn, as a real fingerprint composes it
            parts = [self.predict_detail(p, M, N, K, dtype, mode) for p in spec.parts(N, K)]
            return Prediction(sum(p.us for p in parts), f"scenario-{spec.family}")
        work = M * spec.stored_params(N, K) + spec.stored_params(N, K)
        factor = self.factors.get(spec.family, 1.0)
        return Prediction(self.launch_us + self.launches.get(spec.family, 0.0) + factor * work / 1e4,
                          f"scenario-{spec.family}")


@pytest.fixture
def scenario_fp():
    return ScaledFingerprint
