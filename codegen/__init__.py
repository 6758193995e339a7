"""sparsec.codegen: Triton kernels for structured linear layers, with plain-torch references.

Public API: ``pack``, ``linear``, ``linear_epilogue``, ``check``, ``Packed``, ``PackedLinear`` (docs/kernels.md).
Importing registers each format's handler and its ``torch.ops.sparsec.*`` custom ops.
"""

from . import act, actrot, block, dense, experts, lowrank, monarch, plus_lowrank, twofour  # noqa: F401  (register the formats)
from .api import check, linear, linear_epilogue, pack
from .epilogue import Epilogue
from .module import EpilogueLinear, GroupMember, PackedGroup, PackedLinear
from .packed import Packed, stack_rows

__all__ = ["pack", "linear", "linear_epilogue", "check", "Packed", "PackedLinear", "PackedGroup", "GroupMember",
           "EpilogueLinear", "Epilogue", "stack_rows"]
