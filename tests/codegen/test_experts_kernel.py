"""Every expert-bank implementation against a float64 reference, the grouped Triton kernel on the
CPU interpreter, and the op's fake implementation under torch.compile."""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen.experts import IMPLS, experts, routing_matrix, sorted_runs
from sparsec.errors import SparsecError

# fp32: summation order only (the interpreter multiplies exactly); fp16: inputs, the intermediate
# and the output rounded to fp16 (unit roundoff 4.9e-4), accumulation in fp32
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


def bank(E, I, H, gen, dtype=torch.float32):
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(dtype)
    return gate_up, down


def route(T, E, k, gen):
    probs = torch.softmax(torch.randn(T, E, generator=gen), dim=-1)
    weights, index = probs.topk(k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def float64_reference(x, index, weights, gate_up, down):
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            h = gate_up[e].double() @ x[t].double()
            gate, up = h.chunk(2)
            out[t] += float(weights[t, slot]) * (down[e].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS + ("grouped_mm", "inline"))
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (3, 8, 2), (37, 8, 2), (20, 16, 4), (150, 4, 1)])  # the last: 64-row tiles
def test_every_implementation_matches_float64(impl, T, E, k, dtype, gen):
    H, I = 48, 40   # tails in every tile of the grouped kernel
    gate_up, down = bank(E, I, H, gen, dtype)
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    y = experts(x, index, weights.to(dtype), gate_up, down, impl=impl)
    ref = float64_reference(x, index, weights.to(dtype), gate_up, down)
    assert y.dtype == dtype and y.shape == x.shape
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[dtype], f"{impl} T={T}: relative error {err:.2e}"


def test_experts_no_token_chose_cost_nothing_and_break_nothing(gen):
    """Every token routed to expert 2 alone: the other runs are empty, the grouped tile map
    serves expert 2 only, and every implementation agrees."""
    E, H, I, T = 6, 32, 24, 9
    gate_up, down = bank(E, I, H, gen)
    index = torch.full((T, 1), 2)
    weights = torch.ones(T, 1)
    x = torch.randn(T, H, generator=gen)
    order, ends, tiles, tile_expert = sorted_runs(index, E, 16)
    assert ends.tolist() == [0, 0, 9, 9, 9, 9] and tile_expert.tolist() == [2] + [E] * (len(tile_expert) - 1)
    ref = float64_reference(x, index, weights, gate_up, down)
    for impl in IMPLS + ("grouped_mm",):
        assert float((experts(x, index, weights, gate_up, down, impl=impl).double() - ref).norm() / ref.norm()) < 1e-5


