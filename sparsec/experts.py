"""Expert banks of transformers 5.x models through sparsec's experts op.

transformers 5.x stores a mixture-of-experts layer's experts as 3-D weights and dispatches their
forward through a registry of implementations (``eager``, ``grouped_mm``, ``batched_mm``, ...).
``use_sparsec_experts(model)`` registers one more, ``"sparsec"``, and selects it (it also marks each
experts module with whether the op describes it, decided once, outside any trace): each bank then
runs as one call of ``sparsec::experts_swiglu`` (codegen/experts.py), which Dynamo traces as one
node, so that ``torch.compile(model, backend="sparsec")`` finds every bank, times its
implementations on the bank's own calibration routing and keeps the fastest
(``passes/experts_fx.py``). Banks the op does not describe (biases, transposed or interleaved
layouts, another gating, a norm after each expert) keep transformers' grouped implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsec.errors import SparsecError

IMPLEMENTATION = "sparsec"
DEFAULT_IMPL = "grouped"  # until planning times the bank: what transformers runs by default
REASON_ATTR = "_sparsec_experts_unsupported"  # set on each experts module: None, or why the op cannot run it


def supported(experts) -> str | None:
    """Why sparsec's op cannot run this experts module, or None when it can."""
    if not getattr(experts, "has_gate", True):
        return "experts without a gate (an activation on the up projection alone)"
    for flag, what in (("has_bias", "biases"), ("is_transposed", "transposed weights"),
                       ("has_post_expert_norm", "a norm after each expert")):
        if getattr(experts, flag, False):
            return f"experts with {what}"
    if not getattr(experts, "is_concatenated", True):
        return "gate and up rows interleaved rather than concatenated"
    act = getattr(experts, "act_fn", None)
    probe = torch.linspace(-8.0, 8.0, 65)
    try:
        same = callable(act) and torch.allclose(act(probe), F.silu(probe), atol=1e-6)
    except Exception:  # noqa: BLE001 - any activation that cannot take a probe is not SiLU to us
        same = False
    if not same:
        return f"activation {type(act).__name__}, which does not compute SiLU"
    weights = (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None))
    if any(not isinstance(w, torch.Tensor) or w.dim() != 3 for w in weights):
        return "no 3-D gate_up_proj and down_proj weights"
    from transformers.integrations import moe

    if type(experts)._apply_gate is not moe._default_apply_gate:
        return f"{type(experts).__name__} gates its experts its own way"
    return None


def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    # decided once, in use_sparsec_experts: a check here would run (and break the graph) under tracing
    if getattr(self, REASON_ATTR, "not prepared by use_sparsec_experts") is not None:
        from transformers.integrations import moe

        return moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return torch.ops.sparsec.experts_swiglu(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                            self.gate_up_proj, self.down_proj, DEFAULT_IMPL)


def register() -> None:
    """Add ``"sparsec"`` to transformers' experts implementations (idempotent)."""
    try:
        from transformers.integrations import moe
    except ImportError:
        raise SparsecError("expert banks need transformers 5 or newer (transformers.integrations.moe); "
                           "pip install -U transformers") from None
    import sparsec.codegen  # noqa: F401  (registers sparsec::experts_swiglu)

    moe.ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _forward)


def use_sparsec_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Run ``model``'s expert banks through sparsec's op (``set_experts_implementation("sparsec")``)
    and return it; raises SparsecError naming what is missing when the model cannot."""
    register()
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        raise SparsecError(f"{type(model).__name__} has no set_experts_implementation: not a transformers 5 model "
                           "with expert banks")
    for module in model.modules():
        if callable(getattr(type(module), "_apply_gate", None)):  # an experts class transformers dispatches
            setattr(module, REASON_ATTR, supported(module))
    setter(IMPLEMENTATION)
    return model


def unsupported_banks(model: torch.nn.Module) -> dict[str, str]:
    """Experts modules of a prepared model that keep transformers' grouped implementation, and why."""
    return {name: getattr(m, REASON_ATTR) for name, m in model.named_modules() if getattr(m, REASON_ATTR, None)}


def banks_outside_graphs(model: torch.nn.Module, report: dict) -> list[str]:
    """Warnings for the expert banks of ``model`` that no compiled graph showed: their weights ran
    outside the graphs sparsec planned, as transformers' eager experts loop and a textbook loop over
    an ``nn.ModuleList`` of experts do (Dynamo breaks the graph at the data-dependent selection of
    each expert's tokens)."""
    seen = {row["name"] for row in report.get("experts", [])}
    seen |= {row["name"] for row in report.get("skipped", [])}
    layers = {row["name"] for row in report.get("layers", [])}
    out = []
    for name, module in model.named_modules():
        three_d = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        weights = {f"{name}.{p}" if name else p for p, t in module.named_parameters(recurse=False) if t.dim() == 3}
        if three_d and name not in seen and not weights & seen:  # a bank the model's root holds is named by its weight
            out.append(f"expert bank {name} ({type(module).__name__}, weights {[list(p.shape) for p in three_d]}) ran "
                       "outside the compiled graphs (its experts loop breaks Dynamo's graph at the data-dependent "
                       "choice of each expert's tokens), so it was not planned; run it through "
                       "sparsec.experts.use_sparsec_experts(model) (transformers 5), which traces each bank as one op")
        elif isinstance(module, torch.nn.ModuleList) and name.rpartition(".")[2] == "experts":
            missing = [f"{name}.{i}" for i, child in enumerate(module)
                       if not any(layer == f"{name}.{i}" or layer.startswith(f"{name}.{i}.") for layer in layers)]
            if missing:
                out.append(f"experts {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} of {name} appear in no "
                           "compiled graph under their own names: a loop over experts that selects each one's tokens "
                           "breaks Dynamo's graph, and their layers are planned, if at all, per call under local "
                           "names (docs/experts.md)")
    return out
