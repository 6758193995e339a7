"""cuSPARSELt path against float64 on the device: padded and unpadded M, row- and column-major
inputs, with and without bias, bf16 and fp16; exits non-zero on any failure."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from kernel_bench import REL_TOL, rel_err  # noqa: E402

from sparsec.codegen import linear, pack  # noqa: E402


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    bad = 0
    for dtype in (torch.bfloat16, torch.float16):
        p = pack("2:4", torch.randn(768, 1024, generator=gen, device="cuda").to(dtype))
        dense = p.to_dense().double()
        for M in (1, 13, 64, 2048, 2051):
            for layout in ("row", "col"):
                x = torch.randn(M, 1024, generator=gen, device="cuda").to(dtype)
                if layout == "col":
                    x = x.t().contiguous().t()
                for bias in (None, torch.randn(768, generator=gen, device="cuda").to(dtype)):
                    y = linear(x, p, bias, impl="cusparselt")
                    ref = x.double() @ dense.t() + (0 if bias is None else bias.double())
                    err = rel_err(y, ref)
                    ok = err <= REL_TOL[dtype] and y.shape == ref.shape
                    bad += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {dtype} M={M} {layout} bias={bias is not None} "
                          f"stride={tuple(y.stride())} rel_err={err:.2e}")
    print(f"cusparselt checks: {bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
