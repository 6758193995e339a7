"""One end-to-end error rule for both front-ends: torch tensors and numpy arrays give the same figure."""

import math

import numpy as np
import pytest
import torch

from sparsec.output_error import OutputError, relative, relative_l2


def test_numpy_and_torch_outputs_measure_alike_over_several_calls():
    rng = np.random.default_rng(3)
    refs = [[rng.standard_normal((4, 8)).astype(np.float32), rng.standard_normal(3).astype(np.float32)] for _ in range(3)]
    outs = [[r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in call] for call in refs]
    as_numpy = relative_l2(outs, refs)
    as_torch = relative_l2([[torch.from_numpy(o) for o in c] for c in outs], [[torch.from_numpy(r) for r in c] for c in refs])
    assert as_numpy == as_torch and 0.0 < as_numpy < 0.05
    by_hand = max(math.sqrt(sum(float(np.sum((o[i].astype(np.float64) - r[i]) ** 2)) for o, r in zip(outs, refs))
                            / sum(float(np.sum(r[i].astype(np.float64) ** 2)) for r in refs)) for i in range(2))
    assert as_numpy == pytest.approx(by_hand, rel=1e-6)  # differences taken in float32, sums in float64


def test_a_zero_reference_is_no_error_when_matched_and_infinite_when_missed():
    assert relative(0.0, 0.0) == 0.0 and relative(1.0, 0.0) == math.inf
    total = OutputError()
    total.add([np.zeros(3)], [np.zeros(3)])
    assert total.value() == 0.0
    total.add([np.ones(3)], [np.zeros(3)])
    assert total.value() == math.inf
