"""Sequential recovery (option ``recovery``): rewrites refitted block after block to the inputs
they receive once earlier blocks run their rewrites."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.errors import OptionError


class Stack(nn.Module):
    """Three blocks of one linear layer each, with a nonlinearity between them."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def correlated(rows: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, 1, d)
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed + 1)) @ mix / d ** 0.5


def plan(recovery: str, fmt: str = "lowrank:16", rows: int = 256):
    torch.manual_seed(3)
    model = Stack().eval()
    calib = [(correlated(rows, 64, seed=10 + i),) for i in range(4)]
    held = [(correlated(256, 64, seed=50 + i),) for i in range(2)]
    result = sparsec.optimize(model, calib[0], fingerprint="cpu", calibration=calib, heldout=held,
                              plan={"layers": {"_default": fmt}}, recovery=recovery, lower=False)
    return result.report.to_dict()


def test_recovery_refits_later_blocks_to_the_inputs_they_receive_and_lowers_the_error():
    one_shot, recovered = plan("none"), plan("sequential")
    assert all("recovery" not in layer for layer in one_shot["layers"])
    first, *later = recovered["layers"]
    # the first block's inputs are the model's: the same statistics, the same fit, the same error
    assert first["recovery"]["one_shot_error"] == pytest.approx(first["predicted_error"], rel=1e-6)
    assert first["recovery"]["recovered_error"] == first["recovery"]["one_shot_error"]
    for layer in later:
        r = layer["recovery"]
        # its inputs changed upstream: the one-shot fit's error on them is not its planned one
        assert r["one_shot_error"] != pytest.approx(layer["predicted_error"], rel=1e-3)
        assert r["recovered_error"] <= r["one_shot_error"]  # never worse than one shot
    assert any(l["recovery"]["recovered_error"] < 0.95 * l["recovery"]["one_shot_error"] for l in later)
    assert recovered["end_to_end"]["measured_error"] < one_shot["end_to_end"]["measured_error"]
    assert recovered["end_to_end"]["heldout_error"] <= one_shot["end_to_end"]["heldout_error"]
    summary = recovered["planning"]["recovery"]
    assert summary["mode"] == "sequential" and summary["passes"] == 3
    assert summary["refit"] + summary["kept_one_shot"] == 3 and summary["refit"] >= 1
    assert "recover" in recovered["planning"]["timing"]["steps_s"]


@pytest.mark.parametrize("fmt", ["lowrank:16", "2:4", "block:16:0.5", "2:4+lowrank:8"])
def test_full_recovery_matches_the_dense_model_at_each_layer_and_beats_sequential(fmt):
    one_shot, sequential, full = plan("none", fmt), plan("sequential", fmt), plan("full", fmt)
    for layer in full["layers"]:
        assert layer["recovery"]["recovered_error"] <= layer["recovery"]["one_shot_error"]  # never worse
    # each layer now also corrects what the earlier rewrites changed in its input
    assert full["end_to_end"]["measured_error"] < sequential["end_to_end"]["measured_error"]
    assert full["end_to_end"]["measured_error"] < 0.95 * one_shot["end_to_end"]["measured_error"]
    assert full["end_to_end"]["heldout_error"] < one_shot["end_to_end"]["heldout_error"]
    assert full["planning"]["recovery"]["passes"] == 6  # the dense inputs too: two passes a block


def test_full_recovery_with_few_rows_per_input_refits_sequentially_and_says_so():
    # 4 x 32 rows for 64 inputs: the dense target would be chased along directions 128 rows barely span
    sequential, full = plan("sequential", rows=32), plan("full", rows=32)
    assert full["planning"]["recovery"]["sequential_only"] == 3
    assert [l["recovery"] for l in full["layers"]] == [l["recovery"] for l in sequential["layers"]]
    assert any("3 layer(s) saw fewer than 4 calibration rows per input" in w for w in full["warnings"])


def test_recovery_is_refused_by_name_when_unknown():
    with pytest.raises(OptionError, match="option 'recovery' must be one of 'none', 'sequential', 'full'; got 'full-ish'"):
        sparsec.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), recovery="full-ish")
