"""Run an FX graph on real inputs while watching, or swapping, the weights of its sites.

Calibration records each site's input activations into Gram statistics; evaluation runs the
graph with some weights replaced by their approximations and measures, at every site, the
layer's own output error on the activations it really receives.

Padding is left out of what is recorded. A graph input named ``attention_mask`` (a 0/1 matrix over
batch and position, as Hugging Face models take it) marks the positions the model ignores;
an activation laid out over the same batch and positions has those rows dropped from the
statistics and from the rows recovery refits to, since no output depends on them. A batch
padded to 128 tokens around sentences of a dozen is mostly padding, and fitting to it cost
all-MiniLM-L6-v2 a quarter more held-out error (docs/accuracy.md).
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsec.activation import apply_linear
from sparsec.passes.capture_fx import linear_input
from sparsec.sites import Site, SiteStats


class Seen(Exception):
    """Raised by a ``SiteInterpreter`` with ``stop_when_seen`` once every input it watches has
    arrived: the rest of the graph cannot change them."""


class SiteInterpreter(fx.Interpreter):
    """Interprets ``gm``; at each site node computes ``x @ W.T + b`` itself.

    ``stop_when_seen``: a set of input keys; the run stops (``Seen``) once each has been recorded,
    so a recovery pass over an early block costs the graph up to that block, not the whole graph.
    ``prefixes``: a ``passes.prefix_fx.Prefixes`` recording this call: it keeps the interpreter's
    state just before the nodes it wants; a later run may start there (``run(..., initial_env=...)``).
    """

    def __init__(self, gm, nodes: dict[str, fx.Node], sites: dict[str, Site], *, stats=None, replacements=None, local=None,
                 inputs=None, pairs=None, stop_when_seen=None, banks=None, prefixes=None):
        super().__init__(gm)
        self.prefixes = prefixes
        self.banks = banks or {}  # expert-bank node -> the Pruning it runs with (passes/experts_prune.py)
        self.stop_when_seen = set(stop_when_seen) if stop_when_seen else None
        self.by_node = {node: sites[name] for name, node in nodes.items()}
        self.stats = stats
        self.replacements = replacements or {}
        self.local = local
        # recovery: ``inputs`` (input key -> None) is filled with the activations arriving there;
        # ``pairs`` (input key -> (reference 2-D input, [X_ref^T X_ref, X_ref^T X])) accumulates
        # the products of a reference run's inputs with this run's
        self.inputs = inputs
        self.pairs = pairs
        self._counted: set[str] = set()  # inputs already in the statistics this run (gate and up share one)
        self.kept_positions: torch.Tensor | None = None  # per run: the attention mask's kept (batch, position)

    def run(self, *args, **kwargs):
        self.kept_positions = token_mask(self.module, args)
        return super().run(*args, **kwargs)

    def run_node(self, n):
        if self.prefixes is not None and self.prefixes.wants(n):
            self.prefixes.take(n, self.env)
        site = self.by_node.get(n)
        if site is None:
            pruning = self.banks.get(n)
            if pruning is not None:
                x, idx, wts, _, _, impl = self.fetch_args_kwargs_from_env(n)[0]
                return pruning.run(x, idx, wts, impl)
            return super().run_node(n)
        x = self._activation(n)
        key = site.input_key
        if key not in self._counted:
            self._counted.add(key)
            x2d = kept_rows(x.detach(), self.kept_positions)
            if self.stats is not None and key in self.stats:
                self.stats[key].add(x2d)
            if self.inputs is not None and key in self.inputs:
                self.inputs[key] = x2d.clone()
            if self.pairs is not None and key in self.pairs:
                reference, (dense, cross) = self.pairs[key]
                ref = reference.to(dense.dtype)
                dense.addmm_(ref.T, ref)
                cross.addmm_(ref.T, x2d.to(dense.dtype))
            if self.stop_when_seen is not None and self.stop_when_seen <= self._counted:
                raise Seen()
        weight = self.replacements.get(site.name)
        if weight is None:
            return F.linear(x, site.weight.to(x.dtype), _bias(site, x))
        out = apply_linear(x, weight, _bias(site, x))
        if self.local is not None:
            # summed on the device: a host read per layer per call stalled a GPU run once per layer
            ref = F.linear(x, site.weight.to(x.dtype), _bias(site, x))
            diff = kept_rows((out - ref).float(), self.kept_positions)
            refs = kept_rows(ref.float(), self.kept_positions)
            sums = torch.stack([(diff * diff).sum(dtype=torch.float64), (refs * refs).sum(dtype=torch.float64)])
            if site.name in self.local:
                self.local[site.name] += sums
            else:
                self.local[site.name] = sums
        return out

    def _activation(self, n: fx.Node) -> torch.Tensor:
        x_node = linear_input(n)
        return self.env[x_node] if isinstance(x_node, fx.Node) else x_node


POSITIONAL = re.compile(r"^l_args_(\d+)_$")
NAMES_KEY = "sparsec_positional_names"


def name_positional_inputs(gm, names: list[str] | None) -> None:
    """Record on ``gm`` the forward parameter names its ``args_N`` placeholders stand for."""
    if names and hasattr(gm, "meta"):
        gm.meta[NAMES_KEY] = list(names)


def _input_name(gm, node: fx.Node) -> str:
    name = str(node.target).lower()
    found = POSITIONAL.match(node.name.lower())
    names = getattr(gm, "meta", {}).get(NAMES_KEY) or []
    if found and int(found.group(1)) < len(names):
        return names[int(found.group(1))].lower()
    return name + " " + node.name.lower()


def kept_positions(name: str, value) -> torch.Tensor | None:
    """The positions an input keeps (bool, batch x position) when it is an attention mask: named
    ``attention_mask``, a 2-D 0/1 tensor with some positions masked out; else None. The one rule
    of both front-ends (the ONNX one passes its graph inputs' names and arrays)."""
    if "attention_mask" not in name.lower() or not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    if value.is_complex() or (value.is_floating_point() and not bool(((value == 0) | (value == 1)).all())):
        return None  # an additive or soft mask: not a plain list of positions
    keep = value.detach() != 0
    return None if bool(keep.all()) or not bool(keep.any()) else keep


def token_mask(gm: fx.GraphModule, args) -> torch.Tensor | None:
    """``kept_positions`` of the graph's first input that is an attention mask, if any."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, value in zip(placeholders, args):
        keep = kept_positions(_input_name(gm, node), value)
        if keep is not None:
            return keep
    return None


def kept_rows(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``x`` as rows of its last dimension, less the masked positions where ``x`` is laid out over
    them: its leading dimensions are exactly the mask's (batch, position). An activation flattened
    to rows, or laid out position-first, keeps every row (its order cannot be told)."""
    x2d = x.reshape(-1, x.shape[-1])
    if keep is None or tuple(x.shape[:-1]) != tuple(keep.shape):
        return x2d
    return x2d[keep.reshape(-1).to(x2d.device)]


def _bias(site: Site, x: torch.Tensor):
    return None if site.bias is None else site.bias.to(x.dtype)


def flatten_outputs(out, detach: bool = True) -> list[torch.Tensor]:
    """Floating-point tensors of a graph's output, in a stable order (still in the autograd graph
    with ``detach=False``)."""
    if isinstance(out, torch.Tensor):
        return [out.detach() if detach else out] if out.is_floating_point() else []
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item, detach)]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k], detach)]
    return []


def empty_stats(sites: list[Site]) -> dict[str, SiteStats]:
    stats: dict[str, SiteStats] = {}
    for s in sites:
        stats.setdefault(s.input_key, SiteStats.empty(s.K))
    return stats
