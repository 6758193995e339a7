"""A stacked launch is priced at its stacked shape, and the end-to-end prediction takes off what
it saves against its members' own prices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparsec.launches import LaunchGroup, price_groups


class Prices:
    """A fingerprint double: time grows with N, plus a fixed cost per launch."""

    def __init__(self, fixed=3.0, per_row=0.001, refuse=None):
        self.fixed, self.per_row, self.refuse = fixed, per_row, refuse

    def can_predict(self, fmt, dtype, mode):
        return self.refuse

    def predict_detail(self, fmt, M, N, K, dtype, mode):
        return SimpleNamespace(us=self.fixed + self.per_row * N, note="", unmeasured="")


def layer(name, us, tokens=1):
    chosen = SimpleNamespace(predicted_us=us)
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
