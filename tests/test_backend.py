"""The torch.compile backend: registration, real models, graph breaks, reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsec.backend import sparsec_backend


def test_backend_is_registered_without_importing_sparsec():
    code = "import torch._dynamo as d, sys; print('sparsec' in d.list_backends()); print('sparsec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]


class Block(nn.Module):
    """A pre-norm transformer block: fused qkv, attention between activations, MLP."""

    def __init__(self, d=128, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def test_transformer_block_compiles_and_matches(scenario_fp):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 32, 128)
    options = {"fingerprint": scenario_fp(), "error_budget": 0.02, "formats": ["lowrank", "2:4"]}
    compiled = torch.compile(model, backend="sparsec", options=options)
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    assert float((y - ref).norm() / ref.norm()) <= 0.02 * 1.05
    from sparsec.backend import session_for

    report = session_for(options, None).report
    names = [l["name"] for l in report.layers]
    assert names == ["qkv", "proj", "fc1", "fc2"]
    assert all(l["tokens"] == 128 and l["shape"][1] in (128, 512) for l in report.layers)
    # attention products have no constant weight: left alone, and said so
    skipped = report.to_dict()["skipped"]
    assert skipped and all("no constant weight" in s["reason"] for s in skipped)


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_break_subgraphs_are_each_planned_into_one_report(scenario_fp, tmp_path):
    torch.manual_seed(1)
    model = Broken()
    x = torch.randn(256, 64)
    path = tmp_path / "report.json"
    options = {"fingerprint": scenario_fp(), "report": str(path), "error_budget": 0.05, "formats": ["lowrank"]}
    compiled = torch.compile(model, backend="sparsec", options=options)
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    assert float((y - ref).norm() / ref.norm()) < 0.1  # two layers, each within the 5% budget
    data = json.loads(path.read_text())
    assert [(l["name"], l["graph"]) for l in data["layers"]] == [("a", 0), ("b", 1)]
    # the second subgraph only gets what the first left: the combined error stays within budget
    assert data["error_budget"] == 0.05
    assert data["end_to_end"]["measured_error"] <= 0.05 + 1e-9


class Ops(nn.Module):
    """Every spelling of a linear layer the capture must recognise."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 48) / 7)  # used as x @ w1 (K x N)
        self.w2 = nn.Parameter(torch.randn(40, 32) / 6)  # used as addmm(b2, x, w2.t())
        self.b2 = nn.Parameter(torch.randn(40))
        self.w3 = nn.Parameter(torch.randn(40, 40) / 6)  # used as torch.mm(x, w3.T)
        self.w4 = nn.Parameter(torch.randn(24, 40) / 6)  # used as F.linear without bias

    def forward(self, x):
        h = torch.matmul(x, self.w1.T.T[:32])
        h = torch.addmm(self.b2, h[:, :32], self.w2.t())
        h = torch.mm(h, self.w3.T)
        return F.linear(h, self.w4)


def test_every_linear_spelling_is_captured_with_its_weight_orientation(scenario_fp):
    torch.manual_seed(2)
    model = Ops()
    x = torch.randn(16, 32)
    options = {"fingerprint": scenario_fp(), "error_budget": 0.0, "plan": {"layers": {"_default": "lowrank:8"}}}
    compiled = torch.compile(model, backend="sparsec", options=options)
    with torch.no_grad():
        compiled(x)
    from sparsec.backend import session_for

    report = session_for(options, None).report
    got = {l["name"]: (l["op"], l["shape"]) for l in report.layers}
    assert got == {
        "w1": ("matmul", [48, 32]),
        "w2": ("addmm", [40, 32]),
        "w3": ("mm", [40, 40]),
        "w4": ("linear", [24, 40]),
    }


class Einsums(nn.Module):
    """Linear layers written as einsums, each weight of exact rank 8, and one einsum that is not a
    linear layer (its output's letters reordered)."""

    def __init__(self):
        super().__init__()
        def planted(n, k):
            return torch.randn(n, 8) @ torch.randn(8, k) / 8
        self.a = nn.Parameter(planted(48, 32))               # (N, K)
        self.b = nn.Parameter(planted(40, 48).T.contiguous())  # (K, N)
        self.c = nn.Parameter(planted(40, 40))
        self.d = nn.Parameter(planted(24, 40))

    def forward(self, x):
        h = torch.einsum("bsk,nk->bsn", x, self.a)
        h = torch.einsum("...k,kn->...n", h, self.b)
        h = torch.einsum("nk,bsk->bsn", self.c, h)
        return torch.einsum("bsk,nk->bns", h, self.d)


