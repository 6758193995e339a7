"""Load a hardware fingerprint and predict the time of a linear layer in any format from it.

A fingerprint (``sparsec.fingerprint/1``, see docs/fingerprint.md) is what one device was
measured to realise: ceilings, granules, and the time of every kernel family over a grid of
shapes. ``load_fingerprint`` finds one by name, path or "auto", validates it and returns a
``Fingerprint`` whose ``predict`` is the only cost question the planner asks.

Prediction is interpolation of measured times in log space (see ``sparsec.fingerprint.interp``), never a
FLOP count. A format with no measurements of its own but built from measured operations is
composed from them (low rank = two dense GEMMs; a sparse-plus-low-rank composite = its sparse part
and its low-rank term) and says so in the prediction's note.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sparsec.errors import FingerprintError
from sparsec.fingerprint.device import (
    current_device_kind,
    current_device_name,
    device_slug,
    slugify,
    user_fingerprint_dir,
)
from sparsec.fingerprint.interp import ShapeGrid, loglog
from sparsec.fingerprint.schema import SchemaViolation, validate_fingerprint
from sparsec.formats import FAMILIES, FormatError, parse_spec

__all__ = [
    "Fingerprint",
    "Prediction",
    "load_fingerprint",
    "resolve_fingerprint_path",
    "list_fingerprints",
    "normalize_dtype",
    "MODES",
]

MODES = ("eager", "graph")
_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}
# dtypes whose kernels move the same bytes; one may stand in for the other, with a note.
_SAME_WIDTH = {"bfloat16": "float16", "float16": "bfloat16"}


def _text(values: tuple) -> str:
    return ", ".join(f"{v:g}" for v in values)


def normalize_dtype(dtype) -> str:
    """'bfloat16' / 'float16' / 'float32' from a torch.dtype or a common name of one."""
    text = str(dtype).removeprefix("torch.").lower()
    try:
        return _DTYPE_ALIASES[text]
    except KeyError:
        raise FingerprintError(
            f"dtype {dtype!r} is not one a fingerprint describes; use bfloat16, float16 or float32"
        ) from None


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one linear layer: microseconds, the kernel that realises it, and a note
    saying how the number was obtained when it was not plain interpolation ('' otherwise)."""

    us: float
    kernel: str
    note: str = ""
    unmeasured: str = ""  # the format setting lies outside what was measured (e.g. "kept fraction 0.75 above measured 0.5")

    @property
    def impl(self) -> str | None:
        """The ``sparsec.codegen.linear(impl=...)`` that runs this kernel: 'triton', 'gemm2', ...
        for 'sparsec-<impl>-<family>', 'cusparselt' for torch's cuSPARSELt; None for dense
        (torch.nn.functional.linear) and for compositions."""
        if self.kernel == "cusparselt":
            return "cusparselt"
        if self.kernel.startswith("sparsec-") and " " not in self.kernel:
            return self.kernel.split("-")[1]
        return None


@dataclass
class _Table:
    """Measurements of one family at one (dtype, mode): per parameter key, a shape grid for each
    kernel implementation measured there (the fastest one at the query answers)."""

    grids: dict[tuple, dict[str, ShapeGrid]]

    def log_us(self, key: tuple, M: int, N: int, K: int, edge: set[str]) -> tuple[float, str]:
        best = None
        for kernel, grid in sorted(self.grids[key].items()):
            notes: set[str] = set()
            t = grid.log_us(M, N, K, notes)
            if best is None or t < best[0]:
                best = (t, kernel, notes)
        edge |= best[2]
        return best[0], best[1]


