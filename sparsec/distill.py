"""Distillation: train the rewritten layers' stored values so the whole model's output matches the
dense model's, in the user's metric.

The local refits (``sparsec.recovery``) make each layer match its dense layer on the inputs it
receives; they cannot see what an error does downstream (a layer-local gain need not survive the
residual stream, the norms and the softmax after it), and matching every layer to the dense
model's activations made SmolLM2-135M far worse (docs/accuracy.md). Here the model itself is the
objective: with every rewrite in place, the kept values of the sparse formats and the factors of
the factored ones (``passes.tunable``: the format's structure holds whatever the values) take Adam
steps on the metric's differentiable stand-in (``Metric.loss``: KL of the logits for ``kl`` and
``top1``) between the rewritten and the dense outputs of the calibration calls, one step a call,
for a few epochs. Every dense layer, norm and embedding stays as the user's model has it.

With at least four calibration calls every fourth is held back: the epoch whose weights give the
lowest loss on those calls is kept (the recovered plan's own where no epoch beats it), so
distillation never leaves the held-back calls worse than the local refits did. With fewer calls
every call trains, and the weights after the last epoch are judged on those same calls. Either way
they are kept only for a gain of at least ``MIN_GAIN``; the pipeline's end-to-end check (in the
metric itself, on calibration and held-out data) may still undo them alone.

Cost: a forward and a backward pass per calibration call per epoch. Peak memory: the model, the
trainable values three times over (values and Adam's two moments), one call's activations.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from sparsec.candidates import Layer

EPOCHS = 8
# with few calibration calls, as many epochs as make this many steps: SmolLM2-135M at 8 x 128 tokens
# (6 training calls an epoch) gained a quarter more of the KL from 72 steps than from 48
MIN_STEPS = 72
MAX_EPOCHS = 16  # but no more epochs than this: a single call is not worth 72 passes over it
# Adam's peak step, as a share of each trained tensor's RMS (one setting for every weight scale), is a
# travel over the steps planned: few steps take long ones, many short ones. The travels are tried in
# turn until one keeps a gain: on SmolLM2-135M with 2:4 on its MLP layers 0.08 halved one shot's
# excess perplexity at 8 x 128 tokens where 0.05 did not, but it left MiniLM's held-back loss rising
# (nothing kept) where 0.05 kept a gain (docs/accuracy.md)
TRAVELS = (0.08, 0.05)
VALIDATION_EVERY = 4  # every fourth calibration call is held back, with at least this many calls
PATIENCE = 2  # epochs without a better held-back loss before stopping
# kept only where the judged loss falls by at least this share: a smaller gain is within what the
# calibration calls can tell from noise, and not worth moving every rewritten weight for
MIN_GAIN = 0.01


def epochs_for(training_calls: int) -> int:
    """Epochs to plan for ``training_calls`` calls an epoch: ``EPOCHS``, or enough for ``MIN_STEPS``
    up to ``MAX_EPOCHS``."""
    if not EPOCHS:
        return 0
    return max(EPOCHS, min(MAX_EPOCHS, math.ceil(MIN_STEPS / max(training_calls, 1))))


def step_for(steps: int, travel: float) -> float:
    """Adam's peak step, as a share of a tensor's RMS, for a run of ``steps`` steps that travels ``travel``."""
    return travel / max(steps, 1)


@dataclass
class Distillation:
    layers: int  # layers whose values were trained
    epochs: int  # epochs run
    kept_epoch: int  # the epoch whose weights were kept (0: none beat the local refits)
    steps: int  # of the run whose weights were kept (the last run where none was)
    training_loss: tuple[float, float]  # mean over the first and the last epoch's calls
    # on the calls that judge it (those held back; all, where too few to hold any back): before, and
    # with the weights kept
    validation_loss: tuple[float, float] | None
    validation_calls: int
    seconds: float
    note: str | None = None
    warns: bool = False  # the note is a warning: skipped where it should have run, or undone
    trained: list[str] = field(default_factory=list, repr=False)  # the layers whose weights changed
    history: list[tuple[float, float | None]] = field(default_factory=list)  # per epoch: training, held-back loss
    local: dict[str, object] = field(default_factory=dict, repr=False)  # the trained layers' weights before
    travel: float | None = None  # of the run reported (``TRAVELS``)
    runs: list[dict] = field(default_factory=list)  # each travel tried before it, and what it kept

    def undo(self, layers: list[Layer]) -> None:
        """The trained layers back to the local refits they started from."""
        for layer in layers:
            if layer.name in self.local and layer.chosen is not None:
                layer.chosen.approx = self.local[layer.name]
        self.trained, self.kept_epoch, self.warns = [], 0, True

    def to_dict(self) -> dict:
        out = {"layers": self.layers, "epochs": self.epochs, "kept_epoch": self.kept_epoch, "steps": self.steps,
               "training_loss": [round(v, 6) for v in self.training_loss], "validation_calls": self.validation_calls,
               "seconds": round(self.seconds, 3)}
        if self.validation_loss is not None:
            out["validation_loss"] = [round(v, 6) for v in self.validation_loss]
        out["history"] = [[round(t, 6), None if v is None else round(v, 6)] for t, v in self.history]
        if self.travel is not None:
            out["travel"] = self.travel
        if self.runs:
            out["earlier_runs"] = self.runs
        if self.note:
            out["note"] = self.note
        return out


def distill(frontend, layers: list[Layer], epochs: int | None = None, seed: int = 0) -> Distillation | None:
    """Train the chosen rewrites end to end (module docstring); sets their ``Candidate.approx`` to the
    weights kept. None where no rewrite has trainable values; a summary saying why where nothing
    could be trained."""
    from sparsec.passes.registry import HANDLERS

    makers = [(layer, getattr(HANDLERS[layer.chosen.spec.family], "tunable", None)) for layer in layers
              if layer.chosen is not None and not layer.chosen.is_dense]
    makers = [(layer, make) for layer, make in makers if make is not None]
    if not makers:
        return None
    if not hasattr(frontend, "output_loss"):
        return Distillation(len(makers), 0, 0, 0, (0.0, 0.0), None, 0, 0.0,
                            note=f"not run: the {frontend.entry} entry cannot run its graph with gradients")
    if torch.is_inference_mode_enabled():
        return Distillation(len(makers), 0, 0, 0, (0.0, 0.0), None, 0, 0.0, warns=True,
                            note="skipped: planning ran under torch.inference_mode, where no gradient can be taken")
    start = time.perf_counter()
    tunables = [(layer, make(layer.chosen.spec, layer.chosen.weight())) for layer, make in makers]
    calls = frontend.calibration_calls()
    held_back = [i for i in range(calls) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1] \
        if calls >= VALIDATION_EVERY else []
    training = [i for i in range(calls) if i not in held_back]
    epochs = epochs_for(len(training)) if epochs is None else epochs
    run = _Training(frontend, tunables, training, held_back, epochs, seed)
    start_values = run.snapshot()
    try:
        before = run.judged_loss()
        earlier: list[dict] = []
        for n, travel in enumerate(TRAVELS):
            if n:
                run.restore(start_values)
            summary, best, kept = run(travel, before)
            summary.runs = list(earlier)
            if summary.kept_epoch > 0 and best <= (1.0 - MIN_GAIN) * before:
                break
            earlier.append({"travel": travel, "epochs": summary.epochs, "steps": summary.steps,
                            "validation_loss": [round(before, 6), round(best, 6)], "kept": False})
    except RuntimeError as exc:  # the graph would not run with gradients (e.g. inference tensors)
        run.restore(start_values)
        summary = Distillation(len(tunables), 0, 0, 0, (0.0, 0.0), None, len(held_back), 0.0)
        summary.note = f"skipped: the graph could not be run with gradients ({str(exc).splitlines()[0]})"
        summary.warns = True
        summary.seconds = time.perf_counter() - start
        return summary
    summary.validation_loss = (before, best)
    if summary.kept_epoch > 0 and best > (1.0 - MIN_GAIN) * before:
        summary.kept_epoch = 0
    run.restore(kept if summary.kept_epoch > 0 else start_values)
    if summary.kept_epoch > 0:
        summary.trained = [layer.name for layer, _ in tunables]
        summary.local = {layer.name: layer.chosen.approx for layer, _ in tunables}
        for layer, t in tunables:
            layer.chosen.approx = t.result().to(device=layer.site.weight.device, dtype=layer.site.dtype)
    else:
        summary.note = (f"no epoch lowered the {'held-back ' if held_back else ''}calibration calls' loss by "
                        f"{MIN_GAIN:.0%} or more" + (f" at any travel tried ({', '.join(f'{t:g}' for t in TRAVELS)})"
                                                      if len(TRAVELS) > 1 else "") + ": the local refits stand")
    summary.seconds = time.perf_counter() - start
    return summary


class _Training:
    """The trained values of a distillation and the calibration calls that train and judge them;
    called with a travel, one run of Adam from the values as they are."""

    def __init__(self, frontend, tunables, training: list[int], held_back: list[int], epochs: int, seed: int):
        self.frontend, self.tunables = frontend, tunables
        self.training, self.held_back, self.epochs, self.seed = training, held_back, epochs, seed
        self.judges = held_back or training  # the calls whose loss decides what is kept
        self.params = [p for _, t in tunables for p in t.parameters()]
        self.rms = [_rms(p) for p in self.params]

    def replacements(self) -> dict[str, torch.Tensor]:
        return {layer.name: t.weight().to(layer.site.dtype) for layer, t in self.tunables}

    def judged_loss(self) -> float:
        with torch.no_grad():
            reps = self.replacements()
            return sum(float(self.frontend.output_loss(i, reps)) for i in self.judges) / len(self.judges)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def restore(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, values):
                p.copy_(value)

    def __call__(self, travel: float, before: float) -> tuple[Distillation, float, list[torch.Tensor]]:
        """One run at ``travel``: its summary, the best judged loss (``before`` where no epoch beat
        it) and the values that gave it."""
        from sparsec.progress import advance_current

        training, held_back, epochs = self.training, self.held_back, self.epochs
        step = step_for(epochs * len(training), travel)
        optimizer = torch.optim.Adam([{"params": [p], "lr": step * r} for p, r in zip(self.params, self.rms)])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(len(training), epochs * len(training)))
        summary = Distillation(len(self.tunables), 0, 0, 0, (0.0, 0.0), None, len(held_back), 0.0, travel=travel)
        generator = torch.Generator().manual_seed(self.seed)
        best, kept = before, self.snapshot()
        first = last = 0.0
        for epoch in range(1, epochs + 1):
            total = 0.0
            for i in torch.randperm(len(training), generator=generator).tolist():
                with torch.enable_grad():  # planning itself runs without gradients
                    loss = self.frontend.output_loss(training[i], self.replacements())
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for p, g in zip(self.params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                optimizer.step()
                schedule.step()
                total += float(loss.detach())
                summary.steps += 1
                advance_current()
            last = total / max(len(training), 1)
            first = last if epoch == 1 else first
            summary.epochs = epoch
            if not held_back:  # judged once, at the end, on the calls it trained on
                summary.history.append((last, None))
                continue
            now = self.judged_loss()
            summary.history.append((last, now))
            if now < best:
                best, kept, summary.kept_epoch = now, self.snapshot(), epoch
            elif epoch - summary.kept_epoch >= PATIENCE:
                break
        if not held_back and summary.epochs:
            now = self.judged_loss()
            if now < best:
                best, kept, summary.kept_epoch = now, self.snapshot(), summary.epochs
        summary.training_loss = (first, last)
        return summary, best, kept


def _schedule(warmup: int, total: int):
    """The step's share at step k: rising linearly over the first epoch (Adam's first steps, taken
    before its moment estimates settle, overshot on SmolLM2-135M with 24 calls an epoch), then
    decaying to nothing along a half cosine over the rest."""
    def share(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / max(total - warmup, 1)))
    return share


def _rms(p: torch.Tensor) -> float:
    values = p.detach()
    nonzero = values[values != 0]
    return float(nonzero.pow(2).mean().sqrt()) if nonzero.numel() else 1.0
