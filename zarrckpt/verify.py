"""verify: read every byte of a checkpoint and check it against its manifest."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from zarrckpt._commit import COMMIT_KEY, open_committed
from zarrckpt._storage import Storage
from zarrckpt.array_io import (
    ChunkFile,
    IOStats,
    Task,
    chunk_key,
    file_checksum,
    is_chunk_file,
    run_tasks,
)
from zarrckpt.errors import ChecksumError, CorruptCheckpointError, MissingChunkError
from zarrckpt.options import CheckpointOptions

__all__ = ["VerifyReport", "read_checked", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    """A checkpoint that passed :func:`verify`: what was checked and how long it took."""

    path: str
    files: int
    arrays: int
    nbytes: int
    seconds: float

    def __str__(self) -> str:
        mib = self.nbytes / (1 << 20)
        rate = mib / max(self.seconds, 1e-9)
        return (
            f"{self.path}: OK, {self.arrays} arrays, {self.files} files, "
            f"{mib:,.1f} MiB checked in {self.seconds:.2f} s ({rate:,.0f} MiB/s)"
        )


def read_checked(storage: Storage, key: str, entry: ChunkFile) -> bytes:
    """Read file ``key`` and check it against its manifest ``entry``; raise naming what is wrong."""
    where = f"{storage.url}/{key}"
    try:
        data = storage.read(key)
    except FileNotFoundError:
        kind = "chunk" if is_chunk_file(key) else "file"
        raise MissingChunkError(f"{where}: {kind} listed in {COMMIT_KEY} is missing") from None
    if len(data) != entry.size:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes, manifest says {entry.size}")
    checksum = file_checksum(key, data)
    if checksum is None:
        array_key, _, coords = key.rpartition("/c")
        index = tuple(int(c) for c in coords.strip("/").split("/") if c)
        raise ChecksumError(f"{where}: chunk {index} of {array_key!r} is corrupt")
    if checksum != entry.crc32c:
        raise ChecksumError(f"{where}: CRC32C does not match the commit manifest")
    return data


def _check_file(
    storage: Storage,
    prefix: str,
    entry: ChunkFile,
    progress: Callable[[int], None] | None,
) -> None:
    data = read_checked(storage, entry.key[len(prefix) :], entry)
    if progress is not None:
        progress(len(data))


def verify(
    path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    options: CheckpointOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check a committed checkpoint completely, without any live objects.

    Checks the manifest and the record's hash, that every array of the record
    has every chunk file, and reads every file: size and CRC32C against the
    manifest, and each chunk's own CRC32C. Raises the first problem found
    (:class:`~zarrckpt.errors.MissingChunkError`,
    :class:`~zarrckpt.errors.ChecksumError`,
    :class:`~zarrckpt.errors.CorruptCheckpointError`), naming the key and
    chunk. ``progress(nbytes)`` is called after each file.

    Example:
        >>> print(zarrckpt.verify("s3://bucket/run/ckpt-1000"))  # doctest: +SKIP
        s3://bucket/run/ckpt-1000: OK, 150 arrays, 450 files, 2,048.0 MiB checked ...
    """
    start = time.perf_counter()
    checkpoint = open_committed(path, storage_options)
    storage, manifest = checkpoint.storage, checkpoint.manifest
    prefix = f"{manifest.attempt}/" if manifest.attempt else ""
    listed = {f.key[len(prefix) :] for f in manifest.files}
    arrays = 0
    for _, attribute in checkpoint.graph.attributes():
        arrays += 1
        if f"{attribute.key}/zarr.json" not in listed:
            raise MissingChunkError(f"{storage.url}/{attribute.key}: not in {COMMIT_KEY}")
        layout = checkpoint.layout(attribute)  # shape and dtype checked against the record
        for coords in _grid(layout.grid):
            if chunk_key(attribute.key, coords) not in listed:
                raise MissingChunkError(
                    f"{storage.url}/{chunk_key(attribute.key, coords)}: chunk {coords} of "
                    f"{attribute.key!r} is not in {COMMIT_KEY}"
                )
    options = options or CheckpointOptions()
    tasks: list[Task] = [
        (entry.size, partial(_check_file, storage, prefix, entry, progress))
        for entry in manifest.files
    ]
    run_tasks(tasks, options, IOStats())
    return VerifyReport(
        path=checkpoint.url,
        files=len(manifest.files),
        arrays=arrays,
        nbytes=manifest.nbytes,
        seconds=time.perf_counter() - start,
    )


def _grid(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    if math.prod(grid) == 0:
        return []
    return [tuple(int(i) for i in c) for c in np.ndindex(*grid)]
