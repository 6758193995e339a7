"""Device ceilings and granules: the few numbers that explain the kernel times around them.

* copy bandwidth: ``dst.copy_(src)`` of a large buffer; bytes read plus bytes written per second.
* dense peak per dtype: the best of a few large square GEMMs, in TFLOP/s (``tf32`` is float32
  with TF32 tensor cores allowed for the duration of that one probe, then restored).
* launch overhead: a one-element add back to back (eager), and the same replayed from a CUDA
  graph: the fixed cost of one kernel call.
* tile granule per dimension: starting one step past a round size (+8), how much further the
  dimension can grow before the GEMM's time rises again. Those extra rows or columns are free:
  the hardware computes them anyway, as padding of its tiles (and of its waves of tiles).
* cache-line granule: reading ``w`` bytes from each of many rows far apart; the largest ``w``
  that costs no more than reading the smallest one. Zeros inside such a granule are free too:
  skipping them saves no memory traffic.
* rest kernels: the smallest norm (torch's layer norm of one row of 1024: one reduction kernel)
  and the smallest attention call (one query against one key, 8 heads of 64), each back to back,
  eager and replayed from a CUDA graph, and on a GPU what inductor makes of a norm and a gated
  activation, replayed from a CUDA graph (``fused_rest_kernels``): the least such a
  kernel of a model's dense rest costs, which its bytes and FLOPs understate at decode sizes (an
  H100 ran SmolLM2-shaped attention at 5.5 us a launch in a CUDA graph, where an empty launch
  costs 1.3 us). A softmax was the first reduction probed and was not kept: torch's own softmax
  kernel took 4.5 us a call in a graph on an H100, its layer norm 3.07 us, where inductor's fused
  norms took about 2 with the gap between kernels.
* dispatch granule (derived from the dense grid afterwards): the largest M whose dense time is
  within 10% of M=1, i.e. how many tokens ride along for free on a launch-bound layer.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from sparsec.fingerprint.timing import Clock

__all__ = [
    "copy_bandwidth", "peak_tflops", "launch_overhead", "rest_kernels", "tile_granules", "cache_line_granule",
    "dispatch_granule",
]

FREE_WITHIN = 0.03  # a step counts as free if it costs < 3% more (above run-to-run noise)


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (measurements are not more precise)."""
    return float(f"{x:.{digits - 1}e}")


def _time(clock: Clock, fn, single_hint: float | None = None) -> float:
    single = clock.warm([fn]) if single_hint is None else single_hint
    return clock.eager([fn], single)


