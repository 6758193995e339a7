"""``sparsec fingerprint measure``: measure this device and write a ``sparsec.fingerprint/1`` file.

Order of work: device ceilings and granules first (seconds), then the kernel grid as jobs (one
family implementation x dtype x format setting x weight shape, swept over every M, eager and,
on CUDA, graph-replayed). Jobs run most useful first: dense in the main dtype, torch's 2:4,
each sparsec family at its central setting, then the other settings, then the other dtypes.

The output file is rewritten atomically every few seconds with ``complete: false`` and the list
of finished jobs, so an interrupted or over-budget run loses at most the job in progress, and
the same command resumes it. Nothing in a fingerprint is typed in: every number comes from here.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparsec import interrupts
from sparsec.errors import FingerprintError
from sparsec.fingerprint.device import describe_device, device_slug, software_versions, user_fingerprint_dir
from sparsec.fingerprint.families import PARAM_GRID, Family, Variant, check_output, discover_families
from sparsec.fingerprint.probes import (
    cache_line_granule,
    copy_bandwidth,
    dispatch_granule,
    launch_overhead,
    peak_tflops,
    rest_kernels,
    sig,
    tile_granules,
)
from sparsec.fingerprint.schema import SchemaViolation, validate_fingerprint
from sparsec.formats import Dense
from sparsec.fingerprint.timing import Clock, TimingPolicy, quick_autotune, rotation_count

__all__ = ["Grid", "GRIDS", "measure", "default_output"]

SCHEMA = "sparsec.fingerprint/1"
SAVE_EVERY_S = 5.0
# An implementation this many times slower than dense (eager) from this M on is never chosen at
# larger M; its larger M are not measured (the predictor extrapolates them from the last point).
DOMINATED_RATIO = 3.0
IMPLAUSIBLE_SLACK = 1.3  # see implausible_points
DOMINATED_FROM_M = 1024  # below, fixed host costs can make a later winner look slow


@dataclass(frozen=True)
class Grid:
    """Which shapes, token counts and format settings a measurement covers."""

    name: str
    Ms: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    max_variants: int  # format settings per family (in PARAM_GRID priority order)
    policy: TimingPolicy
    peak_sizes: tuple[int, ...]
    copy_bytes: int
    granule_base: int
    cache_rows: int
    max_copies: int = 32  # rotation: most input/weight copies one pass cycles through

    def describe(self) -> dict:
        return {"name": self.name, "M": list(self.Ms), "shapes": [list(s) for s in self.shapes],
                "max_variants": self.max_variants, "params": PARAM_GRID}


def _shapes(sizes, aspect_sizes):
    square = [(s, s) for s in sizes]
    wide = [(4 * k, k) for k in aspect_sizes]
    tall = [(k, 4 * k) for k in aspect_sizes]
    return tuple(square + wide + tall)


GRIDS = {
    # Sized for one 10-minute call on an H100/H200 including probes (see docs/fingerprint.md).
    "cuda": Grid("cuda", tuple(2**i for i in range(15)),
                 _shapes((512, 1024, 2048, 4096, 8192, 16384), (512, 1024, 2048, 4096)),
                 max_variants=12, policy=TimingPolicy(repeats=15, min_repeats=5, point_budget_s=0.03),
                 peak_sizes=(4096, 8192), copy_bytes=1 << 30, granule_base=4096, cache_rows=1 << 20,
                 max_copies=96),
    # A 2-core CPU in under ~10 minutes: powers of 4 in M, weights up to 4M values, two settings
    # per family.
    "cpu": Grid("cpu", (1, 4, 16, 64, 256, 1024),
                _shapes((512, 1024, 2048), (256, 1024)),
                # Short samples, many of them, and their minimum: on a machine shared with other work a
                # sample that ran undisturbed exists and is the fastest one.
                max_variants=2, policy=TimingPolicy(repeats=25, min_repeats=5, min_sample_s=2e-4, point_budget_s=0.05,
                                                    statistic="min"),
                peak_sizes=(1024, 2048), copy_bytes=1 << 28, granule_base=1024, cache_rows=1 << 18),
    # Seconds, for tests of the harness itself.
    "tiny": Grid("tiny", (1, 8), ((256, 256), (512, 128)), max_variants=1,
                 policy=TimingPolicy(repeats=3, min_repeats=2, warmup=1, min_sample_s=1e-4, point_budget_s=0.002,
                                     statistic="min"),
                 peak_sizes=(128,), copy_bytes=1 << 20, granule_base=128, cache_rows=1 << 10),
}


@dataclass(frozen=True)
class Job:
    fam: Family
    dtype: str
    variant: Variant
    shape: tuple[int, int]
    tier: int

    @property
    def key(self) -> str:
        N, K = self.shape
        return f"{self.fam.family}|{self.fam.kernel}|{self.dtype}|{self.variant.spec}|{N}x{K}"


def _entry_key(family: str, e: dict) -> str:
    """The key of the job that measured entry ``e`` (same text as ``Job.key``)."""
    from sparsec.formats import FAMILIES

    return f"{family}|{e['kernel']}|{e['dtype']}|{FAMILIES[family].from_record(e)}|{e['N']}x{e['K']}"


def implausible_points(kernels: dict, slack: float = IMPLAUSIBLE_SLACK) -> dict[str, set[int]]:
    """Points that break two bounds every linear-layer kernel keeps along M: time does not fall
    when M doubles, and does not grow more than in proportion to M (each with ``slack``).
    A disturbed measurement (another process took the cores) breaks them; returns, per job key,
    the M to measure again: the smaller M when time fell, the larger M when it grew too fast."""
    curves: dict[tuple, dict[int, float]] = {}
    for family, entries in kernels.items():
        for e in entries:
            curves.setdefault((_entry_key(family, e), e["mode"]), {})[e["M"]] = e["us"]
    out: dict[str, set[int]] = {}
    for (key, _), pts in curves.items():
        Ms = sorted(pts)
        for a, b in zip(Ms, Ms[1:]):
            if pts[a] > slack * pts[b]:
                out.setdefault(key, set()).add(a)
            elif pts[b] > slack * (b / a) * pts[a]:
                out.setdefault(key, set()).add(b)
    return out


def default_output() -> Path:
    return user_fingerprint_dir() / f"{device_slug()}.json"


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_atomically(path: Path, doc: dict) -> None:
    """Write a fingerprint document so that a reader never sees half of it (readable by all, as shipped files are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a fingerprint is not
        interrupts.check()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plan_jobs(fams: list[Family], grid: Grid) -> list[Job]:
    jobs = []
    for fam in fams:
        for di, dtype in enumerate(fam.dtypes):
            for N, K in grid.shapes:
                variants = sorted(fam.variants(N, K), key=lambda v: v.priority)[: grid.max_variants]
                for v in variants:
                    if fam.family == Dense.family:
                        tier = 2 if di else 0  # other dtypes after the central sparse settings
                    else:
                        tier = 1 + v.priority
                    jobs.append(Job(fam, dtype, v, (N, K), tier))
    return sorted(jobs, key=lambda j: j.tier)  # stable: family order, then shapes ascending


def _bytes_of(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return int(getattr(obj, "nbytes", 0))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


class _OverBudget(Exception):
    pass


class Harness:
    """Runs the jobs of one measurement, keeping the document and the output file current."""

    def __init__(self, out: Path, grid: Grid, budget_s: float, doc: dict, console):
        self.out, self.grid, self.budget_s, self.doc, self.console = out, grid, budget_s, doc, console
        self.device = torch.device("cuda" if doc["device"]["kind"] == "cuda" else "cpu")
        self.clock = Clock(self.device, grid.policy)
        self.t0 = time.monotonic()
        self.before = doc["method"].get("seconds") or 0.0  # measuring time of earlier, resumed runs
        self.last_save = 0.0
        self.measured_here: set[str] = set()
        self.rotation_bytes = doc["method"]["rotation_bytes"]
        # each graph-replayed call behind a small kernel of its own (``Clock.graph``'s ``lead``): a
        # document measured before that keeps being extended back to back, so its points agree
        self.lead = bool(doc["method"].get("graph_lead"))
        self.failures: dict[str, int] = {}
        self.no_graph: dict[str, str] = {}  # kernels whose graph capture failed, and why
        self.dense_best: dict[tuple, float] = {}  # fastest dense time over modes, per point
        self._note_dense(doc["kernels"].get("dense", []))

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _note_dense(self, entries: list[dict]) -> None:
        for e in entries:
            k = (e["dtype"], e["N"], e["K"], e["M"])
            self.dense_best[k] = min(e["us"], self.dense_best.get(k, math.inf))

    def save(self, force=False) -> None:
        if force or time.monotonic() - self.last_save > SAVE_EVERY_S:
            self.doc["created"] = _now()
            write_atomically(self.out, self.doc)
            self.last_save = time.monotonic()

    def check_budget(self) -> None:
        if self.elapsed() > self.budget_s:
            raise _OverBudget()

    def _prepare(self, job: Job, gen: torch.Generator):
        """The job's first weight, checked for correct output."""
        fam, (N, K) = job.fam, job.shape
        dtype = getattr(torch, job.dtype)
        weight, dense = fam.build(job.variant, N, K, dtype, self.device, gen)
        wrong = check_output(fam, weight, dense, N, K, dtype, self.device, gen)
        if wrong:
            raise RuntimeError(f"wrong results: {wrong}")
        return [weight]

    def _point(self, job: Job, weights: list, M: int, gen: torch.Generator) -> dict[str, float]:
        """Microseconds per mode at one M; ``weights`` grows to the rotation this M needs."""
        fam, (N, K) = job.fam, job.shape
        dtype = getattr(torch, job.dtype)
        esize = torch.empty((), dtype=dtype).element_size()
        r = rotation_count(_bytes_of(weights[0]) + (M * K + M * N) * esize, self.rotation_bytes, self.grid.max_copies)
        while len(weights) < r:
            weights.append(fam.build(job.variant, N, K, dtype, self.device, gen)[0])
        xs = [torch.randn(M, K, generator=gen, device=self.device, dtype=torch.float32).to(dtype) for _ in range(r)]
        calls = [lambda x=x, w=w: fam.run(x, w) for x, w in zip(xs, weights)]
        single = self.clock.warm(calls)
        times = {"eager": self.clock.eager(calls, single)}
        if self.clock.cuda and fam.kernel not in self.no_graph:
            try:
                times["graph"] = self.clock.graph(calls, single, lead=self.lead)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside the kernel
                self.no_graph[fam.kernel] = f"cannot be captured in a CUDA graph: {_first_line(exc)}"
                self.doc["skipped"][f"{fam.kernel} graph"] = self.no_graph[fam.kernel]
                torch.cuda.synchronize()
        return times

    def run_job(self, job: Job, gen: torch.Generator, advance, entries: list[dict], have: frozenset = frozenset()) -> None:
        """Measure one job over every M not in ``have``, appending to ``entries`` (kept if a later M fails)."""
        fam, (N, K) = job.fam, job.shape
        cuts = [_cut_at(k) for k in self.doc["skipped"] if k.startswith(f"{job.key} M>")]
        cut = min((c for c in cuts if c is not None), default=None)
        weights = self._prepare(job, gen)
        for M in self.grid.Ms:
            if M in have or (cut is not None and M > cut):
                # measured by an earlier run (a reopened curve continues where it stopped), or
                # beyond where an earlier run stopped this curve (kept when small M is redone)
                advance(1)
                continue
            self.check_budget()
            try:
                times = self._point(job, weights, M, gen)
            except torch.cuda.OutOfMemoryError:
                self.doc["skipped"][f"{job.key} M>={M}"] = "out of device memory"
                torch.cuda.empty_cache()
                advance(len(self.grid.Ms) - self.grid.Ms.index(M))
                break
            for mode, us in times.items():
                e = {"M": M, "N": N, "K": K, "dtype": job.dtype, "mode": mode, "us": sig(us), "kernel": fam.kernel}
                e.update(job.variant.params)
                entries.append(e)
            advance(1)
            dense_us = self.dense_best.get((job.dtype, N, K, M))
            mine = min(times.values())  # eager or graph: whichever mode it could be chosen in
            if fam.family != Dense.family and M >= DOMINATED_FROM_M and dense_us and mine > DOMINATED_RATIO * dense_us:
                rest = self.grid.Ms[self.grid.Ms.index(M) + 1:]
                if rest:
                    self.doc["skipped"][f"{job.key} M>{M}"] = (
                        f"{mine / dense_us:.1f}x slower than dense at M={M} in every mode; larger M not measured")
                    advance(len(rest))
                break

    def recheck(self, jobs: list[Job], passes: int = 4, up_to: int | None = None) -> int:
        """Measure again every curve (job) with a point that breaks the bounds of
        ``implausible_points``, keeping the smaller time per point; returns the points redone.
        Whole curves, since a disturbance often spans neighbouring points; with ``up_to``, only
        their points at M <= up_to (the points a ``--redo-up-to`` run measured)."""
        by_key = {j.key: j for j in jobs}
        gen = torch.Generator(device=self.device).manual_seed(int(time.time()) & 0xFFFF)
        total = 0
        for _ in range(passes):
            suspects = [k for k in implausible_points(self.doc["kernels"]) if k in by_key]
            if not suspects or self.elapsed() > self.budget_s:
                break
            self.console.print(f"measuring {len(suspects)} curves with implausible points again")
            for key in suspects:
                if self.elapsed() > self.budget_s:
                    break
                job = by_key[key]
                mine = [e for e in self.doc["kernels"][job.fam.family] if _entry_key(job.fam.family, e) == key]
                try:
                    weights = self._prepare(job, gen)
                    for M in sorted({e["M"] for e in mine if up_to is None or e["M"] <= up_to}):
                        times = self._point(job, weights, M, gen)
                        for e in mine:
                            if e["M"] == M and e["mode"] in times:
                                e["us"] = min(e["us"], sig(times[e["mode"]]))
                        total += 1
                except Exception as exc:  # noqa: BLE001 - the first measurement stands
                    self.console.print(f"could not measure {key} again: {_first_line(exc)}", markup=False)
                self.save()
        return total

    def run(self, jobs: list[Job]) -> bool:
        """Run jobs not yet done; True when all are done."""
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        done = set(self.doc["grid"]["done"])
        todo = [j for j in jobs if j.key not in done]
        self.measured_here.update(j.key for j in todo)
        points = len(todo) * len(self.grid.Ms)
        gen = torch.Generator(device=self.device).manual_seed(int(time.time()) & 0xFFFF)
        last_note = time.monotonic()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("points"),
                      TimeElapsedColumn(), console=self.console, transient=False) as bar:
            task = bar.add_task("kernels", total=points)
            for job in todo:
                bar.update(task, description=escape(f"{job.fam.label()} {job.variant.spec} {job.dtype} {job.shape[0]}x{job.shape[1]}"))
                advance = lambda n: bar.advance(task, n)  # noqa: E731
                label = f"{job.fam.kernel}|{job.dtype}"
                if self.failures.get(label, 0) >= 2:
                    self.doc["skipped"][job.key] = f"{job.fam.kernel} failed twice for {job.dtype}; not tried again"
                    self.doc["grid"]["done"].append(job.key)
                    advance(len(self.grid.Ms))
                    continue
                entries: list[dict] = []
                have = frozenset(e["M"] for e in self.doc["kernels"].get(job.fam.family, [])
                                 if _entry_key(job.fam.family, e) == job.key)
                try:
                    self.run_job(job, gen, advance, entries, have)
                except _OverBudget:
                    self.console.print(f"time budget of {self.budget_s:g} s used; partial result saved")
                    return False
                except Exception as exc:  # noqa: BLE001 - one kernel's failure must not end the run
                    self.failures[label] = self.failures.get(label, 0) + 1
                    self.doc["skipped"][job.key] = _first_line(exc)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                self.doc["kernels"].setdefault(job.fam.family, []).extend(entries)
                if job.fam.family == Dense.family:
                    self._note_dense(entries)
                self.doc["grid"]["done"].append(job.key)
                self.save()
                if time.monotonic() - last_note > 30 and not self.console.is_terminal:
                    self.console.print(f"[{self.elapsed():.0f} s] {bar.tasks[0].completed}/{points} points")
                    last_note = time.monotonic()
        return True


def _new_document(name: str, grid: Grid, kind: str, policy: TimingPolicy, timer: str) -> dict:
    device = describe_device(kind)
    software = software_versions(kind)
    from sparsec import __version__

    software["sparsec"] = __version__
    if kind == "cuda":
        rotation = 2 * (device["l2_bytes"] or 64 << 20)
        on = f"1 GPU ({device['name']}, {device['sms']} SMs)"
    else:
        rotation = 2 * (_cpu_llc_bytes() or 32 << 20)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        on = f"a {device['cores']}-core CPU machine ({device['name']})" + (
            f", load average {load:.1f} when the measurement started" if load is not None else "")
    method = policy.describe(timer)
    method.update(rotation_bytes=rotation, seconds=0.0, float32_matmul=torch.get_float32_matmul_precision())
    if kind == "cuda":
        method["graph_lead"] = ("graph mode: each call replayed behind a small elementwise kernel of its own, "
                                "whose time replayed alone is taken off (as a layer follows the op that made "
                                "its input; a programmatically launched kernel overlaps only copies of itself)")
    return {
        "schema": SCHEMA, "name": name, "created": _now(), "complete": False, "measured_on": on,
        "device": device, "software": software,
        "measured": {"copy_GBps": None, "peak_tflops": {}, "launch_us": {"eager": None, "graph": None}},
        "granules": {}, "kernels": {}, "skipped": {},
        "grid": {**grid.describe(), "done": []},
        "method": method,
    }


def _cpu_llc_bytes() -> int | None:
    """Size of the largest CPU cache level in sysfs (the last-level cache), in bytes."""
    best = None
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = p.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best or 0, int(digits) * scale)
    return best


