"""Every format family is known to every part of the house, and no module outside a family's own
files switches on family names: a new format is one file per layer plus its tests."""

import ast
import pathlib
import re

import numpy as np
import pytest
import torch

from sparsec.formats import FAMILIES, STRUCTURED_FAMILIES, family_of, parse_spec
from sparsec.sites import as_weight

pytestmark = pytest.mark.usefixtures("cpu_onnxruntime")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (256, 512)
# activation sparsity skips weight rows by its input's values: no standard ONNX operator does
NO_ONNX_FORM = {"act", "actrot"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_describes_itself_for_fingerprints(family):
    from sparsec.fingerprint.schema import FAMILY_PARAMS

    cls = FAMILIES[family]
    spec = cls.example()
    assert parse_spec(str(spec)) == spec and family_of(cls.syntax) == family
    record = spec.record()
    assert cls.from_record({**record, "N": SHAPE[0], "K": SHAPE[1]}) == spec
    assert tuple(record) == FAMILY_PARAMS[family]
    settings = cls.settings(*SHAPE, {"block": ((32, 0.5),), "lowrank": (0.25,), "monarch": (4,),
                                         "act": (0.5,), "actrot": (0.5,), "2:4+lowrank": (({}, 1 / 16),),
                                         "block+lowrank": (({"block": 32, "density": 0.5}, 1 / 16),)}.get(family, ()))
    assert settings and all(isinstance(s, cls) for s in settings)
    assert cls.from_label(spec.label(*SHAPE), *SHAPE) == spec
    key = spec.curve_key(*SHAPE)
    assert isinstance(key, tuple) and (not key or cls.param_label)


@pytest.mark.parametrize("family", STRUCTURED_FAMILIES)
def test_every_structured_family_has_a_pass_a_kernel_and_an_onnx_form(family):
    from sparsec.codegen.packed import handler_for
    from sparsec.passes.onnx_forms import form_of, has_form
    from sparsec.passes.registry import HANDLERS
    from sparsec.report.chart import FAMILY_COLOURS

    spec = FAMILIES[family].example()
    assert HANDLERS[family].family == family
    assert handler_for(spec).family == family
    assert family in FAMILY_COLOURS
    if family in NO_ONNX_FORM:
        assert not has_form(family)
        with pytest.raises(ValueError, match="no ONNX form"):
            form_of(spec)
        return
    form = form_of(spec)
    assert form.label and hasattr(form, "emit")


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_ONNX_FORM])
def test_each_onnx_form_computes_the_product_of_its_weight(family):
    """The factors of a weight with the format's exact structure, emitted and run in onnxruntime,
    give x @ W^T (float32: 1e-4 relative covers onnxruntime's summation order)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from sparsec.passes.onnx_emit import Emitter
    from sparsec.passes.onnx_forms import emit_product, factors
    from sparsec.passes.registry import HANDLERS

    N, K = SHAPE
    spec = FAMILIES[family].example()
    w = torch.randn(N, K)
    approx = w if family == "dense" else HANDLERS[family].approximate([spec], w, None)[0]
    em = Emitter(prefix="layer")
    emit_product(em, spec, "x", "y", factors(spec, approx, np.float32), N, K, [None, K])
    graph = helper.make_graph(em.nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, N])], em.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = torch.randn(8, K)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    ref = x @ as_weight(approx).T
    assert float((torch.from_numpy(y) - ref).norm() / ref.norm()) < 1e-4


def _family_files() -> set[str]:
    own = {"sparsec/formats.py", "passes/registry.py", "sparsec/report/chart.py"}
    for module in ("twofour", "block", "lowrank", "monarch", "act", "actrot", "plus_lowrank"):
        own |= {f"passes/{module}.py", f"codegen/{module}.py"}
    return own


SWITCH = re.compile(r"""family\s*(==|!=|in)\s*[("'\[{]|isinstance\([^)]*\b(TwoFour|Block|LowRank|Monarch)\b""")


def switches(source: str) -> list[str]:
    return [f"{node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.Compare, ast.Call)) and SWITCH.search(ast.unparse(node))]


def test_the_switch_finder_finds_switches():
    assert len(switches("if spec.family == 'block': pass\nif isinstance(s, (Block, LowRank)): pass\n"
                        "ok = fam.family in ('2:4', 'block')\n")) == 3
    assert not switches("if spec.prunes: pass\nif isinstance(spec, Dense): pass\nf = FAMILIES[spec.family]\n")


def test_no_module_outside_a_familys_files_switches_on_family_names():
    """Family knowledge lives behind its spec (``sparsec.formats``) and its handlers; elsewhere a
    family is looked up, never compared by name or type."""
    own = _family_files()
    found = []
    for folder in ("sparsec", "passes", "codegen"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel not in own:
                found += [f"{rel}:{hit}" for hit in switches(path.read_text())]
    assert not found, "family switches outside the registries:\n" + "\n".join(found)
