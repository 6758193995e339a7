"""Every Triton kernel against its plain-torch reference, on the CPU interpreter.

Inputs cover M = 1, odd M, a multi-tile M, 3-D input and non-contiguous input, with and without
bias, in fp32 and fp16 (the interpreter is not exact for bf16, which runs on the GPU bench).
"""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen import linear, pack

# (spec, N, K, impl): shapes chosen so tiles have tails in N, K or the Monarch block size
KERNELS = [
    ("2:4", 48, 80, "triton"),
    ("block:16:0.3", 64, 96, "triton"),
    ("block:32:0.5", 64, 64, "triton"),
    ("lowrank:12", 40, 72, "fused"),
    ("lowrank:12", 40, 72, "gemm2"),
    ("monarch:4", 48, 64, "fused"),
    ("monarch:4", 48, 64, "two_launch"),
    ("monarch:2", 40, 16, "fused"),
    ("monarch:2", 40, 16, "two_launch"),
    ("2:4+lowrank:8", 48, 80, "triton"),
    ("block:16:0.3+lowrank:8", 64, 96, "triton"),
]

# fp32: the interpreter multiplies exactly, so only summation order differs (~1e-6 relative).
# fp16: inputs are exact, accumulation is fp32; the output and at most one on-chip intermediate
# (low-rank t, Monarch chunk) are rounded to fp16 (unit roundoff 4.9e-4), hence 4e-3 of scale.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3}


def make_input(case: str, K: int, gen: torch.Generator, dtype) -> torch.Tensor:
    if case == "M1":
        return torch.randn(1, K, generator=gen).to(dtype)
    if case == "odd":
        return torch.randn(7, K, generator=gen).to(dtype)
    if case == "tiles":
        return torch.randn(40, K, generator=gen).to(dtype)
    if case == "3d":
        return torch.randn(2, 3, K, generator=gen).to(dtype)
    if case == "strided":  # every other column of a wider tensor: stride 2 along K
        return torch.randn(5, 2 * K, generator=gen).to(dtype)[:, ::2]
    if case == "transposed":  # column-major 2-D input
        return torch.randn(K, 5, generator=gen).to(dtype).t()
    raise ValueError(case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("spec,N,K,impl", KERNELS, ids=[f"{s}-{i}" for s, _, _, i in KERNELS])
def test_kernel_matches_reference(spec, N, K, impl, dtype, gen):
    packed = pack(spec, torch.randn(N, K, generator=gen).to(dtype))
    ref_packed = packed.to(dtype=torch.float32)
    for case in ("M1", "odd", "tiles", "3d", "strided", "transposed"):
        x = make_input(case, K, gen, dtype)
        for bias in (None, torch.randn(N, generator=gen).to(dtype)):
            y = linear(x, packed, bias, impl=impl)
            ref = linear(x.float(), ref_packed, None if bias is None else bias.float(), impl="reference")
            assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype, case
            scale = ref.abs().max().item()
            torch.testing.assert_close(y.float(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype],
                                       msg=lambda m: f"{spec} {impl} {case} bias={bias is not None}: {m}")


def test_empty_block_rows_write_bias(gen):
    """Rows with no kept block still get their output (the bias), written by their program."""
    w = torch.zeros(64, 64)
    w[:16, :16] = torch.randn(16, 16, generator=gen)   # block row 0 only; kept fraction 1/16
    packed = pack("block:16:0.0625", w)
    assert packed.tensors()["order"][0].item() == 0  # the only non-empty row is scheduled first
    x = torch.randn(3, 64, generator=gen)
    bias = torch.randn(64, generator=gen)
    y = linear(x, packed, bias, impl="triton")
    torch.testing.assert_close(y[:, 16:], bias[16:].expand(3, 48), atol=0, rtol=0)
    torch.testing.assert_close(y[:, :16], x[:, :16] @ w[:16, :16].t() + bias[:16], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec,N,K", [("2:4", 32, 64), ("block:16:0.5", 32, 64), ("lowrank:8", 32, 64),
                                      ("monarch:4", 32, 64), ("dense", 32, 64)])
