"""Weights that already have a format's structure, built from random factors."""

from __future__ import annotations

import torch

from sparsec.formats import parse_spec


def planted(spec: str, N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """An (N, K) fp32 weight that ``spec`` represents exactly."""
    s = parse_spec(spec)
    if s.family == "dense":
        return torch.randn(N, K, generator=gen)
    if s.family == "2:4":
        w = torch.randn(N, K // 4, 4, generator=gen)
        drop = torch.rand(N, K // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
        return w.scatter(2, drop, 0.0).reshape(N, K)
    if s.family == "block":
        B = s.block
        nr, nc = N // B, K // B
        keep = torch.randperm(nr * nc, generator=gen)[: s.kept_blocks(N, K)]
        mask = torch.zeros(nr * nc)
        mask[keep] = 1.0
        mask = mask.reshape(nr, 1, nc, 1).expand(nr, B, nc, B).reshape(N, K)
        return torch.randn(N, K, generator=gen) * mask
    if s.family == "lowrank":
        return torch.randn(N, s.rank, generator=gen) @ torch.randn(s.rank, K, generator=gen) / s.rank ** 0.5
    if s.family == "monarch":
        from sparsec.codegen.monarch import monarch_dims, monarch_reference

        nb, p, n, _ = monarch_dims(s, (N, K))
        L = torch.randn(nb, p, p, generator=gen) / p ** 0.5
        R = torch.randn(nb, n, p, generator=gen) / p ** 0.5
        return monarch_reference(torch.eye(K), L, R).t().contiguous()
    raise ValueError(spec)
