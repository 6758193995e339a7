"""``sparsec.optimize``: the programmatic entry, usable without torch.compile's options plumbing."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import sys
import types
from dataclasses import dataclass
from typing import Any

import torch

from sparsec.errors import ModelError, OptionError, SparsecError, first_line
from sparsec.options import parse_options
from sparsec.state import state_kept, training_warning


@dataclass
class Result:
    """``module`` runs the rewritten model (None when ``lower=False``); ``plan`` and ``report`` say what and why."""

    module: Any
    plan: Any
    report: Any


def optimize(model, example_inputs, *, lower: bool = True, **options) -> Result:
    """Plan (and with ``lower=True`` build) the rewrite of ``model``'s linear layers.

    ``example_inputs`` is one call's positional arguments (a tuple), a single tensor, or its keyword
    arguments (a dict, as a tokenizer returns them: ``model(**example_inputs)``); it is the
    calibration data unless ``calibration=[...]`` is given. Options are those of the
    torch.compile backend (DESIGN.md). The user's module, its parameters and buffers and the
    example inputs are left as they were, even where the model writes to them when it runs.
    """
    from sparsec.backend import Session

    if not callable(model):
        raise ModelError(f"model must be a torch.nn.Module or callable, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if hasattr(example_inputs, "keys") and not isinstance(example_inputs, dict):
        example_inputs = dict(example_inputs)  # a tokenizer's BatchEncoding
    if not isinstance(example_inputs, (tuple, list, dict)):
        raise OptionError("example_inputs must be a tensor, a tuple of the model's positional arguments or a "
                          f"dict of its keyword arguments; got {type(example_inputs).__name__}")
    if isinstance(example_inputs, dict) and not all(isinstance(k, str) for k in example_inputs):
        raise OptionError("example_inputs as a dict must map the model's argument names to values")
    session = Session(parse_options(options, lower=lower), entry="optimize")
    session.names = state_names(model)
    with state_kept(model, [t for t in _values(example_inputs) if isinstance(t, torch.Tensor)]):
        compiled = _plan_in_session(session, model, example_inputs)
    if isinstance(model, torch.nn.Module):
        from sparsec.experts import banks_outside_graphs

        late = training_warning(model) + banks_outside_graphs(model, session.report.to_dict())
        session.report.add_warnings(late)
        if late and session.options.report:
            session.report.save(session.options.report)
    if session.options.plan is not None:
        data = session.report.to_dict()
        unmatched = session.options.plan.describe_unmatched(
            [x["name"] for x in [*data["layers"], *data.get("skipped", [])]],
            banks=[bank["name"] for bank in data.get("experts", [])])
        if unmatched:
            from sparsec.errors import PlanError

            raise PlanError(unmatched)
    return Result(module=rewritten(model, compiled) if lower else None, plan=session.plan, report=session.report)


def _plan_in_session(session, model, example_inputs):
    """Capture, plan and (with ``lower``) build the model's graphs through the session's backend;
    return the compiled entry that runs them."""
    if isinstance(session.options.output, str):
        session.output_probe = _named_output(model, example_inputs, session.options.output)
    else:
        returned = _runs_eagerly(model, example_inputs, "example_inputs")
        if session.options.output is None and not session.options.metric.reads_every_output:
            session.output_probe = first_float_tensor(returned)
    session.positional_names = _forward_parameters(model)

    def backend(gm, inputs):
        return session.compile_graph(gm, inputs, raise_user_errors=True)

    for what in ("calibration", "heldout"):
        items = getattr(session.options, what)
        if items:
            session.traced[what] = _trace_other_shapes(model, example_inputs, items, what, session.names)
    compiled = _compiled_entry(model, backend)
    try:
        with torch.no_grad(), _room_to_compile():
            _call(compiled, example_inputs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        inner = getattr(exc, "inner_exception", None) or exc.__cause__
        if isinstance(inner, SparsecError):
            raise inner from None
        if inner is not None and session.options.strict:
            raise inner
        raise
    except SparsecError:
        raise
    except Exception as exc:  # noqa: BLE001 - Dynamo's pages about the model failing on the user's inputs
        _model_fails(model, example_inputs, "example_inputs", exc)
    if session.report is None:
        raise ModelError(_no_graph_message(model))
    return compiled


def _forward_parameters(model) -> list[str] | None:
    """The names of the model's forward parameters that positional inputs fill, in order: the
    entry sparsec.optimize compiles passes the user's inputs on as ``*args``, so Dynamo names them
    ``args_0``, ``args_1``..."""
    import inspect

    try:
        params = inspect.signature(model.forward if isinstance(model, torch.nn.Module) else model).parameters
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [name for name, p in params.items() if p.kind in kinds]


def _no_graph_message(model) -> str:
    """Why Dynamo may have run the forward without capturing anything, and what to do about it."""
    recurrent = [f"{name or 'the model itself'} ({type(m).__name__})" for name, m in model.named_modules()
                 if isinstance(m, torch.nn.RNNBase)] if isinstance(model, torch.nn.Module) else []
    if recurrent:
        cause = (f"it does not trace torch.nn's recurrent modules, here {', '.join(recurrent[:3])}"
                 f"{', ...' if len(recurrent) > 3 else ''}. Pass the traceable part on its own (e.g. the layers "
                 "after the recurrent one as a module of their own)")
    else:
        cause = ("it skips a forward it cannot trace (e.g. one under torch._dynamo.disable, or a function in its "
                 "skip list). Pass the part it can trace on its own")
    return ("torch.compile ran the model without capturing a graph, so there is nothing to plan: " + cause
            + ", or export the model to ONNX and use `sparsec optimize model.onnx`")


class _ReadsThrough(type):
    """The class of a ``Rewritten`` reads what it lacks from the model's class (a generation loop looks
    its decoding method up on ``type(self)``)."""

    def __getattr__(cls, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(cls.__dict__.get("_model_class", object), name)


@functools.lru_cache(maxsize=None)
def _rewritten_class(model_class: type) -> type:
    return _ReadsThrough(f"Rewritten{model_class.__name__}", (Rewritten,), {"_model_class": model_class})


def rewritten(model, compiled) -> "Rewritten":
    """``Rewritten`` around ``model``, of a class that reads through to the model's own."""
    return (_rewritten_class(type(model)) if isinstance(model, torch.nn.Module) else Rewritten)(model, compiled)


