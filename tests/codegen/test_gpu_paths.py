"""Paths that exist only on a CUDA device: cuSPARSELt's 2:4 product, and autograd through models
compiled with the sparsec backend in bf16 (fused epilogues included). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsec.codegen import linear, pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    """Compiled kernels here, sparsec's and inductor's alike, run on the GPU: the interpreter the
    other kernel tests switch on cannot run inductor's generated kernels."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

# relative L2 error against float64: bf16 keeps 8 mantissa bits (a few 1e-3 per product, two
# layers and their transposes for gradients), fp16 11
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def replayed(call, x: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``call`` on a copy of ``x`` captured in a CUDA graph (after one call outside it, which
    compiles and tunes), the copy then overwritten with ``fresh`` and the graph replayed: its output."""
    static = x.clone()
    call(static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(static)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 13, 2051])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cusparselt_matches_float64(dtype, M, layout, with_bias):
    """Padded and unpadded token counts, row- and column-major inputs, with and without bias."""
    from sparsec.codegen.twofour_cslt import cslt_reason

    why = cslt_reason(768, 1024, dtype, "cuda")
    if why:
        pytest.skip(why)
    gen = torch.Generator(device="cuda").manual_seed(1)
    p = pack("2:4", torch.randn(768, 1024, generator=gen, device="cuda").to(dtype))
    x = torch.randn(M, 1024, generator=gen, device="cuda").to(dtype)
    if layout == "col":
        x = x.t().contiguous().t()
    bias = torch.randn(768, generator=gen, device="cuda").to(dtype) if with_bias else None
    y = linear(x, p, bias, impl="cusparselt")
    ref = x.double() @ p.to_dense().double().t() + (0 if bias is None else bias.double())
    assert y.shape == ref.shape and rel_err(y, ref) <= REL_TOL[dtype]


@pytest.mark.parametrize("M", [13, 2048])
def test_cusparselt_row_major_output_matches_the_transposed_one(M, monkeypatch):
    """``SPARSEC_CSLT_OUTPUT=row`` and ``copy``: the same product, laid out row-major, as its fake says."""
    from sparsec.codegen.twofour_cslt import cslt_reason, twofour_cslt_fake

    why = cslt_reason(768, 1024, torch.bfloat16, "cuda")
    if why:
        pytest.skip(why)
    gen = torch.Generator(device="cuda").manual_seed(2)
    p = pack("2:4", torch.randn(768, 1024, generator=gen, device="cuda").to(torch.bfloat16))
    x = torch.randn(M, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    column = linear(x, p, None, impl="cusparselt")
    assert column.stride() == (1, column.stride(1)) == twofour_cslt_fake(x, None, None, 768).stride()
    for layout in ("row", "copy"):
        monkeypatch.setenv("SPARSEC_CSLT_OUTPUT", layout)
        row = linear(x, p, None, impl="cusparselt")
        assert row.stride() == (768, 1) == twofour_cslt_fake(x, None, None, 768, layout).stride()
        assert rel_err(row, column.double()) <= REL_TOL[torch.bfloat16]


def planted(fmt: str, N: int, K: int, gen) -> torch.Tensor:
    """A weight with exactly the format's structure, so the forced rewrite is lossless."""
    if fmt.startswith("lowrank"):
        r = int(fmt.split(":")[1])
        return (torch.randn(N, r, generator=gen, device="cuda") @ torch.randn(r, K, generator=gen, device="cuda")) / K
    return pack(fmt, torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to_dense()


class GatedResidual(nn.Module):
    """x + down(silu(gate(x)) * up(x)): at a few tokens the lowering folds the SiLU-gate and the
    residual into the launches (codegen/epilogue.py), so their gradient is checked too."""

    def __init__(self, d: int = 1024, h: int = 2048):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("kind, fmt, M", [("mlp", f, M) for f in ("2:4", "block:64:0.25", "lowrank:256")
                                          for M in (1, 64, 2048)]
                         + [("gated", "2:4", 1), ("gated", "block:64:0.25", 1), ("gated", "block:64:0.25", 4)])
def test_input_gradients_through_rewritten_layers_match_dense(kind, fmt, M):
    torch._dynamo.reset()  # each case its own compile: many instances of one class pass Dynamo's limit
    gen = torch.Generator(device="cuda").manual_seed(2)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(1024, 2048), nn.SiLU(), nn.Linear(2048, 1024)).cuda().bfloat16()
        layers = [model[0], model[2]]
    else:
        model = GatedResidual().cuda().bfloat16()
        layers = [model.gate, model.up, model.down]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(planted(fmt, lin.out_features, lin.in_features, gen))
    compiled = torch.compile(model, backend="sparsec", options={"plan": {"layers": {"_default": fmt}}, "strict": True})
    x = torch.randn(M, 1024, generator=gen, device="cuda").bfloat16().requires_grad_()
    y = compiled(x)
    g = torch.randn_like(y)
    (y.float() * g.float()).sum().backward()
    assert all(lin.weight.grad is None for lin in layers)  # the rewritten weights are frozen
    got, x.grad = x.grad.clone(), None
    ref_y = model(x)
    (ref_y.float() * g.float()).sum().backward()
    assert rel_err(y, ref_y) <= REL_TOL[torch.bfloat16]
    assert rel_err(got, x.grad) <= REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["2:4", "block:64:0.25"])
