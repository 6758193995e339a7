"""2:4 through torch's cuSPARSELt binding (``torch._cslt_sparse_mm``): the large-M implementation.

The weight is compressed once (``cslt_compressed``, kept in ``Packed.aux``, before any graph
capture); the library's (N, M) product is returned as the transposed view, not written
transposed; the algorithm id is timed on the first call of each shape (``_cslt_alg``) and kept.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

CSLT_DTYPES = (torch.float16, torch.bfloat16)
CSLT_ALIGN = 16     # cuSPARSELt needs N and K multiples of 16 for 16-bit types
CSLT_M_ALIGN = 8    # and the dense operand's token count padded to a multiple of 8
CSLT_ALG1_FROM_M = 2048

_ALG_IDS: dict[tuple, int] = {}
# The ids a first call times: every id 0-15 was timed on the Llama-3-8B shapes on an H200 (bf16,
# torch 2.11, docs/benchmarks.md) and none but these two came within 10% of the better of them.
CSLT_TUNED_ALGS = (0, 1)
CSLT_TUNE_ROUNDS = 4       # alternating rounds of back-to-back calls per id
CSLT_TUNE_ROUND_S = 0.02   # seconds of calls in each round


def set_cslt_algorithm(N: int, K: int, M: int, dtype: torch.dtype, alg_id: int) -> None:
    """Record the cuSPARSELt algorithm id to use for this shape (none is then timed for it)."""
    _ALG_IDS[(N, K, M + (-M) % CSLT_M_ALIGN, dtype)] = int(alg_id)


def _cslt_alg(key, compressed: torch.Tensor, dense_t: torch.Tensor, row_major: bool = False) -> int:
    """The algorithm id for this shape: the one recorded for it, else the faster of
    ``CSLT_TUNED_ALGS`` timed on this call's operands (first call of the shape only), else,
    where nothing can be timed (during CUDA-graph capture, or ``SPARSEC_CSLT_TUNE=0``),
    ``default_cslt_alg``'s.

    Timed rather than ruled because the ranking depends on the shape and on how hot the device
    runs: on an H200 at M = 2048, timed alone with rests between short runs, id 1 led on both
    Llama-3-8B MLP shapes, yet in the MLP stack's forward, back to back at the power limit, id 0
    was faster on the down projection (docs/benchmarks.md). So each id runs back to back for a
    while, in alternating rounds, and the lower median wins. torch's own search
    (``_cslt_sparse_mm_search``) is not used: it reported an internal error on an H200 (torch
    2.11, CUDA 13.0) and left the device faulted.
    """
    if row_major:  # timed apart: the library picks other kernels to write the transpose
        key = key + ("row",)
    alg = _ALG_IDS.get(key)
    if alg is not None:
        return alg
    if torch.cuda.is_current_stream_capturing() or os.environ.get("SPARSEC_CSLT_TUNE", "1") == "0":
        return default_cslt_alg(key[2])
    calls = {a: (lambda a=a: torch._cslt_sparse_mm(compressed, dense_t, alg_id=a, transpose_result=row_major))
             for a in CSLT_TUNED_ALGS}
    times: dict = {}
    alg = fastest(calls, _cuda_round_timer(dense_t.device), CSLT_TUNE_ROUNDS, times)
    if alg is None:
        alg = default_cslt_alg(key[2])
    from sparsec.logs import logger

    logger.info("cuSPARSELt %dx%d at M=%d (%s): algorithm %d (median us per call: %s)", key[0], key[1], key[2],
                str(key[3]).replace("torch.", ""), alg,
                ", ".join(f"id {a} {sorted(t)[len(t) // 2]:.1f}" for a, t in times.items()) or "none ran")
    _ALG_IDS[key] = alg
    return alg


def fastest(calls: dict, timer, rounds: int, times: dict | None = None):
    """The key of the call with the lowest median over ``rounds`` alternating rounds of
    ``timer(call)`` (microseconds per call); a call that raises drops out; None if all do.
    ``times`` receives each key's timings."""
    times = {} if times is None else times
    live = dict(calls)
    for name, call in list(live.items()):
        try:
            call()
        except RuntimeError:  # an id the library refuses for this shape
            del live[name]
    order = list(live)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            times.setdefault(name, []).append(timer(live[name]))
    if not times:
        return None
    return min(times, key=lambda n: (sorted(times[n])[len(times[n]) // 2], order.index(n)))


def _cuda_round_timer(device):
    """Microseconds per call over about CSLT_TUNE_ROUND_S of back-to-back calls (sparsec's ``Clock``)."""
    from sparsec.fingerprint.timing import Clock, TimingPolicy

    clock = Clock(torch.device(device), TimingPolicy(repeats=1, min_repeats=1, warmup=1, min_sample_s=CSLT_TUNE_ROUND_S,
                                                     point_budget_s=0.0, max_inner=1 << 20))

    def timer(call) -> float:
        return clock.eager([call], clock.warm([call]))

    return timer


def default_cslt_alg(m_padded: int) -> int:
    """Algorithm 1 from CSLT_ALG1_FROM_M tokens, 0 below: on an H200 (bf16, torch 2.11; every id
    0-15 timed on the Llama-3-8B shapes, docs/benchmarks.md) id 1 was fastest or within 1% at
    M = 2048 and 8192 on five of six cases (up to 1.18x over id 0), and id 0 at M = 1024 on
    two of three; no other id came within 10% of the better of the two."""
    return 1 if m_padded >= CSLT_ALG1_FROM_M else 0


@torch.library.custom_op("sparsec::twofour_linear_cusparselt", mutates_args=())
def twofour_cslt_op(x: torch.Tensor, compressed: torch.Tensor, bias: Optional[torch.Tensor],
                    n_out: int, layout: str = "column") -> torch.Tensor:
    """y = x @ W^T + bias through cuSPARSELt; ``compressed`` is ``torch._cslt_compress(W)``.

    cuSPARSELt computes W @ x^T, an (N, M) product; it is returned as its (M, N) transposed view
    rather than asking the library to write the transpose (``transpose_result=True``), which
    took 1.2-1.9x as long on an H200. The output is therefore column-major, and so is the fake's,
    so compilers lay out what follows accordingly (the FX lowering then makes it row-major for
    what reads it, passes/rewrite_fx.py). ``layout`` (``output_layout``) asks for another: an
    argument of the op, so that a compiled graph, and inductor's cache of it, records which
    layout it was traced with. A column-major x is passed as is (the library reads either order)."""
    return cslt_matmul(x, compressed, bias, n_out, layout)


CSLT_LAYOUTS = ("column", "row", "copy")


def output_layout() -> str:
    """``SPARSEC_CSLT_OUTPUT``, read when a layer is called (traced): an experiment switch for
    comparing whole models.

    - ``column`` (default): the library's (N, M) product returned as its transposed view.
    - ``row``: the library writes the (M, N) product row-major (``transpose_result``). Slower for
      the product alone (1.2-1.9x on an H200; 0.76x of cuBLAS against 1.01x in a Llama at 2048
      tokens on an H100, docs/benchmarks.md).
    - ``copy``: the column-major product copied row-major inside the op, one pass of its own,
      where inductor would otherwise fold the transposing read into the kernels that read it.
    """
    layout = os.environ.get("SPARSEC_CSLT_OUTPUT", "column")
    if layout not in CSLT_LAYOUTS:
        from sparsec.errors import SparsecError

        raise SparsecError(f"SPARSEC_CSLT_OUTPUT must be one of {', '.join(CSLT_LAYOUTS)}; got {layout!r}")
    return layout


def cslt_matmul(x: torch.Tensor, compressed: torch.Tensor, bias: Optional[torch.Tensor], n_out: int,
                layout: str = "column") -> torch.Tensor:
    """The body of ``twofour_cslt_op``, also what the fingerprint times as kernel "cusparselt"."""
    M, K = x.shape
    pad = (-M) % CSLT_M_ALIGN
    if pad:
        dense_t = F.pad(x, (0, 0, 0, pad)).t()
    elif x.t().is_contiguous():
        dense_t = x.t()
    else:
        dense_t = x.contiguous().t()
    alg = _cslt_alg((n_out, K, M + pad, x.dtype), compressed, dense_t, layout == "row")
    if layout == "row":
        y = torch._cslt_sparse_mm(compressed, dense_t, bias=bias, alg_id=alg, transpose_result=True)
        return y.narrow(0, 0, M) if pad else y
    y = torch._cslt_sparse_mm(compressed, dense_t, bias=bias, alg_id=alg)
    y = (y.narrow(1, 0, M) if pad else y).t()
    return y.contiguous() if layout == "copy" else y


@twofour_cslt_op.register_fake
def twofour_cslt_fake(x, compressed, bias, n_out, layout="column"):
    M = x.shape[0]
    if layout == "row":
        return x.new_empty(M + (-M) % CSLT_M_ALIGN, n_out).narrow(0, 0, M)
    if layout == "copy":
        return x.new_empty(M, n_out)
    return x.new_empty(n_out, M + (-M) % CSLT_M_ALIGN).narrow(1, 0, M).t()


def crossover_from_timings(rows) -> int | None:
    """The crossover M a planner stores in ``Packed.crossover_m`` from measured timings.

    ``rows``: (M, triton_us, cusparselt_us) for one weight shape and dtype. Returns the smallest
    measured M from which cuSPARSELt is faster at that M and every larger one measured, or None
    (Triton everywhere) when it never is; a single faster M amid slower ones is not trusted.
    """
    best = None
    for M, triton_us, cslt_us in sorted(rows, key=lambda r: r[0], reverse=True):
        if cslt_us < triton_us:
            best = M
        else:
            break
    return best


def cslt_reason(N: int, K: int, dtype, device) -> str | None:
    """Why cuSPARSELt cannot serve this weight (None if it can)."""
    if dtype not in CSLT_DTYPES:
        return f"cuSPARSELt here takes float16/bfloat16, not {str(dtype).replace('torch.', '')}"
    if N % CSLT_ALIGN or K % CSLT_ALIGN:
        return f"cuSPARSELt needs N and K multiples of {CSLT_ALIGN}, got {N}x{K}"
    if device is None or torch.device(device).type != "cuda":
        return "cuSPARSELt runs on CUDA devices only"
    if not (hasattr(torch.backends, "cusparselt") and torch.backends.cusparselt.is_available()):
        return "this torch build has no cuSPARSELt"
    return None


def cslt_compressed(packed) -> torch.Tensor:
    """The cuSPARSELt copy of the weight, made once and kept in ``packed.aux``."""
    c = packed.aux.get("cslt")
    if c is None:
        c = torch._cslt_compress(packed.to_dense().contiguous())
        packed.aux["cslt"] = c
    return c
