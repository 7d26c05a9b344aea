"""The ObjectGraph record: what a checkpoint says about the objects it holds.

One module owns the record's schema, its deterministic msgpack encoding and
its validation on decode. Nothing read from a file is used before
:meth:`ObjectGraph.decode` has checked every field's type, every node id, every
key (see :mod:`zarrckpt._keys`) and every dtype name. Never pickle.

Encoded form (msgpack, string map keys, insertion order fixed)::

    {"format": "zarrckpt.object_graph", "version": 1, "nodes": [
        {"type": "zarrckpt.Variable",
         "children": [[name, node_id], ...],
         "attributes": [[name, key, [dim, ...], dtype_name], ...],
         "slot_variables": [[original_variable_node_id, slot_name,
                             slot_variable_node_id], ...]},
        ...]}

``nodes[0]`` is the root.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from zarrckpt._dtypes import dtype_from_name
from zarrckpt._keys import validate_key
from zarrckpt.errors import FormatVersionError, RecordError, ZarrckptError

__all__ = [
    "FORMAT_NAME",
    "MAX_RECORD_BYTES",
    "printable",
    "FORMAT_VERSION",
    "ChildReference",
    "ObjectGraph",
    "ObjectNode",
    "SavedAttribute",
    "SlotVariableReference",
]

FORMAT_NAME = "zarrckpt.object_graph"
FORMAT_VERSION = 1

# Limits applied while unpacking, so a hostile record cannot make msgpack
# allocate what it claims before validation runs.
MAX_RECORD_BYTES = 256 << 20
_MAX_ITEMS = 1 << 24
_MAX_STR = 1 << 16
_MAX_NDIM = 64


def printable(text: str) -> str:
    """``text`` with control and format characters escaped (``\\x1b``, ``\\u202e``).

    Names in a record are any strings; printed raw they could move a
    terminal's cursor, hide text or reorder it.
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


@dataclass(frozen=True)
class SavedAttribute:
    """One saved value of an object: an array stored under ``key``."""

    name: str
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Size of the value in bytes."""
        return math.prod(self.shape) * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class ChildReference:
    """A named dependency edge from one node to another."""

    name: str
    node_id: int


@dataclass(frozen=True)
class SlotVariableReference:
    """An optimizer's slot: ``slot_name`` of the variable at ``original_variable_node_id``."""

    original_variable_node_id: int
    slot_name: str
    slot_variable_node_id: int


@dataclass(frozen=True)
class ObjectNode:
    """One object of the graph: its type hint, dependencies, values and slots."""

    type_name: str
    children: tuple[ChildReference, ...] = ()
    attributes: tuple[SavedAttribute, ...] = ()
    slot_variables: tuple[SlotVariableReference, ...] = ()


