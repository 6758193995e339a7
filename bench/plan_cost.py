"""What planning a Llama-shaped model costs, step by step and format family by family.

Builds a LlamaForCausalLM with the given shapes (default Llama-3-8B's: 4096 -> 14336, GQA 32/8,
vocabulary 128256) and random weights, plans it with ``lower=False`` and prints the seconds each
pipeline step took and, inside ``approximate``, the seconds each format family took per layer
shape (how many specs it made). With fewer blocks than the real model (``--blocks``) it also
projects the time of the whole depth: per-block work scales with the blocks, the output layer's
does not.

    python bench/plan_cost.py --fingerprint h200 --device cuda --dtype bfloat16 --blocks 2 --out plan-cost.json

Random weights say nothing of quality; the figures are planning cost only.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def build(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.blocks,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    batch, length = (int(v) for v in args.tokens.split("x"))
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(0, args.vocab, (batch, length), generator=g).to(device),) for _ in range(args.calib_batches)]
    return model, calib


def timed_handlers(device: torch.device):
    """Wrap every handler's ``approximate`` to add its (synchronised) seconds per (family, N x K)."""
    from sparsec.passes.registry import HANDLERS

    seconds, specs = collections.defaultdict(float), collections.Counter()
    for family, handler in HANDLERS.items():
        original = handler.approximate

        def wrapped(spec_list, weight, stats, method=None, _original=original, _family=family):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = _original(spec_list, weight, stats) if method is None else _original(spec_list, weight, stats, method)
            if device.type == "cuda":
                torch.cuda.synchronize()
            key = f"{_family} {tuple(weight.shape)[0]}x{tuple(weight.shape)[1]}"
            seconds[key] += time.perf_counter() - start
            specs[key] += len(spec_list)
            return out

        handler.approximate = wrapped
    return seconds, specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprint", default="h200")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--full-depth", type=int, default=32, help="blocks of the model the projection is for")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", default="8x128")
    parser.add_argument("--calib-batches", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--metric", default="kl")
    parser.add_argument("--formats", nargs="+", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import sparsec

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, calib = build(args, device, dtype)
    seconds, specs = timed_handlers(device)
    start = time.perf_counter()
    result = sparsec.optimize(model, calib[0], calibration=calib, fingerprint=args.fingerprint,
                              error_budget=args.budget, metric=args.metric, output="logits", formats=args.formats,
                              lower=False)
    plan_s = time.perf_counter() - start
    report = result.report.to_dict()
    steps = report["planning"]["timing"]["steps_s"]
    lm_head = {k: v for k, v in seconds.items() if k.endswith(f"{args.vocab}x{args.hidden}")}
    per_block = plan_s - sum(lm_head.values())
    projected = per_block * args.full_depth / args.blocks + sum(lm_head.values())
    from sparsec.fingerprint.device import current_device_name

    out = {"device": current_device_name(device.type), "torch": torch.__version__,
           "date": datetime.now(timezone.utc).date().isoformat(), "args": vars(args), "plan_s": plan_s,
           "projected_full_depth_s": projected, "steps_s": steps,
           "approximate_s": dict(seconds), "specs": dict(specs),
           "chosen": dict(collections.Counter(l["format"] for l in report["layers"]))}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{out['device']}, torch {out['torch']}, {args.blocks} of {args.full_depth} blocks, "
          f"{args.tokens} tokens x {args.calib_batches}")
    for key, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  approximate {key:>28}: {value:7.2f} s  ({specs[key]} specs)")
    print("  steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    print(f"planned in {plan_s:.1f} s; projected for {args.full_depth} blocks: {projected:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
