"""Activation sparsity (``act:S``): the weight untouched, a calibrated threshold on its inputs.

The threshold is the magnitude under which a fraction S of the layer's calibration inputs lie,
one per layer, as TEAL calibrates it. The predicted error is that of the dropped inputs through
the weight (``sparsec.activation.predicted_error``). The format's own fit never changes the
weight (``refits`` False): sequential recovery calibrates the threshold again on the inputs the
layer receives once earlier layers run their rewrites, and ``full`` then refits the dense weight
to the inputs the threshold keeps (``sparsec.recovery``; the kernel reads it as it read W). The ONNX path has no form for it (no
standard operator skips weight rows by the values of its input).
"""

from __future__ import annotations

import torch

from sparsec.activation import Thresholded, normal_threshold, predicted_error
from sparsec.formats import Act
from sparsec.sites import SiteStats

SKIPS = (0.25, 0.4, 0.5, 0.6, 0.7)


class ActHandler:
    family = "act"
    shares_work_across_specs = True
    refits = False
    methods = ("magnitude",)
    default_method = "magnitude"

    def grid(self, N: int, K: int) -> list[Act]:
        return [Act(s) for s in SKIPS]

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None):
        """One ``Thresholded`` per spec: the weight as it is, and the calibrated threshold (for
        unit-normal inputs where there are no statistics)."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown activation-sparsity method {method!r}; known: {', '.join(self.methods)}")
        hist = None if stats is None else stats.magnitudes
        out = []
        for spec in specs:
            t = normal_threshold(spec.skip) if hist is None or hist.total <= 0 else hist.threshold(spec.skip)
            out.append(Thresholded(weight.detach().to(torch.float32), t))
        return out

    def output_error(self, weight: torch.Tensor, approx: Thresholded, stats: SiteStats, energy: float) -> float:
        if stats.magnitudes is None or stats.magnitudes.total <= 0:
            return float("nan")
        return predicted_error(weight, stats.magnitudes, approx.threshold, energy)

    def describe(self, approx: Thresholded, stats: SiteStats | None) -> dict:
        """What the report shows for the layer: the threshold and the fraction of calibration
        inputs under it."""
        out = {"threshold": approx.threshold}
        if stats is not None and stats.magnitudes is not None and stats.magnitudes.total > 0:
            out["skipped_on_calibration"] = stats.magnitudes.skipped_fraction(approx.threshold)
        return out


HANDLER = ActHandler()
