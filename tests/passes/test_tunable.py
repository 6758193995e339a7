"""Trainable forms of each format's reconstruction (recovery's distillation): they start at the
reconstruction exactly, pass gradients to the values the format stores, and keep the format's
structure whatever those values become, so codegen still packs the result losslessly."""

from __future__ import annotations

import pytest
import torch
from accuracy_data import activations, stats_of

from sparsec.formats import parse_spec
from sparsec.passes.registry import HANDLERS
from sparsec.activation import pack_approximation
from sparsec.sites import as_weight

N, K = 64, 128


def fitted(fmt: str, gen: torch.Generator):
    """A reconstruction of a random weight in the format, as the planner would hold it."""
    spec = parse_spec(fmt)
    weight = torch.randn(N, K, generator=gen)
    seed = int(torch.randint(1000, (1,), generator=gen))
    (approx,) = HANDLERS[spec.family].approximate([spec], weight, stats_of(activations(K, 512, seed)))
    return spec, approx


FORMATS = ["2:4", "block:16:0.5", "lowrank:12", "monarch:4", "2:4+lowrank:8", "block:16:0.5+lowrank:8"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tunable_starts_at_the_reconstruction_and_stays_in_its_format_after_a_step(fmt):
    gen = torch.Generator().manual_seed(FORMATS.index(fmt))
    spec, approx = fitted(fmt, gen)
    tunable = HANDLERS[spec.family].tunable(spec, approx)
    start = as_weight(approx).float()
    # float32 factors of a float64 decomposition: a few ulps of the weight's scale
    assert torch.allclose(tunable.weight(), start, atol=1e-5 * float(start.abs().max()), rtol=0)

    target = torch.randn(N, K, generator=gen)
    loss = ((tunable.weight() - target) ** 2).sum()
    grads = torch.autograd.grad(loss, tunable.parameters())
    assert all(float(g.abs().sum()) > 0 for g in grads)  # every stored value learns
    with torch.no_grad():
        for p, g in zip(tunable.parameters(), grads):
            p -= 1e-3 * g
    moved = as_weight(tunable.result()).float()
    assert float(((moved - target) ** 2).sum()) < float(loss.detach())
    # the stored values moved, the structure did not: codegen packs it back exactly
    dense = pack_approximation(spec, tunable.result()).to_dense().float()
    assert torch.allclose(dense, moved, atol=1e-4 * float(moved.abs().max()), rtol=0)
    assert not torch.allclose(moved, start)


@pytest.mark.parametrize("fmt", ["2:4", "block:16:0.5"])
def test_a_sparse_tunable_never_revives_a_pruned_weight(fmt):
    gen = torch.Generator().manual_seed(7)
    spec, approx = fitted(fmt, gen)
    tunable = HANDLERS[spec.family].tunable(spec, approx)
    loss = (tunable.weight() - torch.randn(N, K, generator=gen)).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, tunable.parameters())
    assert torch.all(grad[approx == 0] == 0)
    with torch.no_grad():
        tunable.parameters()[0].add_(torch.randn(N, K, generator=gen))  # even a step that touches them
    assert torch.equal(tunable.result() == 0, approx == 0)


def test_activation_sparsity_has_nothing_to_train():
    assert getattr(HANDLERS["act"], "tunable", None) is None
