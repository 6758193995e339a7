"""Expert banks in an FX graph: found, timed on their own calibration routing, and given the fastest
implementation.

A bank that runs through sparsec's op (``sparsec.experts.use_sparsec_experts``) is one node,
``sparsec::experts_swiglu(x, top_k_index, top_k_weights, gate_up, down, impl)``. Its inputs on the
calibration calls are recorded (the router's real choices: tokens per expert), every
implementation is timed on them here, on this device, as the model runs it (sparsec's one clock:
back to back, replayed in a CUDA graph under graph replay), and the node takes the fastest: the
choice is measured, never assumed. Planning here for another device (a fingerprint that describes
another one and has expert banks, ``sparsec fingerprint measure --experts``), the fingerprint's
predictions decide instead; the row gives whichever figures exist. Under CUDA-graph replay
(``mode="reduce-overhead"``) the ``loop`` implementation is not a candidate: it reads which
experts were hit on the host. On CUDA a dense bank is also timed ``inline`` (its ops compiled by
inductor, as ``inline_banks`` leaves them in the lowered graph), so that the form transformers'
own forward takes, compiled with the graph, is among the choices. Every implementation computes the same function (float32
accumulation), so the choice spends no error budget.

A bank traced through transformers' own implementations (3-D expert weights used by
``grouped_mm``, ``batched_mm`` or the eager loop) is reported as skipped, with its shape and how to
let sparsec plan it.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from sparsec.passes.capture_fx import ConstantFolder, qualified_name
from sparsec.passes import experts_prune
from sparsec.passes.experts_prune import Pruning
from sparsec.sites import Skipped

EXPERT_WEIGHT = re.compile(r"(gate_up_proj|down_proj|up_proj|w1|w2|w3)$")
REPEATS = 7      # samples per implementation (the median counts), after WARMUP passes
WARMUP = 2
# Another form replaces ``inline`` (the form the model's own forward compiles to) only when it times
# this much faster: on an H200 at 256 tokens, banks that timed ``grouped`` marginally faster alone
# made the whole stack 1.4% slower than the model as it came (docs/benchmarks.md).
OWN_FORM_MARGIN = 0.03


@dataclass
class Bank:
    name: str
    node: fx.Node
    gate_up: torch.Tensor
    down: torch.Tensor
    graph: int
    inputs: tuple | None = None          # (x, top_k_index, top_k_weights) of the first recorded call
    counts: torch.Tensor | None = None   # tokens routed to each expert over the recorded calls
    calls: int = 0
    pruning: Pruning | None = None     # the experts dropped, when the budget allowed it
    timings: dict = field(default_factory=dict)
    structured: object = None          # the experts' structured form (passes/experts_formats.py), if any

    @property
    def shape(self) -> list[int]:
        """[E, I, H]: E experts, each H -> 2I (gate and up) -> H."""
        E, two_i, H = self.gate_up.shape
        return [int(E), int(two_i // 2), int(H)]


def is_experts_op(node: fx.Node) -> bool:
    """A call of ``sparsec::experts_swiglu`` (a bank as traced; not one sparsec already rewrote into a
    structured form's op)."""
    return node.op == "call_function" and re.fullmatch(r"sparsec\.experts_swiglu(\.default)?", str(node.target)) is not None


def find_banks(gm: fx.GraphModule, example_inputs, graph: int = 0, names: dict[int, str] | None = None,
               ) -> tuple[list[Bank], list[Skipped]]:
    """Banks running sparsec's op, and banks traced otherwise (skipped, with why)."""
    folder = ConstantFolder(gm, example_inputs, names)
    banks, used = [], set()
    for node in gm.graph.nodes:
        if not is_experts_op(node):
            continue
        ok_gu, gate_up = folder.resolve(node.args[3])
        ok_d, down = folder.resolve(node.args[4])
        if not (ok_gu and ok_d and isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
            continue
        used.update(n for n in node.args[3:5] if isinstance(n, fx.Node))
        banks.append(Bank(_bank_name(node, folder), node, gate_up.detach(), down.detach(), graph))
    skipped = []
    others: dict[str, list[tuple[str, tuple]]] = {}
    for node, value in folder.values.items():
        source = folder.sources.get(node) or ""
        if node in used or not isinstance(value, torch.Tensor) or value.dim() != 3 or not EXPERT_WEIGHT.search(source):
            continue
        module, _, weight = source.rpartition(".")
        others.setdefault(module, []).append((weight, tuple(value.shape)))
    for module, weights in sorted(others.items()):
        shapes = ", ".join(f"{w} {list(s)}" for w, s in sorted(weights))
        skipped.append(Skipped(module, "experts", (
            f"expert bank ({shapes}) traced through the model's own experts implementation, which sparsec "
            "does not rewrite; run it through sparsec.experts.use_sparsec_experts(model) (transformers 5) so "
            "that sparsec times its implementations and picks one")))
    return banks, skipped


def _bank_name(node: fx.Node, folder: ConstantFolder) -> str:
    source = folder.source(node.args[3]) if isinstance(node.args[3], fx.Node) else None
    if source:  # the module holding the weights; the weight itself where the model's root holds it
        return source.rpartition(".")[0] or source
    stack = node.meta.get("nn_module_stack")
    return qualified_name(list(stack.values())[-1][0]) if stack else node.name


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps what each bank receives."""

    def __init__(self, gm, banks: dict[fx.Node, Bank]):
        super().__init__(gm)
        self.banks = banks

    def run_node(self, n):
        bank = self.banks.get(n)
        if bank is not None:
            x, idx, wts = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args[:3])
            E = bank.gate_up.shape[0]
            hist = torch.bincount(idx.reshape(-1).long().cpu(), minlength=E)[:E]
            bank.counts = hist if bank.counts is None else bank.counts + hist
            bank.calls += 1
            if bank.inputs is None:
                bank.inputs = (x.detach().clone(), idx.detach().clone(), wts.detach().clone())
        return super().run_node(n)


def record(gm: fx.GraphModule, banks: list[Bank], calls: list[list]) -> None:
    """Each bank's routing over ``calls`` (argument lists of ``gm``: every calibration call, as the
    confidence that an expert is rare grows with the pairs seen) and its first call's inputs. ``gm``
    may be the graph traced for calibration inputs of other shapes: its banks are found by name."""
    by_name = {b.node.name: b for b in banks}
    by_node = {n: by_name[n.name] for n in gm.graph.nodes if n.name in by_name and is_experts_op(n)}
    with torch.no_grad():
        for args in calls:
            _Recorder(gm, by_node).run(*args)


def time_impls(bank: Bank, impls, graph_replay: bool, failed: dict | None = None) -> dict[str, float]:
    """Microseconds of each implementation on the bank's recorded inputs, timed as the model runs it
    (sparsec's Clock: back to back, replayed as a CUDA graph under graph replay). With ``failed``,
    an implementation that raises is left out and its error recorded there instead."""
    from sparsec.codegen.experts import experts_op

    x, idx, wts = bank.inputs
    gate_up, down = bank.gate_up.to(x.device), bank.down.to(x.device)
    calls = {}
    for impl in impls:
        if impl == "inline":  # compiled on its first (warm-up) call, as the graph will compile it
            calls[impl] = lambda: compiled_inline(x, idx, wts, gate_up, down)(x, idx, wts, gate_up, down)
        else:
            calls[impl] = lambda impl=impl: experts_op(x, idx, wts, gate_up, down, impl)
    return _time_each(calls, x.device, graph_replay, failed)


_INLINE_COMPILED: dict[tuple, object] = {}


def compiled_inline(x, idx, wts, gate_up, down, remap=None):
    """``experts_inline`` compiled by inductor for these inputs' shapes (once per shape in a
    process; weights are inputs, so banks of one shape share it): the bank as ``inline_banks``
    leaves it in the graph, timed on its own. With ``remap`` (a pruned bank, ``apply_pruning``) the
    routing through ``route_kept`` is compiled with it, as the lowered graph holds both; the
    function then takes ``remap`` as its last argument."""
    inputs = (x, idx, wts, gate_up, down) + ((remap,) if remap is not None else ())
    key = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs)
    fn = _INLINE_COMPILED.get(key)
    if fn is None:
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from sparsec.codegen.experts import experts_inline, route_kept

        graph = fx.Graph()
        names = ("x", "top_k_index", "top_k_weights", "gate_up", "down") + (("remap",) if remap is not None else ())
        args = tuple(graph.placeholder(name) for name in names)
        index, weights = args[1], args[2]
        if remap is not None:
            routed = graph.call_function(route_kept, (index, weights, args[5]))
            index = graph.call_function(operator.getitem, (routed, 0))
            weights = graph.call_function(operator.getitem, (routed, 1))
        graph.output(graph.call_function(experts_inline, (args[0], index, weights, args[3], args[4])))
        with _outside_tracing():  # not the graph being planned's compile context (its fake tensors)
            fn = compile_fx(fx.GraphModule(torch.nn.Module(), graph), list(inputs),
                            config_patches=list_mode_options("default"))
        _INLINE_COMPILED[key] = fn
    return fn


def pruned_call(pruning, x, idx, wts, impl: str):
    """A call running ``pruning``'s bank as the lowered graph will: routed through ``route_kept``,
    then its kept experts in ``impl``; for ``inline``, the two compiled together by inductor, so
    that it is timed as the bank it would replace is (``time_impls``)."""
    if impl != "inline":
        return lambda: pruning.run(x, idx, wts, impl)
    gate_up, down = pruning.gate_up.to(x.device), pruning.down.to(x.device)
    remap = pruning.remap.to(x.device)
    return lambda: compiled_inline(x, idx, wts, gate_up, down, remap)(x, idx, wts, gate_up, down, remap)


def _outside_tracing():
    import contextlib

    tracing = getattr(torch._guards, "tracing", None)
    return tracing(None) if tracing is not None else contextlib.nullcontext()


def inline_banks(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every bank whose implementation is ``inline`` calling ``experts_inline`` from the
    graph instead of the op (a new graph over the same module; ``gm`` itself unchanged), for
    inductor to compile with its neighbours; ``gm`` itself where there is none."""
    from sparsec.codegen.experts import experts_inline
    from sparsec.passes.rewrite_fx import finish_rewrite

    if not any(is_experts_op(n) and n.args[5] == "inline" for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, node_map))
    for node in graph.nodes:
        if is_experts_op(node) and node.args[5] == "inline":
            node.target, node.args, node.kwargs = experts_inline, tuple(node.args[:5]), {}
    out = fx.GraphModule(gm, graph)
    finish_rewrite(gm, out, node_map)
    return out


