"""actrot:S (codegen/actrot.py) under the Triton interpreter against the plain-torch reference.

Tolerances as for act (test_act_kernel.py): fp32 to float32 rounding over K terms (1e-5 relative),
fp16 with float32 accumulation to 2e-3. The reference masks the rotated inputs as the kernel
computes them (x Q in the input's dtype), so an input on the edge of the threshold is skipped by
both or by neither."""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen import linear, pack, stack_rows
from sparsec.codegen.actrot import random_rotation
from sparsec.errors import SparsecError

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def rotated_masked(x, w, q, t, bias=None):
    z = (x @ q.to(x.dtype)).double()
    y = torch.where(z.abs() >= t, z, 0.0) @ (w.double() @ q.double()).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, N, K", [(1, 96, 300), (4, 128, 512), (16, 130, 260), (20, 64, 128)])
def test_kernel_matches_the_rotated_masked_product(dtype, M, N, K, gen):
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    q = random_rotation(K, "cpu", seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    packed = pack("actrot:0.5", w, rotation=q, threshold=0.7)
    qp = packed.tensors()["rotation"]
    ref = rotated_masked(x, w, qp, 0.7, b)
    y = linear(x, packed, b, impl="triton")
    assert y.dtype == dtype and y.shape == (M, N)
    # the packed rotated weight is (W Q)^T rounded once to the dtype: compare within that rounding
    assert rel(y, ref) <= TOL[dtype] * 2
    assert rel(linear(x, packed, b, impl="reference"), ref) <= TOL[dtype] * 2


def test_nothing_under_the_threshold_is_the_dense_layer(gen):
    """With a zero threshold no rotated input is skipped: y = (x Q)(W Q)^T = x W^T."""
    N, K = 48, 200
    w, x = torch.randn(N, K, generator=gen), torch.randn(3, K, generator=gen)
    packed = pack("actrot:0.4", w, rotation=random_rotation(K, "cpu", seed=5), threshold=0.0)
    assert rel(linear(x, packed, impl="triton"), x.double() @ w.double().t()) <= TOL[torch.float32]


def test_inputs_confined_to_a_subspace_skip_its_complement_losslessly(gen):
    """Planted structure: inputs in a 24-dimensional subspace of 96 and Q its basis first. The 72
    rotated inputs beyond it are zero, so actrot skips 70% of the inputs for no error, where act
    on the inputs as they are loses a great deal at the same fraction."""
    K, r, N = 96, 24, 64
    basis, _ = torch.linalg.qr(torch.randn(K, K, generator=gen, dtype=torch.float64))
    x = (torch.randn(8, r, generator=gen, dtype=torch.float64) @ basis[:, :r].T).float()
    w = torch.randn(N, K, generator=gen)
    exact = x.double() @ w.double().t()
    rotated = pack("actrot:0.7", w, rotation=basis.float(), threshold=1e-4)
    z = x @ basis.float()
    assert float((z.abs() < 1e-4).float().mean()) >= 0.7
    assert rel(linear(x, rotated, impl="triton"), exact) <= 1e-5
    t = float(torch.quantile(x.abs().reshape(-1), 0.7))
    assert rel(linear(x, pack("act:0.7", w, threshold=t), impl="triton"), exact) > 0.2


def test_pack_keeps_the_weight_and_rounds_trip(gen):
    N, K = 40, 64
    w = torch.randn(N, K, generator=gen)
    before = w.clone()
    packed = pack("actrot:0.5", w)
    assert torch.equal(w, before)
    q = packed.tensors()["rotation"]
    assert torch.allclose(q.T @ q, torch.eye(K), atol=1e-5)  # the default (timing) rotation is orthonormal
    assert torch.allclose(packed.to_dense(), w, atol=1e-5)


def test_stacks_only_layers_with_one_rotation_and_threshold(gen):
    """gate and up calibrated on one input share Q and the threshold: one launch for both, the same
    outputs; a different rotation does not stack."""
    K = 64
    q = random_rotation(K, "cpu", seed=1)
    a, b = torch.randn(32, K, generator=gen), torch.randn(48, K, generator=gen)
    pa, pb = pack("actrot:0.5", a, rotation=q, threshold=0.6), pack("actrot:0.5", b, rotation=q, threshold=0.6)
    both = stack_rows([pa, pb])
    assert both is not None and both.shape == (80, K)
    x = torch.randn(3, K, generator=gen)
    y = linear(x, both, impl="triton")
    assert rel(y, torch.cat([linear(x, pa, impl="triton"), linear(x, pb, impl="triton")], dim=1)) <= 1e-5
    other = pack("actrot:0.5", b, rotation=random_rotation(K, "cpu", seed=2), threshold=0.6)
    assert stack_rows([pa, other]) is None


def test_a_rotation_of_the_wrong_shape_is_refused_naming_it(gen):
    w = torch.randn(16, 32, generator=gen)
    with pytest.raises(SparsecError, match="rotation must be 32 x 32"):
        pack("actrot:0.5", w, rotation=torch.eye(16))
    with pytest.raises(SparsecError, match="rotation must be orthonormal"):
        pack("actrot:0.5", w, rotation=2.0 * torch.eye(32))
    with pytest.raises(SparsecError, match="threshold must be a finite non-negative"):
        pack("actrot:0.5", w, rotation=torch.eye(32), threshold=float("nan"))
