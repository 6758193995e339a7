"""The ONNX subgraph each format is written as, shared by the rewrite and the onnxruntime fingerprint.

One function, ``emit_product``, writes ``y = x @ W^T`` for a weight stored in a format, using
standard ops only, so any runtime runs it and the fingerprint measures exactly what is written:

* dense, ``2:4``, ``block``: one MatMul with the weight as a [K, N] initializer. The sparse
  formats are the pruned weight, zeros included (a runtime with sparse kernels, such as TensorRT's
  sparsity mode, finds the pattern; the format is also recorded in the node's metadata_props).
* ``lowrank:R``: two MatMuls, x @ V^T [K, R] then @ U^T [R, N].
* ``monarch:NB`` (layout of ``sparsec.formats.Monarch``, p = K/NB, n = N/NB, r = p/NB)::

      x [.., K] -Reshape-> [M, NB, p] -Transpose(1,0,2)-> [NB, M, p] -MatMul L^T-> z [NB, M, p]
      z -Reshape-> [NB, M, NB, r] -Transpose(2,1,3,0)-> [NB, M, r, NB] -Reshape-> [NB, M, p]
        -MatMul R^T-> [NB, M, n] -Transpose(1,0,2)-> [M, NB, n] -Reshape-> [.., N]

  The middle Reshape/Transpose/Reshape is the permutation P: chunk c takes z[b, :, c*r + t] at
  position t*NB + b.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from sparsec.formats import Block, Dense, FormatSpec, LowRank, Monarch, TwoFour

PRUNED_FAMILIES = ("2:4", "block")
FORMAT_KEY = "sparsec.format"
LAYER_KEY = "sparsec.layer"


@dataclass
class Emitter:
    """Nodes and initializers being written for one layer, with unique names under ``prefix``."""

    prefix: str
    taken: set[str] = field(default_factory=set)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
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
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def shape(self, hint: str, dims) -> str:
        return self.const(hint, np.asarray(list(dims), dtype=np.int64))

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or self.fresh(f"{op}_out")
        node = helper.make_node(op, inputs, [output], name=self.fresh(op), **attrs)
        for key, value in self.metadata.items():
            prop = node.metadata_props.add()
            prop.key, prop.value = key, value
        self.nodes.append(node)
        return output


def factors(spec: FormatSpec, approx: torch.Tensor, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The initializers ``emit_product`` needs for weight ``approx`` (N, K), which has ``spec``'s structure."""
    from sparsec.codegen import pack

    w = approx.detach().to(torch.float32)
    if isinstance(spec, (Dense, TwoFour, Block)):
        return {"w_kn": w.T.numpy().astype(dtype)}
    if isinstance(spec, LowRank):
        u, v = lowrank_factors(approx, spec.rank)
        return {"v_kr": v.T.numpy().astype(dtype), "u_rn": u.T.numpy().astype(dtype)}
    packed = pack(spec, w)
    if isinstance(spec, Monarch):
        t = packed.tensors()
        L, R = t["L"], t["R"]
        return {"l_t": L.transpose(1, 2).numpy().astype(dtype), "r_t": R.transpose(1, 2).numpy().astype(dtype)}
    raise ValueError(f"no ONNX form for format {spec}")


