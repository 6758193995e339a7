"""Trainable forms of a format's reconstruction, for recovery's distillation (``sparsec.distill``).

Each holds, as float32 leaf tensors, the values the format stores (the kept values of a sparse
weight, the factors of a low-rank or Monarch one) and gives back a dense weight that is a
differentiable function of them, with the format's structure whatever the values: gradient steps
on them never leave the format, and ``result()`` is a reconstruction codegen packs losslessly.
A handler offers ``tunable(spec, approx)`` returning one of these (or None: nothing to train).
"""

from __future__ import annotations

import torch


class Masked:
    """A sparse weight (2:4, block): its kept values, on a fixed support."""

    def __init__(self, approx: torch.Tensor):
        dense = approx.detach().to(torch.float32)
        self.mask = dense != 0
        self.values = dense.clone().requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.values]

    def weight(self) -> torch.Tensor:
        return self.values * self.mask

    def result(self) -> torch.Tensor:
        return self.weight().detach()


class Factored:
    """A rank-R weight as A [N, R] @ B [R, K], the singular values split evenly between them so
    both factors take steps of like size."""

    def __init__(self, approx: torch.Tensor, rank: int):
        self.a, self.b = balanced_factors(approx.detach().to(torch.float32), rank)
        self.a.requires_grad_(True)
        self.b.requires_grad_(True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.a, self.b]

    def weight(self) -> torch.Tensor:
        return self.a @ self.b

    def result(self) -> torch.Tensor:
        return self.weight().detach()


class BlockFactored(Factored):
    """A weight made of sub-blocks of rank <= r each (Monarch: ``passes.monarch``), every sub-block
    as its own rank-r product: ``blocks`` is the batch of sub-blocks, ``assemble`` puts a batch of
    them back into the weight."""

    def __init__(self, blocks: torch.Tensor, rank: int, assemble):
        super().__init__(blocks, rank)
        self.assemble = assemble

    def weight(self) -> torch.Tensor:
        return self.assemble(self.a @ self.b)


class SparsePlusFactors:
    """A composite (sparse + U V): the sparse part's kept values and the low-rank factors."""

    def __init__(self, approx):
        self.kind = type(approx)
        self.sparse = Masked(approx.sparse)
        self.u = approx.u.detach().to(torch.float32).clone().requires_grad_(True)
        self.v = approx.v.detach().to(torch.float32).clone().requires_grad_(True)
        self.alone = approx.alone

    def parameters(self) -> list[torch.Tensor]:
        return [*self.sparse.parameters(), self.u, self.v]

    def weight(self) -> torch.Tensor:
        return self.sparse.weight() + self.u @ self.v

    def result(self):
        return self.kind(self.sparse.result(), self.u.detach().clone(), self.v.detach().clone(), self.alone)


def balanced_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A @ B the best rank-``rank`` approximation of ``w`` (a batch of matrices too), each
    factor carrying the square root of the singular values. A single matrix is first split by a
    range finder (``lowrank_factors``), so only an R x K matrix is decomposed."""
    if w.dim() == 2:
        from sparsec.passes.onnx_emit import lowrank_factors

        u0, v0 = lowrank_factors(w, rank)
        q, r = torch.linalg.qr(u0.to(torch.float64))
        u, s, vh = torch.linalg.svd(r @ v0.to(torch.float64), full_matrices=False)
        u = q @ u
    else:
        u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    root = s[..., :rank].sqrt()
    a = u[..., :, :rank] * root.unsqueeze(-2)
    b = root.unsqueeze(-1) * vh[..., :rank, :]
    return a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous()
