"""Expert banks of a transformers 5 Mixtral through the sparsec pipeline: found, timed on their
calibration routing, given the fastest implementation, reported; banks sparsec does not run are
reported as skipped with how to let it."""

from __future__ import annotations

import pytest
import torch

import sparsec
from sparsec.errors import SparsecError

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe")

from sparsec.experts import unsupported_banks, use_sparsec_experts  # noqa: E402


def mixtral(layers: int = 2, act: str = "silu"):
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                     num_local_experts=8, num_experts_per_tok=2, hidden_act=act)
    return transformers.MixtralForCausalLM(cfg).eval()


def ids(seed: int, shape=(2, 12)):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


DENSE = {"layers": {"_default": "dense"}}  # linear layers kept: the banks alone change


def recorded_banks(x, with_inputs: bool = False):
    """The graph Dynamo traces for a one-block Mixtral running sparsec's op, and its one bank with
    the routing of ``x`` recorded (and the graph's inputs, ``with_inputs``)."""
    from sparsec.passes import experts_fx

    model = use_sparsec_experts(mixtral(layers=1))
    graphs = []

    def backend(gm, inputs):
        graphs.append((gm, inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
    gm, inputs = graphs[0]
    banks, skipped = experts_fx.find_banks(gm, inputs)
    assert len(banks) == 1 and not skipped
    experts_fx.record(gm, banks, [inputs])
    return (gm, banks, inputs) if with_inputs else (gm, banks)


def test_each_bank_runs_the_implementation_measured_fastest_and_computes_the_same(monkeypatch):
    from sparsec.passes import experts_fx

    # the shipped cpu fingerprint describes another machine than most that run this: measure here
    monkeypatch.setattr(experts_fx, "_other_device", lambda fingerprint, x: None)
    model = mixtral()
    x = ids(0)
    with torch.no_grad():
        reference = model(x).logits
    use_sparsec_experts(model)
    calibration = [(ids(s),) for s in (1, 2, 3)]
    result = sparsec.optimize(model, (x,), calibration=calibration, fingerprint="cpu", plan=DENSE, output="logits")
    with torch.no_grad():
        torch.testing.assert_close(result.module(x).logits, reference, rtol=1e-4, atol=1e-4)
    banks = result.report.to_dict()["experts"]
    assert [b["name"] for b in banks] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for b in banks:
        assert b["op"] == "experts" and b["shape"] == [8, 96, 64] and b["top_k"] == 2 and b["tokens"] == 24
        assert sum(b["tokens_per_expert"]) == 3 * 24 * 2 and b["calibration_calls"] == 3
        times = {c["implementation"]: c["measured_us"] for c in b["candidates"]}
        # and torch's grouped GEMM wherever this torch has one (transformers' default runs it)
        has_mm = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
        assert set(times) == {"loop", "batched", "dense_all", "grouped"} | ({"grouped_mm"} if has_mm else set())
        assert all(t > 0 for t in times.values())
        assert b["implementation"] == min(times, key=times.get) and b["traced_implementation"] == "grouped"
        assert b["implementation"] in b["reason"] and "measured fastest at 24 tokens" in b["reason"]
    from rich.console import Console

    from sparsec.report.html import render_html
    from sparsec.report.terminal import render_table

    console = Console(width=400, record=True)
    console.print(render_table(result.report))
    assert "expert bank model.layers.0.mlp.experts: 8 experts of 64 -> 96 -> 64, top-2, 24 tokens" in console.export_text()
    assert '<section id="experts"' in render_html(result.report)


def test_rows_is_timed_where_the_bank_is_planned_here_and_not_from_another_devices_fingerprint(monkeypatch):
    from sparsec.codegen import experts as ex
    from sparsec.passes import experts_fx

    monkeypatch.setattr(ex, "rows_usable", lambda x, gate_up, down: True)  # as on a GPU
    monkeypatch.setitem(ex._RUN, "rows", ex.experts_grouped)  # no GPU here to run its kernel
    gm, banks = recorded_banks(ids(0))
    (row,) = experts_fx.choose(gm, banks, graph_replay=False)
    rows = next(c for c in row["candidates"] if c["implementation"] == "rows")
    assert rows["measured_us"] > 0

    class Elsewhere:
        name = "h200"

        def matches_current_device(self, kind):
            return "it describes NVIDIA H200"

        def predict_experts(self, impl, *shape):
            return None if impl == "rows" else type("P", (), {"us": {"grouped": 1.0}.get(impl, 2.0)})()

    gm, banks = recorded_banks(ids(0))
    (row,) = experts_fx.choose(gm, banks, graph_replay=False, fingerprint=Elsewhere())
    assert row["implementation"] == "grouped" and "rows" not in [c["implementation"] for c in row["candidates"]]

    class MeasuredRowsThere(Elsewhere):  # a fingerprint measured where the rows kernel ran
        def predict_experts(self, impl, *shape):
            return type("P", (), {"us": {"grouped": 1.0, "rows": 0.5}.get(impl, 2.0)})()

    gm, banks = recorded_banks(ids(0))
    (row,) = experts_fx.choose(gm, banks, graph_replay=False, fingerprint=MeasuredRowsThere())
    assert row["implementation"] == "rows" and "predicted fastest on h200" in row["reason"]


def test_an_implementation_that_fails_here_is_refused_with_its_error_and_planning_goes_on(monkeypatch):
    from sparsec.codegen import experts as ex
    from sparsec.passes import experts_fx

    def broken(*args):
        raise RuntimeError("PassManager::run failed\nmore lines")

    monkeypatch.setattr(ex, "rows_usable", lambda x, gate_up, down: True)
    monkeypatch.setitem(ex._RUN, "rows", broken)
    gm, banks = recorded_banks(ids(0))
    (row,) = experts_fx.choose(gm, banks, graph_replay=False)
    rows = next(c for c in row["candidates"] if c["implementation"] == "rows")
    assert rows["measured_us"] is None
    assert rows["rejected_because"] == "failed to run here (RuntimeError: PassManager::run failed)"
    # whichever of the others measured fastest on this machine (which one is its business, not the test's)
    timed = {c["implementation"] for c in row["candidates"] if c["measured_us"] is not None}
    assert "rows" not in timed and row["implementation"] in timed and row["measured_us"] > 0


def test_under_cuda_graph_replay_the_host_synchronising_loop_is_not_a_candidate():
    from sparsec.passes import experts_fx

    gm, banks = recorded_banks(ids(0))
    (row,) = experts_fx.choose(gm, banks, graph_replay=True)
    loop = next(c for c in row["candidates"] if c["implementation"] == "loop")
    assert row["implementation"] != "loop" and loop["measured_us"] is None
    assert "cannot replay in a CUDA graph" in loop["rejected_because"]
    assert banks[0].node.args[5] == row["implementation"]


def test_banks_traced_through_transformers_own_implementation_are_reported_with_how_to_fix():
    model = mixtral(layers=1)
    result = sparsec.optimize(model, (ids(0),), fingerprint="cpu", plan=DENSE, output="logits")
    report = result.report.to_dict()
    assert "experts" not in report
    (bank,) = [s for s in report["skipped"] if s["op"] == "experts"]
    assert bank["name"] == "model.layers.0.mlp.experts"
    assert "gate_up_proj [8, 192, 64]" in bank["reason"] and "use_sparsec_experts" in bank["reason"]


def test_a_bank_the_op_does_not_describe_keeps_transformers_grouped_and_says_why():
    model = mixtral(layers=1, act="gelu")
    x = ids(0)
    with torch.no_grad():
        reference = model(x).logits
    use_sparsec_experts(model)
    assert unsupported_banks(model) == {"model.layers.0.mlp.experts": "activation GELUActivation, which does not compute SiLU"}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference)
    result = sparsec.optimize(model, (x,), fingerprint="cpu", plan=DENSE, output="logits")
    assert [s["name"] for s in result.report.to_dict()["skipped"] if s["op"] == "experts"] == ["model.layers.0.mlp.experts"]


def test_a_model_without_expert_dispatch_is_refused_naming_it():
    with pytest.raises(SparsecError, match="Linear has no set_experts_implementation"):
        use_sparsec_experts(torch.nn.Linear(4, 4))


class _Elsewhere:
    """A fingerprint of another device whose predictions favour ``batched``."""

    name = "elsewhere"

    def predict_experts(self, impl, E, k, I, H, M, dtype, mode):
        from sparsec.fingerprint.predict import Prediction

        return Prediction({"batched": 1.0}.get(impl, 100.0), f"sparsec-{impl}-experts")

    def matches_current_device(self, kind=None):
        return "fingerprint 'elsewhere' describes another device"


def test_planning_for_another_device_follows_the_fingerprint_not_the_local_clock():
    from sparsec.passes import experts_fx

    gm, banks = recorded_banks(ids(0, (2, 64)))
    (row,) = experts_fx.choose(gm, banks, graph_replay=False, fingerprint=_Elsewhere())
    assert row["implementation"] == "batched" and row["measured_us"] is None and row["predicted_us"] == 1.0
    assert "predicted fastest on elsewhere" in row["reason"]
    assert all(c["measured_us"] is None and c["predicted_us"] for c in row["candidates"])


def test_banks_transformers_eager_loop_runs_outside_the_graphs_are_named_in_a_warning():
    model = mixtral(layers=1)
    model.config._experts_implementation = "eager"
    torch._dynamo.reset()
    result = sparsec.optimize(model, (ids(0),), fingerprint="cpu", plan=DENSE, output="logits")
    (warning,) = [w for w in result.report.warnings if w.startswith("expert bank")]
    assert "model.layers.0.mlp.experts (MixtralExperts" in warning and "use_sparsec_experts" in warning


def test_a_qwen2_moe_with_shared_experts_compiles_and_the_report_names_every_bank():
    """Qwen2-MoE: routed experts (top-k weights not renormalised) beside a gated shared expert."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                                      shared_expert_intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=100, num_experts=8, num_experts_per_tok=2,
                                      decoder_sparse_step=1, norm_topk_prob=False)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    x = ids(0)
    with torch.no_grad():
        reference = model(x).logits
    use_sparsec_experts(model)
    result = sparsec.optimize(model, (x,), calibration=[(ids(s),) for s in (1, 2, 3)], fingerprint="cpu", plan=DENSE,
                              output="logits")
    with torch.no_grad():
        torch.testing.assert_close(result.module(x).logits, reference, rtol=1e-4, atol=1e-4)
    banks = result.report.to_dict()["experts"]
    assert [b["name"] for b in banks] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for b in banks:
        assert b["shape"] == [8, 48, 64] and b["top_k"] == 2 and sum(b["tokens_per_expert"]) == 3 * 24 * 2
        # 48 routed pairs per call, 144 in all (over the 97 needed to tell): no expert is that rare here
        assert b["pruning"]["dropped"] == [] and "no expert dropped" in b["pruning"]["reason"]


def test_inline_is_timed_as_compiled_and_lowered_into_the_graph_in_place_of_the_op(monkeypatch):
    """Where the graph is compiled by inductor (CUDA), a dense bank is also timed ``inline``: its ops
    compiled as the lowered graph will hold them. Chosen, the bank's node becomes a call of those
    ops from the graph (a new graph: the traced one keeps the op), computing the same."""
    from sparsec.codegen import experts as ex
    from sparsec.passes import experts_fx

    compiled = []

    def compile_here(x, idx, wts, gate_up, down):  # stands in for inductor (no GPU here)
        compiled.append(tuple(x.shape))
        return ex.experts_inline

    monkeypatch.setattr(ex, "inline_usable", lambda x, gate_up, down: True)
    monkeypatch.setattr(experts_fx, "compiled_inline", compile_here)
    gm, banks, inputs = recorded_banks(ids(0), with_inputs=True)
    with torch.no_grad():
        expected = gm(*inputs)
    before = [n.target for n in gm.graph.nodes]
    (row,) = experts_fx.choose(gm, banks, graph_replay=False)
    inline = next(c for c in row["candidates"] if c["implementation"] == "inline")
    assert inline["measured_us"] > 0 and compiled and compiled[0] == (24, 64)

    banks[0].node.args = (*banks[0].node.args[:5], "inline")  # as if measured fastest
    gm.recompile()
    lowered = experts_fx.inline_banks(gm)
    assert not any(experts_fx.is_experts_op(n) for n in lowered.graph.nodes)
    assert [n for n in lowered.graph.nodes if n.target is ex.experts_inline]
    assert [n.target for n in gm.graph.nodes] == before  # the traced graph still runs the op
    with torch.no_grad():
        torch.testing.assert_close(lowered(*inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grouped_faster_by, chosen", [(0.02, "inline"), (0.10, "grouped")])
def test_another_form_replaces_inline_only_when_it_times_clearly_faster(monkeypatch, grouped_faster_by, chosen):
    """``inline`` is what the model's own forward compiles to: a form timed alone within the margin
    of it is not taken (its gain did not survive into a whole graph on an H200), one clearly faster is."""
    from sparsec.codegen import experts as ex
    from sparsec.passes import experts_fx

    monkeypatch.setattr(ex, "inline_usable", lambda x, gate_up, down: True)
    monkeypatch.setattr(experts_fx, "compiled_inline", lambda *a, **k: ex.experts_inline)

    def timed(calls, device, graph_replay, failed=None):
        out = {name: 100.0 + i for i, name in enumerate(calls)}  # every other form slower than both
        out["inline"] = 50.0
        out["grouped"] = 50.0 / (1 + grouped_faster_by)
        return out

    monkeypatch.setattr(experts_fx, "_time_each", timed)
    gm, banks = recorded_banks(ids(0))
    (row,) = experts_fx.choose(gm, banks, graph_replay=False)
    assert row["implementation"] == chosen and banks[0].node.args[5] == chosen
    if chosen == "inline":
        assert "inline kept" in row["reason"] and "grouped measured" in row["reason"]
    else:
        assert "grouped measured fastest" in row["reason"]


def test_inline_banks_leaves_a_graph_without_inline_banks_as_it_is():
    from sparsec.passes import experts_fx

    gm, banks = recorded_banks(ids(0))
    assert experts_fx.inline_banks(gm) is gm
    assert banks[0].node.args[5] != "inline"


def test_inline_is_not_a_candidate_where_the_graph_runs_as_plain_torch():
    """On the CPU the rewritten graph is not compiled: ``inline`` would be ``grouped_mm`` under
    another name, so it is not timed."""
    from sparsec.codegen import experts as ex
    from sparsec.passes import experts_fx

    gm, banks = recorded_banks(ids(0))
    assert not ex.inline_usable(banks[0].inputs[0], banks[0].gate_up, banks[0].down)
    (row,) = experts_fx.choose(gm, banks, graph_replay=False)
    assert "inline" not in [c["implementation"] for c in row["candidates"]]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a CUDA device with torch's grouped GEMM (sm90 and later)")
def test_on_cuda_inline_is_compiled_timed_and_the_lowered_model_computes_the_same(monkeypatch):
    """On a GPU ``inline`` is timed compiled by inductor; made the fastest, every bank runs it from
    the lowered graph, which matches the model as it came within bf16's rounding."""
    from sparsec.passes import experts_fx

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # inductor's kernels run on the GPU
    monkeypatch.setattr(experts_fx, "_other_device", lambda fingerprint, x: None)
    timed = experts_fx._time_each

    def inline_fastest(calls, device, graph_replay, failed=None):
        out = timed(calls, device, graph_replay, failed)
        if "inline" in out:
            assert out["inline"] > 0
            out["inline"] = 1e-3
        return out

    monkeypatch.setattr(experts_fx, "_time_each", inline_fastest)
    model = mixtral().to("cuda", torch.bfloat16)
    x = ids(0).cuda()
    with torch.no_grad():
        reference = model(x).logits.float()
    use_sparsec_experts(model)
    card = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    result = sparsec.optimize(model, (x,), calibration=[(ids(s).cuda(),) for s in (1, 2)], fingerprint=card,
                              plan=DENSE, output="logits")
    banks = result.report.to_dict()["experts"]
    assert len(banks) == 2 and all(b["implementation"] == "inline" for b in banks)
    with torch.no_grad():
        y = result.module(x).logits.float()
    err = float((y - reference).norm() / reference.norm())
    assert err < 2e-2, f"relative error {err:.2e}"  # bf16: a few 1e-3 a product, two blocks


def test_a_graph_whose_inlined_banks_do_not_compile_compiles_as_traced_and_says_so():
    """The dense fallback must compile whatever went wrong before it: inlining that fails leaves the
    banks inside the op (which computes the same), with a warning naming the failure."""
    from sparsec.passes import experts_fx
    from sparsec.passes.fx_frontend import compile_inlined

    gm, banks = recorded_banks(ids(0))
    banks[0].node.args = (*banks[0].node.args[:5], "inline")
    gm.recompile()
    tried = []

    def compile(g):
        tried.append(any(experts_fx.is_experts_op(n) for n in g.graph.nodes))
        if not tried[-1]:
            raise RuntimeError("no grouped GEMM for this dtype\nmore")
        return g

    with pytest.warns(UserWarning, match=r"did not compile \(RuntimeError: no grouped GEMM for this dtype\)"):
        assert compile_inlined(gm, compile) is gm
    assert tried == [False, True]
    assert compile_inlined(recorded_banks(ids(0))[0], lambda g: "compiled") == "compiled"