def test_an_einsum_that_is_a_linear_layer_is_planned_and_others_are_skipped_saying_why():
    torch.manual_seed(3)
    model = Einsums().eval()
    x = torch.randn(2, 8, 32)
    options = {"fingerprint": "cpu", "plan": {"layers": {"_default": "lowrank:8"}}, "recovery": "none",
               "strict": True}
    with torch.no_grad():
        y = torch.compile(model, backend="sparsec", options=options)(x)
        ref = model(x)
    from sparsec.backend import session_for

    report = session_for(options, None).report
    assert {l["name"]: (l["op"], l["shape"], l["format"]) for l in report.layers} == {
        "a": ("einsum", [48, 32], "lowrank:8"), "b": ("einsum", [40, 48], "lowrank:8"),
        "c": ("einsum", [40, 40], "lowrank:8")}
    (skipped,) = report.to_dict()["skipped"]
    assert skipped["name"] == "d" and "only where it is a linear layer" in skipped["reason"]
    assert float((y - ref).norm() / ref.norm()) < 1e-4  # rank 8 kept exactly: lossless


def test_backend_called_directly_returns_callable_matching_graph(scenario_fp):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)))
    x = torch.randn(10, 16)
    fn = sparsec_backend(gm, [x], options={"fingerprint": scenario_fp(), "error_budget": 0.0})
    assert torch.allclose(fn(x), gm(x))


class DecayingBroken(nn.Module):
    """Two layers with smoothly decaying singular values, split by a graph break."""

    def __init__(self, d=128):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for lin in (self.a, self.b):
                U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
                V, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
                lin.weight.copy_((U * torch.exp(-torch.arange(d, dtype=torch.float32) / 6.0)) @ V.T)

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_later_subgraphs_get_only_the_budget_earlier_ones_left(scenario_fp):
    torch.manual_seed(3)
    model = DecayingBroken()
    x = torch.randn(1024, 128)
    options = {"fingerprint": scenario_fp(), "error_budget": 0.05, "formats": ["lowrank"]}
    compiled = torch.compile(model, backend="sparsec", options=options)
    with torch.no_grad():
        y, ref = compiled(x), model(x)
    from sparsec.backend import session_for

    report = session_for(options, None).report.to_dict()
    assert [l["format"].split(":")[0] for l in report["layers"]] == ["lowrank", "lowrank"]
    first = report["layers"][0]["measured_error"]
    left = (0.05 ** 2 - first ** 2) ** 0.5
    assert any(f"within the {left:.3%} of the error budget" in w for w in report["warnings"])
    assert report["end_to_end"]["measured_error"] <= 0.05
    assert float((y - ref).norm() / ref.norm()) <= 0.05


def test_the_planner_log_of_every_subgraph_survives_the_merge(scenario_fp):
    model = DecayingBroken()
    options = {"fingerprint": scenario_fp(), "error_budget": 0.05, "formats": ["lowrank"]}
    with torch.no_grad():
        torch.compile(model, backend="sparsec", options=options)(torch.randn(1024, 128))
    from sparsec.backend import session_for

    log = session_for(options, None).report.to_dict()["planner_log"]
    assert any(line.startswith("graph 0: ") for line in log) and any(line.startswith("graph 1: ") for line in log)


