"""Sequential recovery: refit each chosen rewrite to the inputs it will really receive.

One-shot fitting weighs every layer's candidate by the dense model's activations. Once earlier
layers run their rewrites, a layer's inputs differ from those, and a fit to the dense inputs is
no longer the best fit to what arrives (SparseGPT and GPTQ calibrate layer after layer for this
reason). Here the chosen layers are visited block after block, in graph order; for each block one
pass over the calibration data gathers the Gram statistics of its layers' inputs with every earlier
block already running its recovered weights (and the block's own layers their one-shot ones), and
each layer's format is fitted again to those statistics. The refit is kept only where it lowers
the layer's error on those inputs, so recovery never makes a layer worse than its one-shot fit on
the inputs it receives. Cost: one pass over the calibration data per block of rewritten layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparsec.candidates import Layer
from sparsec.sites import output_energy, relative_output_error


@dataclass
class RecoverySummary:
    mode: str
    passes: int = 0  # passes over the calibration data
    refit: list[str] = field(default_factory=list)  # layers whose refit was kept
    kept: list[str] = field(default_factory=list)  # layers whose one-shot fit stayed the better one
    note: str | None = None  # why nothing was recovered, where that happened

    def to_dict(self) -> dict:
        out = {"mode": self.mode, "passes": self.passes, "refit": len(self.refit), "kept_one_shot": len(self.kept)}
        if self.note:
            out["note"] = self.note
        return out


def blocks_in_order(layers: list[Layer]) -> list[list[Layer]]:
    """The rewritten layers, in graph order, cut where the block number in the name changes."""
    from sparsec.passes.select import depth_of

    groups: list[list[Layer]] = []
    last = object()
    for layer in layers:
        if layer.chosen is None or layer.chosen.is_dense:
            continue
        depth = depth_of(layer.name)
        if not groups or depth != last:
            groups.append([])
            last = depth
        groups[-1].append(layer)
    return groups


def recover_sequentially(frontend, layers: list[Layer], mode: str) -> RecoverySummary:
    """Refit the chosen rewrites block after block (module docstring); changes the chosen
    candidates' weights in place (``Candidate.approx``) and sets ``Layer.recovered``."""
    from sparsec.passes.registry import HANDLERS
    from sparsec.progress import advance_current

    summary = RecoverySummary(mode)
    if not hasattr(frontend, "recalibrate"):
        summary.note = f"the {frontend.entry} entry cannot yet gather statistics with rewrites in place"
        return summary
    done: dict[str, torch.Tensor] = {}
    for block in blocks_in_order(layers):
        advance_current()
        running = dict(done)
        running.update({l.name: l.chosen.weight().to(l.site.dtype) for l in block})
        stats = frontend.recalibrate({l.name for l in block}, running)
        summary.passes += 1
        for layer in block:
            site, cand = layer.site, layer.chosen
            st = stats[site.input_key]
            st.fall_back_to_diagonal()
            weight = site.weight.detach().to(device=st.gram.device, dtype=torch.float32)
            energy = output_energy(weight, st, site.bias)
            one_shot = cand.weight().to(device=st.gram.device, dtype=torch.float32)
            (refit,) = HANDLERS[cand.spec.family].approximate([cand.spec], weight, st)
            before = relative_output_error(weight, one_shot, st, site.bias, energy)
            after = relative_output_error(weight, refit, st, site.bias, energy)
            if math.isfinite(after) and after < before:
                cand.approx = refit.to(device=site.weight.device, dtype=site.dtype)
                layer.recovered = (before, after)
                summary.refit.append(layer.name)
            else:
                layer.recovered = (before, before)
                summary.kept.append(layer.name)
            done[layer.name] = cand.weight().to(site.dtype)
    return summary