def copy_bandwidth(clock: Clock, nbytes: int) -> float:
    """GB/s of reading and writing ``nbytes``."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=clock.device)
    dst = torch.empty_like(src)
    us = _time(clock, lambda: dst.copy_(src))
    return sig(2 * nbytes / (us * 1e-6) / 1e9)


def peak_tflops(clock: Clock, sizes: list[int], dtypes: list[str]) -> dict[str, float]:
    out = {}
    for name in dtypes:
        dtype = torch.float32 if name == "tf32" else getattr(torch, name)
        best = 0.0
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        try:
            if clock.cuda:
                torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            for n in sizes:
                a = torch.randn(n, n, device=clock.device, dtype=dtype)
                b = torch.randn(n, n, device=clock.device, dtype=dtype)
                us = _time(clock, lambda a=a, b=b: torch.mm(a, b))
                best = max(best, 2 * n**3 / (us * 1e-6) / 1e12)
                del a, b
        finally:
            if clock.cuda:
                torch.backends.cuda.matmul.allow_tf32 = old_tf32
        out[name] = sig(best)
    return out


def launch_overhead(clock: Clock) -> dict[str, float | None]:
    a = torch.ones(1, device=clock.device)
    b = torch.empty_like(a)
    fn = lambda: torch.add(a, 1, out=b)  # noqa: E731
    single = clock.warm([fn])
    eager = clock.eager([fn], single)
    graph = clock.graph([fn] * 64, single) if clock.cuda else None
    return {"eager": sig(eager), "graph": None if graph is None else sig(graph)}


def rest_kernels(clock: Clock, skipped: dict[str, str] | None = None) -> dict[str, dict[str, float | None]]:
    """Microseconds of the smallest norm and attention kernels, eager and in a CUDA graph (None on
    a CPU), in the dtype models run there (bfloat16 on a GPU, float32 on a CPU), and on a GPU the
    fused kernels inductor makes of the rest (``fused_rest_kernels``; a CPU lowering runs the rest
    eagerly, so there are none to time). A probe this device or torch cannot run is left out, its
    reason in ``skipped`` (the rest then priced without it), rather than failing the measurement
    around it."""
    dev = clock.device
    dtype = torch.bfloat16 if clock.cuda else torch.float32
    gen = torch.Generator(device=dev).manual_seed(11)
    row = torch.randn(1, 1024, device=dev, dtype=dtype, generator=gen)
    q, k, v = (torch.randn(1, 8, 1, 64, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    weight, bias = (torch.randn(1024, device=dev, dtype=dtype, generator=gen) for _ in range(2))
    calls = {
        "norm": lambda: F.layer_norm(row, (1024,), weight, bias),
        "attention": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    out = {}
    for name, fn in calls.items():
        try:
            single = clock.warm([fn])
            eager = clock.eager([fn], single)
            graph = clock.graph([fn] * 64, single) if clock.cuda else None
        except RuntimeError as exc:
            _skip(skipped, name, exc)
            continue
        out[name] = {"eager": sig(eager), "graph": None if graph is None else sig(graph)}
    if clock.cuda:
        out.update(fused_rest_kernels(clock, skipped))
    return out


def fused_rest_kernels(clock: Clock, skipped: dict[str, str] | None = None) -> dict[str, dict[str, float | None]]:
    """The kernels inductor makes of a decode-sized norm (an RMS norm of one row of 1024: one fused
    reduction) and of a gated activation (SiLU times a row of 1536: one pointwise kernel), timed in
    a CUDA graph, where a lowered model's rest runs them. torch's own layer norm kernel, the
    ``norm`` probe, took 3.07 us a call on an H100 where inductor's fused norms of a SmolLM2-shaped
    model took about 1.5 (docs/benchmarks.md). Graph times only: called eagerly a compiled
    function pays its guards and wrapper, which the lowered graph pays once, not per kernel. A
    probe inductor cannot compile is left out, its reason in ``skipped``."""
    dev, dtype = clock.device, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(13)
    row, weight = (torch.randn(1, 1024, device=dev, dtype=dtype, generator=gen) for _ in range(2))
    gate, up = (torch.randn(1, 1536, device=dev, dtype=dtype, generator=gen) for _ in range(2))

    def rms_norm(x, w):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    def gated(a, b):
        return F.silu(a) * b

    out = {}
    for name, fn, args in (("fused_norm", rms_norm, (row, weight)), ("fused_pointwise", gated, (gate, up))):
        try:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            call = lambda compiled=compiled, args=args: compiled(*args)  # noqa: E731
            single = clock.warm([call])
            graph = clock.graph([call] * 64, single)
        except Exception as exc:  # inductor's and triton's compile errors share no base class
            _skip(skipped, name, exc)
            continue
        out[name] = {"eager": None, "graph": sig(graph)}
    return out


def _skip(skipped: dict[str, str] | None, name: str, exc: BaseException) -> None:
    if skipped is not None:
        reason = _first_line(exc)
        cause = getattr(exc, "inner_exception", None) or exc.__cause__  # a compiler's own error, wrapped
        skipped[f"rest_us.{name}"] = reason if cause is None else f"{reason} {_first_line(cause)}"


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def tile_granules(clock: Clock, base: int, dtype: torch.dtype, steps=(8, 16, 32, 64, 128, 256)) -> tuple[dict, dict]:
    """Per dimension M, N, K of a base^3 GEMM: the largest free growth past base+8."""
    granules, probe = {}, {"base": base, "dtype": str(dtype).removeprefix("torch."), "steps": list(steps), "us": {}}
    gen = torch.Generator(device=clock.device).manual_seed(7)
    for dim in ("M", "N", "K"):
        times = []
        for s in steps:
            M, N, K = (base + s if d == dim else base for d in ("M", "N", "K"))
            x = torch.randn(M, K, device=clock.device, dtype=dtype, generator=gen)
            w = torch.randn(N, K, device=clock.device, dtype=dtype, generator=gen)
            times.append(_time(clock, lambda x=x, w=w: F.linear(x, w)))
            del x, w
        first = times[0]
        free = steps[0]
        for s, t in zip(steps, times):
            if t <= first * (1 + FREE_WITHIN):
                free = s
            else:
                break
        granules[dim] = free
        probe["us"][dim] = [sig(t) for t in times]
    return granules, probe


def cache_line_granule(clock: Clock, rows: int, widths=(4, 8, 16, 32, 64, 128, 256)) -> tuple[int, dict]:
    """Largest contiguous read per row (bytes) that costs no more than the narrowest one."""
    stride = 2 * max(widths) // 4  # int32 elements between row starts: rows never share a line
    src = torch.randint(0, 1 << 30, (rows, stride), dtype=torch.int32, device=clock.device)
    times = []
    for w in widths:
        view = src[:, : w // 4]
        out = torch.empty(rows, w // 4, dtype=torch.int32, device=clock.device)
        times.append(_time(clock, lambda: out.copy_(view)))
    first = times[0]
    granule = widths[0]
    for w, t in zip(widths, times):
        # reading wider rows writes more too; 15% allows for the write side only
        if t <= first * 1.15:
            granule = w
        else:
            break
    return granule, {"rows": rows, "widths": list(widths), "us": [sig(t) for t in times]}


def dispatch_granule(entries: list[dict], dtype: str, mode: str, shape: tuple[int, int]) -> int | None:
    """Largest measured M whose dense time is within 10% of M=1 for this shape."""
    pts = {e["M"]: e["us"] for e in entries if e["dtype"] == dtype and e["mode"] == mode and (e["N"], e["K"]) == shape}
    if 1 not in pts:
        return None
    free = 1
    for M in sorted(pts):
        if pts[M] <= pts[1] * 1.10:
            free = M
        else:
            break
    return free


