"""Real architectures (transformers, built from small configs with random weights) keep compiling:
no fallback, outputs within the budget, calibration of other batch sizes and lengths."""

from __future__ import annotations

import warnings

import pytest
import torch

import sparsec
from sparsec.backend import FallbackWarning

transformers = pytest.importorskip("transformers")

BUDGET = 0.05


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    return transformers.BertModel(config), lambda b, t: (torch.randint(0, 100, (b, t)),)


def gpt2():
    config = transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config), lambda b, t: (torch.randint(0, 100, (b, t)),)


def llama():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config), lambda b, t: (torch.randint(0, 100, (b, t)),)


def vit():
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128)
    return transformers.ViTModel(config), lambda b, t: (torch.randn(b, 3, 32, 32),)


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return next(t for t in out if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("build", [bert, gpt2, llama, vit], ids=lambda f: f.__name__)
def test_optimize_plans_and_runs_a_real_architecture_without_falling_back(build):
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    example = inputs(1, 16)
    # other batch sizes and lengths than the example's; held-out data binds the budget on new inputs too
    calibration = [inputs(4, 32), inputs(4, 32), inputs(2, 8)]
    heldout = [inputs(2, 24)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sparsec.optimize(model, example, fingerprint="cpu", error_budget=BUDGET, calibration=calibration,
                                  heldout=heldout)
        with torch.no_grad():
            x = inputs(1, 16)
            y, ref = first_tensor(result.module(*x)), first_tensor(model(*x))
    assert not [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    report = result.report.to_dict()
    assert report["layers"] and "fallbacks" not in report
    assert float((y - ref).norm() / ref.norm()) <= 3 * BUDGET  # a new input: calibration error bounds it loosely


@pytest.mark.parametrize("build", [bert, llama], ids=lambda f: f.__name__)
def test_torch_compile_runs_a_real_architecture_without_falling_back(build):
    torch.manual_seed(1)
    model, inputs = build()
    model.eval()
    x = inputs(2, 16)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        y = first_tensor(torch.compile(model, backend="sparsec", options={"fingerprint": "cpu",
                                                                          "error_budget": BUDGET})(*x))
        ref = first_tensor(model(*x))
    assert not [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert float((y - ref).norm() / ref.norm()) <= 1.5 * BUDGET


def test_a_language_model_planned_at_one_token_generates_through_the_rewritten_graph(monkeypatch):
    # plan for decoding (one token, calibrated on whole prompts), then the model's own generation loop
    # on the result: every step goes through the rewritten graph
    import sparsec.api

    calls = []
    original_entry = sparsec.api._compiled_entry

    def counted(model, backend):
        entry = original_entry(model, backend)
        return lambda *a, **k: calls.append(1) or entry(*a, **k)

    monkeypatch.setattr(sparsec.api, "_compiled_entry", counted)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    prompts = [{"input_ids": torch.randint(0, 128, (2, 48))} for _ in range(3)]
    ids = torch.randint(0, 128, (1, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        result = sparsec.optimize(model, {"input_ids": ids[:, :1]}, calibration=prompts, fingerprint="cpu",
                                  metric="kl", error_budget=BUDGET, formats=["lowrank"])
        assert {layer["tokens"] for layer in result.report.layers} == {1}  # priced at one token a step
        before = len(calls)
        with torch.no_grad():
            out = result.module.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 15) and torch.equal(out[:, :9], ids)
    assert len(calls) - before == 6  # the prompt, then five one-token steps, each through the rewritten graph
    assert any(layer["format"] != "dense" for layer in result.report.layers)
    assert result.module.config is model.config and result.module.device == model.device


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    p, q = torch.log_softmax(reference.double(), -1), torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_the_metric_reads_the_logits_a_language_model_returns_first_not_its_graphs_first_output():
    # Dynamo's graph of a transformers causal LM lists the updated key/value cache before the logits;
    # a metric read off the first of those measured a cache tensor (KL 0.0 with every layer rewritten)
    model = _tiny_llama()
    calls = [{"input_ids": torch.randint(0, 128, (2, 48))} for _ in range(3)]
    result = sparsec.optimize(model, calls[0], calibration=calls, fingerprint="cpu", metric="kl",
                              error_budget=BUDGET, formats=["lowrank"], recovery="none")
    assert any(layer["format"] != "dense" for layer in result.report.layers)
    with torch.no_grad():
        by_hand = sum(_kl(model(**c).logits, result.module(**c).logits) for c in calls) / len(calls)
    measured = result.report.end_to_end["measured_error"]
    assert by_hand > 1e-4 and measured == pytest.approx(by_hand, rel=0.05), (measured, by_hand)


@pytest.mark.parametrize("output, warned", [(None, True), (4, False)])
def test_torch_compile_says_which_output_the_metric_reads_where_it_cannot_know_the_models_first(tmp_path, output,
                                                                                                warned):
    import json

    report = tmp_path / "report.json"
    options = {"fingerprint": "cpu", "metric": "kl", "error_budget": BUDGET, "formats": ["lowrank"],
               "report": str(report), "recovery": "none", "output": output}
    with torch.no_grad():
        torch.compile(_tiny_llama(), backend="sparsec", options=options)(torch.randint(0, 128, (2, 48)))
    lines = [w for w in json.loads(report.read_text())["warnings"] if "reads this graph's first float output" in w]
    assert bool(lines) == warned
    if warned:
        assert "4: (2, 48, 128)" in lines[0] and "option output=<index>" in lines[0]
