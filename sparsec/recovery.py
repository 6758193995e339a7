"""Recovery: refit each chosen rewrite to the inputs it will really receive.

One-shot fitting weighs every layer's candidate by the dense model's activations. Once earlier
layers run their rewrites, a layer's inputs differ from those, and a fit to the dense inputs is
no longer the best fit to what arrives (SparseGPT and GPTQ calibrate layer after layer for this
reason). Here the chosen layers are visited block after block, in graph order, and within a block
stage after stage (the layers that read one input: q/k/v, then o, then gate/up, then down). For
each stage one pass over the calibration data gathers the Gram statistics of its input with every
earlier layer already running its recovered weights, and each layer's format is fitted again to
those statistics. The refit is kept only where it lowers the layer's error on those inputs, so
recovery never makes a layer worse than its one-shot fit on the inputs it receives. Cost: one pass
over the calibration data per stage (two in ``full`` after a block's first stage), each stopping
where the stage's input has arrived.

``sequential`` fits a layer so that its output on the inputs it receives matches the dense
layer's output on those same inputs, as SparseGPT does: the error already made upstream is
carried on. ``full`` also lets a layer make up for the stage just before it in its own block: the
target is what the layer would output had that stage run dense on the same block input (a down
projection makes up for the error of the rewritten gate and up projections feeding it). With X_r
those reference inputs and X the inputs it receives, it minimises ||X_r W^T - X W_hat^T||, whose
unconstrained optimum is W' = W C G^-1 (C = X_r^T X, G = X^T X; ridge-pulled towards W where the
rows are few, ``_reference_target``); the format's own activation-aware fit of W' under G then
finds the structured optimum, so every format recovers through the fit it already has.

``act`` layers keep their weight and skip small inputs: recovery calibrates their threshold again
on the inputs they receive, and ``full`` then fits their weight to the inputs the threshold keeps
(``_refit_thresholded``, one more pass for a stage that has them).

Why not further upstream: matching every layer to the dense model's output at that layer, which
would also correct every earlier block, made SmolLM2-135M far worse end to end (KL 6.1 against 0.64
one shot with 2:4 on its MLP layers) even where every layer's own error fell; taking the whole
block run dense on its input as every stage's reference made it worse than one shot too once
attention was rewritten (docs/accuracy.md). A linear refit can undo a nearby change; it cannot
learn the model's accumulated drift from a few thousand rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparsec.activation import Thresholded
from sparsec.candidates import Layer
from sparsec.sites import as_weight, output_energy, relative_output_error

DAMPING = 0.01  # of the Gram's mean diagonal, as every format's fit
# an act layer's weight refitted to the inputs it keeps ("full") is pulled towards W by this share
# of the kept inputs' mean Gram diagonal: on SmolLM2-135M (act:0.4 on all 210 block layers, 8 x 128
# calibration tokens, docs/accuracy.md) 0.01 overfitted (held-out KL 0.416 against 0.257 without
# the refit), 0.3 gave 0.230 and 3 gave 0.239
ACT_RIDGE = 0.3
# "full" makes up for the stage before only where calibration has at least this many rows per input;
# with fewer the target is chased along directions the rows barely span: SmolLM2-135M's down
# projections (1536 inputs) with 2:4 helped held-out KL at 2.7 rows per input and hurt it at 0.7
FULL_ROWS_PER_INPUT = 2


@dataclass
class RecoverySummary:
    mode: str
    passes: int = 0  # passes over the calibration data
    sequential_only: list[str] = field(default_factory=list)  # "full" asked, too few rows: sequential
    refit: list[str] = field(default_factory=list)  # layers whose refit was kept
    kept: list[str] = field(default_factory=list)  # layers whose one-shot fit stayed the better one
    note: str | None = None  # why nothing was recovered, where that happened
    distillation: object | None = None  # sparsec.distill.Distillation ("full")
    _local: tuple = field(default=((), ()), repr=False)  # refit and kept before distillation
    # each rewritten layer's reconstruction before recovery touched it (None: its candidate remakes it)
    originals: dict[str, object] = field(default_factory=dict, repr=False)

    def undo(self, layers: list[Layer]) -> None:
        """Every layer back to its one-shot fit, as before this recovery."""
        for layer in layers:
            if layer.name in self.originals and layer.chosen is not None:
                layer.chosen.approx = self.originals[layer.name]
            layer.recovered = layer.received = None

    @property
    def trained(self) -> list[str]:
        """The layers distillation changed."""
        return self.distillation.trained if self.distillation is not None else []

    def distilled(self, result) -> None:
        """Take in what distillation did: the layers it trained count as refitted."""
        self.distillation = result
        if result is None or result.kept_epoch == 0:
            return
        self._local = (list(self.refit), list(self.kept))
        self.refit += [name for name in self.trained if name not in self.refit]
        self.kept = [name for name in self.kept if name not in self.trained]

    def undistill(self, layers: list[Layer], why: str) -> None:
        """Every trained layer back to its local refit (``why``: what distillation did end to end)."""
        self.distillation.undo(layers)
        self.distillation.note = why
        self.refit, self.kept = self._local

    def warnings(self) -> list[str]:
        """What the report's warnings say of this recovery: why it was undone, where it fell short."""
        out = [f"recovery {self.mode}: {self.note}"] if self.note else []
        if self.distillation is not None and self.distillation.warns:
            out.append(f"recovery {self.mode}: distillation {self.distillation.note}; the local refits stand")
        if self.sequential_only:
            out.append(f"recovery full: {len(self.sequential_only)} layer(s) saw fewer than {FULL_ROWS_PER_INPUT} "
                       f"calibration rows per input (e.g. {self.sequential_only[0]}) and were refitted sequentially "
                       f"only; supply more calibration rows to let them make up for the rewritten layers feeding them")
        return out

    def to_dict(self) -> dict:
        out = {"mode": self.mode, "passes": self.passes, "refit": len(self.refit), "kept_one_shot": len(self.kept)}
        if self.sequential_only:
            out["sequential_only"] = len(self.sequential_only)
        if self.note:
            out["note"] = self.note
        if self.distillation is not None:
            out["distillation"] = self.distillation.to_dict()
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
    """Refit the chosen rewrites block after block (module docstring; ``mode`` "sequential" or
    "full"); changes the chosen candidates' weights in place (``Candidate.approx``) and sets
    ``Layer.recovered``."""
    from sparsec.passes.registry import forget_layer_work
    from sparsec.progress import advance_current

    summary = RecoverySummary(mode)
    summary.originals = {l.name: l.chosen.approx for l in layers if l.chosen is not None and not l.chosen.is_dense}
    if not hasattr(frontend, "recalibrate"):
        summary.note = f"the {frontend.entry} entry cannot yet gather statistics with rewrites in place"
        return summary
    done: dict[str, torch.Tensor] = {}
    full = mode == "full"
    for block in blocks_in_order(layers):
        previous: set[str] = set()
        for stage in stages_of(block):
            advance_current()
            running = dict(done)
            running.update({l.name: l.chosen.weight().to(l.site.dtype) for l in stage})
            # the first stage has no layer of its own block upstream: its target is the sequential one
            made_up = full and bool(previous)
            # the rows planning calibrated on come again: a stage too thin to use a reference needs no pass for it
            thin = made_up and all(_too_thin(l) for l in stage)
            reference = {k: v for k, v in running.items() if k not in previous} if made_up and not thin else None
            found = frontend.recalibrate({l.name for l in stage}, running, reference=reference)
            stats, products = found if reference is not None else (found, None)
            summary.passes += 1 if reference is None else 2
            for layer in stage:
                _refit(layer, stats, products, summary, made_up)
            thresholded = [l for l in stage if isinstance(l.chosen.approx, Thresholded)]
            if full and thresholded and hasattr(frontend, "masked_products"):
                _refit_thresholded(frontend, thresholded, done, summary)
            for layer in stage:
                done[layer.name] = layer.chosen.weight().to(layer.site.dtype)
            previous = {l.name for l in stage}
    forget_layer_work()
    return summary


