"""verify: read every byte of a checkpoint and check it against its manifest."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from zarrckpt._commit import open_committed
from zarrckpt._storage import Storage
from zarrckpt.array_io import (
    ChunkFile,
    IOStats,
    Task,
    chunk_check_tasks,
    chunk_key,
    read_checked,
    run_tasks,
)
from zarrckpt.options import CheckpointOptions

__all__ = ["VerifyReport", "verify"]


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


def verify(
    path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    options: CheckpointOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check a committed checkpoint completely, without any live objects.

    Checks the manifest's own checksum and the record's hash; that every file
    the manifest lists belongs to the checkpoint and every array's
    ``zarr.json`` agrees with the record and lists exactly its chunks; then
    reads every file: size and CRC32C against the manifest, each chunk's own
    CRC32C, compressed chunks decoded (bounded by their declared size), bool
    values 0 or 1. Raises the first problem found
    (:class:`~zarrckpt.errors.MissingChunkError`,
    :class:`~zarrckpt.errors.ChecksumError`,
    :class:`~zarrckpt.errors.CorruptCheckpointError`), naming the key and
    chunk; a checkpoint deleted while it is checked raises
    :class:`~zarrckpt.errors.CheckpointNotFoundError`. ``progress(nbytes)`` is
    called after each file.

    Example:
        >>> print(zarrckpt.verify("s3://bucket/run/ckpt-1000"))  # doctest: +SKIP
        s3://bucket/run/ckpt-1000: OK, 150 arrays, 450 files, 2,048.0 MiB checked ...
    """
    start = time.perf_counter()
    checkpoint = open_committed(path, storage_options)
    storage, files = checkpoint.storage, checkpoint.files
    stats = IOStats(progress=progress)
    with checkpoint.reading():
        layouts = checkpoint.check_manifest()
        tasks: list[Task] = []
        chunks: set[str] = set()
        for key, layout in layouts.items():
            checks = chunk_check_tasks(storage, key, layout, files, stats)
            tasks.extend(checks)
            chunks.update(chunk_key(key, tuple(c)) for c in np.ndindex(*layout.grid))
        for key, entry in files.items():
            if key not in chunks:
                tasks.append((entry.size, partial(_check_file, storage, key, entry, stats)))
        run_tasks(tasks, options or CheckpointOptions(), IOStats())
    return VerifyReport(
        path=checkpoint.url,
        files=len(files),
        arrays=len(layouts),
        nbytes=checkpoint.manifest.nbytes,
        seconds=time.perf_counter() - start,
    )


def _check_file(storage: Storage, key: str, entry: ChunkFile, stats: IOStats) -> None:
    data = read_checked(storage, key, entry)
    stats.add(len(data))
