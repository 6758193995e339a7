"""``measure: True``: time what was chosen, on this device, so predicted and realised stand side by side.

Each rewritten layer is timed against dense at its own token count (random activations, rotated
buffers, median after warm-up, CUDA-graph replay when the mode is ``reduce-overhead``), and the
whole subgraph is timed rewritten against its dense self compiled the same way (inductor on
CUDA, eager on CPU). The results fill ``measured_speedup`` per layer, in the totals and end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.fingerprint.timing import Clock, TimingPolicy, rotation_count

ROTATION_BYTES = 256 << 20


def time_layer(layer, cand, options) -> tuple[float, float]:
    """(dense us, candidate us) of one layer at its token count on the device its weight is on."""
    from sparsec.codegen import linear, pack

    site = layer.site
    device = site.weight.device
    clock = Clock(device, TimingPolicy())
    graph_mode = device.type == "cuda" and options.mode == "reduce-overhead"
    w = site.weight.detach().to(dtype=site.dtype)
    b = None if site.bias is None else site.bias.detach().to(device=device, dtype=site.dtype)
    packed = pack(cand.spec, cand.weight().to(device=device, dtype=site.dtype))
    impl = cand.impl if (device.type == "cuda" and cand.impl in packed.handler.impls) else "auto"
    M = max(layer.tokens, 1)
    per_call = (M * site.K + site.N * site.K) * w.element_size()
    xs = [torch.randn(M, site.K, device=device, dtype=site.dtype) for _ in range(rotation_count(per_call, ROTATION_BYTES, cap=8))]
    with torch.no_grad():
        dense_us = _time(clock, [lambda x=x: F.linear(x, w, b) for x in xs], graph_mode)
        us = _time(clock, [lambda x=x: linear(x, packed, b, impl) for x in xs], graph_mode)
    return dense_us, us


def measure_outcome(session, outcome, gm, example_inputs) -> None:
    """Fill the report's measured speed-ups: per layer (timed by the pipeline) and the whole graph."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    clock = Clock(device, TimingPolicy())
    timed_dense = sum(l.measured_us_dense or 0.0 for l in outcome.layers if l.measured_us)
    timed = sum(l.measured_us or 0.0 for l in outcome.layers if l.measured_us)
    by_name = {l.name: l for l in outcome.layers}
    for row in outcome.report["layers"]:
        layer = by_name[row["name"]]
        if layer.measured_us and layer.measured_us_dense:
            row["measured_speedup"] = layer.measured_us_dense / layer.measured_us
            row["measured_us"], row["measured_us_dense"] = layer.measured_us, layer.measured_us_dense
        elif row["format"] == "dense":
            row["measured_speedup"] = 1.0
    if timed:
        outcome.report["totals"]["measured_speedup"] = timed_dense / timed
    if outcome.lowered is not None:
        with torch.no_grad():
            sparse_us = _time(clock, [lambda: outcome.lowered(*example_inputs)], False)
            if any(l.chosen is not None and not l.chosen.is_dense for l in outcome.layers):
                dense = _dense_callable(gm, example_inputs, device, session.options.mode)
                dense_us = _time(clock, [lambda: dense(*example_inputs)], False)
            else:  # nothing rewritten: the lowered graph is the dense graph, compiled once
                dense_us = sparse_us
        outcome.report["end_to_end"]["measured_speedup"] = dense_us / sparse_us
        outcome.report["end_to_end"]["measured_us"] = sparse_us
        outcome.report["end_to_end"]["measured_us_dense"] = dense_us


def _time(clock: Clock, calls, graph_mode: bool) -> float:
    single = clock.warm(calls)
    return clock.graph(calls, single) if graph_mode else clock.eager(calls, single)


def _dense_callable(gm, example_inputs, device, mode):
    if device.type != "cuda":
        return gm
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=list_mode_options(mode))
