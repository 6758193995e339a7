"""cuSPARSELt's algorithm id: timed once per shape, in alternating rounds, kept after."""

from __future__ import annotations

import pytest
import torch

from sparsec.codegen import twofour_cslt
from sparsec.errors import SparsecError


def test_fastest_takes_the_lower_median_and_alternates_the_order():
    # id 0 has one slow outlier round, id 1 is steadily a little slower: the median sees through
    # the outlier; a mean would pick id 1
    seen = []
    samples = {0: iter([100.0, 400.0, 100.0, 100.0]), 1: iter([110.0, 110.0, 110.0, 110.0])}

    def timer(call):
        seen.append(call())
        return next(samples[seen[-1]])

    calls = {0: lambda: 0, 1: lambda: 1}
    assert twofour_cslt.fastest(calls, timer, 4) == 0
    assert seen == [0, 1, 1, 0, 0, 1, 1, 0]  # neither id always runs first, on a cooler device


def test_fastest_drops_an_id_the_library_refuses_and_gives_none_when_all_are():
    def refused():
        raise RuntimeError("CUDA error: invalid value")

    timer = lambda call: float(call())  # noqa: E731
    assert twofour_cslt.fastest({0: refused, 1: lambda: 5}, timer, 3) == 1
    assert twofour_cslt.fastest({0: refused, 1: refused}, timer, 3) is None


def test_fastest_breaks_a_tie_by_the_order_given():
    assert twofour_cslt.fastest({1: lambda: 1, 0: lambda: 0}, lambda call: 7.0, 2) == 1


@pytest.fixture
def fresh_ids(monkeypatch):
    monkeypatch.setattr(twofour_cslt, "_ALG_IDS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_a_shape_is_timed_on_its_first_call_only_and_a_recorded_id_is_never_timed(fresh_ids, monkeypatch):
    timed = []

    def fake_fastest(calls, timer, rounds, times):
        timed.append(sorted(calls))
        return 0

    monkeypatch.setattr(twofour_cslt, "fastest", fake_fastest)
    monkeypatch.setattr(twofour_cslt, "_cuda_round_timer", lambda device: None)
    key = (4096, 14336, 2048, torch.bfloat16)
    x = torch.empty(14336, 2048)
    assert twofour_cslt._cslt_alg(key, None, x) == 0   # timed: 0, against default_cslt_alg's 1 here
    assert twofour_cslt._cslt_alg(key, None, x) == 0
    assert timed == [list(twofour_cslt.CSLT_TUNED_ALGS)]
    twofour_cslt.set_cslt_algorithm(28672, 4096, 2045, torch.bfloat16, 1)  # M padded to 2048 as calls pad it
    assert twofour_cslt._cslt_alg((28672, 4096, 2048, torch.bfloat16), None, x) == 1
    assert len(timed) == 1


@pytest.mark.parametrize("capturing,switch", [(True, "1"), (False, "0")])
def test_nothing_is_timed_during_graph_capture_or_when_switched_off(fresh_ids, monkeypatch, capturing, switch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setenv("SPARSEC_CSLT_TUNE", switch)
    monkeypatch.setattr(twofour_cslt, "fastest", lambda *a: pytest.fail("timed where it must not"))
    for m in (1024, 2048):
        key = (4096, 4096, m, torch.bfloat16)
        assert twofour_cslt._cslt_alg(key, None, None) == twofour_cslt.default_cslt_alg(m)
    assert twofour_cslt._ALG_IDS == {}  # a default is not recorded: the next uncaptured call still times


@pytest.mark.parametrize("M", [5, 16])
def test_the_fake_lays_the_product_out_as_the_chosen_output_order_does(M, monkeypatch):
    x = torch.empty(M, 64)
    column = twofour_cslt.twofour_cslt_fake(x, None, None, 32)
    assert column.shape == (M, 32) and column.stride(0) == 1  # the (N, M) product, transposed
    for layout in ("row", "copy"):
        row = twofour_cslt.twofour_cslt_fake(x, None, None, 32, layout)
        assert row.shape == (M, 32) and row.stride() == (32, 1)
    # the op's argument, not the environment, decides: the switch is read where a layer is traced
    monkeypatch.setenv("SPARSEC_CSLT_OUTPUT", "row")
    assert twofour_cslt.twofour_cslt_fake(x, None, None, 32).stride(0) == 1
    assert twofour_cslt.output_layout() == "row"
    monkeypatch.delenv("SPARSEC_CSLT_OUTPUT")
    assert twofour_cslt.output_layout() == "column"
    monkeypatch.setenv("SPARSEC_CSLT_OUTPUT", "rows")
    with pytest.raises(SparsecError, match="SPARSEC_CSLT_OUTPUT must be one of column, row, copy; got 'rows'"):
        twofour_cslt.output_layout()


def test_the_row_major_product_is_timed_apart_from_the_column_major_one(fresh_ids, monkeypatch):
    """The library writes the transpose with other kernels, so its algorithm is chosen on its own."""
    chosen = iter([0, 1])
    monkeypatch.setattr(twofour_cslt, "fastest", lambda calls, timer, rounds, times: next(chosen))
    monkeypatch.setattr(twofour_cslt, "_cuda_round_timer", lambda device: None)
    key = (4096, 4096, 2048, torch.bfloat16)
    x = torch.empty(4096, 2048)
    assert twofour_cslt._cslt_alg(key, None, x) == 0
    assert twofour_cslt._cslt_alg(key, None, x, row_major=True) == 1
    assert twofour_cslt._cslt_alg(key, None, x) == 0 and twofour_cslt._cslt_alg(key, None, x, True) == 1
