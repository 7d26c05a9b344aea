"""Traversing the live object graph: node ids, shortest-path names, saved values.

Breadth-first from the root, dependencies in the order they were added, so
every object gets the shortest path of dependency names (ties broken by that
order) and the same graph always yields the same record. An object reached by
several paths or through a cycle is one node. Slot variables are appended after
the breadth-first pass, named after the variable they belong to.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarrckpt._dtypes import dtype_name
from zarrckpt._keys import attribute_key, escape_name, slot_variable_path
from zarrckpt.errors import (
    UnsavedValueWarning,
    UnsupportedValueError,
    caller_location,
    caller_module,
)
from zarrckpt.optimizer import Optimizer
from zarrckpt.record import (
    ChildReference,
    ObjectGraph,
    ObjectNode,
    SavedAttribute,
    SlotVariableReference,
)
from zarrckpt.trackable import ArrayWindow, SaveContext, ShardInfo, Trackable

__all__ = ["GraphView", "SavePlan", "build_save_plan", "list_objects", "traverse"]


@dataclass
class GraphView:
    """The live objects reachable from a root, numbered as the record numbers them."""

    objects: list[Trackable] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    node_ids: dict[int, int] = field(default_factory=dict)
    children: list[list[ChildReference]] = field(default_factory=list)
    slots: list[list[SlotVariableReference]] = field(default_factory=list)

    def add(self, obj: Trackable, path: str) -> int:
        node_id = len(self.objects)
        self.objects.append(obj)
        self.paths.append(path)
        self.node_ids[id(obj)] = node_id
        self.children.append([])
        self.slots.append([])
        return node_id

    def node_of(self, obj: Trackable) -> int | None:
        return self.node_ids.get(id(obj))


def traverse(root: Trackable) -> GraphView:
    """Number every object reachable from ``root`` (the root is node 0)."""
    if not isinstance(root, Trackable):
        raise TypeError(f"the root must be a Trackable, got {type(root).__name__}")
    view = GraphView()
    view.add(root, "")
    node_id = 0
    while node_id < len(view.objects):  # the list grows as the queue
        for name, child in view.objects[node_id]._checkpoint_dependencies():
            child_id = view.node_of(child)
            if child_id is None:
                prefix = view.paths[node_id]
                escaped = escape_name(name)
                child_id = view.add(child, f"{prefix}/{escaped}" if prefix else escaped)
            view.children[node_id].append(ChildReference(name, child_id))
        node_id += 1
    _add_slot_variables(view)
    return view


def _add_slot_variables(view: GraphView) -> None:
    for optimizer_id in range(len(view.objects)):
        optimizer = view.objects[optimizer_id]
        if not isinstance(optimizer, Optimizer):
            continue
        for var, slot_name, slot in optimizer._slot_variables():
            var_id = view.node_of(var)
            if var_id is None:
                continue  # the variable is not saved, so neither is its slot
            slot_id = view.node_of(slot)
            if slot_id is None:
                path = slot_variable_path(view.paths[var_id], view.paths[optimizer_id], slot_name)
                slot_id = view.add(slot, path)
            view.slots[optimizer_id].append(SlotVariableReference(var_id, slot_name, slot_id))


def list_objects(root: Trackable) -> list[Trackable]:
    """Every object reachable from ``root``, the root first, in breadth-first order.

    Slot variables are included when both their variable and their optimizer
    are reachable (exactly the objects a checkpoint of ``root`` saves).

    Example:
        >>> [type(o).__name__ for o in list_objects(model)]   # doctest: +SKIP
        ['Model', 'Dense', 'Variable', 'Variable']
    """
    return list(traverse(root).objects)


@dataclass
class SavePlan:
    """What one save writes: the record and every (key, array) pair.

    ``shards`` holds the keys whose array is one block of the saved value
    (the record has the value's global shape): only a distributed save
    (:mod:`zarrckpt.distributed`) writes those.
    """

    graph: ObjectGraph
    arrays: list[tuple[str, np.ndarray[Any, Any]]]
    shards: dict[str, ShardInfo] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for _, array in self.arrays)


def build_save_plan(root: Trackable) -> SavePlan:
    """Traverse ``root`` and collect the record and the arrays to write.

    Arrays are the live buffers themselves where possible (no copies).
    """
    view = traverse(root)
    context = SaveContext()
    nodes = []
    arrays: list[tuple[str, np.ndarray[Any, Any]]] = []
    shards: dict[str, ShardInfo] = {}
    for node_id, obj in enumerate(view.objects):
        path = view.paths[node_id]
        obj._check_saveable(path)
        attributes = []
        for name, saveable in obj._saveable_values().items():
            key = attribute_key(path, name)
            array = saveable.value(context)
            if not isinstance(array, np.ndarray | ArrayWindow):
                raise UnsupportedValueError(
                    f"{key}: expected a numpy array to save, got {type(array).__name__}"
                )
            shard = saveable.shard()
            shape = tuple(array.shape) if shard is None else shard.global_shape
            if shard is not None:
                shards[key] = shard
            attributes.append(SavedAttribute(name, key, shape, dtype_name(array.dtype)))
            arrays.append((key, array))
        nodes.append(
            ObjectNode(
                type_name=obj._zc_type_name(),
                children=tuple(view.children[node_id]),
                attributes=tuple(attributes),
                slot_variables=tuple(view.slots[node_id]),
            )
        )
    graph = ObjectGraph(nodes=tuple(nodes))
    graph.validate()
    _warn_unsaved(view)
    return SavePlan(graph=graph, arrays=arrays, shards=shards)


_SHOWN = 20  # attribute paths named in the warning
_SCANNED = 64  # items looked at per plain container, and nesting levels at most


def _numeric_state(value: Any, *, numbers: bool, depth: int = 0) -> str | None:
    """What numeric state ``value`` is (``"numpy array float32[3, 4]"``), or None.

    Arrays and numpy scalars always count; Python ints and floats only where
    ``numbers`` (an object's attribute, not a container's element, where they
    are mostly configuration); tuples, lists, sets and dicts count when they
    hold arrays.
    """
    if isinstance(value, np.ndarray):
        return f"numpy array {value.dtype}{list(value.shape)}"
    if isinstance(value, np.generic) and value.dtype.kind in "biufc":
        return f"numpy scalar {value.dtype}"
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        return type(value).__name__
    if depth < _SCANNED and isinstance(value, tuple | list | set | frozenset | dict):
        items = list(value.values() if isinstance(value, dict) else value)[:_SCANNED]
        if any(_numeric_state(i, numbers=False, depth=depth + 1) for i in items):
            return f"{type(value).__name__} of numpy arrays"
    return None


def _unsaved_state(view: GraphView) -> tuple[list[str], list[str]]:
    """Attributes and elements of the graph's objects that a save leaves out.

    Returns (numeric state, Trackables held only in tuples or sets), each as
    ``"<path>.<attribute> (<what>)"`` / ``"<path>.<attribute>"``.
    """
    from zarrckpt.containers import Dict, List
    from zarrckpt.python_state import NumpyState
    from zarrckpt.trackable import AutoTrackable

    def hides_trackables(value: Any) -> bool:
        return isinstance(value, tuple | set | frozenset) and any(
            isinstance(item, Trackable) and view.node_of(item) is None for item in value
        )

    numeric: list[str] = []
    hidden: list[str] = []
    for node_id, obj in enumerate(view.objects):
        path = view.paths[node_id] or "<root>"
        if isinstance(obj, List | Dict):
            storage: Any = obj._storage
            if isinstance(obj, List):
                items = [(f"[{i}]", v) for i, v in obj._unsaved_items()]
            else:
                items = [(f"[{k!r}]", v) for k, v in storage.items() if k not in obj._silenced]
            for label, value in items:
                if hides_trackables(value):
                    hidden.append(f"{path}{label}")
                elif not isinstance(value, Trackable):
                    what = _numeric_state(value, numbers=False)
                    if what is not None:
                        numeric.append(f"{path}{label} ({what})")
            continue
        attributes = getattr(obj, "__dict__", {})
        scan = isinstance(obj, AutoTrackable | NumpyState)
        silenced = obj._zc_tracking.silenced
        for name, value in attributes.items():
            if name in silenced:
                continue
            # Trackables are dependencies whatever their name, so a private
            # tuple of them is reported too; private numeric values are not.
            if hides_trackables(value):
                hidden.append(f"{path}.{name}")
            if not scan or name.startswith("_"):
                continue
            if not isinstance(value, Trackable):
                what = _numeric_state(value, numbers=True)
                if what is not None:
                    numeric.append(f"{path}.{name} ({what})")
    return numeric, hidden


def _shown(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _warn_unsaved(view: GraphView) -> None:
    """One warning per save, at the caller, naming every value the save leaves out.

    TensorFlow's rule stands (only trackables are dependencies), but numpy
    arrays, numbers and tuples of arrays held in plain attributes look like
    state to a numpy user, so a save that leaves them out says so. Attributes
    named with a leading ``_`` are private and not reported (NumpyState does
    not save them either), nor is anything assigned through NoDependency.
    """
    numeric, hidden = _unsaved_state(view)
    parts = []
    if numeric:
        parts.append(
            f"values in plain attributes are not saved: {_shown(numeric)}. Hold arrays in "
            "zc.Variable(...) (or as attributes of a zc.NumpyState), numbers as numpy "
            "scalars of a NumpyState, or assign zc.NoDependency(value) to keep it out "
            "of checkpoints without this warning."
        )
    if hidden:
        parts.append(
            f"Trackables held only in tuples or sets are not saved: {_shown(hidden)}. "
            "Assign a list (tracked) instead."
        )
    if parts:
        filename, lineno = caller_location()
        warnings.warn_explicit(
            " ".join(parts), UnsavedValueWarning, filename, lineno, module=caller_module()
        )
