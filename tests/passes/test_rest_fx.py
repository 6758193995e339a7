"""The dense rest of a Dynamo graph: fused regions and library kernels, with their exact bytes and FLOPs."""

from __future__ import annotations

import pytest
import torch

from fx_models import GatedMlp

from sparsec.passes import capture_fx
from sparsec.passes.rest_fx import rest_of_graph


def traced(model, *args):
    seen = {}

    def backend(gm, example_inputs):
        seen["gm"], seen["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    return seen["gm"], seen["inputs"]


def rest_of(model, *args):
    gm, inputs = traced(model, *args)
    _, _, nodes = capture_fx.capture(gm, inputs, 0)
    return rest_of_graph(gm, inputs, nodes.values()), len(nodes)


def test_gated_mlp_rest_is_the_silu_multiply_and_the_residual_add():
    """SiLU and multiply fuse (read gate and up, write their product); the residual add reads x
    and down's output and writes the result: two kernels, every byte accounted for."""
    M, d, h = 8, 16, 32
    rest, sites = rest_of(GatedMlp(d, h), torch.randn(M, d))
    assert sites == 3
    assert sorted(k.bytes for k in rest.kernels) == [3 * M * d * 4, 3 * M * h * 4]
    assert all(k.flops == 0 for k in rest.kernels)


def test_constant_work_on_weights_is_no_kernel_and_a_norm_region_reads_its_weight():
    """A norm's weight enters its region; a transpose of a weight (a view of a constant) is no work."""
    class Normed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.proj = torch.nn.Parameter(torch.randn(16, 16))

        def forward(self, x):
            return self.norm(x) @ self.proj.t()

    rest, sites = rest_of(Normed(), torch.randn(4, 16))
    assert sites == 1
    (kernel,) = rest.kernels
    assert kernel.bytes == 4 * 16 * 4 * 2 + 2 * 16 * 4      # x in, normalised x out, weight and bias in


def test_matmul_between_activations_is_a_library_kernel_with_its_flops():
    class Scores(torch.nn.Module):
        def forward(self, q, k):
            return torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)

    B, L, D = 2, 8, 4
    rest, sites = rest_of(Scores(), torch.randn(B, L, D), torch.randn(B, L, D))
    assert sites == 0
    library = [k for k in rest.kernels if k.flops]
    assert [k.flops for k in library] == [2.0 * B * L * L * D]
    assert library[0].bytes == (2 * B * L * D + B * L * L) * 4
    softmax = [k for k in rest.kernels if not k.flops]
    assert [k.bytes for k in softmax] == [2 * B * L * L * 4]


def test_graph_without_traced_shapes_has_an_unknown_rest():
    gm = torch.fx.symbolic_trace(GatedMlp())
    x = torch.randn(2, 16)
    _, _, nodes = capture_fx.capture(gm, [x], 0)
    assert rest_of_graph(gm, [x], nodes.values()) is None


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_bytes_follow_the_dtype(dtype, size):
    rest, _ = rest_of(GatedMlp().to(dtype), torch.randn(8, 16).to(dtype))
    assert sorted(k.bytes for k in rest.kernels) == [3 * 8 * 16 * size, 3 * 8 * 32 * size]
    assert {k.dtype for k in rest.kernels} == {str(dtype).replace("torch.", "")}


def test_residual_adds_of_successive_blocks_are_separate_kernels():
    """Block 2's residual add reads block 1's: an edge, but down-projection 2 lies between them
    (it needs block 1's sum first), so no kernel can hold both: four blocks, eight kernels."""
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(GatedMlp() for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    rest, sites = rest_of(Stack(), torch.randn(8, 16))
    assert sites == 12
    assert sorted(k.bytes for k in rest.kernels) == [3 * 8 * 16 * 4] * 4 + [3 * 8 * 32 * 4] * 4


def test_each_kernel_carries_its_kind_pointwise_reduction_matmul_or_attention():
    """A region with a norm or softmax in it runs as a reduction kernel; scaled-dot-product
    attention, with a mask or without, is attention."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, q, k, v, mask):
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            s = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
            return self.norm(a + b).relu() * 2, s

    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    mask = torch.rand(1, 1, 4, 4) > 0.3
    mask[..., 0] = True
    rest, _ = rest_of(Block(), q, k, v, mask)
    kinds = sorted(k.kind for k in rest.kernels)
    assert kinds == ["attention", "attention", "matmul", "reduction", "reduction"]
    for kernel in rest.kernels:
        assert (kernel.flops > 0) == (kernel.kind in ("attention", "matmul"))


def test_a_pointwise_region_is_not_a_reduction():
    rest, _ = rest_of(GatedMlp(16, 32), torch.randn(4, 16))
    assert [k.kind for k in rest.kernels] == ["pointwise", "pointwise"]