@pytest.mark.parametrize("M", [2, 16])
def test_split_paths_sum_their_partials_on_the_gpu_and_replay_in_a_cuda_graph(dtype, fmt, M):
    """The "dot_split" paths (K cut over programs, float32 partials summed by codegen/partials.py)
    on a weight with exactly the format's structure, with bias, against float64, then captured in
    a CUDA graph and replayed on new inputs."""
    from sparsec.codegen import block, twofour

    gen = torch.Generator(device="cuda").manual_seed(M)
    N, K = 512, 4096
    w = planted(fmt, N, K, gen).to(dtype)
    packed = pack(fmt, w)
    w = packed.to_dense()
    t = packed.tensors()
    bias = torch.randn(N, generator=gen, device="cuda").to(dtype)

    def run(x):
        if fmt == "2:4":
            return twofour.twofour_triton(x, t["values"], t["meta"], bias, path="dot_split")
        return block.block_triton(x, t["values"], t["col_idx"], t["row_ptr"], t["order"], bias, N, path="dot_split")

    def ref(x):
        return x.double() @ w.double().t() + bias.double()

    x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(run(x), ref(x)) <= REL_TOL[dtype]
    fresh = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(replayed(run, x, fresh), ref(fresh)) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5, 16, 17])
def test_act_kernel_matches_float64_and_replays_in_a_cuda_graph(dtype, M):
    """act:0.5 on a Llama-MLP-shaped weight: the masked product in float64 (every token masked on
    its own), then the same launch captured in a CUDA graph and replayed on new inputs."""
    gen = torch.Generator(device="cuda").manual_seed(M)
    N, K = 1024, 4096
    w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype)
    packed = pack("act:0.5", w, threshold=0.6)
    x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)

    def ref(inp):
        xd = inp.double()
        return torch.where(xd.abs() >= 0.6, xd, 0.0) @ w.double().t()

    assert rel_err(linear(x, packed), ref(x)) <= REL_TOL[dtype]
    fresh = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(replayed(lambda inp: linear(inp, packed), x, fresh), ref(fresh)) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 16, 40])