def _time_each(calls: dict, device, graph_replay: bool, failed: dict | None = None) -> dict[str, float]:
    """``_time`` of each named call; with ``failed``, a call that raises is recorded there (its error's
    first line) rather than ending planning: a kernel that cannot run on this device is one candidate
    fewer."""
    out = {}
    for name, call in calls.items():
        if failed is None:
            out[name] = _time(call, device, graph_replay)
            continue
        try:
            out[name] = _time(call, device, graph_replay)
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate refuses that candidate alone
            first = str(exc).splitlines()[0] if str(exc) else ""
            failed[name] = f"failed to run here ({type(exc).__name__}: {first})"
    return out


def _time(call, device, graph_replay: bool) -> float:
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    clock = Clock(device, TimingPolicy(repeats=REPEATS, min_repeats=3, warmup=WARMUP, point_budget_s=0.05))
    with torch.no_grad():
        single = clock.warm([call])
        return clock.graph([call], single) if graph_replay and clock.cuda else clock.eager([call], single)


def choose(gm: fx.GraphModule, banks: list[Bank], graph_replay: bool, fingerprint=None,
           cost_mode: str = "eager") -> list[dict]:
    """Give each recorded bank's node its fastest implementation and return the report's rows.

    Measured here, on the bank's own inputs, when this is the device the fingerprint describes (or
    the fingerprint has no expert banks); predicted by the fingerprint when it describes another
    device (planning here for a deployment there). Both figures go in the row where both exist."""
    from sparsec.codegen.experts import IMPLS, ROWS_IMPLS, TORCH_IMPLS, extra_impls, inline_usable, memory_reason

    rows = []
    for bank in banks:
        traced = bank.node.args[5]
        if bank.inputs is None:
            rows.append(_row(bank, traced, traced, {}, {}, {}, "not reached on the calibration calls: kept as traced"))
            continue
        refused = {"loop": "reads which experts were hit on the host: cannot replay in a CUDA graph"} if graph_replay else {}
        E, I, H = bank.shape
        x = bank.inputs[0]
        for impl in IMPLS:
            why = memory_reason(impl, E, int(bank.inputs[1].shape[1]), I, H, int(x.shape[0]), x.device)
            if why and impl not in refused:
                refused[impl] = why
        usable = [i for i in IMPLS if i not in refused] or ["grouped"]
        elsewhere = _other_device(fingerprint, bank.inputs[0])
        if elsewhere is None:
            usable += list(extra_impls(x, int(bank.inputs[1].shape[1]), bank.gate_up, bank.down))
            if inline_usable(x, bank.gate_up, bank.down):
                usable.append("inline")
        asked = usable + (list(TORCH_IMPLS + ROWS_IMPLS) if elsewhere is not None else [])
        predicted = _predictions(bank, asked, fingerprint, cost_mode)
        if elsewhere is not None:  # those the other device's fingerprint measured (their kernels ran there)
            usable += [i for i in TORCH_IMPLS + ROWS_IMPLS if i in predicted]
        by_prediction = elsewhere is not None and len(predicted) == len(usable)
        failed: dict[str, str] = {}
        bank.timings = {} if by_prediction else time_impls(bank, usable, graph_replay, failed)
        if failed and not bank.timings:
            raise RuntimeError(f"no implementation of expert bank {bank.name} runs here: "
                               + "; ".join(f"{i} {why}" for i, why in failed.items()))
        refused.update(failed)
        usable = [i for i in usable if i not in failed]
        basis = predicted if by_prediction else bank.timings
        best = min(usable, key=lambda i: basis[i])
        tokens = int(bank.inputs[0].shape[0])
        own = "inline" if "inline" in usable and "inline" in basis else None
        if own and best != own and basis[best] * (1 + OWN_FORM_MARGIN) > basis[own]:
            reason = (f"inline kept at {tokens} tokens ({basis[own]:.1f} us): {best} "
                      f"{'predicted' if by_prediction else 'measured'} {basis[best]:.1f} us, under "
                      f"{OWN_FORM_MARGIN:.0%} faster, a gain a bank timed alone does not show in the graph")
            best = own
        else:
            base = basis.get(traced)
            versus = f", {base / basis[best]:.2f}x the traced {traced}'s {base:.1f} us" if base and traced != best else ""
            how = (f"predicted fastest on {fingerprint.name} ({elsewhere})" if by_prediction
                   else "measured fastest")
            reason = f"{best} {how} at {tokens} tokens ({basis[best]:.1f} us{versus}) on the bank's calibration routing"
        bank.node.args = (*bank.node.args[:5], best)
        rows.append(_row(bank, traced, best, bank.timings, predicted, refused, reason))
    if banks:
        gm.recompile()
    return rows


