"""Chunked array I/O: zarr metadata, chunk files with CRC32C, parallel transfers.

Each saved value is one Zarr v3 array. zarr produces the metadata bytes
(``zarr.json``); the chunk files are written and read here, byte for byte what
zarr itself would write with the codecs ``bytes(little) [-> compressor] ->
crc32c``: the chunk's little-endian bytes (edge chunks padded with zeros to the
full chunk size), optionally compressed, then the CRC32C of all of it, 4 bytes
little-endian.

Chunks split an array along its leading axes only (``(1, ..., 1, rows, full,
..., full)``), so every chunk is one contiguous run of the array's memory in C
order: saving writes straight from the live buffer and restoring reads
straight into it, with no intermediate copy for C-contiguous little-endian
arrays stored raw. Every chunk is written, all-zero ones too, and a missing
chunk is an error, never zeros.

Chunk tasks run in a thread pool under a :class:`ByteBudget`: a task starts
only when its chunk's bytes fit in the in-flight budget, so the memory a save
or restore adds is bounded whatever the model size.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
from zarrckpt.codecs import Compression, compression_from_metadata
from zarrckpt.errors import (
    ChecksumError,
    CorruptCheckpointError,
    MissingChunkError,
    UnsupportedDTypeError,
)
from zarrckpt.options import CheckpointOptions

__all__ = [
    "ArrayLayout",
    "ByteBudget",
    "ChunkFile",
    "IOStats",
    "chunk_check_tasks",
    "chunk_size_limits",
    "group_metadata",
    "parse_layout",
    "read_arrays",
    "read_checked",
    "read_layout",
    "read_selection",
    "selection_tasks",
    "write_arrays",
    "write_chunk",
    "write_file",
]

_CRC_BYTES = 4
MAX_METADATA_BYTES = 1 << 20
# The most a compressed chunk may shrink: zstd stores a 128 KiB block of one
# repeated byte in 4 bytes (32768:1), so anything claiming more is damage.
_MAX_COMPRESSION_RATIO = 1 << 16
_MAX_NDIM = 64
# Format 2 writes chunk keys ``c.0.1`` (zarr's default encoding with the "."
# separator): a chunk is a file in its array's directory, with no ``c/0/``
# directories. Format 1 wrote ``c/0/1``; both are read.
CHUNK_SEPARATOR = "."
_SEPARATORS = (".", "/")


@dataclass(frozen=True)
class ArrayLayout:
    """Shape, dtype, chunk shape and compressor of one stored array."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunk_shape: tuple[int, ...]
    compression: Compression | None = None
    separator: str = CHUNK_SEPARATOR  # of chunk keys: "." (format 2) or "/" (format 1)

    @classmethod
    def plan(
        cls,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        chunk_bytes: int = CheckpointOptions.chunk_bytes,
        compression: Compression | None = None,
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
        return cls(tuple(shape), dtype, tuple(chunk), compression)

    @property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each axis."""
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunk_shape, strict=True))

    @property
    def chunk_nbytes(self) -> int:
        """Bytes of one (padded) chunk before compression and checksum."""
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
            yield coords, self.region(coords)

    def region(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        """The part of the array that chunk ``coords`` holds."""
        return tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(coords, self.chunk_shape, self.shape, strict=True)
        )

    def metadata(self) -> bytes:
        """The array's ``zarr.json``, as zarr writes it."""
        return _array_metadata(self)

    def _build_metadata(self) -> bytes:
        compressors = (
            [] if self.compression is None else [self.compression.zarr_codec(self.dtype.itemsize)]
        )
        metadata = ArrayV3Metadata(
            shape=self.shape,
            data_type=zarr_dtype(self.dtype),
            chunk_grid={"name": "regular", "configuration": {"chunk_shape": self.chunk_shape}},
            chunk_key_encoding={"name": "default", "configuration": {"separator": self.separator}},
            fill_value=0,
            codecs=[BytesCodec(endian="little"), *compressors, Crc32cCodec()],
            attributes={},
            dimension_names=None,
        )
        return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()

    def chunk_key(self, array_key: str, coords: tuple[int, ...]) -> str:
        """The file key of chunk ``coords`` of the array stored at ``array_key``."""
        return chunk_key(array_key, coords, self.separator)


@functools.lru_cache(maxsize=256)
def _array_metadata(layout: ArrayLayout) -> bytes:
    """``zarr.json`` of a layout; the layers of a model share a few layouts, built once."""
    return layout._build_metadata()


def chunk_key(array_key: str, coords: tuple[int, ...], separator: str = CHUNK_SEPARATOR) -> str:
    """The file key of a chunk (zarr's default v3 chunk key encoding with ``separator``)."""
    return f"{array_key}/" + separator.join(("c", *map(str, coords)))


def group_metadata(attributes: dict[str, Any] | None = None) -> bytes:
    """A group's ``zarr.json``, as zarr writes it."""
    metadata = GroupMetadata(attributes=attributes or {})
    return metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


@dataclass(slots=True)
class ChunkFile:
    """One file written: its key, its size and its CRC32C (see :func:`file_checksum`)."""

    key: str
    size: int
    crc32c: int


def is_chunk_file(key: str) -> bool:
    """Whether a checkpoint file is a chunk (every file but ``zarr.json`` and the record)."""
    return key.rsplit("/", 1)[-1] != "zarr.json" and key != "object_graph.msgpack"


def file_checksum(key: str, data: bytes | memoryview) -> int | None:
    """The CRC32C a manifest records for a file, or None if a chunk's own CRC is wrong.

    A chunk file ends with the CRC32C of what precedes it, and the CRC32C of
    such a file as a whole is the same constant for every chunk (the CRC
    residue), so for chunks the manifest records the chunk's own CRC32C;
    for other files, the CRC32C of the whole file.
    """
    if not is_chunk_file(key):
        return int(crc32c.crc32c(data))
    if len(data) < _CRC_BYTES:
        return None
    view = memoryview(data)
    stored = int.from_bytes(view[-_CRC_BYTES:], "little")
    return stored if crc32c.crc32c(view[:-_CRC_BYTES]) == stored else None


def read_checked(storage: Storage, key: str, entry: ChunkFile) -> bytes:
    """Read file ``key`` (at most the manifest's size) and check it against its ``entry``.

    Raises MissingChunkError, ChecksumError or CorruptCheckpointError naming the file.
    """
    where = f"{storage.url}/{key}"
    try:
        data = storage.read(key, entry.size)
    except FileNotFoundError:
        kind = "chunk" if is_chunk_file(key) else "file"
        raise MissingChunkError(f"{where}: {kind} listed in _COMMIT is missing") from None
    if len(data) != entry.size:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes, manifest says {entry.size}")
    checksum = file_checksum(key, data)
    if checksum is None:
        array_key, _, coords = key.rpartition("/c")
        index = tuple(int(c) for c in re.split(r"[./]", coords) if c.isdigit())
        raise ChecksumError(f"{where}: chunk {index} of {array_key!r} is corrupt")
    if checksum != entry.crc32c:
        raise ChecksumError(f"{where}: CRC32C does not match the commit manifest")
    return data


# Budget and task runner --------------------------------------------------------


class ByteBudget:
    """Admits work while the bytes in flight stay within ``capacity``.

    ``peak`` is the most bytes ever admitted at once; a test can read it to
    prove the bound. A single request larger than the capacity is admitted
    alone (counted as the whole capacity) so it cannot deadlock.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.peak = 0
        self._condition = threading.Condition()

    def acquire(self, nbytes: int) -> int:
        """Block until ``nbytes`` fit; return the amount to release later."""
        amount = min(nbytes, self.capacity)
        with self._condition:
            while self.in_flight + amount > self.capacity:
                self._condition.wait()
            self.in_flight += amount
            self.peak = max(self.peak, self.in_flight)
        return amount

    def release(self, amount: int) -> None:
        with self._condition:
            self.in_flight -= amount
            self._condition.notify_all()


@dataclass
class IOStats:
    """What one save or restore moved: bytes, files, peak bytes in flight, seconds.

    ``progress`` (``CheckpointOptions.progress``) is called with each file's size.
    An async save also tells how long the caller was blocked
    (``blocked_seconds``: the copy into the staging pool, plus writing what
    did not fit), how many bytes it staged and the pool's size; its other
    counts grow while it writes in the background.
    """

    nbytes: int = 0
    files: int = 0
    peak_inflight_bytes: int = 0
    seconds: float = 0.0
    blocked_seconds: float = 0.0
    staged_bytes: int = 0
    staging_pool_bytes: int = 0
    progress: Callable[[int], None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.nbytes += nbytes
            self.files += 1
        if self.progress is not None:
            self.progress(nbytes)

    @property
    def throughput(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


Task = tuple[int, Callable[[], Any]]  # (bytes in flight while it runs, work)


_pool_numbers = itertools.count()  # unique thread names per run: see _shut_down


def _shut_down(
    pool: ThreadPoolExecutor,
    name: str,
    *,
    cancel: bool,
    failed: threading.Event | None = None,
) -> None:
    """Wait until no task of ``pool`` runs any more, even through Ctrl-C.

    A caller that goes on while tasks still write (an abort removing the
    temporary directory, say) would race them: files could reappear after the
    cleanup. So an interrupt during the wait cancels the tasks not started,
    waits for the running ones (each a single chunk), then is raised.
    """
    interrupted: BaseException | None = None
    prefix = f"{name}_"  # ThreadPoolExecutor names its threads <name>_<n>
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=cancel)
            # A worker whose start() was interrupted is running but unknown to
            # the pool (it records a thread once start() returns): join by name.
            for thread in threading.enumerate():
                if thread.name.startswith(prefix) and thread is not threading.current_thread():
                    thread.join()
            break
        except BaseException as exc:  # KeyboardInterrupt, or another async exception
            interrupted = interrupted or exc
            cancel = True
            if failed is not None:
                failed.set()
    if interrupted is not None:
        raise interrupted


def run_tasks(tasks: list[Task], options: CheckpointOptions, stats: IOStats) -> list[Any]:
    """Run tasks on a thread pool, admitting each only when its bytes fit the budget.

    The first error stops further admissions; it is raised once running tasks end.
    """
    budget = ByteBudget(options.inflight_bytes)
    start = time.perf_counter()
    failed = threading.Event()

    def admitted(amount: int, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except BaseException:
            failed.set()
            raise
        finally:
            budget.release(amount)

    futures: list[Future[Any]] = []
    name = f"zarrckpt-io-{next(_pool_numbers)}"
    pool = ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix=name)
    try:
        for cost, work in tasks:
            amount = budget.acquire(cost)
            if failed.is_set():
                budget.release(amount)
                break
            futures.append(pool.submit(admitted, amount, work))
    except BaseException:  # Ctrl-C while admitting: stop, but let running tasks end
        failed.set()
        _shut_down(pool, name, cancel=True)
        raise
    _shut_down(pool, name, cancel=False, failed=failed)
    stats.seconds += time.perf_counter() - start
    stats.peak_inflight_bytes = max(stats.peak_inflight_bytes, budget.peak)
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    if len(futures) != len(tasks):  # pragma: no cover - an error above always raises first
        raise RuntimeError("chunk I/O stopped early without an error")
    return [future.result() for future in futures]


# Writing ------------------------------------------------------------------------


def _little_endian(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def _chunk_bytes(array: np.ndarray[Any, Any], region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
    """The chunk's values as a flat uint8 array; a view of ``array`` when possible."""
    block = np.ascontiguousarray(array[region], dtype=_little_endian(array.dtype))
    return block.reshape(-1).view(np.uint8)


def _pads_at_end(region_shape: tuple[int, ...], chunk_shape: tuple[int, ...]) -> bool:
    """Whether a chunk holding ``region_shape`` stores its values first, then zero padding.

    Zarr stores every chunk with its full chunk shape in C order, an edge
    chunk padded with zeros along each short axis. That is the values
    followed by padding only when the one short axis (if any) has no longer
    axis before it: always for grids split along leading axes only, not for
    a column chunk at the right edge (the padding is then inside each row).
    """
    short = [k for k, (r, c) in enumerate(zip(region_shape, chunk_shape, strict=True)) if r < c]
    if not short:
        return True
    return len(short) == 1 and math.prod(chunk_shape[: short[0]]) == 1


def _chunk_crc(data: memoryview | bytes, padding: bytes | bytearray = b"") -> int:
    """CRC32C of a chunk's stored bytes (values then zero padding)."""
    checksum: int = crc32c.crc32c(data)
    return crc32c.crc32c(padding, value=checksum) if padding else checksum


def write_chunk(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    array: np.ndarray[Any, Any],
    coords: tuple[int, ...],
    stats: IOStats,
    origin: tuple[int, ...] | None = None,
) -> ChunkFile:
    """Write chunk ``coords``; ``array`` holds the value from ``origin`` (default: all of it)."""
    region = layout.region(coords)
    if origin is not None:
        region = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, origin, strict=True))
    shape = tuple(r.stop - r.start for r in region)
    if _pads_at_end(shape, layout.chunk_shape):
        data = _chunk_bytes(array, region).data
    else:  # an edge chunk short along an inner axis: zarr pads inside each row
        whole = np.zeros(layout.chunk_shape, _little_endian(array.dtype))
        whole[tuple(slice(0, n) for n in shape)] = array[region]
        data = whole.reshape(-1).view(np.uint8).data
    padding = bytes(layout.chunk_nbytes - data.nbytes)
    if layout.compression is not None:
        raw = memoryview(bytes(data) + padding) if padding else data
        data = memoryview(layout.compression.encode(raw, layout.dtype.itemsize))
        padding = b""
    checksum = _chunk_crc(data, padding)
    trailer = checksum.to_bytes(_CRC_BYTES, "little")
    name = layout.chunk_key(key, coords)
    storage.write(name, [data, padding, trailer])
    size = data.nbytes + len(padding) + _CRC_BYTES
    stats.add(size)
    return ChunkFile(name, size, checksum)


