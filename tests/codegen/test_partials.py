"""codegen/partials.py: the split launches' float32 partials summed in one launch (interpreter)."""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen.partials import BLOCK, sum_partials


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("splits,M,N", [(1, 3, 40), (3, 7, 300), (5, 2, BLOCK + 17)])
def test_partials_sum_to_the_float64_sum_with_bias_in_the_output_dtype(dtype, splits, M, N, gen):
    parts = torch.randn(splits, M, N, generator=gen)
    ref = parts.double().sum(0)
    for bias in (None, torch.randn(N, generator=gen).to(dtype)):
        want = ref + (0.0 if bias is None else bias.double())
        y = sum_partials(parts, bias, dtype)
        assert y.dtype == dtype and y.shape == (M, N)
        # float32 sums of a few terms, then one rounding to the output dtype
        tol = {torch.float16: 1e-3, torch.float32: 1e-6}[dtype]
        torch.testing.assert_close(y.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_partials_written_into_a_given_output_and_nothing_past_it(gen):
    parts = torch.randn(4, 5, 64, generator=gen)
    out = torch.full((6, 64), 7.0)
    sum_partials(parts, None, torch.float32, out=out[:5])
    torch.testing.assert_close(out[:5], parts.sum(0), atol=1e-5, rtol=1e-6)
    assert torch.equal(out[5], torch.full((64,), 7.0))


def test_partials_without_triton_fall_back_to_torch(gen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    parts = torch.randn(3, 4, 9, generator=gen)
    bias = torch.randn(9, generator=gen)
    torch.testing.assert_close(sum_partials(parts, bias, torch.float32), parts.sum(0) + bias)


def test_empty_partials_give_an_empty_output():
    assert sum_partials(torch.zeros(2, 0, 8), None, torch.float16).shape == (0, 8)
