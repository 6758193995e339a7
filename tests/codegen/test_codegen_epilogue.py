"""Fused epilogues (codegen/epilogue.py): the SiLU-gate over stacked gate/up rows and the residual
add, in the small-M launches and, above them, after the product; against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codegen_planted import planted
from sparsec.codegen import Epilogue, EpilogueLinear, PackedLinear, linear_epilogue, pack, stack_rows
from sparsec.errors import SparsecError
from test_codegen_kernels import TOL, _gemv_config_cases

SPECS = ("2:4", "block:16:0.5")


def gated_reference(x, gate_w, up_w, gate_b, up_b, residual):
    g = x.double() @ gate_w.double().t() + gate_b.double()
    u = x.double() @ up_w.double().t() + up_b.double()
    out = F.silu(g) * u
    return out if residual is None else out + residual.double()


def close(y, ref, dtype):
    # fp32 accumulation and epilogue, one rounding of the output to its dtype
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype] * ref.abs().max().item(), rtol=TOL[dtype])


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 7])
def test_gate_and_residual_match_float64(spec, dtype, M, gen):
    """Up stacked before gate (the gate's rows second), with biases: M = 1 runs the fused GEMV for
    both formats, 3 the block GEMV only, 7 every format's product then the epilogue in torch."""
    N, K = 48, 64
    gate_w, up_w = planted(spec, N, K, gen), planted(spec, N, K, gen)
    stacked = stack_rows([pack(spec, up_w.to(dtype)), pack(spec, gate_w.to(dtype))])
    bias = torch.randn(2 * N, generator=gen).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    residual = torch.randn(M, N, generator=gen).to(dtype)
    ep = Epilogue(gate_row=N, up_row=0, width=N, residual=True)
    y = linear_epilogue(x, stacked, bias, ep, residual, "triton", stacked.handler.epilogue_aux(stacked, ep))
    assert y.shape == (M, N) and y.dtype == dtype
    ref = gated_reference(x, gate_w.to(dtype), up_w.to(dtype), bias[N:], bias[:N], residual)
    close(y, ref, dtype)


@pytest.mark.parametrize("spec", SPECS)
def test_residual_alone_keeps_every_output_row(spec, gen):
    """Without the gate, the launch writes all N rows plus the residual (here over a 3-D input)."""
    w = planted(spec, 48, 64, gen).half()
    packed = pack(spec, w)
    x = torch.randn(1, 1, 64, generator=gen).half()
    r = torch.randn(1, 1, 48, generator=gen).half()
    y = linear_epilogue(x, packed, None, Epilogue(residual=True), r, "triton")
    ref = x.double() @ w.double().t() + r.double()
    assert y.shape == (1, 1, 48)
    close(y, ref, torch.float16)


@pytest.mark.parametrize("module,kernel_name,index",
                         _gemv_config_cases("twofour", "_WORDS_KERNEL") + _gemv_config_cases("block", "_GEMV_KERNEL"))
def test_every_small_m_config_fuses_the_gate_and_residual(module, kernel_name, index, gen):
    """Each configuration the autotuner may pick, run alone with both epilogues: 2:4 rows in
    partial row tiles and a partial last run (K = 352; 384 for the descriptor tiles, whose
    metadata rows must be 16-byte multiples); block rows of unequal kept counts."""
    from sparsec.codegen import block, twofour

    kernel = getattr({"block": block, "twofour": twofour}[module], kernel_name)
    config = kernel.configs[index]
    K = 384 if config.kwargs.get("USE_TMA") else 352
    spec, N, K, M = ("2:4", 40, K, 1) if module == "twofour" else ("block:64:0.4", 128, 320, 3)
    gate_w, up_w = torch.randn(N, K, generator=gen), torch.randn(N, K, generator=gen)
    if module == "block":
        up_w.view(2, 64, 5, 64)[1, :, 1:] *= 1e-3       # the up projection's second block row keeps fewer
    stacked = stack_rows([pack(spec, gate_w.half()), pack(spec, up_w.half())])
    bias = torch.randn(2 * N, generator=gen).half()
    x = torch.randn(M, K, generator=gen).half()
    residual = torch.randn(M, N, generator=gen).half()
    ep = Epilogue(gate_row=0, up_row=N, width=N, residual=True)
    if config.kwargs.get("USE_TMA"):
        t = stacked.tensors()
        assert twofour.tma_usable(x, t["values"].view(torch.int32), t["meta"].view(torch.int32))
    with kernel.only(config):
        y = linear_epilogue(x, stacked, bias, ep, residual, "triton", stacked.handler.epilogue_aux(stacked, ep))
    dense = stacked.to_dense()
    close(y, gated_reference(x, dense[:N], dense[N:], bias[:N], bias[N:], residual), torch.float16)


@pytest.mark.parametrize("module,kernel_name,index", _gemv_config_cases("twofour", "_TOKENS_KERNEL"))
def test_every_multi_token_word_config_fuses_the_gate_and_residual(module, kernel_name, index, gen):
    """The multi-token word kernel ("tokens") with both epilogues, each configuration alone, at a
    partial token tile and several tiles: the stacked gate and up rows walked one after the other
    per token tile, SiLU-multiplied, the residual added."""
    from sparsec.codegen import twofour

    config = getattr(twofour, kernel_name).configs[index]
    N, K = 20, 352  # a partial tile of 8 rows
    gate_w, up_w = torch.randn(N, K, generator=gen), torch.randn(N, K, generator=gen)
    stacked = stack_rows([pack("2:4", gate_w.half()), pack("2:4", up_w.half())])
    t = stacked.tensors()
    bias = torch.randn(2 * N, generator=gen).half()
    dense = stacked.to_dense()
    T = config.kwargs["TOKENS"]
    for M in sorted({max(1, T - 1), 2 * T + 1}):
        x = torch.randn(M, K, generator=gen).half()
        residual = torch.randn(M, N, generator=gen).half()
        with twofour._TOKENS_KERNEL.only(config):
            y = twofour.twofour_triton(x, t["values"], t["meta"], bias, path="tokens", residual=residual,
                                       gate_row=0, up_row=N, width=N)
        close(y, gated_reference(x, dense[:N], dense[N:], bias[:N], bias[N:], residual), torch.float16)


def test_block_gated_work_list_orders_pairs_by_their_blocks_together(gen):
    from sparsec.codegen.block import gated_order

    row_ptr = torch.tensor([0, 1, 4, 4, 5, 5, 9], dtype=torch.int32)   # gate rows keep 1, 3, 0; up rows 1, 0, 4
    assert gated_order(row_ptr, 0, 3, 3).tolist() == [2, 1, 0]         # pairs keep 2, 3, 4
    assert gated_order(row_ptr, 3, 0, 3).tolist() == [2, 1, 0]         # the same pairs, up stacked first


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_through_the_epilogue_match_dense_autograd(spec, gen):
    N, K, M = 32, 64, 2
    gate_w, up_w = planted(spec, N, K, gen), planted(spec, N, K, gen)
    stacked = stack_rows([pack(spec, gate_w), pack(spec, up_w)])
    bias = torch.randn(2 * N, generator=gen)
    ep = Epilogue(gate_row=0, up_row=N, width=N, residual=True)
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    r = torch.randn(M, N, generator=gen, requires_grad=True)
    b = bias.clone().requires_grad_(True)
    y = linear_epilogue(x, stacked, b, ep, r, "triton", stacked.handler.epilogue_aux(stacked, ep))
    dy = torch.randn(M, N, generator=gen)
    y.backward(dy)
    x2, r2, b2 = x.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True), \
        bias.clone().requires_grad_(True)
    ref = F.silu(x2 @ gate_w.t() + b2[:N]) * (x2 @ up_w.t() + b2[N:]) + r2
    ref.backward(dy)
    for got, want in ((x.grad, x2.grad), (r.grad, r2.grad), (b.grad, b2.grad)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_module_runs_the_epilogue_and_follows_to():
    gen = torch.Generator().manual_seed(3)
    gate_w, up_w = planted("block:16:0.5", 32, 64, gen), planted("block:16:0.5", 32, 64, gen)
    stacked = stack_rows([pack("block:16:0.5", gate_w), pack("block:16:0.5", up_w)])
    module = EpilogueLinear(PackedLinear(stacked), Epilogue(gate_row=0, up_row=32, width=32))
    assert module.aux_order.tolist() == sorted(range(2), key=lambda i: -int(
        (stacked.tensors()["row_ptr"][i + 1] - stacked.tensors()["row_ptr"][i])
        + (stacked.tensors()["row_ptr"][i + 3] - stacked.tensors()["row_ptr"][i + 2])))
    x = torch.randn(2, 64, generator=gen)
    ref = F.silu(x.double() @ gate_w.double().t()) * (x.double() @ up_w.double().t())
    torch.testing.assert_close(module(x).double(), ref, atol=1e-4, rtol=1e-4)
    module = module.to(torch.float64)
    assert module.aux_order.dtype == torch.int32 and module.linear.values.dtype == torch.float64
    assert "SiLU-multiply" in repr(module)


def test_bad_epilogues_are_refused_with_the_reason(gen):
    packed = pack("2:4", planted("2:4", 32, 64, gen))
    x = torch.randn(2, 64, generator=gen)
    with pytest.raises(SparsecError, match="residual of shape \\(2, 16\\) does not match the output \\(2, 32\\)"):
        linear_epilogue(x, packed, None, Epilogue(residual=True), torch.randn(2, 16))
    with pytest.raises(SparsecError, match="fall outside the weight's 32 rows"):
        linear_epilogue(x, packed, None, Epilogue(gate_row=0, up_row=24, width=16))
    with pytest.raises(SparsecError, match="impl 'fast' is not available"):
        linear_epilogue(x, packed, None, Epilogue(residual=True), torch.randn(2, 32), impl="fast")


def test_fake_gives_the_epilogue_output_shape(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode

    stacked = stack_rows([pack("block:16:0.5", planted("block:16:0.5", 32, 64, gen)) for _ in range(2)])
    t = stacked.tensors()
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(5, 64))
        vals = [mode.from_tensor(t[n]) for n in ("values", "col_idx", "row_ptr", "order")]
        y = torch.ops.sparsec.block_linear_epilogue(x, *vals, None, None, 0, 32, 32)
        z = torch.ops.sparsec.block_linear_epilogue(x, *vals, None, None, -1, -1, 0)
    assert tuple(y.shape) == (5, 32) and tuple(z.shape) == (5, 64)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("M", [1, 5])
def test_opcheck_traces_the_epilogue_ops_and_their_gradient(spec, M, gen):
    """torch.library.opcheck with inputs that need a gradient: the schema, the fake against the
    kernel, and AOT dispatch with dynamic shapes through the op and its gradient."""
    N, K = 32, 64
    stacked = stack_rows([pack(spec, planted(spec, N, K, gen)), pack(spec, planted(spec, N, K, gen))])
    ep = Epilogue(gate_row=0, up_row=N, width=N, residual=True)
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    r = torch.randn(M, N, generator=gen, requires_grad=True)
    bias = torch.randn(2 * N, generator=gen, requires_grad=True)
    t = stacked.tensors()
    if spec == "2:4":
        op, packed = torch.ops.sparsec.twofour_linear_epilogue, (t["values"], t["meta"])
    else:
        order = stacked.handler.epilogue_aux(stacked, ep)["order"]
        op, packed = torch.ops.sparsec.block_linear_epilogue, (t["values"], t["col_idx"], t["row_ptr"], order)
    torch.library.opcheck(op, (x, *packed, bias, r, ep.gate_row, ep.up_row, ep.width),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("spec", SPECS)
def test_a_compiled_backward_traces_through_the_epilogue(spec, gen):
    """AOTAutograd through the fused op and its gradient, as ``torch.compile`` traces a model on a
    GPU: the backward graph holds no op of data-dependent output size (inductor cannot lower the
    block expansion's gather, so that stays inside the opaque ``sparsec::block_to_dense``)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    N, K, M = 32, 64, 1
    gate_w, up_w = planted(spec, N, K, gen), planted(spec, N, K, gen)
    stacked = stack_rows([pack(spec, gate_w), pack(spec, up_w)])
    module = EpilogueLinear(PackedLinear(stacked, impl="triton"), Epilogue(gate_row=0, up_row=N, width=N, residual=True))
    x = torch.randn(M, K, generator=gen, requires_grad=True)
    r = torch.randn(M, N, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(x, r).sum().backward()
    backward = graphs[-1]
    targets = {str(n.target) for n in backward.graph.nodes if n.op == "call_function"}
    assert not any("repeat_interleave" in t or "nonzero" in t for t in targets), targets
    x2 = x.detach().clone().requires_grad_(True)
    (F.silu(x2 @ gate_w.t()) * (x2 @ up_w.t()) + r).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-4)