def write_file(storage: Storage, key: str, data: bytes, stats: IOStats) -> ChunkFile:
    storage.write(key, [data])
    stats.add(len(data))
    return ChunkFile(key, len(data), crc32c.crc32c(data))


def write_arrays(
    storage: Storage,
    arrays: Iterable[tuple[str, np.ndarray[Any, Any]]],
    options: CheckpointOptions | None = None,
    stats: IOStats | None = None,
    groups_of: Iterable[str] | None = None,
) -> list[ChunkFile]:
    """Write each ``(key, array)`` as a Zarr array at ``key``; return every file written.

    The write plan (each array's chunk grid and compressor, then the chunk
    tasks in key order) is made before any byte is written. Metadata of every
    array and of every group above it is written too; ``groups_of`` names
    the keys whose groups to write instead (a save written in two parts
    writes them with one part only).
    """
    options = options or CheckpointOptions()
    stats = stats if stats is not None else IOStats(progress=options.progress)
    tasks: list[Task] = []
    groups: set[str] = set()
    names: list[str] = []  # every file this writes, for storage.prepare
    for key, array in arrays:
        layout = ArrayLayout.plan(
            tuple(array.shape),
            array.dtype.newbyteorder("="),
            options.chunk_bytes,
            options.compression_for(key),
        )
        metadata = layout.metadata()
        tasks.append(
            (len(metadata), partial(write_file, storage, f"{key}/zarr.json", metadata, stats))
        )
        # A compressed chunk holds its padded copy and its encoding at once.
        cost = layout.chunk_nbytes * (1 if layout.compression is None else 2)
        names.append(f"{key}/zarr.json")
        for coords in np.ndindex(*layout.grid):
            tasks.append((cost, partial(write_chunk, storage, key, layout, array, coords, stats)))
            names.append(layout.chunk_key(key, coords))
        if groups_of is None:
            parts = key.split("/")
            groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
    for key in groups_of or ():
        parts = key.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
    group_json = group_metadata()
    for group in sorted(groups):
        tasks.append(
            (
                len(group_json),
                partial(write_file, storage, f"{group}/zarr.json", group_json, stats),
            )
        )
        names.append(f"{group}/zarr.json")
    storage.prepare(names)
    return run_tasks(tasks, options, stats)


