"""End-to-end error measurement of the FX front-end."""

import torch

from sparsec.output_error import relative_l2


def test_error_is_the_worst_output_not_the_pooled_one():
    gen = torch.Generator().manual_seed(7)
    big, small = torch.randn(1000, generator=gen) * 100.0, torch.randn(4, generator=gen)
    refs = [[big, small]]
    outs = [[big.clone(), small * 1.1]]  # the small output is off by 10%, the big one exact
    assert abs(relative_l2(outs, refs) - 0.1) < 1e-6  # float32 rounding of small * 1.1
    # pooled over both outputs the same change would read as a hundred times less
    pooled = float((small * 0.1).norm() / torch.cat([big, small]).norm())
    assert pooled < 1e-3


def test_identical_outputs_have_zero_error_even_when_a_reference_is_zero():
    z = torch.zeros(3)
    assert relative_l2([[z.clone()]], [[z]]) == 0.0


def calibrated(model, x):
    """(front-end, sites, statistics, x) of ``model`` traced by FX and calibrated on ``x``."""
    from sparsec.passes.fx_frontend import FxFrontend

    fe = FxFrontend(torch.fx.symbolic_trace(model), [x], [[x]])
    sites, _ = fe.capture()
    return fe, sites, fe.calibrate(sites), x


def test_layers_sharing_an_input_count_its_rows_once():
    # gate and up read the same activation: its Gram matrix and row count must not double, or
    # 2048 rows for 4096 inputs would pass for enough to weight a fit by
    import torch.nn as nn
    import torch.nn.functional as F


    class GatedMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(32, 64), nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    fe, sites, stats, x = calibrated(GatedMLP().eval(), torch.randn(24, 32, generator=torch.Generator().manual_seed(8)))
    by_name = {s.name: s for s in sites}
    assert by_name["gate"].input_key == by_name["up"].input_key
    st = stats[by_name["gate"].input_key]
    assert st.rows == 24
    # the Gram matrix accumulates in its own (float64) precision: against a float64 product of the
    # same rows only summation order differs (an fp32 reference, rounded, made this flaky)
    ref = x.to(st.gram.dtype).T @ x.to(st.gram.dtype)
    torch.testing.assert_close(st.gram, ref, rtol=1e-12, atol=1e-12)


def test_a_recovery_pass_stops_once_its_inputs_have_arrived():
    """Gathering the statistics of an early layer runs the graph up to it, not the layers after:
    the statistics are those of a whole run, and the later layers never execute."""
    import torch.nn as nn

    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    fe, sites, full, _ = calibrated(Deep().eval(), torch.randn(32, 16, generator=torch.Generator().manual_seed(9)))
    from sparsec.passes import interpret_fx

    executed = []
    original = interpret_fx.SiteInterpreter.run_node

    def counting(self, n):
        executed.append(n.name)
        return original(self, n)

    interpret_fx.SiteInterpreter.run_node = counting
    try:
        stats, products = fe.recalibrate({"layers.1"}, {}, reference={})
    finally:
        interpret_fx.SiteInterpreter.run_node = original
    key = {s.name: s for s in sites}["layers.1"].input_key
    torch.testing.assert_close(stats[key].gram, full[key].gram)
    assert stats[key].rows == 32
    dense_gram, cross = products[key]
    torch.testing.assert_close(dense_gram, full[key].gram)  # no replacements: the dense inputs are the same
    # two passes (dense and replaced), each ending at layers.1: layers 2 and 3 never ran
    assert executed.count("layers_1") == 2 and not [n for n in executed if n.startswith(("layers_2", "layers_3"))]


def test_an_evaluation_without_per_layer_errors_runs_no_dense_product_beside_a_replacement(monkeypatch):
    """The probes and held-out checks read only the metric: ``per_layer=False`` gives the same value
    with no layer errors, and only the replaced product runs at the replaced site."""
    import torch.nn as nn

    from sparsec.passes import interpret_fx

    gen = torch.Generator().manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 8)).eval()
    fe, sites, _, _ = calibrated(model, torch.randn(40, 16, generator=gen))
    name = sites[0].name
    reps = {name: sites[0].weight.detach() * 0.9}
    products = []
    real = interpret_fx.F.linear
    monkeypatch.setattr(interpret_fx.F, "linear", lambda *a, **kw: products.append(1) or real(*a, **kw))
    error, local = fe.evaluate(reps)
    with_layers = len(products)
    products.clear()
    error_only, nothing = fe.evaluate(reps, per_layer=False)
    assert error_only == error and nothing == {} and set(local) == {name}
    assert abs(local[name] - 0.1) < 1e-5  # 0.9 W against W, no bias: a tenth of the output, to rounding
    assert len(products) == with_layers - 1
