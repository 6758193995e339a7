"""A stacked launch is priced at its stacked shape, and the end-to-end prediction takes off what
it saves against its members' own prices; a format with work on the input alone (actrot's
rotation) is priced in selection as each layer's share of the launch, and that price is kept
only while the siblings choose it too."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import torch

from sparsec.candidates import Candidate, Layer
from sparsec.formats import Dense, parse_spec
from sparsec.launches import LaunchGroup, price_groups, price_shared, settle_shared
from sparsec.sites import Site


class Prices:
    """A fingerprint double: time grows with N, plus a fixed cost per launch."""

    def __init__(self, fixed=3.0, per_row=0.001, refuse=None):
        self.fixed, self.per_row, self.refuse = fixed, per_row, refuse

    def can_predict(self, fmt, dtype, mode):
        return self.refuse

    def predict_detail(self, fmt, M, N, K, dtype, mode):
        return SimpleNamespace(us=self.fixed + self.per_row * N, note="", unmeasured="")


def layer(name, us, tokens=1):
    chosen = SimpleNamespace(predicted_us=us, shared_with=())
    return SimpleNamespace(name=name, chosen=chosen, tokens=tokens, site=SimpleNamespace(dtype_name="bfloat16"))


def test_saving_is_the_members_prices_less_the_stacked_price():
    prices = Prices()
    layers = [layer("gate", prices.fixed + 0.001 * 1000), layer("up", prices.fixed + 0.001 * 1000)]
    saved, lines = price_groups([LaunchGroup(("gate", "up"), "2:4", (2000, 64))], layers, prices, "graph")
    assert saved == pytest.approx(prices.fixed)             # one fixed cost paid instead of two
    assert lines == ["gate, up: one launch over their stacked 2:4 weights (2000 x 64, same input): "
                     "predicted 5.0 us against 8.0 us as 2 launches"]


def test_a_stacked_shape_the_fingerprint_cannot_price_saves_nothing_and_says_why():
    layers = [layer("q", 4.0), layer("k", 4.0), layer("v", 4.0)]
    saved, lines = price_groups([LaunchGroup(("q", "k", "v"), "block:64:0.25", (192, 64))], layers,
                                Prices(refuse="not measured"), "graph")
    assert saved == 0.0
    assert lines[0].endswith("priced as 3 launches (the fingerprint cannot price the stacked shape)")


def test_no_groups_no_saving():
    assert price_groups([], [layer("a", 1.0)], Prices(), "graph") == (0.0, [])


class RotationPrices:
    """A fingerprint double for actrot: dense reads N K values; actrot reads (1 - S) of them plus a
    K x K rotation that one launch pays once, however many layers' rows it stacks."""

    name = "double"

    def can_predict(self, fmt, dtype, mode):
        return None

    def predict_detail(self, fmt, M, N, K, dtype, mode):
        spec = parse_spec(fmt)
        us = N * K * 1e-3 if isinstance(spec, Dense) else (1 - spec.skip) * N * K * 1e-3 + K * K * 1e-3
        return SimpleNamespace(us=us, note="", unmeasured="", kernel="double", impl=None)


def site_layer(name, N, K=64, key="x", tokens=1, specs=("actrot:0.5",)):
    site = Site(name=name, op="linear", weight=torch.zeros(N, K), bias=None, dtype=torch.bfloat16, input_key=key,
                tokens=tokens)
    out = Layer(site=site, stats=None, dense=Candidate(Dense(), None, None, 0.0))
    out.candidates = [Candidate(parse_spec(s), None, None, 0.01) for s in specs]
    prices = RotationPrices()
    out.dense.predicted_us = prices.predict_detail("dense", tokens, N, K, "bfloat16", "graph").us
    for c in out.candidates:
        c.predicted_us = prices.predict_detail(c.fmt, tokens, N, K, "bfloat16", "graph").us
    return out


def test_layers_reading_one_input_are_priced_as_their_share_of_one_launch():
    """gate and up, 96 x 64 each, actrot:0.5: alone 3.07 + 4.10 = 7.17 us against dense's 6.14
    (slower); stacked, one rotation for both: 6.14 + 4.10 = 10.24 us, 5.12 each (faster)."""
    gate, up, other = site_layer("gate", 96), site_layer("up", 96), site_layer("o", 96, key="y")
    price_shared([gate, up, other], RotationPrices(), "graph")
    for one, mate in ((gate, "up"), (up, "gate")):
        cand = one.candidates[0]
        assert cand.predicted_us == pytest.approx(5.12)
        assert cand.alone_us == pytest.approx(7.168)
        assert cand.shared_with == (mate,)
    assert other.candidates[0].shared_with == () and other.candidates[0].predicted_us == pytest.approx(7.168)


