"""Chunked array I/O: zarr metadata, chunk files with CRC32C, parallel transfers.

Each saved value is one Zarr v3 array. zarr produces the metadata bytes
(``zarr.json``); the chunk files are written and read here, byte for byte what
zarr itself would write with the codecs ``bytes(little) -> crc32c``: the
chunk's little-endian bytes, edge chunks padded with zeros to the full chunk
size, then the CRC32C of all of it, 4 bytes little-endian.

Chunks split an array along its leading axes only (``(1, ..., 1, rows, full,
..., full)``), so every chunk is one contiguous run of the array's memory in C
order: saving writes straight from the live buffer and restoring reads
straight into it, with no intermediate copy for C-contiguous little-endian
arrays. Every chunk is written, all-zero ones too, and a missing chunk is an
error, never zeros.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata

from zarrckpt._dtypes import dtype_from_name, dtype_name, zarr_dtype
from zarrckpt._storage import Storage
from zarrckpt.errors import ChecksumError, CorruptCheckpointError, MissingChunkError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_THREADS",
    "ArrayLayout",
    "group_metadata",
    "read_arrays",
    "read_layout",
    "write_arrays",
]

DEFAULT_CHUNK_BYTES = 32 << 20
DEFAULT_THREADS = 8
_CRC_BYTES = 4
_MAX_METADATA_BYTES = 1 << 20


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, dtype and chunk shape of one stored array."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunk_shape: tuple[int, ...]

    @classmethod
    def plan(
        cls, shape: tuple[int, ...], dtype: np.dtype[Any], chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> ArrayLayout:
        """Chunks of at most ``chunk_bytes`` (where possible) split along the leading axes only.

        Axes whose inner block does not fit the target get chunks of 1; the
        first axis whose inner block fits is split into balanced runs of rows
        (ceil(n / number_of_chunks), never more than the target allows); later
        axes are whole. Only an array whose single element exceeds the target
        gets chunks over it.
        """
        chunk: list[int] = []
        for axis, size in enumerate(shape):
            inner_bytes = math.prod(shape[axis + 1 :]) * dtype.itemsize
            if inner_bytes > chunk_bytes:
                chunk.append(1)
                continue
            rows_fit = chunk_bytes // inner_bytes if inner_bytes else max(size, 1)
            count = max(1, math.ceil(size / rows_fit))
            chunk.append(max(1, math.ceil(size / count)))
            chunk.extend(max(1, s) for s in shape[axis + 1 :])
            break
        return cls(tuple(shape), dtype, tuple(chunk))

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each axis."""
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunk_shape, strict=True))

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one (padded) chunk before the checksum."""
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    def is_contiguous_runs(self) -> bool:
        """Whether every chunk is one contiguous C-order run (leading-axes split)."""
        if 0 in self.shape:
            return True  # no chunks at all
        split = False
        for c, s in zip(self.chunk_shape, self.shape, strict=True):
            if split and c != s:
                return False
            if c != 1:
                split = True
        return True

    def chunks(self) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
        """Every chunk's grid coordinates and its region of the array."""
        for coords in np.ndindex(*self.grid):
            region = tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(coords, self.chunk_shape, self.shape, strict=True)
            )
            yield coords, region

    def metadata(self) -> bytes:
        """The array's ``zarr.json``, as zarr writes it."""
        metadata = ArrayV3Metadata(
            shape=self.shape,
            data_type=zarr_dtype(self.dtype),
            chunk_grid={"name": "regular", "configuration": {"chunk_shape": self.chunk_shape}},
            chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}},
            fill_value=0,
            codecs=[BytesCodec(endian="little"), Crc32cCodec()],
            attributes={},
            dimension_names=None,
        )
        return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def chunk_key(array_key: str, coords: tuple[int, ...]) -> str:
    """The file key of a chunk (zarr's default v3 chunk key encoding)."""
    return "/".join((array_key, "c", *map(str, coords)))


