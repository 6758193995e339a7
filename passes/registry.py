"""Format family -> the pass that prunes or factors a weight into it.

Each handler offers ``grid(N, K)`` (the specs worth trying for that shape), ``methods`` with a
``default_method``, and ``approximate(specs, weight, stats, method)`` returning one dense float32
reconstruction per spec that has exactly the format's structure, so codegen packs it losslessly.
"""

from __future__ import annotations

from sparsec.passes import act, actrot, block, lowrank, monarch, plus_lowrank, twofour

HANDLERS = {
    handler.family: handler
    for handler in (twofour.HANDLER, block.HANDLER, lowrank.HANDLER, monarch.HANDLER, act.HANDLER, actrot.HANDLER,
                    *plus_lowrank.HANDLERS)
}



def forget_layer_work() -> None:
    """Drop what any handler keeps between calls for one layer's specs (``forget``, where it has one):
    called once the planner is done with a layer, so that work does not outlive it."""
    for handler in HANDLERS.values():
        getattr(handler, "forget", lambda: None)()
