"""Checkpoint save/write/read/restore, the save counter, and restore statuses."""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Adam, Dense, Model, model_variables
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    DTypeMismatchError,
    MatchError,
    ShapeMismatchError,
    UnmatchedValuesWarning,
)


def _values(model: Model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model_variables(model)]


def _assert_model_equal(model: Model, expected: list[np.ndarray]) -> None:
    for var, value in zip(model_variables(model), expected, strict=True):
        np.testing.assert_array_equal(var.numpy(), value)


def test_save_restore_round_trip_into_live_memory(tmp_path, model):
    path = zc.Checkpoint(model=model).save(tmp_path / "ckpt")
    fresh = Model(seed=99)
    buffers = [v.numpy() for v in model_variables(fresh)]
    status = zc.Checkpoint(model=fresh).restore(path)
    status.assert_consumed()
    _assert_model_equal(fresh, _values(model))
    for var, buffer in zip(model_variables(fresh), buffers, strict=True):
        assert var.numpy() is buffer  # restored in place, no new buffer


def test_save_numbers_with_counter_and_write_does_not(tmp_path, model):
    ckpt = zc.Checkpoint(model=model)
    assert ckpt._lookup_dependency("save_counter") is None  # not made until needed
    first = ckpt.save(tmp_path / "run")
    second = ckpt.save(tmp_path / "run")
    assert (first, second) == (f"{tmp_path}/run-1", f"{tmp_path}/run-2")
    assert ckpt.write(tmp_path / "plain") == str(tmp_path / "plain")
    assert int(ckpt.save_counter.numpy()) == 2
    assert ckpt.save_counter.dtype == np.int64 and ckpt.save_counter.shape == ()
    graph = zc.ObjectGraph.decode((tmp_path / "run-2" / "object_graph.msgpack").read_bytes())
    keys = {a.key: a for _, a in graph.attributes()}
    counter = keys["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]
    assert (counter.shape, counter.dtype) == ((), "int64")


def test_save_counter_is_created_on_first_access_and_then_saved(tmp_path, model):
    """TensorFlow's rule: reading ckpt.save_counter makes a counter holding 0."""
    zc.Checkpoint(model=model).write(tmp_path / "untouched")
    ckpt = zc.Checkpoint(model=model)
    counter = ckpt.save_counter
    assert int(counter) == 0 and isinstance(counter, zc.Variable)
    assert counter.dtype == np.int64 and counter.shape == ()
    assert ckpt.save_counter is counter  # one counter, made once
    ckpt.write(tmp_path / "touched")
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in {
        k for k, _, _ in zc.list_variables(tmp_path / "touched")
    }
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" not in {
        k for k, _, _ in zc.list_variables(tmp_path / "untouched")
    }
    # A checkpoint without a counter restores into one that has it, which keeps 0.
    fresh = zc.Checkpoint(model=Model(seed=5))
    assert int(fresh.save_counter) == 0
    fresh.restore(tmp_path / "untouched").assert_consumed()
    assert int(fresh.save_counter) == 0
    assert fresh.save(tmp_path / "run") == f"{tmp_path}/run-1"


def test_restore_continues_numbering(tmp_path, model):
    ckpt = zc.Checkpoint(model=model)
    ckpt.save(tmp_path / "run")
    path = ckpt.save(tmp_path / "run")
    for method in ("read", "restore"):
        fresh = zc.Checkpoint(model=Model(seed=3))
        getattr(fresh, method)(path).assert_consumed()
        assert int(fresh.save_counter.numpy()) == 2
    assert fresh.save(tmp_path / "run") == f"{tmp_path}/run-3"


