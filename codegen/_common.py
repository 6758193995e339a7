"""Helpers every format's kernel file shares: input flattening, dtype rules, lazy Triton kernels.

Why lazy kernels: ``triton.jit`` decides at decoration time whether a kernel is compiled for the
GPU or run by the CPU interpreter (``TRITON_INTERPRET=1``). Decorating at first launch, once per
mode, lets the same process (and the test-suite) pick the mode through the environment without
caring about import order.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Callable, Sequence

import torch

from sparsec.errors import SparsecError

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def interpret_mode() -> bool:
    """True when Triton kernels run on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton path can run for this input: CUDA tensors, or any tensor when interpreting."""
    return x.is_cuda or interpret_mode()


def dtype_reason(dtype: torch.dtype | None) -> str | None:
    if dtype is None or dtype in SUPPORTED_DTYPES:
        return None
    return f"dtype {str(dtype).replace('torch.', '')} is not supported; use float16, bfloat16 or float32"


def device_reason(device: torch.device | str | None, dtype: torch.dtype | None = None) -> str | None:
    """Why the Triton kernels cannot run on this device (None when they can, or it is not CUDA)."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "CUDA is not available in this process"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"GPU capability {major}.{minor} is below 8.0 (Ampere), which the Triton kernels need"
    return None


def flatten_input(x: torch.Tensor, K: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``x`` (..., K) as 2-D (M, K) without copying where strides allow; return the lead shape."""
    if x.dim() < 1 or x.shape[-1] != K:
        raise SparsecError(f"input of shape {tuple(x.shape)} does not end in K={K}, the weight's input size")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, K), lead


def match_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a floating tensor to ``dtype`` (e.g. under autocast); integer metadata is left alone."""
    if t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def check_input(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise SparsecError(dtype_reason(x.dtype))


def check_bias(bias: torch.Tensor | None, N: int) -> None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N):
        raise SparsecError(f"bias of shape {tuple(bias.shape)} does not match N={N} outputs")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def m_bucket(M: int) -> int:
    """Autotune key for the token count: powers of two, so a new M rarely triggers a re-tune."""
    return min(next_pow2(max(1, M)), 8192)


def tl_dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use tf32 tensor cores; 16-bit inputs ignore the setting (exact products,
    fp32 accumulation either way), so one compiled variant serves every dtype's rule."""
    return "tf32"


def pdl_enabled(x: torch.Tensor) -> bool:
    """Whether a small-M launch may start before the kernel ahead of it has finished
    (programmatic dependent launch, sm_90+). Each such kernel waits for its predecessor before
    its first load and lets its successor launch once its programs have streamed their weights:
    the next launch's start overlaps this one's tail. ``SPARSEC_PDL=0`` turns it off."""
    if not x.is_cuda or interpret_mode() or torch.version.hip is not None or os.environ.get("SPARSEC_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 9


def autotune_enabled() -> bool:
    """``SPARSEC_AUTOTUNE=0`` takes each shape's first admissible config instead of timing them all."""
    return os.environ.get("SPARSEC_AUTOTUNE", "1") != "0" and not interpret_mode()


_LANGUAGE_SWAPS: dict | None = None


@contextlib.contextmanager
def _interpretable_language():
    """Make triton.language's own jit helpers (zeros, sum, cdiv...) callable by the interpreter.

    Triton decorates those helpers once, when it is first imported; if that happened before
    TRITON_INTERPRET=1 was set, they are GPU-only objects the interpreter refuses to call. For
    the duration of an interpreted launch they are swapped for interpreted twins, then restored.
    """
    global _LANGUAGE_SWAPS
    import sys

    from triton.runtime.jit import JITFunction

    if _LANGUAGE_SWAPS is None:
        from triton.runtime.interpreter import InterpretedFunction

        twins: dict = {}
        _LANGUAGE_SWAPS = []
        for mod_name, mod in list(sys.modules.items()):
            if not mod_name.startswith("triton.language") or mod is None:
                continue
            for name, v in list(vars(mod).items()):
                if isinstance(v, JITFunction):
                    twin = twins.setdefault(id(v), InterpretedFunction(v.fn))
                    _LANGUAGE_SWAPS.append((mod, name, v, twin))
    saved = _language_state()
    for mod, name, _, twin in _LANGUAGE_SWAPS:
        setattr(mod, name, twin)
    try:
        with _scalar_index_of_one_element_arrays():
            yield
    finally:
        for mod, name, orig, _ in _LANGUAGE_SWAPS:
            setattr(mod, name, orig)
        _restore_language(saved)


def _language_state() -> list[tuple[object, dict]]:
    """Every attribute of triton.language's modules and of its tensor class, as they are now.

    An interpreted kernel that calls a jit helper (tl.sum, tl.zeros...) has the interpreter
    re-point triton.language's functions at interpreted ones and never point them back (Triton 3.6
    to 3.9, ``InterpretedFunction.__call__``): a GPU compile later in the same process then
    traces through interpreter functions and fails ("'block_argument' object has no attribute
    'get_element_ty'", "inline_asm not supported in interpreter mode"). Saved before an
    interpreted launch and put back after it (names the interpreter adds stay: it reads them later)."""
    import sys

    import triton.language as tl

    holders = [mod for name, mod in list(sys.modules.items()) if name.startswith("triton.language") and mod is not None]
    holders.append(tl.tensor)
    return [(holder, dict(vars(holder))) for holder in holders]


def _restore_language(saved: list[tuple[object, dict]]) -> None:
    for holder, attrs in saved:
        now = vars(holder)
        for name, value in attrs.items():
            if now.get(name) is not value:
                try:
                    setattr(holder, name, value)
                except (AttributeError, TypeError):
                    pass


@contextlib.contextmanager
def _scalar_index_of_one_element_arrays():
    """Let the interpreter use a scalar kernel argument as an index (``range(0, K, BLOCK)``).

    The interpreter holds a scalar as a one-element array. Triton 3.6's interpreter converts it
    with ``int(array)``, which NumPy 2.4 refuses for arrays of one or more dimensions ("only
    0-dimensional arrays can be converted to Python scalars"); later Triton releases convert the
    single element. For an interpreted launch the tensor patch Triton installs gets that
    conversion; on versions that already do it this changes nothing.
    """
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        yield
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])
                       if self.handle.data.size == 1 else int(self.handle.data))

    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        interpreter._patch_lang_tensor = original


