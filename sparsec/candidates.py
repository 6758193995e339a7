"""What the planner weighs for one layer: its candidates, each with predicted error and time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from sparsec.formats import Dense, FormatSpec
from sparsec.sites import Site, SiteStats


@dataclass
class Candidate:
    spec: FormatSpec
    approx: torch.Tensor | None  # N x K reconstruction with the format's structure, held (hand-built candidates)
    method: str | None
    predicted_error: float
    predicted_us: float | None = None
    kernel: str | None = None
    impl: str | None = None  # the codegen implementation the fingerprint priced (None: codegen decides)
    measured_us: float | None = None  # timed on this device by the measure step
    rejected_because: str | None = None
    # priced as its share of one launch with these layers (same input, same setting), and alone;
    # ``siblings``: every layer it was first priced with (``shared_with`` narrows to those that chose it)
    shared_with: tuple[str, ...] = ()
    alone_us: float | None = None
    siblings: tuple[str, ...] = ()
    # the planner's candidates hold no reconstruction: this gives it from a bounded cache, or makes
    # it again (deterministic: the same tensor), so the model's weights are not held once per candidate
    remake: Callable[[], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def weight(self) -> torch.Tensor:
        """The reconstruction: the one held, else the one ``remake`` gives."""
        if self.approx is None and self.remake is not None:
            return self.remake()
        return self.approx

    @property
    def fmt(self) -> str:
        return str(self.spec)

    @property
    def is_dense(self) -> bool:
        return isinstance(self.spec, Dense)


@dataclass
class Layer:
    """One site with everything the pipeline learned and decided about it."""

    site: Site
    stats: SiteStats
    dense: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    forced_by: str | None = None
    requested: str = "auto"
    reason: str = ""
    measured_error: float | None = None
    measured_us: float | None = None
    measured_us_dense: float | None = None
    budget_left: float | None = None  # layer error still affordable given every other choice
    kept_dense: str | None = None  # why a planned rewrite was undone after the whole graph was timed
    # sequential recovery: the chosen candidate's error on the inputs the layer receives once the
    # earlier blocks run their rewrites, fitted one shot (to the dense model's inputs) and refitted
    recovered: tuple[float, float] | None = None
    # statistics of the inputs the layer receives once recovery ran (what act recalibrated on)
    received: SiteStats | None = None
    # end-to-end squared error per unit of its own, as the planner last probed it (passes.select),
    # and whether with this layer alone rewritten: later allocations of the same plan start from it
    sensitivity: float | None = None
    sensitivity_alone: bool = False
    # what the planner computed from the weight and statistics and asks for again (keyed by what it
    # was computed from)
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.site.name

    def release(self) -> None:
        """Drop the approximations and statistics once the graph is lowered and reported."""
        for cand in (self.dense, *self.candidates):
            cand.approx = cand.remake = None
        self.stats.gram = self.stats.gram.new_empty(0)
        self.stats.magnitudes = None
        self.stats.held = None
        self.received = None

    @property
    def tokens(self) -> int:
        return self.site.tokens if self.site.tokens else self.stats.tokens

    def saving(self, cand: Candidate) -> float:
        if cand.predicted_us is None or self.dense.predicted_us is None:
            return 0.0
        return self.dense.predicted_us - cand.predicted_us

    def speedup(self, cand: Candidate) -> float | None:
        if not cand.predicted_us or self.dense.predicted_us is None:
            return None
        return self.dense.predicted_us / cand.predicted_us
