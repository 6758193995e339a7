"""The core knows neither FX nor ONNX, so both front-ends can share it unchanged."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = ["sparsec/formats.py", "sparsec/sites.py", "sparsec/candidates.py", "sparsec/plan.py",
        "sparsec/pipeline.py", "sparsec/reasons.py", "sparsec/options.py", "passes/select.py",
        "sparsec/fingerprint/predict.py", "sparsec/fingerprint/interp.py",
        "sparsec/fingerprint/schema.py", "sparsec/output_error.py"]


@pytest.mark.parametrize("path", CORE)
def test_core_module_imports_no_front_end(path):
    tree = ast.parse((ROOT / path).read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    bad = [n for n in names if n.startswith(("torch.fx", "onnx", "onnxruntime")) or n in ("torch._dynamo",)]
    assert not bad, f"{path} imports {bad}"
