"""End-to-end error measurement of the FX front-end."""

import torch

from sparsec.passes.interpret_fx import relative_l2


def test_error_is_the_worst_output_not_the_pooled_one():
    big, small = torch.randn(1000) * 100.0, torch.randn(4)
    refs = [[big, small]]
    outs = [[big.clone(), small * 1.1]]  # the small output is off by 10%, the big one exact
    assert abs(relative_l2(outs, refs) - 0.1) < 1e-6  # float32 rounding of small * 1.1
    # pooled over both outputs the same change would read as ~0.0001%
    pooled = float((small * 0.1).norm() / torch.cat([big, small]).norm())
    assert pooled < 1e-4


def test_identical_outputs_have_zero_error_even_when_a_reference_is_zero():
    z = torch.zeros(3)
    assert relative_l2([[z.clone()]], [[z]]) == 0.0
