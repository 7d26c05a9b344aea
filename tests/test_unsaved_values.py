"""The unsaved-value warning: one UnsavedValueWarning per save, naming what it leaves out.

Only trackables are dependencies (TensorFlow's rule), so numpy arrays, numbers and
tuples of arrays held in plain attributes, array elements of tracked lists and dicts,
Python numbers of a NumpyState and Trackables held only in tuples or sets are not
saved. The warning is the user's only signal: restore still passes ``assert_consumed``.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt.errors import UnsavedValueWarning

NUMERIC_HEAD = "values in plain attributes are not saved: "
NUMERIC_TAIL = (
    ". Hold arrays in zc.Variable(...) (or as attributes of a zc.NumpyState), numbers as "
    "numpy scalars of a NumpyState, or assign zc.NoDependency(value) to keep it out of "
    "checkpoints without this warning."
)
HIDDEN_HEAD = "Trackables held only in tuples or sets are not saved: "
HIDDEN_TAIL = ". Assign a list (tracked) instead."


class Module(zc.AutoTrackable):
    """A bare AutoTrackable; tests give it attributes."""


def next_line() -> int:
    """The line after the caller's current one: where the save call about to run is."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno + 1


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    """Every warning of any category raised inside, none filtered out."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def unsaved_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, UnsavedValueWarning)]


def numeric_items(message: str) -> list[str]:
    """The ``path (what)`` items of the numeric part of a warning message, in order."""
    assert message.startswith(NUMERIC_HEAD), message
    section = message[len(NUMERIC_HEAD) : message.index(NUMERIC_TAIL)]
    items = re.findall(r"(\S+ \([^()]+\))(?:, |$| and \d+ more$)", section)
    assert ", ".join(items) == re.sub(r" and \d+ more$", "", section), section
    return items


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    return [key for key, _, _ in zc.list_variables(path)]


def one_warning(caught: list[warnings.WarningMessage]) -> str:
    """The message of the only warning recorded, which must be an UnsavedValueWarning."""
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].category is UnsavedValueWarning
    return str(caught[0].message)


# Plain attributes ---------------------------------------------------------------------------


def test_plain_attribute_values_are_named_at_the_save_call(tmp_path: Path) -> None:
    m = Module()
    m.w = zc.Variable(np.zeros(3, np.float32))
    m.stats = np.zeros(4, np.float32)
    m.lr = 0.1
    m.steps = 3
    m.scale = np.float32(1)
    m.seen = np.int64(3)
    m.moments = (np.zeros(2), np.ones(2))
    m.training = True  # bools are flags, not state
    m.name = "dense"
    m.tag = np.str_("x")
    ckpt = zc.Checkpoint(m=m)
    ckpt.epoch = 7.5  # the root itself is scanned too
    with recorded() as caught:
        line = next_line()
        path = ckpt.save(tmp_path / "ckpt")
    message = one_warning(caught)
    assert caught[0].filename == __file__
    assert caught[0].lineno == line
    assert issubclass(UnsavedValueWarning, UserWarning)
    assert message == (
        NUMERIC_HEAD + "<root>.epoch (float), m.stats (numpy array float32[4]), m.lr (float), "
        "m.steps (int), m.scale (numpy scalar float32), m.seen (numpy scalar int64), "
        "m.moments (tuple of numpy arrays)" + NUMERIC_TAIL
    )
    # The warning is the only signal: none of these values is in the checkpoint.
    assert saved_keys(path) == [
        "m/w/.ATTRIBUTES/VARIABLE_VALUE",
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
    ]


def test_message_names_the_fixes(tmp_path: Path) -> None:
    m = Module()
    m.table = np.arange(3)
    with recorded() as caught:
        zc.Checkpoint(m=m).write(tmp_path / "c")
    message = one_warning(caught)
    for fix in ("zc.Variable(...)", "zc.NumpyState", "zc.NoDependency(value)"):
        assert fix in message
    assert numeric_items(message) == ["m.table (numpy array int64[3])"]


def test_collections_of_arrays_in_plain_attributes(tmp_path: Path) -> None:
    m = Module()
    m.v = zc.Variable(np.ones(2, np.float32))
    m.pair = (np.zeros(1), 2)
    m.bag = {np.float32(1.5)}
    m.frozen = frozenset({np.int64(2)})
    m.nested = ((np.zeros(1),),)
    m.numbers = (1, 2.0)  # no arrays in it: configuration
    m.words = ("a", "b")
    with recorded() as caught:
        path = zc.Checkpoint(m=m).write(tmp_path / "c")
    assert numeric_items(one_warning(caught)) == [
        "m.pair (tuple of numpy arrays)",
        "m.bag (set of numpy arrays)",
        "m.frozen (frozenset of numpy arrays)",
        "m.nested (tuple of numpy arrays)",
    ]
    assert saved_keys(path) == ["m/v/.ATTRIBUTES/VARIABLE_VALUE"]


# Tracked containers -------------------------------------------------------------------------


def test_array_elements_of_tracked_lists_and_dicts(tmp_path: Path) -> None:
    m = Module()
    m.arrs = [np.zeros(2, np.float32), 1.5, zc.Variable(np.ones(3, np.float32)), 4]
    m.cfg = {"a": 1, "b": np.float32(2), "c": 0.5, "d": "relu", "e": (np.ones(1),)}
    m.deep = [{"x": np.zeros(5, np.int8)}]  # a List holding a Dict holding an array
    assert isinstance(m.arrs, zc.List) and isinstance(m.cfg, zc.Dict)
    with recorded() as caught:
        line = next_line()
        path = zc.Checkpoint(m=m).write(tmp_path / "c")
    assert caught[0].lineno == line
    assert numeric_items(one_warning(caught)) == [
        "m/arrs[0] (numpy array float32[2])",
        "m/cfg['b'] (numpy scalar float32)",
        "m/cfg['e'] (tuple of numpy arrays)",
        "m/deep/0['x'] (numpy array int8[5])",
    ]
    # The Variable in the list is saved (as element 2); the arrays are not.
    assert saved_keys(path) == ["m/arrs/2/.ATTRIBUTES/VARIABLE_VALUE"]


def test_python_numbers_in_containers_are_configuration(tmp_path: Path) -> None:
    m = Module()
    m.w = zc.Variable(np.zeros(1, np.float32))
    m.sizes = [64, 32, 0.5, np.zeros(1)]
    m.opts = {"lr": 0.1, "layers": 2, "act": "relu", "bias": True}
    with recorded() as caught:
        zc.Checkpoint(m=m).write(tmp_path / "c")
    # Only the array is named; the numbers beside it are not.
    assert numeric_items(one_warning(caught)) == ["m/sizes[3] (numpy array float64[1])"]


# NumpyState ---------------------------------------------------------------------------------


def test_python_numbers_of_a_numpy_state_are_named(tmp_path: Path) -> None:
    s = zc.NumpyState()
    s.arr = np.arange(4, dtype=np.float32)
    s.step = np.int64(9)
    s.count = 5
    s.ratio = 2.5
    s.done = False
    with recorded() as caught:
        line = next_line()
        path = zc.Checkpoint(s=s).write(tmp_path / "c")
    message = one_warning(caught)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    assert numeric_items(message) == ["s.count (int)", "s.ratio (float)"]
    # NumpyState saves its arrays and numpy scalars, not the Python numbers.
    assert saved_keys(path) == [
        "s/arr/.ATTRIBUTES/VARIABLE_VALUE",
        "s/step/.ATTRIBUTES/VARIABLE_VALUE",
    ]


# Trackables in tuples and sets --------------------------------------------------------------


def test_trackables_held_only_in_tuples_or_sets(tmp_path: Path) -> None:
    o = Module()
    shared = zc.Variable(np.full(2, 5.0, np.float32))
    o.shared = shared
    o.pair = (zc.Variable(np.zeros(1, np.float32)), zc.Variable(np.ones(1, np.float32)))
    o.group = {zc.Variable(np.zeros(2, np.float32))}
    o.aliases = (shared,)  # reachable as o.shared, so saved: not named
    with recorded() as caught:
        line = next_line()
        path = zc.Checkpoint(o=o).write(tmp_path / "c")
    message = one_warning(caught)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    assert message == HIDDEN_HEAD + "o.pair, o.group" + HIDDEN_TAIL
    assert saved_keys(path) == ["o/shared/.ATTRIBUTES/VARIABLE_VALUE"]


def test_both_kinds_in_one_warning(tmp_path: Path) -> None:
    o = Module()
    o.pair = (zc.Variable(np.zeros(1)),)
    o.lr = 0.01
    with recorded() as caught:
        zc.Checkpoint(o=o).write(tmp_path / "c")
    message = one_warning(caught)
    assert message == (
        NUMERIC_HEAD + "o.lr (float)" + NUMERIC_TAIL + " " + HIDDEN_HEAD + "o.pair" + HIDDEN_TAIL
    )


# What is not reported -----------------------------------------------------------------------


def test_clean_model_emits_no_warning_at_all(tmp_path: Path) -> None:
    m = Module()
    m.kernel = zc.Variable(np.zeros((2, 3), np.float32))
    m.layers = [Module(), zc.Variable(np.ones(2, np.float32))]
    m.layers[0].bias = zc.Variable(np.zeros(3, np.float32))
    m.heads = {"policy": zc.Variable(np.zeros(4, np.float32))}
    m.activation = "relu"
    m.training = True
    m.nothing = None
    s = zc.NumpyState()
    s.mean = np.zeros(8, np.float32)
    s.step = np.int64(0)
    s.name = "stats"
    ckpt = zc.Checkpoint(m=m, s=s)
    with recorded() as caught:
        path = ckpt.save(tmp_path / "ckpt")
        ckpt.write(tmp_path / "written")
        zc.CheckpointManager(ckpt, tmp_path / "managed", max_to_keep=1).save()
    assert caught == []
    assert saved_keys(path) == [
        "m/heads/policy/.ATTRIBUTES/VARIABLE_VALUE",
        "m/kernel/.ATTRIBUTES/VARIABLE_VALUE",
        "m/layers/0/bias/.ATTRIBUTES/VARIABLE_VALUE",
        "m/layers/1/.ATTRIBUTES/VARIABLE_VALUE",
        "s/mean/.ATTRIBUTES/VARIABLE_VALUE",
        "s/step/.ATTRIBUTES/VARIABLE_VALUE",
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE",
    ]


def test_private_and_no_dependency_values_are_not_reported(tmp_path: Path) -> None:
    m = Module()
    m.w = zc.Variable(np.zeros(2, np.float32))
    m._cache = np.zeros(100)
    m._step = 3
    m.buffer = zc.NoDependency(np.zeros(10))
    m.lr = zc.NoDependency(0.1)
    m.items = [zc.Variable(np.ones(1, np.float32))]
    m.items.append(zc.NoDependency(np.zeros(3)))
    m.table = {"w": zc.Variable(np.ones(1, np.float32))}
    m.table["scratch"] = zc.NoDependency(np.float32(1))
    s = zc.NumpyState()
    s.arr = np.zeros(2)
    s.count = zc.NoDependency(5)
    s.cache = zc.NoDependency(np.zeros(4))  # stored untracked, not as a saved array
    s._hidden = 1.0
    s.visible = 0.5  # the one value reported: the scan did run over all of the above
    assert isinstance(m.buffer, np.ndarray) and m.lr == 0.1 and s.count == 5
    with recorded() as caught:
        path = zc.Checkpoint(m=m, s=s).write(tmp_path / "c")
    assert numeric_items(one_warning(caught)) == ["s.visible (float)"]
    assert saved_keys(path) == [
        "m/items/0/.ATTRIBUTES/VARIABLE_VALUE",
        "m/table/w/.ATTRIBUTES/VARIABLE_VALUE",
        "m/w/.ATTRIBUTES/VARIABLE_VALUE",
        "s/arr/.ATTRIBUTES/VARIABLE_VALUE",
    ]


def _write_and_list(ckpt: zc.Checkpoint, path: Path) -> list[str]:
    """Write, and return the numeric items named (empty when nothing was reported)."""
    with recorded() as caught:
        ckpt.write(path)
    assert len(caught) <= 1
    return numeric_items(one_warning(caught)) if caught else []


def test_plain_value_after_no_dependency_is_reported_again(tmp_path: Path) -> None:
    m = Module()
    s = zc.NumpyState()
    m.cfg = {}
    ckpt = zc.Checkpoint(m=m, s=s)
    m.x = zc.NoDependency(np.zeros(2))
    s.count = zc.NoDependency(1)
    m.cfg["a"] = zc.NoDependency(np.ones(1))
    assert _write_and_list(ckpt, tmp_path / "silenced") == []

    m.x = np.zeros(2)
    s.count = 2
    m.cfg["a"] = np.ones(1)
    assert _write_and_list(ckpt, tmp_path / "plain") == [
        "m.x (numpy array float64[2])",
        "s.count (int)",
        "m/cfg['a'] (numpy array float64[1])",
    ]

    m.x = zc.NoDependency(m.x)  # silenced once more
    assert _write_and_list(ckpt, tmp_path / "again") == [
        "s.count (int)",
        "m/cfg['a'] (numpy array float64[1])",
    ]


def test_deleting_an_attribute_or_item_removes_it(tmp_path: Path) -> None:
    m = Module()
    s = zc.NumpyState()
    m.a = np.zeros(1)
    m.b = 1.0
    m.cfg = {"k": np.zeros(1), "j": np.ones(1)}
    s.count = 3
    ckpt = zc.Checkpoint(m=m, s=s)
    assert _write_and_list(ckpt, tmp_path / "before") == [
        "m.a (numpy array float64[1])",
        "m.b (float)",
        "s.count (int)",
        "m/cfg['k'] (numpy array float64[1])",
        "m/cfg['j'] (numpy array float64[1])",
    ]
    del m.a
    del s.count
    del m.cfg["k"]
    assert _write_and_list(ckpt, tmp_path / "after") == [
        "m.b (float)",
        "m/cfg['j'] (numpy array float64[1])",
    ]
    # A deleted NoDependency name assigned a plain value again is reported.
    m.c = zc.NoDependency(2.0)
    del m.c
    m.c = 2.0
    assert _write_and_list(ckpt, tmp_path / "redo")[-2:] == [
        "m.c (float)",
        "m/cfg['j'] (numpy array float64[1])",
    ]


# One warning per save, at the caller -------------------------------------------------------


def test_one_warning_per_save_call_each_at_its_line(tmp_path: Path) -> None:
    m = Module()
    m.v = zc.Variable(np.zeros(1))
    m.stats = np.zeros(3)
    ckpt = zc.Checkpoint(m=m)
    with recorded() as caught:
        first = next_line()
        ckpt.save(tmp_path / "ckpt")
        second = next_line()
        ckpt.save(tmp_path / "ckpt")
        third = next_line()
        ckpt.write(tmp_path / "written")
    assert [(w.category, w.filename, w.lineno) for w in caught] == [
        (UnsavedValueWarning, __file__, first),
        (UnsavedValueWarning, __file__, second),
        (UnsavedValueWarning, __file__, third),
    ]
    named = [numeric_items(str(w.message)) for w in caught]
    assert named == [["m.stats (numpy array float64[3])"]] * 3


def test_default_filters_still_warn_at_every_save(tmp_path: Path) -> None:
    m = Module()
    m.stats = np.zeros(3)
    ckpt = zc.Checkpoint(m=m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for i in range(2):
            ckpt.write(tmp_path / f"c{i}")  # same line twice
    assert [w.category for w in caught] == [UnsavedValueWarning] * 2


def test_warning_points_at_the_first_frame_outside_zarrckpt(tmp_path: Path) -> None:
    m = Module()
    m.lr = 0.5

    def save_it() -> int:
        line = next_line()
        zc.Checkpoint(m=m).write(tmp_path / "c")
        return line

    with recorded() as caught:
        line = save_it()
    # The helper's frame is the first outside zarrckpt: its line, not this one.
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    assert numeric_items(one_warning(caught)) == ["m.lr (float)"]


def test_manager_save_warns_at_the_caller_line(tmp_path: Path) -> None:
    m = Module()
    m.v = zc.Variable(np.zeros(2, np.float32))
    m.mean = np.zeros(2, np.float32)
    manager = zc.CheckpointManager(zc.Checkpoint(m=m), tmp_path / "run", max_to_keep=3)
    with recorded() as caught:
        line = next_line()
        path = manager.save()
        line2 = next_line()
        path2 = manager.save()
    assert path is not None and path2 is not None
    assert [(w.category, w.filename, w.lineno) for w in caught] == [
        (UnsavedValueWarning, __file__, line),
        (UnsavedValueWarning, __file__, line2),
    ]
    assert numeric_items(str(caught[0].message)) == ["m.mean (numpy array float32[2])"]
    assert "m/mean/.ATTRIBUTES/VARIABLE_VALUE" not in saved_keys(path)
    assert "m/v/.ATTRIBUTES/VARIABLE_VALUE" in saved_keys(path)


def test_at_most_twenty_paths_then_and_n_more(tmp_path: Path) -> None:
    m = Module()
    for i in range(25):
        setattr(m, f"a{i:02d}", float(i))
    with recorded() as caught:
        zc.Checkpoint(m=m).write(tmp_path / "c")
    message = one_warning(caught)
    assert numeric_items(message) == [f"m.a{i:02d} (float)" for i in range(20)]
    assert message.endswith(NUMERIC_TAIL)
    assert "m.a19 (float) and 5 more" + NUMERIC_TAIL in message
    assert "m.a20" not in message

    for i in range(20, 25):  # exactly twenty: no "more"
        delattr(m, f"a{i:02d}")
    with recorded() as caught:
        zc.Checkpoint(m=m).write(tmp_path / "d")
    assert " more" not in one_warning(caught)


# Silencing ----------------------------------------------------------------------------------


def test_ignore_filter_silences_only_this_warning(tmp_path: Path) -> None:
    m = Module()
    m.stats = np.zeros(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", UnsavedValueWarning)
        path = zc.Checkpoint(m=m).write(tmp_path / "c")
        warnings.warn("other", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["other"]
    assert zc.list_variables(path) == []


def test_error_filter_stops_the_save_before_anything_is_written(tmp_path: Path) -> None:
    m = Module()
    m.v = zc.Variable(np.zeros(1))
    m.stats = np.zeros(3)
    ckpt = zc.Checkpoint(m=m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsavedValueWarning)
        with pytest.raises(UnsavedValueWarning, match=r"m\.stats \(numpy array float64\[3\]\)"):
            ckpt.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt-1").exists()
    assert int(ckpt.save_counter.numpy()) == 0  # the failed save() gave its number back


@pytest.mark.filterwarnings("ignore::zarrckpt.errors.UnsavedValueWarning")
def test_pytest_filterwarnings_mark_silences(tmp_path: Path) -> None:
    m = Module()
    m.stats = np.zeros(3)
    with pytest.warns(UnsavedValueWarning) as caught:  # pytest.warns still sees it ...
        zc.Checkpoint(m=m).write(tmp_path / "a")
    assert len(caught) == 1
    with warnings.catch_warnings(record=True) as seen:  # ... the mark's filter drops it
        zc.Checkpoint(m=m).write(tmp_path / "b")
    assert seen == []


# Restore: the warning is the only signal ----------------------------------------------------


def test_restore_passes_assert_consumed_and_leaves_plain_values_alone(tmp_path: Path) -> None:
    def build(fill: float) -> Module:
        m = Module()
        m.w = zc.Variable(np.full(2, fill, np.float32))
        m.stats = np.full(3, fill)
        m.lr = fill
        m.arrs = [np.full(1, fill)]
        s = zc.NumpyState()
        s.count = int(fill)
        m.s = s
        return m

    saved = build(1.0)
    with recorded() as caught:
        path = zc.Checkpoint(m=saved).write(tmp_path / "c")
    assert numeric_items(one_warning(caught)) == [
        "m.stats (numpy array float64[3])",
        "m.lr (float)",
        "m/arrs[0] (numpy array float64[1])",  # objects in breadth-first order
        "m/s.count (int)",
    ]
    assert saved_keys(path) == ["m/w/.ATTRIBUTES/VARIABLE_VALUE"]

    fresh = build(0.0)
    with recorded() as during_restore:
        status = zc.Checkpoint(m=fresh).restore(path)
        status.assert_consumed()
        status.assert_existing_objects_matched()
    assert unsaved_warnings(during_restore) == []
    np.testing.assert_array_equal(fresh.w.numpy(), np.full(2, 1.0, np.float32))
    # Everything the warning named kept the fresh values: nothing was restored there.
    np.testing.assert_array_equal(fresh.stats, np.zeros(3))
    assert fresh.lr == 0.0 and fresh.s.count == 0
    np.testing.assert_array_equal(fresh.arrs[0], np.zeros(1))


# Silencing follows positions and names, never object ids -------------------------------


def test_a_freed_no_dependency_id_never_hides_a_later_variable(tmp_path: Path) -> None:
    """Python reuses the id of a freed object: silencing must not be keyed by it."""

    class Config:
        pass

    for attempt in range(20):
        m = Module()
        m.items = []
        m.items.append(zc.NoDependency(Config()))
        m.items.pop()  # the Config dies here; its id is free for the next object
        m.items.append(zc.Variable(np.full(2, attempt, np.float32)))
        with recorded() as caught:
            path = zc.Checkpoint(m=m).write(tmp_path / f"c{attempt}")
        assert unsaved_warnings(caught) == []
        assert saved_keys(path) == ["m/items/0/.ATTRIBUTES/VARIABLE_VALUE"]


def test_an_array_silenced_once_is_reported_where_it_is_stored_plainly(tmp_path: Path) -> None:
    a = np.zeros(3)
    m = Module()
    m.items = []
    m.items.append(zc.NoDependency(a))
    m.items.append(a)  # the same array, this time stored as plain state
    with recorded() as caught:
        zc.Checkpoint(m=m).write(tmp_path / "c")
    assert numeric_items(one_warning(caught)) == ["m/items[1] (numpy array float64[3])"]


def test_tuples_of_trackables_no_dependency_private_and_inside_containers(tmp_path: Path) -> None:
    m = Module()
    m.silenced = zc.NoDependency((zc.Variable(1.0),))  # left out on purpose: not reported
    m._private = (zc.Variable(2.0),)  # Trackables are dependencies whatever the name
    m.layers = [(zc.Variable(3.0), zc.Variable(4.0))]  # a tuple inside a tracked list
    m.heads = {"pair": (zc.Variable(5.0),)}  # and inside a tracked dict
    with recorded() as caught:
        path = zc.Checkpoint(m=m).write(tmp_path / "c")
    assert one_warning(caught) == (
        f"{HIDDEN_HEAD}m._private, m/layers[0], m/heads['pair']{HIDDEN_TAIL}"
    )
    assert saved_keys(path) == []


def test_a_module_filter_matches_the_callers_module(tmp_path: Path) -> None:
    m = Module()
    m.stats = np.zeros(2)
    with recorded() as caught:
        warnings.filterwarnings("ignore", category=UnsavedValueWarning, module=__name__)
        zc.Checkpoint(m=m).write(tmp_path / "ignored")
    assert unsaved_warnings(caught) == []
    with recorded() as caught:
        warnings.filterwarnings("ignore", category=UnsavedValueWarning, module="elsewhere")
        zc.Checkpoint(m=m).write(tmp_path / "shown")
    assert len(unsaved_warnings(caught)) == 1
