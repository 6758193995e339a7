"""Build samples/tiny_encoder.onnx: a 2-layer BERT-style encoder, and calibration data for it.

Architecture (a real one, scaled down): token + position embeddings, LayerNorm, two post-norm
transformer layers (query/key/value/output projections, 3 heads of 64, GELU feed-forward of 768),
then a BERT pooler (tanh on the first token) and a 4-way classifier. Input ``input_ids`` [1, 128]
(int64, ids < 512); outputs ``last_hidden_state`` [1, 128, 192] and ``logits`` [1, 4]. The
projections on [1, 128, 192] export as MatMul + Add, the pooler and classifier on [1, 192] as
Gemm with transB=1: both kinds sparsec captures.

The weights are random, at scales where every branch matters (``STD``), except the feed-forward
layers, which carry *planted structure* so that the sample shows what a compressible layer looks
like to sparsec: layer 0's feed-forward weights are rank 24 and layer 1's are Monarch-structured (8
blocks), each plus 0.3% random noise. Attention and pooler weights are full rank and should stay
dense. A trained model's layers are rarely this compressible; this is a demonstration, not a
claim about trained weights.

Data: ``tiny_encoder_calib.npz`` (32 samples) and ``tiny_encoder_heldout.npz`` (16 samples),
``input_ids`` drawn from one Zipf-like distribution over the vocabulary, as token frequencies are.

Run from the repository root: ``python samples/make_onnx_sample.py`` (deterministic; < 5 MB).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
VOCAB, SEQ, HIDDEN, HEADS, FFN, LAYERS, CLASSES = 512, 128, 192, 3, 768, 2, 4
LOWRANK, MONARCH_BLOCKS, NOISE = 24, 8, 0.003
CALIBRATION, HELDOUT = 32, 16


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.output = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        B, T, D = x.shape
        def heads(t):
            return t.reshape(B, T, HEADS, D // HEADS).transpose(1, 2)
        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // HEADS), dim=-1)
        return self.output((att @ v).transpose(1, 2).reshape(B, T, D))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = Attention()
        self.attention_norm = nn.LayerNorm(HIDDEN)
        self.intermediate = nn.Linear(HIDDEN, FFN)
        self.output = nn.Linear(FFN, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN)

    def forward(self, x):
        x = self.attention_norm(x + self.attention(x))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Parameter(torch.zeros(SEQ, HIDDEN))
        self.embedding_norm = nn.LayerNorm(HIDDEN)
        self.layer = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.pooler = nn.Linear(HIDDEN, HIDDEN)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, input_ids):
        x = self.embedding_norm(self.embeddings(input_ids) + self.positions)
        for layer in self.layer:
            x = layer(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return x, self.classifier(pooled)


def lowrank_weight(n: int, k: int, rank: int, g: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, rank, generator=g)
    v = torch.randn(rank, k, generator=g)
    return u @ v


def monarch_weight(n: int, k: int, nb: int, g: torch.Generator) -> torch.Tensor:
    """A dense weight with exactly the Monarch structure of sparsec.formats.Monarch (nb blocks)."""
    p, m = k // nb, n // nb
    L = torch.randn(nb, p, p, generator=g)
    R = torch.randn(nb, m, p, generator=g)
    eye = torch.eye(k)
    xb = eye.reshape(k, nb, p).transpose(0, 1)                       # [b, rows, p]
    z = torch.bmm(xb, L.transpose(1, 2))                             # [b, rows, p]
    chunks = z.permute(1, 2, 0).reshape(k, nb, p).transpose(0, 1)    # [c, rows, p]
    y = torch.bmm(chunks, R.transpose(1, 2)).transpose(0, 1).reshape(k, n)
    return y.T.contiguous()


def with_noise(w: torch.Tensor, g: torch.Generator, std: float) -> torch.Tensor:
    w = w / w.std() * std
    return w + NOISE * std * torch.randn(w.shape, generator=g)


# Weight scales at which every branch matters, as in a trained model: attention scores spread
# over a few units (not uniform), residual branches about half the size of the residual stream.
# (BERT's initial std of 0.02 everywhere makes attention uniform and the layers nearly inert.)
STD = {"query": 0.1, "key": 0.1, "value": 0.05, "attention.output": 0.05,
       "intermediate": 0.07, "output": 0.03, "pooler": 0.07, "classifier": 0.07}


def _std(name: str) -> float:
    for key in sorted(STD, key=len, reverse=True):
        if f"{key}.weight" in name:
            return STD[key]
    return 0.02


def build(seed: int = 0) -> TinyEncoder:
    g = torch.Generator().manual_seed(seed)
    model = TinyEncoder().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (_std(name) if p.dim() == 2 else 0.02))
        first, second = model.layer
        first.intermediate.weight.copy_(with_noise(lowrank_weight(FFN, HIDDEN, LOWRANK, g), g, STD["intermediate"]))
        first.output.weight.copy_(with_noise(lowrank_weight(HIDDEN, FFN, LOWRANK, g), g, STD["output"]))
        second.intermediate.weight.copy_(with_noise(monarch_weight(FFN, HIDDEN, MONARCH_BLOCKS, g), g, STD["intermediate"]))
        second.output.weight.copy_(with_noise(monarch_weight(HIDDEN, FFN, MONARCH_BLOCKS, g), g, STD["output"]))
    return model


def zipf_ids(samples: int, rng: np.random.Generator, order: np.ndarray) -> np.ndarray:
    """Ids whose frequencies fall off as 1/rank^1.1; ``order`` maps frequency ranks to ids (one
    "language" shared by calibration and held-out data)."""
    ranks = np.arange(1, VOCAB + 1, dtype=np.float64)
    prob = 1.0 / ranks ** 1.1
    prob /= prob.sum()
    return order[rng.choice(VOCAB, size=(samples, SEQ), p=prob)].astype(np.int64)


def main() -> None:
    model = build()
    ids = torch.zeros(1, SEQ, dtype=torch.long)
    path = HERE / "tiny_encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (ids,), str(path), dynamo=False, opset_version=17, do_constant_folding=True,
                          input_names=["input_ids"], output_names=["last_hidden_state", "logits"])
    rng = np.random.default_rng(1)
    order = rng.permutation(VOCAB)  # frequent ids are not simply the small ones
    np.savez(HERE / "tiny_encoder_calib.npz", input_ids=zipf_ids(CALIBRATION, rng, order))
    np.savez(HERE / "tiny_encoder_heldout.npz", input_ids=zipf_ids(HELDOUT, rng, order))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) and its calibration and held-out data")


if __name__ == "__main__":
    main()