def _predictions(bank: Bank, impls, fingerprint, cost_mode: str) -> dict[str, float]:
    predict = getattr(fingerprint, "predict_experts", None)
    if predict is None:
        return {}
    E, I, H = bank.shape
    x, idx, _ = bank.inputs
    out = {}
    for impl in impls:
        found = predict(impl, E, int(idx.shape[1]), I, H, int(x.shape[0]), x.dtype, cost_mode)
        if found is not None:
            out[impl] = found.us
    return out


def _other_device(fingerprint, x: torch.Tensor) -> str | None:
    """Why the fingerprint is not of the device the bank's inputs live on, or None if it is."""
    matches = getattr(fingerprint, "matches_current_device", None)
    return None if matches is None else matches("cuda" if x.is_cuda else "cpu")


def _row(bank: Bank, traced: str, chosen: str, timings: dict, predicted: dict, refused: dict, reason: str) -> dict:
    from sparsec.codegen.experts import IMPLS, INLINE_IMPLS, ROWS_IMPLS, TORCH_IMPLS

    x = bank.inputs[0] if bank.inputs is not None else None
    counts = bank.counts.tolist() if bank.counts is not None else None
    basis = timings or predicted
    candidates = []
    for impl in IMPLS + tuple(i for i in TORCH_IMPLS + ROWS_IMPLS + INLINE_IMPLS if i in basis or i in refused):
        why = refused.get(impl)
        if why is None and impl in basis and impl != chosen:
            how = "measured" if timings else "predicted"
            why = f"{how} {basis[impl]:.1f} us against {basis[chosen]:.1f} us"
        candidates.append({"implementation": impl, "measured_us": timings.get(impl),
                           "predicted_us": predicted.get(impl), "rejected_because": why})
    return {
        "name": bank.name, "op": "experts", "graph": bank.graph, "shape": bank.shape,
        "top_k": int(bank.inputs[1].shape[1]) if bank.inputs is not None else None,
        "tokens": int(x.shape[0]) if x is not None else None,
        "dtype": str(bank.gate_up.dtype).removeprefix("torch."),
        "tokens_per_expert": counts, "calibration_calls": bank.calls,
        "implementation": chosen, "traced_implementation": traced,
        "measured_us": timings.get(chosen), "measured_us_traced": timings.get(traced),
        "predicted_us": predicted.get(chosen),
        "reason": reason, "candidates": candidates,
    }


