"""Calibration inputs for ONNX models: .npz layouts, generated inputs, and the errors for each mistake."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx_builders import make_model, tensor, vi

from sparsec.errors import ModelError
from sparsec.passes.onnx_data import RUN_BATCH, generate, load_npz


def embedding_model(batch=1, seq=8, vocab=50, dim=4):
    """ids [batch, seq] -> Cast -> Gather(table [vocab, dim]); a float 'scale' input; a mask input."""
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "ids64"], ["emb"]),
             helper.make_node("Mul", ["emb", "scale"], ["y"]),
             helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT)]
    inputs = [vi("ids", [batch, seq], TensorProto.INT32), vi("scale", [batch, 1]),
              vi("mask", [batch, seq], TensorProto.INT64)]
    table = tensor("table", np.zeros((vocab, dim), np.float32))
    return make_model(nodes, inputs, [vi("y", None), vi("maskf", None)], [table])


def test_generated_ids_stay_inside_the_embedding_table_and_masks_are_ones():
    feeds = generate(embedding_model(vocab=50), calls=64, seed=1)
    ids = np.stack([run["ids"] for run in feeds.runs])
    assert feeds.generated and len(feeds.runs) == 64 and ids.dtype == np.int32
    assert ids.min() >= 0 and ids.max() <= 49 and ids.max() >= 40  # the whole range is used
    assert all((run["mask"] == 1).all() for run in feeds.runs)
    assert "ids uniform in [0, 50)" in " ".join(feeds.notes)


def test_dynamic_dimension_without_data_names_the_input_and_the_fix():
    with pytest.raises(ModelError) as err:
        generate(embedding_model(batch="batch"))
    text = str(err.value)
    assert "input 'ids' has a dynamic dimension ('batch', axis 0)" in text
    assert "--calibration data.npz" in text and "'ids'" in text
    # the shape to pass keeps the model's names for its dynamic dimensions
    assert "of shape [samples, batch, " in text, text


def test_named_dynamic_dimensions_take_the_sizes_given_and_a_name_no_input_has_is_refused():
    feeds = generate(embedding_model(batch="batch", seq="seq"), calls=2, sizes={"batch": 3, "seq": 5})
    assert feeds.runs[0]["ids"].shape == (3, 5) and feeds.runs[0]["scale"].shape == (3, 1)
    with pytest.raises(ModelError, match=r"input 'ids' has a dynamic dimension \('seq', axis 1\).*--dims seq=SIZE"):
        generate(embedding_model(batch="batch", seq="seq"), sizes={"batch": 3})
    with pytest.raises(ModelError, match=r"--dims names 'batc', which is no dynamic dimension .*theirs: batch, seq"):
        generate(embedding_model(batch="batch", seq="seq"), sizes={"batc": 3, "seq": 5})


def test_arrays_of_the_input_rank_are_samples_along_a_dynamic_batch_run_several_at_a_time(tmp_path):
    model = embedding_model(batch="b")
    n = RUN_BATCH + 3
    np.savez(tmp_path / "d.npz", ids=np.arange(n * 8).reshape(n, 8) % 50, scale=np.ones((n, 1)),
             mask=np.ones((n, 8), np.int64))
    feeds = load_npz(tmp_path / "d.npz", model)
    assert feeds.calls == [RUN_BATCH, 3] and feeds.count == n
    assert feeds.runs[0]["ids"].shape == (RUN_BATCH, 8) and feeds.runs[0]["ids"].dtype == np.int32
    assert feeds.runs[1]["scale"].dtype == np.float32  # float64 in the file, cast to the input's type
    one = feeds.first_call()  # what end-to-end timing runs: the call planning priced, not a run of several
    assert one["ids"].shape == (1, 8) and np.array_equal(one["ids"], feeds.runs[0]["ids"][:1])


def test_one_extra_axis_means_one_whole_input_per_sample(tmp_path):
    model = embedding_model(batch=2)
    np.savez(tmp_path / "d.npz", ids=np.zeros((5, 2, 8), np.int32), scale=np.ones((5, 2, 1), np.float32),
             mask=np.ones((5, 2, 8), np.int64))
    feeds = load_npz(tmp_path / "d.npz", model)
    assert len(feeds.runs) == 5 and feeds.calls == [1] * 5 and feeds.runs[0]["ids"].shape == (2, 8)
    assert feeds.first_call()["ids"].shape == (2, 8)


@pytest.mark.parametrize("arrays, message", [
    ({"ids": np.zeros((4, 8), np.int32), "scale": np.ones((4, 1), np.float32)}, "no array for input\\(s\\) 'mask'"),
    ({"ids": np.zeros((4, 8), np.int32), "scale": np.ones((4, 1), np.float32), "mask": np.ones((4, 8), np.int64),
      "idz": np.zeros(3)}, "'idz' name no graph input"),
    ({"ids": np.zeros((4, 9), np.int32), "scale": np.ones((4, 1), np.float32), "mask": np.ones((4, 8), np.int64)},
     "has 9 at input axis 1 but the input"),
    ({"ids": np.zeros((4, 8), np.float32), "scale": np.ones((4, 1), np.float32), "mask": np.ones((4, 8), np.int64)},
     "'ids' is float32 but the input takes int32"),
    ({"ids": np.zeros((4, 8), np.int32), "scale": np.ones((3, 1), np.float32), "mask": np.ones((4, 8), np.int64)},
     "different numbers of calls"),
    ({"ids": np.zeros((8,), np.int32), "scale": np.ones((4, 1), np.float32), "mask": np.ones((4, 8), np.int64)},
     "give \\[samples, ...\\] of rank 2"),
])
def test_npz_mistakes_are_named(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ModelError, match=message):
        load_npz(tmp_path / "d.npz", embedding_model(batch="b"))


def test_fixed_batch_takes_that_many_samples_per_call(tmp_path):
    model = embedding_model(batch=2)
    np.savez(tmp_path / "d.npz", ids=np.zeros((6, 8), np.int32), scale=np.ones((6, 1), np.float32),
             mask=np.ones((6, 8), np.int64))
    feeds = load_npz(tmp_path / "d.npz", model)
    assert len(feeds.runs) == 3 and feeds.runs[0]["ids"].shape == (2, 8) and feeds.calls == [1, 1, 1]
    np.savez(tmp_path / "e.npz", ids=np.zeros((5, 8), np.int32), scale=np.ones((5, 1), np.float32),
             mask=np.ones((5, 8), np.int64))
    with pytest.raises(ModelError, match="fixed batch of 2 but the array holds 5 samples"):
        load_npz(tmp_path / "e.npz", model)


def test_unreadable_npz_is_refused(tmp_path):
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(ModelError, match="is not an .npz archive of arrays"):
        load_npz(tmp_path / "bad.npz", embedding_model())
    with pytest.raises(ModelError, match="no such file"):
        load_npz(tmp_path / "missing.npz", embedding_model())
