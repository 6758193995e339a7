"""``sparsec fingerprint``: measure this device, show a fingerprint, list the known ones.

``show`` puts a device's sparsity on one screen: its ceilings and granules, then per format
setting the crossover table: for each measured weight shape, the smallest M from which the
format is faster than dense (and stays so over the measured M), eager and under CUDA graphs.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["register", "crossover_table"]

SHOWN_SETTINGS = 4


def register(subparsers) -> None:
    p = subparsers.add_parser("fingerprint", help="measure, show or list hardware fingerprints",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="fingerprint_command", metavar="ACTION")
    sub.required = True

    m = sub.add_parser("measure", help="measure this device (GPU if present, else CPU)")
    m.add_argument("-o", "--output", type=Path, default=None,
                   help="output JSON (default: your fingerprint of this device, which 'auto' uses)")
    m.add_argument("--name", default=None, help="fingerprint name (default: the output file's stem)")
    m.add_argument("--budget-s", type=float, default=None,
                   help="stop after this many seconds with a partial, resumable file (default 420 GPU, 600 CPU)")
    m.add_argument("--grid", choices=["cuda", "cpu", "tiny"], default=None,
                   help="measurement grid (default: this device's); 'tiny' checks the harness in seconds")
    m.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="which device to measure (default: the GPU where there is one, else the CPU)")
    m.add_argument("--fresh", action="store_true", help="start over instead of resuming a partial file")
    m.add_argument("--redo", action="append", default=None, metavar="KERNEL",
                   help="measure this kernel (e.g. cusparselt, sparsec-triton-block) or family (e.g. block) "
                        "again in an existing file, keeping the rest (a family the file predates is measured only "
                        "when named); repeatable")
    m.add_argument("--redo-up-to", type=int, default=None, metavar="M",
                   help="with --redo: only the points at M <= this (e.g. after a small-M kernel changed)")
    m.add_argument("--extend", action="store_true",
                   help="continue the curves an earlier run stopped early (slower than dense at a large M) in an "
                        "existing file, under the current rule, from where they stopped")
    m.add_argument("--onnxruntime", nargs="?", const="CPUExecutionProvider", default=None, metavar="PROVIDER",
                   help="measure onnxruntime running sparsec's ONNX subgraphs with this execution provider "
                        "(default CPUExecutionProvider) instead of torch; needs -o")
    m.add_argument("--experts", action="store_true",
                   help="measure the expert-bank implementations (mixture of experts) into an existing fingerprint "
                        "of this device, replacing its 'experts' section")
    m.add_argument("--rest", action="store_true",
                   help="measure the smallest norm and attention kernels (what a model's dense rest costs "
                        "at decode sizes) into an existing fingerprint of this device, replacing its "
                        "'measured.rest_us'")
    m.add_argument("--threads", type=int, default=None,
                   help="with --onnxruntime: intra-op threads (0: its default pool; default: the grid's, 1 on 'cpu')")
    m.set_defaults(func=_measure)

    s = sub.add_parser("show", help="device, ceilings and crossover tables of a fingerprint")
    s.add_argument("fingerprint", nargs="?", default="auto", help="name (h200, h100, cpu), path, or auto")
    s.add_argument("--dtype", default=None, help="dtype of the tables (default: bfloat16 on GPU, float32 on CPU)")
    s.add_argument("--all", action="store_true", help=f"every measured setting (default: the first {SHOWN_SETTINGS})")
    s.set_defaults(func=_show)

    ls = sub.add_parser("list", help="shipped fingerprints and your own")
    ls.set_defaults(func=_list)


def _measure(args) -> int:
    if args.output is not None:
        from sparsec.errors import FingerprintError
        from sparsec.paths import check_writable

        check_writable(args.output, FingerprintError, "fingerprint.json")  # before minutes of measuring
    if args.onnxruntime:
        from sparsec.errors import FingerprintError
        from sparsec.fingerprint.ort import measure as measure_ort

        if args.output is None:
            raise FingerprintError("--onnxruntime needs -o PATH (an onnxruntime fingerprint is not this device's own)")
        path = measure_ort(args.output, grid=args.grid, provider=args.onnxruntime, name=args.name,
                           threads=args.threads)
        print(f"wrote {path}")
        return 0
    from sparsec.fingerprint.measure import measure, measure_experts, measure_rest

    if args.experts and args.rest:
        from sparsec.errors import FingerprintError

        raise FingerprintError("--experts and --rest each add one section: run them one after the other")
    if args.experts or args.rest:
        path = (measure_experts(args.output, grid=args.grid, device=args.device) if args.experts
                else measure_rest(args.output, device=args.device))
        print(f"wrote {path}")
        return 0
    if args.redo_up_to is not None and not args.redo:
        from sparsec.errors import FingerprintError

        raise FingerprintError("--redo-up-to needs --redo KERNEL: name the kernels whose small-M points to measure again")
    measure(args.output, grid=args.grid, budget_s=args.budget_s, fresh=args.fresh, name=args.name, redo=args.redo,
            extend=args.extend, redo_up_to=args.redo_up_to, device=args.device)
    return 0


def _variants(fp, family: str, dtype: str) -> list[str]:
    """Names of the measured settings of ``family`` across shapes (``FormatSpec.label``: low rank
    by rank fraction, shown as the rank of each shape)."""
    from sparsec.formats import FAMILIES

    cls = FAMILIES[family]
    return list(dict.fromkeys(cls.from_record(e).label(e["N"], e["K"])
                              for e in fp.data["kernels"].get(family, []) if e["dtype"] == dtype))


def _spec_for(variant: str, N: int, K: int) -> str:
    from sparsec.formats import FAMILIES, family_of

    return str(FAMILIES[family_of(variant.split("@")[0])].from_label(variant, N, K))


def crossover_table(fp, variant: str, dtype: str, mode: str) -> list[tuple[int, int, list[tuple[int, int | None]], float]]:
    """Per measured (N, K): the measured M ranges where ``variant`` beats dense, as (first, last)
    with last None when it keeps winning to the largest measured M, and its best speed-up.

    A format can win at small M only (a 2:4 kernel that reads half the bytes but has more to
    do per token) or at large M only (a block kernel whose fixed cost is amortised): both show.
    """
    from sparsec.errors import FingerprintError

    dense = {(e["N"], e["K"], e["M"]) for e in fp.data["kernels"].get("dense", [])
             if e["dtype"] == dtype and e["mode"] == mode}
    shapes = sorted({(n, k) for n, k, _ in dense}, key=lambda s: (s[0] * s[1], s[0]))
    rows = []
    for N, K in shapes:
        spec = _spec_for(variant, N, K)
        from sparsec.formats import parse_spec

        if parse_spec(spec).check(N, K):
            continue
        Ms = sorted(m for n, k, m in dense if (n, k) == (N, K))
        try:
            # a point the format was never timed at counts as "not faster": the table shows measurements
            speed = []
            for M in Ms:
                pred = fp.predict_detail(spec, M, N, K, dtype, mode)
                dense_us = fp.predict("dense", M, N, K, dtype, mode)
                speed.append(0.0 if pred.unmeasured else dense_us / pred.us)
        except FingerprintError:
            return []
        wins: list[tuple[int, int | None]] = []
        start = None
        for i, (M, s) in enumerate(zip(Ms, speed)):
            if s > 1.0 and start is None:
                start = M
            if s <= 1.0 and start is not None:
                wins.append((start, Ms[i - 1]))
                start = None
        if start is not None:
            wins.append((start, None))
        rows.append((N, K, wins, max(speed)))
    return rows


def render_wins(wins: list[tuple[int, int | None]]) -> str:
    """``[(1, 16), (2048, None)]`` -> ``1-16,≥2048``; no win -> ``-``."""
    if not wins:
        return "-"
    return ",".join(f"≥{a}" if b is None else (str(a) if a == b else f"{a}-{b}") for a, b in wins)


def _show(args) -> int:
    from rich.table import Table

    from sparsec.commands import console as commands_console
    from sparsec.fingerprint import load_fingerprint, normalize_dtype

    fp = load_fingerprint(args.fingerprint)
    d, m, g = fp.device, fp.data["measured"], fp.data.get("granules", {})
    console = commands_console()
    state = "complete" if fp.complete else "PARTIAL (resume with 'sparsec fingerprint measure -o ...')"
    console.print(f"[bold]{fp.name}[/bold]  {d['name']} ({d['kind']})  hash {fp.hash}  {state}")
    console.print(f"source {fp.source}; measured {fp.data['created']} on {fp.data.get('measured_on', '?')}",
                  markup=False)
    sw = fp.data["software"]
    console.print("software: " + ", ".join(f"{k} {v}" for k, v in sw.items() if v))
    peaks = ", ".join(f"{k} {v:g}" for k, v in m["peak_tflops"].items())
    launch = m["launch_us"]
    console.print(f"copy {m['copy_GBps']} GB/s; peak TFLOP/s: {peaks or '-'}; launch {launch['eager']} us eager, "
                  f"{launch['graph'] if launch['graph'] is not None else '-'} us graph")
    from sparsec.rest import describe_probes

    console.print("rest kernels: " + describe_probes(m.get("rest_us"), gpu=d["kind"] == "cuda"), markup=False)
    if d["kind"] == "cuda":
        lead = fp.data.get("method", {}).get("graph_lead")
        console.print("graph points: " + ("each call behind a small kernel of its own, taken off" if lead else
                                          "back to back (a kernel launched programmatically overlaps copies of "
                                          "itself there; measure afresh to time each behind a small kernel)"))
    tile = g.get("tile", {})
    console.print(f"granules: cache line {g.get('cache_line_bytes')} B; tile M/N/K "
                  f"{tile.get('M')}/{tile.get('N')}/{tile.get('K')}; dispatch M {g.get('dispatch_M', {})}")
    skipped = fp.data.get("skipped", {})
    if skipped:
        console.print(f"not measured: {len(skipped)} item(s), e.g. " + "; ".join(
            f"{k}: {v}" for k, v in list(skipped.items())[:3]), markup=False)
    dtype = normalize_dtype(args.dtype or ("bfloat16" if d["kind"] == "cuda" else "float32"))
    modes = ("eager", "graph") if d["kind"] == "cuda" else ("eager",)
    how = "/".join(modes)
    from sparsec.formats import STRUCTURED_FAMILIES

    for family in STRUCTURED_FAMILIES:
        variants = _variants(fp, family, dtype)
        if not args.all:
            variants = variants[:SHOWN_SETTINGS]
        tables = {(v, mode): crossover_table(fp, v, dtype, mode) for v in variants for mode in modes}
        variants = [v for v in variants if any(tables[(v, m)] for m in modes)]
        if not variants:
            continue
        console.print(f"\n{family} vs dense, {dtype}: the M where it is faster ({how}; - never)")
        t = Table()
        t.add_column("N x K")
        for v in variants:
            t.add_column(v.removeprefix("lowrank@").join(("r=", "")) if v.startswith("lowrank@") else v, justify="right")
        cells = {}
        for v in variants:
            for mode in modes:
                for N, K, wins, _ in tables[(v, mode)]:
                    cells.setdefault((N, K), {}).setdefault(v, {})[mode] = render_wins(wins)
        for N, K in sorted(cells, key=lambda s: (s[0] * s[1], s[0])):
            row = [f"{N}x{K}"]
            for v in variants:
                got = cells[(N, K)].get(v)
                row.append("/".join(got.get(m, "?") for m in modes) if got else "")
            t.add_row(*row)
        console.print(t)
    if not args.all:
        console.print(f"(at most {SHOWN_SETTINGS} settings per format; --all shows every measured one; "
                      "low rank r= is the rank as a fraction of min(N, K))")
    _show_experts(console, fp, modes)
    return 0


def _show_experts(console, fp, modes) -> None:
    """Per measured bank and token count, the fastest expert-bank implementation and its time."""
    from rich.table import Table

    entries = fp.data.get("experts") or []
    if not entries:
        return
    dtypes = sorted({e["dtype"] for e in entries})
    console.print(f"\nexpert banks ({', '.join(dtypes)}): the fastest implementation per token count "
                  f"({'/'.join(modes)})")
    t = Table()
    for col in ("bank (E, top-k, H -> I)", "M", *modes):
        t.add_column(col, justify="right" if col != "bank (E, top-k, H -> I)" else "left")
    banks = sorted({(e["experts"], e["top_k"], e["H"], e["I"]) for e in entries})
    for E, k, H, I in banks:
        for M in sorted({e["M"] for e in entries if (e["experts"], e["top_k"], e["H"], e["I"]) == (E, k, H, I)}):
            cells = []
            for mode in modes:
                here = [e for e in entries if (e["experts"], e["top_k"], e["H"], e["I"], e["M"], e["mode"]) ==
                        (E, k, H, I, M, mode)]
                best = min(here, key=lambda e: e["us"]) if here else None
                cells.append(f"{best['impl']} {best['us']:.1f} us" if best else "-")
            t.add_row(f"{E}, {k}, {H} -> {I}", str(M), *cells)
    console.print(t)


def _list(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from sparsec.fingerprint import list_fingerprints

    t = Table(title="fingerprints", title_justify="left")
    for col in ("name", "origin", "device", "created", "state", "path"):
        t.add_column(col)
    for r in list_fingerprints():
        state = r["error"] if r["error"] else ("complete" if r["complete"] else "partial")
        t.add_row(r["name"], r["origin"], r["device"] or "-", r["created"] or "-", state, r["path"])
    Console(width=200).print(t)
    return 0
