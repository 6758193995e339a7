"""Calibration and held-out inputs of any batch and length the model accepts, though Dynamo
specialises the planned graph to the example's shapes (a reshape to a fixed batch)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import sparsec
from sparsec.backend import FallbackWarning


class Heads(nn.Module):
    """Attention whose reshapes read the batch and length: traced, they become constants."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, T, D))


def thin_warnings(report) -> list[str]:  # noqa: D103
    return [w for w in report.to_dict()["warnings"] if "too few to weight a fit by" in w]


def test_optimize_calibrates_on_inputs_of_other_batch_and_length(scenario_fp):
    torch.manual_seed(0)
    model = Heads().eval()
    example = torch.randn(1, 4, 64)  # 4 rows for 64 inputs: alone, too few to fit by
    alone = sparsec.optimize(model, (example,), fingerprint=scenario_fp(), lower=False)
    assert thin_warnings(alone.report)
    calibration = [(torch.randn(4, 32, 64),), (torch.randn(2, 8, 64),)]
    heldout = [(torch.randn(3, 5, 64),)]
    result = sparsec.optimize(model, (example,), fingerprint=scenario_fp(), calibration=calibration,
                              heldout=heldout, error_budget=0.05)
    report = result.report.to_dict()
    assert not thin_warnings(result.report) and "fallbacks" not in report  # 144 calibration rows were used
    assert report["end_to_end"]["heldout_error"] is not None
    assert [l["tokens"] for l in report["layers"]] == [4, 4]  # priced at the example's (deployment) shape
    with torch.no_grad():
        for x in (example, calibration[0][0], heldout[0][0]):
            y, ref = result.module(x), model(x)
            assert float((y - ref).norm() / ref.norm()) <= 0.05 * 1.5


def test_torch_compile_names_the_shape_its_graph_needs_and_stays_dense(scenario_fp):
    torch.manual_seed(1)
    model, x = Heads().eval(), torch.randn(1, 16, 64)
    options = {"fingerprint": scenario_fp(), "calibration": [(torch.randn(4, 32, 64),)]}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        y = torch.compile(model, backend="sparsec", options=options)(x)
    torch.testing.assert_close(y, model(x))
    [message] = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    assert "calibration item 0, input x has shape (4, 32, 64), but this graph was traced for (1, 16, 64)" in message
    assert "sparsec.optimize" in message  # what to do
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"traced for \(1, 16, 64\)"):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend="sparsec", options=dict(options, strict=True))(x)


def test_torch_compile_with_dynamic_shapes_takes_inputs_of_other_sizes_where_dynamic(scenario_fp):
    torch.manual_seed(2)
    model, x = Heads().eval(), torch.randn(2, 16, 64)
    options = {"fingerprint": scenario_fp(), "calibration": [(torch.randn(2, 40, 64),), (torch.randn(2, 8, 64),)]}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.compile(model, backend="sparsec", options=options, dynamic=True)(x)
    assert not [w for w in caught if issubclass(w.category, FallbackWarning)]


def test_a_real_llama_calibrates_on_batches_of_other_shapes():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    example = torch.randint(0, 96, (1, 16))
    calibration = [(torch.randint(0, 96, (4, 32)),), (torch.randint(0, 96, (2, 8)),)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sparsec.optimize(model, (example,), fingerprint="cpu", calibration=calibration,
                                  error_budget=0.05, lower=False)
    assert not [w for w in caught if issubclass(w.category, FallbackWarning)]
    report = result.report.to_dict()
    assert "fallbacks" not in report and len(report["layers"]) == 2 * 7 + 1
    assert all(l["tokens"] == 16 for l in report["layers"])
