"""Rotated activation sparsity (``actrot:S``): the layer's principal axes, a threshold on its
inputs turned into them (``sparsec.rotation``).

The axes Q are the eigenvectors of the Gram of the calibration rows not held apart; the threshold
is the S-quantile of the held-apart rows' rotated magnitudes, and the predicted error is what the
rotated inputs under it contribute through the weight on those rows. Layers reading one input
(gate and up) share its statistics and so one Q (kept between them, ``_AXES``): their stacked
launch computes x Q once. Like ``act``, the fit never changes the weight (``refits`` False):
sequential recovery fits the axes and threshold again to the inputs the layer receives. No ONNX
form (no standard operator skips weight rows by the values of its input).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from sparsec.formats import ActRot
from sparsec.rotation import Rotated, fit_gram, held_error, held_skipped, principal_axes, refusal, rotated_threshold
from sparsec.sites import SiteStats

from .act import SKIPS

# the axes of the last few inputs: gate and up read one input, so the second finds the first's Q.
# Keyed by the statistics object itself (held weakly: an id can be reused once the object is gone)
_AXES: "OrderedDict[int, tuple]" = OrderedDict()
_AXES_KEPT = 2


def _axes(stats: SiteStats) -> torch.Tensor:
    state = (stats.rows, stats.held.count)
    hit = _AXES.get(id(stats))
    if hit is not None and hit[0]() is stats and hit[1] == state:
        _AXES.move_to_end(id(stats))
        return hit[2]
    q = principal_axes(fit_gram(stats))
    _AXES[id(stats)] = (weakref.ref(stats), state, q)
    _AXES.move_to_end(id(stats))
    while len(_AXES) > _AXES_KEPT:
        _AXES.popitem(last=False)
    return q


class ActRotHandler:
    family = "actrot"
    shares_work_across_specs = True
    refits = False
    reads_held_rows = True  # its axes and thresholds need the rows held apart (``SiteStats.held``)
    methods = ("principal-axes",)
    default_method = "principal-axes"

    def grid(self, N: int, K: int) -> list[ActRot]:
        return [ActRot(s) for s in SKIPS]

    def refusal(self, stats: SiteStats | None, K: int) -> str | None:
        """Why calibration cannot give this layer axes and thresholds (checked before any fit)."""
        return refusal(stats, K)

    def approximate(self, specs, weight: torch.Tensor, stats: SiteStats | None, method: str | None = None):
        """One ``Rotated`` per spec: the weight as it is, the axes, and the threshold from the
        held-apart rows."""
        method = method or self.default_method
        if method not in self.methods:
            raise ValueError(f"unknown rotated activation-sparsity method {method!r}; known: {', '.join(self.methods)}")
        why = refusal(stats, weight.shape[1])
        if why is not None:
            raise ValueError(why)
        q = _axes(stats)
        held = stats.held.matrix()
        z = held.to(device=q.device) @ q
        w = weight.detach().to(torch.float32)
        return [Rotated(w, q.to(w.device), rotated_threshold(z, spec.skip)) for spec in specs]

    def output_error(self, weight: torch.Tensor, approx: Rotated, stats: SiteStats, energy: float) -> float:
        if refusal(stats, weight.shape[1]) is not None:
            return float("nan")
        return held_error(weight, approx, stats, energy)

    def describe(self, approx: Rotated, stats: SiteStats | None) -> dict:
        """What the report shows for the layer: the threshold (of rotated inputs), the fraction of
        the held-apart calibration rows' rotated inputs under it, and how many rows that is."""
        out = {"threshold": approx.threshold}
        if stats is not None and stats.held is not None and stats.held.count:
            out["skipped_on_calibration"] = held_skipped(approx, stats.held.matrix())
            out["rows_held_apart"] = stats.held.count
        return out


HANDLER = ActRotHandler()