def test_auto_uses_triton_only_when_interpreting(spec, N, K, gen, monkeypatch):
    packed = pack(spec, torch.randn(N, K, generator=gen))
    x = torch.randn(3, K, generator=gen)
    expected = "reference" if spec == "dense" else "triton"
    assert packed.handler.auto_impl(x, packed) == expected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert packed.handler.auto_impl(x, packed) == "reference"
    torch.testing.assert_close(linear(x, packed), x @ packed.to_dense().t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec,N,K", [("2:4", 40, 72), ("block:16:0.3", 64, 96), ("block:32:0.5", 64, 128),
                                      ("block:16:0.9", 32, 512)])
@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_small_m_paths_match_reference(spec, N, K, path, gen):
    """Both small-M paths (the MMA-free GEMV and the MMA tile kernel) forced at the kernel level,
    fp16, with bias, at M = 1, 3 (one partial token tile), 16 and 17 (one over the GEMV token
    tile, so two token programs) and a stride-3 input; K = 72 gives an odd group count for 2:4;
    block:16:0.9 on 512 columns keeps ~29 blocks a row, several GEMV steps with a partial last."""
    from sparsec.codegen import block, twofour

    packed = pack(spec, torch.randn(N, K, generator=gen).to(torch.float16))
    t = packed.tensors()
    dense = packed.to_dense().double()
    bias = torch.randn(N, generator=gen).to(torch.float16)
    for M in (1, 3, 16, 17):
        x = torch.randn(M, 3 * K, generator=gen).to(torch.float16)[:, ::3]
        if spec == "2:4":
            y = twofour.twofour_triton(x, t["values"], t["meta"], bias, path=path)
        else:
            y = block.block_triton(x, t["values"], t["col_idx"], t["row_ptr"], t["order"], bias, N, path=path)
        ref = x.double() @ dense.t() + bias.double()
        # fp16 inputs, fp32 accumulation, one fp16 rounding of the output: TOL[fp16] of scale
        torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float16] * ref.abs().max().item(),
                                   rtol=TOL[torch.float16], msg=lambda m: f"{spec} {path} M={M}: {m}")


@pytest.mark.parametrize("N,K", [(40, 96), (17, 320), (64, 512)])
def test_twofour_word_kernel_matches_reference_and_serves_contiguous_m1(N, K, gen):
    """The word-reading kernel (K a multiple of 32): runs of eight groups with a partial last run
    (K = 320: ten runs), partial row tiles (N = 17), one token per program (M = 1 and 3), bias;
    ``auto`` dispatch takes it for a contiguous single token and the gathering GEMV for a strided
    one, which it cannot view as words."""
    from sparsec.codegen import twofour

    packed = pack("2:4", torch.randn(N, K, generator=gen).to(torch.float16))
    t = packed.tensors()
    dense = packed.to_dense().double()
    bias = torch.randn(N, generator=gen).to(torch.float16)
    for M in (1, 3):
        x = torch.randn(M, K, generator=gen).to(torch.float16)
        y = twofour.twofour_triton(x, t["values"], t["meta"], bias, path="words")
        ref = x.double() @ dense.t() + bias.double()
        torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float16] * ref.abs().max().item(),
                                   rtol=TOL[torch.float16], msg=lambda m: f"M={M}: {m}")
    x1 = torch.randn(1, K, generator=gen).to(torch.float16)
    assert twofour.words_usable(x1, t["values"], t["meta"])
    assert not twofour.words_usable(torch.randn(1, 2 * K, generator=gen).half()[:, ::2], t["values"], t["meta"])
    assert not twofour.words_usable(torch.randn(1, K + 1, generator=gen).half()[:, 1:], t["values"], t["meta"])


def test_twofour_word_kernel_refuses_k_off_the_word_grid(gen):
    from sparsec.codegen import twofour

    packed = pack("2:4", torch.randn(8, 72, generator=gen).half())   # 18 groups: no whole metadata words
    t = packed.tensors()
    assert not twofour.words_usable(torch.randn(1, 72, generator=gen).half(), t["values"], t["meta"])


