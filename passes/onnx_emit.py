"""The ONNX subgraph each format is written as, shared by the rewrite and the onnxruntime fingerprint.

One function, ``emit_product``, writes ``y = x @ W^T`` for a weight stored in a format, using
standard ops only, so any runtime runs it and the fingerprint measures exactly what is written.
Each family's form (``MatMulForm`` and its kin) lives beside its pass (``HANDLER.onnx`` in
``passes/<format>.py``): dense, ``2:4`` and ``block`` are one MatMul on a [K, N] initializer,
``lowrank:R`` two MatMuls, ``monarch:NB`` batched MatMuls between reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sparsec.formats import FormatSpec, LowRank

FORMAT_KEY = "sparsec.format"
LAYER_KEY = "sparsec.layer"


@dataclass
class Emitter:
    """Nodes and initializers being written for one layer, with unique names under ``prefix``."""

    prefix: str
    taken: set[str] = field(default_factory=set)
    nodes: list = field(default_factory=list)  # onnx.NodeProto
    initializers: list = field(default_factory=list)  # onnx.TensorProto
    metadata: dict[str, str] = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        name, i = f"{self.prefix}/{hint}", 1
        while name in self.taken:
            i += 1
            name = f"{self.prefix}/{hint}_{i}"
        self.taken.add(name)
        return name

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        from onnx import numpy_helper  # imported on use: the pass handlers carry forms, the FX path needs no onnx

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shape(self, hint: str, dims) -> str:
        return self.const(hint, np.asarray(list(dims), dtype=np.int64))

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.fresh(f"{op}_out")
        from onnx import helper

        node = helper.make_node(op, inputs, [output], name=self.fresh(op), **attrs)
        for key, value in self.metadata.items():
            prop = node.metadata_props.add()
            prop.key, prop.value = key, value
        self.nodes.append(node)
        return output


class MatMulForm:
    """How a format is written to ONNX (``HANDLER.onnx`` of each family's pass; dense has this one).

    This base writes one MatMul on a [K, N] initializer: dense, and the pruned formats (their
    weight with its zeros in place: a runtime with sparse kernels, such as TensorRT's sparsity
    mode, finds the pattern; the format is also recorded in the node's metadata_props)."""

    label = "MatMul"  # what onnxruntime runs, as fingerprints name the kernel

    def factors(self, spec: FormatSpec, approx: torch.Tensor, dtype: np.dtype) -> dict[str, np.ndarray]:
        """The initializers ``emit`` needs for weight ``approx`` (N, K), which has ``spec``'s structure."""
        return {"w_kn": approx.detach().to(torch.float32).T.numpy().astype(dtype)}

    def random(self, spec: FormatSpec, N: int, K: int, rng: np.random.Generator, dtype: np.dtype) -> dict[str, np.ndarray]:
        """Initializers of the right shapes for timing (values do not change onnxruntime's time, zeros aside)."""
        w = randn(rng, dtype, N, K) * self.mask(spec, N, K, rng)
        return {"w_kn": np.ascontiguousarray(w.T, dtype=dtype)}

    def mask(self, spec: FormatSpec, N: int, K: int, rng: np.random.Generator) -> np.ndarray | float:
        """Where a random weight of this format is non-zero."""
        return 1.0

    def emit(self, em: "Emitter", spec: FormatSpec, x: str, out: str, tensors: dict[str, np.ndarray],
             N: int, K: int, x_shape) -> str:
        return em.node("MatMul", [x, em.const("weight", tensors["w_kn"])], out)

    def note(self, spec: FormatSpec) -> str | None:
        """What a pruned format records for runtimes that can exploit it (None for the others)."""
        return None


def randn(rng: np.random.Generator, dtype: np.dtype, *shape: int) -> np.ndarray:
    """Gaussian values scaled by the reduced dimension, so products stay of unit size."""
    return (rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(dtype)


def lowrank_factors(approx: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [N, R], V [R, K]) with U @ V = ``approx``, a matrix of rank <= R, in O(N K R).

    A range finder (Q = orth(W @ G), G Gaussian K x R; then V = Q^T W) in float64 reproduces a
    rank-R matrix exactly, where an SVD of it converges slowly on its R..K zero singular values
    (seconds for 512 x 512 here). A matrix not of rank R falls back to the truncated SVD.
    """
    from sparsec.codegen import pack

    w = approx.detach().to(torch.float64)
    # drawn on the CPU (the same draw whatever the device), used where the weight is
    g = torch.randn(w.shape[1], rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(w.device)
    q, _ = torch.linalg.qr(w @ g)
    v = q.T @ w
    residual = float(torch.linalg.matrix_norm(w - q @ v)) / max(float(torch.linalg.matrix_norm(w)), 1e-300)
    if residual > 1e-5:  # float32 rounding of a rank-R matrix leaves ~1e-7
        t = pack(LowRank(rank), approx.detach().to(torch.float32)).tensors()
        return t["u"].to(torch.float64), t["v"].to(torch.float64)
    return q, v


def output_shape(em: Emitter, x: str, N: int, x_shape) -> str:
    """[leading dims of x..., N]: a constant when at most one leading dim is unknown, else computed."""
    if x_shape is not None:
        lead = list(x_shape[:-1])
        if sum(1 for d in lead if not d) <= 1:
            return em.shape("shape_out", [d if d else -1 for d in lead] + [N])
    shape = em.node("Shape", [x])
    lead = em.node("Slice", [shape, em.shape("lead_start", [0]), em.shape("lead_end", [-1])])
    return em.node("Concat", [lead, em.shape("n", [N])], axis=0)
