"""What a linear's launch does to its product before writing it: the SiLU-gate and the residual add.

A Llama-style MLP at a few tokens is a handful of small launches per block: gate and up, the
SiLU-multiply, down, the residual add. At M = 1 the two elementwise kernels cost about as much
launch and tail as a sparse GEMV saves, so the small-M kernels can finish them in their epilogue:

- gated: the launch runs over a stacked weight holding the gate's rows at ``gate_row`` and the
  up projection's at ``up_row`` (``width`` rows each), and writes
  ``silu(x @ Wg^T + bg) * (x @ Wu^T + bu)``, ``width`` outputs;
- residual: it writes ``x @ W^T + b + r`` for an ``r`` of the output's shape.

Every epilogue has a plain-torch meaning (``apply``), which is both the reference and what a
launch that cannot fuse does after its product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Epilogue:
    gate_row: int = -1   # first row of the gate in the stacked weight; -1: not gated
    up_row: int = -1
    width: int = 0       # outputs of a gated launch
    residual: bool = False

    @property
    def gated(self) -> bool:
        return self.gate_row >= 0

    def out_features(self, n_rows: int) -> int:
        return self.width if self.gated else n_rows

    def describe(self) -> str:
        parts = (["SiLU-multiply"] if self.gated else []) + (["residual add"] if self.residual else [])
        return " and ".join(parts)


def apply(z: torch.Tensor, gate_row: int, up_row: int, width: int, residual: torch.Tensor | None) -> torch.Tensor:
    """The epilogue on the product ``z`` (M, rows), in fp32, returned in z's dtype."""
    out = z.float()
    if gate_row >= 0:
        out = F.silu(out[:, gate_row:gate_row + width]) * out[:, up_row:up_row + width]
    if residual is not None:
        out = out + residual.float()
    return out.to(z.dtype)


def register_grad(op, dense_of: Callable, saved: Sequence[int], bias_index: int, residual_index: int) -> None:
    """Autograd for an epilogue op ``op(x, *packed, bias, residual, gate_row, up_row, width)``.

    ``dense_of(*inputs[saved], n_in)`` is the stacked (rows, K) weight; the backward runs in
    plain torch (it expands the weight, as every packed layer's input gradient does)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[bias_index], *(inputs[i] for i in saved))
        ctx.gate = tuple(inputs[residual_index + 1:residual_index + 4])
        ctx.n_inputs = len(inputs)

    def backward(ctx, dy):
        x, bias, *packed = ctx.saved_tensors
        gate_row, up_row, width = ctx.gate
        acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
        w = dense_of(*packed, x.shape[1]).to(acc)
        dz = dy.to(acc)
        if gate_row >= 0:
            z = x.to(acc) @ w.t()
            if bias is not None:
                z = z + bias.to(acc)
            g, u = z[:, gate_row:gate_row + width], z[:, up_row:up_row + width]
            s = torch.sigmoid(g)
            dz = torch.zeros_like(z)
            dz[:, gate_row:gate_row + width] = dy.to(acc) * u * s * (1 + g * (1 - s))
            dz[:, up_row:up_row + width] = dy.to(acc) * g * s
        grads = [None] * ctx.n_inputs
        if ctx.needs_input_grad[0]:
            grads[0] = (dz @ w).to(x.dtype)
        if ctx.needs_input_grad[bias_index]:
            grads[bias_index] = dz.sum(0).to(bias.dtype)
        if ctx.needs_input_grad[residual_index]:
            grads[residual_index] = dy
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)