def test_twofour_gemv_only_for_16_bit_values(gen):
    """The GEMV path reads a group's two values as one int32, so fp32 weights go to the MMA path."""
    from sparsec.codegen import twofour

    p16 = pack("2:4", torch.randn(8, 32, generator=gen).to(torch.float16))
    p32 = pack("2:4", torch.randn(8, 32, generator=gen))
    x16, x32 = torch.randn(1, 32, generator=gen).half(), torch.randn(1, 32, generator=gen)
    assert twofour.gemv_usable(x16, p16.tensors()["values"], 1)
    assert not twofour.gemv_usable(x32, p32.tensors()["values"], 1)
    assert not twofour.gemv_usable(x16, p16.tensors()["values"], twofour.GEMV_MAX_M + 1)


def _path_taken(module, run) -> str:
    """The path ``run`` took through the module's launcher, told by which kernel it reached."""
    with pytest.MonkeyPatch.context() as mp:
        return _spied(mp, module, run)


def _spied(monkeypatch, module, run) -> str:
    taken = []
    spies = {"twofour": {"_words": "words", "_GEMV_KERNEL": "gemv", "_KERNEL": "dot"},
             "block": {"_GEMV_KERNEL": "gemv", "_KERNEL": "dot"}}[module.__name__.rsplit(".", 1)[1]]
    for attr, path in spies.items():
        real = getattr(module, attr)
        if attr.startswith("_KERNEL") or attr == "_GEMV_KERNEL":
            class Spy:
                def __init__(self, real, path):
                    self.real, self.path = real, path

                def __getitem__(self, grid):
                    taken.append(self.path)
                    return self.real[grid]
            monkeypatch.setattr(module, attr, Spy(real, path))
        else:
            def spy(*a, _real=real, _path=path, **k):
                taken.append(_path)
                return _real(*a, **k)
            monkeypatch.setattr(module, attr, spy)
    real_split = module.split_for

    def split_spy(*a):
        taken.append("split")
        return real_split(*a)
    monkeypatch.setattr(module, "split_for", split_spy)
    run()
    return "dot_split" if "split" in taken else taken[-1]


def test_twofour_path_by_token_count(gen):
    """Word kernel up to GEMV_MAX_M tokens; the gathering GEMV only up to GATHER_MAX_M (where the
    words cannot be read); the MMA kernel above."""
    from sparsec.codegen import twofour

    for K, words in ((64, True), (72, False)):
        t = pack("2:4", torch.randn(16, K, generator=gen).half()).tensors()
        for M in range(1, twofour.GEMV_MAX_M + 2):
            x = torch.randn(M, K, generator=gen).half()
            path = _path_taken(twofour, lambda: twofour.twofour_triton(x, t["values"], t["meta"], None))
            want = ("dot" if M > twofour.GEMV_MAX_M else "words" if words
                    else "gemv" if M <= twofour.GATHER_MAX_M else "dot")
            assert path == want, (K, M, path)


def test_twofour_splits_k_at_small_m_where_the_unsplit_launch_would_leave_sms_idle(gen, monkeypatch):
    """From GEMV_MAX_M + 1 to SPLIT_MAX_M tokens, 16-bit: the split MMA kernel where K would be cut
    into at least SPLIT_FROM chunks, the unsplit one where fewer (the chunks are 1 off CUDA, so
    the count is set here); fp32 and more tokens keep the unsplit kernel. Each result is checked
    against the plain-torch reference."""
    from sparsec.codegen import twofour

    N, K = 32, 512
    w = torch.randn(N, K, generator=gen)
    for chunks in (twofour.SPLIT_FROM, twofour.SPLIT_FROM - 1):
        monkeypatch.setattr(twofour, "_chunks", lambda n, k, device, c=chunks: c)
        for dtype in (torch.float16, torch.float32):
            packed = pack("2:4", w.to(dtype))
            t = packed.tensors()
            for M in (twofour.GEMV_MAX_M + 1, twofour.SPLIT_MAX_M, twofour.SPLIT_MAX_M + 1):
                x = torch.randn(M, K, generator=gen).to(dtype)
                out = {}
                path = _path_taken(twofour, lambda: out.setdefault("y", twofour.twofour_triton(x, t["values"], t["meta"], None)))
                split = chunks >= twofour.SPLIT_FROM and dtype == torch.float16 and M <= twofour.SPLIT_MAX_M
                assert path == ("dot_split" if split else "dot"), (chunks, dtype, M, path)
                ref = twofour.TwoFourKernels().reference(x.float(), packed, None)
                torch.testing.assert_close(out["y"].float(), ref, atol=2e-2 if dtype == torch.float16 else 1e-3, rtol=1e-2)