def _redo(doc: dict, what: list[str], up_to: int | None = None) -> int:
    """Forget the measurements of kernels or families named in ``what`` so they run again; with
    ``up_to``, only their points at M <= up_to (a kernel changed for small M only), keeping the
    rest of each curve and where it was stopped early."""
    def named(family, kernel):
        return family in what or kernel in what

    dropped = 0
    for family in list(doc["kernels"]):
        keep = [e for e in doc["kernels"][family]
                if not named(family, e["kernel"]) or (up_to is not None and e["M"] > up_to)]
        dropped += len(doc["kernels"][family]) - len(keep)
        doc["kernels"][family] = keep
    doc["grid"]["done"] = [k for k in doc["grid"]["done"] if not set(k.split("|")[:2]) & set(what)]
    doc["skipped"] = {k: v for k, v in doc["skipped"].items()
                      if not set(k.split(" ")[0].split("|")[:2]) & set(what)
                      or (up_to is not None and _cut_at(k) is not None)}
    doc["complete"] = False
    return dropped


def _cut_at(skip_key: str) -> int | None:
    """The M after which a curve was stopped early, from its skip key (``"<job> M>1024"``)."""
    _, sep, m = skip_key.rpartition(" M>")
    return int(m) if sep and m.isdigit() else None


def _reopen_cut_curves(doc: dict) -> int:
    """Reopen the curves stopped early ("larger M not measured"), to continue them under the
    current rule; returns how many. A fingerprint measured before the harness compared the faster
    mode stopped curves that were slow eager but not under graph replay; the planner refuses to
    choose beyond a curve's end, so those M stay out of reach until the curve is continued."""
    cut = [k for k, why in doc["skipped"].items() if "larger M not measured" in why]
    jobs = {k.rsplit(" M>", 1)[0] for k in cut}
    for k in cut:
        del doc["skipped"][k]
    doc["grid"]["done"] = [k for k in doc["grid"]["done"] if k not in jobs]
    if jobs:
        doc["complete"] = False
    return len(jobs)


