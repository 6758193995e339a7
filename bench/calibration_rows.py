"""How far the error measured on calibration rows understates the error on new inputs, by rows per input.

    python bench/calibration_rows.py --rows 600,1024,4096

One 512 x 512 linear layer with random weights, inputs with an anisotropic spectrum (eigenvalues
from 1 to 0.01), each format forced: the report's calibration error against the error on 4096
fresh inputs from the same distribution. Activation-aware fits follow the calibration sample,
so with few rows per input they look better on it than they are. Runs on the CPU in a minute.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

FORMATS = ("lowrank:128", "block:32:0.5", "2:4", "monarch:4")


def main(argv=None) -> int:
    import sparsec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="600,1024,4096")
    ap.add_argument("--K", type=int, default=512)
    args = ap.parse_args(argv)
    K = N = args.K
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(K, K))
    mix = basis * torch.logspace(0, -2, K).sqrt()
    model = nn.Sequential(nn.Linear(K, N, bias=False)).eval()
    fresh = torch.randn(4096, K) @ mix.T
    with torch.no_grad():
        ref = model(fresh)
    print(f"{'rows':>6} {'rows/K':>6} {'format':>14} {'calibration':>11} {'new inputs':>10} {'ratio':>6}")
    for rows in (int(r) for r in args.rows.split(",")):
        calib = [(torch.randn(rows, K) @ mix.T,)]
        for fmt in FORMATS:
            r = sparsec.optimize(model, (calib[0][0][:8],), fingerprint="cpu", calibration=calib,
                                 plan={"layers": {"0": fmt}})
            with torch.no_grad():
                new = float((r.module(fresh) - ref).norm() / ref.norm())
            cal = r.report.end_to_end["measured_error"]
            print(f"{rows:>6} {rows / K:>6.2f} {fmt:>14} {cal:>11.4f} {new:>10.4f} {new / cal:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
