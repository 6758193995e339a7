"""``sparsec.optimize``: the programmatic entry, usable without torch.compile's options plumbing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparsec.errors import ModelError, OptionError, SparsecError
from sparsec.options import parse_options


@dataclass
class Result:
    """``module`` runs the rewritten model (None when ``lower=False``); ``plan`` and ``report`` say what and why."""

    module: Any
    plan: Any
    report: Any


def optimize(model, example_inputs, *, lower: bool = True, **options) -> Result:
    """Plan (and with ``lower=True`` build) the rewrite of ``model``'s linear layers.

    ``example_inputs`` is one call's positional arguments (a tuple) or a single tensor; it is the
    calibration data unless ``calibration=[...]`` is given. Options are those of the
    torch.compile backend (DESIGN.md). The user's module and its parameters are never modified.
    """
    from sparsec.backend import Session

    if not callable(model):
        raise ModelError(f"model must be a torch.nn.Module or callable, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise OptionError("example_inputs must be a tensor or a tuple of the model's positional arguments")
    session = Session(parse_options(options, lower=lower), entry="optimize")

    def backend(gm, inputs):
        lowered = session.run_graph(gm, inputs)
        return gm.forward if lowered is None else lowered

    compiled = torch.compile(model, backend=backend, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*example_inputs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(inner, SparsecError):
            raise inner from None
        raise
    if session.report is None:
        raise ModelError("torch.compile captured no graph from this model; nothing to plan")
    return Result(module=compiled if lower else None, plan=session.plan, report=session.report)