@dataclass(frozen=True)
class ObjectGraph:
    """The object graph stored in a checkpoint; ``nodes[0]`` is the root.

    Example:
        >>> graph = zarrckpt.object_metadata("ckpt-1")  # doctest: +SKIP
        >>> [c.name for c in graph.nodes[0].children]   # doctest: +SKIP
        ['model', 'save_counter']
    """

    nodes: tuple[ObjectNode, ...]
    version: int = FORMAT_VERSION

    def attributes(self) -> Iterator[tuple[int, SavedAttribute]]:
        """Every saved attribute with the id of the node that owns it."""
        for node_id, node in enumerate(self.nodes):
            for attribute in node.attributes:
                yield node_id, attribute

    def paths(self) -> dict[int, str]:
        """The shortest dependency path (names joined by ``/``) of each reachable node."""
        found: dict[int, str] = {0: ""}
        queue = [0]
        for node_id in queue:
            for child in self.nodes[node_id].children:
                if child.node_id not in found:
                    prefix = found[node_id]
                    found[child.node_id] = f"{prefix}/{child.name}" if prefix else child.name
                    queue.append(child.node_id)
        return found

    def __repr__(self) -> str:
        total = sum(a.nbytes for _, a in self.attributes())
        lines = [
            f"ObjectGraph(version={self.version}, {len(self.nodes)} nodes, "
            f"{sum(1 for _ in self.attributes())} values, {total} bytes)"
        ]
        paths = self.paths()
        for node_id, node in enumerate(self.nodes):
            where = paths.get(node_id, "<slot>") or "<root>"
            lines.append(f"  [{node_id}] {printable(where)} ({printable(node.type_name)})")
            for attribute in node.attributes:
                lines.append(
                    f"      {printable(attribute.name)}: {attribute.dtype}"
                    f"{list(attribute.shape)} -> {attribute.key}"
                )
            for slot in node.slot_variables:
                lines.append(
                    f"      slot {printable(repr(slot.slot_name))} of "
                    f"[{slot.original_variable_node_id}] -> [{slot.slot_variable_node_id}]"
                )
        return "\n".join(lines)

    def encode(self) -> bytes:
        """Deterministic msgpack bytes of this record (validated first)."""
        self.validate()
        document = {
            "format": FORMAT_NAME,
            "version": self.version,
            "nodes": [
                {
                    "type": node.type_name,
                    "children": [[c.name, c.node_id] for c in node.children],
                    "attributes": [
                        [a.name, a.key, list(a.shape), a.dtype] for a in node.attributes
                    ],
                    "slot_variables": [
                        [s.original_variable_node_id, s.slot_name, s.slot_variable_node_id]
                        for s in node.slot_variables
                    ],
                }
                for node in self.nodes
            ],
        }
        packed: bytes = msgpack.packb(document, use_bin_type=True)
        return packed

    def digest(self) -> str:
        """SHA-256 (hex) of the encoded record."""
        return hashlib.sha256(self.encode()).hexdigest()

    @classmethod
    def decode(cls, data: bytes, *, where: str = "record") -> ObjectGraph:
        """Parse and validate record bytes; raise :class:`RecordError` on anything wrong."""
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"{where}: record is {len(data)} bytes, over the limit")
        try:
            document = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                use_list=True,
                max_str_len=_MAX_STR,
                max_bin_len=0,
                max_array_len=_MAX_ITEMS,
                max_map_len=16,
                max_ext_len=0,
            )
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise RecordError(f"{where}: not a valid msgpack record ({exc})") from exc
        reader = _Reader(where)
        # The version first: a newer version may well have other fields.
        if isinstance(document, dict) and document.get("format") == FORMAT_NAME:
            version = reader.integer(document.get("version"), "version")
            if version != FORMAT_VERSION:
                raise FormatVersionError(
                    f"{where}: record format version {version}; this zarrckpt reads "
                    f"version {FORMAT_VERSION}"
                )
        doc = reader.mapping(document, "record", {"format", "version", "nodes"})
        if doc["format"] != FORMAT_NAME:
            raise RecordError(f"{where}: format is {doc['format']!r}, expected {FORMAT_NAME!r}")
        version = reader.integer(doc["version"], "version")
        raw_nodes = reader.sequence(doc["nodes"], "nodes")
        nodes = tuple(reader.node(raw, f"nodes[{i}]") for i, raw in enumerate(raw_nodes))
        graph = cls(nodes=nodes, version=version)
        try:
            graph.validate()
        except ZarrckptError as exc:
            raise RecordError(f"{where}: {exc}") from exc
        return graph

    def validate(self) -> None:
        """Check the graph's internal consistency (ids in range, keys unique and safe)."""
        if not self.nodes:
            raise RecordError("record has no nodes; nodes[0] must be the root")
        count = len(self.nodes)
        keys: set[str] = set()
        for node_id, node in enumerate(self.nodes):
            names = [c.name for c in node.children]
            if len(set(names)) != len(names):
                raise RecordError(f"node {node_id} has duplicate child names")
            for child in node.children:
                if not 0 <= child.node_id < count:
                    raise RecordError(
                        f"node {node_id} child {child.name!r} -> bad id {child.node_id}"
                    )
            attribute_names = [a.name for a in node.attributes]
            if len(set(attribute_names)) != len(attribute_names):
                raise RecordError(f"node {node_id} has duplicate attribute names")
            for attribute in node.attributes:
                validate_key(attribute.key, where=f"node {node_id}")
                if attribute.key in keys:
                    raise RecordError(f"key {attribute.key!r} is saved twice")
                keys.add(attribute.key)
                dtype_from_name(attribute.dtype)
                if len(attribute.shape) > _MAX_NDIM or any(d < 0 for d in attribute.shape):
                    raise RecordError(f"key {attribute.key!r} has invalid shape {attribute.shape}")
            for slot in node.slot_variables:
                for ref in (slot.original_variable_node_id, slot.slot_variable_node_id):
                    if not 0 <= ref < count:
                        raise RecordError(f"node {node_id} slot {slot.slot_name!r} -> bad id {ref}")


