"""PythonState (alias PythonStateWrapper) and NumpyState."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import zarrckpt as zc
from zarrckpt.errors import (
    DTypeMismatchError,
    ShapeMismatchError,
    UnsavedValueWarning,
    UnsupportedDTypeError,
    UnsupportedValueError,
)


def read_record(path: str | os.PathLike[str]) -> zc.ObjectGraph:
    return zc.ObjectGraph.decode((Path(path) / "object_graph.msgpack").read_bytes())


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    return [attribute.key for _, attribute in read_record(path).attributes()]


def saved_attributes(path: str | os.PathLike[str]) -> dict[str, Any]:
    return {attribute.key: attribute for _, attribute in read_record(path).attributes()}


# PythonState --------------------------------------------------------------------------------


class JsonState(zc.PythonState):
    def __init__(self, state: Any = None) -> None:
        self.state = state
        self.deserialize_calls: list[bytes] = []

    def serialize(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode("utf-8")

    def deserialize(self, data: bytes) -> None:
        self.deserialize_calls.append(data)
        self.state = json.loads(data.decode("utf-8"))


class RawBytes(zc.PythonState):
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.deserialize_calls = 0

    def serialize(self) -> bytes:
        return self.data

    def deserialize(self, data: bytes) -> None:
        self.deserialize_calls += 1
        self.data = data


class ReturnsStr(zc.PythonState):
    def serialize(self) -> bytes:
        return "not bytes"  # type: ignore[return-value]

    def deserialize(self, data: bytes) -> None:
        raise AssertionError("never called")


STATE = {"step": 12, "lr": 0.001, "names": ["a", "ß", "日本"], "nested": {"x": [1, 2]}}


def test_python_state_round_trip(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=JsonState(STATE)).write(tmp_path / "c")
    fresh = JsonState({"step": 0})
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.state == STATE
    assert fresh.deserialize_calls == [json.dumps(STATE, sort_keys=True).encode("utf-8")]


def test_python_state_key_and_dtype(tmp_path: Path) -> None:
    state = JsonState(STATE)
    path = zc.Checkpoint(s=state).write(tmp_path / "c")
    attributes = saved_attributes(path)
    assert list(attributes) == ["s/.ATTRIBUTES/py_state"]
    attribute = attributes["s/.ATTRIBUTES/py_state"]
    assert attribute.key.endswith(".ATTRIBUTES/py_state")
    assert attribute.dtype == "uint8"
    expected = np.frombuffer(state.serialize(), np.uint8)
    assert attribute.shape == expected.shape
    # A plain Zarr reader sees the same bytes.
    stored = zarr.open_array(str(Path(path) / attribute.key), mode="r")[...]
    assert stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, expected)


def test_python_state_arbitrary_bytes_round_trip_exactly(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 3 + b"\x00"
    path = zc.Checkpoint(s=RawBytes(payload)).write(tmp_path / "c")
    fresh = RawBytes(b"old")
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.data == payload
    assert fresh.deserialize_calls == 1


def test_python_state_empty_bytes_round_trip(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=RawBytes(b"")).write(tmp_path / "c")
    fresh = RawBytes(b"something")
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.data == b""
    assert fresh.deserialize_calls == 1


def test_python_state_serialize_may_return_bytearray(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=RawBytes(bytearray(b"abc"))).write(tmp_path / "c")  # type: ignore[arg-type]
    fresh = RawBytes(b"")
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.data == b"abc"


def test_python_state_serialize_returning_str_raises_and_writes_nothing(
    tmp_path: Path,
) -> None:
    target = tmp_path / "c"
    other = zc.AutoTrackable()
    other.w = zc.Variable(np.ones(3, np.float32))
    with pytest.raises(UnsupportedValueError, match="ReturnsStr"):
        zc.Checkpoint(s=ReturnsStr(), other=other).write(target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_python_state_failing_save_does_not_bump_save_counter(tmp_path: Path) -> None:
    ckpt = zc.Checkpoint(s=ReturnsStr())
    with pytest.raises(UnsupportedValueError):
        ckpt.save(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    counter = ckpt.save_counter
    assert counter is None or int(counter.numpy()) == 0


def test_python_state_attached_after_restore_is_deserialized(tmp_path: Path) -> None:
    holder = zc.AutoTrackable()
    holder.state = JsonState(STATE)
    path = zc.Checkpoint(h=holder).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    status = zc.Checkpoint(h=fresh).read(path)
    late = JsonState(None)
    fresh.state = late
    assert late.state == STATE
    assert len(late.deserialize_calls) == 1
    status.assert_consumed()


def test_python_state_without_saved_value_is_left_alone(tmp_path: Path) -> None:
    # A plain node was saved where a PythonState now lives: it has no py_state value.
    holder = zc.Trackable()
    saved = zc.Trackable()
    saved._track_trackable(zc.Variable(np.zeros(3, np.float32)), "unused")
    holder._track_trackable(saved, "s")
    path = zc.Checkpoint(h=holder).write(tmp_path / "c")
    assert saved_keys(path) == ["h/s/unused/.ATTRIBUTES/VARIABLE_VALUE"]
    # The PythonState has no value in this checkpoint: it is left alone.
    fresh_holder = zc.Trackable()
    fresh = RawBytes(b"keep")
    fresh_holder._track_trackable(fresh, "s")
    zc.Checkpoint(h=fresh_holder).read(path).expect_partial()
    assert fresh.data == b"keep"
    assert fresh.deserialize_calls == 0


def test_python_state_wrapper_alias() -> None:
    assert zc.PythonStateWrapper is zc.PythonState
    assert issubclass(JsonState, zc.PythonStateWrapper)
    assert issubclass(zc.PythonStateWrapper, zc.Trackable)


# NumpyState ---------------------------------------------------------------------------------


def make_numpy_state() -> zc.NumpyState:
    state = zc.NumpyState()
    state.mean = np.arange(6, dtype=np.float32).reshape(2, 3)
    state.count = np.array([1, -2, 3], np.int64)
    state.step = np.int64(41)
    state.scale = np.float32(0.25)
    state.flag = np.bool_(True)
    return state


def test_numpy_state_saves_array_and_scalar_attributes(tmp_path: Path) -> None:
    state = make_numpy_state()
    state.python_int = 5
    state.python_float = 2.5
    state.text = "hello"
    with pytest.warns(UnsavedValueWarning, match=r"s\.python_int \(int\), s\.python_float"):
        path = zc.Checkpoint(s=state).write(tmp_path / "c")
    attributes = saved_attributes(path)
    assert sorted(attributes) == [
        "s/count/.ATTRIBUTES/VARIABLE_VALUE",
        "s/flag/.ATTRIBUTES/VARIABLE_VALUE",
        "s/mean/.ATTRIBUTES/VARIABLE_VALUE",
        "s/scale/.ATTRIBUTES/VARIABLE_VALUE",
        "s/step/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    assert attributes["s/step/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    assert attributes["s/step/.ATTRIBUTES/VARIABLE_VALUE"].dtype == "int64"
    assert attributes["s/scale/.ATTRIBUTES/VARIABLE_VALUE"].dtype == "float32"
    assert attributes["s/mean/.ATTRIBUTES/VARIABLE_VALUE"].shape == (2, 3)
    assert not any("python" in key or "text" in key for key in attributes)


def test_numpy_state_attribute_reads_return_values() -> None:
    state = make_numpy_state()
    array = np.zeros(3, np.float64)
    state.buf = array
    assert state.buf is array
    assert state.step == 41
    assert isinstance(state.step, np.int64)
    state.plain = 7
    assert state.plain == 7


def test_numpy_state_arrays_restored_in_place(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=make_numpy_state()).write(tmp_path / "c")
    fresh = zc.NumpyState()
    mean = np.zeros((2, 3), np.float32)
    count = np.zeros(3, np.int64)
    fresh.mean = mean
    fresh.count = count
    fresh.step = np.int64(0)
    fresh.scale = np.float32(0.0)
    fresh.flag = np.bool_(False)
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.mean is mean
    assert fresh.count is count
    assert np.shares_memory(fresh.mean, mean)
    np.testing.assert_array_equal(mean, np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(count, [1, -2, 3])


def test_numpy_state_scalars_replaced_with_dtype_kept(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=make_numpy_state()).write(tmp_path / "c")
    fresh = zc.NumpyState()
    fresh.mean = np.zeros((2, 3), np.float32)
    fresh.count = np.zeros(3, np.int64)
    fresh.step = np.int64(0)
    fresh.scale = np.float32(0.0)
    fresh.flag = np.bool_(False)
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.step == 41
    assert isinstance(fresh.step, np.int64)
    assert fresh.scale == np.float32(0.25)
    assert isinstance(fresh.scale, np.float32)
    assert isinstance(fresh.flag, np.bool_)
    assert bool(fresh.flag) is True


def test_numpy_state_attributes_only_in_checkpoint_are_created(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=make_numpy_state()).write(tmp_path / "c")
    fresh = zc.NumpyState()
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.mean, np.arange(6, dtype=np.float32).reshape(2, 3))
    assert np.asarray(fresh.mean).dtype == np.float32
    np.testing.assert_array_equal(fresh.count, [1, -2, 3])
    assert np.asarray(fresh.count).dtype == np.int64
    assert np.asarray(fresh.step).dtype == np.int64
    assert int(fresh.step) == 41
    assert np.asarray(fresh.scale).dtype == np.float32
    assert float(fresh.scale) == 0.25
    # The created attributes are saved again on the next save.
    again = zc.Checkpoint(s=fresh).write(tmp_path / "again")
    assert sorted(saved_keys(again)) == sorted(saved_keys(path))


def test_numpy_state_python_scalars_are_not_saved(tmp_path: Path) -> None:
    state = zc.NumpyState()
    state.count = 3
    state.ratio = 0.5
    with pytest.warns(UnsavedValueWarning, match=r"s\.count \(int\), s\.ratio \(float\)"):
        path = zc.Checkpoint(s=state).write(tmp_path / "c")
    assert saved_keys(path) == []
    fresh = zc.NumpyState()
    fresh.count = 100
    zc.Checkpoint(s=fresh).read(path).assert_consumed()
    assert fresh.count == 100


def test_numpy_state_replacing_array_with_python_value_untracks(tmp_path: Path) -> None:
    state = zc.NumpyState()
    state.a = np.ones(2, np.float32)
    state.b = np.zeros(2, np.float32)
    state.a = 1.0
    assert state.a == 1.0
    with pytest.warns(UnsavedValueWarning, match=r"not saved: s\.a \(float\)\."):
        path = zc.Checkpoint(s=state).write(tmp_path / "c")
    assert saved_keys(path) == ["s/b/.ATTRIBUTES/VARIABLE_VALUE"]


def test_numpy_state_reassigned_array_saves_the_new_array(tmp_path: Path) -> None:
    state = zc.NumpyState()
    state.a = np.ones(2, np.float32)
    state.a = np.full(4, 7, np.int16)
    path = zc.Checkpoint(s=state).write(tmp_path / "c")
    attribute = saved_attributes(path)["s/a/.ATTRIBUTES/VARIABLE_VALUE"]
    assert attribute.shape == (4,)
    assert attribute.dtype == "int16"


def test_numpy_state_shape_mismatch_raises_and_changes_nothing(tmp_path: Path) -> None:
    path = zc.Checkpoint(s=make_numpy_state()).write(tmp_path / "c")
    fresh = zc.NumpyState()
    fresh.count = np.zeros(3, np.int64)
    fresh.mean = np.zeros((3, 2), np.float32)
    fresh.step = np.int64(0)
    with pytest.raises(ShapeMismatchError):
        zc.Checkpoint(s=fresh).read(path)
    np.testing.assert_array_equal(fresh.mean, np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(fresh.count, [0, 0, 0])
    assert fresh.step == 0


def test_failed_restore_creates_no_numpy_state_attribute(tmp_path: Path) -> None:
    state = zc.NumpyState()
    state.a = np.arange(3, dtype=np.int32)
    model = zc.AutoTrackable()
    model.v = zc.Variable(np.ones(5))
    path = zc.Checkpoint(s=state, m=model).write(tmp_path / "c")

    fresh_state = zc.NumpyState()  # lacks "a": restore would create it
    fresh_model = zc.AutoTrackable()
    fresh_model.v = zc.Variable(np.zeros(6))  # the wrong shape: the restore fails
    with pytest.raises(ShapeMismatchError, match="m/v"):
        zc.Checkpoint(s=fresh_state, m=fresh_model).restore(path)
    assert fresh_state._checkpoint_dependencies() == []
    assert not hasattr(fresh_state, "a") or fresh_state.a is None
    # Nothing stands in the way of a later save, or of a restore that fits.
    zc.Checkpoint(s=fresh_state).write(tmp_path / "after")
    zc.Checkpoint(s=fresh_state).restore(path).expect_partial()
    np.testing.assert_array_equal(fresh_state.a, np.arange(3, dtype=np.int32))
    assert [name for name, _ in fresh_state._checkpoint_dependencies()] == ["a"]


def test_numpy_state_scalar_dtype_mismatch_raises(tmp_path: Path) -> None:
    state = zc.NumpyState()
    state.step = np.int64(3)
    path = zc.Checkpoint(s=state).write(tmp_path / "c")
    fresh = zc.NumpyState()
    fresh.step = np.float32(0.0)
    with pytest.raises(DTypeMismatchError):
        zc.Checkpoint(s=fresh).read(path)
    assert fresh.step == 0.0
    assert isinstance(fresh.step, np.float32)


def test_numpy_state_tracks_trackable_attributes(tmp_path: Path) -> None:
    state = zc.NumpyState()
    state.w = zc.Variable(np.array([1.0, 2.0], np.float32))
    state.layers = [zc.Variable(np.array([3.0], np.float32))]
    state.hidden = zc.NoDependency(zc.Variable(np.array([4.0], np.float32)))
    assert isinstance(state.layers, zc.List)
    path = zc.Checkpoint(s=state).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        "s/layers/0/.ATTRIBUTES/VARIABLE_VALUE",
        "s/w/.ATTRIBUTES/VARIABLE_VALUE",
    ]


def test_numpy_state_unsupported_array_dtype_raises() -> None:
    state = zc.NumpyState()
    with pytest.raises(UnsupportedDTypeError):
        state.names = np.array(["a", "b"])


def test_python_state_without_serialize_cannot_be_created() -> None:
    class Incomplete(zc.PythonState):
        def deserialize(self, data: bytes) -> None:
            pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]
