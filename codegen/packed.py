"""A weight in one structured format (``Packed``) and the registry of per-format kernel handlers.

Every format file (dense.py, twofour.py, block.py, lowrank.py, monarch.py) defines one
``FormatKernels`` subclass and registers it here; the public functions in api.py look the handler
up by the spec's family, never by if/elif on strings.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from sparsec.errors import SparsecError
from sparsec.formats import FormatSpec, parse_spec

from ._common import dtype_reason, device_reason

_HANDLERS: dict[str, "FormatKernels"] = {}


def register(handler: "FormatKernels") -> "FormatKernels":
    _HANDLERS[handler.family] = handler
    return handler


def handler_for(spec: FormatSpec) -> "FormatKernels":
    try:
        return _HANDLERS[spec.family]
    except KeyError:
        raise SparsecError(f"no kernels registered for format {spec}") from None


class FormatKernels:
    """What a format provides: packing, expansion, a plain-torch reference and the fast path.

    ``tensors`` are always a dict name -> Tensor in the order ``names`` lists; float tensors
    carry the weight's dtype, integer ones are metadata.
    """

    family: ClassVar[str] = ""
    names: ClassVar[tuple[str, ...]] = ()
    derived: ClassVar[tuple[str, ...]] = ()  # names ``validate`` can compute when not given
    impls: ClassVar[tuple[str, ...]] = ("triton", "reference")

    def pack(self, spec, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pack (N, K) ``weight``; project it onto the format first if it lacks the structure."""
        raise NotImplementedError

    def validate(self, spec, shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check pre-packed ``tensors`` describe an (N, K) weight of ``spec``; return them completed.

        Raises SparsecError naming the first tensor that is off."""
        raise NotImplementedError

    def to_dense(self, spec, shape, tensors) -> torch.Tensor:
        raise NotImplementedError

    def reference(self, x2d, packed: "Packed", bias) -> torch.Tensor:
        raise NotImplementedError

    def fast(self, x2d, packed: "Packed", bias, impl: str) -> torch.Tensor:
        """The accelerated path for ``impl`` ('triton' or a format-specific name)."""
        raise NotImplementedError

    def kernel_reason(self, spec, N: int, K: int, dtype, device) -> str | None:
        """Format-specific refusals beyond the spec's own shape check."""
        return None

    def check(self, spec, N: int, K: int, dtype=None, device=None) -> str | None:
        return (spec.check(N, K) or dtype_reason(dtype) or device_reason(device, dtype)
                or self.kernel_reason(spec, N, K, dtype, device))

    def stack_rows(self, spec, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """The tensors of ``parts`` (weights of one spec and K) stacked along N, as one weight: layers
        that read the same input then run as one launch. None where the layout cannot stack
        (a factored format: stacking factors is not the same factorisation)."""
        return None

    def stack_pays(self, M: int) -> bool:
        """Whether one launch over stacked weights is worth taking at ``M`` tokens."""
        return True

    def epilogue_pays(self, M: int) -> bool:
        """Whether finishing the SiLU-gate or residual add in this format's launch (codegen/epilogue.py)
        is worth taking at ``M`` tokens; formats without a fused epilogue say no."""
        return False

    def epilogue_aux(self, packed: "Packed", ep) -> dict[str, torch.Tensor]:
        """Derived tensors a fused epilogue needs (e.g. a gated launch's work list), built once."""
        return {}

    def fast_epilogue(self, x2d, packed: "Packed", bias, ep, residual, impl: str, aux: dict) -> torch.Tensor:
        """The linear and its epilogue; this default runs the product, then the epilogue in torch."""
        from .epilogue import apply

        z = self.reference(x2d, packed, bias) if impl == "reference" else self.fast(x2d, packed, bias, impl)
        return apply(z, ep.gate_row, ep.up_row, ep.width, residual)

    def fast_lowrank(self, x2d, packed: "Packed", bias, t, u, impl: str) -> torch.Tensor | None:
        """The product plus a low-rank term t @ u^T (t = x V^T, computed before) in this format's own
        launch, where it has one (a sparse-plus-low-rank composite's fused path); None where not."""
        return None

    def prepare(self, packed: "Packed", impl: str) -> dict[str, torch.Tensor]:
        """Derived tensors a module should hold so ``impl`` never builds them per call."""
        return {}

    def auto_impl(self, x2d: torch.Tensor, packed: "Packed") -> str:
        """Which implementation 'auto' picks for this input (see docs/kernels.md)."""
        from ._common import triton_usable

        return "triton" if ("triton" in self.impls and triton_usable(x2d)) else "reference"


def _require_validation(spec, shape, tensors):
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise SparsecError("packed tensors must be a dict of name -> torch.Tensor")
    handler = handler_for(spec)
    missing = [n for n in handler.names if n not in tensors and n not in handler.derived]
    extra = [n for n in tensors if n not in handler.names]
    if missing or extra:
        raise SparsecError(
            f"format {spec} takes tensors {list(handler.names)}; missing {missing}, unexpected {extra}")
    return handler.validate(spec, shape, dict(tensors))


class Packed:
    """A linear layer's weight (N outputs x K inputs) stored in one format.

    ``crossover_m`` is the token count from which ``linear(impl="auto")`` switches to the format's
    large-M path (2:4: cuSPARSELt; lowrank: two GEMMs; monarch: two launches). None keeps the
    format's default (docs/kernels.md); a planner sets it from the fingerprint's measurements.
    """

    __slots__ = ("spec", "shape", "_tensors", "crossover_m", "aux")

    def __init__(self, spec: FormatSpec, shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                 crossover_m: int | None = None, aux: dict[str, torch.Tensor] | None = None):
        self.spec = spec
        self.shape = (int(shape[0]), int(shape[1]))
        self._tensors = dict(tensors)
        self.crossover_m = crossover_m
        self.aux = dict(aux or {})  # derived tensors a fast path may cache (e.g. cuSPARSELt's)

    @classmethod
    def from_tensors(cls, spec: "str | FormatSpec", shape: tuple[int, int], tensors: dict[str, torch.Tensor],
                     crossover_m: int | None = None) -> "Packed":
        """Wrap pre-factored data (e.g. U, V from a pruning pass) after checking its layout."""
        spec = parse_spec(spec)
        N, K = int(shape[0]), int(shape[1])
        reason = spec.check(N, K)
        if reason:
            raise SparsecError(f"cannot use {spec} for a {N}x{K} weight: {reason}")
        tensors = _require_validation(spec, (N, K), tensors)
        return cls(spec, (N, K), {n: tensors[n] for n in handler_for(spec).names}, crossover_m)

    @property
    def handler(self) -> FormatKernels:
        return handler_for(self.spec)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

    @property
    def dtype(self) -> torch.dtype:
        for t in self._tensors.values():
            if t.is_floating_point():
                return t.dtype
        raise SparsecError(f"packed {self.spec} holds no floating-point values")  # pragma: no cover

    @property
    def device(self) -> torch.device:
        return next(iter(self._tensors.values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of everything the format stores: values and index/position metadata."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def to_dense(self) -> torch.Tensor:
        return self.handler.to_dense(self.spec, self.shape, self._tensors)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Packed":
        """A copy on ``device`` with float values in ``dtype``; metadata keeps its integer type."""
        if dtype is not None and dtype_reason(dtype):
            raise SparsecError(dtype_reason(dtype))
        moved = {}
        for name, t in self._tensors.items():
            moved[name] = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return Packed(self.spec, self.shape, moved, self.crossover_m)

    def __repr__(self) -> str:
        N, K = self.shape
        return (f"Packed({self.spec}, shape=({N}, {K}), dtype={self.dtype}, device={self.device}, "
                f"nbytes={self.nbytes})")


def stack_rows(parts: list["Packed"]) -> "Packed | None":
    """One Packed whose rows are ``parts``' rows in order (same spec, same K), or None where the
    format cannot stack them. Each part keeps exactly the values it had: no re-packing."""
    first = parts[0]
    if len(parts) < 2 or any(str(p.spec) != str(first.spec) or p.shape[1] != first.shape[1] for p in parts):
        return None
    tensors = first.handler.stack_rows(first.spec, [p.tensors() for p in parts])
    if tensors is None:
        return None
    return Packed(first.spec, (sum(p.shape[0] for p in parts), first.shape[1]), tensors, first.crossover_m)