def test_write_refuses_existing_checkpoint_and_keeps_it(tmp_path, model):
    ckpt = zc.Checkpoint(model=model)
    path = ckpt.write(tmp_path / "c")
    before = {p: (tmp_path / "c" / p).read_bytes() for p in ("_COMMIT", "object_graph.msgpack")}
    model.embedding.assign(np.zeros(model.embedding.shape))
    with pytest.raises(CheckpointExistsError, match="already exists"):
        ckpt.write(path)
    assert {p: (tmp_path / "c" / p).read_bytes() for p in before} == before
    assert [n for n in os.listdir(tmp_path) if n != "c"] == []  # no temporary left


def test_failed_save_leaves_nothing_and_rolls_back_counter(tmp_path, model):
    class Broken(zc.PythonState):
        def serialize(self) -> bytes:
            raise RuntimeError("disk full of opinions")

        def deserialize(self, data: bytes) -> None:
            raise AssertionError("never called")

    ckpt = zc.Checkpoint(model=model)
    ckpt.save(tmp_path / "run")
    ckpt.broken = Broken()
    with pytest.raises(RuntimeError, match="opinions"):
        ckpt.save(tmp_path / "run")
    assert int(ckpt.save_counter.numpy()) == 1
    assert sorted(os.listdir(tmp_path)) == ["run-1"]