def group_metadata(attributes: dict[str, Any] | None = None) -> bytes:
    """A group's ``zarr.json``, as zarr writes it."""
    metadata = GroupMetadata(attributes=attributes or {})
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _little_endian(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _chunk_bytes(array: np.ndarray[Any, Any], region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
    """The chunk's values as a flat uint8 array; a view of ``array`` when possible."""
    block = np.ascontiguousarray(array[region], dtype=_little_endian(array.dtype))
    return block.reshape(-1).view(np.uint8)


def _chunk_crc(data: memoryview, padding: bytes | bytearray) -> int:
    """CRC32C of a chunk's values followed by its zero padding."""
    checksum: int = crc32c.crc32c(data)
    return crc32c.crc32c(padding, value=checksum) if padding else checksum


@dataclass
class ChunkFile:
    """One chunk file written: its key, its size and the CRC32C of the whole file."""

    key: str
    size: int
    crc32c: int


def _write_chunk(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    array: np.ndarray[Any, Any],
    coords: tuple[int, ...],
    region: tuple[slice, ...],
) -> ChunkFile:
    data = _chunk_bytes(array, region).data
    padding = bytes(layout.chunk_nbytes - data.nbytes)
    checksum = _chunk_crc(data, padding)
    trailer = checksum.to_bytes(_CRC_BYTES, "little")
    name = chunk_key(key, coords)
    storage.write(name, [data, padding, trailer])
    file_crc = crc32c.crc32c(trailer, value=checksum)
    return ChunkFile(name, layout.chunk_nbytes + _CRC_BYTES, file_crc)


def write_arrays(
    storage: Storage,
    arrays: Iterable[tuple[str, np.ndarray[Any, Any]]],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = DEFAULT_THREADS,
) -> list[ChunkFile]:
    """Write each ``(key, array)`` as a Zarr array at ``key``; return every file written.

    Metadata of the array and of every group above it is written too.
    """
    tasks: list[Callable[[], ChunkFile]] = []
    groups: set[str] = set()
    for key, array in arrays:
        layout = ArrayLayout.plan(tuple(array.shape), array.dtype.newbyteorder("="), chunk_bytes)
        metadata = layout.metadata()
        tasks.append(partial(_write_file, storage, f"{key}/zarr.json", metadata))
        for coords, region in layout.chunks():
            tasks.append(partial(_write_chunk, storage, key, layout, array, coords, region))
        parts = key.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
    group_json = group_metadata()
    for group in sorted(groups):
        tasks.append(partial(_write_file, storage, f"{group}/zarr.json", group_json))
    return _run(tasks, threads)


def _write_file(storage: Storage, key: str, data: bytes) -> ChunkFile:
    storage.write(key, [data])
    return ChunkFile(key, len(data), crc32c.crc32c(data))


def _run(tasks: list[Callable[[], Any]], threads: int) -> list[Any]:
    if threads <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zarrckpt-io") as pool:
        return list(pool.map(lambda task: task(), tasks))


def read_layout(storage: Storage, key: str) -> ArrayLayout:
    """Parse and check an array's ``zarr.json``; only the layout zarrckpt writes is accepted."""
    where = f"{storage.url}/{key}/zarr.json"
    try:
        raw = storage.read(f"{key}/zarr.json")
    except FileNotFoundError:
        raise MissingChunkError(f"{where}: array metadata is missing") from None
    if len(raw) > _MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{where}: metadata is {len(raw)} bytes, over the limit")
    try:
        doc = json.loads(raw)
        shape = tuple(int(d) for d in doc["shape"])
        chunk_shape = tuple(int(d) for d in doc["chunk_grid"]["configuration"]["chunk_shape"])
        ok = (
            doc["zarr_format"] == 3
            and doc["node_type"] == "array"
            and doc["chunk_grid"]["name"] == "regular"
            and doc["chunk_key_encoding"]
            == {"name": "default", "configuration": {"separator": "/"}}
            and [c["name"] for c in doc["codecs"]] == ["bytes", "crc32c"]
            and doc["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
            and not doc.get("storage_transformers")
        )
        data_type = doc["data_type"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed array metadata ({exc!r})") from exc
    if not isinstance(data_type, str):
        raise CorruptCheckpointError(f"{where}: data_type {data_type!r} is not supported")
    layout = ArrayLayout(shape, dtype_from_name(data_type), chunk_shape)
    if (
        not ok
        or len(chunk_shape) != len(shape)
        or any(c < 1 for c in chunk_shape)
        or not layout.is_contiguous_runs()
    ):
        raise CorruptCheckpointError(
            f"{where}: array layout is not one zarrckpt format 1 writes "
            "(regular grid split along leading axes, codecs bytes(little) + crc32c)"
        )
    return layout


def _read_chunk(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    out: np.ndarray[Any, Any],
    coords: tuple[int, ...],
    region: tuple[slice, ...],
    direct: bool,
) -> None:
    name = chunk_key(key, coords)
    valid = math.prod(r.stop - r.start for r in region) * layout.dtype.itemsize
    trailer = bytearray(_CRC_BYTES)
    if direct:
        # The chunk's region is one contiguous run of ``out``: read into it.
        flat = out.reshape(-1).view(np.uint8)
        start = sum(r.start * stride for r, stride in zip(region, out.strides, strict=True))
        data = flat[start : start + valid].data
    else:
        data = np.empty(valid, np.uint8).data
    padding = bytearray(layout.chunk_nbytes - valid)
    try:
        storage.read_into(name, [data, memoryview(padding), memoryview(trailer)])
    except FileNotFoundError:
        raise MissingChunkError(
            f"{storage.url}/{name}: chunk {coords} of {key!r} is missing"
        ) from None
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"chunk {coords} of {key!r}: {exc}") from None
    checksum = _chunk_crc(data, padding)
    stored = int.from_bytes(trailer, "little")
    if checksum != stored:
        raise ChecksumError(
            f"{storage.url}/{name}: chunk {coords} of {key!r} is corrupt "
            f"(stored CRC32C {stored:#010x}, computed {checksum:#010x})"
        )
    if not direct:
        shape = tuple(r.stop - r.start for r in region)
        values = np.frombuffer(data, dtype=_little_endian(layout.dtype)).reshape(shape)
        out[region] = values


def read_arrays(
    storage: Storage,
    targets: Iterable[tuple[str, ArrayLayout, np.ndarray[Any, Any]]],
    *,
    threads: int = DEFAULT_THREADS,
) -> None:
    """Read each stored array ``key`` (with ``layout``) into ``out``, verifying every chunk.

    ``out`` must have the layout's shape; when it is C-contiguous and its
    dtype is the stored little-endian dtype, chunks are read straight into
    its memory.
    """
    tasks: list[Callable[[], None]] = []
    for key, layout, out in targets:
        if tuple(out.shape) != layout.shape:
            raise CorruptCheckpointError(
                f"{storage.url}/{key}: stored shape {layout.shape}, record says {out.shape}"
            )
        if layout.dtype != out.dtype.newbyteorder("="):
            raise CorruptCheckpointError(
                f"{storage.url}/{key}: stored dtype {dtype_name(layout.dtype)}, "
                f"record says {dtype_name(out.dtype)}"
            )
        direct = bool(out.flags.c_contiguous) and out.dtype == _little_endian(out.dtype)
        for coords, region in layout.chunks():
            tasks.append(partial(_read_chunk, storage, key, layout, out, coords, region, direct))
    _run(tasks, threads)
