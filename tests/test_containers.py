"""Trackable containers: List and Dict (alias Mapping)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Dense, Model
from zarrckpt.errors import DependencyNameError, MatchError, NonAppendMutationError


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    graph = zc.ObjectGraph.decode((Path(path) / "object_graph.msgpack").read_bytes())
    return [attribute.key for _, attribute in graph.attributes()]


def var(values: object) -> zc.Variable:
    return zc.Variable(np.asarray(values, dtype=np.float32))


def dep_names(obj: zc.Trackable) -> list[str]:
    return [name for name, _ in obj._checkpoint_dependencies()]


# List ---------------------------------------------------------------------------------------


def test_list_append_and_extend_track_by_index() -> None:
    a, b, c, d = var([0.0]), var([1.0]), var([2.0]), var([3.0])
    items = zc.List([a])
    items.append(b)
    items.extend([c])
    items += [d]
    assert items._checkpoint_dependencies() == [("0", a), ("1", b), ("2", c), ("3", d)]
    assert len(items) == 4
    assert items[2] is c
    assert list(items) == [a, b, c, d]


def test_list_names_are_positions_including_plain_values(tmp_path: Path) -> None:
    v = var([5.0])
    items = zc.List(["text", 3, v])
    assert items._checkpoint_dependencies() == [("2", v)]
    path = zc.Checkpoint(items=items).write(tmp_path / "c")
    assert saved_keys(path) == ["items/2/.ATTRIBUTES/VARIABLE_VALUE"]


def test_list_round_trip(tmp_path: Path) -> None:
    items = zc.List([var([1.0, 2.0]), var([3.0])])
    path = zc.Checkpoint(items=items).write(tmp_path / "c")
    assert saved_keys(path) == [
        "items/0/.ATTRIBUTES/VARIABLE_VALUE",
        "items/1/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    fresh = zc.List([var([0.0, 0.0]), var([0.0])])
    zc.Checkpoint(items=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh[0].numpy(), [1.0, 2.0])
    np.testing.assert_array_equal(fresh[1].numpy(), [3.0])


def test_list_equality_and_repr() -> None:
    items = zc.List([1, 2])
    assert items == [1, 2]
    assert items == zc.List([1, 2])
    assert items != [2, 1]
    assert repr(items) == "List([1, 2])"


MUTATIONS: dict[str, Callable[[zc.List], None]] = {
    "replace": lambda items: items.__setitem__(0, var([9.0])),
    "slice assignment": lambda items: items.__setitem__(slice(0, 1), [var([9.0])]),
    "delete": lambda items: items.__delitem__(0),
    "delete last": lambda items: items.__delitem__(-1),
    "insert before": lambda items: items.insert(0, var([9.0])),
    "sort": lambda items: items.sort(key=lambda v: -float(v.numpy()[0])),
    "reverse": lambda items: items.reverse(),
    "pop": lambda items: items.pop(0),
    "remove": lambda items: items.remove(items[0]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_non_append_mutation_blocks_saving(tmp_path: Path, mutation: str) -> None:
    model = zc.AutoTrackable()
    model.layers = [var([1.0]), var([2.0]), var([3.0])]
    MUTATIONS[mutation](model.layers)
    target = tmp_path / "c"
    with pytest.raises(NonAppendMutationError, match="m/layers"):
        zc.Checkpoint(m=model).write(target)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_non_append_mutation_message_names_nested_list_path(tmp_path: Path) -> None:
    model = Model()
    model.layers.reverse()
    with pytest.raises(NonAppendMutationError, match="net/layers"):
        zc.Checkpoint(net=model).write(tmp_path / "c")


def test_non_append_mutation_at_root_is_reported(tmp_path: Path) -> None:
    items = zc.List([var([1.0]), var([2.0])])
    del items[0]
    assert len(zc.list_objects(items)) == 2  # traversal alone is fine, saving is not
    with pytest.raises(NonAppendMutationError):
        zc.Checkpoint(items=items).write(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_list_mutation_renames_dependencies() -> None:
    a, b, c = var([1.0]), var([2.0]), var([3.0])
    items = zc.List([a, b, c])
    items.reverse()
    assert items._checkpoint_dependencies() == [("0", c), ("1", b), ("2", a)]
    del items[0]
    assert items._checkpoint_dependencies() == [("0", b), ("1", a)]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutating_list_of_plain_values_does_not_block_saving(tmp_path: Path, mutation: str) -> None:
    model = zc.AutoTrackable()
    model.sizes = [3.0, 1.0, 2.0]
    model.w = var([4.0])
    # Plain-value version of each mutation.
    plain: dict[str, Callable[[zc.List], None]] = {
        "replace": lambda items: items.__setitem__(0, 7.0),
        "slice assignment": lambda items: items.__setitem__(slice(0, 1), [7.0, 8.0]),
        "delete": lambda items: items.__delitem__(0),
        "delete last": lambda items: items.__delitem__(-1),
        "insert before": lambda items: items.insert(0, 7.0),
        "sort": lambda items: items.sort(),
        "reverse": lambda items: items.reverse(),
        "pop": lambda items: items.pop(0),
        "remove": lambda items: items.remove(1.0),
    }
    plain[mutation](model.sizes)
    path = zc.Checkpoint(m=model).write(tmp_path / "c")
    assert saved_keys(path) == ["m/w/.ATTRIBUTES/VARIABLE_VALUE"]


def test_trackable_appended_after_plain_mutation_is_saved(tmp_path: Path) -> None:
    items = zc.List([1, 2, 3])
    items.reverse()
    del items[0]
    items.append(var([6.0]))
    assert dep_names(items) == ["2"]
    path = zc.Checkpoint(items=items).write(tmp_path / "c")
    assert saved_keys(path) == ["items/2/.ATTRIBUTES/VARIABLE_VALUE"]


def test_insert_at_end_is_an_append(tmp_path: Path) -> None:
    items = zc.List([var([1.0])])
    items.insert(1, var([2.0]))
    items.insert(100, var([3.0]))
    assert dep_names(items) == ["0", "1", "2"]
    path = zc.Checkpoint(items=items).write(tmp_path / "c")
    assert len(saved_keys(path)) == 3


def test_append_after_restore_triggers_deferred_restoration(tmp_path: Path) -> None:
    saved = zc.List([var([1.0, 1.5]), var([2.0, 2.5]), var([3.0, 3.5])])
    path = zc.Checkpoint(items=saved).write(tmp_path / "c")
    first = var([0.0, 0.0])
    fresh = zc.List([first])
    status = zc.Checkpoint(items=fresh).read(path)
    np.testing.assert_array_equal(first.numpy(), [1.0, 1.5])
    with pytest.raises(MatchError):
        status.assert_consumed()
    second, third = var([0.0, 0.0]), var([0.0, 0.0])
    fresh.append(second)
    np.testing.assert_array_equal(second.numpy(), [2.0, 2.5])
    fresh.append(third)
    np.testing.assert_array_equal(third.numpy(), [3.0, 3.5])
    status.assert_consumed()


def test_deferred_list_of_layers_restores_whole_subtrees(tmp_path: Path) -> None:
    model = Model(seed=3)
    path = zc.Checkpoint(m=model).write(tmp_path / "c")
    fresh = Model(seed=9)
    fresh.layers = []
    status = zc.Checkpoint(m=fresh).read(path)
    layer = Dense(6, 4, seed=42)
    fresh.layers.append(layer)
    np.testing.assert_array_equal(layer.kernel.numpy(), model.layers[0].kernel.numpy())
    np.testing.assert_array_equal(layer.bias.numpy(), model.layers[0].bias.numpy())
    fresh.layers.append(Dense(4, 2, seed=43))
    np.testing.assert_array_equal(fresh.layers[1].kernel.numpy(), model.layers[1].kernel.numpy())
    np.testing.assert_array_equal(fresh.embedding.numpy(), model.embedding.numpy())
    status.assert_consumed()


def test_list_no_dependency_element_is_untracked(tmp_path: Path) -> None:
    hidden = var([1.0])
    kept = var([2.0])
    items = zc.List()
    items.append(zc.NoDependency(hidden))
    items.append(kept)
    assert items[0] is hidden
    assert items._checkpoint_dependencies() == [("1", kept)]
    path = zc.Checkpoint(items=items).write(tmp_path / "c")
    assert saved_keys(path) == ["items/1/.ATTRIBUTES/VARIABLE_VALUE"]


def test_list_wrapped_element_containers(tmp_path: Path) -> None:
    items = zc.List()
    items.append([var([1.0])])
    items.append({"k": var([2.0])})
    items.append(zc.NoDependency([var([3.0])]))
    assert isinstance(items[0], zc.List)
    assert isinstance(items[1], zc.Dict)
    assert type(items[2]) is list
    assert dep_names(items) == ["0", "1"]
    path = zc.Checkpoint(items=items).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == [
        "items/0/0/.ATTRIBUTES/VARIABLE_VALUE",
        "items/1/k/.ATTRIBUTES/VARIABLE_VALUE",
    ]


# Dict ---------------------------------------------------------------------------------------


def test_dict_tracks_string_keys(tmp_path: Path) -> None:
    a, b = var([1.0]), var([2.0, 3.0])
    table = zc.Dict({"alpha": a}, beta=b)
    table["note"] = "plain"
    table[7] = "also plain"
    assert table._checkpoint_dependencies() == [("alpha", a), ("beta", b)]
    assert table["note"] == "plain"
    assert table[7] == "also plain"
    assert len(table) == 4
    path = zc.Checkpoint(table=table).write(tmp_path / "c")
    assert saved_keys(path) == [
        "table/alpha/.ATTRIBUTES/VARIABLE_VALUE",
        "table/beta/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    fresh = zc.Dict(beta=var([0.0, 0.0]), alpha=var([0.0]))
    zc.Checkpoint(table=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh["alpha"].numpy(), [1.0])
    np.testing.assert_array_equal(fresh["beta"].numpy(), [2.0, 3.0])


@pytest.mark.parametrize("key", [1, 2.5, ("a", "b"), None, b"bytes"])
def test_dict_non_string_key_for_trackable_raises(key: object) -> None:
    table = zc.Dict()
    with pytest.raises(DependencyNameError):
        table[key] = var([1.0])
    assert key not in table
    assert table._checkpoint_dependencies() == []


def test_dict_constructor_with_non_string_key_for_trackable_raises() -> None:
    with pytest.raises(DependencyNameError):
        zc.Dict({1: var([1.0])})


def test_dict_replace_is_allowed_and_saves_new_value(tmp_path: Path) -> None:
    table = zc.Dict(a=var([1.0]), b=var([2.0]))
    replacement = var([10.0, 11.0])
    table["a"] = replacement
    assert table._lookup_dependency("a") is replacement
    path = zc.Checkpoint(table=table).write(tmp_path / "c")
    fresh = zc.Dict(a=var([0.0, 0.0]), b=var([0.0]))
    zc.Checkpoint(table=fresh).read(path).assert_consumed()
    np.testing.assert_array_equal(fresh["a"].numpy(), [10.0, 11.0])
    np.testing.assert_array_equal(fresh["b"].numpy(), [2.0])


def test_dict_delete_is_allowed_and_removes_the_key(tmp_path: Path) -> None:
    table = zc.Dict(a=var([1.0]), b=var([2.0]))
    del table["a"]
    assert "a" not in table
    assert dep_names(table) == ["b"]
    path = zc.Checkpoint(table=table).write(tmp_path / "c")
    assert saved_keys(path) == ["table/b/.ATTRIBUTES/VARIABLE_VALUE"]
    table.pop("b")
    path2 = zc.Checkpoint(table=table).write(tmp_path / "c2")
    assert saved_keys(path2) == []


def test_dict_plain_value_over_trackable_untracks(tmp_path: Path) -> None:
    table = zc.Dict(a=var([1.0]), b=var([2.0]))
    table["a"] = 5
    assert dep_names(table) == ["b"]
    path = zc.Checkpoint(table=table).write(tmp_path / "c")
    assert saved_keys(path) == ["table/b/.ATTRIBUTES/VARIABLE_VALUE"]


def test_dict_no_dependency_value_is_untracked() -> None:
    table = zc.Dict()
    hidden = var([1.0])
    kept = var([2.0])
    table["h"] = zc.NoDependency(hidden)
    table["k"] = kept
    assert table["h"] is hidden
    assert table._checkpoint_dependencies() == [("k", kept)]


def test_dict_key_added_after_restore_gets_value(tmp_path: Path) -> None:
    table = zc.Dict(a=var([1.0]), late=var([4.0, 5.0]))
    path = zc.Checkpoint(table=table).write(tmp_path / "c")
    fresh = zc.Dict(a=var([0.0]))
    status = zc.Checkpoint(table=fresh).read(path)
    with pytest.raises(MatchError):
        status.assert_consumed()
    late = var([0.0, 0.0])
    fresh["late"] = late
    np.testing.assert_array_equal(late.numpy(), [4.0, 5.0])
    status.assert_consumed()


def test_dict_awkward_string_keys_round_trip(tmp_path: Path) -> None:
    names = ["a/b", "..", "", "x y", "ключ", "__init__", ".ATTRIBUTES"]
    table = zc.Dict({name: zc.Variable(np.full(3, i, np.int32)) for i, name in enumerate(names)})
    path = zc.Checkpoint(table=table).write(tmp_path / "c")
    assert len(set(saved_keys(path))) == len(names)
    fresh = zc.Dict({name: zc.Variable(np.zeros(3, np.int32)) for name in reversed(names)})
    zc.Checkpoint(table=fresh).read(path).assert_consumed()
    for i, name in enumerate(names):
        np.testing.assert_array_equal(fresh[name].numpy(), np.full(3, i, np.int32))


def test_mapping_alias_is_dict() -> None:
    assert zc.Mapping is zc.Dict
    table = zc.Mapping(x=var([1.0]))
    assert isinstance(table, zc.Dict)
    assert dep_names(table) == ["x"]
