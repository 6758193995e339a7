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


def test_no_import_loops_in_the_package():
    """No module imports, even inside a function, one that imports it back (directly or round about)."""
    import networkx as nx

    modules = {}
    for base, package in (("sparsec", "sparsec"), ("passes", "sparsec.passes"), ("codegen", "sparsec.codegen")):
        for path in (ROOT / base).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / base).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    graph = nx.DiGraph()
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = targets or [node.module]
            for target in targets:  # a module's own package is imported with it: not a loop
                if target in modules and target != name and not name.startswith(target + "."):
                    graph.add_edge(name, target)
    loops = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not loops, f"import loops: {loops}"