def lowrank_factors(approx: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [N, R], V [R, K]) with U @ V = ``approx``, a matrix of rank <= R, in O(N K R).

    A range finder (Q = orth(W @ G), G Gaussian K x R; then V = Q^T W) in float64 reproduces a
    rank-R matrix exactly, where an SVD of it converges slowly on its R..K zero singular values
    (seconds for 512 x 512 here). A matrix not of rank R falls back to the truncated SVD.
    """
    from sparsec.codegen import pack

    w = approx.detach().to(torch.float64)
    g = torch.randn(w.shape[1], rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, _ = torch.linalg.qr(w @ g)
    v = q.T @ w
    residual = float(torch.linalg.matrix_norm(w - q @ v)) / max(float(torch.linalg.matrix_norm(w)), 1e-300)
    if residual > 1e-5:  # float32 rounding of a rank-R matrix leaves ~1e-7
        t = pack(LowRank(rank), approx.detach().to(torch.float32)).tensors()
        return t["u"].to(torch.float64), t["v"].to(torch.float64)
    return q, v


def random_factors(spec: FormatSpec, N: int, K: int, rng: np.random.Generator, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Factors of the right shapes for timing (values do not change onnxruntime's time, zeros aside)."""
    def randn(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(dtype)

    if isinstance(spec, Dense):
        return {"w_kn": randn(K, N)}
    if isinstance(spec, TwoFour):
        w = randn(N, K).reshape(N, K // 4, 4)
        drop = np.argsort(np.abs(w), axis=-1)[..., :2]
        np.put_along_axis(w, drop, 0, axis=-1)
        return {"w_kn": np.ascontiguousarray(w.reshape(N, K).T)}
    if isinstance(spec, Block):
        B = spec.block
        w = randn(N, K)
        keep = np.zeros((N // B) * (K // B), dtype=bool)
        keep[rng.permutation(keep.size)[: spec.kept_blocks(N, K)]] = True
        mask = np.repeat(np.repeat(keep.reshape(N // B, K // B), B, axis=0), B, axis=1)
        return {"w_kn": np.ascontiguousarray((w * mask).T)}
    if isinstance(spec, LowRank):
        return {"v_kr": randn(K, spec.rank), "u_rn": randn(spec.rank, N)}
    if isinstance(spec, Monarch):
        nb = spec.nblocks
        p, n = K // nb, N // nb
        return {"l_t": randn(nb, p, p), "r_t": randn(nb, p, n)}
    raise ValueError(f"no ONNX form for format {spec}")


def emit_product(em: Emitter, spec: FormatSpec, x: str, out: str, tensors: dict[str, np.ndarray],
                 N: int, K: int, x_shape: list[int | None] | None = None) -> str:
    """Append the nodes computing ``out = x @ W^T`` for ``spec`` to ``em``; returns ``out``."""
    if isinstance(spec, (Dense, TwoFour, Block)):
        return em.node("MatMul", [x, em.const("weight", tensors["w_kn"])], out)
    if isinstance(spec, LowRank):
        h = em.node("MatMul", [x, em.const("v_t", tensors["v_kr"])])
        return em.node("MatMul", [h, em.const("u_t", tensors["u_rn"])], out)
    if isinstance(spec, Monarch):
        return _emit_monarch(em, spec, x, out, tensors, N, K, x_shape)
    raise ValueError(f"no ONNX form for format {spec}")


def _emit_monarch(em: Emitter, spec: Monarch, x, out, tensors, N, K, x_shape):
    nb = spec.nblocks
    p = K // nb
    r = p // nb
    xb = em.node("Reshape", [x, em.shape("shape_in", [-1, nb, p])])
    xb = em.node("Transpose", [xb], perm=[1, 0, 2])
    z = em.node("MatMul", [xb, em.const("l_t", tensors["l_t"])])
    z = em.node("Reshape", [z, em.shape("shape_split", [nb, -1, nb, r])])
    z = em.node("Transpose", [z], perm=[2, 1, 3, 0])
    z = em.node("Reshape", [z, em.shape("shape_chunks", [nb, -1, p])])
    y = em.node("MatMul", [z, em.const("r_t", tensors["r_t"])])
    y = em.node("Transpose", [y], perm=[1, 0, 2])
    return em.node("Reshape", [y, _output_shape(em, x, N, x_shape)], out)


def _output_shape(em: Emitter, x: str, N: int, x_shape) -> str:
    """[leading dims of x..., N]: a constant when at most one leading dim is unknown, else computed."""
    if x_shape is not None:
        lead = list(x_shape[:-1])
        if sum(1 for d in lead if not d) <= 1:
            return em.shape("shape_out", [d if d else -1 for d in lead] + [N])
    shape = em.node("Shape", [x])
    lead = em.node("Slice", [shape, em.shape("lead_start", [0]), em.shape("lead_end", [-1])])
    return em.node("Concat", [lead, em.shape("n", [N])], axis=0)


def declared_format_note(spec: FormatSpec) -> str | None:
    """What a pruned format records for runtimes that can exploit it (None for the others)."""
    if spec.family not in PRUNED_FAMILIES:
        return None
    if isinstance(spec, TwoFour):
        return "2:4: two of every four consecutive weights along K are zero"
    return f"{spec}: {spec.block}x{spec.block} blocks of W [N, K], fraction {spec.density:g} kept, the rest zero"