class Rewritten(torch.nn.Module):
    """The user's model behind its own compiled entry: calling it runs the rewritten graph.

    ``original`` is the user's model, unchanged (its parameters are this module's parameters).
    What the model's class defines and this one does not (``generate``, ``config``, a property) is
    read through to it, with this module as ``self``: a method that calls ``self(...)`` (a
    language model's generation loop) runs the rewritten graph, not the original one.
    """

    def __init__(self, model, compiled):
        super().__init__()
        if isinstance(model, torch.nn.Module):
            self.original = model
        else:
            object.__setattr__(self, "original", model)
        object.__setattr__(self, "_compiled", compiled)
        try:  # callers that read which arguments ``forward`` takes (a generation loop) read the model's
            signature = inspect.signature(getattr(model, "forward", model))
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            def forward(*args, **kwargs):
                return compiled(*args, **kwargs)

            forward.__signature__ = signature
            object.__setattr__(self, "forward", forward)

    def forward(self, *args, **kwargs):
        return self._compiled(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (``original``)
        except AttributeError:
            pass
        original = self.__dict__.get("_modules", {}).get("original")
        if original is None:  # a plain callable, not a module
            original = self.__dict__.get("original")
        if original is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        for klass in type(original).__mro__:
            if name in vars(klass) and klass not in type(self).__mro__:
                found = vars(klass)[name]
                if hasattr(found, "__get__") and not isinstance(found, (torch.Tensor, torch.nn.Module)):
                    return found.__get__(self, type(original))  # a method or property, with this module as self
                break
        return getattr(original, name)


_ENTRIES = itertools.count()


def _compiled_entry(model, backend):
    if _importable(model):
        entry = torch.compile(_own_entry(), backend=backend)
        return functools.partial(entry, model)
    # Dynamo reaches an inlined function's globals by importing its module: trace the model's own frame
    return torch.compile(model, backend=backend)


def state_names(model) -> dict[int, str]:
    """The id of each parameter and buffer of ``model`` -> its qualified name: the first, or for a
    tensor several modules share, the first a ``torch.nn.Linear`` owns (a language model's head tied
    to its embedding table is a linear layer named ``lm_head``, not ``model.embed_tokens``)."""
    if not isinstance(model, torch.nn.Module):
        return {}
    names: dict[int, str] = {}
    owned_by_linear: set[int] = set()
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = id(tensor)
        if key in owned_by_linear:
            continue
        owner = name.rpartition(".")[0]
        try:
            linear = isinstance(model.get_submodule(owner), torch.nn.Linear)
        except AttributeError:
            linear = False
        if key not in names or linear:
            names[key] = name
        if linear:
            owned_by_linear.add(key)
    return names


def _trace_other_shapes(model, example_inputs, items, what: str, names: dict[int, str] | None = None) -> dict[int, list]:
    """For each item whose tensors' shapes differ from the example's, the graphs Dynamo traces for
    its shapes (one per subgraph, each with this item's inputs).

    The graph planned is specialised to the example's shapes (reshapes to a fixed batch, say), so
    an input of other shapes cannot run through it; the graph traced for the input's own shapes
    computes the same thing with the same parameters. One trace per distinct set of shapes."""
    from sparsec.backend import InputSlots
    from sparsec.passes import capture_fx
    from sparsec.passes.interpret_fx import name_positional_inputs
    from sparsec.passes.fx_frontend import Traced

    wanted = _shapes(example_inputs)
    traces: dict[tuple, list] = {}
    out: dict[int, list] = {}
    for index, item in enumerate(items):
        shapes = _shapes(item)
        if shapes == wanted:
            continue
        if shapes not in traces:
            _runs_eagerly(model, item, f"{what} item {index}")
            graphs: list = []

            def collect(gm, inputs, graphs=graphs):
                name_positional_inputs(gm, _forward_parameters(model))
                # read while Dynamo's metadata is on the graph: it is dropped once the compile is done
                nodes = capture_fx.capture(gm, inputs, len(graphs), names)[2]
                graphs.append((gm, list(inputs), InputSlots.of(gm), nodes))
                return gm.forward

            entry = _compiled_entry(model, collect)
            try:
                with torch.no_grad(), _room_to_compile():
                    _call(entry, item)
            except Exception as exc:  # noqa: BLE001 - the model's own failure on the user's input
                _model_fails(model, item, f"{what} item {index}", exc)
            traces[shapes] = graphs
        runs = []
        for gm, inputs, slots, nodes in traces[shapes]:
            args = slots.fill(gm, inputs, item, index, what) if slots is not None else None
            if args is None:
                break
            runs.append(Traced(gm, args, nodes))
        out[index] = runs
    return out


def _model_fails(model, inputs, what: str, exc: Exception):
    """Raise the model's own failure on ``inputs`` in one line (a ModelError), as running it eagerly
    reports it, rather than Dynamo's account of it; Dynamo's error stands if the model runs."""
    _runs_eagerly(model, inputs, what)
    raise exc


def _runs_eagerly(model, inputs, what: str):
    """Run the model once as it is, raising its failure on ``inputs`` in one line (a ModelError);
    return what it returns.

    Done before any capture: a graph that fails when sparsec runs it has torch.fx print the
    traceback and the generated code to stderr before any error can be raised, a page where one
    line says it. The caller keeps the model's state (``state_kept``)."""
    try:
        with torch.no_grad():
            return _call(model, inputs)
    except Exception as own:  # noqa: BLE001 - whatever the model raises is the user's to read
        raise ModelError(f"the model fails on {what} (shapes {_shown(inputs)}): "
                         f"{type(own).__name__}: {first_line(own)}") from None


def first_float_tensor(returned) -> torch.Tensor | None:
    """The first floating-point tensor of what a model returns, in the order it returns them (a
    ``ModelOutput``'s fields, a dict's keys as inserted, a tuple's items): the output a metric reads
    by default. A graph Dynamo traces may list other outputs first (a language model's updated
    key/value cache before its logits)."""
    if isinstance(returned, torch.Tensor):
        return returned.detach() if returned.is_floating_point() else None
    values = returned.values() if hasattr(returned, "keys") and hasattr(returned, "values") else \
        returned if isinstance(returned, (list, tuple)) else ()
    for value in values:
        found = first_float_tensor(value)
        if found is not None:
            return found
    return None


def _call(fn, inputs):
    """``fn`` on one call's inputs: keyword arguments from a dict, else positional ones."""
    return fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)


