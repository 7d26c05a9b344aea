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
from zarrckpt._msgpack import SchemaError, SchemaReader
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
MAX_RECORD_BYTES = 64 << 20
_MAX_ITEMS = 1 << 21  # nodes, children, attributes, slots and dims
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

    def paths(self, limit: int | None = None) -> dict[int, str]:
        """The shortest dependency path (names joined by ``/``) of each reachable node.

        With ``limit``, a path longer than ``limit`` characters keeps its last
        names behind ``…/``: a hostile record of long chains and long names
        then costs at most ``limit`` per node to show.
        """
        parents: dict[int, tuple[int, str]] = {0: (0, "")}  # node -> (parent, name)
        queue = [0]
        for node_id in queue:
            for child in self.nodes[node_id].children:
                if child.node_id not in parents:
                    parents[child.node_id] = (node_id, child.name)
                    queue.append(child.node_id)
        found: dict[int, str] = {}
        for node_id in parents:
            names: list[str] = []
            length, at = 0, node_id
            while at != 0:
                at, name = parents[at]
                if limit is not None and length + len(name) > limit:
                    names.append("…")
                    break
                names.append(name)
                length += len(name) + 1
            found[node_id] = "/".join(reversed(names))
        return found

    def __repr__(self) -> str:
        total = sum(a.nbytes for _, a in self.attributes())
        lines = [
            f"ObjectGraph(version={self.version}, {len(self.nodes)} nodes, "
            f"{sum(1 for _ in self.attributes())} values, {total} bytes)"
        ]
        paths = self.paths(limit=200)
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
            nodes, version = _RecordReader(data, where).document()
        except SchemaError as exc:
            raise RecordError(f"{where}: {exc}") from None
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


class _RecordReader:
    """Reads the record's document field by field (see :mod:`zarrckpt._msgpack`).

    At most ``_MAX_ITEMS`` nodes, children, attributes, slots and dimensions
    in all are built, whatever the document claims.
    """

    def __init__(self, data: bytes, where: str) -> None:
        self.reader = SchemaReader(data, max_str_len=_MAX_STR)
        self.where = where
        self.budget = _MAX_ITEMS

    def items(self, field: str, *, exactly: int | None = None) -> int:
        """Open an array whose items count against the record's item budget."""
        count = self.reader.array(field, self.budget, exactly=exactly)
        self.budget -= count
        return count

    def document(self) -> tuple[tuple[ObjectNode, ...], int]:
        reader = self.reader
        seen: dict[str, Any] = {}
        nodes: tuple[ObjectNode, ...] = ()
        for _ in range(reader.map("record", 16)):
            key = reader.string("record field name")
            if key in seen:
                raise SchemaError(f"record field {key!r} appears twice")
            if key == "format":
                seen[key] = reader.string("format")
                if seen[key] != FORMAT_NAME:
                    raise SchemaError(f"format is {seen[key]!r}, expected {FORMAT_NAME!r}")
            elif key == "version":
                seen[key] = version = reader.integer("version")
                if version < 0:
                    raise SchemaError("version must be a non-negative int")
                if version != FORMAT_VERSION:  # a newer version may well have other fields
                    raise FormatVersionError(
                        f"{self.where}: record format version {version}; this zarrckpt reads "
                        f"version {FORMAT_VERSION}"
                    )
            elif key == "nodes":
                seen[key] = True
                nodes = tuple(self.node(f"nodes[{i}]") for i in range(self.items("nodes")))
            else:
                raise SchemaError(f"record has an unknown field {key!r}")
        reader.finish("record")
        if set(seen) != {"format", "version", "nodes"}:
            raise SchemaError(
                f"record has fields {sorted(seen)}, expected ['format', 'nodes', 'version']"
            )
        return nodes, FORMAT_VERSION

    def node(self, field: str) -> ObjectNode:
        reader = self.reader
        parts: dict[str, Any] = {}
        for _ in range(reader.map(field, 4)):
            key = reader.string(f"{field} field name")
            if key in parts:
                raise SchemaError(f"{field}.{key} appears twice")
            at = f"{field}.{key}"
            if key == "type":
                parts[key] = reader.string(at)
            elif key == "children":
                parts[key] = tuple(self.child(f"{at}[{i}]") for i in range(self.items(at)))
            elif key == "attributes":
                parts[key] = tuple(self.attribute(f"{at}[{i}]") for i in range(self.items(at)))
            elif key == "slot_variables":
                parts[key] = tuple(self.slot(f"{at}[{i}]") for i in range(self.items(at)))
            else:
                raise SchemaError(f"{field} has an unknown field {key!r}")
        if len(parts) != 4:
            raise SchemaError(
                f"{field} has fields {sorted(parts)}, expected "
                "['attributes', 'children', 'slot_variables', 'type']"
            )
        return ObjectNode(
            type_name=parts["type"],
            children=parts["children"],
            attributes=parts["attributes"],
            slot_variables=parts["slot_variables"],
        )

    def index(self, field: str) -> int:
        value = self.reader.integer(field)
        if value < 0:
            raise SchemaError(f"{field} must be a non-negative int")
        return value

    def child(self, field: str) -> ChildReference:
        self.reader.array(field, 2, exactly=2)
        return ChildReference(self.reader.string(f"{field}.name"), self.index(f"{field}.node_id"))

    def attribute(self, field: str) -> SavedAttribute:
        reader = self.reader
        reader.array(field, 4, exactly=4)
        name, key = reader.string(f"{field}.name"), reader.string(f"{field}.key")
        count = self.items(f"{field}.shape")
        if count > _MAX_NDIM:
            raise SchemaError(f"{field}.shape has {count} dimensions, at most {_MAX_NDIM}")
        shape = tuple(self.index(f"{field}.shape") for _ in range(count))
        return SavedAttribute(name, key, shape, reader.string(f"{field}.dtype"))

    def slot(self, field: str) -> SlotVariableReference:
        reader = self.reader
        reader.array(field, 3, exactly=3)
        original = self.index(f"{field}.original")
        name = reader.string(f"{field}.slot_name")
        return SlotVariableReference(original, name, self.index(f"{field}.slot_variable"))


def dtype_of(attribute: SavedAttribute) -> np.dtype[Any]:
    """The numpy dtype of a saved attribute."""
    return dtype_from_name(attribute.dtype)
