"""An all-dense plan against inductor: where a per-call difference of the same graph comes from.

When sparsec rewrites nothing it hands Dynamo's graph to inductor unchanged, so under CUDA
graphs it should time exactly as ``torch.compile(mode="reduce-overhead")``. This runs, in
rotating order over several rounds in one process, each compiled afresh:

- ``inductor-cg``: ``torch.compile(model, mode="reduce-overhead")``;
- ``compile_fx-cg``: a bare backend that calls inductor's ``compile_fx`` as sparsec does;
- ``compile_fx-cg, run in compile``: the same, its result also called during the compile (what
  ``measure: True`` does to time it);
- ``compile_fx-cg, twin``: the same, with a second copy compiled and run next to it during the
  compile (what ``measure: True`` did to time the dense reference);
- ``sparsec auto +cg`` with ``measure`` off and on.

Each is timed three ways: ``triton.testing.do_bench`` (L2 cleared before each call, as
``bench/e2e.py`` times), back-to-back calls between two events, and the host time per call.

    python3 bench/check_dense_path.py --M 1 --rounds 2 --out $OUT/dense_path.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import MLPStack  # noqa: E402
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()


def _compile_fx(gm, example_inputs):
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=list_mode_options("reduce-overhead"))


def direct_backend(gm, example_inputs):
    return _compile_fx(gm, example_inputs)


def run_in_compile_backend(gm, example_inputs):
    fn = _compile_fx(gm, example_inputs)
    with torch.no_grad():
        for _ in range(20):
            fn(*example_inputs)
    torch.cuda.synchronize()
    return fn


def twin_backend(gm, example_inputs):
    twin = _compile_fx(gm, example_inputs)
    fn = _compile_fx(gm, example_inputs)
    with torch.no_grad():
        for f in (twin, fn):
            for _ in range(20):
                f(*example_inputs)
    torch.cuda.synchronize()
    return fn


EMPTY_CACHE = True


def _reset():
    torch._dynamo.reset()
    from torch._inductor.cudagraph_trees import reset_cudagraph_trees

    reset_cudagraph_trees()
    gc.collect()
    if EMPTY_CACHE:
        torch.cuda.empty_cache()


CONFIGS = ("inductor-cg", "compile_fx-cg", "compile_fx-cg, run in compile", "compile_fx-cg, twin",
           "sparsec auto +cg measure off", "sparsec auto +cg measure on")


def build(config, model, fingerprint, calib):
    from sparsec.backend import sparsec_backend

    if config == "inductor-cg":
        return torch.compile(model, mode="reduce-overhead")
    if config == "compile_fx-cg":
        return torch.compile(model, backend=direct_backend)
    if config == "compile_fx-cg, run in compile":
        return torch.compile(model, backend=run_in_compile_backend)
    if config == "compile_fx-cg, twin":
        return torch.compile(model, backend=twin_backend)
    measure = config.endswith("measure on")
    opts = {"fingerprint": fingerprint, "calibration": calib, "error_budget": 0.01, "measure": measure,
            "mode": "reduce-overhead"}
    return torch.compile(model, backend=sparsec_backend, options=opts)


def time_three_ways(fn, x) -> dict:
    from triton.testing import do_bench

    call = lambda: fn(x)  # noqa: E731
    out = {"do_bench_us": float(do_bench(call, warmup=50, rep=300, return_mode="median")) * 1e3}
    batches = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            call()
        end.record()
        end.synchronize()
        batches.append(start.elapsed_time(end) * 1e3 / 50)
    out["back_to_back_us"] = statistics.median(batches)
    host = []
    for _ in range(15):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            call()
        host.append((time.perf_counter() - t) * 1e6 / 20)
    torch.cuda.synchronize()
    out["host_us"] = statistics.median(host)
    return out


def kernel_table(fn, x) -> list:
    """(kernel name, calls, total GPU us) over 10 calls, longest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn(x)
            torch.cuda.synchronize()
    rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[2])
    for name, count, us in rows[:12]:
        print(f"#   {us / 10:9.2f} us/call  {count:4d}  {name[:110]}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="each round runs the configurations rotated by one")
    ap.add_argument("--throwaway", choices=("none", "tiny", "same"), default="none",
                    help="first capture and drop one CUDA graph: a tiny MLP stack, or this model under inductor")
    ap.add_argument("--no-empty-cache", action="store_true", help="keep the allocator's cached blocks between configurations")
    ap.add_argument("--profile", action="store_true", help="also list each configuration's GPU kernels")
    ap.add_argument("--fingerprint", default="fingerprints/h200.json")
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated, from: " + "; ".join(CONFIGS))
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "dense_path.json"))
    args = ap.parse_args()
    import triton

    configs = [c.strip() for c in args.configs.split(";")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; choose from {CONFIGS}")
    torch.manual_seed(0)
    model = MLPStack().to("cuda", torch.bfloat16).eval()
    x = torch.randn(args.M, 4096, device="cuda", dtype=torch.bfloat16)
    calib = [(torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16),)]
    with torch.no_grad():
        ref = model(x)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "M": args.M}
    print(f"# {meta}", flush=True)
    global EMPTY_CACHE
    EMPTY_CACHE = not args.no_empty_cache
    meta.update(throwaway=args.throwaway, empty_cache=EMPTY_CACHE)
    if args.throwaway != "none":
        m = MLPStack(256, 512, 2).to("cuda", torch.bfloat16).eval() if args.throwaway == "tiny" else model
        fn = torch.compile(m, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                fn(torch.randn(args.M, m.blocks[0].gate.in_features, device="cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        del fn
        _reset()
    rows = []
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for config in order:
            _reset()
            t0 = time.time()
            fn = build(config, model, args.fingerprint, calib)
            with torch.no_grad():
                out = fn(x)
                out = fn(x)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                row = {"round": r, "config": config, "compile_s": time.time() - t0, "error_vs_eager": err,
                       **time_three_ways(fn, x)}
            if args.profile:
                row["kernels"] = kernel_table(fn, x)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
            rows.append(row)
            del fn
    _reset()
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\n| config (M={args.M}) | do_bench us | back-to-back us | host us/call | rounds |")
    print("|---|---|---|---|---|")
    for config in dict.fromkeys(configs):
        mine = [r for r in rows if r["config"] == config]
        cell = lambda k: " / ".join(f"{r[k]:.1f}" for r in mine)  # noqa: E731
        print(f"| {config} | {cell('do_bench_us')} | {cell('back_to_back_us')} | {cell('host_us')} | {len(mine)} |")


if __name__ == "__main__":
    main()
