"""Capture notes which layers' products only other linear layers read (through elementwise ops):
the readers a column-major product (cuSPARSELt's) does not slow, so the cost model charges the
others a pass over it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fx_models import GatedMlp
from sparsec.passes import capture_fx


class Block(torch.nn.Module):
    """Attention's projections into SDPA and a norm, an MLP whose hidden layer feeds the next."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2, self.head = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d), torch.nn.Linear(d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, 4, d // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        h = x + self.o(a)
        h = F.layer_norm(h, (d,))
        h = h + self.fc2(F.gelu(self.fc1(h)) * 2.0)
        return self.head(h), h


def readers(model, x) -> dict[str, bool]:
    gm = torch.fx.symbolic_trace(model)
    sites, _, _ = capture_fx.capture(gm, [x], 0)
    return {s.name: s.read_by_linears for s in sites}


def test_gate_and_up_feed_only_the_down_projection_and_the_down_projection_feeds_the_output():
    assert readers(GatedMlp(16, 32), torch.randn(4, 16)) == {"gate": True, "up": True, "down": False}


def test_attention_norms_and_outputs_are_readers_a_column_major_product_slows():
    got = readers(Block(), torch.randn(2, 5, 32))
    assert got == {"q": False, "k": False, "v": False, "o": False, "fc1": True, "fc2": False, "head": False}