def _check_redo_names(redo: list[str], fams: list[Family], skipped: dict[str, str], kind: str) -> None:
    """Every --redo name is a family or kernel measurable here: a name that matches nothing would
    otherwise rewrite the file having measured nothing."""
    runnable = {f.family for f in fams} | {f.kernel for f in fams}
    for name in redo:
        if name in runnable:
            continue
        why = next((v for k, v in skipped.items() if name in _skipped_names(k)), None)
        if why is not None:
            raise FingerprintError(f"--redo {name}: it cannot be measured on this {kind} device ({why})")
        raise FingerprintError(f"--redo {name}: no family or kernel of that name is measured on this {kind} device; "
                               f"known here: {', '.join(sorted(runnable))}")


def _skipped_names(key: str) -> set[str]:
    """The family and kernel names a skipped entry (``"FAMILY [IMPL]"``) stands for: the kernel is
    IMPL itself (cusparselt) or IMPL-FAMILY (sparsec-triton-block)."""
    family, _, impl = key.partition(" [")
    impl = impl.rstrip("]")
    return {family, impl, f"{impl}-{family}"}


def _in_file(jobs: list[Job], doc: dict) -> list[Job]:
    """The jobs of families the file's grid has (a redo adds the families it names): a family added
    to sparsec after the file was measured is measured only when named (--redo FAMILY)."""
    params = doc["grid"].get("params", {})
    return [j for j in jobs if j.fam.family not in PARAM_GRID or j.fam.family in params]