def test_rewritten_graph_keeps_weights_static_for_cuda_graphs(monkeypatch):
    """CUDA-graph replay copies every input it does not know to be static; the weights must be.

    The rewritten graph is a copy of Dynamo's; if it lost Dynamo's metadata, AOTAutograd would
    mark no input static and every replay would copy all weights (dense and packed) first.
    """
    import torch._inductor.compile_fx as compile_fx

    from sparsec.passes.fx_frontend import FxFrontend

    monkeypatch.setattr(FxFrontend, "_use_inductor", lambda self: True)
    seen = []
    original = compile_fx.get_static_input_idxs
    monkeypatch.setattr(compile_fx, "get_static_input_idxs", lambda n: seen.append((n, list(original(n)))) or seen[-1][1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    x = torch.randn(16, 128)
    options = {"plan": {"layers": {"0": "lowrank:32"}}, "fingerprint": "cpu"}
    # the configs' own patch (monkeypatch's undo deletes a config entry it did not see in the
    # module's __dict__, which breaks every later compile in the process)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), torch.no_grad():
        y = torch.compile(model, backend="sparsec", options=options)(x)
    from sparsec.backend import session_for

    assert [l["format"] for l in session_for(options, None).report.layers] == ["lowrank:32", "dense"]
    assert torch.isfinite(y).all() and y.shape == (16, 128)
    (num_packed, static), = seen
    # lifted packed buffers (2 factors + bias) then Dynamo's inputs: 4 parameters and x
    assert num_packed == 3
    assert len(static) == 3 + 4 and set(range(3)) <= set(static)


def test_a_recompile_for_new_shapes_reuses_the_plan_and_packed_layers(monkeypatch):
    import sparsec.pipeline

    calls = []
    original = sparsec.pipeline.optimize_graph
    monkeypatch.setattr(sparsec.pipeline, "optimize_graph", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(128, 16) @ torch.randn(16, 128) / 8)  # planted rank 16
    options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01}
    compiled = torch.compile(model, backend="sparsec", options=options, dynamic=False)
    from sparsec.backend import session_for

    with torch.no_grad():
        for M in (256, 5, 300):
            x = torch.randn(M, 128)
            y, ref = compiled(x), model(x)
            assert float((y - ref).norm() / ref.norm()) < 1e-4
    report = session_for(options, None).report
    assert len(calls) == 1  # planned once, lowered three times
    # which rank the fingerprint prices fastest is its business; the planted layer is low rank, the other not
    assert [(l["name"], l["format"].split(":")[0]) for l in report.layers] == [("0", "lowrank"), ("2", "dense")]


@pytest.mark.parametrize("dynamic, M", [(False, 1), (None, 1), (None, 5)])
def test_a_recompile_where_the_plan_is_predicted_slower_runs_those_layers_dense_or_says_so(scenario_fp, tmp_path,
                                                                                          dynamic, M):
    # low rank pays a launch of 100 us more here: faster than dense at 128 tokens, slower at a few (a
    # generation loop's prompt, then its one-token steps). A static recompile runs both layers dense, on
    # the model's weights (Dynamo never makes a dimension of size 1 dynamic); a dynamic one (Dynamo's
    # second shape otherwise) keeps the plan and says so
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(torch.randn(256, 16) @ torch.randn(16, 256) / 16 + 0.002 * torch.randn(256, 256))
    report = tmp_path / "report.json"
    options = {"fingerprint": scenario_fp(name="launchy", launches={"lowrank": 100.0}), "formats": ["lowrank"],
               "error_budget": 0.05, "report": str(report)}
    compiled = torch.compile(model, backend="sparsec", options=options, dynamic=dynamic)
    with torch.no_grad():
        x = torch.randn(128, 256)
        assert not torch.equal(compiled(x), model(x))  # planned: both layers low rank, lossy
        few = torch.randn(M, 256)
        y, ref = compiled(few), model(few)
    saved = json.loads(report.read_text())
    assert [l["format"].split(":")[0] for l in saved["layers"]] == ["lowrank", "lowrank"]
    lines = [w for w in saved["warnings"] if f"recompiled for {M} token(s), planned at 128" in w]
    assert [w.split(":")[0] for w in lines] == ["0", "2"]
    entries = saved["recompiles"]
    assert [(e["layers"], e["tokens"], e["planned_tokens"]) for e in entries] == [(["0"], M, [128]), (["2"], M, [128])]
    assert all(e["predicted_speedup"] < 1.0 and e["fingerprint"] == "launchy" for e in entries)
    if M == 1 or dynamic is False:
        assert torch.equal(y, ref)  # both run dense: the model's own arithmetic
        assert all("runs it dense" in w for w in lines), lines
        assert [e["runs"] for e in entries] == ["dense", "dense"]
    else:
        assert not torch.equal(y, ref) and float((y - ref).norm() / ref.norm()) < 0.05
        assert all("keeps it as planned" in w for w in lines), lines
        assert [(e["runs"], e["dynamic"]) for e in entries] == [("as planned", True)] * 2


def test_a_recompile_where_the_plan_still_pays_keeps_it_without_a_word(scenario_fp, tmp_path):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(256, 16) @ torch.randn(16, 256) / 16 + 0.002 * torch.randn(256, 256))
    report = tmp_path / "report.json"
    options = {"fingerprint": scenario_fp(), "formats": ["lowrank"], "error_budget": 0.05, "report": str(report)}
    compiled = torch.compile(model, backend="sparsec", options=options, dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(128, 256))
        one = torch.randn(1, 256)
        assert not torch.equal(compiled(one), model(one))  # still low rank at one token
    saved = json.loads(report.read_text())
    assert not [w for w in saved["warnings"] if "recompiled" in w] and "recompiles" not in saved


