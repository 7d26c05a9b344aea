"""copy_checkpoint: copy a committed checkpoint anywhere, verified, committed atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any

from zarrckpt._commit import Manifest, begin_commit, open_committed, writer_identity
from zarrckpt._storage import Storage
from zarrckpt.array_io import ChunkFile, IOStats, Task, read_checked, run_tasks
from zarrckpt.options import CheckpointOptions

__all__ = ["copy_checkpoint"]


def _copy_file(
    source: Storage,
    target: Storage,
    entry: ChunkFile,
    progress: Callable[[int], None] | None,
) -> ChunkFile:
    data = read_checked(source, entry.key, entry)
    target.write(entry.key, [data])
    if progress is not None:
        progress(len(data))
    return entry


def copy_checkpoint(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    source_storage_options: dict[str, Any] | None = None,
    destination_storage_options: dict[str, Any] | None = None,
    options: CheckpointOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Copy the committed checkpoint ``source`` to ``destination`` (local <-> S3 <-> ...).

    Every file is checked against the source manifest (size and CRC32C) as it
    is copied, and the copy is committed with the destination's own protocol,
    so a reader never sees a partial copy. Returns ``destination``.

    Example:
        >>> copy_checkpoint("/ckpts/ckpt-9", "s3://bucket/run/ckpt-9",
        ...                 destination_storage_options={"profile": "training"})
    """
    options = options or CheckpointOptions()
    checkpoint = open_committed(source, source_storage_options)
    manifest = checkpoint.manifest
    with checkpoint.reading():
        checkpoint.check_manifest()  # every file bounded before any is read
    commit = begin_commit(
        destination, destination_storage_options, fsync=options.fsync, threads=options.threads
    )
    target = commit.create()
    try:
        tasks: list[Task] = [
            (entry.size, partial(_copy_file, checkpoint.storage, target, entry, progress))
            for entry in checkpoint.files.values()
        ]
        with checkpoint.reading():
            copied: list[ChunkFile] = run_tasks(tasks, options, IOStats())
        commit.check_written(copied)
        prefix = f"{commit.attempt}/" if commit.attempt else ""
        commit.publish(
            Manifest(
                record_sha256=manifest.record_sha256,
                files=tuple(ChunkFile(prefix + f.key, f.size, f.crc32c) for f in copied),
                attempt=commit.attempt,
                created=manifest.created,
                metadata=manifest.metadata,
                writer=writer_identity(),
                format=manifest.format,  # the files are copied as they are
            )
        )
    except BaseException:
        commit.abort()
        raise
    return os.fspath(destination)
