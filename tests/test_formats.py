"""Format names parse, print back, and refuse impossible shapes with a reason."""

import pytest

from sparsec.formats import Block, Dense, FormatError, LowRank, Monarch, TwoFour, parse_spec


@pytest.mark.parametrize("text", ["dense", "2:4", "block:64:0.25", "block:16:0.125", "lowrank:256", "monarch:16"])
def test_names_round_trip(text):
    assert str(parse_spec(text)) == text


def test_parsed_types_and_parameters():
    assert parse_spec("block:32:0.5") == Block(32, 0.5)
    assert parse_spec("lowrank:8") == LowRank(8)
    assert parse_spec("monarch:4") == Monarch(4)
    assert isinstance(parse_spec("2:4"), TwoFour) and isinstance(parse_spec("dense"), Dense)


@pytest.mark.parametrize(
    "text, message",
    [
        ("sparse", "unknown format 'sparse'"),
        ("block:48:0.5", "block size 48 not supported"),
        ("block:64:1.5", "must be in (0, 1]"),
        ("block:64", "'block:B:D'"),
        ("lowrank:x", "rank 'x' is not an integer"),
        ("lowrank:0", "at least 1"),
        ("monarch:1", "at least 2 blocks"),
        ("", "non-empty"),
    ],
)
def test_bad_names_say_what_is_wrong(text, message):
    with pytest.raises(FormatError, match=pytest.importorskip("re").escape(message)):
        parse_spec(text)


def test_shape_refusals_name_the_dimension():
    assert Block(64, 0.25).check(1000, 4096) == "N=1000 not divisible by block 64"
    assert TwoFour().check(16, 10) == "K=10 is not divisible by 4, which 2:4 needs"
    assert LowRank(64).check(64, 512) == "rank 64 is not below min(N, K)=64"
    assert "K=96 not divisible by 8x8=64" in Monarch(8).check(64, 96)
    assert Monarch(8).check(64, 128) is None


def test_declared_sparsity_counts_stored_values():
    assert TwoFour().declared_sparsity(128, 128) == 0.5
    assert Block(16, 0.25).declared_sparsity(128, 128) == pytest.approx(0.75)
    assert LowRank(16).declared_sparsity(128, 128) == pytest.approx(1 - 16 * 256 / 128 ** 2)
    assert Monarch(4).declared_sparsity(64, 64) == pytest.approx(1 - (64 * 64 / 4 + 64 * 64 / 4) / 64 ** 2)