class Fingerprint:
    """A validated fingerprint. ``data`` is the JSON document; ``source`` the file it came from."""

    def __init__(self, data: dict, source: str = "<dict>"):
        try:
            validate_fingerprint(data)
        except SchemaViolation as exc:
            raise FingerprintError(
                f"fingerprint {source} is invalid: field {exc.where}: {exc.problem}; "
                "measure it again with 'sparsec fingerprint measure' or restore the file"
            ) from None
        self.data = data
        self.source = source
        self.name: str = data["name"]
        self.device: dict = data["device"]
        self.hash: str = hashlib.sha256(
            json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:12]
        self._tables = self._index(data["kernels"])

    def __repr__(self) -> str:
        return f"Fingerprint({self.name!r}, device={self.device['name']!r}, hash={self.hash})"

    @property
    def measured(self) -> dict:
        """Device-wide figures: copy bandwidth (GB/s), peak TFLOP/s per dtype, launch overhead (us)."""
        return self.data.get("measured") or {}

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    # ----------------------------------------------------------------- index
    @staticmethod
    def _param_key(family: str, e: dict) -> tuple:
        key = FAMILIES[family].from_record(e).curve_key(e["N"], e["K"])
        return tuple(round(v, 6) if isinstance(v, float) else v for v in key)

    def _index(self, kernels: dict) -> dict[str, dict[tuple[str, str], _Table]]:
        points: dict = {}
        for family, entries in kernels.items():
            for e in entries:
                table = points.setdefault(family, {}).setdefault((e["dtype"], e["mode"]), {})
                by_kernel = table.setdefault(self._param_key(family, e), {})
                by_kernel.setdefault(e["kernel"], []).append((e["M"], e["N"], e["K"], e["us"]))
        return {
            family: {
                where: _Table({key: {k: ShapeGrid(v) for k, v in kern.items()} for key, kern in by_key.items()})
                for where, by_key in tables.items()
            }
            for family, tables in points.items()
        }

    # ------------------------------------------------------------- questions
    def fastest_dense_us(self, mode: str) -> float | None:
        """The fastest dense product timed in ``mode`` (any shape, dtype and token count): the least
        a library matmul kernel has been seen to cost on this device; None if none was timed."""
        times = [e["us"] for e in self.data["kernels"].get("dense", []) if e["mode"] == mode]
        return min(times) if times else None

    def families(self) -> list[str]:
        """Kernel families with at least one measurement."""
        return sorted(self._tables)

    def _lookup(self, family: str, dtype: str, mode: str) -> tuple[_Table | None, list[str], str]:
        """The table to use for (family, dtype, mode), notes on any stand-in, or a reason."""
        tables = self._tables.get(family, {})
        notes = []
        use_mode = mode
        if mode == "graph" and self.device["kind"] == "cpu" and not any(m == "graph" for _, m in tables):
            use_mode = "eager"
            notes.append("CPU has no CUDA graphs; eager time used")
        if (dtype, use_mode) in tables:
            return tables[(dtype, use_mode)], notes, ""
        alt = _SAME_WIDTH.get(dtype)
        if alt and (alt, use_mode) in tables:
            notes.append(f"{alt} measurements used for {dtype} (same width)")
            return tables[(alt, use_mode)], notes, ""
        where = self.device["kind"] if self.device["kind"] == "cpu" else self.name
        if not tables:
            return None, notes, f"no {family} measurements on {where}"
        have = sorted({f"{d} {m}" for d, m in tables})
        return None, notes, (
            f"no {family} measurements for {dtype} in {use_mode} mode on {where} (measured: {', '.join(have)})"
        )

    def can_predict(self, format, dtype="bfloat16", mode: str = "eager") -> str | None:
        """Why ``predict`` cannot answer for this format and dtype, or None if it can."""
        try:
            spec = parse_spec(format)
            dtype = normalize_dtype(dtype)
        except (FormatError, FingerprintError) as exc:
            return str(exc)
        if mode not in MODES:
            return f"mode {mode!r} is not one of {', '.join(MODES)}"
        table, _, reason = self._lookup(spec.family, dtype, mode)
        if table is not None:
            return None
        parts = getattr(spec, "parts", None)
        if parts is not None:
            missing = [why for why in (self.can_predict(p, dtype, mode) for p in parts(1, 1)) if why]
            return f"{reason}, and {missing[0]} to compose it from" if missing else None
        if spec.dense_parts(1, 1) is not None:
            dense, _, dense_reason = self._lookup("dense", dtype, mode)
            if dense is not None:
                return None
            return f"{reason}, and {dense_reason} to compose it from"
        return reason

    def predict(self, format, M: int, N: int, K: int, dtype="bfloat16", mode: str = "eager") -> float:
        """Predicted microseconds of y = x W^T, x [M, K], W [N, K] stored in ``format``."""
        return self.predict_detail(format, M, N, K, dtype=dtype, mode=mode).us

    def predict_detail(self, format, M: int, N: int, K: int, dtype="bfloat16", mode: str = "eager") -> Prediction:
        """Like ``predict`` but also names the kernel and how the number was obtained."""
        try:
            spec = parse_spec(format)
        except FormatError as exc:
            raise FingerprintError(str(exc)) from None
        dtype = normalize_dtype(dtype)
        dims = []
        for dim, v in (("M", M), ("N", N), ("K", K)):
            try:
                iv = operator.index(v)  # ints, numpy integers, 0-d integer tensors
            except TypeError:
                iv = None
            if iv is None or isinstance(v, bool) or iv < 1:
                raise FingerprintError(f"{dim} must be a positive integer, got {v!r}")
            dims.append(iv)
        M, N, K = dims
        if mode not in MODES:
            raise FingerprintError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        reason = self.can_predict(spec, dtype, mode)
        if reason:
            raise FingerprintError(f"cannot predict {spec} on fingerprint {self.name!r}: {reason}")
        table, notes, _ = self._lookup(spec.family, dtype, mode)
        if table is None and hasattr(spec, "parts"):  # a composite format: the sum of its parts
            return self._compose_parts(spec, M, N, K, dtype, mode)
        if table is None:  # only a format made of dense GEMMs gets here (can_predict): compose it
            return self._compose(spec, M, N, K, dtype, mode)
        edge: set[str] = set()
        log_us, kernel, unmeasured = self._interpolate(spec, table, M, N, K, edge, notes)
        unmeasured = unmeasured or self._cut_short(M, edge) or _far_below(N, K, edge)
        return Prediction(math.exp(log_us), kernel, "; ".join(notes + sorted(edge)), unmeasured)

    def _cut_short(self, M: int, edge: set[str]) -> str:
        """Non-empty when M lies beyond where this kernel's curve stopped although the grid went on.

        The harness stops timing an implementation at larger M once it is far slower than dense
        there; extending such a curve is a guess about a regime the device was never timed in.
        """
        grid_M = (self.data.get("grid") or {}).get("M") or []
        top = max(grid_M) if grid_M else None
        stops = [int(m) for note in edge for m in re.findall(r"extrapolated beyond M=(\d+)", note)]
        if top is None or not stops or min(stops) >= top:
            return ""
        return f"M={M} beyond M={min(stops)}, the largest this kernel was timed at for such shapes"

    def _interpolate(self, spec, table: _Table, M, N, K, edge: set[str], notes: list[str]) -> tuple[float, str, str]:
        """Along the format's parameter (the last of its ``curve_key``), within the measured group
        (the key's other parts, e.g. the block size) nearest the spec's own."""
        query_key = spec.curve_key(N, K)
        if not query_key:
            return (*table.log_us((), M, N, K, edge), "")
        group, query = query_key[:-1], query_key[-1]
        keys = list(table.grids)
        if group:
            near = min({k[:-1] for k in keys},
                       key=lambda g: (sum(abs(math.log2(a / b)) for a, b in zip(g, group)), g))
            if near != group:
                what = spec.group_label
                notes.append(f"{what} {_text(near)} measurements used for {what} {_text(group)}")
            keys = [k for k in keys if k[:-1] == near]
        keys.sort(key=lambda k: k[-1])
        params = [k[-1] for k in keys]
        answers = [table.log_us(k, M, N, K, edge) for k in keys]
        log_us, side = loglog(params, [a[0] for a in answers], query, spec.param_slopes)
        unmeasured = ""
        if side:
            bound = params[0] if side == "below" else params[-1]
            unmeasured = f"{spec.param_label} {query:g} {side} measured {bound:g}"
            edge.add(f"{unmeasured}; extrapolated")
        nearest = min(range(len(keys)), key=lambda i: abs(math.log(params[i] / query)))
        return log_us, answers[nearest][1], unmeasured

    def _compose(self, spec, M, N, K, dtype, mode) -> Prediction:
        parts = spec.dense_parts(N, K)
        preds = [self.predict_detail("dense", M, n, k, dtype, mode) for n, k in parts]
        count = {2: "two", 3: "three"}.get(len(parts), str(len(parts)))
        shapes = ", ".join(f"{M}x{k}->{n}" for n, k in parts)
        notes = [f"composed from {count} dense GEMMs ({shapes}); no {spec.family} measurements"]
        notes += [n for n in dict.fromkeys(n for p in preds for n in p.note.split("; ")) if n]
        kernels = list(dict.fromkeys(p.kernel for p in preds))
        kernel = f"{kernels[0]} x{len(preds)}" if len(kernels) == 1 else " + ".join(p.kernel for p in preds)
        return Prediction(sum(p.us for p in preds), kernel, "; ".join(notes))

    def _compose_parts(self, spec, M, N, K, dtype, mode) -> Prediction:
        """A composite without measurements of its own: its parts' times, run one after the other.
        An upper bound where the last part's launch would take the sum in its epilogue."""
        preds = [self.predict_detail(p, M, N, K, dtype, mode) for p in spec.parts(N, K)]
        names = " + ".join(str(p) for p in spec.parts(N, K))
        notes = [f"composed from its parts ({names}); no {spec.family} measurements"]
        notes += [n for n in dict.fromkeys(n for p in preds for n in p.note.split("; ")) if n]
        unmeasured = next((p.unmeasured for p in preds if p.unmeasured), "")
        return Prediction(sum(p.us for p in preds), " + ".join(p.kernel for p in preds), "; ".join(notes), unmeasured)

    def predict_experts(self, impl: str, E: int, k: int, I: int, H: int, M: int, dtype="bfloat16",
                        mode: str = "eager") -> Prediction | None:
        """Predicted time of an expert bank (``sparsec.fingerprint.experts``) run by ``impl``, or None
        where the fingerprint has no measurement of it (``sparsec fingerprint measure --experts``)."""
        from sparsec.fingerprint.experts import predict

        entries = self.data.get("experts") or []
        dtype = normalize_dtype(dtype)
        notes = []
        if mode == "graph" and self.device["kind"] == "cpu":
            mode = "eager"
            notes.append("CPU has no CUDA graphs; eager time used")
        found = predict(entries, impl, E, k, I, H, M, dtype, mode)
        alt = _SAME_WIDTH.get(dtype)
        if found is None and alt:
            found = predict(entries, impl, E, k, I, H, M, alt, mode)
            notes.append(f"{alt} measurements used for {dtype} (same width)")
        if found is None:
            return None
        us, note = found
        return Prediction(us, f"sparsec-{impl}-experts", "; ".join(notes + ([note] if note else [])))

    def matches_current_device(self, kind: str | None = None) -> str | None:
        """A warning when this fingerprint was not measured on the device the model runs on
        (``kind``: "cuda" or "cpu"; default: CUDA where this process has a GPU)."""
        kind = kind or current_device_kind()
        here = current_device_name(kind)
        fp_kind, fp_name = self.device["kind"], self.device["name"]
        if fp_kind != kind:
            return (
                f"fingerprint {self.name!r} describes a {fp_kind} device ({fp_name}) but this process "
                f"runs on {kind} ({here}); predicted times are for {fp_name}"
            )
        if slugify(fp_name) != slugify(here):
            return (
                f"fingerprint {self.name!r} was measured on {fp_name} but this device is {here}; "
                "measure this one with 'sparsec fingerprint measure'"
            )
        if kind == "cpu" and self.device.get("cores") and self.device["cores"] != _cores_here():
            return (
                f"fingerprint {self.name!r} was measured with {self.device['cores']} CPU cores but this "
                f"process may use {_cores_here()}; times will differ"
            )
        return None