def prune(banks: list[Bank], rows: list[dict], evaluate, allowed: float, graph_replay: bool, fingerprint=None,
          cost_mode: str = "eager", show=None) -> None:
    """Drop the experts calibration routes almost nothing to, within ``allowed`` end-to-end error
    (``passes/experts_prune.py``), and add each bank's ``pruning`` entry to its row. A bank's drop
    counts only if the bank without them runs faster: timed here as it runs (its chosen
    implementation, on its calibration routing), or predicted when the fingerprint describes
    another device."""
    def faster(bank: Bank, pruning):
        return pruned_speed(bank, pruning, graph_replay, fingerprint, cost_mode)

    kwargs = {"show": show} if show is not None else {}
    entries = experts_prune.choose([b for b in banks if b.inputs is not None], evaluate, allowed, faster, **kwargs)
    for row in rows:
        if row["name"] in entries:
            row["pruning"] = entries[row["name"]]


def pruned_speed(bank: Bank, pruning, graph_replay: bool, fingerprint=None,
                 cost_mode: str = "eager") -> tuple[float, float, str]:
    """(us without the dropped experts, us as the bank runs now, how they were found) in the bank's
    chosen implementation on its calibration routing: predicted by the fingerprint when it describes
    another device, else timed here."""
    impl = bank.node.args[5]
    x, idx, wts = bank.inputs
    elsewhere = _other_device(fingerprint, x)
    predict = getattr(fingerprint, "predict_experts", None)
    if elsewhere is not None and predict is not None:
        E, I, H = bank.shape
        now = predict(impl, E, int(idx.shape[1]), I, H, int(x.shape[0]), x.dtype, cost_mode)
        after = predict(impl, len(pruning.keep), int(idx.shape[1]), I, H, int(x.shape[0]), x.dtype, cost_mode)
        if now is not None and after is not None:
            return after.us, now.us, f"is predicted by {fingerprint.name} to take"
    now = bank.timings.get(impl)
    if now is None:
        now = time_impls(bank, [impl], graph_replay)[impl]
    after = _time(pruned_call(pruning, x, idx, wts, impl), x.device, graph_replay)
    return after, now, "measured"


