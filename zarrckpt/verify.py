"""verify: read every byte of a checkpoint and check it against its manifest."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from zarrckpt._commit import COMMIT_KEY, CommittedCheckpoint, open_committed
from zarrckpt._storage import LocalStorage, Storage
from zarrckpt.array_io import (
    ChunkFile,
    IOStats,
    Task,
    chunk_check_tasks,
    read_checked,
    run_tasks,
)
from zarrckpt.directory import format_size
from zarrckpt.errors import CorruptCheckpointError
from zarrckpt.options import CheckpointOptions
from zarrckpt.record import printable

__all__ = ["VerifyReport", "verify"]

_ATTEMPT = re.compile(r"attempt-[0-9a-f]{32}")
_NAMES_SHOWN = 10  # unlisted files named in a message; the rest are counted


@dataclass(frozen=True)
class VerifyReport:
    """A checkpoint that passed :func:`verify`: what was checked and how long it took.

    ``unlisted`` are the files (and symlinks, FIFOs, ...) found inside the
    checkpoint that its manifest does not list, relative to the checkpoint:
    zarrckpt never writes such a file into a committed checkpoint and never
    reads one, so they do not fail :func:`verify` unless ``strict=True``.
    Other writers' ``attempt-<hex>`` prefixes on object stores are not
    counted: :func:`~zarrckpt.gc` removes them.
    """

    path: str
    files: int
    arrays: int
    nbytes: int
    seconds: float
    unlisted: tuple[str, ...] = ()

    @property
    def rate(self) -> float:
        """Bytes checked per second."""
        return self.nbytes / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        text = (
            f"{self.path}: OK, {self.arrays} arrays, {self.files} files, "
            f"{format_size(self.nbytes)} checked in {self.seconds:.2f} s "
            f"({format_size(self.rate)}/s)"
        )
        if self.unlisted:
            text += f"; {describe_unlisted(self.unlisted)}"
        return text


def describe_unlisted(names: tuple[str, ...]) -> str:
    """``"2 files not listed in the manifest (never read by zarrckpt): a, b"``, cut at 10."""
    shown = ", ".join(printable(name) for name in names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return (
        f"{len(names)} {'file' if len(names) == 1 else 'files'} not listed in the manifest "
        f"(never read by zarrckpt): {shown}" + (f" and {more} more" if more > 0 else "")
    )


def verify(
    path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    options: CheckpointOptions | None = None,
    progress: Callable[[int], None] | None = None,
    strict: bool = False,
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

    Files inside the checkpoint that the manifest does not list are reported
    in :attr:`VerifyReport.unlisted`; with ``strict`` they fail verification
    (:class:`~zarrckpt.errors.CorruptCheckpointError` naming them), after
    every listed file has been checked.

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
            chunks.update(layout.chunk_key(key, tuple(c)) for c in np.ndindex(*layout.grid))
        for key, entry in files.items():
            if key not in chunks:
                tasks.append((entry.size, partial(_check_file, storage, key, entry, stats)))
        run_tasks(tasks, options or CheckpointOptions(), IOStats())
    unlisted = unlisted_files(checkpoint)
    if strict and unlisted:
        raise CorruptCheckpointError(f"{checkpoint.url}: {describe_unlisted(unlisted)}")
    return VerifyReport(
        path=checkpoint.url,
        files=len(files),
        arrays=len(layouts),
        nbytes=checkpoint.manifest.nbytes,
        seconds=time.perf_counter() - start,
        unlisted=unlisted,
    )


def unlisted_files(checkpoint: CommittedCheckpoint) -> tuple[str, ...]:
    """Entries inside ``checkpoint`` its manifest does not list, relative to it, sorted.

    ``_COMMIT`` itself is not one, nor (on object stores) the files of other
    ``attempt-<hex>`` prefixes: leftovers of other writers, which gc removes.
    """
    top = checkpoint.top or checkpoint.storage
    attempt = checkpoint.manifest.attempt
    listed = checkpoint.files
    found = []
    for key in _entries(top):
        if key == COMMIT_KEY:
            continue
        if attempt:
            head, _, rest = key.partition("/")
            if head == attempt and rest in listed:
                continue
            if head != attempt and rest and _ATTEMPT.fullmatch(head):
                continue  # another writer's attempt
        elif key in listed:
            continue
        found.append(key)
    return tuple(sorted(found))


def _entries(storage: Storage) -> list[str]:
    """Every non-directory entry under ``storage``'s root, relative to it.

    On a local disk symlinks (to directories too, never followed), FIFOs and
    other special files count as well as regular files.
    """
    if not isinstance(storage, LocalStorage):
        return list(storage.sizes())
    found = []
    for directory, subdirectories, names in os.walk(storage.root):
        links = [name for name in subdirectories if os.path.islink(os.path.join(directory, name))]
        for name in [*names, *links]:
            path = os.path.relpath(os.path.join(directory, name), storage.root)
            found.append(path.replace(os.sep, "/"))
    return found


def _check_file(storage: Storage, key: str, entry: ChunkFile, stats: IOStats) -> None:
    data = read_checked(storage, key, entry)
    stats.add(len(data))
