"""A classifier trained here, rewritten by sparsec: its accuracy under each forced format and planned.

The data is synthetic but structured like real inputs: each class is a cluster in a 12-dimensional
latent space, seen through a fixed nonlinear map into 64 features plus noise, so the trained
network's layers have the low-dimensional, correlated activations the calibration-aware passes
rely on. Training takes a few seconds on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.formats import parse_spec

CLASSES, LATENT, FEATURES, HIDDEN = 10, 12, 64, 256


def dataset(n: int, seed: int, structure_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(structure_seed)
    centers = torch.randn(CLASSES, LATENT, generator=g)  # overlapping clusters: about 89% is reachable
    mix = torch.randn(LATENT, FEATURES, generator=g) / LATENT ** 0.5
    s = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=s)
    z = centers[y] + torch.randn(n, LATENT, generator=s)
    x = torch.tanh(z @ mix) + 0.1 * torch.randn(n, FEATURES, generator=s)
    return x, y


def trained_classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                          nn.Linear(HIDDEN, CLASSES))
    x, y = dataset(8192, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(4):
        for i in range(0, len(x), 256):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 256]), y[i : i + 256]).backward()
            opt.step()
    return model.eval()


def accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean())


@pytest.fixture(scope="module")
def setup():
    model = trained_classifier()
    calib = [dataset(512, seed=10 + i)[0] for i in range(4)]
    held = [dataset(512, seed=20 + i)[0] for i in range(2)]
    x_test, y_test = dataset(4096, seed=30)
    return model, calib, held, x_test, y_test


def test_the_classifier_learned_the_task(setup):
    model, _, _, x_test, y_test = setup
    assert accuracy(model, x_test, y_test) > 0.85


@pytest.mark.parametrize("fmt", ["2:4", "block:16:0.5", "lowrank:32", "monarch:4"])
def test_forced_format_keeps_accuracy(setup, scenario_fp, fmt):
    model, calib, held, x_test, y_test = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = sparsec.optimize(model, (calib[0],), fingerprint=scenario_fp(), error_budget=0.05,
                              calibration=calib, heldout=held, plan={"layers": {"_default": fmt}})
    formats = {l["name"]: l["format"] for l in result.report.layers}
    # the 10-output head ("4") cannot take 16x16 blocks nor 4 Monarch blocks: it stays dense
    head = fmt if parse_spec(fmt).check(CLASSES, HIDDEN) is None else "dense"
    assert formats == {"0": fmt, "2": fmt, "4": head}, formats
    drop = accuracy(model, x_test, y_test) - accuracy(result.module, x_test, y_test)
    e2e = result.report.end_to_end
    print(f"{fmt}: accuracy drop {drop:.2%}, calibration error {e2e['measured_error']:.2%}, "
          f"held-out error {e2e['heldout_error']:.2%}")
    assert drop < 0.02  # two points of accuracy, with every layer forced into the format
    assert e2e["heldout_error"] < 1.5 * e2e["measured_error"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budget", [0.01, 0.05])
def test_planned_rewrite_stays_within_budget_and_keeps_accuracy(setup, scenario_fp, budget):
    model, calib, held, x_test, y_test = setup
    result = sparsec.optimize(model, (calib[0],), fingerprint=scenario_fp(), error_budget=budget,
                              calibration=calib, heldout=held)
    e2e = result.report.end_to_end
    assert e2e["measured_error"] <= budget
    assert e2e["heldout_error"] <= 1.5 * budget
    assert any(l["format"] != "dense" for l in result.report.layers)
    with torch.no_grad():
        ref, out = model(x_test), result.module(x_test)
    test_error = float((out - ref).norm() / ref.norm())
    drop = accuracy(model, x_test, y_test) - accuracy(result.module, x_test, y_test)
    print(f"budget {budget:.0%}: test error {test_error:.2%}, accuracy drop {drop:.2%}, "
          f"speedup {e2e['predicted_speedup']:.2f}x")
    assert test_error <= 1.5 * budget
    assert drop <= 0.01
