"""A failure inside sparsec never breaks the user's compile: the graph runs dense, one warning names
the failing step and its cause, the report records it; ``strict`` raises instead."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.backend import FallbackWarning, session_for


def small_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()


def compile_and_run(model, options, x):
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        y = torch.compile(model, backend="sparsec", options=options)(x)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    return y, fallbacks


class Failing:
    """A fingerprint (the option takes objects that predict) whose pricing breaks."""

    name, hash, device, measured = "failing", "failing", {"name": "nowhere"}, {}

    def can_predict(self, fmt, dtype="float32", mode="eager"):
        return None

    def matches_current_device(self, kind=None):
        return None

    def predict_detail(self, *args, **kwargs):
        raise ZeroDivisionError("a pricing bug")


def test_a_failing_step_leaves_the_graph_dense_with_one_warning_and_a_report_record(tmp_path):
    model, x = small_model(), torch.randn(16, 32)
    options = {"fingerprint": Failing(), "report": str(tmp_path / "r.json")}
    y, fallbacks = compile_and_run(model, options, x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)  # the graph as traced: exactly the model
    assert len(fallbacks) == 1
    assert "cost step failed (ZeroDivisionError: a pricing bug)" in fallbacks[0] and "strict=True" in fallbacks[0]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fallbacks"] == [{"graph": 0, "step": "cost", "error": "ZeroDivisionError: a pricing bug"}]
    assert any("cost step failed" in w for w in report["warnings"])
    assert session_for(options, None).report.layers == []


def test_strict_raises_the_failure_instead():
    options = {"fingerprint": Failing(), "strict": True}
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="a pricing bug"):
        compile_and_run(small_model(), options, torch.randn(16, 32))


@pytest.mark.parametrize("options, step, cause", [
    ({"error_bugdet": 0.1}, "options", "unknown option(s) 'error_bugdet'"),
    ({"fingerprint": "/no/such/fingerprint.json"}, "options", "FingerprintError"),
    ({"calibration": [(torch.randn(16, 31),)]}, "calibrate", "has shape (16, 31), but this graph was traced for (16, 32)"),
    ({"plan": {"layers": {"_default": "2:4"}}, "formats": ["2:4"]}, None, None),  # no failure: control
])
def test_bad_public_inputs_fall_back_naming_the_step(options, step, cause):
    model, x = small_model(), torch.randn(16, 32)
    y, fallbacks = compile_and_run(model, dict(options, fingerprint=options.get("fingerprint", "cpu")), x)
    if step is None:
        assert fallbacks == []
        return
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    assert len(fallbacks) == 1, fallbacks
    assert f"sparsec's {step} step failed" in fallbacks[0] and cause in fallbacks[0]


@pytest.mark.parametrize("target, step", [
    ("sparsec.passes.fx_frontend.FxFrontend.capture", "capture"),
    ("sparsec.passes.fx_frontend.FxFrontend.evaluate", "verify"),
    ("sparsec.passes.rewrite_fx.packed_modules", "lower"),
])
def test_each_later_step_falls_back_too(monkeypatch, target, step):
    def broken(*args, **kwargs):
        raise RuntimeError(f"broken {step}")

    monkeypatch.setattr(target, broken)
    model, x = small_model(), torch.randn(16, 32)
    # lowrank forced on the first layer, so that verification and lowering have work to do
    options = {"fingerprint": "cpu", "plan": {"0": "lowrank:8"}, "error_budget": 0.5}
    y, fallbacks = compile_and_run(model, options, x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    assert len(fallbacks) == 1 and f"{step} step failed (RuntimeError: broken {step})" in fallbacks[0]


def test_optimize_raises_errors_about_the_users_input_and_falls_back_on_the_rest():
    model, x = small_model(), torch.randn(16, 32)
    with pytest.raises(sparsec.errors.ModelError, match=r"the model fails on calibration item 0 \(shapes \(16, 32\)\): "
                                                        r"RuntimeError: mat1 and mat2 must have the same dtype"):
        sparsec.optimize(model, (x,), calibration=[(x.double(),)], fingerprint="cpu")
    with pytest.raises(sparsec.errors.ModelError, match=r"the model fails on example_inputs \(shapes \(16, 31\)\): "
                                                        r"RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        sparsec.optimize(model, (torch.randn(16, 31),), fingerprint="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sparsec.optimize(model, (x,), fingerprint=Failing())
    assert [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert result.report.to_dict()["fallbacks"][0]["step"] == "cost"
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=0)
    with pytest.raises(ZeroDivisionError):
        sparsec.optimize(model, (x,), fingerprint=Failing(), strict=True)


def test_a_model_that_cannot_take_the_inputs_is_said_in_one_line_with_nothing_printed_before_it(capfd):
    """The model is run as it is first: a graph failing in sparsec's hands would have torch.fx print
    its traceback and generated code to stderr ahead of the error."""
    model = small_model()
    for example, calibration in (((torch.ones(16, 32, dtype=torch.long),), None),
                                 ((torch.randn(16, 32),), [(torch.ones(16, 32, dtype=torch.long),)])):
        with pytest.raises(sparsec.errors.ModelError, match="mat1 and mat2 must have the same dtype"):
            sparsec.optimize(model, example, calibration=calibration, fingerprint="cpu")
        err = capfd.readouterr().err
        assert "Traceback" not in err and "FX-traced" not in err, err


def test_a_failure_in_one_subgraph_leaves_the_others_rewritten_and_the_report_whole(monkeypatch):
    from sparsec.passes.fx_frontend import FxFrontend

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    real = FxFrontend.capture

    def capture(self):
        if self.graph == 1:
            raise RuntimeError("second graph")
        return real(self)

    monkeypatch.setattr(FxFrontend, "capture", capture)
    torch.manual_seed(4)
    model, x = Broken().eval(), torch.randn(64, 32)
    options = {"fingerprint": "cpu", "plan": {"a": "lowrank:8"}, "error_budget": 0.9}
    y, fallbacks = compile_and_run(model, options, x)
    report = session_for(options, None).report.to_dict()
    assert [l["name"] for l in report["layers"]] == ["a"] and report["layers"][0]["format"] == "lowrank:8"
    assert report["fallbacks"] == [{"graph": 1, "step": "capture", "error": "RuntimeError: second graph"}]
    assert len(fallbacks) == 1 and "graph 1: sparsec's capture step failed" in fallbacks[0]
