"""act:S kernel (codegen/act.py) under the Triton interpreter against the plain-torch reference.

Tolerances: fp32 products agree to float32 rounding over K terms (1e-5 relative); fp16 inputs and
weights with float32 accumulation to 2e-3 (a few units of fp16's 2**-11 over two roundings)."""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen import linear, pack
from sparsec.codegen.act import splits_for
from sparsec.errors import SparsecError

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def masked_product(x, w, t, bias=None):
    xd = x.double()
    y = torch.where(xd.abs() >= t, xd, 0.0) @ w.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, N, K", [(1, 96, 300), (3, 128, 512), (8, 64, 1024), (16, 130, 520)])
def test_kernel_matches_the_masked_product(dtype, M, N, K, gen):
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    packed = pack("act:0.5", w)
    t = float(packed.tensors()["threshold"])
    y = linear(x, packed, b, impl="triton")
    ref = masked_product(x, w, t, b)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, ref) <= TOL[dtype]
    assert rel(linear(x, packed, b, impl="reference"), ref) <= TOL[dtype]


def test_split_k_is_exercised_by_the_shapes_above():
    """The K splits (and their reduction launch) are what the larger cases run."""
    assert splits_for(1, 96, 300, torch.device("cpu"))[0] == 2
    assert splits_for(8, 64, 1024, torch.device("cpu"))[0] == 4


def test_exact_on_inputs_that_are_exactly_sparse(gen):
    """After a ReLU half the inputs are exactly zero: skipping them (and only them) is lossless."""
    N, K = 64, 256
    w = torch.randn(N, K, generator=gen)
    x = torch.relu(torch.randn(5, K, generator=gen))
    packed = pack("act:0.4", w, threshold=1e-6)
    y = linear(x, packed, impl="triton")
    assert rel(y, x.double() @ w.double().t()) <= TOL[torch.float32]


def test_each_token_is_masked_on_its_own(gen):
    """Several tokens in one launch read the union of their kept inputs, yet each token's output is
    what it would be alone."""
    N, K = 64, 512
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(9, K, generator=gen) * torch.rand(9, 1, generator=gen) * 3
    packed = pack("act:0.6", w)
    together = linear(x, packed, impl="triton")
    alone = torch.cat([linear(x[i:i + 1], packed, impl="triton") for i in range(x.shape[0])])
    assert rel(together, alone) <= TOL[torch.float32]


def test_many_tokens_run_the_masked_dense_product(gen):
    N, K = 32, 128
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(40, K, generator=gen)
    packed = pack("act:0.5", w)
    t = float(packed.tensors()["threshold"])
    assert rel(linear(x, packed, impl="triton"), masked_product(x, w, t)) <= TOL[torch.float32]


def test_default_threshold_skips_the_fraction_of_unit_normal_inputs(gen):
    packed = pack("act:0.4", torch.randn(8, 64, generator=gen))
    t = float(packed.tensors()["threshold"])
    x = torch.randn(20000, generator=gen)
    assert abs(float((x.abs() < t).float().mean()) - 0.4) < 0.02


def test_packing_refuses_what_it_cannot_use(gen):
    w = torch.randn(8, 64, generator=gen)
    with pytest.raises(SparsecError, match="threshold must be a finite non-negative"):
        pack("act:0.5", w, threshold=-1.0)
    with pytest.raises(SparsecError, match="takes no 'threshold'"):
        pack("2:4", w, threshold=0.1)
    with pytest.raises(Exception, match=r"skip fraction 1.5 must be in \(0, 1\)"):
        pack("act:1.5", w)


def test_gradient_zero_where_inputs_were_skipped(gen):
    N, K = 16, 64
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(3, K, generator=gen, requires_grad=True)
    packed = pack("act:0.5", w)
    t = float(packed.tensors()["threshold"])
    linear(x, packed, impl="triton").sum().backward()
    keep = (x.detach().abs() >= t).double()
    expected = (torch.ones(3, N, dtype=torch.float64) @ w.double()) * keep
    assert rel(x.grad, expected) <= TOL[torch.float32]


def test_custom_op_passes_opcheck(gen):
    from sparsec.codegen.act import act_linear_op

    w = torch.randn(32, 64, generator=gen)
    packed = pack("act:0.5", w)
    t = packed.tensors()
    x = torch.randn(2, 64, generator=gen)
    torch.library.opcheck(act_linear_op, (x, t["weight_t"], t["threshold"], None),
                          test_utils=("test_schema", "test_faketensor"))


def test_layers_reading_one_input_stack_into_one_launch(gen):
    from sparsec.codegen import stack_rows

    K = 128
    w1, w2 = torch.randn(48, K, generator=gen), torch.randn(80, K, generator=gen)
    p1, p2 = pack("act:0.5", w1, threshold=0.3), pack("act:0.5", w2, threshold=0.3)
    stacked = stack_rows([p1, p2])
    assert stacked is not None and stacked.shape == (128, K)
    x = torch.randn(2, K, generator=gen)
    y = linear(x, stacked, impl="triton")
    assert rel(y, torch.cat([masked_product(x, w1, 0.3), masked_product(x, w2, 0.3)], dim=1)) <= TOL[torch.float32]
    assert stack_rows([p1, pack("act:0.5", w2, threshold=0.4)]) is None  # thresholds differ: no one launch