def test_block_path_by_token_count_and_dtype(gen):
    """GEMV up to GEMV_MAX_M tokens, the split MMA kernel up to SPLIT_MAX_M, the plain one above;
    fp32 inputs always take the MMA kernel unsplit (neither small-M path was timed for them)."""
    from sparsec.codegen import block

    w = torch.randn(64, 128, generator=gen)
    for dtype in (torch.float16, torch.float32):
        t = pack("block:16:0.5", w.to(dtype)).tensors()
        for M in (1, block.GEMV_MAX_M, block.GEMV_MAX_M + 1, block.SPLIT_MAX_M, block.SPLIT_MAX_M + 1):
            x = torch.randn(M, 128, generator=gen).to(dtype)
            path = _path_taken(block, lambda: block.block_triton(
                x, t["values"], t["col_idx"], t["row_ptr"], t["order"], None, 64))
            want = ("dot" if dtype == torch.float32 or M > block.SPLIT_MAX_M else "gemv" if M <= block.GEMV_MAX_M
                    else "dot_split")
            assert path == want, (dtype, M, path)


def test_block_gemv_empty_rows_write_bias(gen):
    """The GEMV path keeps the work-list contract: rows with no kept block get the bias."""
    from sparsec.codegen import block

    w = torch.zeros(64, 64)
    w[16:32, 32:48] = torch.randn(16, 16, generator=gen)   # block row 1 only
    packed = pack("block:16:0.0625", w.half())
    t = packed.tensors()
    x = torch.randn(2, 64, generator=gen).half()
    bias = torch.randn(64, generator=gen).half()
    y = block.block_triton(x, t["values"], t["col_idx"], t["row_ptr"], t["order"], bias, 64, path="gemv")
    keep = torch.ones(64, dtype=torch.bool)
    keep[16:32] = False
    torch.testing.assert_close(y[:, keep], bias[keep].expand(2, 48), atol=0, rtol=0)
    ref = x.double()[:, 32:48] @ w[16:32, 32:48].double().t() + bias[16:32].double()
    # fp16 inputs, fp32 accumulation, one fp16 rounding of the output
    torch.testing.assert_close(y[:, 16:32].double(), ref, atol=4e-3 * ref.abs().max().item(), rtol=4e-3)


def _config_id(config) -> str:
    return "-".join(f"{k}{v}" for k, v in config.kwargs.items()) + f"-w{config.num_warps}"


def _gemv_config_cases(module, kernel_name):
    from sparsec.codegen import block, twofour

    kernel = getattr({"block": block, "twofour": twofour}[module], kernel_name)
    return [pytest.param(module, kernel_name, i, id=_config_id(c)) for i, c in enumerate(kernel.configs)]


@pytest.mark.parametrize("module,kernel_name,index",
                         _gemv_config_cases("twofour", "_WORDS_KERNEL") + _gemv_config_cases("block", "_GEMV_KERNEL"))
