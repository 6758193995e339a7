"""The dense graph's state at a few layers, kept from the calibration run, so that an evaluation
whose replaced layers all lie late in the graph starts at the first of them.

Planning evaluates the model many times with a few layers replaced (a layer, a role, a run of
blocks measured alone); everything before the first replaced layer computes what the dense graph
computed on the same call. The interpreter's environment just before a layer holds exactly the
values the rest of the graph still reads (it drops each value after its last use), so a copy of it
there is all a later evaluation needs to start from that layer.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

MAX_CUTS = 32  # layers the state is kept at, evenly spread over the graph's layers
BUDGET_BYTES = 256 << 20  # all calls' kept states together, at most


def _copy(value):
    """A copy whose tensors a later in-place op cannot change (the environment may hold views)."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def _nbytes(value) -> int:
    total = 0

    def add(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        return v

    tree_map(add, value)
    return total


class Prefixes:
    """States of one graph's interpreter just before some of its layers, per calibration call."""

    def __init__(self, gm: fx.GraphModule, layer_nodes, calls: int, budget: int | None = None):
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        ordered = sorted((n for n in layer_nodes if n in self.order), key=self.order.__getitem__)
        ordered = ordered[1:]  # before the first layer there is nothing worth skipping
        if len(ordered) > MAX_CUTS:
            ordered = [ordered[round(i * (len(ordered) - 1) / (MAX_CUTS - 1))] for i in range(MAX_CUTS)]
        self.cuts = list(dict.fromkeys(ordered))
        self.calls = calls
        self.budget = BUDGET_BYTES if budget is None else budget
        self.states: list[dict[fx.Node, dict]] = []
        self._sized = False

    def wanted(self) -> dict[fx.Node, None]:
        """What a calibration run fills (``SiteInterpreter(prefixes=...)``): one entry per cut."""
        return dict.fromkeys(self.cuts)

    @staticmethod
    def take(env: dict) -> dict:
        """A copy of the computed values; the graph's inputs and attributes (the call's arguments,
        the weights) as they are, since the graph reads them again from the same call."""
        return {node: value if _given(node) else _copy(value) for node, value in env.items()}

    def keep(self, taken: dict[fx.Node, dict | None]) -> None:
        """Keep one call's states (in call order); thinned to the budget after the first call."""
        taken = {cut: state for cut, state in taken.items() if state is not None}
        if not self._sized and taken:
            self._sized = True
            per_cut = sum(_nbytes(v) for s in taken.values() for n, v in s.items() if not _given(n)) / len(taken)
            fits = int(self.budget // max(per_cut * self.calls, 1.0))
            if fits < len(self.cuts):
                cuts = self.cuts
                self.cuts = [] if fits <= 0 else list(dict.fromkeys(
                    cuts[round(i * (len(cuts) - 1) / max(fits - 1, 1))] for i in range(fits)))
        self.states.append({cut: taken[cut] for cut in self.cuts if cut in taken})

    def start(self, call: int, first: fx.Node) -> dict | None:
        """The environment to start call ``call`` from when ``first`` is the first layer that runs
        differently from the dense graph: the latest kept state at or before it (None: from the top)."""
        if call >= len(self.states) or first not in self.order:
            return None
        at = self.order[first]
        best = None
        for cut in self.cuts:
            if self.order[cut] <= at and cut in self.states[call]:
                best = cut
        if best is None:
            return None
        state = self.states[call][best]
        env = {node: None for node, i in self.order.items() if i < self.order[best] and node not in state}
        env.update({node: value if _given(node) else _copy(value) for node, value in state.items()})
        return env


def _given(node: fx.Node) -> bool:
    return node.op in ("placeholder", "get_attr")