def test_options_shared_by_another_model_with_the_same_layer_names_plan_it_afresh():
    torch.manual_seed(2)
    first = nn.Sequential(nn.Linear(128, 128)).eval()
    second = nn.Sequential(nn.Linear(128, 128)).eval()
    with torch.no_grad():
        first[0].weight.copy_(torch.randn(128, 16) @ torch.randn(16, 128) / 8)
    options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01}
    x = torch.randn(256, 128)
    with torch.no_grad():
        torch.compile(first, backend="sparsec", options=options)(x)
        y = torch.compile(second, backend="sparsec", options=options)(x)
        assert torch.allclose(y, second(x), atol=1e-5)  # not first's packed layer under the same name


def test_a_dynamic_recompile_is_not_specialised_back_to_one_size(monkeypatch):
    # Dynamo marks the batch dimension dynamic after a second size; reading the traced size with
    # int() would guard it to that size and recompile for every new one (up to its cache limit)
    from sparsec.backend import Session

    sizes = []
    original = Session.run_graph
    monkeypatch.setattr(Session, "run_graph", lambda self, gm, ex: sizes.append(len(ex)) or original(self, gm, ex))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8)
    options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01}
    compiled = torch.compile(model, backend="sparsec", options=options)
    with torch.no_grad():
        for M in (128, 5, 300, 17, 64):
            x = torch.randn(M, 64)
            y, ref = compiled(x), model(x)
            assert float((y - ref).norm() / ref.norm()) < 1e-4
    assert len(sizes) == 2  # the first size, then one dynamic graph for every other


class _ReadsItsSizes(nn.Module):
    """Reshapes by its input's sizes, so a dynamic graph takes them as symbolic size inputs."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(512, 1024), nn.Linear(1024, 512)

    def forward(self, x):
        b, t, _ = x.shape
        h = torch.relu(self.up(x.reshape(b * t, -1)))
        return self.down(h).view(b, t, -1)


def test_a_graph_dynamic_from_its_first_compile_is_calibrated_on_the_sizes_it_was_traced_with():
    # Dynamo hands such a graph its sizes as SymInts; running the graph on them to calibrate failed
    # deep inside aten ("SymIntArrayRef expected to contain only concrete integers") and fell back
    torch.manual_seed(5)
    model = _ReadsItsSizes().eval()
    with torch.no_grad():
        model.up.weight.copy_(torch.randn(1024, 8) @ torch.randn(8, 512) / 8)  # planted rank 8
    options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01, "strict": True}
    compiled = torch.compile(model, backend="sparsec", options=options, dynamic=True)
    from sparsec.backend import session_for

    with torch.no_grad():
        for b, t in ((2, 16), (3, 12), (1, 5)):
            x = torch.randn(b, t, 512)
            y, ref = compiled(x), model(x)
            assert y.shape == ref.shape and float((y - ref).norm() / ref.norm()) < 1e-4
    layers = session_for(options, None).report.layers
    assert [(l["name"], l["format"].split(":")[0]) for l in layers] == [("up", "lowrank"), ("down", "dense")]
    assert layers[0]["tokens"] == 32  # the rows it was traced with: 2 x 16


def test_compiling_with_autograd_on_warns_that_rewritten_weights_are_frozen():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.randn(512, 8) @ torch.randn(8, 512) / 8)
    options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01}
    x = torch.randn(128, 512)
    y = torch.compile(model, backend="sparsec", options=options)(x)
    y.sum().backward()  # the gradient reaches the dense first layer through the rewritten one
    assert model[0].weight.grad is not None and model[2].weight.grad is None
    from sparsec.backend import session_for

    report = session_for(options, None).report
    assert [l["format"].split(":")[0] for l in report.layers] == ["dense", "lowrank"]  # the rank: the fingerprint's call
    assert any("autograd on" in w and "'2'" not in w and "2 get no gradient" in w for w in report.to_dict()["warnings"])


def test_packed_layers_live_only_as_long_as_a_compiled_graph_holds_them():
    import gc

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(512, 512)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(512, 8) @ torch.randn(8, 512) / 8)
    options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01}
    compiled = torch.compile(model, backend="sparsec", options=options)
    with torch.no_grad():
        compiled(torch.randn(128, 512))
    from sparsec.backend import session_for

    refs = [b.module for b in session_for(options, None)._built.values() if b.module is not None]
    assert len(refs) == 1 and refs[0]() is not None
    del compiled
    torch._dynamo.reset()
    gc.collect()
    assert refs[0]() is None  # the session does not keep the packed weights (GPU memory) alive


def test_a_compiled_callable_that_takes_no_attributes_still_keeps_its_packed_layers():
    from sparsec.backend import _holding

    module = nn.Linear(2, 2)
    held = _holding(len, {"fc": module})  # a builtin: no attribute can be set on it
    assert held([1, 2, 3]) == 3 and held._sparsec_packed == (module,) and held._boxed_call is False
    fn = lambda *a: sum(a)  # noqa: E731
    assert _holding(fn, {"fc": module}) is fn and fn._sparsec_packed == (module,)


def test_the_last_compile_dynamo_allows_is_named():
    """Each instance with packed layers is guarded on its own weights and compiles its own graph;
    the compile that reaches Dynamo's per-function limit warns that the next instance runs dense."""
    class Net(nn.Module):  # a class of its own: its forward's compile count starts here
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(512, 512)
            with torch.no_grad():
                self.fc.weight.copy_(torch.randn(512, 8) @ torch.randn(8, 512) / 8)

        def forward(self, x):
            return self.fc(x)

    from sparsec.backend import session_for

    torch.manual_seed(7)
    x = torch.randn(128, 512)
    warned = []
    for _ in range(2):
        options = {"fingerprint": "cpu", "formats": ["lowrank"], "error_budget": 0.01}
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
            torch.compile(Net().eval(), backend="sparsec", options=options)(x)
        report = session_for(options, None).report
        assert [l["format"].split(":")[0] for l in report.layers] == ["lowrank"]
        warned.append([w for w in report.to_dict()["warnings"] if "recompile_limit = 2" in w])
    assert warned[0] == [] and len(warned[1]) == 1 and "will run eagerly, dense, without sparsec" in warned[1][0]


