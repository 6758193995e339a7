"""Timing onnxruntime sessions fairly on a busy machine, with sparsec's one timer
(``sparsec.fingerprint.timing.interleaved``).

Several runnables (sessions with their feeds) are timed in interleaved *rounds*: each round runs
every runnable ``inner`` times back to back, so a burst of load from elsewhere hits all of them
alike. Per runnable the figure is the minimum over rounds of the round's mean time per run (the
least disturbed estimate of its own cost), and a speed-up is the ratio of those minima. On a
shared machine a run is often preempted for a whole time slice, which makes a single round's
ratio meaningless (factors of 5 either way were seen on 2 busy cores) while the minimum over
many short rounds stays repeatable.

When onnxruntime computes on the calling thread alone (CPU provider, one intra-op thread), the
``thread`` clock (``time.thread_time``: CPU time of this thread) is used instead of wall time: it
does not count the time slices the operating system gave to other processes, so a busy machine
no longer inflates the figures; with an idle core the two agree (checked on this machine: within
1% on layers from 4 us to 5 ms).
"""

from __future__ import annotations

from sparsec.fingerprint.timing import interleaved


def clock_for(provider: str, threads: int | None) -> str:
    """The thread clock when onnxruntime runs on the calling thread alone, else wall time."""
    return "thread" if provider == "CPUExecutionProvider" and threads == 1 else "wall"


LAYER_TIMING_BUDGET_S = 0.5


def time_layer(site, spec, approx, M: int, provider: str, threads: int | None) -> tuple[float, float]:
    """(dense us, rewritten us) of one layer's subgraph against its dense MatMul in onnxruntime, in
    isolation at ``M`` rows, each less the time of a pass-through model of the same input (what
    a session run costs whatever it computes)."""
    import numpy as np
    import onnx
    from onnx import helper

    from sparsec.formats import Dense
    from sparsec.passes.onnx_emit import Emitter
    from sparsec.passes.onnx_forms import emit_product, factors
    from sparsec.passes.onnx_model import runner, session

    dtype = np.float16 if str(site.dtype) == "torch.float16" else np.float32
    elem = onnx.TensorProto.FLOAT16 if dtype == np.float16 else onnx.TensorProto.FLOAT

    def model_of(nodes, initializers, n_out: int):
        g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, [M, site.K])],
                              [helper.make_tensor_value_info("y", elem, [M, n_out])], initializers)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return session(m, provider, threads)

    sessions = []
    for fmt, weight in ((Dense(), site.weight), (spec, approx)):
        em = Emitter(prefix="layer", taken={"x", "y"})
        emit_product(em, fmt, "x", "y", factors(fmt, weight, dtype), site.N, site.K, [M, site.K])
        sessions.append(model_of(em.nodes, em.initializers, site.N))
    base = model_of([helper.make_node("Identity", ["x"], ["y"])], [], site.K)  # what a run costs by itself
    x = {"x": np.random.default_rng(0).standard_normal((M, site.K)).astype(dtype)}
    t = interleaved([runner(s, x, provider) for s in (*sessions, base)], budget_s=LAYER_TIMING_BUDGET_S,
                    min_rounds=8, max_rounds=100, round_s=0.002, clock=clock_for(provider, threads))
    dense_us, new_us, base_us = t.us
    return max(dense_us - base_us, 0.1 * dense_us), max(new_us - base_us, 0.1 * new_us)