def test_routing_matrix_holds_each_tokens_weights_at_its_experts():
    index = torch.tensor([[0, 2], [1, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    torch.testing.assert_close(routing_matrix(index, weights, 3), torch.tensor([[0.7, 0.0, 0.3], [0.4, 0.6, 0.0]]))


def test_a_bank_of_the_wrong_shape_is_refused_naming_it(gen):
    gate_up, down = bank(4, 8, 16, gen)
    x = torch.randn(3, 16, generator=gen)
    index, weights = route(3, 4, 2, gen)
    with pytest.raises(SparsecError, match=r"down must be \(E, H, I\) = \(4, 16, 8\)"):
        experts(x, index, weights, gate_up, down.transpose(1, 2), impl="grouped")
    with pytest.raises(SparsecError, match="x must be"):
        experts(torch.randn(3, 15), index, weights, gate_up, down)
    with pytest.raises(SparsecError, match="integer"):
        experts(x, index.float(), weights, gate_up, down)
    with pytest.raises(SparsecError, match="unknown experts implementation 'fused'"):
        experts(x, index, weights, gate_up, down, impl="fused")


def test_the_op_traces_as_one_node_with_its_fake(gen):
    """torch.compile(fullgraph=True) sees one opaque node per bank (the fake gives its shape)."""
    gate_up, down = bank(4, 8, 16, gen)
    index, weights = route(5, 4, 2, gen)
    x = torch.randn(5, 16, generator=gen)

    def f(x, index, weights):
        return torch.ops.sparsec.experts_swiglu(x, index, weights, gate_up, down, "dense_all") * 2.0

    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(x, index, weights)
    assert sum("experts_swiglu" in t for t in seen) == 1
    torch.testing.assert_close(out, 2.0 * experts(x, index, weights, gate_up, down, impl="loop"))


def test_an_implementation_too_large_for_the_machine_is_refused_with_its_size():
    from sparsec.codegen.experts import memory_reason, working_bytes

    # Mixtral's bank at 2048 tokens: batched would gather every pair's 3 x 14336 x 4096 weights
    assert working_bytes("batched", 8, 2, 14336, 4096, 2048) == 4 * 4096 * 3 * 14336 * 4096
    why = memory_reason("batched", 8, 2, 14336, 4096, 2048, "cpu")
    assert why is not None and "GiB of intermediates at 2048 tokens" in why
    assert memory_reason("grouped", 8, 2, 512, 256, 16, "cpu") is None


def factored_bank(E, I, H, r1, r2, gen, dtype=torch.float32):
    """Factors of a bank whose every expert has exactly ranks r1 (gate_up) and r2 (down)."""
    v1, u1 = torch.randn(E, r1, H, generator=gen) / H ** 0.5, torch.randn(E, 2 * I, r1, generator=gen) / r1 ** 0.5
    v2, u2 = torch.randn(E, r2, I, generator=gen) / I ** 0.5, torch.randn(E, H, r2, generator=gen) / r2 ** 0.5
    return tuple(t.to(dtype) for t in (v1, u1, v2, u2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl,T,E,k", [(impl, *shape) for impl in IMPLS + ("grouped_mm", "rows")
                                        for shape in ([(1, 4, 1), (9, 8, 2)] if impl == "rows" else
                                                      [(1, 4, 1), (37, 8, 2), (150, 4, 1)])])
                                        # rows runs a program per routed pair under the interpreter: 9 tokens
                                        # over 8 experts already make uneven runs and empty experts
def test_a_factored_bank_computes_the_bank_its_factors_multiply_to(impl, T, E, k, dtype, gen):
    from sparsec.codegen.experts import experts_lowrank

    H, I, r1, r2 = 48, 40, 24, 16   # ranks that are no multiple of a tile: tails in the middle dimension
    v1, u1, v2, u2 = factored_bank(E, I, H, r1, r2, gen, dtype)
    gate_up, down = u1.double() @ v1.double(), u2.double() @ v2.double()
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    y = experts_lowrank(x, index, weights.to(dtype), v1, u1, v2, u2, impl=impl)
    ref = float64_reference(x, index, weights.to(dtype), gate_up, down)
    assert y.dtype == dtype and y.shape == x.shape
    err = float((y.double() - ref).norm() / ref.norm())
    # fp16: the middle (R-wide) products are rounded too, one more rounding than the dense bank's
    assert err < 2 * TOL[dtype], f"{impl} T={T}: relative error {err:.2e}"


def test_factors_that_make_no_bank_are_refused_naming_the_shapes(gen):
    from sparsec.codegen.experts import experts_lowrank

    v1, u1, v2, u2 = factored_bank(4, 8, 16, 4, 4, gen)
    index, weights = route(3, 4, 2, gen)
    with pytest.raises(SparsecError, match="do not make a bank"):
        experts_lowrank(torch.randn(3, 16), index, weights, v1, u1, v2[:, :, :5], u2)


def test_the_factored_op_traces_as_one_node_under_compile(gen):
    v1, u1, v2, u2 = factored_bank(4, 8, 16, 4, 4, gen)
    index, weights = route(5, 4, 2, gen)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(x):
        return torch.ops.sparsec.experts_swiglu_lowrank(x, index, weights, v1, u1, v2, u2, "dense_all") * 2.0

    x = torch.randn(5, 16, generator=gen)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, backend=backend, fullgraph=True)(x), f(x))
    assert sum("experts_swiglu_lowrank" in t for t in seen) == 1


def twofour_bank(E, I, H, gen, dtype=torch.float32):
    """(values, meta) of both projections of a bank of exactly 2:4 experts, and their dense weights."""
    from sparsec.codegen.twofour import encode_positions

    def packed(N, K):
        dense = torch.randn(E, N, K, generator=gen) / K ** 0.5
        pos = torch.rand(E, N, K // 4, 4, generator=gen).argsort(-1)[..., :2].sort(-1).values
        groups = dense.reshape(E, N, K // 4, 4)
        values = groups.gather(3, pos).reshape(E, N, K // 2).to(dtype)
        meta = torch.stack([encode_positions(pos[e]) for e in range(E)])
        kept = torch.zeros_like(groups).scatter_(3, pos, groups.gather(3, pos)).reshape(E, N, K)
        return values, meta, kept.to(dtype)

    return packed(2 * I, H), packed(H, I)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (37, 8, 2), (150, 4, 1)])
def test_a_two_four_bank_computes_the_bank_its_kept_values_make(impl, T, E, k, dtype, gen):
    H, I = 48, 40   # 12 and 10 groups of four: metadata bytes that end mid-tile
    (gv, gm, gate_up), (dv, dm, down) = twofour_bank(E, I, H, gen, dtype)
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    y = torch.ops.sparsec.experts_swiglu_twofour(x, index, weights.to(dtype), gv, gm, dv, dm, impl)
    ref = float64_reference(x, index, weights.to(dtype), gate_up, down)
    assert y.dtype == dtype and y.shape == x.shape
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[dtype], f"{impl} T={T}: relative error {err:.2e}"


@pytest.mark.parametrize("T", [1, 3, 7])  # 7 tokens x 2 experts: uneven runs over 8 experts
def test_a_two_four_bank_run_row_by_row_computes_the_bank_with_swiglu_fused(T, gen, monkeypatch):
    from sparsec.codegen import experts as ex, twofour

    H, I, E, k = 64, 96, 8, 2  # inputs in whole 32-column words: the word kernel reads them
    (gv, gm, gate_up), (dv, dm, down) = twofour_bank(E, I, H, gen, torch.float16)
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).half()
    calls = []
    real = twofour.twofour_rows
    monkeypatch.setattr(twofour, "twofour_rows", lambda *a, **kw: calls.append((a[0].shape[0], kw)) or real(*a, **kw))
    y = ex.experts_twofour_op(x, index, weights.half(), gv, gm, dv, dm, "rows")
    # one row per (token, slot), the gate and up halves' SwiGLU fused into the first launch
    assert calls == [(T * k, {"gate_row": 0, "up_row": I, "width": I}), (T * k, {})]
    ref = float64_reference(x, index, weights.half(), gate_up, down)
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[torch.float16], f"T={T}: relative error {err:.2e}"
    calls.clear()
    ex.experts_twofour_op(x, index, weights.half(), gv, gm, dv, dm, "grouped")
    assert calls == []  # grouped stays the tensor-core kernel: which pays is measured, not assumed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T", [1, 3, 7])  # 7 tokens x 2 experts: uneven runs over 8 experts
def test_a_dense_bank_run_row_by_row_computes_the_bank_with_swiglu_fused(T, dtype, gen, monkeypatch):
    from sparsec.codegen import experts as ex

    H, I, E, k = 48, 40, 8, 2  # noqa: E741  (neither a power of two: partial tiles on both axes)
    gate_up, down = bank(E, I, H, gen, dtype)
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    calls = []
    real = ex.dense_rows
    monkeypatch.setattr(ex, "dense_rows", lambda *a, **kw: calls.append((a[0].shape[0], kw)) or real(*a, **kw))
    y = torch.ops.sparsec.experts_swiglu(x, index, weights.to(dtype), gate_up, down, "rows")
    assert calls == [(T * k, {"up_row": I}), (T * k, {"up_row": -1})]
    ref = float64_reference(x, index, weights.to(dtype), gate_up, down)
    err = float((y.double() - ref).norm() / ref.norm())
    assert y.dtype == dtype and err < TOL[dtype], f"T={T}: relative error {err:.2e}"


def test_the_dense_rows_kernel_is_right_in_every_config(gen):
    from sparsec.codegen import experts as ex

    E, N, K = 3, 24, 1100  # K past two of the widest tiles, a partial last one
    w = torch.randn(E, 2 * N, K, generator=gen) / K ** 0.5
    x = torch.randn(5, K, generator=gen)
    expert_of_row = torch.tensor([2, 0, 0, 1, 2])
    gate = torch.einsum("sk,snk->sn", x.double(), w[expert_of_row, :N].double())
    up = torch.einsum("sk,snk->sn", x.double(), w[expert_of_row, N:].double())
    for config in ex._ROWS.configs:
        with ex._ROWS.only(config):
            plain = ex.dense_rows(x, w, expert_of_row)
            gated = ex.dense_rows(x, w, expert_of_row, up_row=N)
        torch.testing.assert_close(plain[:, :N].double(), gate, rtol=1e-5, atol=1e-5, msg=lambda m: f"{config}: {m}")
        torch.testing.assert_close(gated.double(), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{config} gated: {m}")


def test_rows_takes_dense_factored_and_16_bit_block_banks_but_no_mix_of_forms(gen):
    from sparsec.codegen.experts import BlockWeights, rows_usable

    x = torch.randn(2, 32, generator=gen)
    dense = bank(2, 16, 32, gen)
    assert rows_usable(x, *dense)
    assert rows_usable(x, (dense[0][:, :4], dense[0][:, :, :4]), dense[1])  # a factored projection
    assert not rows_usable(x, dense[0], dense[1].transpose(1, 2).contiguous().transpose(1, 2))  # K strided
    gv, gc, gr, _ = block_bank(2, 32, 32, 16, 2, gen)
    dv, dc, dr, _ = block_bank(2, 32, 16, 16, 1, gen)
    blocked = BlockWeights(gv, gc, gr, 32), BlockWeights(dv, dc, dr, 16)
    assert rows_usable(x.half(), *blocked) and not rows_usable(x, *blocked)
    assert not rows_usable(x.half(), blocked[0], dense[1].half())


def test_a_factored_bank_run_row_by_row_goes_through_each_factor_with_the_swiglu_on_the_last(gen, monkeypatch):
    from sparsec.codegen import experts as ex

    v1, u1, v2, u2 = factored_bank(8, 40, 48, 24, 16, gen, torch.float16)
    index, weights = route(3, 8, 2, gen)
    x = torch.randn(3, 48, generator=gen).half()
    calls = []
    real = ex.dense_rows
    monkeypatch.setattr(ex, "dense_rows", lambda *a, **kw: calls.append((tuple(a[1].shape), kw)) or real(*a, **kw))
    ex.experts_lowrank(x, index, weights.half(), v1, u1, v2, u2, impl="rows")
    assert calls == [((8, 24, 48), {"up_row": -1}), ((8, 80, 24), {"up_row": 40}),
                     ((8, 16, 40), {"up_row": -1}), ((8, 48, 16), {"up_row": -1})]


@pytest.mark.parametrize("T", [1, 3, 7])  # 7 tokens x 2 experts: uneven runs over 8 experts
def test_a_block_sparse_bank_run_row_by_row_computes_the_bank_with_swiglu_fused(T, gen, monkeypatch):
    from sparsec.codegen import block as blk

    H, I, B, E, k = 64, 96, 16, 8, 2  # noqa: E741  (the first block row of each expert empty)
    gv, gc, gr, gate_up = block_bank(E, 2 * I, H, B, 9, gen, torch.float16)
    dv, dc, dr, down = block_bank(E, H, I, B, 6, gen, torch.float16)
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).half()
    calls = []
    real = blk.block_rows
    monkeypatch.setattr(blk, "block_rows", lambda *a, **kw: calls.append((a[0].shape[0], kw)) or real(*a, **kw))
    y = torch.ops.sparsec.experts_swiglu_block(x, index, weights.half(), gv, gc, gr, dv, dc, dr, "rows")
    assert calls == [(T * k, {"up_row": I}), (T * k, {})]
    ref = float64_reference(x, index, weights.half(), gate_up, down)
    err = float((y.double() - ref).norm() / ref.norm())
    assert y.dtype == torch.float16 and err < TOL[torch.float16], f"T={T}: relative error {err:.2e}"


def test_rows_falls_back_to_grouped_where_the_word_kernel_cannot_read_the_bank(gen):
    H, I, E = 48, 40, 4  # 12 groups a row: metadata words would end mid-row
    (gv, gm, gate_up), (dv, dm, down) = twofour_bank(E, I, H, gen, torch.float16)
    index, weights = route(5, E, 2, gen)
    x = torch.randn(5, H, generator=gen).half()
    y = torch.ops.sparsec.experts_swiglu_twofour(x, index, weights.half(), gv, gm, dv, dm, "rows")
    ref = float64_reference(x, index, weights.half(), gate_up, down)
    assert float((y.double() - ref).norm() / ref.norm()) < TOL[torch.float16]


def test_rows_of_experts_read_their_own_expert_even_when_the_routing_skips_some(gen):
    from sparsec.codegen.twofour import expand, twofour_rows

    E, N, K = 4, 40, 64  # 40 rows: the last tile of each expert runs past it into the next
    (v, m, dense), _ = twofour_bank(E, N // 2, K, gen, torch.float16)
    x = torch.randn(6, K, generator=gen).half()
    expert_of_row = torch.tensor([3, 3, 0, 2, 2, 2])
    y = twofour_rows(x, v, m, expert_of_row)
    want = torch.stack([x[s].float() @ expand(v[e], m[e], K).float().t() for s, e in enumerate(expert_of_row.tolist())])
    torch.testing.assert_close(y.float(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("rows_of", [[0, 5, 0, 4], [9, 1, 0, 7], [33, 2, 1, 0]], ids=["tile4", "tile8", "tile16"])
def test_experts_with_several_rows_each_go_in_tiles_of_one_experts_rows(rows_of, gen, monkeypatch):
    """Past ROWS_TILES_FROM rows an expert on average, rows go to the multi-token word kernel in
    tiles of one expert's rows (uneven runs, an expert with none, runs longer than a tile), with
    the SwiGLU fused as row by row; below, one row a program."""
    from sparsec.codegen import twofour
    from sparsec.codegen.twofour import expand, twofour_rows

    E, I, K = 4, 40, 64
    (v, m, _), _ = twofour_bank(E, I, K, gen, torch.float16)
    expert_of_row = torch.repeat_interleave(torch.arange(E), torch.tensor(rows_of))
    S = expert_of_row.shape[0]
    assert S > twofour.ROWS_TILES_FROM * E
    x = torch.randn(S, K, generator=gen).half()
    launched = []
    real_tokens, real_words = twofour._tokens, twofour._words
    monkeypatch.setattr(twofour, "_tokens", lambda *a, **kw: launched.append(kw["experts"][3]) or real_tokens(*a, **kw))
    monkeypatch.setattr(twofour, "_words", lambda *a, **kw: launched.append("words") or real_words(*a, **kw))
    h = twofour_rows(x, v, m, expert_of_row, gate_row=0, up_row=I, width=I)
    dense = [expand(v[e], m[e], K).float() for e in range(E)]
    full = torch.stack([x[s].float() @ dense[e].t() for s, e in enumerate(expert_of_row.tolist())])
    want = torch.nn.functional.silu(full[:, :I]) * full[:, I:]
    torch.testing.assert_close(h.float(), want, rtol=4e-3, atol=4e-3 * want.abs().max().item())
    assert launched == [min(16, 1 << (-(-S // E) - 1).bit_length())]
    twofour_rows(x[: 2 * E], v, m, expert_of_row[: 2 * E].sort().values)
    assert launched[-1] == "words"


def block_bank(E, N, K, B, kept, gen, dtype=torch.float32):
    """(values, col_idx, row_ptr) of E experts each keeping ``kept`` random B x B blocks of N x K, the
    first block row always empty (a program with nothing to read), and their dense weights."""
    nr, nc = N // B, K // B
    values, cols, row_ptrs = [], [], []
    dense = torch.zeros(E, N, K)
    for e in range(E):
        keep = (nc + torch.randperm((nr - 1) * nc, generator=gen)[:kept]).sort().values
        rows, cs = keep // nc, keep % nc
        v = torch.randn(kept, B, B, generator=gen) / (B * kept / nr) ** 0.5
        for i in range(kept):
            dense[e, rows[i] * B:(rows[i] + 1) * B, cs[i] * B:(cs[i] + 1) * B] = v[i]
        row_ptr = torch.zeros(nr + 1, dtype=torch.int32)
        row_ptr[1:] = torch.bincount(rows, minlength=nr).cumsum(0)
        values.append(v)
        cols.append(cs.to(torch.int32))
        row_ptrs.append(row_ptr)
    return torch.stack(values).to(dtype), torch.stack(cols), torch.stack(row_ptrs), dense.to(dtype)


def test_block_weights_expand_to_the_planted_dense_experts(gen):
    from sparsec.codegen.experts import BlockWeights

    values, cols, row_ptr, dense = block_bank(3, 64, 48, 16, 5, gen)
    w = BlockWeights(values, cols, row_ptr, 48)
    assert w.shape == (3, 64, 48)
    torch.testing.assert_close(w.dense(), dense, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (37, 8, 2), (150, 4, 1)])
def test_a_block_sparse_bank_computes_the_bank_its_kept_blocks_make(impl, T, E, k, dtype, gen):
    H, I, B = 64, 48, 16   # gate_up 6 x 4 blocks, down 4 x 3: uneven rows, the first one empty
    gv, gc, gr, gate_up = block_bank(E, 2 * I, H, B, 9, gen, dtype)
    dv, dc, dr, down = block_bank(E, H, I, B, 4, gen, dtype)
    index, weights = route(T, E, k, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    y = torch.ops.sparsec.experts_swiglu_block(x, index, weights.to(dtype), gv, gc, gr, dv, dc, dr, impl)
    ref = float64_reference(x, index, weights.to(dtype), gate_up, down)
    assert y.dtype == dtype and y.shape == x.shape
    err = float((y.double() - ref).norm() / ref.norm())
    assert err < TOL[dtype], f"{impl} T={T}: relative error {err:.2e}"


def test_the_grouped_block_kernel_is_right_in_every_config(gen):
    """Each config of the block launch (rows per program up to the block's side) on one bank."""
    from sparsec.codegen import experts as ex

    H, I, B, E = 128, 128, 64, 4
    gv, gc, gr, gate_up = block_bank(E, 2 * I, H, B, 5, gen)
    dv, dc, dr, down = block_bank(E, H, I, B, 2, gen)
    index, weights = route(21, E, 2, gen)
    x = torch.randn(21, H, generator=gen)
    ref = float64_reference(x, index, weights, gate_up, down)
    kept = [c for c in ex._GROUPED_BLOCK.configs if c.kwargs["BLOCK_N"] <= B]
    assert len(kept) == 4 and any(c.kwargs.get("SWAP") for c in kept)
    for config in kept:
        with ex._GROUPED_BLOCK.only(config):
            y = torch.ops.sparsec.experts_swiglu_block(x, index, weights, gv, gc, gr, dv, dc, dr, "grouped")
        err = float((y.double() - ref).norm() / ref.norm())
        assert err < TOL[torch.float32], f"{config}: relative error {err:.2e}"


@pytest.mark.parametrize("form", ["dense", "2:4"])
def test_the_grouped_kernel_is_right_in_every_config_in_either_orientation(form, gen):
    """Each config of the dense and 2:4 grouped launch, the weight-first ones (``SWAP``) included,
    at decode's 16-row tiles and prefill's 64."""
    from sparsec.codegen import experts as ex

    H, I, E = 128, 64, 4  # noqa: E741
    if form == "2:4":
        (gv, gm, gate_up), (dv, dm, down) = twofour_bank(E, I, H, gen)

        def run(x, index, weights):
            return torch.ops.sparsec.experts_swiglu_twofour(x, index, weights, gv, gm, dv, dm, "grouped")
    else:
        gate_up, down = bank(E, I, H, gen)

        def run(x, index, weights):
            return torch.ops.sparsec.experts_swiglu(x, index, weights, gate_up, down, "grouped")
    assert any(c.kwargs.get("SWAP") for c in ex._GROUPED.configs)
    for T in (9, 200):  # 18 pairs over 4 experts: 16-row tiles; 400: 64-row tiles
        index, weights = route(T, E, 2, gen)
        x = torch.randn(T, H, generator=gen)
        ref = float64_reference(x, index, weights, gate_up, down)
        for config in ex._GROUPED.configs:
            with ex._GROUPED.only(config):
                y = run(x, index, weights)
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < TOL[torch.float32], f"{form} T={T} {config}: relative error {err:.2e}"


def test_the_block_sparse_op_compiles_through_inductor_on_its_fake(gen):
    """Inductor runs the graph around the op (its shape from the fake) and calls the op itself."""
    gv, gc, gr, gate_up = block_bank(4, 64, 32, 16, 3, gen)
    dv, dc, dr, down = block_bank(4, 32, 32, 16, 2, gen)
    index, weights = route(7, 4, 2, gen)

    def f(x):
        return torch.ops.sparsec.experts_swiglu_block(x + 1.0, index, weights, gv, gc, gr, dv, dc, dr, "dense_all") * 2.0

    x = torch.randn(7, 32, generator=gen)
    torch._dynamo.reset()
    want = 2.0 * float64_reference(x + 1.0, index, weights, gate_up, down)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x).double(), want, rtol=1e-4, atol=1e-5)


def test_grouped_mm_runs_dense_and_factored_banks_and_hands_packed_ones_to_grouped(gen):
    from sparsec.codegen.experts import TwoFourWeights, grouped_mm_usable

    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        pytest.skip("this torch has no grouped GEMM")
    gate_up, down = bank(4, 8, 16, gen)
    x = torch.randn(3, 16, generator=gen)
    assert grouped_mm_usable(x, gate_up, down)
    assert grouped_mm_usable(x, (gate_up[:, :4, :], gate_up[:, :, :4]), down)  # factors (E, R, H), (E, 2I, R)
    packed = TwoFourWeights(torch.zeros(4, 16, 8), torch.zeros(4, 16, 2, dtype=torch.uint8))
    assert not grouped_mm_usable(x, packed, down)
    assert not grouped_mm_usable(x.to(torch.int32), gate_up, down)


def test_a_grouped_gemm_without_a_cpu_kernel_is_not_offered_on_the_cpu(gen, monkeypatch):
    from sparsec.codegen import experts as ex

    def no_cpu_kernel(a, b, offs):
        raise NotImplementedError("no CPU kernel")
    monkeypatch.setattr(ex, "_torch_grouped_mm", lambda: no_cpu_kernel)
    gate_up, down = bank(4, 8, 16, gen)
    assert not ex.grouped_mm_usable(torch.randn(3, 16, generator=gen), gate_up, down)


@pytest.mark.parametrize("impl", IMPLS + ("grouped_mm", "rows"))
def test_a_batch_without_tokens_gives_an_empty_output(impl, gen):
    gate_up, down = bank(4, 8, 16, gen)
    x = torch.randn(2, 0, 16, generator=gen)
    y = experts(x, torch.zeros(2, 0, 2, dtype=torch.long), torch.zeros(2, 0, 2), gate_up, down, impl=impl)
    assert y.shape == (2, 0, 16)