class _Reader:
    """Type-checked access to decoded msgpack data, with the field path in errors."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, expected: str, value: Any) -> RecordError:
        found = type(value).__name__
        return RecordError(f"{self.where}: {field} must be {expected}, found {found}")

    def mapping(self, value: Any, field: str, keys: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "a map", value)
        if set(value) != keys:
            raise RecordError(
                f"{self.where}: {field} has fields {sorted(value)}, expected {sorted(keys)}"
            )
        return value

    def sequence(self, value: Any, field: str, length: int | None = None) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(field, "a list", value)
        if length is not None and len(value) != length:
            raise RecordError(f"{self.where}: {field} has {len(value)} items, expected {length}")
        return value

    def integer(self, value: Any, field: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(field, "a non-negative int", value)
        return value

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, "a string", value)
        return value

    def node(self, raw: Any, field: str) -> ObjectNode:
        doc = self.mapping(raw, field, {"type", "children", "attributes", "slot_variables"})
        children = []
        for i, item in enumerate(self.sequence(doc["children"], f"{field}.children")):
            name, node_id = self.sequence(item, f"{field}.children[{i}]", 2)
            children.append(
                ChildReference(
                    self.text(name, f"{field}.children[{i}].name"),
                    self.integer(node_id, f"{field}.children[{i}].node_id"),
                )
            )
        attributes = []
        for i, item in enumerate(self.sequence(doc["attributes"], f"{field}.attributes")):
            at = f"{field}.attributes[{i}]"
            name, key, shape, dtype = self.sequence(item, at, 4)
            dims = tuple(
                self.integer(d, f"{at}.shape")
                for d in self.sequence(shape, f"{at}.shape")[: _MAX_NDIM + 1]
            )
            attributes.append(
                SavedAttribute(
                    self.text(name, f"{at}.name"),
                    self.text(key, f"{at}.key"),
                    dims,
                    self.text(dtype, f"{at}.dtype"),
                )
            )
        slots = []
        for i, item in enumerate(self.sequence(doc["slot_variables"], f"{field}.slot_variables")):
            at = f"{field}.slot_variables[{i}]"
            original, slot_name, slot_node = self.sequence(item, at, 3)
            slots.append(
                SlotVariableReference(
                    self.integer(original, f"{at}.original"),
                    self.text(slot_name, f"{at}.slot_name"),
                    self.integer(slot_node, f"{at}.slot_variable"),
                )
            )
        return ObjectNode(
            type_name=self.text(doc["type"], f"{field}.type"),
            children=tuple(children),
            attributes=tuple(attributes),
            slot_variables=tuple(slots),
        )


def dtype_of(attribute: SavedAttribute) -> np.dtype[Any]:
    """The numpy dtype of a saved attribute."""
    return dtype_from_name(attribute.dtype)