def test_shares_follow_rows_and_need_the_same_setting_and_a_launch_that_stacks():
    q, k, v = site_layer("q", 128), site_layer("k", 32, specs=("actrot:0.5", "actrot:0.4")), site_layer("v", 32)
    price_shared([q, k, v], RotationPrices(), "graph")
    total = 0.5 * 192 * 64e-3 + 64 * 64e-3
    assert q.candidates[0].predicted_us == pytest.approx(total * 128 / 192)
    assert k.candidates[0].predicted_us == pytest.approx(total * 32 / 192)
    assert k.candidates[1].shared_with == ()           # actrot:0.4 has no sibling to share with
    many = [site_layer(n, 96, tokens=64) for n in ("gate", "up")]  # past the stacking launch's tokens
    price_shared(many, RotationPrices(), "graph")
    assert all(l.candidates[0].shared_with == () for l in many)


def test_a_shared_price_holds_while_the_siblings_choose_the_same():
    gate, up = site_layer("gate", 96), site_layer("up", 96)
    price_shared([gate, up], RotationPrices(), "graph")
    gate.chosen, up.chosen = gate.candidates[0], up.candidates[0]
    assert settle_shared([gate, up], RotationPrices(), "graph") == []
    assert gate.chosen.predicted_us == pytest.approx(5.12)


def test_a_layer_that_pays_only_with_a_sibling_that_chose_otherwise_is_refused_saying_why():
    gate, up = site_layer("gate", 96), site_layer("up", 96)
    price_shared([gate, up], RotationPrices(), "graph")
    gate.chosen, up.chosen = gate.candidates[0], up.dense
    refused = settle_shared([gate, up], RotationPrices(), "graph")
    assert [l.name for l, _ in refused] == ["gate"]
    why = refused[0][1]
    assert why.startswith("pays only in one launch with up, which chose otherwise: predicted 0.86x of dense")
    assert gate.chosen.predicted_us == pytest.approx(7.168) and gate.chosen.shared_with == ()


def test_the_siblings_left_are_priced_again_as_one_launch_and_kept_where_that_pays():
    """q, k, v all 96 rows: two of three still share one rotation (7.17 us for 2 x 6.14 dense)."""
    q, k, v = site_layer("q", 96), site_layer("k", 96), site_layer("v", 96)
    price_shared([q, k, v], RotationPrices(), "graph")
    q.chosen, k.chosen, v.chosen = q.candidates[0], k.candidates[0], v.dense
    assert settle_shared([q, k, v], RotationPrices(), "graph") == []
    assert q.chosen.shared_with == ("k",) and k.chosen.shared_with == ("q",)
    assert q.chosen.predicted_us == pytest.approx((0.5 * 192 * 64e-3 + 64 * 64e-3) / 2)


def test_a_price_narrowed_to_the_siblings_left_comes_back_when_all_choose_it_again():
    """A later selection (the re-plan) may take the setting on every sibling again: the first
    price, as a third of one launch, holds again, not the narrowed one."""
    q, k, v = site_layer("q", 96), site_layer("k", 96), site_layer("v", 96)
    price_shared([q, k, v], RotationPrices(), "graph")
    full = q.candidates[0].predicted_us
    q.chosen, k.chosen, v.chosen = q.candidates[0], k.candidates[0], v.dense
    settle_shared([q, k, v], RotationPrices(), "graph")
    assert q.chosen.predicted_us > full
    v.chosen = v.candidates[0]
    assert settle_shared([q, k, v], RotationPrices(), "graph") == []
    assert q.chosen.predicted_us == pytest.approx(full) and set(q.chosen.shared_with) == {"k", "v"}


class CslPrices(Prices):
    """Prices whose kernel is cuSPARSELt, on a device that copies 1000 GB/s."""

    measured = {"copy_GBps": 1000.0}

    def predict_detail(self, fmt, M, N, K, dtype, mode):
        return SimpleNamespace(us=self.fixed + self.per_row * N, note="", unmeasured="", kernel="cusparselt")


def test_a_column_major_product_read_by_other_than_linear_layers_costs_one_pass_over_it():
    """cuSPARSELt's column-major product costs its readers one pass (read and written at the copy
    bandwidth) unless only linear layers read it; other kernels write rows and cost nothing more."""
    from sparsec.launches import transposed_output_us

    fp = CslPrices()
    site = SimpleNamespace(N=1024, dtype=torch.bfloat16, read_by_linears=False)
    assert transposed_output_us("cusparselt", site, 2048, fp) == pytest.approx(2 * 2048 * 1024 * 2 / 1e6)
    assert transposed_output_us("sparsec-triton-2:4", site, 2048, fp) == 0.0
    site.read_by_linears = True
    assert transposed_output_us("cusparselt", site, 2048, fp) == 0.0


def test_a_stacked_launch_pays_the_pass_over_each_members_product_too():
    fp = CslPrices()
    members = [layer(n, 100.0, tokens=2048) for n in ("q", "k")]
    for m in members:
        m.site = SimpleNamespace(dtype_name="bfloat16", dtype=torch.bfloat16, N=1000, read_by_linears=False)
    group = LaunchGroup(("q", "k"), "2:4", (2000, 64))
    saved, lines = price_groups([group], members, fp, "eager")
    each = 2 * 2048 * 1000 * 2 / 1e6
    assert saved == pytest.approx(200.0 - (fp.fixed + 2.0 + 2 * each))
    assert f"predicted {fp.fixed + 2.0 + 2 * each:.1f} us" in lines[0]