def test_actrot_matches_float64_and_replays_in_a_cuda_graph(dtype, M):
    """actrot:0.5 with a random rotation: the rotated inputs (x Q, in the input's dtype, as the layer
    computes them) masked and multiplied by (W Q)^T in float64; then captured in a CUDA graph."""
    from sparsec.codegen.actrot import random_rotation

    gen = torch.Generator(device="cuda").manual_seed(M)
    N, K = 1024, 2048
    w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype)
    packed = pack("actrot:0.5", w, rotation=random_rotation(K, "cuda", seed=M), threshold=0.6)
    q, wt = packed.tensors()["rotation"], packed.tensors()["weight_t"]

    def ref(inp):
        z = (inp @ q).double()
        return torch.where(z.abs() >= 0.6, z, 0.0) @ wt.double()

    x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(linear(x, packed), ref(x)) <= REL_TOL[dtype]
    fresh = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(replayed(lambda inp: linear(inp, packed), x, fresh), ref(fresh)) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [2, 5, 16, 33])
@pytest.mark.parametrize("gated", [False, True])
def test_multi_token_word_kernel_matches_float64_and_replays_in_a_cuda_graph(dtype, M, gated):
    """The 2:4 "tokens" path with its byte permutes (which the interpreter cannot run), plain with
    a bias or with the SwiGLU and residual epilogues, against float64; then captured in a CUDA graph
    and replayed on new inputs."""
    from sparsec.codegen import stack_rows, twofour

    gen = torch.Generator(device="cuda").manual_seed(M)
    N, K = 512, 1024
    parts = [pack("2:4", (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype))
             for _ in range(2 if gated else 1)]
    packed = stack_rows(parts) if gated else parts[0]
    t = packed.tensors()
    dense = packed.to_dense().double()
    bias = torch.randn(dense.shape[0], generator=gen, device="cuda").to(dtype)
    residual = torch.randn(M, N, generator=gen, device="cuda").to(dtype) if gated else None
    kw = dict(residual=residual, gate_row=0, up_row=N, width=N) if gated else {}

    def call(inp):
        return twofour.twofour_triton(inp, t["values"], t["meta"], bias, path="tokens", **kw)

    def ref(inp):
        h = inp.double() @ dense.t() + bias.double()
        return torch.nn.functional.silu(h[:, :N]) * h[:, N:] + residual.double() if gated else h

    x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(call(x), ref(x)) <= REL_TOL[dtype]
    fresh = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    assert rel_err(replayed(call, x, fresh), ref(fresh)) <= REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["2:4+lowrank:64", "block:64:0.25+lowrank:64"])
@pytest.mark.parametrize("M", [1, 4, 16, 64, 2048])
def test_sparse_plus_lowrank_matches_float64_and_replays_in_a_cuda_graph(dtype, fmt, M):
    """The composite on every path its base takes (word kernel with the low-rank term as its fused
    residual at few tokens, cuSPARSELt or the tensor-core kernel at many), then in a CUDA graph."""
    gen = torch.Generator(device="cuda").manual_seed(M)
    N, K = 1024, 2048
    packed = pack(fmt, (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype))
    dense = packed.to_dense().double()
    x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(N, generator=gen, device="cuda").to(dtype)
    assert rel_err(linear(x, packed, bias), x.double() @ dense.t() + bias.double()) <= REL_TOL[dtype]
    fresh = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    out = replayed(lambda inp: linear(inp, packed, bias), x, fresh)
    assert rel_err(out, fresh.double() @ dense.t() + bias.double()) <= REL_TOL[dtype]


