"""Rotated activation sparsity (``actrot:S``): the inputs rotated, then ``act``'s skipping product.

Layout for W (N, K) and its rotation Q (K, K, orthonormal):
  rotation  (K, K)  Q: a token's rotated inputs are z = x Q;
  weight_t  (K, N)  (W Q)^T = Q^T W^T, so the N outputs a rotated input feeds are one contiguous
                    row, as ``act`` reads it;
  threshold (1,)    float32, the magnitude under which a rotated input counts as zero.

y[m] = (z[m] masked to |z[m]| >= threshold) @ weight_t + bias, z = x Q: exactly W x when nothing
is under the threshold. The product with Q is a dense GEMM (cuBLAS on the GPU); what follows is
``act``'s launch (codegen/act.py) on z, so every property of that kernel holds here: skipped rows
cost no memory traffic, any M is correct, no host sync. Layers that read one input and were
calibrated to one rotation and threshold (gate and up) stack into one launch, which computes z
once for all of them.
"""

from __future__ import annotations

import math

import torch

from sparsec.errors import SparsecError

from ._common import check_input, expect_tensor, match_dtype
from .act import GEMV_MAX_M, act_linear_op, act_masked_gemm
from .packed import FormatKernels, register


def random_rotation(K: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """An orthonormal K x K matrix drawn at random (for timing, where no calibration gave axes)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # float32 on the weight's device: a K of 14336 factors in a second on a GPU (float64 on a CPU, minutes)
    q, r = torch.linalg.qr(torch.randn(K, K, generator=gen, device=device, dtype=torch.float32))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


def _check_orthonormal(q: torch.Tensor) -> None:
    """Refuse a rotation that is not orthonormal (y = (x Q)(W Q)^T is W x only when Q Q^T = I), by
    Q^T Q on random vectors: O(K^2), where forming Q^T Q would cost K^3. The tolerance admits a
    rotation rounded to bf16 (each entry within 2^-8 of its value)."""
    gen = torch.Generator(device=q.device).manual_seed(0)
    v = torch.randn(q.shape[0], 4, generator=gen, device=q.device, dtype=torch.float32)
    back = q.T @ (q @ v)
    off = float((back - v).norm() / v.norm())
    if not off <= 0.05:
        raise SparsecError(f"actrot rotation must be orthonormal (Q^T Q = I); Q^T Q moves a random vector by "
                           f"{100.0 * off:.3g}% of its length: pass the layer's axes as an orthonormal matrix "
                           f"(e.g. eigenvectors of its input Gram)")


class ActRotKernels(FormatKernels):
    family = "actrot"
    names = ("rotation", "weight_t", "threshold")

    def stack_rows(self, spec, parts):
        """Layers reading one input with one rotation and threshold: their rotated transposed
        weights side by side, one launch (and one product with Q) for all of them."""
        first = parts[0]
        if any(not torch.equal(p["threshold"], first["threshold"]) or not torch.equal(p["rotation"], first["rotation"])
               for p in parts[1:]):
            return None
        return {"rotation": first["rotation"].clone(),
                "weight_t": torch.cat([p["weight_t"] for p in parts], dim=1).contiguous(),
                "threshold": first["threshold"].clone()}

    def stack_pays(self, M: int) -> bool:
        return M <= GEMV_MAX_M

    def pack(self, spec, weight, rotation: torch.Tensor | None = None, threshold: float | None = None):
        """``rotation``: the layer's axes Q (K x K, orthonormal); ``threshold``: the calibrated
        magnitude under which rotated inputs are skipped. Without them (a timing): a random
        rotation, and the magnitude that skips a fraction S of unit-normal inputs (which a
        rotation leaves unit-normal)."""
        from sparsec.activation import normal_threshold

        K = weight.shape[1]
        t = normal_threshold(spec.skip) if threshold is None else float(threshold)
        if not math.isfinite(t) or t < 0.0:
            raise SparsecError(f"actrot threshold must be a finite non-negative number, got {threshold!r}")
        q = random_rotation(K, weight.device) if rotation is None else rotation
        if tuple(q.shape) != (K, K):
            raise SparsecError(f"actrot rotation must be {K} x {K} for a weight of {K} inputs, got {tuple(q.shape)}")
        q32 = q.to(device=weight.device, dtype=torch.float32)
        _check_orthonormal(q32)
        weight_t = (q32.T @ weight.to(torch.float32).T).to(weight.dtype).contiguous()
        return {"rotation": q32.to(weight.dtype).contiguous(), "weight_t": weight_t,
                "threshold": torch.tensor([t], dtype=torch.float32, device=weight.device)}

    def validate(self, spec, shape, tensors):
        N, K = shape
        q = expect_tensor(tensors, "rotation", (K, K), floating=True)
        w = expect_tensor(tensors, "weight_t", (K, N), floating=True)
        t = expect_tensor(tensors, "threshold", (1,), floating=True).to(torch.float32)
        if not bool(torch.isfinite(t).all()) or float(t[0]) < 0.0:
            raise SparsecError("packed 'threshold' must be one finite non-negative value")
        _check_orthonormal(q.to(torch.float32))
        return {"rotation": q.contiguous(), "weight_t": w.contiguous(), "threshold": t.contiguous()}

    def to_dense(self, spec, shape, tensors):
        """The dense weight W = (W Q) Q^T (the threshold is not a property of the weight)."""
        q = tensors["rotation"].to(torch.float32)
        return (tensors["weight_t"].to(torch.float32).T @ q.T).to(tensors["weight_t"].dtype).contiguous()

    def reference(self, x2d, packed, bias):
        t = packed.tensors()
        # the rotated inputs rounded to the packed dtype, as the layer computes them in it: a float32
        # reference of a 16-bit layer otherwise flips the inputs within a rounding of the threshold
        z = (x2d @ match_dtype(t["rotation"], x2d.dtype)).to(t["rotation"].dtype).to(x2d.dtype)
        return act_masked_gemm(z, match_dtype(t["weight_t"], x2d.dtype), t["threshold"].to(x2d.device),
                               None if bias is None else bias.to(x2d.dtype))

    def fast(self, x2d, packed, bias, impl):
        check_input(x2d)
        t = packed.tensors()
        z = x2d @ match_dtype(t["rotation"], x2d.dtype)
        return act_linear_op(z, match_dtype(t["weight_t"], x2d.dtype), t["threshold"],
                             None if bias is None else bias.to(x2d.dtype))


register(ActRotKernels())
