"""The kernel families a fingerprint measures, each as: which weights to build, how to call it.

* ``dense``: ``torch.nn.functional.linear`` (cuBLAS on CUDA, torch's CPU GEMM otherwise).
* ``2:4`` through torch's cuSPARSELt ops (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``),
  with the input padding torch's semi-structured tensor applies (M to a multiple of 8).
* every implementation ``sparsec.codegen`` registers for 2:4, block, lowrank, monarch, act and the
  sparse-plus-low-rank composites, called
  through ``codegen.linear(x, packed, impl=...)``. On CUDA the plain-torch "reference" is only
  measured for a family that has no other implementation; on CPU it is what runs.

Weights are random (never zero) in the format's layout; low-rank and Monarch factors are drawn
directly rather than projected from a dense weight (an SVD per shape would dominate the run and
does not change the kernel's time). Before a family is timed its output is checked against the
dense equivalent, so a kernel that computes the wrong thing is reported, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["Variant", "Family", "discover_families", "PARAM_GRID"]

# Format parameters measured for each family: block size x kept fraction, rank as a fraction of
# min(N, K), Monarch block count. The first entry of each list is measured first (priority).
PARAM_GRID = {
    "block": [(64, 0.25), (64, 0.5), (32, 0.25), (128, 0.25), (16, 0.25), (64, 0.125),
              (32, 0.5), (128, 0.5), (16, 0.5), (32, 0.125), (128, 0.125), (16, 0.125)],
    "lowrank": [0.25, 0.125, 0.5, 0.0625],
    "monarch": [4, 16, 8],
    "act": [0.5, 0.4, 0.25, 0.6, 0.7],  # fraction of inputs skipped (of unit-normal timing inputs)
    "actrot": [0.5, 0.4, 0.25, 0.6, 0.7],  # the same, of the rotated inputs
    # (the sparse part's parameters, rank as a fraction of min(N, K)): the ranks the planner tries
    "2:4+lowrank": [({}, 1 / 32), ({}, 1 / 16), ({}, 1 / 64), ({}, 1 / 8)],
    "block+lowrank": [({"block": 64, "density": 0.25}, 1 / 32), ({"block": 64, "density": 0.5}, 1 / 32),
                      ({"block": 64, "density": 0.25}, 1 / 8), ({"block": 32, "density": 0.25}, 1 / 32),
                      ({"block": 64, "density": 0.5}, 1 / 8), ({"block": 32, "density": 0.5}, 1 / 32)],
}


@dataclass(frozen=True)
class Variant:
    """One format setting of a family: the spec text and the parameters an entry records."""

    spec: str
    params: dict = field(default_factory=dict)
    priority: int = 0

    def key(self) -> str:
        return self.spec


@dataclass
class Family:
    """A kernel implementation of one format family."""

    family: str  # format family recorded in the fingerprint
    kernel: str  # implementation name recorded with every entry
    build: Callable  # (variant, N, K, dtype, device, gen) -> (weight object, dense equivalent)
    run: Callable  # (x, weight object) -> y
    dtypes: tuple[str, ...]
    variants: Callable  # (N, K) -> list[Variant]
    # (x, weight object) -> the plain-torch result the family must match, where that is not the
    # product with its dense equivalent (act skips inputs)
    reference: Callable | None = None

    def label(self) -> str:
        return f"{self.family} [{self.kernel}]"


def _randn(shape, dtype, device, gen, scale=1.0):
    t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
    return t.to(dtype)


# ------------------------------------------------------------------------ dense
def _dense_build(variant, N, K, dtype, device, gen):
    w = _randn((N, K), dtype, device, gen, 1 / math.sqrt(K))
    return w, w


def _dense_run(x, w):
    return F.linear(x, w)


def dense_family(device: torch.device) -> Family:
    cuda = device.type == "cuda"
    return Family(
        family="dense",
        kernel="cublas" if cuda else "torch-cpu",
        build=_dense_build,
        run=_dense_run,
        dtypes=("bfloat16", "float16", "float32") if cuda else ("float32", "bfloat16"),
        variants=lambda N, K: [Variant("dense")],
    )


# -------------------------------------------------------------- torch's 2:4
def _prune_2_4(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    g = w.reshape(N, K // 4, 4)
    keep = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return (g * mask).reshape(N, K)


class _Compressed:
    """A cuSPARSELt-compressed weight, called as sparsec calls it (output layout, padding,
    algorithm for N): the function behind the 2:4 op's ``cusparselt`` implementation, without
    the op's dispatch."""

    def __init__(self, compressed: torch.Tensor, n_out: int):
        from sparsec.codegen.twofour_cslt import cslt_matmul

        self.compressed, self.n_out, self.matmul = compressed, n_out, cslt_matmul
        self.nbytes = compressed.numel() * compressed.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.compressed, None, self.n_out)


def _cslt_build(variant, N, K, dtype, device, gen):
    w = _prune_2_4(_randn((N, K), dtype, device, gen, 1 / math.sqrt(K / 2)))
    return _Compressed(torch._cslt_compress(w), N), w


def _cslt_run(x, wc):
    return wc(x)


