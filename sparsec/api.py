"""``sparsec.optimize``: the programmatic entry, usable without torch.compile's options plumbing."""

from __future__ import annotations

import functools
import itertools
import sys
import types
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

    if _importable(model):
        entry = torch.compile(_own_entry(), backend=backend)
        compiled = functools.partial(entry, model)
    else:  # Dynamo reaches an inlined function's globals by importing its module: trace the model's own frame
        compiled = torch.compile(model, backend=backend)
    try:
        with torch.no_grad(), _room_to_compile():
            compiled(*example_inputs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(inner, SparsecError):
            raise inner from None
        raise
    if session.report is None:
        raise ModelError("torch.compile captured no graph from this model; nothing to plan")
    return Result(module=Rewritten(model, compiled) if lower else None, plan=session.plan, report=session.report)


class Rewritten(torch.nn.Module):
    """The user's model behind its own compiled entry: calling it runs the rewritten graph.

    ``original`` is the user's model, unchanged (its parameters are this module's parameters).
    """

    def __init__(self, model, compiled):
        super().__init__()
        if isinstance(model, torch.nn.Module):
            self.original = model
        else:
            object.__setattr__(self, "original", model)
        object.__setattr__(self, "_compiled", compiled)

    def forward(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)


_ENTRIES = itertools.count()


def _importable(model) -> bool:
    """Whether the module defining the model's class (or function) can be imported by name."""
    owner = model if not isinstance(model, torch.nn.Module) else type(model)
    name = getattr(owner, "__module__", None)
    return bool(name) and name in sys.modules


def _room_to_compile():
    """Dynamo's recompile limits, raised for this one capture (see ``_own_entry``)."""
    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)]
    return config.patch(**{n: getattr(config, n) + 4096 for n in names})


def _own_entry():
    """A function that calls its first argument, with a code object of its own.

    Dynamo keeps compiled entries per code object and, past its recompile limit (8), silently runs
    a frame eagerly from then on. Compiling the model's own forward would pile every optimize()
    call's entries (each with its own backend) onto one code object shared by every instance of
    the class, until a later call captured nothing. A fresh code object per call keeps each
    result's entries to itself, and they go when the result goes.
    """

    def call(model, *args, **kwargs):
        return model(*args, **kwargs)

    code = call.__code__.replace(co_name=f"sparsec_optimized_{next(_ENTRIES)}")
    return types.FunctionType(code, call.__globals__, code.co_name)