def forced_forms(banks: list[Bank], plan) -> dict[str, tuple[str, object] | None]:
    """The forms a plan's ``experts`` entries ask of these banks: bank name -> (label, fit), or None
    for dense; banks the plan leaves ``auto`` are not named."""
    from functools import partial

    from sparsec.passes import experts_block, experts_lowrank, experts_twofour

    out = {}
    for bank in banks:
        form = plan.resolve_bank(bank.name) if plan is not None else "auto"
        if form == "auto":
            continue
        if form == "dense":
            out[bank.name] = None
        elif form == "2:4":
            out[bank.name] = (experts_twofour.LABEL, experts_twofour.fit)
        elif form.startswith("block:"):
            _, side, density = form.split(":")
            out[bank.name] = (f"block {float(density):g} of blocks",
                              partial(experts_block.fit, density=float(density), block=int(side)))
        else:
            share = float(form.split(":")[1])
            out[bank.name] = (f"lowrank {share:g} of break-even", partial(experts_lowrank.fit, fraction=share))
    return out


def structure(banks: list[Bank], rows: list[dict], evaluate, allowed: float, graph_replay: bool, fingerprint=None,
              show=None, forced=None, refused: str | None = None) -> None:
    """Run the banks' experts in a structured form (low rank, 2:4, block) where that measures faster, within
    ``allowed`` end-to-end error in all, or where the plan's ``forced`` forms say
    (``passes/experts_formats.py``), and add each bank's ``expert_format`` entry to its row;
    ``refused``: why banks the plan leaves to sparsec stay dense without being tried."""
    from sparsec.passes import experts_block, experts_formats, experts_lowrank, experts_twofour

    live = [b for b in banks if b.inputs is not None]
    elsewhere = _other_device(fingerprint, live[0].inputs[0]) if live else None
    kwargs = {"show": show} if show is not None else {}

    def speed(bank, rewrite, impls):
        return structured_speed(bank, rewrite, impls, graph_replay)

    forms = (experts_lowrank.candidates() + [c for c in experts_twofour.candidates() if _fours(live)]
             + (experts_block.candidates() if experts_block.applicable(live) else []))
    entries = experts_formats.choose(live, forms, evaluate, allowed, speed, graph_replay, elsewhere,
                                     forced=forced or {}, refused=refused, **kwargs)
    for row in rows:
        if row["name"] in entries:
            row["expert_format"] = entries[row["name"]]