def _expert_bank(form, E, I, H, gen, dtype):  # noqa: E741
    """(op, weights, gate_up, down) of a bank in ``form``: the op's weight arguments and the dense
    float64 projections they make (planted: exactly low-rank, exactly 2:4 or exactly block-sparse)."""
    from sparsec.codegen.twofour import encode_positions

    if form == "lowrank":
        r1, r2 = 96, 80   # no multiple of a tile
        v1, u1 = torch.randn(E, r1, H, generator=gen) / H ** 0.5, torch.randn(E, 2 * I, r1, generator=gen) / r1 ** 0.5
        v2, u2 = torch.randn(E, r2, I, generator=gen) / I ** 0.5, torch.randn(E, H, r2, generator=gen) / r2 ** 0.5
        args = [t.to(dtype).cuda() for t in (v1, u1, v2, u2)]
        return (torch.ops.sparsec.experts_swiglu_lowrank, args,
                args[1].double() @ args[0].double(), args[3].double() @ args[2].double())
    if form == "2:4":
        def packed(N, K):
            groups = (torch.randn(E, N, K, generator=gen) / K ** 0.5).reshape(E, N, K // 4, 4)
            pos = torch.rand(E, N, K // 4, 4, generator=gen).argsort(-1)[..., :2].sort(-1).values
            values = groups.gather(3, pos).to(dtype)
            meta = torch.stack([encode_positions(pos[e]) for e in range(E)])
            kept = torch.zeros(E, N, K // 4, 4, dtype=dtype).scatter_(3, pos, values).reshape(E, N, K)
            return values.reshape(E, N, K // 2).cuda(), meta.cuda(), kept.double().cuda()

        gv, gm, gate_up = packed(2 * I, H)
        dv, dm, down = packed(H, I)
        return torch.ops.sparsec.experts_swiglu_twofour, [gv, gm, dv, dm], gate_up, down
    if form == "block":
        from sparsec.codegen.experts import BlockWeights

        def blocked(N, K, B=64, kept=0.25):
            nr, nc = N // B, K // B
            nnzb = round(kept * nr * nc)
            keep = torch.rand(E, nr * nc, generator=gen).argsort(-1)[:, :nnzb].sort(-1).values
            row_ptr = torch.zeros(E, nr + 1, dtype=torch.int32)
            row_ptr[:, 1:] = torch.stack([torch.bincount(k // nc, minlength=nr) for k in keep]).cumsum(1)
            values = (torch.randn(E, nnzb, B, B, generator=gen) / (kept * K) ** 0.5).to(dtype)
            w = BlockWeights(values, (keep % nc).to(torch.int32), row_ptr, K)
            return values.cuda(), w.col_idx.cuda(), row_ptr.cuda(), w.dense().double().cuda()

        gv, gc, gr, gate_up = blocked(2 * I, H)
        dv, dc, dr, down = blocked(H, I)
        return torch.ops.sparsec.experts_swiglu_block, [gv, gc, gr, dv, dc, dr], gate_up, down
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype).cuda()
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype).cuda()
    return torch.ops.sparsec.experts_swiglu, [gate_up, down], gate_up.double(), down.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["dense", "lowrank", "2:4", "block"])
@pytest.mark.parametrize("impl", ["grouped", "batched", "dense_all", "loop", "rows"])
@pytest.mark.parametrize("T", [1, 16, 300])
def test_expert_banks_match_float64_and_replay_in_a_cuda_graph(dtype, form, impl, T):
    """Every implementation of every expert form, compiled for the GPU, against float64; every one
    but the loop (which reads the routing on the host) then captured in a CUDA graph and replayed
    on new tokens and a new routing. ``rows`` runs the dense rows kernel and, for 2:4, the word
    kernel with its byte permutes and tensor-memory loads (which the interpreter cannot run);
    factored and block banks fall back to ``grouped``."""
    from sparsec.codegen import experts as _registers_the_ops  # noqa: F401

    gen = torch.Generator().manual_seed(T)
    E, k, H, I = 8, 2, 512, 384  # noqa: E741
    op, weights, gate_up, down = _expert_bank(form, E, I, H, gen, dtype)

    def inputs():
        probs = torch.softmax(torch.randn(T, E, generator=gen), dim=-1)
        top, index = probs.topk(k, dim=-1)
        x = torch.randn(T, H, generator=gen).to(dtype).cuda()
        return x, index.cuda(), (top / top.sum(-1, keepdim=True)).to(dtype).cuda()

    def ref(x, index, w):
        h = torch.einsum("th,teih->tei", x.double(), gate_up[index])
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tei,tehi->teh", torch.nn.functional.silu(gate) * up, down[index])
        return (y * w.double()[..., None]).sum(1)

    x, index, w = inputs()
    y = op(x, index, w, *weights, impl)
    assert y.dtype == dtype and rel_err(y, ref(x, index, w)) <= REL_TOL[dtype], f"{form} {impl}"
    if impl == "loop":
        return
    sx, si, sw = x.clone(), index.clone(), w.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(sx, si, sw, *weights, impl)
    x, index, w = inputs()
    sx.copy_(x), si.copy_(index), sw.copy_(w)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref(x, index, w)) <= REL_TOL[dtype], f"{form} {impl} replayed"


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_a_transformer_encoder_runs_its_expanded_attention_through_inductor(mode, tmp_path):
    """nn.TransformerEncoder's fused fast path, written out as its projections (passes/unfuse_fx.py),
    planned with forced formats and compiled on the GPU: the attention core goes to inductor (and
    into a CUDA graph) with the rest of the dense graph. The feed-forward weights are planted 2:4,
    so the rewritten model must match the dense one to bf16 precision."""
    import json

    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True), 2,
                                    enable_nested_tensor=False).eval()
    with torch.no_grad():
        for layer in encoder.layers:
            for lin in (layer.linear1, layer.linear2):
                groups = lin.weight.view(lin.out_features, -1, 4)
                drop = groups.abs().argsort(dim=-1)[..., :2]
                groups.scatter_(-1, drop, 0.0)
    reference = encoder.double()
    x = torch.randn(4, 32, 256, dtype=torch.float64)
    with torch.no_grad():
        dense = reference(x)
    model = encoder.to("cuda", torch.bfloat16)
    options = {"fingerprint": "h200", "report": str(tmp_path / "r.json"),
               "plan": {"layers": {"re:.*linear.*": "2:4", "_default": "dense"}}}
    if mode:
        options["mode"] = mode
    compiled = torch.compile(model, backend="sparsec", options=options)
    xb = x.to("cuda", torch.bfloat16)
    with torch.no_grad():
        compiled(xb)
        got = compiled(xb)  # a CUDA-graph replay under reduce-overhead
    formats = sorted(l["format"] for l in json.loads((tmp_path / "r.json").read_text())["layers"])
    assert formats == ["2:4"] * 4 + ["dense"] * 4
    assert rel_err(got.cpu(), dense) < 3 * REL_TOL[torch.bfloat16]  # two blocks of products, norms, softmax


def test_a_call_timed_behind_a_lead_kernel_is_timed_without_the_lead():
    # the lead's own time comes off: an elementwise kernel timed behind another of its kind measures
    # about what it measures back to back with itself (twice that if the lead were left in)
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    clock = Clock(torch.device("cuda"), TimingPolicy())
    y = torch.randn(1 << 16, device="cuda")
    calls = [lambda: y.mul_(1.0)]
    single = clock.warm(calls)
    alone, behind = clock.graph(calls, single), clock.graph(calls, single, lead=True)
    assert 0 < behind and 0.6 * alone < behind < 1.5 * alone, (alone, behind)


def test_the_rest_probes_time_every_kernel_in_both_modes_above_an_empty_launch():
    # a norm or attention call does at least what a one-element add does: in a CUDA graph it
    # cannot cost less than that add's launch (a probe timing nothing would come out below it)
    from sparsec.fingerprint.probes import launch_overhead, rest_kernels
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    clock = Clock(torch.device("cuda"), TimingPolicy())
    launch = launch_overhead(clock)
    skipped = {}
    rest = rest_kernels(clock, skipped)
    assert set(rest) == {"norm", "attention", "fused_norm", "fused_pointwise"}, skipped
    for name, times in rest.items():
        assert times["graph"] > 0.8 * launch["graph"], (name, times, launch)
        if name.startswith("fused_"):  # graph times only: a compiled call's guards are not a kernel's
            assert times["eager"] is None
        else:
            assert times["eager"] > 0 and times["graph"] < times["eager"] * 5, (name, times)
