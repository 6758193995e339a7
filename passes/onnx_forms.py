"""Each format's ONNX form, found through its pass handler (``HANDLER.onnx``), and the calls the
rewrite and the onnxruntime fingerprint make on it."""

from __future__ import annotations

import numpy as np
import torch

from sparsec.formats import Dense, FormatSpec
from sparsec.passes.onnx_emit import Emitter, MatMulForm
from sparsec.passes.registry import HANDLERS

DENSE = MatMulForm()


def form_of(spec: FormatSpec):
    """The ONNX form of ``spec``'s family: its pass handler's, or the MatMul of dense."""
    if spec.family == Dense.family:
        return DENSE
    try:
        return HANDLERS[spec.family].onnx
    except (KeyError, AttributeError):
        raise ValueError(f"no ONNX form for format {spec}") from None


def has_form(family: str) -> bool:
    """Whether standard ONNX can write the format family ``family``."""
    return family == Dense.family or getattr(HANDLERS.get(family), "onnx", None) is not None


def factors(spec: FormatSpec, approx: torch.Tensor, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The initializers ``emit_product`` needs for weight ``approx`` (N, K), which has ``spec``'s structure."""
    return form_of(spec).factors(spec, approx, dtype)


def random_factors(spec: FormatSpec, N: int, K: int, rng: np.random.Generator, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Factors of the right shapes for timing (values do not change onnxruntime's time, zeros aside)."""
    return form_of(spec).random(spec, N, K, rng, dtype)


def emit_product(em: Emitter, spec: FormatSpec, x: str, out: str, tensors: dict[str, np.ndarray],
                 N: int, K: int, x_shape: list[int | None] | None = None) -> str:
    """Append the nodes computing ``out = x @ W^T`` for ``spec`` to ``em``; returns ``out``."""
    return form_of(spec).emit(em, spec, x, out, tensors, N, K, x_shape)


def declared_format_note(spec: FormatSpec) -> str | None:
    """What a pruned format records for runtimes that can exploit it (None for the others)."""
    return form_of(spec).note(spec)