# Reading ------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _integers(value: Any, field: str, least: int) -> tuple[int, ...]:
    """A JSON list of ints of at least ``least`` (no strings, floats or bools)."""
    if not isinstance(value, list) or len(value) > _MAX_NDIM:
        raise ValueError(f"{field} must be a list of at most {_MAX_NDIM} ints, found {value!r}")
    for item in value:
        if type(item) is not int or not least <= item < 1 << 63:
            raise ValueError(f"{field} must hold ints >= {least}, found {item!r}")
    return tuple(value)


def _codec_entry(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ValueError(f"codec {value!r} is not a map with a name")
    configuration = value.get("configuration", {})
    if not isinstance(configuration, dict):
        raise ValueError(f"codec configuration {configuration!r} is not a map")
    return value


def parse_layout(
    raw: bytes,
    where: str,
    shape: tuple[int, ...] | None = None,
    dtype: np.dtype[Any] | None = None,
) -> ArrayLayout:
    """Parse and check an array's ``zarr.json``; only layouts zarrckpt writes are accepted.

    Every field is type-checked (ints are JSON ints, not strings or floats).
    ``shape`` and ``dtype``, when given (the record's), must match the metadata,
    so a damaged ``zarr.json`` can never size a buffer.
    """
    if len(raw) > MAX_METADATA_BYTES:
        raise CorruptCheckpointError(f"{where}: metadata is {len(raw)} bytes, over the limit")
    try:
        doc = json.loads(raw, parse_constant=_reject_constant)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        stored_shape = _integers(doc["shape"], "shape", 0)
        grid = doc["chunk_grid"]
        if not isinstance(grid, dict) or not isinstance(grid.get("configuration"), dict):
            raise ValueError(f"chunk_grid {grid!r} is not a map with a configuration")
        chunk_shape = _integers(grid["configuration"]["chunk_shape"], "chunk_shape", 1)
        codecs = doc["codecs"]
        if not isinstance(codecs, list):
            raise ValueError("codecs must be a list")
        codecs = [_codec_entry(c) for c in codecs]
        names = [c["name"] for c in codecs]
        ok = (
            doc["zarr_format"] == 3
            and doc["node_type"] == "array"
            and grid.get("name") == "regular"
            and doc["chunk_key_encoding"]
            in ({"name": "default", "configuration": {"separator": sep}} for sep in _SEPARATORS)
            and len(names) in (2, 3)
            and names[0] == "bytes"
            and names[-1] == "crc32c"
            and codecs[0].get("configuration", {}).get("endian", "little") == "little"
            and not doc.get("storage_transformers")
        )
        data_type = doc["data_type"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed array metadata ({exc!r})") from None
    if not ok or not isinstance(data_type, str):
        raise CorruptCheckpointError(
            f"{where}: array layout is not one zarrckpt format 1 or 2 writes "
            "(regular chunk grid, default chunk keys, codecs bytes(little) [+ zstd or blosc "
            "lz4] + crc32c)"
        )
    compression = compression_from_metadata(codecs[1], where) if len(codecs) == 3 else None
    try:
        stored_dtype = dtype_from_name(data_type)
    except UnsupportedDTypeError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None
    separator = doc["chunk_key_encoding"]["configuration"]["separator"]
    layout = ArrayLayout(stored_shape, stored_dtype, chunk_shape, compression, separator)
    if len(chunk_shape) != len(stored_shape) or any(
        # zarrckpt's chunks never exceed the array (an empty axis has chunks of 1)
        not 1 <= c <= max(s, 1)
        for c, s in zip(chunk_shape, stored_shape, strict=True)
    ):
        raise CorruptCheckpointError(
            f"{where}: chunk shape {list(chunk_shape)} of shape {list(stored_shape)} does not "
            "fit the array"
        )
    if shape is not None and stored_shape != tuple(shape):
        raise CorruptCheckpointError(
            f"{where}: shape {list(stored_shape)}, the record says {list(shape)}"
        )
    if dtype is not None and stored_dtype != dtype.newbyteorder("="):
        raise CorruptCheckpointError(
            f"{where}: dtype {dtype_name(stored_dtype)}, the record says {dtype_name(dtype)}"
        )
    return layout


def read_layout(
    storage: Storage,
    key: str,
    shape: tuple[int, ...] | None = None,
    dtype: np.dtype[Any] | None = None,
) -> ArrayLayout:
    """Read and parse array ``key``'s ``zarr.json`` (see :func:`parse_layout`).

    For files outside a committed checkpoint; a checkpoint's reads go through
    ``CommittedCheckpoint.layout``, which checks the file against the manifest.
    """
    where = f"{storage.url}/{key}/zarr.json"
    try:
        raw = storage.read(f"{key}/zarr.json", MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise MissingChunkError(f"{where}: array metadata is missing") from None
    return parse_layout(raw, where, shape, dtype)


def chunk_size_limits(layout: ArrayLayout) -> tuple[int, int]:
    """The smallest and largest size a chunk file of ``layout`` can have.

    Raw chunks are exactly the padded chunk plus its CRC; compressed ones are
    at least a frame header and at most the compressor's worst-case expansion.
    """
    raw = layout.chunk_nbytes + _CRC_BYTES
    if layout.compression is None:
        return raw, raw
    smallest = max(_CRC_BYTES + 1, layout.chunk_nbytes // _MAX_COMPRESSION_RATIO)
    return smallest, raw + layout.chunk_nbytes // 128 + (64 << 10)


def _read_chunk(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    out: np.ndarray[Any, Any],
    coords: tuple[int, ...],
    direct: bool,
    stats: IOStats,
    files: Mapping[str, ChunkFile],
    region: tuple[slice, ...] | None = None,
) -> None:
    """Read chunk ``coords`` into ``out[region]`` (default: the chunk's region of the array).

    The chunk must be the one the manifest lists (``files``: size and CRC32C),
    end with its own matching CRC32C, decode within its declared size, and
    (bool arrays) hold only 0 and 1.
    """
    name = layout.chunk_key(key, coords)
    where = f"{storage.url}/{name}: chunk {coords} of {key!r}"
    expected = files.get(name)
    if expected is None:
        raise MissingChunkError(f"{where} is not listed in _COMMIT")
    region = layout.region(coords) if region is None else region
    shape = tuple(r.stop - r.start for r in region)
    valid = math.prod(shape) * layout.dtype.itemsize
    padded = valid != layout.chunk_nbytes
    # An edge chunk short along an inner axis holds padding inside its rows.
    at_end = _pads_at_end(shape, layout.chunk_shape)
    # A compressed edge chunk decodes to its padded size, more than its region.
    in_place = direct and at_end and not (layout.compression is not None and padded)
    if in_place:
        # The chunk's region is one contiguous run of ``out``: fill it there.
        start = sum(r.start * stride for r, stride in zip(region, out.strides, strict=True))
        target = out.reshape(-1).view(np.uint8)[start : start + valid].data
    else:
        whole_chunk = layout.compression is not None or not at_end
        target = np.empty(layout.chunk_nbytes if whole_chunk else valid, np.uint8).data
    try:
        if layout.compression is None:
            padding = bytearray(layout.chunk_nbytes - target.nbytes)
            trailer_buffer = bytearray(_CRC_BYTES)
            storage.read_into(name, [target, memoryview(padding), memoryview(trailer_buffer)])
            trailer = memoryview(trailer_buffer)
            checksum = _chunk_crc(target, padding)
            size = layout.chunk_nbytes + _CRC_BYTES
        else:
            whole = memoryview(storage.read(name, expected.size))
            if len(whole) < _CRC_BYTES:
                raise CorruptCheckpointError(f"{where}: file has {len(whole)} bytes")
            encoded, trailer = whole[:-_CRC_BYTES], whole[-_CRC_BYTES:]
            checksum = _chunk_crc(encoded)
            size = len(whole)
    except FileNotFoundError:
        raise MissingChunkError(f"{where} is missing") from None
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None
    stored = int.from_bytes(trailer, "little")
    if checksum != stored:
        raise ChecksumError(
            f"{where} is corrupt (stored CRC32C {stored:#010x}, computed {checksum:#010x})"
        )
    if checksum != expected.crc32c or size != expected.size:
        raise ChecksumError(
            f"{where} is not the chunk the commit manifest lists ({size} bytes, CRC32C "
            f"{checksum:#010x}; _COMMIT says {expected.size} bytes, {expected.crc32c:#010x}): "
            "a chunk from another place, checkpoint or time"
        )
    if layout.compression is not None:
        layout.compression.decode_checked(encoded, target, where)
    if layout.dtype == np.bool_ and np.frombuffer(target, np.uint8).max(initial=0) > 1:
        raise CorruptCheckpointError(f"{where}: a bool chunk holds bytes other than 0 and 1")
    stats.add(size)
    if not in_place:
        dtype = _little_endian(layout.dtype)
        if at_end:
            values = np.frombuffer(target, dtype, count=valid // layout.dtype.itemsize)
            out[region] = values.reshape(shape)
        else:
            values = np.frombuffer(target, dtype).reshape(layout.chunk_shape)
            out[region] = values[tuple(slice(0, n) for n in shape)]


def read_selection(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    selection: tuple[slice, ...],
    files: Mapping[str, ChunkFile],
    options: CheckpointOptions | None = None,
    stats: IOStats | None = None,
) -> np.ndarray[Any, Any]:
    """Read ``array[selection]`` (one slice with step >= 1 per axis) touching only its chunks.

    See :func:`selection_tasks`.
    """
    options = options or CheckpointOptions()
    stats = stats if stats is not None else IOStats(progress=options.progress)
    ranges = [range(*s.indices(n)) for s, n in zip(selection, layout.shape, strict=True)]
    result = np.empty(tuple(len(r) for r in ranges), layout.dtype)
    run_tasks(
        selection_tasks(storage, key, layout, selection, result, files, stats), options, stats
    )
    return result


def selection_tasks(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    selection: tuple[slice, ...],
    out: np.ndarray[Any, Any],
    files: Mapping[str, ChunkFile],
    stats: IOStats,
) -> list[Task]:
    """Tasks that read ``array[selection]`` into ``out`` (of the selection's shape).

    Each chunk that overlaps the selection is read whole (its CRC covers all of
    it), admitted under the byte budget; no other chunk is read. A chunk whose
    region is one contiguous run of a C-contiguous ``out`` (a selection of
    whole trailing rows, ``a[i:j]``, ``a[k, i:j]``, ``a[...]``, of an array
    chunked along leading axes) is read straight into ``out``'s memory; any
    other is read into a chunk-sized buffer and its overlap copied into ``out``.
    """
    ranges = [range(*s.indices(n)) for s, n in zip(selection, layout.shape, strict=True)]
    if tuple(out.shape) != tuple(len(r) for r in ranges):
        raise ValueError(f"{key}: out has shape {out.shape}, the selection {selection}")
    if out.size == 0:
        return []
    touched = [
        [i for i in range(r[0] // c, r[-1] // c + 1) if _touches(r, i, c)]
        for r, c in zip(ranges, layout.chunk_shape, strict=True)
    ]
    direct = (
        layout.dtype == _little_endian(layout.dtype)
        and out.dtype == _little_endian(out.dtype)
        and bool(out.flags.c_contiguous)
        and layout.is_contiguous_runs()
    )
    # Axes from the first one the selection does not take whole to the last:
    # a chunk region inside the selection is one contiguous run of the result
    # when every axis after its split axis is whole in the selection too.
    whole = [r.step == 1 and len(r) == n for r, n in zip(ranges, layout.shape, strict=True)]

    def inside(region: tuple[slice, ...]) -> bool:
        if layout.compression is not None and any(
            g.stop - g.start != c for g, c in zip(region, layout.chunk_shape, strict=True)
        ):
            return False  # a compressed edge chunk decodes to more than its region
        split = next((k for k, c in enumerate(layout.chunk_shape) if c != 1), len(region))
        return all(
            r.step == 1 and r.start <= g.start and g.stop <= r.stop
            for r, g in zip(ranges, region, strict=True)
        ) and all(whole[split + 1 :])

    def read_one(coords: tuple[int, ...]) -> None:
        region = layout.region(coords)
        if direct and inside(region):
            shifted = tuple(
                slice(g.start - r.start, g.stop - r.start)
                for g, r in zip(region, ranges, strict=True)
            )
            _read_chunk(storage, key, layout, out, coords, True, stats, files, shifted)
            return
        chunk_direct = layout.dtype == _little_endian(layout.dtype)
        block = np.empty(tuple(g.stop - g.start for g in region), layout.dtype)
        local = tuple(slice(0, g.stop - g.start) for g in region)
        _read_chunk(storage, key, layout, block, coords, chunk_direct, stats, files, local)
        source, target = [], []
        for r, g in zip(ranges, region, strict=True):
            start, stop = _first_at_or_after(r, g.start), _first_at_or_after(r, g.stop)
            first = r[start] - g.start
            source.append(slice(first, first + (stop - start - 1) * r.step + 1, r.step))
            target.append(slice(start, stop))
        out[tuple(target)] = block[tuple(source)]

    cost = layout.chunk_nbytes * (1 if layout.compression is None else 2)
    return [(cost, partial(read_one, tuple(coords))) for coords in itertools.product(*touched)]


def _first_at_or_after(r: range, value: int) -> int:
    """Index in ``r`` (step >= 1) of the first element >= ``value`` (len(r) if none)."""
    if value <= r.start:
        return 0
    return min(len(r), -(-(value - r.start) // r.step))


def _touches(r: range, chunk: int, size: int) -> bool:
    """Whether ``r`` has an element in chunk ``chunk`` (of ``size`` along the axis)."""
    index = _first_at_or_after(r, chunk * size)
    return index < len(r) and r[index] < (chunk + 1) * size


def chunk_check_tasks(
    storage: Storage,
    key: str,
    layout: ArrayLayout,
    files: Mapping[str, ChunkFile],
    stats: IOStats,
) -> list[Task]:
    """Tasks that read and check every chunk of array ``key`` as a restore would, keeping nothing.

    Each chunk is read into a scratch buffer of its own size (held only while
    its task runs): its size and CRC32C against the manifest and its own
    trailer, its decoding when compressed, its values when bool.
    """
    direct = layout.dtype == _little_endian(layout.dtype)

    def check(coords: tuple[int, ...]) -> None:
        region = layout.region(coords)
        block = np.empty(tuple(r.stop - r.start for r in region), layout.dtype)
        local = tuple(slice(0, r.stop - r.start) for r in region)
        _read_chunk(storage, key, layout, block, coords, direct, stats, files, local)

    cost = layout.chunk_nbytes * (1 if layout.compression is None else 2)
    return [(cost, partial(check, tuple(coords))) for coords in np.ndindex(*layout.grid)]


def read_arrays(
    storage: Storage,
    targets: Iterable[
        tuple[str, ArrayLayout, np.ndarray[Any, Any]]
        | tuple[str, ArrayLayout, np.ndarray[Any, Any], tuple[slice, ...] | None]
    ],
    files: Mapping[str, ChunkFile],
    options: CheckpointOptions | None = None,
    stats: IOStats | None = None,
) -> IOStats:
    """Read each stored array ``key`` (with ``layout``) into ``out``, verifying every chunk.

    ``files`` is the commit manifest's entries by key: every chunk must match its own.

    A target ``(key, layout, out)`` reads the whole array: ``out`` must have
    the layout's shape; when it is C-contiguous, its dtype is the stored
    little-endian dtype and the chunks split leading axes only, chunks are
    read straight into its memory. A target ``(key, layout, out, region)``
    reads only the chunks overlapping ``region`` (one block of a sharded
    value, of ``out``'s shape).
    """
    options = options or CheckpointOptions()
    stats = stats if stats is not None else IOStats(progress=options.progress)
    tasks: list[Task] = []
    for target in targets:
        key, layout, out = target[0], target[1], target[2]
        region = target[3] if len(target) == 4 else None
        if layout.dtype != out.dtype.newbyteorder("="):
            raise CorruptCheckpointError(
                f"{storage.url}/{key}: stored dtype {dtype_name(layout.dtype)}, "
                f"record says {dtype_name(out.dtype)}"
            )
        if region is not None:
            tasks.extend(selection_tasks(storage, key, layout, region, out, files, stats))
            continue
        if tuple(out.shape) != layout.shape:
            raise CorruptCheckpointError(
                f"{storage.url}/{key}: stored shape {layout.shape}, record says {out.shape}"
            )
        direct = (
            bool(out.flags.c_contiguous)
            and out.dtype == _little_endian(out.dtype)
            and layout.is_contiguous_runs()
        )
        cost = layout.chunk_nbytes * (1 if layout.compression is None else 2)
        for coords in np.ndindex(*layout.grid):
            tasks.append(
                (
                    cost,
                    partial(_read_chunk, storage, key, layout, out, coords, direct, stats, files),
                )
            )
    run_tasks(tasks, options, stats)
    return stats
