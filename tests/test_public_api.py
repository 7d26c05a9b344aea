"""The public surface: exactly what zarrckpt/__init__.py exports, seed names included."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import zarr

import zarrckpt as zc

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed"

# Every class and function of TensorFlow's tf.contrib.checkpoint module page.
SEED_NAMES = {
    "CheckpointManager",
    "Checkpointable",
    "CheckpointableBase",
    "CheckpointableObjectGraph",
    "List",
    "Mapping",
    "NoDependency",
    "NumpyState",
    "PythonStateWrapper",
    "UniqueNameTracker",
    "capture_dependencies",
    "dot_graph_from_checkpoint",
    "list_objects",
    "object_metadata",
    "split_dependency",
}
NOT_YET: set[str] = set()


def test_all_is_sorted_and_exact():
    assert zc.__all__ == sorted(zc.__all__)
    public = {n for n in vars(zc) if not n.startswith("_") and n not in {"annotations"}}
    modules = {n for n in public if inspect.ismodule(getattr(zc, n))}
    assert set(zc.__all__) == (public - modules) | {"__version__"}


def test_seed_page_names_have_counterparts():
    if SEED.is_dir():  # the page this project started from, beside the checkout
        text = "".join(p.read_text() for p in SEED.glob("*.txt"))
        listed = set(re.findall(r"\[`(?:class )?(\w+)(?:\(\.\.\.\))?`\]", text))
        assert listed == SEED_NAMES
    for name in SEED_NAMES - NOT_YET:
        assert name in zc.__all__, name
        assert callable(getattr(zc, name))


def test_aliases_are_the_same_objects():
    assert zc.CheckpointableBase is zc.Trackable
    assert zc.Checkpointable is zc.AutoTrackable
    assert zc.Mapping is zc.Dict
    assert zc.PythonStateWrapper is zc.PythonState
    assert zc.CheckpointableObjectGraph is zc.ObjectGraph


def test_public_callables_are_documented():
    for name in zc.__all__:
        obj = getattr(zc, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"{name} has no docstring"


def test_import_registers_bfloat16_with_zarr():
    from zarr.core.dtype import data_type_registry

    assert {"bfloat16", "float8_e4m3fn", "float8_e5m2"} <= set(data_type_registry.contents)
    assert zarr.__version__.startswith("3.")