def test_dynamo_reset_drops_the_cuda_graphs_recorded_for_sparsec_graphs(monkeypatch):
    """torch._dynamo.reset() frees reduce-overhead graphs of sparsec-compiled models as it does
    inductor's: without the backend's reset their memory pools would outlive every model."""
    import torch._inductor.cudagraph_trees as trees

    calls = []
    monkeypatch.setattr(trees, "reset_cudagraph_trees", lambda: calls.append(1))
    compiled = torch.compile(nn.Linear(16, 16).eval(), backend="sparsec", options={"fingerprint": "cpu"})
    with torch.no_grad():
        compiled(torch.randn(4, 16))
    torch._dynamo.reset()
    assert calls, "torch._dynamo.reset() did not reach the sparsec backend's reset"


def test_sessions_are_bounded_so_old_calibration_data_is_let_go(monkeypatch):
    import gc
    import weakref

    from sparsec import backend

    monkeypatch.setattr(backend, "SESSIONS_KEPT", 3)
    monkeypatch.setattr(backend, "_SESSIONS", type(backend._SESSIONS)())
    first = torch.randn(8, 8)
    alive = weakref.ref(first)
    backend.session_for({"fingerprint": "cpu", "calibration": [(first,)]}, None)
    del first
    kept = [{"fingerprint": "cpu"} for _ in range(3)]
    sessions = [backend.session_for(options, None) for options in kept]
    gc.collect()
    assert alive() is None and len(backend._SESSIONS) == 3
    assert backend.session_for(kept[0], None) is sessions[0]  # the ones kept are found again


def test_under_torch_compile_a_head_tied_to_the_embedding_table_is_named_as_its_linear_layer():
    from test_api import TiedHead

    from sparsec.backend import session_for

    torch.manual_seed(7)
    options = {"fingerprint": "cpu", "plan": {"layers": {"_default": "dense"}}, "recovery": "none", "strict": True}
    with torch.no_grad():
        torch.compile(TiedHead().eval(), backend="sparsec", options=options)(torch.randint(0, 96, (4, 16)))
    assert [layer["name"] for layer in session_for(options, None).report.layers] == ["mix", "head"]
