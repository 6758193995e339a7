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


def test_a_bare_mapping_is_the_layers_of_a_plan_and_malformed_ones_stay_refused():
    plan = Plan.coerce({"_default": "2:4", "fc1": "dense"})
    assert plan.layers == {"_default": "2:4", "fc1": "dense"} and plan.resolve("fc2") == ("2:4", "_default")
    with pytest.raises(PlanError, match="plan entry '_default': unknown format 'two-four'"):
        Plan.coerce({"_default": "two-four"})
    with pytest.raises(PlanError, match="'layers' must be an object"):
        Plan.coerce({"fingerprint": "h200", "layers": ["fc1"]})


def test_entries_that_match_no_layer_are_named_with_the_nearest_layers():
    plan = Plan(layers={"encoder.layer.0.intermedate.dense": "2:4", "re:decoder\\..*": "dense",
                        "encoder.layer.1.output.dense": "dense", "_default": "auto"})
    names = ["encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense", "pooler.dense"]
    assert plan.unmatched(names) == ["encoder.layer.0.intermedate.dense", "re:decoder\\..*"]
    message = plan.describe_unmatched(names)
    assert "'encoder.layer.0.intermedate.dense' (nearest: encoder.layer.0.intermediate.dense" in message
    assert "'re:decoder\\\\..*'" in message and "match no layer of the model" in message
    assert Plan(layers={"pooler.dense": "dense", "_default": "2:4"}).describe_unmatched(names) is None
