"""Plans: resolution order, validation messages, atomic save."""

import json

import pytest

from sparsec.errors import PlanError
from sparsec.plan import Plan


def test_exact_name_beats_pattern_beats_default():
    plan = Plan(layers={"enc.fc1": "dense", "re:enc\\..*": "2:4", "re:.*": "lowrank:8", "_default": "block:16:0.5"})
    assert plan.resolve("enc.fc1") == ("dense", "enc.fc1")
    assert plan.resolve("enc.fc2") == ("2:4", "re:enc\\..*")
    assert plan.resolve("head") == ("lowrank:8", "re:.*")
    assert Plan(layers={"_default": "dense"}).resolve("x") == ("dense", "_default")
    assert Plan().resolve("x") == ("auto", None)


def test_patterns_must_match_the_whole_name():
    assert Plan(layers={"re:fc": "2:4"}).resolve("fc1") == ("auto", None)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"layers": {"a": "blocky"}}, "plan entry 'a': unknown format 'blocky'"),
        ({"layers": {"re:(": "dense"}}, "bad regular expression"),
        ({"layers": []}, "'layers' must be an object"),
        ({"schema": "other/2", "layers": {}}, "schema 'other/2'"),
        ({"layers": {"a": 3}}, "must map a layer name to a format name"),
    ],
)
def test_malformed_plans_are_refused_with_the_entry_named(data, message):
    with pytest.raises(PlanError, match=pytest.importorskip("re").escape(message)):
        Plan.from_dict(data)


def test_load_names_missing_and_corrupt_files(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad)


def test_save_is_atomic_and_round_trips(tmp_path):
    plan = Plan(layers={"a": "2:4", "_default": "auto"}, fingerprint="h200", error_budget=0.01)
    path = tmp_path / "p.json"
    plan.save(path)
    assert Plan.load(path).to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["schema"] == "sparsec.plan/1"
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    with pytest.raises(PlanError, match="does not exist"):
        plan.save(tmp_path / "missing" / "p.json")