def _cores_here() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------ finding files
def _shipped():
    from sparsec import fingerprints

    return fingerprints


def _user_files() -> list[Path]:
    d = user_fingerprint_dir()
    return sorted(d.glob("*.json")) if d.is_dir() else []


def _looks_like_path(name) -> bool:
    return isinstance(name, Path) or name.endswith(".json") or os.sep in name or "/" in name


def resolve_fingerprint_path(name_or_path="auto") -> Path:
    """The file a name, path or "auto" stands for; FingerprintError if there is none."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise FingerprintError(
            f"fingerprint must be a name, a path to a .json file or 'auto', got {name_or_path!r}"
        )
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FingerprintError(f"fingerprint file {path} does not exist")
        return path
    name = str(name_or_path).strip()
    if name == "auto":
        return _resolve_auto()
    shipped = _shipped().shipped_path(name)
    if shipped:
        return shipped
    for p in _user_files():
        if p.stem == name:
            return p
    user = ", ".join(p.stem for p in _user_files()) or "none"
    raise FingerprintError(
        f"unknown fingerprint {name!r}: shipped are {', '.join(_shipped().shipped_names()) or 'none'}; "
        f"yours (in {user_fingerprint_dir()}) are {user}; or pass the path of a .json file"
    )


def _resolve_auto() -> Path:
    kind = current_device_kind()
    mine = user_fingerprint_dir() / f"{device_slug(kind)}.json"
    if mine.is_file():
        return mine
    shipped = _shipped()
    if kind == "cuda":
        tokens = set(slugify(current_device_name(kind)).split("-"))
        for name in shipped.shipped_names():
            if name != "cpu" and name in tokens:
                return shipped.shipped_path(name)
    cpu = shipped.shipped_path("cpu")
    if cpu is None:
        raise FingerprintError(
            "no fingerprint for this device: none measured here and none shipped; "
            "run 'sparsec fingerprint measure'"
        )
    return cpu


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise FingerprintError(f"cannot read fingerprint {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FingerprintError(
            f"fingerprint {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): "
            "the file is truncated or corrupted; measure again with 'sparsec fingerprint measure' "
            "or restore it"
        ) from None
    if not isinstance(data, dict):
        raise FingerprintError(f"fingerprint {path} is invalid: the document must be a JSON object")
    return data


def load_fingerprint(name_or_path="auto") -> Fingerprint:
    """Load a fingerprint: a shipped name ('h200', 'h100', 'cpu'), a user one by name, a path to
    a JSON file, or 'auto' (this device's own measurement if present, else the shipped one for
    this GPU, else 'cpu'). A Fingerprint or a fingerprint dict is accepted as is (validated)."""
    if isinstance(name_or_path, Fingerprint):
        return name_or_path
    if isinstance(name_or_path, dict):
        return Fingerprint(name_or_path)
    path = resolve_fingerprint_path(name_or_path)
    return Fingerprint(_read(path), str(path))


def list_fingerprints() -> list[dict]:
    """Shipped and user fingerprints: name, origin, path, and (if readable) device and state."""
    rows = []
    shipped = _shipped()
    for origin, paths in (
        ("shipped", [shipped.shipped_path(n) for n in shipped.shipped_names()]),
        ("user", _user_files()),
    ):
        for p in paths:
            row = {"name": p.stem, "origin": origin, "path": str(p), "device": None,
                   "created": None, "complete": None, "hash": None, "error": None}
            try:
                fp = load_fingerprint(p)
                row.update(device=fp.device["name"], created=fp.data["created"],
                           complete=fp.complete, hash=fp.hash)
            except FingerprintError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


FAR_BELOW = 64  # a weight this many times smaller than the smallest measured one is outside what was timed


def _far_below(N: int, K: int, edge: set[str]) -> str:
    """Non-empty when the weight is FAR_BELOW times smaller than any this kernel was timed on.

    Below the grid's smallest weight a time is dominated by fixed costs that the curves' slopes,
    read off larger weights, do not carry: the ratio of two such extrapolations (a 512 x 3 layer
    against 512 x 512 measurements) is no measurement of which is faster."""
    smallest = [int(n) * int(k) for note in edge for n, k in re.findall(r"extrapolated below N\*K=(\d+)x(\d+)", note)]
    if not smallest or N * K * FAR_BELOW >= min(smallest):
        return ""
    return f"weight {N}x{K} is over {FAR_BELOW}x smaller than any timed ({min(smallest)} elements)"
