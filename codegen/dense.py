"""Dense: the weight as is, served by torch's linear (cuBLAS on the GPU).

There is no Triton kernel for dense on purpose: it is the baseline every other format is
measured against, and cuBLAS is what a user would otherwise run.
"""

from __future__ import annotations

import torch.nn.functional as F

from ._common import expect_tensor, match_dtype
from .packed import FormatKernels, register


class DenseKernels(FormatKernels):
    family = "dense"
    names = ("weight",)
    impls = ()  # the reference is torch's linear: cuBLAS on the GPU, the baseline itself

    def pack(self, spec, weight):
        return {"weight": weight.contiguous().clone()}

    def validate(self, spec, shape, tensors):
        expect_tensor(tensors, "weight", shape, floating=True)
        return tensors

    def to_dense(self, spec, shape, tensors):
        return tensors["weight"].clone()

    def reference(self, x2d, packed, bias):
        w = match_dtype(packed.tensors()["weight"], x2d.dtype)
        return F.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))


register(DenseKernels())
