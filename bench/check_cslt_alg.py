"""cuSPARSELt's algorithm ids for the MLP stack at large M, timed as the stack runs them.

Alone, with the device resting between short replays, algorithm 1 leads at M = 2048; but the
stack's sparse products run back to back for as long as the timing lasts, and an H200 then sits
at its power limit with its clock well below the maximum. This builds the 4-block stack's 2:4
forward as ``bench/e2e.py``'s graph runs it (stacked gate/up through cuSPARSELt, SiLU-multiply
into a row-major copy, down through cuSPARSELt, residual add), one CUDA graph per pair of
algorithm ids (stacked launch, down launch) and one dense, and times them in alternating order,
each over seconds of back-to-back replays, several rounds.

    python3 bench/check_cslt_alg.py --M 2048 --rounds 3 --out $OUT/cslt_alg.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import sustained_replay_us  # noqa: E402
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from sparsec.codegen import pack  # noqa: E402
from sparsec.codegen.twofour_cslt import cslt_matmul, set_cslt_algorithm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--h", type=int, default=14336)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--algs", default="0,1")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cslt_alg.json"))
    args = ap.parse_args()
    import triton

    M, d, h = args.M, args.d, args.h
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    blocks = []
    for _ in range(args.blocks):
        gate_up = torch.randn(2 * h, d, device=dev, dtype=dt) * d ** -0.5
        down = torch.randn(d, h, device=dev, dtype=dt) * h ** -0.5
        gu, dn = pack("2:4", gate_up), pack("2:4", down)
        blocks.append({"gate_up": gu.to_dense(), "down": dn.to_dense(),
                       "gate_up_c": torch._cslt_compress(gu.to_dense()), "down_c": torch._cslt_compress(dn.to_dense())})
    x = torch.randn(M, d, device=dev, dtype=dt)

    def sparse_forward():
        y = x
        for b in blocks:
            g = cslt_matmul(y, b["gate_up_c"], None, 2 * h)  # (M, 2h), column-major
            a = (F.silu(g[:, :h]) * g[:, h:]).contiguous()
            y = y + cslt_matmul(a, b["down_c"], None, d)
        return y

    def dense_forward():
        y = x
        for b in blocks:
            g = F.linear(y, b["gate_up"])
            y = y + F.linear(F.silu(g[:, :h]) * g[:, h:], b["down"])
        return y

    def capture(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph, out

    with torch.no_grad():
        ref = dense_forward().float()
    graphs = {"dense": capture(dense_forward)}
    algs = [int(a) for a in args.algs.split(",")]
    for a_gu, a_dn in itertools.product(algs, algs):
        set_cslt_algorithm(2 * h, d, M, dt, a_gu)
        set_cslt_algorithm(d, h, M, dt, a_dn)
        graphs[f"2:4 alg {a_gu}/{a_dn}"] = capture(sparse_forward)
    errors = {}
    for name, (graph, out) in graphs.items():
        graph.replay()
        torch.cuda.synchronize()
        errors[name] = float((out.float() - ref).norm() / ref.norm())
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "M": M, "d": d, "h": h, "blocks": args.blocks, "seconds": args.seconds}
    print(f"# {meta}", flush=True)
    names = list(graphs)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(sustained_replay_us(graphs[n][0], args.seconds))
            print(f"# round {r} {n}: {times[n][-1]:.1f} us", flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "times_us": times, "error_vs_dense": errors}, f, indent=1)
    dense = statistics.median(times["dense"])
    print("\n| forward | median us | x vs dense | rounds (us) | error vs dense |")
    print("|---|---|---|---|---|")
    for n in names:
        med = statistics.median(times[n])
        print(f"| {n} | {med:.1f} | {dense / med:.3f} | {' / '.join(f'{t:.0f}' for t in times[n])} | {errors[n]:.3g} |")


if __name__ == "__main__":
    main()
