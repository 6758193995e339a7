"""Packed linears pass gradients back to their input (and bias), so a rewritten graph runs with
autograd on: checked against autograd through the dense expansion of the same packed weight."""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen import linear, pack

# fp32 on the interpreter: products of 64 terms, accumulated in fp32 by both sides
TOL = dict(rtol=1e-4, atol=1e-4)
SPECS = ["2:4", "block:16:0.5", "lowrank:8", "monarch:4"]


@pytest.mark.parametrize("spec", SPECS)
def test_input_and_bias_gradients_match_the_dense_expansion(spec, gen):
    N, K, M = 64, 64, 6
    packed = pack(spec, torch.randn(N, K, generator=gen))
    w = packed.to_dense()
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    bias = torch.randn(N, generator=gen, requires_grad=True)
    g = torch.randn(M, N, generator=gen)
    (linear(x, packed, bias) * g).sum().backward()
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    ((x_ref @ w.T + b_ref) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(bias.grad, b_ref.grad, **TOL)


@pytest.mark.parametrize("spec", SPECS)
def test_a_compiled_graph_with_autograd_on_traces_a_backward_through_the_packed_op(spec, gen):
    # what torch.compile does when a model is called without torch.no_grad(): the joint graph
    # needs each op's gradient formula, or compilation fails
    N, K = 64, 64
    packed = pack(spec, torch.randn(N, K, generator=gen))
    first = torch.nn.Linear(K, K)
    x = torch.randn(5, K, generator=gen)

    def model(x):
        return linear(torch.relu(first(x)), packed)

    y = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    grad = first.weight.grad.clone()
    first.weight.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(grad, first.weight.grad, **TOL)