class LazyKernel:
    """A Triton kernel decorated at first use, once for the GPU compiler and once for the interpreter.

    ``configs`` is None for a plain ``triton.jit`` kernel, else a list of ``triton.Config`` that
    ``prune`` (configs, named_args) filters for the launch's shape; under the interpreter (where
    timing measures nothing) or with SPARSEC_AUTOTUNE=0 only the first surviving config is kept.
    """

    def __init__(self, fn: Callable, configs: Sequence | None = None, key: Sequence[str] = (),
                 prune: Callable | None = None, reset_to_zero: Sequence[str] = ()):
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.prune = prune
        self.reset_to_zero = list(reset_to_zero)
        self._built: dict[bool, object] = {}

    def _prune(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if self.prune is None or self.prune(c, args)]
        if not kept:
            kept = list(configs[:1])
        if not autotune_enabled():
            kept = kept[:1]
        return kept

    @contextlib.contextmanager
    def only(self, config):
        """Launch with ``config`` alone inside the block: every config's arithmetic can be checked,
        not just the one the interpreter or the autotuner would take."""
        saved = self.configs, self._built
        self.configs, self._built = [config], {}
        try:
            yield
        finally:
            self.configs, self._built = saved

    def __getitem__(self, grid):
        mode = interpret_mode()
        if mode:
            launch = self._build(mode)[grid]

            def run_interpreted(*args, **kwargs):
                with _interpretable_language():
                    return launch(*args, **kwargs)

            return run_interpreted
        return self._build(mode)[grid]

    def _build(self, mode: bool):
        kernel = self._built.get(mode)
        if kernel is None:
            import triton

            kernel = triton.jit(self.fn)
            if self.configs is not None:
                kwargs = dict(configs=list(self.configs), key=self.key,
                              prune_configs_by={"early_config_prune": self._prune})
                if "do_bench" in inspect.signature(triton.autotune).parameters:
                    kwargs["do_bench"] = cold_bench
                if self.reset_to_zero:
                    kwargs["reset_to_zero"] = self.reset_to_zero
                kernel = triton.autotune(**kwargs)(kernel)
            self._built[mode] = kernel
        return kernel


FLUSH_BYTES = 256 << 20   # > 4x the L2 of an H100 or H200
BENCH_REPS = 100


