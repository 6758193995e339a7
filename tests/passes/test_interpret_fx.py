"""End-to-end error measurement of the FX front-end."""

import pytest
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


class _MaskedPooling(torch.nn.Module):
    """One linear layer over positions, then the mean over the positions the mask keeps."""

    def __init__(self, weight):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x, attention_mask):
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (self.proj(x) * m).sum(1) / m.sum(1)


def _padded_batches(n, basis, gen, B=4, T=12, real=4):
    """Real positions in the span of ``basis``; the rest padding: large, full-rank, masked out."""
    out = []
    for _ in range(n):
        coeffs = torch.randn(B, T, basis.shape[1], generator=gen)
        x = coeffs @ basis.T
        mask = torch.zeros(B, T, dtype=torch.long)
        mask[:, :real] = 1
        x[:, real:] = 30.0 * torch.randn(B, T - real, basis.shape[0], generator=gen)
        out.append((x, mask))
    return out


@pytest.mark.parametrize("mask_name", ["attention_mask", "weights"])
def test_padding_an_attention_mask_marks_is_left_out_of_the_statistics(scenario_fp, mask_name):
    # the real positions' inputs lie in 4 of 32 directions: a rank-4 fit weighted by them is exact on
    # what the output reads, whatever the weight; padding (30x larger, full rank) must not steer it
    import sparsec

    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0]
    model = _MaskedPooling(torch.randn(24, 32, generator=gen)).eval()
    if mask_name != "attention_mask":  # the same model, its mask argument under another name
        forward = model.forward
        model.forward = lambda x, weights: forward(x, weights)
    calib = _padded_batches(6, basis, gen)
    result = sparsec.optimize(model, calib[0], fingerprint=scenario_fp(), calibration=calib,
                              plan={"layers": {"_default": "lowrank:4"}}, recovery="none", error_budget=0.9)
    error = result.report.end_to_end["measured_error"]
    if mask_name == "attention_mask":  # exact but for the fit's small pull towards the weight
        assert error < 5e-3 and result.report.layers[0]["measured_error"] < 5e-3
    else:
        assert error > 0.05  # fitted to the padding's directions: the real ones are lost


def test_rows_are_dropped_only_where_the_activation_is_laid_out_over_the_mask():
    from sparsec.passes.interpret_fx import kept_rows

    keep = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    assert torch.equal(kept_rows(x, keep), x.reshape(-1, 2)[torch.tensor([0, 1, 3])])
    assert kept_rows(x.transpose(0, 1), keep).shape == (6, 2)  # position-first: order unknown, all kept
    assert kept_rows(x.reshape(6, 2), keep).shape == (6, 2)  # flattened: all kept
    assert kept_rows(x, None).shape == (6, 2)
