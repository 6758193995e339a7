"""Timing one layer's subgraph in onnxruntime, in the layer's own dtype."""

import pytest
import torch

from sparsec.formats import LowRank
from sparsec.passes.onnx_timing import time_layer
from sparsec.sites import Site


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_layer_and_its_rewrite_are_timed_in_its_dtype(dtype):
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(64, 4, generator=g) @ torch.randn(4, 96, generator=g)).to(dtype)
    site = Site(name="fc", op="MatMul", weight=weight, bias=None, dtype=dtype, input_key="g0:x", graph=0)
    dense_us, rewritten_us = time_layer(site, LowRank(4), weight.float(), 8, "CPUExecutionProvider", 1)
    assert dense_us > 0 and rewritten_us > 0