def _fours(banks: list[Bank]) -> bool:
    """Whether every bank's projections take inputs in fours (2:4's groups)."""
    return all(b.gate_up.shape[2] % 4 == 0 and b.down.shape[2] % 4 == 0 for b in banks)


def structured_speed(bank, rewrite, impls, graph_replay: bool) -> tuple[float, str, float]:
    """(us of the rewritten bank in its fastest implementation, that implementation, us of the bank
    as it runs now), each timed here on the bank's calibration routing."""
    x, idx, wts = bank.inputs
    impl = bank.node.args[5]
    pruning = getattr(bank, "pruning", None)
    if pruning is not None:
        now = _time(pruned_call(pruning, x, idx, wts, impl), x.device, graph_replay)
    else:
        now = bank.timings.get(impl) or time_impls(bank, [impl], graph_replay)[impl]
    failed: dict[str, str] = {}
    times = _time_each({i: (lambda i=i: rewrite.run(x, idx, wts, i)) for i in impls}, x.device, graph_replay, failed)
    if not times:  # the form runs nowhere here: it never measures faster
        return float("inf"), next(iter(failed), impls[0]), now
    best = min(times, key=times.get)
    return times[best], best, now


def refuse_pruning(rows: list[dict], reason: str, structured: str | None = None) -> None:
    """Each row's ``pruning`` (and ``expert_format``) entry when expert rewrites were not tried at all."""
    for row in rows:
        row["pruning"] = {"routing_share": None if row.get("tokens_per_expert") is None
                          else _shares(row["tokens_per_expert"]), "dropped": [], "reason": reason}
        if structured is not None:
            row["expert_format"] = {"format": None, "tried": [], "reason": structured}


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


def apply_pruning(gm: fx.GraphModule, pruned: dict[str, object]) -> fx.GraphModule:
    """A copy of ``gm`` in which each bank node named in ``pruned`` runs its kept experts (a
    ``Pruning``: their weights as new constants, its routing through ``route_kept``) or its experts
    in a structured form (``passes/experts_formats.py``: the form's own op on its tensors, routed
    through ``route_kept`` where the bank was pruned too). The copy keeps what Dynamo's
    graph carried, so the lowered graph compiles as the rewritten one did."""
    from sparsec.codegen.experts import route_kept
    from sparsec.passes.rewrite_fx import finish_rewrite

    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, node_map))
    new_gm = fx.GraphModule(gm, graph)
    by_name = {n.name: n for n in new_gm.graph.nodes}
    for i, (name, rewrite) in enumerate(pruned.items()):
        node = by_name[name]
        x, idx, wts, _, _, impl = node.args
        prefix = f"sparsec_pruned_{i}"
        tensors = rewrite.tensors()
        for key, tensor in tensors.items():
            new_gm.register_buffer(f"{prefix}_{key}", tensor)
        with new_gm.graph.inserting_before(node):
            weights_in = [new_gm.graph.get_attr(f"{prefix}_{key}") for key in tensors]
            index, weights = idx, wts
            if rewrite.remap is not None:
                new_gm.register_buffer(f"{prefix}_remap", rewrite.remap.to(next(iter(tensors.values())).device))
                remap = new_gm.graph.get_attr(f"{prefix}_remap")
                routed = new_gm.graph.call_function(route_kept, (idx, wts, remap))
                index = new_gm.graph.call_function(operator.getitem, (routed, 0))
                weights = new_gm.graph.call_function(operator.getitem, (routed, 1))
        node.target = rewrite.op()
        node.args = (x, index, weights, *weights_in, rewrite.impl or impl)
    finish_rewrite(gm, new_gm, node_map)
    return new_gm
