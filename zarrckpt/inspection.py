"""Looking into a checkpoint without building the model: graph, variables, slices.

Every function takes a local path or fsspec URL plus ``storage_options``, and
reads only what it needs: the manifest and the record for the listing, the
chunks a slice touches for :func:`load_variable`.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import numpy as np

from zarrckpt._commit import CommittedCheckpoint, open_committed
from zarrckpt._keys import ATTRIBUTES
from zarrckpt.array_io import ArrayLayout, read_selection
from zarrckpt.errors import InvalidArgumentError, VariableNotFoundError
from zarrckpt.options import CheckpointOptions
from zarrckpt.record import ObjectGraph, SavedAttribute, printable
from zarrckpt.variable import VARIABLE_VALUE

__all__ = [
    "LazyVariable",
    "dot_graph_from_checkpoint",
    "list_variables",
    "load_variable",
    "object_metadata",
    "open_variable",
    "zarr_group_url",
]

PathLike = str | os.PathLike[str]


def object_metadata(path: PathLike, storage_options: dict[str, Any] | None = None) -> ObjectGraph:
    """The object graph a checkpoint holds: nodes, children, saved values, slot variables.

    Example:
        >>> graph = zarrckpt.object_metadata("/ckpts/ckpt-3")
        >>> graph.nodes[0].children[0].name
        'model'
    """
    return open_committed(path, storage_options).graph


def zarr_group_url(path: PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """The URL of the committed checkpoint's Zarr group, for plain zarr or tensorstore.

    On local disks that is ``path`` itself; on object stores it is the attempt
    prefix that ``_COMMIT`` names (``.../ckpt-3/attempt-<32 hex>``). The
    manifest and the record are checked first, so a damaged or unfinished
    checkpoint raises instead of pointing a reader at it.

    Example:
        >>> url = zarr_group_url("s3://bucket/run/ckpt-3", storage_options=so)  # doctest: +SKIP
        >>> zarr.open_group(url, mode="r", storage_options=so)  # doctest: +SKIP
    """
    return open_committed(path, storage_options).storage.url


def list_variables(
    path: PathLike, storage_options: dict[str, Any] | None = None
) -> list[tuple[str, tuple[int, ...], str]]:
    """``(key, shape, dtype)`` of every saved value, sorted by key (TensorFlow's form).

    Example:
        >>> zarrckpt.list_variables("/ckpts/ckpt-3")[:1]
        [('model/dense/bias/.ATTRIBUTES/VARIABLE_VALUE', (16,), 'float32')]
    """
    graph = object_metadata(path, storage_options)
    return sorted((a.key, a.shape, a.dtype) for _, a in graph.attributes())


def _find(checkpoint: CommittedCheckpoint, key: str) -> SavedAttribute:
    if not isinstance(key, str):
        raise InvalidArgumentError(
            f"{checkpoint.url}: a key is a string such as 'model/dense/kernel', got {key!r}"
        )
    attributes = {a.key: a for _, a in checkpoint.graph.attributes()}
    for candidate in (key, f"{key.rstrip('/')}/{ATTRIBUTES}/{VARIABLE_VALUE}"):
        if candidate in attributes:
            return attributes[candidate]
    close = _closest_keys(key, list(attributes))
    raise VariableNotFoundError(
        f"{checkpoint.url}: no saved value {key!r}"
        + (f"; did you mean {close}?" if close else f"; {len(attributes)} keys in all")
    )


_VALUE_SUFFIX = f"/{ATTRIBUTES}/{VARIABLE_VALUE}"


def _closest_keys(key: str, keys: list[str], n: int = 5) -> list[str]:
    """The saved keys closest to ``key`` by edit distance (``difflib``), best first.

    A variable's key is compared without its ``/.ATTRIBUTES/VARIABLE_VALUE``
    suffix when ``key`` has none, so ``model/embeding`` finds
    ``model/embedding/.ATTRIBUTES/VARIABLE_VALUE``.
    """
    short: dict[str, str] = {}
    for full in keys:
        shown = full.removesuffix(_VALUE_SUFFIX) if not key.endswith(_VALUE_SUFFIX) else full
        short.setdefault(shown, full)
    matches = difflib.get_close_matches(key.rstrip("/"), list(short), n=n, cutoff=0.6)
    return [short[m] for m in matches]


def _normalize(index: Any, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[Any, ...]]:
    """Ascending slices to read per axis, and what to apply to the result afterwards."""
    items = list(index) if isinstance(index, tuple) else [index]
    ellipses = [at for at, item in enumerate(items) if item is Ellipsis]  # identity: arrays
    if len(ellipses) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if ellipses:
        at = ellipses[0]
        items[at : at + 1] = [slice(None)] * (len(shape) - len(items) + 1)
    if len(items) > len(shape):
        raise IndexError(f"too many indices: {len(items)} for shape {shape}")
    items += [slice(None)] * (len(shape) - len(items))
    reads: list[slice] = []
    after: list[int | slice] = []
    for axis, (item, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, int | np.integer) and not isinstance(item, bool):
            position = int(item) + size if item < 0 else int(item)
            if not 0 <= position < size:
                raise IndexError(f"index {item} is out of bounds for axis {axis} with size {size}")
            reads.append(slice(position, position + 1))
            after.append(0)
        elif isinstance(item, slice):
            r = range(*item.indices(size))
            if r.step < 0 and len(r):  # read ascending, flip afterwards
                reads.append(slice(r[-1], r[0] + 1, -r.step))
                after.append(slice(None, None, -1))
            else:
                reads.append(slice(r.start, r.stop, r.step) if len(r) else slice(0, 0))
                after.append(slice(None))
        else:
            raise IndexError(
                f"unsupported index of type {type(item).__name__} on axis {axis}: "
                "use ints, slices and '...' (no boolean or integer arrays)"
            )
    return tuple(reads), tuple(after)


def _load(
    checkpoint: CommittedCheckpoint,
    attribute: SavedAttribute,
    layout: ArrayLayout,
    index: Any,
    options: CheckpointOptions | None,
) -> np.ndarray[Any, Any]:
    reads, after = _normalize(index, layout.shape)
    with checkpoint.reading():
        values = read_selection(
            checkpoint.storage, attribute.key, layout, reads, checkpoint.files, options
        )
    result: np.ndarray[Any, Any] = values[(*after, Ellipsis)]  # an array, 0-d ones too
    return result


def load_variable(
    path: PathLike,
    key: str,
    index: Any = Ellipsis,
    *,
    storage_options: dict[str, Any] | None = None,
    options: CheckpointOptions | None = None,
) -> np.ndarray[Any, Any]:
    """The saved value ``key`` (or ``value[index]``), reading only the chunks it touches.

    ``key`` is a checkpoint key, or an object path whose ``VARIABLE_VALUE`` is
    meant. ``index`` takes ints, slices (any step) and ``...``, as numpy does.

    Example:
        >>> rows = zarrckpt.load_variable("s3://b/run/ckpt-9", "model/embedding",
        ...                               index=slice(1000, 2000), storage_options=opts)
    """
    checkpoint = open_committed(path, storage_options)
    attribute = _find(checkpoint, key)
    with checkpoint.reading():
        layout = checkpoint.layout(attribute)
    return _load(checkpoint, attribute, layout, index, options)


class LazyVariable:
    """A saved value opened without reading it: shape, dtype, and slicing on demand.

    Example:
        >>> embedding = zarrckpt.open_variable("/ckpts/ckpt-3", "model/embedding")
        >>> embedding.shape, embedding.dtype
        ((50000, 1024), dtype('float32'))
        >>> first_rows = embedding[:16]          # reads one chunk
    """

    def __init__(
        self,
        checkpoint: CommittedCheckpoint,
        attribute: SavedAttribute,
        options: CheckpointOptions | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._attribute = attribute
        with checkpoint.reading():
            self._layout = checkpoint.layout(attribute)
        self._options = options

    @property
    def key(self) -> str:
        """The checkpoint key."""
        return self._attribute.key

    @property
    def shape(self) -> tuple[int, ...]:
        """The saved shape."""
        return self._layout.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The saved dtype."""
        return self._layout.dtype

    @property
    def ndim(self) -> int:
        return len(self._layout.shape)

    @property
    def nbytes(self) -> int:
        return self._attribute.nbytes

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The shape of one stored chunk."""
        return self._layout.chunk_shape

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d variable")
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray[Any, Any]:
        return _load(self._checkpoint, self._attribute, self._layout, index, self._options)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray[Any, Any]:
        values = self[...]
        return values if dtype is None else values.astype(dtype)

    def __repr__(self) -> str:
        return (
            f"<zarrckpt.LazyVariable {self.key!r} shape={self.shape} dtype={self.dtype.name} "
            f"chunks={self.chunk_shape} in {self._checkpoint.url}>"
        )


def open_variable(
    path: PathLike,
    key: str,
    *,
    storage_options: dict[str, Any] | None = None,
    options: CheckpointOptions | None = None,
) -> LazyVariable:
    """A lazy handle on the saved value ``key``; indexing it reads only the chunks needed.

    Example:
        >>> table = zarrckpt.open_variable("s3://b/run/ckpt-9", "model/embedding",
        ...                                storage_options=opts)
        >>> table.shape, table.dtype.name
        ((50000, 1024), 'float32')
        >>> rows = table[1000:1064]                  # one or two chunk files read
    """
    checkpoint = open_committed(path, storage_options)
    return LazyVariable(checkpoint, _find(checkpoint, key), options)


def _dot_label(text: str) -> str:
    return printable(text).replace("\\", "\\\\").replace('"', '\\"')


def dot_graph_from_checkpoint(path: PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """Graphviz DOT text of a checkpoint's object graph (TensorFlow's visualization).

    Nodes are objects labelled with their type and saved values; solid edges are
    dependencies labelled with their names, dashed edges slot variables.

    Example:
        >>> open("graph.dot", "w").write(zarrckpt.dot_graph_from_checkpoint(path))
        >>> # dot -Tpng graph.dot -o graph.png
    """
    graph = object_metadata(path, storage_options)
    lines = ["digraph {"]
    for node_id, node in enumerate(graph.nodes):
        label = node.type_name.rsplit(".", 1)[-1]
        values = [f"{a.name}: {a.dtype}{list(a.shape)}" for a in node.attributes]
        text = "\\n".join(_dot_label(x) for x in [label, *values])
        lines.append(f'  N_{node_id} [shape="box" label="{text}"];')
    for node_id, node in enumerate(graph.nodes):
        for child in node.children:
            lines.append(f'  N_{node_id} -> N_{child.node_id} [label="{_dot_label(child.name)}"];')
        for slot in node.slot_variables:
            lines.append(
                f"  N_{slot.original_variable_node_id} -> N_{slot.slot_variable_node_id} "
                f'[style="dashed" label="{_dot_label(slot.slot_name)}"];'
            )
            lines.append(
                f"  N_{node_id} -> N_{slot.slot_variable_node_id} "
                f'[style="dashed" label="{_dot_label(slot.slot_name)}"];'
            )
    lines.append("}")
    return "\n".join(lines) + "\n"