def _too_thin(layer: Layer) -> bool:
    """Too few calibration rows per input to make up for the stage before (``FULL_ROWS_PER_INPUT``)."""
    return layer.stats.rows < FULL_ROWS_PER_INPUT * layer.site.K


def stages_of(block: list[Layer]) -> list[list[Layer]]:
    """A block's layers grouped by the input they read, in graph order (q/k/v, o, gate/up, down in a
    transformer block): each stage's inputs are made by the stages before it."""
    stages: dict[str, list[Layer]] = {}
    for layer in block:
        stages.setdefault(layer.site.input_key, []).append(layer)
    return list(stages.values())


def _refit(layer: Layer, stats, products, summary: RecoverySummary, made_up: bool = False) -> None:
    """Fit the layer's format again to the inputs it receives (module docstring); kept only where it
    lowers the layer's error on them."""
    from sparsec.passes.registry import HANDLERS

    site, cand = layer.site, layer.chosen
    handler = HANDLERS[cand.spec.family]
    st = stats[site.input_key]
    if not getattr(handler, "refits", True):
        _recalibrate(layer, handler, st, summary)
        return
    gram = st.gram.clone()  # the rows' own Gram: errors are measured on them
    st.fall_back_to_diagonal()
    weight = site.weight.detach().to(device=st.gram.device, dtype=torch.float32)
    one_shot = cand.weight().to(device=st.gram.device, dtype=torch.float32)
    thin = made_up and _too_thin(layer)
    if thin:
        summary.sequential_only.append(layer.name)
    if products is not None and not thin:
        reference_gram, cross = products[site.input_key]
        error = _against_reference(weight, reference_gram, cross, gram)
        target = _reference_target(weight, cross, gram)
    else:
        energy = output_energy(weight, st, site.bias)
        error = lambda w: relative_output_error(weight, w, st, site.bias, energy)  # noqa: E731
        target = weight
    (refit,) = handler.approximate([cand.spec], target, st, method=getattr(handler, "recovery_method", None))
    before, after = error(one_shot), error(refit)
    if math.isfinite(after) and after < before:
        cand.approx = refit.to(device=site.weight.device, dtype=site.dtype)
        layer.recovered = (before, after)
        summary.refit.append(layer.name)
    else:
        layer.recovered = (before, before)
        summary.kept.append(layer.name)


