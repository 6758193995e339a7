"""Keeping the user's model state as it was while sparsec runs the model many times.

Planning runs a graph again and again (calibration, candidates, recovery, verification). A graph
that writes to its state in place — batch norm in training mode updating its running statistics,
a cache buffer, an input the model edits — would otherwise come out of planning written to once
per run rather than once per call the user made. What such a graph may write is copied first and
written back afterwards where it differs (batch norm's native kernel writes its statistics without
counting a version, so versions cannot tell). Parameters are not copied: they are the bulk of a
model, and inference graphs do not write them.
"""

from __future__ import annotations

import contextlib

import torch


def _writable(gm, example_inputs) -> list[torch.Tensor]:
    seen: set[int] = set()
    found = []
    candidates = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if isinstance(gm, torch.nn.Module):
        candidates += [b for _, b in gm.named_buffers(remove_duplicate=False)]
    for tensor in candidates:
        if (isinstance(tensor, torch.nn.Parameter) or id(tensor) in seen or tensor.is_inference()
                or tensor.layout != torch.strided or tensor.device.type == "meta"):
            continue
        seen.add(id(tensor))
        found.append(tensor)
    return found


@contextlib.contextmanager
def state_kept(gm, example_inputs):
    """Run the body, then put back every non-parameter tensor of ``gm`` and ``example_inputs`` it wrote."""
    tensors = _writable(gm, example_inputs)
    with torch.no_grad():
        saved = [(t, t.detach().clone()) for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, copy in saved:
                if not torch.equal(tensor, copy):
                    tensor.copy_(copy)


def training_warning(model) -> list[str]:
    """A line when ``model`` has dropout or batch-norm layers in training mode, where every run differs."""
    if not isinstance(model, torch.nn.Module):
        return []
    moving = sorted({type(m).__name__ for m in model.modules() if m.training and isinstance(
        m, (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm))})
    if not moving:
        return []
    return [f"the model is in training mode ({', '.join(moving)} layers draw on each batch or at random): "
            "calibration and the measured errors saw that noise; call model.eval() before optimizing "
            "a model for inference"]
