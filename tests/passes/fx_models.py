"""Small models the FX-pass tests trace."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GatedMlp(torch.nn.Module):
    """A Llama-style MLP block: gate and up read the same input, SiLU-multiply, down, residual."""

    def __init__(self, d=16, h=32):
        super().__init__()
        self.gate = torch.nn.Linear(d, h, bias=False)
        self.up = torch.nn.Linear(d, h, bias=False)
        self.down = torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(F.silu(self.gate(x)) * self.up(x))