def _recalibrate(layer: Layer, handler, st, summary: RecoverySummary) -> None:
    """A format that keeps the weight (act) takes what it calibrates again from the inputs the layer
    receives: its threshold then skips the fraction it was priced at of those inputs. Kept whatever
    it does to the layer's error (the end-to-end check after recovery still binds), which the
    report gives before and after."""
    site, cand = layer.site, layer.chosen
    weight = site.weight.detach().to(device=st.gram.device, dtype=torch.float32)
    energy = output_energy(weight, st, site.bias)
    (again,) = handler.approximate([cand.spec], weight, st)
    before = handler.output_error(weight, cand.weight().to(device=st.gram.device, dtype=torch.float32), st, energy)
    after = handler.output_error(weight, again, st, energy)
    cand.approx = again.to(device=site.weight.device, dtype=site.dtype)
    layer.received = st  # the report's skipped fraction: of the inputs the layer now receives
    layer.recovered = (before, after)
    summary.refit.append(layer.name)


def _refit_thresholded(frontend, layers: list[Layer], done: dict, summary: RecoverySummary) -> None:
    """``full`` for ``act`` layers (their thresholds already calibrated again on the inputs they
    receive): the weight fitted so that the inputs the layer keeps, S, give what all of them gave,
    argmin ||X W^T - S W'^T||^2 + lam ||W' - W||^2 = (W X^T S + lam W)(S^T S + lam I)^-1, lam =
    ACT_RIDGE x the mean diagonal of S^T S; the kernel reads W' as it read W, so the speed is the
    same. One more pass over the calibration data for the stage. Kept where it lowers the layer's
    error on the calibration inputs (the end-to-end checks after recovery still bind)."""
    products = frontend.masked_products({l.name: l.chosen.approx.threshold for l in layers}, dict(done))
    summary.passes += 1
    for layer in layers:
        p = products.get(layer.name)
        if p is None or p.rows == 0:
            continue
        approx = layer.chosen.approx
        ss, cross = p.kept_gram, p.cross
        W = approx.weight.to(device=ss.device, dtype=ss.dtype)
        lam = ACT_RIDGE * float(torch.diagonal(ss).mean())
        if not lam > 0.0:  # the threshold kept no calibration input: nothing to fit to
            continue
        eye = torch.eye(ss.shape[0], dtype=ss.dtype, device=ss.device)
        refit = torch.linalg.solve(ss + lam * eye, (W @ cross.T + lam * W).T).T
        energy = float((W @ p.gram * W).sum())
        if layer.site.bias is not None:
            b = layer.site.bias.detach().to(device=ss.device, dtype=ss.dtype)
            energy += 2.0 * float(b @ (W @ p.total)) + p.rows * float(b @ b)

        def error(w, W=W, p=p, energy=energy):
            # ||X W^T - S w^T||^2 = tr(W G W^T) - 2 tr(W X^T S w^T) + tr(w S^T S w^T)
            num = float((W @ p.gram * W).sum() - 2.0 * (W @ p.cross.T * w).sum() + (w @ p.kept_gram * w).sum())
            return math.sqrt(max(num, 0.0) / energy) if energy > 0 else 0.0

        before, after = error(W), error(refit)
        if math.isfinite(after) and after < before:
            layer.chosen.approx = Thresholded(refit.to(device=approx.weight.device, dtype=approx.weight.dtype),
                                              approx.threshold)
            first = layer.recovered[0] if layer.recovered else before
            layer.recovered = (first, after)


def _reference_target(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The weight W' that, applied to the inputs the layer now receives, best gives the layer's
    output on its reference inputs (those it would receive had the stage before it run dense),
    pulled towards W along directions the calibration rows barely show: argmin ||X_r W^T - X W'^T||^2 + lam ||W' - W||^2 = (W C + lam W)(G + lam I)^-1,
    lam = DAMPING x the mean diagonal of G (the rows' own Gram). Without the pull, a layer with
    fewer rows than inputs would be sent anywhere along the directions no row spans."""
    W = weight.to(cross.dtype)
    lam = DAMPING * float(torch.diagonal(gram).mean()) if gram.numel() else 0.0
    lam = lam if lam > 0.0 else DAMPING
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, (W @ cross + lam * W).T).T.to(torch.float32)


def _against_reference(weight: torch.Tensor, dense_gram: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor):
    """||X_r W^T - X W_hat^T|| / ||X_r W^T|| on the calibration rows, as a function of W_hat."""
    W = weight.to(cross.dtype)
    reference = float(torch.sum((W @ dense_gram) * W))
    WC = W @ cross

    def error(w_hat) -> float:
        w = as_weight(w_hat).to(cross.dtype)
        num = reference - 2.0 * float(torch.sum(WC * w)) + float(torch.sum((w @ gram) * w))
        return math.sqrt(max(num, 0.0) / reference) if reference > 0.0 else (0.0 if num <= 0.0 else math.inf)

    return error
