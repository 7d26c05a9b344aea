"""Trackable, AutoTrackable, NoDependency, graph traversal, name escaping and Variable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Dense
from zarrckpt.errors import (
    DependencyNameError,
    DTypeMismatchError,
    InvalidKeyError,
    NonAppendMutationError,
    ShapeMismatchError,
    UnsavedValueWarning,
    UnsupportedDTypeError,
)


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    """Every saved key of the checkpoint at ``path``, read from its record."""
    data = (Path(path) / "object_graph.msgpack").read_bytes()
    graph = zc.ObjectGraph.decode(data)
    return [attribute.key for _, attribute in graph.attributes()]


def record(path: str | os.PathLike[str]) -> zc.ObjectGraph:
    return zc.ObjectGraph.decode((Path(path) / "object_graph.msgpack").read_bytes())


def deps(obj: zc.Trackable) -> dict[str, zc.Trackable]:
    return dict(obj._checkpoint_dependencies())


def var(values: object, dtype: object = np.float32) -> zc.Variable:
    return zc.Variable(np.asarray(values, dtype=dtype))


# Explicit tracking --------------------------------------------------------------------------


class Pair(zc.Trackable):
    def __init__(self, a: zc.Trackable, b: zc.Trackable) -> None:
        self._track_trackable(a, "a")
        self._track_trackable(b, "b")


def test_track_trackable_adds_named_dependencies_in_order() -> None:
    a, b = var([1.0]), var([2.0])
    pair = Pair(a, b)
    assert pair._checkpoint_dependencies() == [("a", a), ("b", b)]
    assert pair._lookup_dependency("a") is a
    assert pair._lookup_dependency("missing") is None


def test_track_trackable_returns_the_tracked_object() -> None:
    holder = zc.Trackable()
    v = var([1.0])
    assert holder._track_trackable(v, "v") is v


def test_track_trackable_name_conflict_raises_and_keeps_the_original() -> None:
    a, b = var([1.0]), var([2.0])
    pair = Pair(a, b)
    other = var([3.0])
    with pytest.raises(DependencyNameError, match="'a'"):
        pair._track_trackable(other, "a")
    assert pair._lookup_dependency("a") is a
    assert [name for name, _ in pair._checkpoint_dependencies()] == ["a", "b"]


def test_track_trackable_same_object_same_name_is_not_a_conflict() -> None:
    a, b = var([1.0]), var([2.0])
    pair = Pair(a, b)
    assert pair._track_trackable(a, "a") is a
    assert pair._checkpoint_dependencies() == [("a", a), ("b", b)]


def test_track_trackable_overwrite_replaces(tmp_path: Path) -> None:
    a, b = var([1.0]), var([2.0])
    pair = Pair(a, b)
    replacement = var([7.0, 8.0])
    pair._track_trackable(replacement, "a", overwrite=True)
    assert pair._lookup_dependency("a") is replacement
    path = zc.Checkpoint(p=pair).write(tmp_path / "c")
    fresh = Pair(var([0.0, 0.0]), var([0.0]))
    zc.Checkpoint(p=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh._lookup_dependency("a").numpy(), [7.0, 8.0])
    np.testing.assert_array_equal(fresh._lookup_dependency("b").numpy(), [2.0])


def test_track_trackable_rejects_non_trackables_and_non_string_names() -> None:
    holder = zc.Trackable()
    with pytest.raises(TypeError):
        holder._track_trackable(np.zeros(3), "x")  # type: ignore[arg-type]
    with pytest.raises(DependencyNameError):
        holder._track_trackable(var([1.0]), 3)  # type: ignore[arg-type]
    assert holder._checkpoint_dependencies() == []


def test_plain_trackable_does_not_track_attributes() -> None:
    holder = zc.Trackable()
    holder.v = var([1.0])
    assert holder._checkpoint_dependencies() == []


# AutoTrackable ------------------------------------------------------------------------------


def test_attribute_assignment_tracks_under_attribute_name() -> None:
    layer = Dense(2, 3)
    assert [name for name, _ in layer._checkpoint_dependencies()] == ["kernel", "bias"]
    assert layer._lookup_dependency("kernel") is layer.kernel
    assert layer._lookup_dependency("bias") is layer.bias


def test_reassigning_trackable_attribute_replaces_dependency(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.w = var([1.0])
    second = var([5.0, 6.0])
    obj.w = second
    assert obj._lookup_dependency("w") is second
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert saved_keys(path) == ["o/w/.ATTRIBUTES/VARIABLE_VALUE"]
    fresh = zc.AutoTrackable()
    fresh.w = var([0.0, 0.0])
    zc.Checkpoint(o=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.w.numpy(), [5.0, 6.0])


def test_reassigning_non_trackable_removes_dependency(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.w = var([1.0])
    obj.keep = var([2.0])
    obj.w = 3
    assert obj.w == 3
    assert obj._lookup_dependency("w") is None
    assert [name for name, _ in obj._checkpoint_dependencies()] == ["keep"]
    with pytest.warns(UnsavedValueWarning, match=r"not saved: o\.w \(int\)\."):
        path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert saved_keys(path) == ["o/keep/.ATTRIBUTES/VARIABLE_VALUE"]


def test_del_removes_dependency(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.w = var([1.0])
    obj.keep = var([2.0])
    del obj.w
    assert not hasattr(obj, "w")
    assert obj._lookup_dependency("w") is None
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert saved_keys(path) == ["o/keep/.ATTRIBUTES/VARIABLE_VALUE"]


def test_no_dependency_stores_value_itself_untracked(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    hidden = var([9.0])
    hidden_list = [var([1.0])]
    obj.cache = zc.NoDependency(hidden)
    obj.plain = zc.NoDependency(hidden_list)
    obj.kept = var([2.0])
    assert obj.cache is hidden
    assert obj.plain is hidden_list
    assert type(obj.plain) is list
    assert obj._lookup_dependency("cache") is None
    assert obj._lookup_dependency("plain") is None
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert saved_keys(path) == ["o/kept/.ATTRIBUTES/VARIABLE_VALUE"]
    graph = record(path)
    assert [c.name for c in graph.nodes[1].children] == ["kept"]
    assert all(hidden is not o for o in zc.list_objects(obj))


def test_no_dependency_over_tracked_attribute_untracks_it(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    first = var([1.0])
    obj.w = first
    obj.w = zc.NoDependency(first)
    assert obj.w is first
    assert obj._lookup_dependency("w") is None
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert saved_keys(path) == []


def test_lists_and_dicts_become_trackable_copies(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    a, b = var([1.0]), var([2.0])
    original_list = [a]
    original_dict = {"b": b}
    obj.items = original_list
    obj.table = original_dict
    assert isinstance(obj.items, zc.List)
    assert isinstance(obj.table, zc.Dict)
    assert obj.items is not original_list
    assert obj.table is not original_dict
    assert obj._lookup_dependency("items") is obj.items
    assert obj._lookup_dependency("table") is obj.table
    # Changes through the attribute are tracked; the originals are left as they were.
    obj.items.append(var([5.0]))
    assert len(original_list) == 1
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        "o/items/0/.ATTRIBUTES/VARIABLE_VALUE",
        "o/items/1/.ATTRIBUTES/VARIABLE_VALUE",
        "o/table/b/.ATTRIBUTES/VARIABLE_VALUE",
    ]


def test_changing_an_assigned_plain_container_afterwards_refuses_to_save(tmp_path: Path) -> None:
    # The attribute holds a copy: a change to the original would be silently
    # left out of the checkpoint, so the save raises instead.
    obj = zc.AutoTrackable()
    layers = [var([1.0])]
    heads = {"a": var([2.0])}
    obj.layers, obj.heads = layers, heads
    layers.append(var([3.0]))
    with pytest.raises(NonAppendMutationError, match=r"'o/layers'.*plain list.*changed"):
        zc.Checkpoint(o=obj).write(tmp_path / "a")
    obj.layers = layers  # assigned again: tracked as it is now
    heads["b"] = var([4.0])
    with pytest.raises(NonAppendMutationError, match=r"'o/heads'.*plain dict"):
        zc.Checkpoint(o=obj).write(tmp_path / "b")
    obj.heads = heads
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        "o/heads/a/.ATTRIBUTES/VARIABLE_VALUE",
        "o/heads/b/.ATTRIBUTES/VARIABLE_VALUE",
        "o/layers/0/.ATTRIBUTES/VARIABLE_VALUE",
        "o/layers/1/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    assert not list(tmp_path.glob("[ab]*")) and not list(tmp_path.glob(".*"))
    # A list of plain values may change freely: nothing would be lost.
    names = ["x"]
    obj.names = names
    names.append("y")
    zc.Checkpoint(o=obj).write(tmp_path / "d")


def test_trackables_only_in_tuples_are_reported_as_not_saved(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.kept = var([1.0])
    obj.pair = (obj.kept, var([2.0]))  # the second one is reachable only through the tuple
    obj.aliases = (obj.kept,)  # saved anyway: no warning for this one
    with pytest.warns(UserWarning, match=r"not saved: o\.pair\. Assign a list") as info:
        path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert [w.filename for w in info if "tuples or sets" in str(w.message)] == [__file__]
    assert saved_keys(path) == ["o/kept/.ATTRIBUTES/VARIABLE_VALUE"]
    with pytest.warns(UserWarning, match=r"o\.pair") as info:
        zc.Checkpoint(o=obj).save(tmp_path / "run")  # one call deeper: still named here
    assert [w.filename for w in info if "tuples or sets" in str(w.message)] == [__file__]


def test_nested_plain_containers_are_wrapped_recursively(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.nested = [[var([1.0])], {"k": var([2.0, 3.0])}]
    assert isinstance(obj.nested[0], zc.List)
    assert isinstance(obj.nested[1], zc.Dict)
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        "o/nested/0/0/.ATTRIBUTES/VARIABLE_VALUE",
        "o/nested/1/k/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    fresh = zc.AutoTrackable()
    fresh.nested = [[var([0.0])], {"k": var([0.0, 0.0])}]
    zc.Checkpoint(o=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.nested[0][0].numpy(), [1.0])
    np.testing.assert_array_equal(fresh.nested[1]["k"].numpy(), [2.0, 3.0])


# Traversal ----------------------------------------------------------------------------------


def test_list_objects_is_breadth_first_root_first() -> None:
    root = zc.AutoTrackable()
    root.a = zc.AutoTrackable()
    root.b = zc.AutoTrackable()
    root.a.x = var([1.0])
    root.a.y = var([2.0])
    root.b.z = var([3.0])
    root.c = var([4.0])
    expected = [root, root.a, root.b, root.c, root.a.x, root.a.y, root.b.z]
    objects = zc.list_objects(root)
    assert len(objects) == len(expected)
    assert all(got is want for got, want in zip(objects, expected, strict=True))


def test_object_reached_by_two_paths_is_listed_and_saved_once(tmp_path: Path) -> None:
    shared = var([1.0, 2.0])
    root = zc.AutoTrackable()
    root.first = zc.AutoTrackable()
    root.second = zc.AutoTrackable()
    root.first.w = shared
    root.second.w = shared
    objects = zc.list_objects(root)
    assert sum(o is shared for o in objects) == 1
    assert len(objects) == 4
    path = zc.Checkpoint(r=root).write(tmp_path / "c")
    assert saved_keys(path) == ["r/first/w/.ATTRIBUTES/VARIABLE_VALUE"]
    graph = record(path)
    first_child = {c.name: c.node_id for c in graph.nodes[0].children}["r"]
    children = {c.name: c.node_id for c in graph.nodes[first_child].children}
    first_w = {c.name: c.node_id for c in graph.nodes[children["first"]].children}["w"]
    second_w = {c.name: c.node_id for c in graph.nodes[children["second"]].children}["w"]
    assert first_w == second_w


def test_shared_object_restores_through_either_path(tmp_path: Path) -> None:
    shared = var([1.0, 2.0])
    root = zc.AutoTrackable()
    root.first = zc.AutoTrackable()
    root.second = zc.AutoTrackable()
    root.first.w = shared
    root.second.w = shared
    path = zc.Checkpoint(r=root).write(tmp_path / "c")
    # The new program only reaches the variable through the second path.
    fresh = zc.AutoTrackable()
    fresh.second = zc.AutoTrackable()
    fresh.second.w = var([0.0, 0.0])
    zc.Checkpoint(r=fresh).read(path).expect_partial()
    np.testing.assert_array_equal(fresh.second.w.numpy(), [1.0, 2.0])


def test_cycles_terminate_and_save(tmp_path: Path) -> None:
    a = zc.AutoTrackable()
    b = zc.AutoTrackable()
    a.b = b
    b.a = a
    a.w = var([1.0])
    b.w = var([2.0])
    objects = zc.list_objects(a)
    assert len(objects) == 4
    assert objects[0] is a
    assert objects[1] is b
    path = zc.Checkpoint(a=a).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        "a/b/w/.ATTRIBUTES/VARIABLE_VALUE",
        "a/w/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    a2, b2 = zc.AutoTrackable(), zc.AutoTrackable()
    a2.b = b2
    b2.a = a2
    a2.w = var([0.0])
    b2.w = var([0.0])
    zc.Checkpoint(a=a2).read(path).assert_consumed()
    np.testing.assert_array_equal(a2.w.numpy(), [1.0])
    np.testing.assert_array_equal(b2.w.numpy(), [2.0])


def test_self_cycle_terminates() -> None:
    a = zc.AutoTrackable()
    a.me = a
    assert zc.list_objects(a) == [a]


def test_shortest_path_names_the_key(tmp_path: Path) -> None:
    shared = var([3.0])
    root = zc.AutoTrackable()
    root.deep = zc.AutoTrackable()
    root.deep.deeper = zc.AutoTrackable()
    root.deep.deeper.w = shared
    root.short = shared
    path = zc.Checkpoint(r=root).write(tmp_path / "c")
    assert saved_keys(path) == ["r/short/.ATTRIBUTES/VARIABLE_VALUE"]


def test_shortest_path_ties_go_to_the_dependency_added_first(tmp_path: Path) -> None:
    shared = var([3.0])
    root = zc.AutoTrackable()
    root.zeta = zc.AutoTrackable()
    root.alpha = zc.AutoTrackable()
    root.zeta.w = shared
    root.alpha.w = shared
    path = zc.Checkpoint(r=root).write(tmp_path / "c")
    assert saved_keys(path) == ["r/zeta/w/.ATTRIBUTES/VARIABLE_VALUE"]


# Names that need escaping -------------------------------------------------------------------

AWKWARD_NAMES = [
    "a/b",
    "a~2Fb",
    "..",
    ".",
    "",
    "x y",
    "naïve",
    "日本",
    "__init",
    ".ATTRIBUTES",
    ".OPTIMIZER_SLOT",
    "zarr.json",
    "_COMMIT",
    "object_graph.msgpack",
    "/leading",
    "trailing.",
    "~",
    "~7E",
    "c/0",
    "A",
]


def _holder_with(names: list[str], offset: float) -> zc.Trackable:
    holder = zc.Trackable()
    for i, name in enumerate(names):
        holder._track_trackable(zc.Variable(np.full(2, offset + i, np.float64)), name)
    return holder


def test_awkward_names_give_safe_distinct_keys(tmp_path: Path) -> None:
    path = zc.Checkpoint(h=_holder_with(AWKWARD_NAMES, 0.0)).write(tmp_path / "c")
    keys = saved_keys(path)
    assert len(keys) == len(AWKWARD_NAMES)
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert not key.startswith("/")
        components = key.split("/")
        assert components[-2:] == [".ATTRIBUTES", "VARIABLE_VALUE"]
        for component in components[:-2]:
            assert component not in ("", ".", "..")
            assert not component.startswith("__")
            assert component not in (".ATTRIBUTES", ".OPTIMIZER_SLOT")
            assert component not in ("zarr.json", "_COMMIT", "object_graph.msgpack")
            assert not component.startswith(".")
            assert not component.endswith(".")
        # Every key is an array directory strictly inside the checkpoint.
        target = (Path(path) / key).resolve()
        assert target.is_dir()
        assert Path(path).resolve() in target.parents
    # The record keeps the original names.
    graph = record(path)
    holder_id = graph.nodes[0].children[0].node_id
    assert [c.name for c in graph.nodes[holder_id].children] == AWKWARD_NAMES


def test_awkward_names_restore_to_the_right_objects(tmp_path: Path) -> None:
    path = zc.Checkpoint(h=_holder_with(AWKWARD_NAMES, 10.0)).write(tmp_path / "c")
    # Track in reverse order so that positional matching would give wrong values.
    fresh = zc.Trackable()
    for name in reversed(AWKWARD_NAMES):
        fresh._track_trackable(zc.Variable(np.zeros(2, np.float64)), name)
    zc.Checkpoint(h=fresh).read(path).assert_consumed()
    for i, name in enumerate(AWKWARD_NAMES):
        np.testing.assert_array_equal(
            fresh._lookup_dependency(name).numpy(), np.full(2, 10.0 + i), err_msg=repr(name)
        )


def test_escaped_lookalike_sibling_names_do_not_collide(tmp_path: Path) -> None:
    holder = zc.Trackable()
    holder._track_trackable(var([1.0]), "a/b")
    holder._track_trackable(var([2.0]), "a~2Fb")
    holder._track_trackable(var([3.0]), "a")
    path = zc.Checkpoint(h=holder).write(tmp_path / "c")
    assert len(set(saved_keys(path))) == 3
    fresh = zc.Trackable()
    fresh._track_trackable(var([0.0]), "a~2Fb")
    fresh._track_trackable(var([0.0]), "a")
    fresh._track_trackable(var([0.0]), "a/b")
    zc.Checkpoint(h=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh._lookup_dependency("a/b").numpy(), [1.0])
    np.testing.assert_array_equal(fresh._lookup_dependency("a~2Fb").numpy(), [2.0])
    np.testing.assert_array_equal(fresh._lookup_dependency("a").numpy(), [3.0])


def test_name_with_slash_is_not_a_path(tmp_path: Path) -> None:
    # "a/b" as one name must not be confused with dependency "b" of dependency "a".
    flat = zc.Trackable()
    flat._track_trackable(var([1.0]), "a/b")
    nested = zc.AutoTrackable()
    nested.a = zc.AutoTrackable()
    nested.a.b = var([2.0])
    path = zc.Checkpoint(x=flat, y=nested).write(tmp_path / "c")
    keys = saved_keys(path)
    assert "y/a/b/.ATTRIBUTES/VARIABLE_VALUE" in keys
    assert "x/a/b/.ATTRIBUTES/VARIABLE_VALUE" not in keys
    fresh_flat = zc.Trackable()
    fresh_flat._track_trackable(var([0.0]), "a/b")
    fresh_nested = zc.AutoTrackable()
    fresh_nested.a = zc.AutoTrackable()
    fresh_nested.a.b = var([0.0])
    zc.Checkpoint(x=fresh_flat, y=fresh_nested).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh_flat._lookup_dependency("a/b").numpy(), [1.0])
    np.testing.assert_array_equal(fresh_nested.a.b.numpy(), [2.0])


def test_plain_names_appear_unescaped(tmp_path: Path) -> None:
    holder = zc.Trackable()
    holder._track_trackable(var([1.0]), "dense_1")
    holder._track_trackable(var([1.0]), "layers.0.weight")
    holder._track_trackable(var([1.0]), "x-y")
    path = zc.Checkpoint(h=holder).write(tmp_path / "c")
    assert saved_keys(path) == [
        "h/dense_1/.ATTRIBUTES/VARIABLE_VALUE",
        "h/layers.0.weight/.ATTRIBUTES/VARIABLE_VALUE",
        "h/x-y/.ATTRIBUTES/VARIABLE_VALUE",
    ]


# Deferred restoration on attributes ---------------------------------------------------------


def test_attribute_assigned_after_restore_gets_saved_value(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.w = var([[1.0, 2.0], [3.0, 4.0]])
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    status = zc.Checkpoint(o=fresh).read(path)
    late = var(np.zeros((2, 2)))
    fresh.w = late
    np.testing.assert_array_equal(late.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    status.assert_consumed()


def test_deferred_attach_shape_mismatch_raises_at_assignment(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.w = var([1.0, 2.0, 3.0])
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    status = zc.Checkpoint(o=fresh).read(path)
    wrong = var([0.0, 0.0])
    with pytest.raises(ShapeMismatchError):
        fresh.w = wrong
    np.testing.assert_array_equal(wrong.numpy(), [0.0, 0.0])
    assert fresh._lookup_dependency("w") is None
    assert not hasattr(fresh, "w")
    # The saved value still waits for a compatible object.
    right = var([0.0, 0.0, 0.0])
    fresh.w = right
    np.testing.assert_array_equal(right.numpy(), [1.0, 2.0, 3.0])
    status.assert_consumed()


# Variable -----------------------------------------------------------------------------------


def test_variable_numpy_is_the_live_buffer() -> None:
    v = var([1.0, 2.0, 3.0])
    buffer = v.numpy()
    assert v.numpy() is buffer
    buffer[1] = 20.0
    np.testing.assert_array_equal(v.numpy(), [1.0, 20.0, 3.0])
    assert np.shares_memory(buffer, v.numpy())


def test_variable_copies_its_initial_value() -> None:
    initial = np.array([1.0, 2.0], np.float32)
    v = zc.Variable(initial)
    assert not np.shares_memory(initial, v.numpy())
    initial[0] = 100.0
    np.testing.assert_array_equal(v.numpy(), [1.0, 2.0])


def test_variable_dtype_argument_and_properties() -> None:
    v = zc.Variable([[1, 2, 3]], dtype=np.int16, name="counts")
    assert v.dtype == np.dtype(np.int16)
    assert v.shape == (1, 3)
    assert v.nbytes == 6
    assert v.name == "counts"
    assert v.numpy().flags.c_contiguous


def test_variable_non_native_byte_order_is_made_native() -> None:
    v = zc.Variable(np.array([1, 256], dtype=">i4"))
    assert v.dtype.isnative
    np.testing.assert_array_equal(v.numpy(), [1, 256])


def test_variable_assign_keeps_identity_and_memory() -> None:
    v = var(np.zeros((2, 3)))
    buffer = v.numpy()
    result = v.assign(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert result is v
    assert v.numpy() is buffer
    np.testing.assert_array_equal(buffer, np.arange(6, dtype=np.float32).reshape(2, 3))
    v.assign_add(np.ones((2, 3), np.float32))
    v.assign_sub(np.full((2, 3), 0.5, np.float32))
    assert v.numpy() is buffer
    np.testing.assert_array_equal(buffer, np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5)


@pytest.mark.parametrize("bad", [np.zeros(6), np.zeros((3, 2)), np.zeros((2, 3, 1)), 1.0])
def test_variable_assign_other_shape_raises_and_changes_nothing(bad: object) -> None:
    v = var(np.arange(6).reshape(2, 3))
    buffer = v.numpy()
    with pytest.raises(ShapeMismatchError):
        v.assign(bad)
    assert v.numpy() is buffer
    np.testing.assert_array_equal(v.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize(
    "value",
    [
        np.array([object(), object()], dtype=object),
        np.array(["a", "bc"]),
        np.array([b"a", b"bc"]),
        ["a", "b"],
        np.zeros(2, dtype=[("x", np.float32), ("y", np.int32)]),
    ],
)
def test_variable_unsupported_dtypes_raise_at_creation(value: object) -> None:
    with pytest.raises(UnsupportedDTypeError):
        zc.Variable(value)


def test_variable_unsupported_dtype_argument_raises() -> None:
    with pytest.raises(UnsupportedDTypeError):
        zc.Variable([1, 2], dtype=object)


def test_restore_writes_into_the_existing_buffer(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.w = zc.Variable(np.arange(12, dtype=np.float64).reshape(3, 4))
    obj.i = zc.Variable(np.array([-1, 2**40], np.int64))
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    fresh.w = zc.Variable(np.zeros((3, 4)))
    fresh.i = zc.Variable(np.zeros(2, np.int64))
    w_before, i_before = fresh.w.numpy(), fresh.i.numpy()
    zc.Checkpoint(o=fresh).read(path).assert_consumed()
    assert fresh.w.numpy() is w_before
    assert fresh.i.numpy() is i_before
    np.testing.assert_array_equal(w_before, np.arange(12, dtype=np.float64).reshape(3, 4))
    np.testing.assert_array_equal(i_before, [-1, 2**40])


def test_restore_shape_mismatch_raises_and_changes_nothing(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.a = var([1.0, 2.0])
    obj.b = var([3.0, 4.0, 5.0])
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    fresh.a = var([0.0, 0.0])
    fresh.b = var([0.0, 0.0])
    with pytest.raises(ShapeMismatchError):
        zc.Checkpoint(o=fresh).read(path)
    np.testing.assert_array_equal(fresh.a.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(fresh.b.numpy(), [0.0, 0.0])


def test_variable_round_trip_is_bit_exact(tmp_path: Path) -> None:
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    obj = zc.AutoTrackable()
    obj.w = zc.Variable(special)
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    fresh.w = zc.Variable(np.ones(6, np.float32))
    zc.Checkpoint(o=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh.w.numpy().view(np.uint32), special.view(np.uint32))


def test_aliases_of_trackable_classes() -> None:
    assert zc.CheckpointableBase is zc.Trackable
    assert zc.Checkpointable is zc.AutoTrackable
    assert issubclass(zc.AutoTrackable, zc.Trackable)
    assert issubclass(zc.Variable, zc.Trackable)


def test_numpy_array_protocol_exposes_the_live_buffer() -> None:
    v = var([1.0, 2.0])
    assert np.shares_memory(np.asarray(v), v.numpy())
    copy = np.array(v, dtype=np.float64)
    assert not np.shares_memory(copy, v.numpy())
    np.testing.assert_array_equal(copy, [1.0, 2.0])


def test_variable_assign_unsafe_cast_raises_and_changes_nothing() -> None:
    v = zc.Variable(np.array([1, 2], np.int32))
    with pytest.raises(TypeError):
        v.assign(np.array([1.5, 2.5]))
    np.testing.assert_array_equal(v.numpy(), [1, 2])


def test_restore_dtype_mismatch_raises_and_changes_nothing(tmp_path: Path) -> None:
    obj = zc.AutoTrackable()
    obj.a = zc.Variable(np.array([1.0, 2.0], np.float32))
    obj.b = zc.Variable(np.array([1.0, 2.0], np.float64))
    path = zc.Checkpoint(o=obj).write(tmp_path / "c")
    fresh = zc.AutoTrackable()
    fresh.a = zc.Variable(np.zeros(2, np.float32))
    fresh.b = zc.Variable(np.zeros(2, np.float32))
    with pytest.raises(DTypeMismatchError):
        zc.Checkpoint(o=fresh).read(path)
    np.testing.assert_array_equal(fresh.a.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(fresh.b.numpy(), [0.0, 0.0])


def test_later_restore_wins_for_deferred_objects(tmp_path: Path) -> None:
    def save(value: float, name: str) -> str:
        obj = zc.AutoTrackable()
        obj.w = var([value])
        return zc.Checkpoint(o=obj).write(tmp_path / name)

    first, second = save(1.0, "first"), save(2.0, "second")
    fresh = zc.AutoTrackable()
    ckpt = zc.Checkpoint(o=fresh)
    ckpt.read(first)
    ckpt.read(second)
    late = var([0.0])
    fresh.w = late
    np.testing.assert_array_equal(late.numpy(), [2.0])

    other = zc.AutoTrackable()
    ckpt2 = zc.Checkpoint(o=other)
    ckpt2.read(second)
    ckpt2.read(first)
    other.w = var([0.0])
    np.testing.assert_array_equal(other.w.numpy(), [1.0])


def test_overlong_name_is_rejected_and_nothing_written(tmp_path: Path) -> None:
    holder = zc.Trackable()
    holder._track_trackable(var([1.0]), "n" * 300)
    target = tmp_path / "c"
    with pytest.raises(InvalidKeyError):
        zc.Checkpoint(h=holder).write(target)
    assert list(tmp_path.iterdir()) == []
