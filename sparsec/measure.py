"""``measure: True``: time what was chosen, on this device, so predicted and realised stand side by side.

Each rewritten layer is timed against dense at its own token count (random activations, weights
and inputs rotated past the L2, median after warm-up, CUDA-graph replay when the mode is
``reduce-overhead``), and the whole subgraph is timed rewritten against its dense self compiled
the same way (inductor on CUDA, eager on CPU) by the FX front-end's check. The report shows both
beside the predictions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.fingerprint.timing import Clock, TimingPolicy, interleaved, rotation_count

ROTATION_BYTES = 256 << 20  # each timed pass reads at most this much: several times any L2
MAX_COPIES = 96  # as many as the fingerprint's cuda grid cycles through
GRAPH_BUDGET_S = 2.0  # of interleaved rounds, when a whole graph is timed against its twin on a CPU
LAYER_BUDGET_S = 0.5  # the same for one layer against dense


def time_layer(layer, cand, options, rotation_bytes: int = ROTATION_BYTES) -> tuple[float, float]:
    """(dense us, candidate us) of one layer at its token count on the device its weight is on.

    ``rotation_bytes``: what one pass of the timed calls reads, weights and inputs: the bytes of
    weights the model's forward reads (``rotation_for``), so that a layer's weight comes from
    where it comes from in the model: from memory in a model larger than the L2, from the L2 in
    one that fits it."""
    from sparsec.activation import input_scale, pack_approximation
    from sparsec.codegen import linear

    site = layer.site
    device = site.weight.device
    graph_mode = device.type == "cuda" and options.mode == "reduce-overhead"
    w = site.weight.detach().to(dtype=site.dtype)
    b = None if site.bias is None else site.bias.detach().to(device=device, dtype=site.dtype)
    packed = pack_approximation(cand.spec, cand.weight().to(device=device, dtype=site.dtype))
    impl = cand.impl if (device.type == "cuda" and cand.impl in packed.handler.impls) else "auto"
    M = max(layer.tokens, 1)
    x_bytes = M * site.K * w.element_size()
    ws = _copies(w, rotation_count(x_bytes + w.numel() * w.element_size(), rotation_bytes, cap=MAX_COPIES))
    packs = _copies(packed, rotation_count(x_bytes + packed.nbytes, rotation_bytes, cap=MAX_COPIES))
    scale = input_scale(cand.spec, packed)
    xs = [torch.randn(M, site.K, device=device, dtype=site.dtype) * scale for _ in range(max(len(ws), len(packs)))]
    dense_calls = [lambda x=x, w=w: F.linear(x, w, b) for x, w in zip(xs, ws)]
    calls = [lambda x=x, p=p: linear(x, p, b, impl) for x, p in zip(xs, packs)]
    with torch.no_grad():
        if device.type != "cuda":  # alternated, the fastest round of each (see ``time_graph``)
            found = interleaved([lambda: [c() for c in dense_calls], lambda: [c() for c in calls]],
                                budget_s=LAYER_BUDGET_S, min_rounds=5)
            return found.us[0] / len(dense_calls), found.us[1] / len(calls)
        clock = Clock(device, TimingPolicy())
        dense_us = _time(clock, dense_calls, graph_mode, lead=True)
        us = _time(clock, calls, graph_mode, lead=True)
    return dense_us, us


def rotation_for(sites) -> int:
    """The bytes a forward pass reads from the weights of ``sites`` (at most ``ROTATION_BYTES``)."""
    total = sum(s.N * s.K * s.dtype.itemsize for s in sites)
    return max(1, min(ROTATION_BYTES, total))


def _copies(weight, count: int) -> list:
    """``weight`` and ``count - 1`` copies of it (a tensor or a Packed): the calls cycle through them,
    so each call reads its weight from memory as a model's forward does, not from a cache the
    previous call left it in. A weight that fits the L2 once would otherwise time faster than it
    runs (a 25%-dense block layer of 14336 x 4096 bf16 is 29 MB against an H100's 50 MB L2)."""
    from sparsec.codegen import Packed

    if isinstance(weight, Packed):
        make = lambda: Packed(weight.spec, weight.shape, {k: t.clone() for k, t in weight.tensors().items()},  # noqa: E731
                              weight.crossover_m)
    else:
        make = weight.clone
    return [weight] + [make() for _ in range(count - 1)]


def time_graph(lowered, dense, example_inputs) -> tuple[float, float]:
    """(dense us, rewritten us) of a whole graph on its example inputs; ``dense`` None: nothing was
    rewritten, so the lowered graph is the dense one, timed once.

    On a CPU the two run in interleaved rounds and each keeps its fastest round (``interleaved``):
    a forward pass there takes long enough that the clock's few samples of each, one graph after
    the other, let a neighbour's load or the machine's drift decide the ratio. On 2 shared cores a
    MiniLM plan measured 0.87x so and 1.20x timed in alternation (docs/frontier.md)."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    with torch.no_grad():
        if device.type != "cuda":
            runs = [lambda: lowered(*example_inputs)] + ([] if dense is None else [lambda: dense(*example_inputs)])
            found = interleaved(runs, budget_s=GRAPH_BUDGET_S, min_rounds=5)
            return found.us[-1], found.us[0]
        clock = Clock(device, TimingPolicy())
        us = _time(clock, [lambda: lowered(*example_inputs)], False)
        dense_us = us if dense is None else _time(clock, [lambda: dense(*example_inputs)], False)
    return dense_us, us


def _time(clock: Clock, calls, graph_mode: bool, lead: bool = False) -> float:
    single = clock.warm(calls)
    return clock.graph(calls, single, lead=lead) if graph_mode else clock.eager(calls, single)
