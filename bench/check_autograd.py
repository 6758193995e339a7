"""Models compiled with backend "sparsec" and called with autograd on, on the device: the input
gradient through every rewritten format matches the dense model's, in bf16 at small and large M.

Weights carry planted structure (exactly 2:4, block-sparse or low rank), so each forced rewrite
is lossless and the only difference from the dense gradient is rounding. Exits non-zero on any
failure; prints one line per case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_import import ensure_sparsec_importable  # noqa: E402

ensure_sparsec_importable()

from kernel_bench import rel_err  # noqa: E402

from sparsec.backend import sparsec_backend  # noqa: E402
from sparsec.codegen import pack  # noqa: E402

# bf16 operands (8 mantissa bits) through two layers and their transposes: a few 1e-3 relative
REL_TOL = 2e-2


def planted(fmt: str, N: int, K: int, gen) -> torch.Tensor:
    w = torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5
    if fmt.startswith("lowrank"):
        r = int(fmt.split(":")[1])
        return (torch.randn(N, r, generator=gen, device="cuda") @ torch.randn(r, K, generator=gen, device="cuda")) / K
    return pack(fmt, w).to_dense()


class GatedResidual(nn.Module):
    """x + down(silu(gate(x)) * up(x)): at a few tokens the lowering folds the SiLU-gate and the
    residual into the launches (codegen/epilogue.py), so their gradient is checked too."""

    def __init__(self, d: int = 1024, h: int = 2048):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def cases():
    for fmt in ("2:4", "block:64:0.25", "lowrank:256"):
        for M in (1, 64, 2048):
            yield "mlp", fmt, M
    for fmt, M in (("2:4", 1), ("block:64:0.25", 1), ("block:64:0.25", 4)):
        yield "gated", fmt, M


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(2)
    bad = 0
    for kind, fmt, M in cases():
        torch._dynamo.reset()  # each case its own compile: nine instances of one class would pass Dynamo's limit
        if kind == "mlp":
            model = nn.Sequential(nn.Linear(1024, 2048), nn.SiLU(), nn.Linear(2048, 1024)).cuda().bfloat16()
            layers = [model[0], model[2]]
        else:
            model = GatedResidual().cuda().bfloat16()
            layers = [model.gate, model.up, model.down]
        with torch.no_grad():
            for lin in layers:
                lin.weight.copy_(planted(fmt, lin.out_features, lin.in_features, gen))
        opts = {"plan": {"layers": {"_default": fmt}}}
        compiled = torch.compile(model, backend=sparsec_backend, options=opts)
        x = torch.randn(M, 1024, generator=gen, device="cuda").bfloat16().requires_grad_()
        y = compiled(x)
        g = torch.randn_like(y)
        (y.float() * g.float()).sum().backward()
        frozen = all(lin.weight.grad is None for lin in layers)  # rewritten weights get none
        got, x.grad = x.grad.clone(), None
        ref_y = model(x)
        (ref_y.float() * g.float()).sum().backward()
        ref = x.grad
        err_y = rel_err(y, ref_y.double())
        err_g = rel_err(got, ref.double())
        ok = err_y <= REL_TOL and err_g <= REL_TOL and frozen
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {kind:>5} {fmt:>14} M={M:<5} output rel err {err_y:.2e}, "
              f"input grad rel err {err_g:.2e}")
    print(f"autograd checks: {bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
