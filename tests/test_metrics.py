"""The metric option: each built-in metric's value, user functions, the output it reads, and the
planner budgeting in the chosen metric on both entries."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.errors import OptionError
from sparsec.metrics import MetricSum, metric_of
from sparsec.options import parse_options


def value(name, outs, refs, output=None):
    total = MetricSum(metric_of(name), output)
    for o, r in zip(outs, refs):
        total.add(o, r)
    return total.value()


def test_cosine_is_one_minus_the_mean_row_cosine():
    ref = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out = torch.tensor([[0.0, 3.0], [0.0, 5.0]])  # row 0 orthogonal (cos 0), row 1 parallel (cos 1)
    assert value("cosine", [[out]], [[ref]]) == pytest.approx(0.5)
    assert value("cosine", [[ref.numpy()]], [[ref.numpy()]]) == pytest.approx(0.0, abs=1e-12)


def test_kl_is_the_mean_divergence_of_the_softmax_in_nats():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))  # logits whose softmax is p
    out = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64))
    by_hand = (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)) / 2  # second row identical
    assert value("kl", [[out]], [[ref]]) == pytest.approx(by_hand, rel=1e-9)


def test_kl_over_chunks_of_rows_equals_kl_over_all_rows_at_once(monkeypatch):
    """On the CPU KL runs a few rows at a time (cache-sized); the rows' sum is the same, whatever the
    chunk and a last one shorter than the others."""
    from sparsec import metrics

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    out = torch.randn(3, 7, 50, generator=gen) * 3
    ref = out + 0.3 * torch.randn(3, 7, 50, generator=gen)
    p = torch.log_softmax(ref.double(), -1)
    expected = float((p.exp() * (p - torch.log_softmax(out.double(), -1))).sum())
    for values in (50, 200, 1 << 17):  # one row, four rows (21 = 5 x 4 + 1), all 21 at once
        monkeypatch.setattr(metrics, "CHUNK_VALUES", values)
        total, count = metric_of("kl").call(out, ref)
        assert count == 21.0 and total == pytest.approx(expected, rel=1e-5)  # float32 softmax
    assert len(metrics._cache_sized(torch.zeros(5, 50))) == 1
    monkeypatch.setattr(metrics, "CHUNK_VALUES", 100)
    assert [(s.start, s.stop) for s in metrics._cache_sized(torch.zeros(5, 50))] == [(0, 2), (2, 4), (4, 6)]
    # off the CPU all rows at once, none included (a device's empty batch)
    assert [(s.start, s.stop) for s in metrics._cache_sized(torch.zeros(5, 50, device="meta"))] == [(0, 5)]
    assert metrics._cache_sized(torch.zeros(0, 50, device="meta")) == [slice(0, 0)]


def test_top1_counts_positions_whose_argmax_changed_over_all_calls():
    ref = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    out = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    assert value("top1", [[out], [ref]], [[ref], [ref]]) == pytest.approx(0.25)


def test_rel_l2_takes_the_worst_output_unless_one_is_named():
    ref = [torch.ones(4), torch.ones(4)]
    out = [torch.ones(4) * 1.1, torch.ones(4) * 1.5]
    assert value("rel_l2", [out], [ref]) == pytest.approx(0.5)
    assert value("rel_l2", [out], [ref], output=0) == pytest.approx(0.1)
    with pytest.raises(OptionError, match="output' is 2, but the graph has 2 float output"):
        value("cosine", [out], [ref], output=2)


def test_a_user_function_is_averaged_over_calls_and_must_return_a_non_negative_number():
    def max_abs(o, r):
        return float((o - r).abs().max())

    assert value(max_abs, [[torch.zeros(3)], [torch.ones(3)]], [[torch.zeros(3)], [torch.zeros(3)]]) == 0.5
    with pytest.raises(OptionError, match="returned -1.0; it must return a finite, non-negative number"):
        value(lambda o, r: -1.0, [[torch.zeros(3)]], [[torch.zeros(3)]])
    with pytest.raises(OptionError, match="failed on an output of shape \\(3,\\): ZeroDivisionError"):
        value(lambda o, r: 1 / 0, [[torch.zeros(3)]], [[torch.zeros(3)]])


@pytest.mark.parametrize("name", ["rel_l2", "cosine", "kl"])
def test_a_metrics_differentiable_stand_in_is_the_metric_itself_where_it_has_a_gradient(name):
    from sparsec.metrics import loss_of

    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(3, 6, 10, generator=gen)
    out = (ref + 0.3 * torch.randn(3, 6, 10, generator=gen)).requires_grad_(True)
    loss = loss_of(metric_of(name), [out], [ref])
    (grad,) = torch.autograd.grad(loss, out)
    assert float(grad.abs().sum()) > 0
    metric = value(name, [[out.detach()]], [[ref]])
    # rel_l2's stand-in is its square: a smooth objective with the same minimiser
    assert float(loss.detach()) == pytest.approx(metric ** 2 if name == "rel_l2" else metric, rel=1e-5)
    assert float(loss_of(metric_of(name), [ref], [ref])) == pytest.approx(0.0, abs=1e-6)


def test_metrics_without_a_gradient_descend_a_stand_in_that_has_one():
    from sparsec.metrics import kl_loss, loss_of

    gen = torch.Generator().manual_seed(6)
    ref, out = torch.randn(8, 12, generator=gen), torch.randn(8, 12, generator=gen)
    # top-1 agreement is piecewise constant: the logits' KL stands in for it
    assert float(loss_of(metric_of("top1"), [out], [ref])) == pytest.approx(float(kl_loss(out, ref)))
    # a user's function may not be differentiable at all: the relative squared error of its output
    user = loss_of(metric_of(lambda o, r: 0.0), [out], [ref])
    assert float(user) == pytest.approx(float(((out - ref) ** 2).sum() / (ref ** 2).sum()), rel=1e-6)
    # rel_l2 without a named output weighs every output, as its value takes the worst of them
    both = loss_of(metric_of("rel_l2"), [out, 2 * out], [ref, ref])
    assert float(both) > float(loss_of(metric_of("rel_l2"), [out, 2 * out], [ref, ref], output=0))


def test_the_options_refuse_unknown_metrics_and_outputs_and_scale_the_budget_to_the_metric():
    with pytest.raises(OptionError, match="unknown metric 'cos'; use one of rel_l2, cosine, kl, top1"):
        parse_options({"metric": "cos"})
    with pytest.raises(OptionError, match="option 'metric' must be one of"):
        parse_options({"metric": 3})
    with pytest.raises(OptionError, match="option 'output' must name an output"):
        parse_options({"output": -1})
    assert parse_options({"metric": "kl", "error_budget": 2.0}).error_budget == 2.0  # nats: not a fraction
    assert parse_options({"formats": None, "metric": None}).metric.name == "rel_l2"  # None: the defaults
    with pytest.raises(OptionError, match=r"\[0, 1\)"):
        parse_options({"metric": "cosine", "error_budget": 1.5})


@pytest.mark.parametrize("name", ["cosine", "kl"])
def test_the_planner_works_on_the_square_root_of_a_quadratic_metric(name):
    m = metric_of(name)
    assert m.order == 2 and m.from_error(m.to_error(0.04)) == pytest.approx(0.04)
    assert m.to_error(0.04) == pytest.approx(0.2)


class TwoHeads(nn.Module):
    """An encoder whose weights are rank 8 plus 3% noise, returning a hidden state and class logits."""

    def __init__(self, d=128, classes=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body, self.head = nn.Linear(d, d, bias=False), nn.Linear(d, classes)
        with torch.no_grad():
            low = torch.randn(d, 8, generator=g) @ torch.randn(8, d, generator=g) / math.sqrt(8 * d)
            self.body.weight.copy_(low + 0.03 * low.norm() / d * torch.randn(d, d, generator=g))

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"hidden": h, "logits": self.head(h)}


def calibration(seed, n=4, rows=256, d=128):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, d, generator=g),) for _ in range(n)]


def test_a_metric_on_a_named_output_is_what_the_report_measures_and_bounds(scenario_fp):
    model = TwoHeads()
    calib = calibration(1)
    result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=scenario_fp(), formats=["lowrank"],
                              metric="cosine", output="hidden", error_budget=0.02)
    e2e = result.report.end_to_end
    assert e2e["metric"] == "cosine"
    with torch.no_grad():
        outs = [[result.module(*item)["hidden"]] for item in calib]
        refs = [[model(*item)["hidden"]] for item in calib]
    measured = value("cosine", outs, refs)
    assert e2e["measured_error"] == pytest.approx(measured, rel=1e-3, abs=1e-7) and measured <= 0.02


def test_a_looser_metric_buys_a_rewrite_the_raw_output_budget_refuses(scenario_fp):
    """About 3% relative error of the output is over a 1% rel_l2 budget, but its cosine cost
    (about half its square) is well within a 1% cosine budget."""
    model = TwoHeads()
    calib = calibration(2)
    formats = {}
    for metric in ("rel_l2", "cosine"):
        result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=scenario_fp(), lower=False,
                                  formats=["lowrank"], metric=metric, output="hidden", error_budget=0.01)
        formats[metric] = {l["name"]: l["format"] for l in result.report.layers}
    body = next(n for n in formats["rel_l2"] if "body" in n)
    assert formats["rel_l2"][body] == "dense"
    assert formats["cosine"][body].startswith("lowrank:")


def test_an_output_name_the_model_does_not_return_is_refused_with_the_names_it_has(scenario_fp):
    with pytest.raises(OptionError, match="no float tensor by that name; its named float outputs: 'hidden', 'logits'"):
        sparsec.optimize(TwoHeads(), calibration(3)[0], fingerprint=scenario_fp(), metric="kl", output="logit")


def test_under_torch_compile_an_output_name_is_refused_saying_to_give_an_index(scenario_fp):
    model = TwoHeads()
    compiled = torch.compile(model, backend="sparsec",
                             options={"fingerprint": scenario_fp(), "metric": "kl", "output": "logits", "strict": True})
    with pytest.raises(Exception, match="give the output's index"):
        compiled(torch.randn(64, 128))


def test_the_onnx_entry_budgets_in_the_metric_of_the_output_named(tmp_path):
    onnx = pytest.importorskip("onnx")
    from sparsec.onnx_entry import optimize_onnx

    model = TwoHeads()
    x = calibration(4, n=1)[0][0]
    path = tmp_path / "two_heads.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["hidden", "logits"],
                      dynamic_axes={"x": {0: "rows"}}, opset_version=17, dynamo=False)
    np.savez(tmp_path / "calib.npz", x=np.stack([c[0].numpy() for c in calibration(5, n=4)]))
    result = optimize_onnx(path, tmp_path / "out.onnx", calibration=tmp_path / "calib.npz", formats=["lowrank"],
                           metric="top1", metric_output="logits", error_budget=0.05)
    e2e = result.report.to_dict()["end_to_end"]
    assert e2e["metric"] == "top1" and e2e["measured_error"] <= 0.05
    with pytest.raises(OptionError, match="--output names 'logit', which is not an output"):
        optimize_onnx(path, tmp_path / "bad.onnx", calibration=tmp_path / "calib.npz", metric="kl",
                      metric_output="logit")
    assert onnx.load(str(tmp_path / "out.onnx")).graph.output[1].name == "logits"


def test_an_llm_is_budgeted_in_kl_of_its_logits_found_by_name(scenario_fp):
    """A transformers causal LM returns a ModelOutput: 'logits' is found among the graph's outputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    calib = [(torch.randint(0, 100, (2, 16)),) for _ in range(3)]
    result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=scenario_fp(), formats=["lowrank"],
                              metric="kl", output="logits", error_budget=0.01)
    e2e = result.report.end_to_end
    assert e2e["metric"] == "kl" and not result.report.to_dict().get("fallbacks")
    with torch.no_grad():
        outs = [[result.module(*c).logits] for c in calib]
        refs = [[model(*c).logits] for c in calib]
    measured = value("kl", outs, refs)
    assert e2e["measured_error"] == pytest.approx(measured, rel=1e-3, abs=1e-9) and measured <= 0.01