def cusparselt_family(device: torch.device) -> tuple[Family | None, str | None]:
    if device.type != "cuda":
        return None, "cuSPARSELt needs a CUDA device"
    if not hasattr(torch, "_cslt_compress") or not hasattr(torch, "_cslt_sparse_mm"):
        return None, "this torch has no cuSPARSELt ops (torch._cslt_compress)"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return None, "cuSPARSELt needs compute capability 8.0 or newer"
    fam = Family(
        family="2:4",
        kernel="cusparselt",
        build=_cslt_build,
        run=_cslt_run,
        dtypes=("bfloat16",),
        variants=lambda N, K: [Variant("2:4")],
    )
    return fam, None


# ----------------------------------------------------------- sparsec.codegen
def _codegen_variants(family: str, cuda: bool) -> Callable:
    from sparsec.formats import FAMILIES

    def variants(N, K):
        specs = FAMILIES[family].settings(N, K, PARAM_GRID.get(family, ()))
        return [Variant(str(s), s.record(), i) for i, s in enumerate(specs) if s.check(N, K) is None]

    return variants


def _codegen_build(variant, N, K, dtype, device, gen):
    from sparsec import codegen
    from sparsec.formats import parse_spec

    spec = parse_spec(variant.spec)
    shapes = spec.factors(N, K)
    if shapes is not None:  # random factors, each scaled to keep activations at unit size
        tensors = {name: _randn(shape, dtype, device, gen, 1 / math.sqrt(shape[-1])) for name, shape in shapes.items()}
        packed = codegen.Packed.from_tensors(spec, (N, K), tensors)
    else:
        w = _randn((N, K), dtype, device, gen, 1 / math.sqrt(K))
        packed = codegen.pack(spec, w)
    return packed, None  # dense equivalent is computed lazily (only for the correctness check)


def codegen_families(device: torch.device) -> tuple[list[Family], dict[str, str]]:
    """One Family per (format family, implementation) that sparsec.codegen offers here."""
    skipped: dict[str, str] = {}
    try:
        from sparsec import codegen
        from sparsec.codegen.packed import handler_for
        from sparsec.formats import FAMILIES, STRUCTURED_FAMILIES
    except Exception as exc:  # noqa: BLE001 - any import failure means: not measurable here
        return [], {"sparsec.codegen": f"import failed: {type(exc).__name__}: {exc}"}
    cuda = device.type == "cuda"
    fams = []
    for family in STRUCTURED_FAMILIES:
        try:
            handler = handler_for(FAMILIES[family].example())
        except Exception as exc:  # noqa: BLE001
            skipped[f"{family} [sparsec]"] = f"no codegen handler: {exc}"
            continue
        impls = [i for i in handler.impls if i != "reference"]
        if "cusparselt" in impls:
            impls.remove("cusparselt")
            skipped[f"{family} [sparsec-cusparselt]"] = (
                "measured as kernel 'cusparselt' (the same call, without the op)")
        if not cuda:
            if impls:
                skipped[f"{family} [sparsec-{'/'.join(impls)}]"] = "Triton kernels need a CUDA device"
            impls = ["reference"]
        elif not impls:
            impls = ["reference"]
        for impl in impls:
            fams.append(Family(
                family=family,
                kernel=f"sparsec-{impl}-{family}",
                build=_codegen_build,
                run=lambda x, packed, impl=impl: codegen.linear(x, packed, impl=impl),
                dtypes=("bfloat16",) if cuda else ("float32",),
                variants=_codegen_variants(family, cuda),
                reference=lambda x, packed: codegen.linear(x, packed, impl="reference"),
            ))
    return fams, skipped


def discover_families(device: torch.device) -> tuple[list[Family], dict[str, str]]:
    """Every family measurable on ``device``, in measuring order, and what was skipped and why."""
    fams = [dense_family(device)]
    skipped: dict[str, str] = {}
    cslt, why = cusparselt_family(device)
    if cslt:
        fams.append(cslt)
    else:
        skipped["2:4 [cusparselt]"] = why
    more, why_more = codegen_families(device)
    skipped.update(why_more)
    return fams + more, skipped


def dense_equivalent(weight, dense) -> torch.Tensor:
    """The dense (N, K) weight a built weight object stands for."""
    if dense is not None:
        return dense
    return weight.to_dense()


def check_output(fam: Family, weight, dense, N: int, K: int, dtype: torch.dtype, device, gen) -> str | None:
    """Why ``fam`` computes a wrong y = x W^T for this weight, or None when it is right."""
    x = _randn((8, K), dtype, device, gen)
    y = fam.run(x, weight).float()
    if fam.reference is not None:
        # in the layer's own dtype: where a format rounds an intermediate (actrot's rotated inputs)
        # and then compares it with a threshold, a float32 reference skips other inputs than the
        # kernel does (2% of y in bf16 at S = 0.5, all of it legitimate)
        ref = fam.reference(x, weight).float()
    else:
        ref = x.float() @ dense_equivalent(weight, dense).float().t()
    if tuple(y.shape) != tuple(ref.shape):
        return f"output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
    err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    # 16-bit inputs and outputs: accumulated rounding stays well under 2%; fp32 (tf32 on GPU)
    # under 1%. A kernel outside these is wrong, not imprecise.
    tol = 1e-2 if dtype == torch.float32 else 2e-2
    if not err <= tol:
        return f"relative error {err:.3g} of y against the dense equivalent exceeds {tol:g}"
    return None
