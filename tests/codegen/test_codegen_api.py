"""The API's contracts: refusal reasons, errors, custom ops' fake shapes, module and compile."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import sparsec.codegen  # noqa: F401  (registers torch.ops.sparsec)
from sparsec.codegen import PackedLinear, check, linear, pack
from sparsec.codegen.twofour_cslt import crossover_from_timings
from sparsec.errors import SparsecError


def test_check_reasons():
    assert check("block:64:0.25", 1000, 4096) == "N=1000 not divisible by block 64"
    assert check("2:4", 64, 30) == "K=30 is not divisible by 4, which 2:4 needs"
    assert check("monarch:8", 64, 96) == "K=96 not divisible by 8x8=64, which monarch:8 needs to mix every input"
    assert check("lowrank:64", 64, 4096) == "rank 64 is not below min(N, K)=64"
    assert check("lowrank:16", 64, 128, torch.float64) == \
        "dtype float64 is not supported; use float16, bfloat16 or float32"
    assert check("block:64:0.25", 4096, 4096, torch.bfloat16) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_check_refuses_cuda_without_cuda():
    assert check("2:4", 64, 64, torch.float16, "cuda") == "CUDA is not available in this process"


def test_linear_errors_name_the_problem(gen):
    packed = pack("lowrank:4", torch.randn(16, 32, generator=gen))
    with pytest.raises(SparsecError, match=r"input of shape \(3, 31\) does not end in K=32"):
        linear(torch.randn(3, 31), packed)
    with pytest.raises(SparsecError, match=r"bias of shape \(15,\) does not match N=16"):
        linear(torch.randn(3, 32), packed, torch.randn(15))
    with pytest.raises(SparsecError, match="impl 'cusparselt' is not available for lowrank:4; use one of: auto, "
                                           "reference, triton, fused, gemm2"):
        linear(torch.randn(3, 32), packed, impl="cusparselt")
    with pytest.raises(SparsecError, match="dtype float64 is not supported"):
        linear(torch.randn(3, 32, dtype=torch.float64), packed.to(dtype=torch.float32), impl="triton")


def test_cusparselt_refusal_on_cpu(gen):
    packed = pack("2:4", torch.randn(32, 32, generator=gen).half())
    with pytest.raises(SparsecError, match="cuSPARSELt runs on CUDA devices only"):
        linear(torch.randn(3, 32).half(), packed, impl="cusparselt")


def test_crossover_from_timings():
    rows = [(1, 5.0, 9.0), (16, 6.0, 8.0), (128, 9.0, 8.5), (1024, 40.0, 30.0), (8192, 300.0, 200.0)]
    assert crossover_from_timings(rows) == 128
    # a single win amid losses at larger M is not trusted
    assert crossover_from_timings([(1, 5.0, 4.0), (16, 6.0, 8.0), (128, 9.0, 10.0)]) is None
    assert crossover_from_timings([]) is None


OPS = {
    "twofour_linear": lambda x: (x, torch.empty(24, 16, dtype=x.dtype), torch.empty(24, 4, dtype=torch.uint8), None),
    "block_linear": lambda x: (x, torch.empty(2, 16, 16, dtype=x.dtype), torch.empty(2, dtype=torch.int32),
                               torch.empty(3, dtype=torch.int32), torch.empty(2, dtype=torch.int32), None, 32),
    "lowrank_linear": lambda x: (x, torch.empty(40, 4, dtype=x.dtype), torch.empty(4, 32, dtype=x.dtype), None, True),
    "monarch_linear": lambda x: (x, torch.empty(4, 8, 8, dtype=x.dtype), torch.empty(4, 6, 8, dtype=x.dtype), None, True),
    "twofour_linear_cusparselt": lambda x: (x, torch.empty(400, dtype=x.dtype), None, 48),
}
OUT_N = {"twofour_linear": 24, "block_linear": 32, "lowrank_linear": 40, "monarch_linear": 24,
         "twofour_linear_cusparselt": 48}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_impl_shapes(name, dtype):
    with FakeTensorMode():
        x = torch.empty(7, 32, dtype=dtype)
        y = getattr(torch.ops.sparsec, name)(*OPS[name](x))
    assert tuple(y.shape) == (7, OUT_N[name]) and y.dtype == dtype
    # cuSPARSELt's product is (N, M padded to 8) row-major, returned as its transposed view: the
    # fake must promise the same column-major strides, or compiled code reads it wrongly
    assert y.stride() == ((1, 8) if name == "twofour_linear_cusparselt" else (OUT_N[name], 1))


@pytest.mark.parametrize("spec,N,K", [("2:4", 24, 32), ("block:16:0.5", 32, 32), ("lowrank:4", 24, 32),
                                      ("monarch:4", 24, 32)])
def test_opcheck(spec, N, K, gen):
    """torch.library.opcheck: schema, fake tensor and AOT dispatch agree with the real kernel."""
    packed = pack(spec, torch.randn(N, K, generator=gen))
    x = torch.randn(5, K, generator=gen)
    recorded = {}

    class Recorder(TorchDispatchMode):  # captures the sparsec op and arguments linear() calls
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "sparsec":
                recorded["op"], recorded["args"] = func, args
            return func(*args, **(kwargs or {}))

    with Recorder():
        linear(x, packed, torch.randn(N, generator=gen), impl="triton")
    assert "op" in recorded
    torch.library.opcheck(recorded["op"], recorded["args"],
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_packed_linear_module(gen):
    w = torch.randn(32, 64, generator=gen)
    bias = torch.randn(32, generator=gen)
    packed = pack("block:16:0.5", w)
    mod = PackedLinear(packed, bias)
    x = torch.randn(2, 5, 64, generator=gen)
    torch.testing.assert_close(mod(x), linear(x, packed, bias), atol=0, rtol=0)
    assert {"values", "col_idx", "row_ptr", "order", "bias"} <= set(mod.state_dict())
    half = mod.to(torch.float16)
    assert half.values.dtype == torch.float16 and half.col_idx.dtype == torch.int32
    assert "block:16:0.5, in_features=64, out_features=32, bias=True" in repr(mod)


@pytest.mark.parametrize("spec", ["2:4", "block:16:0.5", "lowrank:8", "monarch:4"])
def test_packed_linear_compiles_without_graph_breaks(spec, gen):
    """Dynamo traces through linear() into the custom op; the compiled module matches eager."""
    mod = PackedLinear(pack(spec, torch.randn(32, 64, generator=gen)), torch.randn(32, generator=gen))
    x = torch.randn(3, 64, generator=gen)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(mod, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), atol=1e-5, rtol=1e-5)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("sparsec.") for t in targets), targets


def test_packed_linear_under_inductor(gen):
    """Inductor compiles the graph around the custom op (here on CPU, the op on the interpreter)."""
    mod = PackedLinear(pack("lowrank:8", torch.randn(32, 64, generator=gen)), torch.randn(32, generator=gen))
    x = torch.randn(4, 64, generator=gen)
    compiled = torch.compile(lambda t: torch.relu(mod(t * 2.0)), backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.relu(mod(x * 2.0)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["lowrank:8", "monarch:4"])
def test_crossover_m_routes_between_small_and_large_m_paths(spec, gen):
    """'triton' picks the one-launch kernel below Packed.crossover_m tokens, the two-launch path from it."""
    packed = pack(spec, torch.randn(32, 64, generator=gen))
    seen = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "sparsec":
                seen.append(args[-1])  # the op's ``fused`` flag
            return func(*args, **(kwargs or {}))

    with Recorder():
        linear(torch.randn(3, 64, generator=gen), packed, impl="triton")   # default: two launches
        packed.crossover_m = 4
        linear(torch.randn(3, 64, generator=gen), packed, impl="triton")   # 3 < 4: fused
        linear(torch.randn(4, 64, generator=gen), packed, impl="triton")   # 4 >= 4: two launches
    assert seen == [False, True, False]


def test_a_kernel_configuration_that_fails_to_build_loses_the_tuning_with_a_warning(monkeypatch):
    """The autotuner's timing gives a configuration whose launch raises (a compile error Triton does
    not itself skip) infinite time, so the tuning goes on with the others."""
    from sparsec.codegen import _common

    monkeypatch.setattr(_common, "interpret_mode", lambda: False)

    def broken():
        raise RuntimeError("PassManager::run failed\nIR dump")

    with pytest.warns(UserWarning, match=r"left out of tuning \(RuntimeError: PassManager::run failed\)"):
        assert _common.cold_bench(broken, quantiles=(0.5, 0.2)) == [float("inf"), float("inf")]


def test_the_cusparselt_layout_is_an_argument_of_the_op_so_a_compiled_graph_records_it():
    """The fake lays the product out as the ``row_major`` argument says: traced into the graph (and
    inductor's cache key) rather than read from the environment when the compiled code runs."""
    with FakeTensorMode():
        x = torch.empty(7, 32, dtype=torch.bfloat16)
        column = torch.ops.sparsec.twofour_linear_cusparselt(x, torch.empty(400, dtype=x.dtype), None, 48)
        row = torch.ops.sparsec.twofour_linear_cusparselt(x, torch.empty(400, dtype=x.dtype), None, 48, "row")
        copy = torch.ops.sparsec.twofour_linear_cusparselt(x, torch.empty(400, dtype=x.dtype), None, 48, "copy")
    assert column.shape == row.shape == copy.shape == (7, 48)
    assert column.stride() == (1, 8) and row.stride() == copy.stride() == (48, 1)
