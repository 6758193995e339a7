"""The end-to-end error of a rewritten graph: one rule for every front-end.

The error is the chosen metric (``sparsec.metrics``) of the rewritten graph's outputs against the
dense graph's, accumulated over every calibration call. By default (``rel_l2``), per graph output,
the squared difference and the output's own energy are summed (in float64) and the error is the
worst output's relative L2 norm: per output, not pooled, so that a small output (a classifier's
logits) does not hide behind a large one (a hidden state). Outputs may be torch tensors (FX) or
numpy arrays (ONNX).
"""

from __future__ import annotations

from sparsec.metrics import MetricSum, RelL2

OutputError = MetricSum
relative = RelL2.ratio


def output_error(outputs, references, metric=None, output: int | None = None) -> float:
    """The error of whole runs at once: ``outputs[call][output]`` against ``references`` alike."""
    total = MetricSum(metric, output)
    for outs, refs in zip(outputs, references):
        total.add(outs, refs)
    return total.value()


def relative_l2(outputs, references) -> float:
    return output_error(outputs, references)