def _load_partial(out: Path, grid: Grid, kind: str, fresh: bool, redo: list[str] | None = None,
                  extend: bool = False, redo_up_to: int | None = None) -> dict | None:
    if (redo or extend) and not fresh and not out.exists():
        raise FingerprintError(f"{out} does not exist: --redo and --extend continue an existing fingerprint; "
                               "name one with -o, or measure a new one without them")
    if fresh or not out.exists():
        return None
    try:
        doc = json.loads(out.read_text())
        validate_fingerprint(doc)
    except (json.JSONDecodeError, SchemaViolation, OSError) as exc:
        raise FingerprintError(
            f"{out} exists but is not a readable fingerprint ({exc}); pass --fresh to overwrite it"
        ) from None
    if redo:
        _redo(doc, redo, redo_up_to)
        # a family measured again (or for the first time) takes the parameter grid it has now
        params = doc.setdefault("grid", {}).setdefault("params", {})
        for family in redo:
            if family in PARAM_GRID:
                params[family] = json.loads(json.dumps(PARAM_GRID[family]))
    if extend and not _reopen_cut_curves(doc) and doc.get("complete"):
        raise FingerprintError(f"{out} has no curve stopped early; nothing to extend")
    if doc.get("complete"):
        raise FingerprintError(f"{out} is already a complete fingerprint; pass --fresh to measure again, "
                               "--redo KERNEL to measure one kernel or family again, or --extend to continue "
                               "curves stopped early")
    here = describe_device(kind)["name"]
    if doc["device"]["name"] != here:
        raise FingerprintError(
            f"{out} is a partial fingerprint of {doc['device']['name']}, not of this {here}; "
            "use another -o or pass --fresh")
    wanted = json.loads(json.dumps({**grid.describe(), "done": doc.get("grid", {}).get("done", [])}))
    if redo and not extend:
        # families this sparsec measures that the file never had stay unmeasured unless named
        # (``_in_file``)
        have = doc.get("grid", {}).get("params", {})
        wanted["params"] = {f: v for f, v in wanted["params"].items() if f in have or f in redo}
    if doc.get("grid") != wanted:
        raise FingerprintError(f"{out} was measured with a different grid; pass --fresh to start over")
    return doc


