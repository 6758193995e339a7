"""What a packed layer hands on is row-major, whatever order its kernel wrote the product in.

cuSPARSELt's product comes back column-major on CUDA; attention and norms after it need rows.
Here the packed call is made to return the column-major view of its product (as cuSPARSELt's
does), on the CPU, and the rewritten graph must still hand row-major tensors to what reads them.
"""

from __future__ import annotations

import torch

import sparsec
from sparsec.codegen import PackedGroup
from test_rewrite_fx_groups import spy_on_rewrite


class Projections(torch.nn.Module):
    """q, k and v of one input (a group where stacking pays), and o alone: all four returned."""

    def __init__(self, d=64):
        super().__init__()
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, d, bias=False)
        self.v = torch.nn.Linear(d, d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)

    def forward(self, x, h):
        return self.q(x), self.k(x), self.v(x), self.o(h)


def planted(model, gen):
    with torch.no_grad():
        for lin in model.children():
            N, K = lin.weight.shape
            w = torch.randn(N, K // 4, 4, generator=gen)
            drop = torch.rand(N, K // 4, 4, generator=gen).argsort(dim=-1)[..., :2]
            lin.weight.copy_(w.scatter(2, drop, 0.0).reshape(N, K) / K ** 0.5)
    return model


def column_major_products(monkeypatch):
    """Every packed call returns its product as the transposed view of an (N, M) tensor."""
    from sparsec.codegen import module

    real = module.linear

    def transposed(x, packed, bias, impl):
        y = real(x, packed, bias, impl)
        return y.reshape(-1, y.shape[-1]).t().contiguous().t().reshape(y.shape)

    monkeypatch.setattr(module, "linear", transposed)


def test_every_packed_output_and_group_slice_reaches_its_readers_row_major(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    model = planted(Projections(), gen).eval()
    x, h = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
    seen = spy_on_rewrite(monkeypatch)
    column_major_products(monkeypatch)
    result = sparsec.optimize(model, (x, h), fingerprint="cpu", plan={"layers": {"_default": "2:4"}})
    gm = seen["gm"]
    assert any(isinstance(gm.get_submodule(n.target), PackedGroup) for n in gm.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        outs = result.module(x, h)
        expected = model(x, h)
    assert len(outs) == 4
    for out, ref in zip(outs, expected):
        assert out.is_contiguous(), out.stride()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(result.report.layers) == 4


def test_without_the_row_major_step_the_column_major_product_would_reach_the_readers(monkeypatch):
    """The check above would fail without the step: the same graph with the step taken out hands on
    the column-major product."""
    from sparsec.passes import rewrite_fx

    monkeypatch.setattr(rewrite_fx, "_row_major_outputs", lambda gm: None)
    gen = torch.Generator().manual_seed(1)
    model = planted(Projections(), gen).eval()
    x, h = torch.randn(8, 64, generator=gen), torch.randn(8, 64, generator=gen)
    column_major_products(monkeypatch)
    result = sparsec.optimize(model, (x, h), fingerprint="cpu", plan={"layers": {"_default": "2:4"}})
    with torch.no_grad():
        outs = result.module(x, h)
    assert not outs[3].is_contiguous()

