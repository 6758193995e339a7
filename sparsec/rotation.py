"""Rotated activation sparsity (``actrot:S``): thresholds on a layer's inputs in its principal axes.

A layer's inputs turned into the eigenvectors Q of their calibration Gram, y = (x Q)(W Q)^T, put
more of each token's energy on fewer axes, so skipping a fraction S of the rotated inputs drops
less of the output than skipping S of the inputs as they are (on SmolLM2-135M, half the KL at the
same skipped fraction; docs/accuracy.md, "Rotating the inputs first").

The axes are fitted to the calibration rows, and on those rows they concentrate the energy more
than on new text: a threshold calibrated on the rows Q was fitted to skips far less than S of new
inputs (23.5% instead of 40% on SmolLM2-135M). So calibration holds rows apart (``HeldRows``:
every HELD_EVERY-th row, at most MAX_HELD_ROWS of them, kept as they are): Q is fitted to the Gram
of the other rows, and the threshold is the S-quantile of the held-apart rows' rotated magnitudes,
whose predicted output error is then measured exactly on those same rows. A layer with fewer
calibration rows than inputs (its Gram fallen back to the diagonal) has no axes to estimate, and
the format is refused there (``refusal``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.activation import WeightBacked, masked

HELD_EVERY = 4        # one calibration row in this many is held apart for the thresholds
MAX_HELD_ROWS = 1024  # enough for a quantile over K inputs each; the rest go to the axes


class HeldRows:
    """Calibration rows held apart from the Gram the axes are fitted to (module docstring)."""

    __slots__ = ("parts", "count")

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.count = 0

    def add(self, x2d: torch.Tensor, offset: int) -> None:
        """Hold the rows of ``x2d`` (rows ``offset``.. of the calibration) whose index is
        HELD_EVERY - 1 modulo HELD_EVERY, up to MAX_HELD_ROWS in all."""
        room = MAX_HELD_ROWS - self.count
        if room <= 0:
            return
        first = (HELD_EVERY - 1 - offset) % HELD_EVERY
        rows = x2d[first::HELD_EVERY][:room].detach().to(torch.float32)
        if rows.shape[0]:
            self.parts.append(rows.clone())
            self.count += int(rows.shape[0])

    def matrix(self) -> torch.Tensor | None:
        """The held rows, (count, K) float32, or None when none were held."""
        if not self.parts:
            return None
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        return self.parts[0]


def fit_gram(stats) -> torch.Tensor:
    """The Gram of the calibration rows that were not held apart (what the axes are fitted to)."""
    held = stats.held.matrix() if stats.held is not None else None
    if held is None:
        return stats.gram
    h = held.to(device=stats.gram.device, dtype=stats.gram.dtype)
    return stats.gram - h.T @ h


def principal_axes(gram: torch.Tensor) -> torch.Tensor:
    """Q (K, K) float32, orthonormal: the Gram's eigenvectors, the most energetic axis first."""
    g = gram.to(torch.float64) if gram.shape[0] <= 8192 else gram.to(torch.float32)
    g = 0.5 * (g + g.T)
    _, vecs = torch.linalg.eigh(g)
    return vecs.flip(1).to(torch.float32).contiguous()


def refusal(stats, K: int) -> str | None:
    """Why ``actrot`` cannot be calibrated from ``stats``, or None where it can."""
    if stats is None or stats.rows == 0:
        return "rotated activation sparsity needs calibration data: its axes and thresholds come from the layer's inputs"
    if stats.uncorrelated:
        return (f"fewer calibration rows ({stats.rows}) than inputs ({K}): the layer's principal axes cannot be "
                f"estimated (its Gram fell back to the diagonal); give at least {K} calibration rows, or use act:S")
    if stats.held is None or stats.held.count < 2:
        return (f"too few calibration rows ({stats.rows}) to hold any apart for the thresholds (one row in "
                f"{HELD_EVERY} is held apart)")
    return None


def rotated_threshold(z: torch.Tensor, skip: float) -> float:
    """The magnitude under which a fraction ``skip`` of the entries of ``z`` lie."""
    flat = z.abs().reshape(-1).to(device="cpu", dtype=torch.float32)
    k = min(max(int(round(skip * flat.numel())), 1), flat.numel())
    below = float(torch.kthvalue(flat, k).values)
    above = float(torch.kthvalue(flat, min(k + 1, flat.numel())).values)
    return 0.5 * (below + above)


class Rotated(WeightBacked):
    """A dense weight W whose layer rotates its inputs by Q and treats rotated inputs under
    ``threshold`` as zero: y = masked(x Q) (W Q)^T + b (``actrot:S``)."""

    __slots__ = ("weight", "rotation", "threshold")

    def __init__(self, weight: torch.Tensor, rotation: torch.Tensor, threshold: float):
        self.weight = weight
        self.rotation = rotation
        self.threshold = float(threshold)

    def to(self, *args, **kwargs) -> "Rotated":
        return Rotated(self.weight.to(*args, **kwargs), self.rotation.to(*args, **kwargs), self.threshold)

    def numel(self) -> int:
        return self.weight.numel() + self.rotation.numel()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # masked(x Q) (W Q)^T = (masked(x Q) Q^T) W^T: back to the input's axes, then the weight as
        # it is, at M K (K + N) a call instead of forming W Q (N K^2) every call
        q = self.rotation.to(x.dtype)
        return F.linear(masked(x @ q, self.threshold) @ q.T, self.weight.to(x.dtype), bias)

    def packed(self, spec):
        from sparsec.codegen import pack

        return pack(spec, self.weight, rotation=self.rotation, threshold=self.threshold)


def held_error(weight: torch.Tensor, approx: Rotated, stats, energy: float) -> float:
    """Relative output error of ``approx`` on the held-apart rows: what the skipped rotated inputs
    contribute through the weight, exactly (no term left out), over the layer's output energy
    (``energy``, of every calibration row, taken in the held rows' share)."""
    held = stats.held.matrix()
    w = weight.to(device=held.device, dtype=torch.float32)
    q = approx.rotation.to(device=held.device, dtype=torch.float32)
    z = held @ q
    err = ((z - masked(z, approx.threshold)) @ q.T) @ w.T  # (dropped Q^T) W^T = dropped (W Q)^T
    num = float((err.double() ** 2).sum())
    share = energy * held.shape[0] / max(stats.rows, 1)
    if share <= 0.0:
        return 0.0 if num <= 0.0 else float("inf")
    return (num / share) ** 0.5


def held_skipped(approx: Rotated, held: torch.Tensor) -> float:
    """Fraction of the held-apart rows' rotated inputs under the threshold."""
    z = held.to(torch.float32) @ approx.rotation.to(device=held.device, dtype=torch.float32)
    return float((z.abs() < approx.threshold).float().mean())