def _probes(h: Harness) -> None:
    clock, grid, m = h.clock, h.grid, h.doc["measured"]
    if m["copy_GBps"] is not None:
        return  # resumed: the probes ran already
    h.console.print("measuring copy bandwidth, peak GEMM rates, launch overhead and granules ...")
    cuda = clock.cuda
    m["copy_GBps"] = copy_bandwidth(clock, grid.copy_bytes)
    m["peak_tflops"] = peak_tflops(clock, list(grid.peak_sizes),
                                   ["bfloat16", "float16", "float32", "tf32"] if cuda else ["float32", "bfloat16"])
    m["launch_us"] = launch_overhead(clock)
    m["rest_us"] = rest_kernels(clock, h.doc["skipped"])
    tile, tile_probe = tile_granules(clock, grid.granule_base, torch.bfloat16 if cuda else torch.float32)
    probe = {"tile": tile_probe}
    line = None
    if cuda:
        line, probe["cache_line"] = cache_line_granule(clock, grid.cache_rows)
    else:
        h.doc["skipped"]["granules.cache_line_bytes"] = (
            "on CPU a strided copy costs per element, not per line, so the probe cannot see the line")
    h.doc["granules"] = {"cache_line_bytes": line, "tile": tile, "dispatch_M": {}, "probe": probe}
    h.save(force=True)


