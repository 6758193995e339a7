"""``PackedLinear``: an nn.Module computing ``linear(x, packed, bias)`` from buffers it owns.

The packed tensors are buffers (they follow ``.to()``, ``state_dict`` and torch.compile's
parameter lifting); the Packed handed to ``linear`` is rebuilt from them on every call, which is
a few attribute reads and traces away under Dynamo.
"""

from __future__ import annotations

import torch
from torch import nn

from .api import linear, linear_epilogue
from .epilogue import Epilogue
from .packed import Packed


class _DerivedBuffers(nn.Module):
    """Non-persistent ``aux_<name>`` buffers rebuilt from ``_derive()`` whenever the module moves
    (``.to()``, ``.cuda()``), so derived tensors follow the weights' device and dtype."""

    _aux_names: tuple[str, ...] = ()

    def _derive(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _refresh_aux(self) -> None:
        for name in self._aux_names:
            delattr(self, f"aux_{name}")
        aux = self._derive()
        for name, t in aux.items():
            self.register_buffer(f"aux_{name}", t, persistent=False)
        self._aux_names = tuple(aux)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_aux()
        return out

    def _aux(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"aux_{n}") for n in self._aux_names}


class PackedLinear(_DerivedBuffers):
    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, impl: str = "auto"):
        super().__init__()
        self.spec = packed.spec
        self.shape = packed.shape
        self.crossover_m = packed.crossover_m
        self.impl = impl
        self._names = tuple(packed.tensors())
        for name, t in packed.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._refresh_aux()

    def _derive(self) -> dict[str, torch.Tensor]:
        """Derived tensors for the current device, e.g. cuSPARSELt's copy once on CUDA."""
        bare = Packed(self.spec, self.shape, {n: getattr(self, n) for n in self._names}, self.crossover_m)
        return bare.handler.prepare(bare, self.impl)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def packed(self) -> Packed:
        return Packed(self.spec, self.shape, {n: getattr(self, n) for n in self._names}, self.crossover_m,
                      self._aux())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias, self.impl)

    def extra_repr(self) -> str:
        return f"{self.spec}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedGroup(nn.Module):
    """Layers that read the same input, run as one launch: their packed weights stacked along N
    (``stack_rows``) in one ``PackedLinear``. ``sizes`` are the layers' output widths, in order."""

    def __init__(self, linear: PackedLinear, sizes):
        super().__init__()
        self.linear = linear
        self.sizes = tuple(int(n) for n in sizes)

    def bounds(self, index: int) -> tuple[int, int]:
        start = sum(self.sizes[:index])
        return start, start + self.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


class GroupMember(nn.Module):
    """One layer of a ``PackedGroup``. A graph rewrite calls the group once and slices its output
    per member; called on its own, a member runs the whole group and keeps its slice."""

    def __init__(self, group: PackedGroup, index: int):
        super().__init__()
        self.group = group
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, end = self.group.bounds(self.index)
        return self.group(x)[..., start:end]


class EpilogueLinear(_DerivedBuffers):
    """A ``PackedLinear`` whose launch also finishes what follows it (codegen/epilogue.py): the
    SiLU-gate over its stacked gate/up rows and/or the residual add. Called as
    ``module(x)`` or ``module(x, residual)``."""

    def __init__(self, linear: PackedLinear, epilogue: Epilogue):
        super().__init__()
        self.linear = linear
        self.epilogue = epilogue
        self._refresh_aux()

    def _derive(self) -> dict[str, torch.Tensor]:
        """What the format's fused epilogue needs, e.g. a gated launch's work list."""
        packed = self.linear.packed
        return packed.handler.epilogue_aux(packed, self.epilogue)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return linear_epilogue(x, self.linear.packed, self.linear.bias, self.epilogue, residual,
                               self.linear.impl, self._aux())

    def extra_repr(self) -> str:
        return self.epilogue.describe()