def test_every_small_m_config_matches_reference(module, kernel_name, index, gen):
    """The autotuner may pick any config on the device, so each one (tile shape, blocks or runs per
    step, pipelined or not) is run alone against float64: 2:4 rows in partial row tiles with a
    partial last run of groups (K = 352: eleven runs; 384, twelve, for the descriptor tiles); block
    rows of unequal kept counts, one empty."""
    from sparsec.codegen import block, twofour

    kernel = getattr({"block": block, "twofour": twofour}[module], kernel_name)
    config = kernel.configs[index]
    if module == "twofour":
        K = 384 if config.kwargs.get("USE_TMA") else 352   # descriptor tiles: 16-byte metadata rows
        packed = pack("2:4", torch.randn(40, K, generator=gen).half())
        t = packed.tensors()
        x = torch.randn(1, K, generator=gen).half()
        assert twofour.tma_usable(x, t["values"].view(torch.int32), t["meta"].view(torch.int32)) == (K == 384)
        bias = torch.randn(40, generator=gen).half()
        with kernel.only(config):
            y = twofour.twofour_triton(x, t["values"], t["meta"], bias, path="words")
    else:
        w = torch.randn(192, 320, generator=gen)
        w.view(3, 64, 5, 64)[1] = 0                      # block row 1 empty
        w.view(3, 64, 5, 64)[2, :, 1:] *= 1e-3           # block row 2: one block outweighs the rest
        packed = pack("block:64:0.4", w.half())
        t = packed.tensors()
        assert len(set((t["row_ptr"][1:] - t["row_ptr"][:-1]).tolist())) > 1
        x = torch.randn(3, 320, generator=gen).half()
        bias = torch.randn(192, generator=gen).half()
        with kernel.only(config):
            y = block.block_triton(x, t["values"], t["col_idx"], t["row_ptr"], t["order"], bias, 192, path="gemv")
    ref = x.double() @ packed.to_dense().double().t() + bias.double()
    # fp16 inputs, fp32 accumulation, one fp16 rounding of the output
    torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float16] * ref.abs().max().item(),
                               rtol=TOL[torch.float16])


@pytest.mark.parametrize("module,kernel_name,index", _gemv_config_cases("twofour", "_TOKENS_KERNEL"))
def test_every_multi_token_word_config_matches_reference(module, kernel_name, index, gen):
    """The word kernel's reads for several tokens a program ("tokens"): each configuration alone,
    at a partial token tile, a full one and several tiles, K = 352 (eleven runs, a partial last run
    tile), 20 rows (a partial tile of 8 rows), against float64 with the bias."""
    from sparsec.codegen import twofour

    config = getattr(twofour, kernel_name).configs[index]
    packed = pack("2:4", torch.randn(20, 352, generator=gen).half())
    t = packed.tensors()
    bias = torch.randn(20, generator=gen).half()
    dense = packed.to_dense().double()
    T = config.kwargs["TOKENS"]
    for M in sorted({max(1, T - 1), T, 2 * T + 1}):
        x = torch.randn(M, 352, generator=gen).half()
        with twofour._TOKENS_KERNEL.only(config):
            y = twofour.twofour_triton(x, t["values"], t["meta"], bias, path="tokens")
        ref = x.double() @ dense.t() + bias.double()
        # fp16 inputs, fp32 accumulation, one fp16 rounding of the output
        torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float16] * ref.abs().max().item(),
                                   rtol=TOL[torch.float16], msg=lambda m: f"M={M}: {m}")


def test_the_multi_token_word_path_refuses_inputs_it_cannot_read_as_words(gen):
    from sparsec.codegen import twofour

    t = pack("2:4", torch.randn(8, 72, generator=gen).half()).tensors()   # K = 72: no whole metadata words
    with pytest.raises(ValueError, match="K a multiple of 32"):
        twofour.twofour_triton(torch.randn(4, 72, generator=gen).half(), t["values"], t["meta"], None, path="tokens")


