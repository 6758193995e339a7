"""Which graph output the user's ``output`` option names."""

from __future__ import annotations

import pytest
import torch

from sparsec.errors import OptionError
from sparsec.passes.fx_frontend import find_output


def two_outputs(x):
    return x * 2.0, x + 1.0, x.sum(0)


def test_the_output_equal_to_the_probe_among_several_of_its_shape():
    x = torch.randn(4, 8)
    assert find_output(two_outputs, (x,), x + 1.0) == 1
    assert find_output(two_outputs, (x,), x * 2.0) == 0


def test_an_output_alone_of_its_shape_is_taken_though_rounding_moved_it():
    x = torch.randn(4, 8)
    moved = x.sum(0) * 1.3  # a deep 16-bit graph and the eager model can differ this much
    assert find_output(two_outputs, (x,), moved) == 2


def test_no_output_of_that_shape_or_none_near_it_is_an_option_error():
    x = torch.randn(4, 8)
    with pytest.raises(OptionError, match="not among this graph's 3 float outputs"):
        find_output(two_outputs, (x,), torch.zeros(3))
    with pytest.raises(OptionError, match="matches none of this graph's 2 outputs of that shape"):
        find_output(two_outputs, (x,), x - 5.0)
