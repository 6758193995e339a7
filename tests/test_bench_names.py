"""bench/ scripts import each other by module name with bench/ first on the path, so a script
named like a package its dependencies import would shadow that package (``kernels``, which
transformers imports, did)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
# imported by the bench's own dependencies (transformers imports ``kernels``) whether or not installed here
TAKEN = {"kernels", "transformers", "torch", "triton", "onnx", "onnxruntime", "numpy", "rich", "networkx",
         "sentence_transformers", "accelerate", "gguf", "matplotlib", "tokenizers", "safetensors", "sparsec"}


def test_no_bench_script_shadows_a_package():
    stems = {p.stem for p in BENCH.glob("*.py")}
    assert stems, "bench/ has no scripts"
    taken = stems & (TAKEN | set(sys.stdlib_module_names))
    installed = {s for s in stems - taken if importlib.util.find_spec(s) is not None and
                 not str(importlib.util.find_spec(s).origin or "").startswith(str(BENCH))}
    assert not taken and not installed, f"bench scripts shadow packages: {sorted(taken | installed)}"