def _finish(h: Harness) -> None:
    dense = h.doc["kernels"].get("dense", [])
    peaks = h.doc["measured"]["peak_tflops"]
    for e in dense:  # the best GEMM rate seen anywhere in the run, probe or grid
        rate = sig(2 * e["M"] * e["N"] * e["K"] / e["us"] / 1e6)
        if e["dtype"] in peaks and rate > peaks[e["dtype"]]:
            peaks[e["dtype"]] = rate
    main = "bfloat16" if h.clock.cuda else "float32"
    shapes = sorted({(e["N"], e["K"]) for e in dense}, key=lambda s: abs(math.log2(s[0] * s[1] / 4096**2)))
    if shapes:
        h.doc["granules"]["dispatch_M"] = {
            mode: dispatch_granule(dense, main, mode, shapes[0]) for mode in (("eager", "graph") if h.clock.cuda else ("eager",))
        }
        h.doc["granules"]["probe"]["dispatch"] = {"dtype": main, "shape": list(shapes[0]), "within": 0.10}


def measure(out: Path | None = None, *, grid: str | None = None, budget_s: float | None = None,
            fresh: bool = False, name: str | None = None, redo: list[str] | None = None, console=None,
            extend: bool = False, redo_up_to: int | None = None, device: str | None = None) -> Path:
    """Measure this device into ``out`` (default: the user fingerprint of this device); returns the path.

    ``device``: "cuda" or "cpu" (default: the GPU where this process has one, else the CPU)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    if device not in (None, "cuda", "cpu"):
        raise FingerprintError(f"device {device!r} is not 'cuda' or 'cpu'")
    if device == "cuda" and not torch.cuda.is_available():
        raise FingerprintError("device 'cuda' asked for, but this process sees no CUDA GPU; measure with --device cpu")
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = GRIDS[grid or kind]
    out = Path(out) if out else default_output()
    budget_s = budget_s if budget_s is not None else (420.0 if kind == "cuda" else 600.0)
    fams, skipped = discover_families(torch.device(kind))
    if redo:
        _check_redo_names(redo, fams, skipped, kind)
    if kind == "cuda":
        torch.cuda.init()
    clock = Clock(torch.device(kind), g.policy)
    doc = _load_partial(out, g, kind, fresh, redo, extend, redo_up_to)
    if doc is None:
        doc = _new_document(name or out.stem, g, kind, g.policy, clock.timer_name)
    else:
        console.print(f"resuming {out}: {len(doc['grid']['done'])} jobs already measured")
    doc["skipped"].update(skipped)
    h = Harness(out, g, budget_s, doc, console)
    for fam_key, why in skipped.items():
        console.print(f"skipping {fam_key}: {why}", markup=False)
    try:
        _probes(h)
        jobs = plan_jobs(fams, g)
        if redo and not extend:
            jobs = _in_file(jobs, doc)
        with quick_autotune() as how:
            if how:
                doc["method"]["autotune"] = how
            complete = h.run(jobs)
            if complete:
                # after --redo or --extend only the curves this run measured: the rest were
                # rechecked when first measured, and their budget goes to the new points
                again = h.recheck(jobs if not (redo or extend) else [j for j in jobs if j.key in h.measured_here],
                                  up_to=redo_up_to if redo and not extend else None)
                doc["method"]["remeasured_points"] = again
    finally:
        doc["method"]["seconds"] = round(h.before + h.elapsed(), 1)
        h.save(force=True)
    if complete:
        _finish(h)
        doc["complete"] = True
        doc["grid"]["done"] = sorted(doc["grid"]["done"])
        h.save(force=True)
        validate_fingerprint(doc)
        console.print(f"fingerprint written to {out} ({sum(len(v) for v in doc['kernels'].values())} points, "
                      f"{doc['method']['seconds']:g} s)")
    else:
        console.print(f"partial fingerprint in {out}; run the same command again to resume")
    return out


def measure_experts(out: Path | None = None, *, grid: str | None = None, device: str | None = None,
                    console=None) -> Path:
    """Time every expert-bank implementation (``sparsec.fingerprint.experts``) on this device into the
    ``experts`` section of the existing fingerprint ``out`` (this device's own by default)."""
    from rich.console import Console

    from sparsec.fingerprint import experts

    console = console or Console(stderr=True)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else default_output()
    doc = _this_devices(out, kind, "expert banks", "--experts")
    name = grid or kind
    g = GRIDS[name]
    dtype = torch.bfloat16 if kind == "cuda" else torch.float32
    dev = torch.device("cuda" if kind == "cuda" else "cpu")
    started = time.perf_counter()
    doc["experts"] = experts.measure(dev, name, g.policy, dtype, progress=lambda what: console.print(
        f"[{time.perf_counter() - started:.0f} s] {what}"))
    validate_fingerprint(doc)
    write_atomically(out, doc)
    console.print(f"expert banks written to {out} ({len(doc['experts'])} points, {time.perf_counter() - started:.1f} s)")
    return out


def measure_rest(out: Path | None = None, *, device: str | None = None, console=None) -> Path:
    """Time the rest-of-graph probes (``probes.rest_kernels``) on this device into the existing
    fingerprint ``out`` (this device's own by default), replacing ``measured.rest_us``: a
    fingerprint measured before the probes existed gains them without its grid measured again."""
    from rich.console import Console

    console = console or Console(stderr=True)
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out) if out is not None else default_output()
    doc = _this_devices(out, kind, "rest kernels", "--rest")
    started = time.perf_counter()
    clock = Clock(torch.device(kind), GRIDS[kind].policy)
    for key in [k for k in doc["skipped"] if k.startswith("rest_us.")]:
        del doc["skipped"][key]
    doc["measured"]["rest_us"] = rest_kernels(clock, doc["skipped"])
    validate_fingerprint(doc)
    write_atomically(out, doc)
    from sparsec.rest import describe_probes

    console.print(f"rest kernels written to {out} ({time.perf_counter() - started:.1f} s): "
                  + describe_probes(doc["measured"]["rest_us"], gpu=kind == "cuda"), markup=False)
    return out


def _this_devices(out: Path, kind: str, what: str, flag: str) -> dict:
    """The fingerprint at ``out``, checked to be readable and of this device, for adding ``what``."""
    if not out.exists():
        raise FingerprintError(f"{out} does not exist: measure the device's fingerprint first "
                               f"('sparsec fingerprint measure'), then add its {what} with {flag}")
    try:
        doc = json.loads(out.read_text())
        validate_fingerprint(doc)
    except (json.JSONDecodeError, SchemaViolation, OSError) as exc:
        raise FingerprintError(f"{out} is not a readable fingerprint ({exc}); measure it again") from None
    here = describe_device(kind)["name"]
    if doc["device"]["name"] != here:
        raise FingerprintError(f"{out} is a fingerprint of {doc['device']['name']}, not of this {here}; "
                               f"{what} are measured into the fingerprint of the device they run on")
    return doc