def _values(inputs):
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


def _shapes(item) -> tuple:
    values = sorted(item.items(), key=lambda kv: str(kv[0])) if isinstance(item, dict) else enumerate(item)
    return tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, type(v).__name__)
                 for k, v in values)


def _shown(item) -> str:
    values = item.values() if isinstance(item, dict) else item
    return ", ".join(str(tuple(v.shape)) for v in values if isinstance(v, torch.Tensor))


def _importable(model) -> bool:
    """Whether the module defining the model's class (or function) can be imported by name."""
    owner = model if not isinstance(model, torch.nn.Module) else type(model)
    name = getattr(owner, "__module__", None)
    return bool(name) and name in sys.modules


@contextlib.contextmanager
def _room_to_compile():
    """Dynamo's recompile limits, raised for this one capture (see ``_own_entry``); and the fake-tensor
    logger quiet meanwhile: where the model cannot run on the user's inputs it logs a traceback of
    its own before the error sparsec raises (``_model_fails``), which says it in one line."""
    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(config, n)]
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with config.patch(**{n: getattr(config, n) + 4096 for n in names}):
            yield
    finally:
        fake_log.setLevel(level)


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


def _named_output(model, example_inputs, name: str) -> torch.Tensor:
    """The float tensor ``model`` returns under ``name`` (a key of a dict or a ``ModelOutput``)."""
    try:
        with torch.no_grad():
            out = _call(model, example_inputs)
    except Exception as exc:  # noqa: BLE001 - the user's model failing on the user's inputs
        _model_fails(model, example_inputs, "example_inputs", exc)
    names = list(out.keys()) if hasattr(out, "keys") else []
    value = out[name] if name in names else None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        tensors = [repr(n) for n in names if isinstance(out[n], torch.Tensor) and out[n].is_floating_point()]
        what = ", ".join(tensors) if tensors else f"none (it returns a {type(out).__name__})"
        raise OptionError(f"option 'output' names {name!r}, but the model returns no float tensor by that name; "
                          f"its named float outputs: {what}. Name one of them, or give the output's index")
    return value.detach()