def test_device_only_launch_features_stay_off_where_they_cannot_run(monkeypatch):
    """Programmatic dependent launch and the byte permute are PTX: never asked of the CPU or the
    interpreter; descriptors are (the interpreter emulates them) unless SPARSEC_TMA=0."""
    from sparsec.codegen import _common, twofour

    x = torch.zeros(1, 256, dtype=torch.float16)
    assert not _common.pdl_enabled(x)
    assert not twofour.prmt_usable(x)
    pairs, meta = torch.zeros(16, 64, dtype=torch.int32), torch.zeros(16, 8, dtype=torch.int32)
    assert twofour.tma_usable(x, pairs, meta, 16)
    monkeypatch.setenv("SPARSEC_TMA", "0")
    assert not twofour.tma_usable(x, pairs, meta, 16)


@pytest.mark.parametrize("split", [2, 3, 8])
def test_block_split_path_sums_its_chunks_to_the_product(split, gen, monkeypatch):
    """The "dot_split" path: every block row's kept blocks cut into ``split`` chunks (8: more
    chunks than some rows have blocks, so some programs sum nothing), the float32 partials summed,
    with and without bias; an empty block row still gets its bias."""
    from sparsec.codegen import block

    monkeypatch.setattr(block, "split_for", lambda N, device: split)
    w = torch.randn(48, 512, generator=gen)
    w[16:32] = 0.0  # block row 1 keeps nothing
    packed = pack("block:16:0.6", w.half())
    t = packed.tensors()
    dense = packed.to_dense().double()
    for bias in (None, torch.randn(48, generator=gen).half()):
        for M in (3, 16):
            x = torch.randn(M, 512, generator=gen).half()
            y = block.block_triton(x, t["values"], t["col_idx"], t["row_ptr"], t["order"], bias, 48, path="dot_split")
            ref = x.double() @ dense.t() + (0.0 if bias is None else bias.double())
            assert y.dtype == torch.float16 and y.shape == (M, 48)
            # fp16 inputs, fp32 accumulation and sum, one fp16 rounding of the output
            torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float16] * ref.abs().max().item(),
                                       rtol=TOL[torch.float16], msg=lambda m: f"split {split} M={M}: {m}")


def test_split_paths_aim_for_programs_per_sm_within_bounds(monkeypatch):
    import types

    from sparsec.codegen import _common, block, twofour

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    cuda = types.SimpleNamespace(type="cuda")
    # 16-row tiles: 4096 outputs give 256 programs a chunk, 14336 give 896
    assert block.split_for(4096, cuda) == 5 and block.split_for(14336, cuda) == 2
    assert block.split_for(128, cuda) == _common.SPLIT_MAX and block.split_for(1 << 20, cuda) == 1
    assert block.split_for(4096, torch.device("cpu")) == 1
    # 2:4 cuts K: no chunk under SPLIT_MIN_K columns
    assert twofour.split_for(4096, 14336, cuda) == 5 and twofour.split_for(4096, 2048, cuda) == 2
    assert twofour.split_for(4096, 512, cuda) == 1


@pytest.mark.parametrize("split", [2, 3])
def test_twofour_split_path_sums_its_chunks_to_the_product(split, gen, monkeypatch):
    """The 2:4 "dot_split" path: K = 1152 is nine 128-column tiles, so three chunks of three or
    two of five and four (the autotuner's first config here takes 128 columns a tile); with and
    without bias, a partial token tile and a full one."""
    from sparsec.codegen import twofour

    monkeypatch.setattr(twofour, "split_for", lambda N, K, device: split)
    packed = pack("2:4", torch.randn(40, 1152, generator=gen).half())
    t = packed.tensors()
    dense = packed.to_dense().double()
    for bias in (None, torch.randn(40, generator=gen).half()):
        for M in (3, 16):
            x = torch.randn(M, 1152, generator=gen).half()
            y = twofour.twofour_triton(x, t["values"], t["meta"], bias, path="dot_split")
            ref = x.double() @ dense.t() + (0.0 if bias is None else bias.double())
            assert y.dtype == torch.float16 and y.shape == (M, 40)
            torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float16] * ref.abs().max().item(),
                                       rtol=TOL[torch.float16], msg=lambda m: f"split {split} M={M}: {m}")
