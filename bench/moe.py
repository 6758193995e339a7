"""Expert banks end to end: transformers' default experts implementation against sparsec's choice.

A Mixtral-shaped stack of mixture-of-experts blocks (transformers' ``MixtralSparseMoeBlock``: router,
8 experts of 4096 -> 14336 -> 4096, top-2; 4 blocks with residual adds; random weights, bf16) at
M tokens. In one process, each timed as a CUDA-graph replay (``mode="reduce-overhead"``), median
of many repeats after warm-up (``triton.testing.do_bench``):

- ``transformers``: the stack as transformers runs it by default (``grouped_mm``) under inductor;
- ``sparsec <impl>``: each implementation of ``sparsec::experts_swiglu`` forced, under inductor
  (``loop`` reads the routing on the host and is timed without CUDA graphs);
- ``sparsec auto``: ``torch.compile(backend="sparsec")``, which times the implementations on each
  bank's calibration routing and keeps the fastest;
- ``sparsec, experts 2:4 / block:64:0.25 / lowrank:0.25 (plan)``: the same with every bank's experts pinned to
  that form by the plan (passes/experts_formats.py): the forms' speed, not a quality claim (the
  weights are random).

Ratios are against the first row. The floor (weight bytes of the experts hit, over the measured
copy bandwidth) is printed with each M. ``--smoke`` runs tiny shapes on the CPU to check the
script.

    python bench/moe.py --M 1,16,256,2048 --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import median_time  # noqa: E402
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()


class MoEStack(nn.Module):
    def __init__(self, cfg, blocks: int):
        super().__init__()
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        self.blocks = nn.ModuleList(MixtralSparseMoeBlock(cfg) for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x

    def set_experts_implementation(self, name: str) -> None:
        for block in self.blocks:
            block.experts.config._experts_implementation = name


def build(d: int, h: int, experts: int, top_k: int, blocks: int, device, dtype):
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=experts, num_experts_per_tok=top_k)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    # made and filled on the device: Mixtral's four blocks hold 5.6e9 weights, which took minutes
    # to fill on two host threads
    with torch.device(device):
        model = MoEStack(cfg, blocks)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[-1]
            p.normal_(0.0, fan_in ** -0.5)
    return model.to(device, dtype).eval()


def median_us(fn, device) -> float:
    return median_time.median_us(fn, device == "cuda")


def copy_gbps(device) -> float | None:
    if device != "cuda":
        return None
    a = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = median_us(lambda: b.copy_(a), device)
    return 2 * a.numel() / us / 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", default="1,16,256,2048")
    ap.add_argument("--out", default=".")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--blocks", type=int, default=None, help="mixture-of-experts blocks in the stack (default 4)")
    ap.add_argument("--only", default=None,
                    help="comma-separated configurations to run besides the baseline: grouped, batched, dense_all, "
                         "loop, grouped_mm, rows, auto, and the pinned forms 2:4, block, lowrank (default all)")
    args = ap.parse_args(argv)
    only = None if args.only is None else set(args.only.split(","))

    def wanted(name: str) -> bool:
        return only is None or name in only
    from sparsec.codegen.experts import ALL_IMPLS, memory_reason
    from sparsec.experts import use_sparsec_experts
    import sparsec.experts as sx

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    d, h, E, k, blocks = (64, 96, 8, 2, 2) if args.smoke else (4096, 14336, 8, 2, 4)
    blocks = args.blocks or blocks
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "shape": [E, h, d], "top_k": k, "blocks": blocks}
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    model = build(d, h, E, k, blocks, device, dtype)
    print(f"built the stack in {time.perf_counter() - started:.0f} s", flush=True)
    bandwidth = copy_gbps(device)
    mode = None if args.smoke else "reduce-overhead"
    rows = []

    def record(row: dict) -> None:  # printed as measured, so a run stopped at its time limit shows its progress
        print_rows([row], header=len(rows) == 0)
        rows.append(row)
        with open(os.path.join(args.out, "moe.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    for M in (int(m) for m in args.M.split(",")):
        x = torch.randn(1, M, d, device=device, dtype=dtype)
        calib = [(torch.randn(1, M, d, device=device, dtype=dtype),) for _ in range(4)]
        with torch.no_grad():
            model.set_experts_implementation("grouped_mm")
            torch._dynamo.reset()
            base_fn = torch.compile(model, mode=mode)
            reference = base_fn(x).float()
            base = median_us(lambda: base_fn(x), device)
            record({"M": M, "config": "transformers grouped_mm, inductor" + (" + CUDA graphs" if mode else ""),
                         "us": base, "x": 1.0, "error": 0.0})
            use_sparsec_experts(model)
            # "inline" exists only as sparsec lowers it (its ops in the graph): "auto" times it
            for impl in [i for i in ALL_IMPLS if wanted(i) and i != "inline"]:
                why = memory_reason(impl, E, k, h, d, M, device)
                if why:
                    record({"M": M, "config": f"sparsec {impl}: not run, {why}", "us": None, "x": None, "error": None})
                    continue
                sx.DEFAULT_IMPL = impl
                torch._dynamo.reset()
                fn = torch.compile(model, mode=None if impl == "loop" else mode)
                y = fn(x).float()
                us = median_us(lambda: fn(x), device)
                record({"M": M, "config": f"sparsec {impl}" + (" (no CUDA graph)" if impl == "loop" and mode else ""),
                             "us": us, "x": base / us, "error": float((y - reference).norm() / reference.norm())})
            sx.DEFAULT_IMPL = "grouped"
            torch._dynamo.reset()
            from sparsec.backend import session_for, sparsec_backend

            opts = {"calibration": calib, "fingerprint": "auto", "error_budget": 0.01,
                    "plan": {"layers": {"_default": "dense"}}, **({"mode": mode} if mode else {})}
            if wanted("auto"):
                started = time.perf_counter()
                fn = torch.compile(model, backend=sparsec_backend, options=opts)
                y = fn(x).float()
                planned = time.perf_counter() - started
                us = median_us(lambda: fn(x), device)
                session = session_for(opts, None)
                report = session.report.to_dict() if session.report is not None else {}
                chosen = [[b["implementation"], (b.get("expert_format") or {}).get("format")]
                          for b in report.get("experts", [])]
                record({"M": M, "config": "sparsec auto", "us": us, "x": base / us, "planned_s": planned,
                        "error": float((y - reference).norm() / reference.norm()), "chosen": chosen})
            # experts in a structured form, pinned by the plan (random weights: the forms' speed, not
            # a quality claim)
            from sparsec.passes.experts_block import side_for

            for form in ("2:4", f"block:{side_for(d, h)}:0.25", "lowrank:0.25"):
                if not wanted(form if form == "2:4" else form.split(":")[0]):
                    continue
                torch._dynamo.reset()
                pinned = {**opts, "plan": {"layers": {"_default": "dense"}, "experts": {"_default": form}}}
                fn = torch.compile(model, backend=sparsec_backend, options=pinned)
                y = fn(x).float()
                us = median_us(lambda: fn(x), device)
                session = session_for(pinned, None)
                report = session.report.to_dict() if session.report is not None else {}
                forms = [(b.get("expert_format") or {}).get("format") for b in report.get("experts", [])]
                impls = [(b.get("expert_format") or {}).get("implementation") for b in report.get("experts", [])]
                record({"M": M, "config": f"sparsec, experts {form} (plan)", "us": us, "x": base / us,
                             "error": float((y - reference).norm() / reference.norm()), "chosen": [forms, impls]})
            model.set_experts_implementation("grouped_mm")
        if bandwidth:
            hit = min(E, M * k)
            floor_us = blocks * hit * 3 * d * h * 2 / (bandwidth * 1e3)
            record({"M": M, "config": f"floor: weights of {hit} experts per block at {bandwidth:.0f} GB/s",
                         "us": floor_us, "x": base / floor_us, "error": None})
    print(f"{meta['device']}, torch {meta['torch']}, {meta['date']}, {blocks} blocks")
    print_rows(rows, header=True)


def print_rows(rows, header: bool) -> None:
    if header:
        print(f"{'M':>5} {'configuration':<58} {'us':>10} {'x':>6} {'error':>8}")
    for r in rows:
        err = "" if r["error"] is None else f"{r['error']:.1e}"
        us = "" if r["us"] is None else f"{r['us']:.1f}"
        x = "" if r["x"] is None else f"{r['x']:.2f}"
        print(f"{r['M']:>5} {r['config']:<58} {us:>10} {x:>6} {err:>8} {r.get('chosen', '')}", flush=True)


if __name__ == "__main__":
    main()
