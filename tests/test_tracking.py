"""UniqueNameTracker, split_dependency and capture_dependencies."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt.errors import (
    DependencyNameError,
    DTypeMismatchError,
    MatchError,
    ShapeMismatchError,
    UnsupportedDTypeError,
    UnsupportedValueError,
)


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    graph = zc.ObjectGraph.decode((Path(path) / "object_graph.msgpack").read_bytes())
    return [attribute.key for _, attribute in graph.attributes()]


def dep_names(obj: zc.Trackable) -> list[str]:
    return [name for name, _ in obj._checkpoint_dependencies()]


def var(values: object, dtype: Any = np.float32) -> zc.Variable:
    return zc.Variable(np.asarray(values, dtype=dtype))


# UniqueNameTracker --------------------------------------------------------------------------


def test_unique_names_x_x1_x2() -> None:
    tracker = zc.UniqueNameTracker()
    a, b, c = var([1.0]), var([2.0]), var([3.0])
    assert tracker.track(a, "x") is a
    assert tracker.track(b, "x") is b
    assert tracker.track(c, "x") is c
    assert tracker._checkpoint_dependencies() == [("x", a), ("x_1", b), ("x_2", c)]
    assert len(tracker) == 3


def test_unique_names_are_per_base_name() -> None:
    tracker = zc.UniqueNameTracker()
    tracker.track(var([1.0]), "x")
    tracker.track(var([1.0]), "y")
    tracker.track(var([1.0]), "x")
    tracker.track(var([1.0]), "y")
    assert dep_names(tracker) == ["x", "y", "x_1", "y_1"]


def test_unique_name_skips_existing_explicit_names() -> None:
    tracker = zc.UniqueNameTracker()
    explicit = var([0.0])
    tracker._track_trackable(explicit, "x_1")
    a, b, c = var([1.0]), var([2.0]), var([3.0])
    tracker.track(a, "x")
    tracker.track(b, "x")
    tracker.track(c, "x")
    assert tracker._checkpoint_dependencies() == [
        ("x_1", explicit),
        ("x", a),
        ("x_2", b),
        ("x_3", c),
    ]


def test_unique_name_skips_explicit_base_name() -> None:
    tracker = zc.UniqueNameTracker()
    explicit = var([0.0])
    tracker._track_trackable(explicit, "x")
    a = var([1.0])
    tracker.track(a, "x")
    assert tracker._lookup_dependency("x") is explicit
    assert tracker._lookup_dependency("x_1") is a


def test_unique_name_base_colliding_with_generated_name() -> None:
    tracker = zc.UniqueNameTracker()
    a, b, c = var([1.0]), var([2.0]), var([3.0])
    tracker.track(a, "x")
    tracker.track(b, "x")  # x_1
    tracker.track(c, "x_1")  # the name "x_1" is taken by b
    names = dep_names(tracker)
    assert names[:2] == ["x", "x_1"]
    assert len(set(names)) == 3
    assert tracker._lookup_dependency("x_1") is b
    assert tracker._lookup_dependency(names[2]) is c


def test_unique_name_tracker_rejects_bad_input() -> None:
    tracker = zc.UniqueNameTracker()
    with pytest.raises(DependencyNameError):
        tracker.track(var([1.0]), 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tracker.track(np.zeros(2), "x")  # type: ignore[arg-type]
    assert len(tracker) == 0


def test_unique_name_tracker_save_and_restore(tmp_path: Path) -> None:
    tracker = zc.UniqueNameTracker()
    for i in range(3):
        tracker.track(zc.Variable(np.full(2, i, np.int32)), "x")
    tracker.track(zc.Variable(np.full(2, 10, np.int32)), "y")
    holder = zc.AutoTrackable()
    holder.slots = tracker
    path = zc.Checkpoint(h=holder).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        f"h/slots/{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in ("x", "x_1", "x_2", "y")
    ]
    fresh_tracker = zc.UniqueNameTracker()
    made = [fresh_tracker.track(zc.Variable(np.zeros(2, np.int32)), "x") for _ in range(3)]
    made.append(fresh_tracker.track(zc.Variable(np.zeros(2, np.int32)), "y"))
    fresh = zc.AutoTrackable()
    fresh.slots = fresh_tracker
    zc.Checkpoint(h=fresh).read(path).assert_consumed()
    for variable, expected in zip(made, [0, 1, 2, 10], strict=True):
        np.testing.assert_array_equal(variable.numpy(), np.full(2, expected, np.int32))


def test_unique_name_tracker_deferred_restore(tmp_path: Path) -> None:
    tracker = zc.UniqueNameTracker()
    tracker.track(var([1.0]), "x")
    tracker.track(var([2.0]), "x")
    path = zc.Checkpoint(t=tracker).write(tmp_path / "c")
    fresh = zc.UniqueNameTracker()
    status = zc.Checkpoint(t=fresh).read(path)
    first = fresh.track(var([0.0]), "x")
    second = fresh.track(var([0.0]), "x")
    np.testing.assert_array_equal(first.numpy(), [1.0])
    np.testing.assert_array_equal(second.numpy(), [2.0])
    status.assert_consumed()


# split_dependency ---------------------------------------------------------------------------


class Fused:
    """A fused buffer exposed as two checkpoint components, counting calls."""

    def __init__(self, values: np.ndarray) -> None:
        self.buffer = values
        self.fill_calls = 0
        self.consume_calls: list[dict[str, np.ndarray]] = []

    def fill(self, buffer: dict[str, Any]) -> None:
        self.fill_calls += 1
        buffer["first"] = self.buffer[:3].copy()
        buffer["second"] = self.buffer[3:].astype(np.int64)

    def consume(self, buffer: dict[str, np.ndarray]) -> None:
        self.consume_calls.append({k: np.array(v, copy=True) for k, v in buffer.items()})
        self.buffer[:3] = buffer["first"]
        self.buffer[3:] = buffer["second"]

    def dependencies(self) -> dict[str, zc.Trackable]:
        return zc.split_dependency(
            ["first", "second"], [np.float64, np.int64], self.fill, self.consume
        )


def attach(deps: dict[str, zc.Trackable]) -> zc.AutoTrackable:
    holder = zc.AutoTrackable()
    holder.first = deps["first"]
    holder.second = deps["second"]
    return holder


def test_split_dependency_fill_once_per_save(tmp_path: Path) -> None:
    fused = Fused(np.array([0.5, 1.5, 2.5, 7.0, 8.0]))
    holder = attach(fused.dependencies())
    ckpt = zc.Checkpoint(h=holder)
    path = ckpt.write(tmp_path / "a")
    assert fused.fill_calls == 1
    assert sorted(saved_keys(path)) == [
        "h/first/.ATTRIBUTES/VARIABLE_VALUE",
        "h/second/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    ckpt.write(tmp_path / "b")
    assert fused.fill_calls == 2
    ckpt.save(tmp_path / "numbered")
    assert fused.fill_calls == 3
    assert fused.consume_calls == []


def test_split_dependency_round_trip_consumes_once(tmp_path: Path) -> None:
    original = np.array([0.5, -1.25, 2.5, 7.0, 8.0])
    fused = Fused(original.copy())
    path = zc.Checkpoint(h=attach(fused.dependencies())).write(tmp_path / "c")
    restored = Fused(np.zeros(5))
    status = zc.Checkpoint(h=attach(restored.dependencies())).read(path)
    status.assert_consumed()
    assert len(restored.consume_calls) == 1
    call = restored.consume_calls[0]
    assert sorted(call) == ["first", "second"]
    np.testing.assert_array_equal(call["first"], [0.5, -1.25, 2.5])
    assert call["first"].dtype == np.float64
    np.testing.assert_array_equal(call["second"], [7, 8])
    assert call["second"].dtype == np.int64
    np.testing.assert_array_equal(restored.buffer, original)
    assert restored.fill_calls == 0


def test_split_dependency_deferred_consumes_once_when_all_attached(tmp_path: Path) -> None:
    fused = Fused(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    path = zc.Checkpoint(h=attach(fused.dependencies())).write(tmp_path / "c")
    restored = Fused(np.zeros(5))
    deps = restored.dependencies()
    holder = zc.AutoTrackable()
    status = zc.Checkpoint(h=holder).read(path)
    holder.first = deps["first"]
    assert restored.consume_calls == []
    holder.second = deps["second"]
    assert len(restored.consume_calls) == 1
    np.testing.assert_array_equal(restored.buffer, [1.0, 2.0, 3.0, 4.0, 5.0])
    status.assert_consumed()


def test_split_dependency_second_restore_consumes_again(tmp_path: Path) -> None:
    fused = Fused(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    path = zc.Checkpoint(h=attach(fused.dependencies())).write(tmp_path / "c")
    restored = Fused(np.zeros(5))
    ckpt = zc.Checkpoint(h=attach(restored.dependencies()))
    ckpt.read(path).assert_consumed()
    restored.buffer[:] = 0
    ckpt.read(path).assert_consumed()
    assert len(restored.consume_calls) == 2
    np.testing.assert_array_equal(restored.buffer, [1.0, 2.0, 3.0, 4.0, 5.0])


def test_split_dependency_wrong_dtype_from_fill_raises(tmp_path: Path) -> None:
    def fill(buffer: dict[str, Any]) -> None:
        buffer["a"] = np.zeros(2, np.float32)  # declared float64

    deps = zc.split_dependency(["a"], [np.float64], fill, lambda buffer: None)
    holder = zc.AutoTrackable()
    holder.a = deps["a"]
    target = tmp_path / "c"
    with pytest.raises(DTypeMismatchError):
        zc.Checkpoint(h=holder).write(target)
    assert not target.exists()


def test_split_dependency_fill_missing_component_raises(tmp_path: Path) -> None:
    def fill(buffer: dict[str, Any]) -> None:
        buffer["a"] = np.zeros(2, np.float64)

    deps = zc.split_dependency(["a", "b"], [np.float64, np.float64], fill, lambda b: None)
    holder = attach({"first": deps["a"], "second": deps["b"]})
    with pytest.raises(UnsupportedValueError):
        zc.Checkpoint(h=holder).write(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_split_dependency_restore_dtype_mismatch_raises(tmp_path: Path) -> None:
    fused = Fused(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    path = zc.Checkpoint(h=attach(fused.dependencies())).write(tmp_path / "c")
    consumed: list[Any] = []
    deps = zc.split_dependency(
        ["first", "second"], [np.float32, np.int64], lambda b: None, consumed.append
    )
    with pytest.raises(DTypeMismatchError):
        zc.Checkpoint(h=attach(deps)).read(path)
    assert consumed == []


def test_split_dependency_argument_validation() -> None:
    with pytest.raises(DependencyNameError):
        zc.split_dependency(["a", "a"], [np.float32, np.float32], lambda b: None, lambda b: None)
    with pytest.raises(DependencyNameError):
        zc.split_dependency(["a", "b"], [np.float32], lambda b: None, lambda b: None)
    with pytest.raises(UnsupportedDTypeError):
        zc.split_dependency(["a"], [object], lambda b: None, lambda b: None)


# capture_dependencies -----------------------------------------------------------------------


def test_capture_named_variables_by_name() -> None:
    template = zc.AutoTrackable()
    with zc.capture_dependencies(template) as captured:
        assert captured is template
        w = zc.Variable(np.zeros(3, np.float32), name="w")
        b = zc.Variable(np.zeros(1, np.float32), name="b")
        unnamed = zc.Variable(np.zeros(2, np.float32))
    assert template._checkpoint_dependencies() == [("w", w), ("b", b)]
    assert all(obj is not unnamed for obj in zc.list_objects(template))


def test_capture_ends_with_the_block() -> None:
    template = zc.AutoTrackable()
    with zc.capture_dependencies(template):
        pass
    zc.Variable(np.zeros(1), name="after")
    assert template._checkpoint_dependencies() == []


def test_capture_ends_when_the_block_raises() -> None:
    template = zc.AutoTrackable()
    with pytest.raises(RuntimeError), zc.capture_dependencies(template):
        raise RuntimeError("boom")
    zc.Variable(np.zeros(1), name="after")
    assert template._checkpoint_dependencies() == []


def test_nested_capture_goes_to_innermost() -> None:
    outer = zc.AutoTrackable()
    inner = zc.AutoTrackable()
    with zc.capture_dependencies(outer):
        a = zc.Variable(np.zeros(1), name="a")
        with zc.capture_dependencies(inner):
            b = zc.Variable(np.zeros(1), name="b")
        c = zc.Variable(np.zeros(1), name="c")
    assert outer._checkpoint_dependencies() == [("a", a), ("c", c)]
    assert inner._checkpoint_dependencies() == [("b", b)]


def test_capture_duplicate_name_raises() -> None:
    template = zc.AutoTrackable()
    with zc.capture_dependencies(template):
        first = zc.Variable(np.zeros(1), name="w")
        with pytest.raises(DependencyNameError):
            zc.Variable(np.ones(1), name="w")
    assert template._checkpoint_dependencies() == [("w", first)]


def test_capture_name_clashing_with_existing_attribute_raises() -> None:
    template = zc.AutoTrackable()
    template.w = zc.Variable(np.zeros(1))
    existing = template.w
    with zc.capture_dependencies(template), pytest.raises(DependencyNameError):
        zc.Variable(np.zeros(1), name="w")
    assert template._lookup_dependency("w") is existing


def test_captured_variables_save_and_restore(tmp_path: Path) -> None:
    def build(seed: int) -> tuple[zc.AutoTrackable, zc.Variable, zc.Variable]:
        rng = np.random.default_rng(seed)
        template = zc.AutoTrackable()
        with zc.capture_dependencies(template):
            w = zc.Variable(rng.standard_normal((3, 2)).astype(np.float32), name="kernel")
            b = zc.Variable(rng.standard_normal(2).astype(np.float32), name="bias/0")
        return template, w, b

    template, w, b = build(1)
    path = zc.Checkpoint(t=template).write(tmp_path / "c")
    assert "t/kernel/.ATTRIBUTES/VARIABLE_VALUE" in saved_keys(path)
    fresh, w2, b2 = build(2)
    zc.Checkpoint(t=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(w2.numpy(), w.numpy())
    np.testing.assert_array_equal(b2.numpy(), b.numpy())


def test_captured_variable_created_after_restore_gets_value(tmp_path: Path) -> None:
    template = zc.AutoTrackable()
    with zc.capture_dependencies(template):
        zc.Variable(np.array([[1.0, 2.0]], np.float32), name="w")
    path = zc.Checkpoint(t=template).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    status = zc.Checkpoint(t=fresh).read(path)
    with pytest.raises(MatchError):
        status.assert_consumed()
    with zc.capture_dependencies(fresh):
        late = zc.Variable(np.zeros((1, 2), np.float32), name="w")
    np.testing.assert_array_equal(late.numpy(), [[1.0, 2.0]])
    status.assert_consumed()


def test_captured_variable_shape_mismatch_raises_at_creation(tmp_path: Path) -> None:
    template = zc.AutoTrackable()
    with zc.capture_dependencies(template):
        zc.Variable(np.array([1.0, 2.0], np.float32), name="w")
    path = zc.Checkpoint(t=template).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    status = zc.Checkpoint(t=fresh).read(path)
    with zc.capture_dependencies(fresh):
        with pytest.raises(ShapeMismatchError):
            zc.Variable(np.zeros(3, np.float32), name="w")
        assert fresh._lookup_dependency("w") is None
        good = zc.Variable(np.zeros(2, np.float32), name="w")
    np.testing.assert_array_equal(good.numpy(), [1.0, 2.0])
    status.assert_consumed()


def test_capture_does_not_leak_into_other_threads() -> None:
    template = zc.AutoTrackable()
    created: list[zc.Variable] = []
    with zc.capture_dependencies(template):
        thread = threading.Thread(
            target=lambda: created.append(zc.Variable(np.zeros(1), name="other_thread"))
        )
        thread.start()
        thread.join()
    assert len(created) == 1
    assert template._checkpoint_dependencies() == []
