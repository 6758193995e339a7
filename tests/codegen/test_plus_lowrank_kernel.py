"""The composite's fused path: 2:4's word kernel and the block GEMV adding U t in their epilogue,
against the plain-torch reference; and the unfused path where it does not apply."""

from __future__ import annotations

import pytest
import torch

from sparsec import codegen
from sparsec.codegen import plus_lowrank, twofour

# fp16 inputs on the interpreter: fp32 accumulation, one rounding of the output (4e-3 of scale)
TOL = 4e-3


def forbid_unfused(monkeypatch, where: str) -> None:
    """Fail if the composite takes its two-GEMM path (the fused one should serve ``where``)."""
    def unfused(*args):
        raise AssertionError(f"the fused path should serve {where}")

    monkeypatch.setattr(plus_lowrank, "lowrank_linear_op", unfused)


def _configs():
    configs = twofour._WORDS_KERNEL.configs
    tma = next(c for c in configs if c.kwargs["USE_TMA"])
    pointer = next(c for c in configs if not c.kwargs["USE_TMA"])
    return [tma, pointer]


@pytest.mark.parametrize("config", _configs(), ids=["tma", "pointer"])
@pytest.mark.parametrize("N,K,R", [(48, 64, 8), (40, 96, 20), (96, 256, 70)])
def test_the_word_kernel_adds_the_low_rank_term_in_its_epilogue(N, K, R, config, gen, monkeypatch):
    packed = codegen.pack(f"2:4+lowrank:{R}", torch.randn(N, K, generator=gen).half())
    reference = packed.to(dtype=torch.float32)

    forbid_unfused(monkeypatch, "the word kernel's token counts")
    with twofour._WORDS_KERNEL.only(config), torch.no_grad():
        for M in sorted({1, twofour.GEMV_MAX_M}):
            x = torch.randn(M, K, generator=gen).half()
            bias = torch.randn(N, generator=gen).half()
            y = codegen.linear(x, packed, bias, impl="triton")
            ref = codegen.linear(x.float(), reference, bias.float(), impl="reference")
            torch.testing.assert_close(y.float(), ref, atol=TOL * ref.abs().max().item(), rtol=TOL)


def test_beyond_the_word_kernels_tokens_or_with_gradients_the_two_gemm_path_runs(gen, monkeypatch):
    packed = codegen.pack("2:4+lowrank:8", torch.randn(32, 64, generator=gen).half())
    calls = []
    real = plus_lowrank.lowrank_linear_op
    monkeypatch.setattr(plus_lowrank, "lowrank_linear_op", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        codegen.linear(torch.randn(twofour.GEMV_MAX_M + 1, 64, generator=gen).half(), packed, impl="triton")
    x = torch.randn(1, 64, generator=gen).half().requires_grad_()
    y = codegen.linear(x, packed, impl="triton")
    y.float().sum().backward()
    assert calls == [twofour.GEMV_MAX_M + 1, 1] and x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("index", [0, 1], ids=["pipelined", "unpipelined"])
def test_the_block_gemv_adds_the_low_rank_term_in_its_epilogue(index, gen, monkeypatch):
    from sparsec.codegen import block

    config = [c for c in block._GEMV_KERNEL.configs if (c.kwargs["STAGES"] > 1) == (index == 0)][0]
    packed = codegen.pack("block:16:0.5+lowrank:20", torch.randn(64, 96, generator=gen).half())
    reference = packed.to(dtype=torch.float32)

    forbid_unfused(monkeypatch, "the GEMV's token counts")
    with block._GEMV_KERNEL.only(config), torch.no_grad():
        for M in sorted({1, block.GEMV_MAX_M}):
            x = torch.randn(M, 96, generator=gen).half()
            bias = torch.randn(64, generator=gen).half()
            y = codegen.linear(x, packed, bias, impl="triton")
            ref = codegen.linear(x.float(), reference, bias.float(), impl="reference")
            torch.testing.assert_close(y.float(), ref, atol=TOL * ref.abs().max().item(), rtol=TOL)


def test_a_copy_the_base_caches_on_its_view_is_kept_by_the_composite():
    """cuSPARSELt's compressed weight is made once and kept in ``aux``: the base runs on a view of
    the composite, and what it caches there must land in the composite's own cache (else every call
    compresses again, and a CUDA graph capture would compress inside the capture)."""
    packed = codegen.pack("2:4+lowrank:4", torch.randn(16, 32))
    view = packed.handler._base_packed(packed)
    marker = torch.zeros(1)
    view.aux["cslt"] = marker
    assert packed.aux["cslt"] is marker
