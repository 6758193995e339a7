"""sparsec.state: a model that writes its own state when it runs comes out of planning as one call leaves it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.errors import DataError
from sparsec.state import state_kept, training_warning


def planted_with_batch_norm(d=256, rank=16, seed=0):
    """Two planted low-rank layers around a batch norm left in training mode (as a fresh module is)."""
    g = torch.Generator().manual_seed(seed)
    first, last = nn.Linear(d, d), nn.Linear(d, d)
    with torch.no_grad():
        for lin in (first, last):
            lin.weight.copy_(torch.randn(d, rank, generator=g) @ torch.randn(rank, d, generator=g) / d ** 0.5)
    return nn.Sequential(first, nn.BatchNorm1d(d), last)


class EditsItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        x.mul_(2.0)
        return self.lin(x)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_optimize_leaves_batch_norm_statistics_as_they_were(scenario_fp):
    model = planted_with_batch_norm()
    before = state(model)
    x = torch.randn(512, 256)
    result = sparsec.optimize(model, (x,), fingerprint=scenario_fp(), error_budget=0.05, formats=["lowrank"])
    assert [l["format"] for l in result.report["layers"]].count("dense") < 2  # something was planned and run
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert any("training mode (BatchNorm1d" in w for w in result.report.warnings)


def test_a_compiled_call_moves_batch_norm_statistics_exactly_as_one_eager_call_does(scenario_fp):
    model = planted_with_batch_norm(seed=1)
    eager = copy.deepcopy(model)
    x = torch.randn(512, 256)
    eager(x)
    torch.compile(model, backend="sparsec", options={"fingerprint": scenario_fp(), "error_budget": 0.05,
                                                       "formats": ["lowrank"]})(x)
    for (name, want), got in zip(eager.state_dict().items(), model.state_dict().values()):
        # planning ran the graph many times; only the one call the user made may show
        assert torch.allclose(want.double(), got.double(), rtol=1e-5, atol=1e-6), name


def test_optimize_leaves_an_input_the_model_edits_as_it_was(scenario_fp):
    x = torch.randn(32, 64)
    kept = x.clone()
    sparsec.optimize(EditsItsInput().eval(), (x,), fingerprint=scenario_fp())
    assert torch.equal(x, kept)


def test_state_kept_puts_back_what_changed_and_leaves_parameters_alone():
    lin = nn.Linear(4, 4)
    buf = torch.zeros(3)
    weight = lin.weight.detach().clone()
    with state_kept(lin, [buf, lin.weight]):
        buf.add_(1.0)
        with torch.no_grad():
            lin.weight.mul_(2.0)
    assert torch.equal(buf, torch.zeros(3))
    assert torch.equal(lin.weight, 2.0 * weight)  # parameters are the caller's own business


def test_a_training_warning_names_only_layers_that_behave_differently():
    assert training_warning(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []  # training, but nothing moves
    assert training_warning(nn.Sequential(nn.Linear(4, 4), nn.Dropout()).eval()) == []
    (line,) = training_warning(nn.Sequential(nn.Linear(4, 4), nn.Dropout()))
    assert "Dropout" in line and "model.eval()" in line


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_calibration_data_with_non_finite_values_is_refused_naming_the_layer(scenario_fp, bad):
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    x = torch.randn(256, 64)
    x[3, 5] = float(bad)
    with pytest.raises(DataError, match=r"layer\(s\) 0 hold NaN or infinite values"):
        sparsec.optimize(model, (x,), fingerprint=scenario_fp())


def test_empty_calibration_inputs_are_refused(scenario_fp):
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    with pytest.raises(DataError, match="no layer any input rows"):
        sparsec.optimize(model, (torch.randn(0, 64),), fingerprint=scenario_fp())
