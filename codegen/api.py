"""The public kernel API: pack a weight into a format, run a linear layer on it, ask what fits.

Usable without the compiler::

    packed = pack("block:64:0.25", weight)
    y = linear(x, packed, bias)                 # Triton on CUDA / under TRITON_INTERPRET=1
    why = check("monarch:8", 1000, 4096, torch.bfloat16, "cuda")   # reason text, or None
"""

from __future__ import annotations

import inspect

import torch

from sparsec.errors import SparsecError
from sparsec.formats import FormatError, FormatSpec, parse_spec

from ._common import check_bias, flatten_input
from .packed import Packed, handler_for


def _spec(spec: "str | FormatSpec") -> FormatSpec:
    try:
        return parse_spec(spec)
    except FormatError as e:
        raise SparsecError(str(e)) from None


def pack(spec: "str | FormatSpec", weight: torch.Tensor, **calibrated) -> Packed:
    """Store ``weight`` (N, K) in format ``spec``, on its device and in its dtype.

    A weight that already has the structure packs losslessly; any other is projected by the
    format's simplest rule (magnitude for 2:4 and block, truncated SVD for lowrank, per-block
    SVD for monarch). ``weight`` is never modified. ``calibrated``: what a format learns from
    data rather than from the weight; ``act:S`` takes ``threshold`` (the input magnitude under
    which an input is skipped; default: the one that skips a fraction S of unit-normal inputs),
    ``actrot:S`` also ``rotation`` (the layer's axes Q, K x K, orthonormal; default: a random one).
    """
    spec = _spec(spec)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise SparsecError("weight must be a 2-D floating-point tensor of shape (N outputs, K inputs)")
    N, K = weight.shape
    reason = spec.check(N, K)
    if reason:
        raise SparsecError(f"cannot pack a {N}x{K} weight as {spec}: {reason}")
    handler = handler_for(spec)
    if calibrated:
        accepted = [p for p in inspect.signature(handler.pack).parameters if p not in ("spec", "weight")]
        unknown = [k for k in calibrated if k not in accepted]
        if unknown:
            raise SparsecError(f"format {spec} takes no {', '.join(map(repr, unknown))} when packing"
                               + (f"; it takes {', '.join(accepted)}" if accepted else ""))
    with torch.no_grad():
        tensors = handler.pack(spec, weight.detach(), **calibrated)
    return Packed(spec, (N, K), tensors)


def check(spec: "str | FormatSpec", N: int, K: int, dtype: torch.dtype | None = None,
          device: "torch.device | str | None" = None) -> str | None:
    """Why this format's kernel cannot take an N x K weight in ``dtype`` on ``device``; None if it can."""
    spec = _spec(spec)
    return handler_for(spec).check(spec, int(N), int(K), dtype, device)


def linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """y = x @ W^T + bias for the packed W; ``x`` is (..., K), y is (..., N) in x's dtype.

    ``impl``: "auto" (Triton on CUDA tensors and under TRITON_INTERPRET=1, the reference
    otherwise; see docs/kernels.md for each format's large-M choice), "triton", "reference", or
    a format-specific one ("cusparselt" for 2:4).
    """
    x2d, lead = _inputs("linear", x, packed, bias)
    impl = _impl(x2d, packed, impl)
    handler = packed.handler
    y = handler.reference(x2d, packed, bias) if impl == "reference" else handler.fast(x2d, packed, bias, impl)
    return y.reshape(*lead, packed.shape[0])


def linear_epilogue(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None, epilogue,
                    residual: torch.Tensor | None = None, impl: str = "auto",
                    aux: dict | None = None) -> torch.Tensor:
    """``linear`` followed by ``epilogue`` (codegen/epilogue.py): the SiLU-gate over a stacked
    gate/up weight and/or a residual add, in the same launch where the format's kernel fuses
    them (its ``fast_epilogue``), after it otherwise. ``residual`` has the output's shape;
    ``aux``: what the format's ``epilogue_aux`` built for this epilogue."""
    x2d, lead = _inputs("linear_epilogue", x, packed, bias)
    N = packed.shape[0]
    n_out = epilogue.out_features(N)
    if epilogue.gated and not (0 <= epilogue.gate_row and epilogue.gate_row + epilogue.width <= N
                               and 0 <= epilogue.up_row and epilogue.up_row + epilogue.width <= N):
        raise SparsecError(f"gated epilogue rows {epilogue.gate_row}/{epilogue.up_row} + {epilogue.width} "
                           f"fall outside the weight's {N} rows")
    r2d = None
    if residual is not None:
        if tuple(residual.shape) != (*lead, n_out):
            raise SparsecError(f"residual of shape {tuple(residual.shape)} does not match the output {(*lead, n_out)}")
        r2d = residual.reshape(-1, n_out).to(x.dtype)
    impl = _impl(x2d, packed, impl)
    y = packed.handler.fast_epilogue(x2d, packed, bias, epilogue, r2d, impl, aux or {})
    return y.reshape(*lead, n_out)


def _inputs(caller: str, x: torch.Tensor, packed, bias) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` as (M, K) and its lead shape, after checking the weight and bias it is used with."""
    if not isinstance(packed, Packed):
        raise SparsecError(f"{caller}() needs a Packed weight from sparsec.codegen.pack, got {type(packed).__name__}")
    N, K = packed.shape
    x2d, lead = flatten_input(x, K)
    check_bias(bias, N)
    return x2d, lead


def _impl(x2d: torch.Tensor, packed: Packed, impl: str) -> str:
    """The implementation to run: "auto" resolved by the format, anything else checked."""
    handler = packed.handler
    if impl == "auto":
        return handler.auto_impl(x2d, packed)
    if impl != "reference" and impl not in handler.impls:
        known = ", ".join(["auto", *dict.fromkeys(("reference", *handler.impls))])
        raise SparsecError(f"impl {impl!r} is not available for {packed.spec}; use one of: {known}")
    return impl
