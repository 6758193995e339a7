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
        self._cut_set = set(self.cuts)  # asked of every node a calibration run runs
        self.calls = calls
        self.budget = BUDGET_BYTES if budget is None else budget
        self.states: list[dict[fx.Node, dict]] = []  # per calibration call: cut -> state
        self._sized = False

    def record(self) -> None:
        """Start keeping the states of the next calibration call (in call order)."""
        self.states.append({})

    def wants(self, node: fx.Node) -> bool:
        return node in self._cut_set and bool(self.states) and node not in self.states[-1]

    def take(self, node: fx.Node, env: dict) -> None:
        """Keep the state before ``node`` for the call being recorded: a copy of the computed
        values, the graph's inputs and attributes (the call's arguments, the weights) as they are,
        since the graph reads them again from the same call. The first state taken sizes the rest:
        the cuts are thinned, evenly, to what the budget holds for every call before another is
        copied."""
        state = {n: value if _given(n) else _copy(value) for n, value in env.items()}
        if not self._sized:
            self._sized = True
            size = sum(_nbytes(v) for n, v in state.items() if not _given(n))
            fits = int(self.budget // max(size * self.calls, 1))
            if fits < len(self.cuts):
                cuts = self.cuts
                self.cuts = [] if fits <= 0 else list(dict.fromkeys(
                    cuts[round(i * (len(cuts) - 1) / max(fits - 1, 1))] for i in range(fits)))
                self._cut_set = set(self.cuts)
            if node not in self.cuts:
                return
        self.states[-1][node] = state

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