def test_shape_mismatch_raises_naming_key_and_changes_nothing(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    fresh = Model(seed=5)
    fresh.layers[1].bias = zc.Variable(np.zeros(3, np.float32))  # saved shape is (2,)
    before = _values(fresh)
    with pytest.raises(ShapeMismatchError) as info:
        zc.Checkpoint(model=fresh).read(path)
    message = str(info.value)
    assert "model/layers/1/bias/.ATTRIBUTES/VARIABLE_VALUE" in message
    assert "(2,)" in message and "(3,)" in message
    _assert_model_equal(fresh, before)


def test_dtype_mismatch_raises_and_changes_nothing(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    fresh = Model(seed=5)
    fresh.embedding = zc.Variable(np.zeros((10, 6), np.float64))
    before = _values(fresh)
    with pytest.raises(DTypeMismatchError, match=r"float32.*float64"):
        zc.Checkpoint(model=fresh).read(path)
    _assert_model_equal(fresh, before)


def test_deferred_restoration_on_attach(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    root = zc.Checkpoint()
    status = root.read(path)
    late = Model(seed=42)
    root.model = late  # attached after the restore: values arrive now
    _assert_model_equal(late, _values(model))
    status.assert_consumed()


def test_deferred_mismatch_raises_at_assignment(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    holder = zc.AutoTrackable()
    status = zc.Checkpoint(model=holder).read(path)
    status.expect_partial()
    with pytest.raises(ShapeMismatchError, match="model/embedding"):
        holder.embedding = zc.Variable(np.zeros((3, 3), np.float32))
    assert not hasattr(holder, "embedding")
    good = zc.Variable(np.zeros((10, 6), np.float32))
    holder.embedding = good  # the deferred value is still waiting
    np.testing.assert_array_equal(good.numpy(), model.embedding.numpy())


def test_assert_existing_objects_matched_names_extra_live_objects(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    fresh = Model(seed=1)
    fresh.extra = zc.Variable(np.arange(3.0))
    status = zc.Checkpoint(model=fresh).read(path)
    with pytest.raises(MatchError, match="1 live objects found no value"):
        status.assert_existing_objects_matched()
    with pytest.raises(MatchError):
        status.assert_consumed()
    status.assert_nontrivial_match()


def test_assert_consumed_names_unmatched_checkpoint_objects(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    partial = zc.AutoTrackable()
    partial.embedding = zc.Variable(np.zeros((10, 6), np.float32))
    status = zc.Checkpoint(model=partial).read(path).expect_partial()
    status.assert_existing_objects_matched().assert_nontrivial_match()
    with pytest.raises(MatchError, match="model/layers"):
        status.assert_consumed()
    np.testing.assert_array_equal(partial.embedding.numpy(), model.embedding.numpy())


def test_assert_nontrivial_match_fails_when_only_root_and_counter_match(tmp_path, model):
    ckpt = zc.Checkpoint(model=model)
    path = ckpt.save(tmp_path / "run")
    status = zc.Checkpoint(unrelated=zc.AutoTrackable()).restore(path).expect_partial()
    with pytest.raises(MatchError, match="other than the root"):
        status.assert_nontrivial_match()


def test_status_methods_chain(tmp_path, model):
    path = zc.Checkpoint(model=model).save(tmp_path / "run")
    status = zc.Checkpoint(model=Model(seed=2)).restore(path)
    assert status.assert_consumed() is status
    assert status.expect_partial() is status
    assert status.initialize_or_restore() is status
    assert "values restored" in repr(status)


def _collect_warnings(action) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
        gc.collect()
    return [w for w in caught if issubclass(w.category, UnmatchedValuesWarning)]


def test_unused_values_warn_once_naming_keys(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")

    def restore_and_drop() -> None:
        # The warning comes when nothing can use the values any more: status and
        # every object holding a deferred restoration are gone.
        partial = zc.AutoTrackable()
        partial.embedding = zc.Variable(np.zeros((10, 6), np.float32))
        zc.Checkpoint(model=partial).read(path)

    caught = _collect_warnings(restore_and_drop)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "4 saved values unused" in text
    assert "model/layers/0/kernel/.ATTRIBUTES/VARIABLE_VALUE" in text
    # Shown where read() was called, though it fires when the status is collected.
    assert caught[0].filename == __file__
    assert caught[0].lineno == restore_and_drop.__code__.co_firstlineno + 5


def test_expect_partial_silences_the_warning(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")

    def restore_partially() -> None:
        zc.Checkpoint(model=zc.AutoTrackable()).read(path).expect_partial()

    assert _collect_warnings(restore_partially) == []


def test_full_restore_does_not_warn(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")

    def restore_fully() -> None:
        zc.Checkpoint(model=Model(seed=4)).read(path)

    assert _collect_warnings(restore_fully) == []


def test_restore_none_is_initialization_only(model):
    status = zc.Checkpoint(model=model).restore(None)
    assert isinstance(status, zc.InitializationOnlyStatus)
    assert status.initialize_or_restore() is status
    assert status.expect_partial() is status
    for method in ("assert_consumed", "assert_existing_objects_matched", "assert_nontrivial_match"):
        with pytest.raises(MatchError, match="no checkpoint"):
            getattr(status, method)()


def test_missing_and_uncommitted_paths(tmp_path, model):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        zc.Checkpoint(model=model).read(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "zarr.json").write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        zc.Checkpoint(model=model).read(tmp_path / "half")


def test_constructor_validates_arguments():
    with pytest.raises(zc.errors.InvalidArgumentError, match="expects a Trackable"):
        zc.Checkpoint(model=np.zeros(3))
    with pytest.raises(zc.errors.InvalidArgumentError, match="reserved"):
        zc.Checkpoint(save_counter=zc.Variable(0))


def test_optimizer_and_model_round_trip_with_training_state(tmp_path, model):
    opt = Adam()
    opt.step(model_variables(model), seed=1)
    path = zc.Checkpoint(model=model, optimizer=opt).save(tmp_path / "run")
    fresh, fresh_opt = Model(seed=8), Adam()
    status = zc.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path)
    fresh_opt.step(model_variables(fresh), seed=2)  # creates slots: restored, then stepped
    opt.step(model_variables(model), seed=2)
    _assert_model_equal(fresh, _values(model))
    for var, fresh_var in zip(model_variables(model), model_variables(fresh), strict=True):
        for slot in ("m", "v"):
            np.testing.assert_array_equal(
                fresh_opt.get_slot(fresh_var, slot).numpy(), opt.get_slot(var, slot).numpy()
            )
    status.assert_consumed()


def _saved_with_one_object_on_two_paths(tmp_path) -> tuple[Dense, str]:
    """A checkpoint of root.a and root.b.inner, both the same Dense."""
    shared = Dense(2, 2, seed=0)
    root = zc.AutoTrackable()
    root.a = shared
    root.b = zc.AutoTrackable()
    root.b.inner = shared
    return shared, zc.Checkpoint(root=root).write(tmp_path / "c")


def test_object_reached_twice_is_saved_once(tmp_path):
    shared, path = _saved_with_one_object_on_two_paths(tmp_path)
    graph = zc.ObjectGraph.decode((tmp_path / "c" / "object_graph.msgpack").read_bytes())
    assert sorted(a.key for _, a in graph.attributes()) == [
        "root/a/bias/.ATTRIBUTES/VARIABLE_VALUE",
        "root/a/kernel/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    fresh = zc.AutoTrackable()
    fresh.b = zc.AutoTrackable()
    fresh.b.inner = Dense(2, 2, seed=7)
    zc.Checkpoint(root=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.b.inner.kernel.numpy(), shared.kernel.numpy())


def test_object_saved_once_restored_into_two_live_objects_gives_both_its_values(tmp_path):
    shared, path = _saved_with_one_object_on_two_paths(tmp_path)
    fresh = zc.AutoTrackable()
    fresh.a, fresh.b = Dense(2, 2, seed=5), zc.AutoTrackable()
    fresh.b.inner = Dense(2, 2, seed=6)  # the program no longer shares them
    with pytest.warns(UserWarning, match=r"'root/a' matches two live objects") as info:
        status = zc.Checkpoint(root=fresh).read(path)
    assert len(info) == 1 and info[0].filename == __file__  # once, for the top object
    status.assert_existing_objects_matched().assert_consumed()
    for dense in (fresh.a, fresh.b.inner):
        np.testing.assert_array_equal(dense.kernel.numpy(), shared.kernel.numpy())
        np.testing.assert_array_equal(dense.bias.numpy(), shared.bias.numpy())


def test_reprs_say_what_an_object_is(tmp_path):
    dense = Dense(2, 2, seed=0)
    assert repr(dense) == "<Dense dependencies: [kernel, bias]>"
    assert repr(zc.Checkpoint(model=dense).restore(None)) == (
        "<InitializationOnlyStatus: nothing restored (the path was None)>"
    )
    opt = Adam()
    opt.step([dense.kernel, dense.bias], seed=0)
    assert repr(opt) == "<Adam slots: {'m': 2, 'v': 2}>"
    state = zc.NumpyState()
    state.mean = np.zeros((2, 3), np.float32)
    assert repr(state) == "<NumpyState dependencies: [mean]>"
    assert "\n" not in repr(dense.kernel) and "shape=(2, 2)" in repr(dense.kernel)
    path = zc.Checkpoint(model=dense).write(tmp_path / "c")
    status = zc.Checkpoint(model=Dense(2, 2, seed=1)).read(path)
    assert repr(status) == f"<CheckpointLoadStatus {path}: 2/2 values restored>"


def test_dependencies_named_like_checkpoint_files_round_trip(tmp_path):
    names = ["zarr.json", "_COMMIT", "object_graph.msgpack", "layers.0.weight", "..", "c"]

    def build(offset: float) -> zc.Dict:
        return zc.Dict({n: zc.Variable(np.full(3, i + offset)) for i, n in enumerate(names)})

    saved = build(0.0)
    path = zc.Checkpoint(model=saved).write(tmp_path / "c")
    fresh = build(100.0)
    zc.Checkpoint(model=fresh).read(path).assert_consumed()
    for i, name in enumerate(names):
        np.testing.assert_array_equal(fresh[name].numpy(), np.full(3, float(i)))
    assert (tmp_path / "c" / "model" / "layers.0.weight").is_dir()
    assert (tmp_path / "c" / "model" / "~7Aarr.json").is_dir()
