"""Sites: the weight-bearing layers a front-end found, and what calibration learned about them.

A Site is front-end neutral: the FX and ONNX captures both reduce a layer to ``y = x @ W.T + b``
with W of shape (N, K), a name a person recognises, and the identity of the tensor feeding it
(layers reading the same input, such as q/k/v, share one Gram matrix and form a group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparsec.activation import Magnitudes
from sparsec.rotation import HeldRows

DIAGONAL_DAMPING = 0.01  # of the mean energy, so an input calibration never saw still weighs a little


@dataclass
class Site:
    name: str
    op: str
    weight: torch.Tensor  # (N, K), the user's tensor: read, never written
    bias: torch.Tensor | None
    dtype: torch.dtype
    input_key: str
    graph: int = 0
    tokens: int | None = None  # rows per call at the shape the graph runs at, when the capture knows it
    tokens_vary: bool = False  # the graph runs at any number of rows (a dynamic dimension): ``tokens`` is one of them
    # whether what the layer writes reaches only other linear layers, through elementwise ops (an
    # MLP's gate and up projections): there a column-major product costs its readers nothing
    read_by_linears: bool = False

    @property
    def N(self) -> int:
        return int(self.weight.shape[0])

    @property
    def K(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@dataclass
class Skipped:
    """An op that looked weight-bearing but was left as it was, and why."""

    name: str
    op: str
    reason: str


@dataclass
class SiteStats:
    """Second-order statistics of a site's input activations over the calibration data.

    ``gram`` is X^T X and ``total`` is the column sum of X, both accumulated in float64 (or
    float32 for very wide inputs), so that a candidate's output error on every calibration
    token can be computed without keeping the activations.
    """

    gram: torch.Tensor
    total: torch.Tensor
    rows: int = 0
    calls: list[int] = field(default_factory=list)
    uncorrelated: bool = False  # set by ``fall_back_to_diagonal``
    magnitudes: Magnitudes | None = None  # histogram of input magnitudes (activation sparsity)
    held: HeldRows | None = None  # rows held apart from the Gram (rotated activation sparsity)

    def fall_back_to_diagonal(self) -> bool:
        """With fewer rows than inputs, fit as if the inputs were uncorrelated: keep each input's
        calibration energy (the Gram's diagonal, damped by DIAGONAL_DAMPING of its mean), drop the
        correlations.

        Rows fewer than inputs leave directions the data never showed. A fit weighted by the full
        Gram of those rows drops them as free, and verified on the same rows it looks lossless while
        it is not: rank-2048 factorisations of 4096-input layers fitted to 2048 rows left a model
        0.86% off on its calibration and 85% off on a new input (docs/benchmarks.md). A diagonal
        Gram has no such blind directions, so the error then measured on the calibration rows holds
        for new inputs; yet it keeps what a few rows do estimate well, how loud each input is. An
        isotropic Gram (every input equally loud, the rule before) threw that away too, and on an
        LLM, whose inputs differ in energy by orders of magnitude, it cost dearly: SmolLM2-135M with
        rank 288 on its MLP layers and 1024 calibration rows (its down projections have 1536
        inputs) went to a held-out KL of 10.2 nats; weighted by the diagonal, 2.5 (docs/accuracy.md).
        Idempotent; returns whether it fell back.
        """
        K = self.gram.shape[0]
        if self.uncorrelated or self.rows >= K:
            return False
        energy = torch.diagonal(self.gram).clone() if self.rows else torch.ones(K, dtype=self.gram.dtype,
                                                                                 device=self.gram.device)
        mean = float(energy.sum()) / K
        self.gram = torch.diag(energy + DIAGONAL_DAMPING * (mean if mean > 0.0 else 1.0))
        self.uncorrelated = True
        return True

    @property
    def tokens(self) -> int:
        """Rows per call (the M a kernel sees), the median over calibration calls."""
        if not self.calls:
            return 0
        ordered = sorted(self.calls)
        return int(ordered[len(ordered) // 2])

    def add(self, x2d: torch.Tensor) -> None:
        if self.rows == 0 and self.gram.device != x2d.device:
            self.gram, self.total = self.gram.to(x2d.device), self.total.to(x2d.device)
        if self.held is not None:
            self.held.add(x2d, self.rows)
        x = x2d.to(self.gram.dtype)
        self.gram.addmm_(x.T, x)
        self.total.add_(x.sum(0))
        self.rows += int(x.shape[0])
        self.calls.append(int(x.shape[0]))
        if self.magnitudes is not None:
            self.magnitudes.add(x2d)

    @classmethod
    def empty(cls, K: int) -> "SiteStats":
        dtype = torch.float64 if K <= 8192 else torch.float32
        return cls(gram=torch.zeros(K, K, dtype=dtype), total=torch.zeros(K, dtype=dtype),
                   magnitudes=Magnitudes.empty(K, dtype), held=HeldRows())


def _gram_form(D: torch.Tensor, stats: SiteStats) -> float:
    """sum over calibration tokens of ||x D^T||^2 = tr(D G D^T); O(N K) when the Gram is diagonal."""
    if stats.uncorrelated:
        return float(torch.sum(D * D * torch.diagonal(stats.gram)))
    return float(torch.sum((D @ stats.gram) * D))


def output_energy(weight: torch.Tensor, stats: SiteStats, bias: torch.Tensor | None = None) -> float:
    """Sum over calibration tokens of ||x W^T + b||^2."""
    W = weight.to(device=stats.gram.device, dtype=stats.gram.dtype)
    energy = _gram_form(W, stats)
    if bias is not None:
        b = bias.to(device=stats.gram.device, dtype=stats.gram.dtype)
        energy += 2.0 * float(b @ (W @ stats.total)) + stats.rows * float(b @ b)
    return max(energy, 0.0)


def as_weight(approx) -> torch.Tensor:
    """The dense weight an approximation amounts to: itself, or a composite's parts summed."""
    return approx.dense() if hasattr(approx, "dense") else approx


def relative_output_error(
    weight: torch.Tensor, approx: torch.Tensor, stats: SiteStats, bias: torch.Tensor | None = None,
    energy: float | None = None,
) -> float:
    """The layer's relative L2 output error on the calibration activations when W becomes approx.

    ``energy`` is ``output_energy(weight, stats, bias)`` when the caller scores many candidates
    of one layer and has it already.
    """
    on = dict(device=stats.gram.device, dtype=stats.gram.dtype)
    diff = weight.to(**on) - as_weight(approx).to(**on)
    num = _gram_form(diff, stats)
    den = output_energy(weight, stats, bias) if energy is None else energy
    if den <= 0.0:
        return 0.0 if num <= 0.0 else math.inf
    return math.sqrt(max(num, 0.0) / den)