def cold_bench(kernel_call, quantiles=(0.5, 0.2, 0.8), **_):
    """The autotuner's timing: milliseconds of one launch at ``quantiles`` over BENCH_REPS launches,
    each after a read of FLUSH_BYTES so the weights come from memory, as in a model.

    Triton's own timing clears the cache by writing a buffer; the dirty lines then drain while the
    timed launch reads, which is not what a launch in a model meets. On an H200 its pick for the
    gated block GEMV at M = 1 ran 17% slower in CUDA-graph replay than the best configuration
    (docs/benchmarks.md).

    Some Triton releases (3.6 among them) time even a single surviving configuration; under the interpreter
    there is nothing to time, so the launch runs once and every quantile is zero.

    A configuration that fails to build or launch here (whatever the error: Triton itself skips only
    a few kinds) takes infinite time, with a warning, so the others are chosen from; if every one
    fails, the launch after tuning raises the error."""
    if interpret_mode():
        kernel_call()
        return [0.0 for _ in quantiles]
    try:
        kernel_call()
    except Exception as exc:  # noqa: BLE001 - one configuration's failure must not end the tuning
        warnings.warn(f"sparsec: a kernel configuration failed here and was left out of tuning "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", stacklevel=2)
        return [float("inf") for _ in quantiles]
    flush = torch.ones(FLUSH_BYTES // 2, dtype=torch.float16, device="cuda")
    start = [torch.cuda.Event(enable_timing=True) for _ in range(BENCH_REPS)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(BENCH_REPS)]
    for i in range(BENCH_REPS):
        flush.sum()
        start[i].record()
        kernel_call()
        end[i].record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(start, end)])
    del flush
    return torch.quantile(times, torch.tensor(list(quantiles))).tolist()


def expect_tensor(tensors: dict, name: str, shape: tuple[int, ...], floating: bool) -> torch.Tensor:
    """The tensor ``name`` of a pre-packed weight, checked for shape and kind (values or indices)."""
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise SparsecError(f"packed tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if floating and not t.is_floating_point():
        raise SparsecError(f"packed tensor '{name}' must hold floating-point values, got {t.dtype}")
    if not floating and t.dtype not in INTEGER_DTYPES:
        raise SparsecError(f"packed tensor '{name}' must hold integers, got {t.dtype}")
    return t


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Precision for packing arithmetic (SVD, norms, expansion of factors): float64, so that a
    planted structure round-trips to within the rounding of its stored dtype. Packing is
    one-time work; its cost does not matter next to that guarantee."""
    return torch.float64


def register_input_grad(op, input_grad: Callable, saved: Sequence[int], bias_index: int | None) -> None:
    """Give a packed-linear custom op the gradient it passes back: dx = dy @ W (and dbias).

    A model called with autograd on (no ``torch.no_grad()``) traces a backward through every
    rewritten layer whose input requires grad; without a formula that trace fails. The packed
    weight tensors are frozen and get no gradient. ``input_grad(dy, *inputs[saved], n_in)``
    returns dx; it runs at backward time only, so it may expand the weight.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in saved))
        ctx.n_in = inputs[0].shape[1]
        ctx.n_inputs = len(inputs)

    def backward(ctx, dy):
        grads = [None] * ctx.n_inputs
        if ctx.needs_input_grad[0]:
            grads[0] = input_grad(dy, *ctx.saved_tensors, ctx.n_in)
        if bias_index is not None and ctx.needs_input_grad[bias_index]:
            grads[bias_index] = dy.sum(0)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)


def grad_matmul(dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dy @ w accumulated in float32 (16-bit inputs), returned in dy's dtype."""
    acc = torch.float32 if dy.dtype in (torch.float16, torch.bfloat16) else dy.dtype
    return (dy.to(acc) @ w.to(acc)).to(dy.dtype)


# Split paths ("dot_split" of codegen/twofour.py and codegen/block.py) aim for this many programs per
# SM: enough loads in flight where a layer has few, long output rows (bench/small_m.py times them
# against "dot"; block.SPLIT_MAX_M and twofour.SPLIT_FROM say where each format takes them).
SPLIT_PROGRAMS_PER_SM = 8
SPLIT_MAX = 8


def split_count(items: int, device) -> int:
    """Chunks to cut each of ``items`` work items into so that the launch has
    ``SPLIT_PROGRAMS_PER_SM`` programs per SM of ``device`` (1 off CUDA), at most ``SPLIT_MAX``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(SPLIT_MAX, -(-SPLIT_PROGRAMS_PER_SM * sms // max(items, 1))))
