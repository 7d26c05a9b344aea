"""Checkpoints in a directory: listing, the latest, deleting, garbage collection.

The committed checkpoints themselves are the truth: a checkpoint is listed as
committed only if its ``_COMMIT`` manifest exists and decodes. Works on local
paths and every fsspec URL.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import fsspec

from zarrckpt._commit import COMMIT_KEY, DELETING_MARKER, TEMP_MARKER, Manifest, MetadataValue
from zarrckpt._storage import fsync_directory, is_local
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.errors import ZarrckptError

__all__ = ["CheckpointInfo", "delete_checkpoint", "gc", "latest_checkpoint", "list_checkpoints"]

_NUMBERED = re.compile(r"(?P<name>.+)-(?P<number>\d+)")
_STATE_TEMP = re.compile(r"zarrckpt_state\..+\.json\.[0-9a-f]{32}\.tmp")
_ATTEMPT = re.compile(r"attempt-[0-9a-f]{32}")
PathLike = str | os.PathLike[str]


def state_file_name(checkpoint_name: str) -> str:
    """The name of the state file of a manager of ``<checkpoint_name>-<n>`` checkpoints."""
    return f"zarrckpt_state.{checkpoint_name}.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory: where, its number, when, how large, and whether committed.

    ``created`` is the commit time for committed checkpoints and the last
    modification time otherwise; ``nbytes`` is 0 when not committed;
    ``metadata`` is what the writer stored in the manifest (a manager's metrics).
    """

    path: str
    name: str
    number: int | None
    created: float
    nbytes: int
    committed: bool
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)

    def __str__(self) -> str:
        when = datetime.fromtimestamp(self.created).isoformat(sep=" ", timespec="seconds")
        state = "committed" if self.committed else "NOT COMMITTED"
        return f"{self.path}  {when}  {self.nbytes / (1 << 20):,.1f} MiB  {state}"


def _join(fs: fsspec.AbstractFileSystem, root: str, name: str) -> str:
    return os.path.join(root, name) if is_local(fs) else posixpath.join(root, name)


def _display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(fs) else str(fs.unstrip_protocol(path))


def _entries(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, bool]]:
    """(name, is_directory) of every entry of ``root``; [] if it does not exist."""
    # Other processes write here too: never trust a cached listing (s3fs keeps
    # one per filesystem instance, and fsspec shares instances).
    fs.invalidate_cache(root)
    try:
        listing = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    return [
        (posixpath.basename(str(item["name"]).rstrip("/")), item.get("type") == "directory")
        for item in listing
    ]


def _read_marker(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    """The bytes of ``path``'s ``_COMMIT``, or None if it has none."""
    marker = _join(fs, path, COMMIT_KEY)
    fs.invalidate_cache(marker)  # see FsspecStorage.read
    try:
        data: bytes = fs.cat_file(marker)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return data


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str) -> Manifest | None:
    """``path``'s commit manifest, or None if it has none or it does not decode."""
    data = _read_marker(fs, path)
    if data is None:
        return None
    try:
        return Manifest.decode(data, where=_display(fs, _join(fs, path, COMMIT_KEY)))
    except ZarrckptError:
        return None


def _mtime(fs: fsspec.AbstractFileSystem, path: str) -> float:
    """The newest modification time of anything at or under ``path`` (0 if unknown)."""
    if is_local(fs):
        newest = os.stat(path).st_mtime
        for directory, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.stat(os.path.join(directory, name)).st_mtime)
        return newest
    newest = 0.0
    for info in fs.find(path, detail=True).values():
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
        if isinstance(stamp, datetime):
            newest = max(newest, stamp.timestamp())
        elif isinstance(stamp, int | float):
            newest = max(newest, float(stamp))
    return newest


def list_checkpoints(
    directory: PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    checkpoint_name: str | None = None,
) -> list[CheckpointInfo]:
    """Every checkpoint directory in ``directory``, committed or not, by number.

    Only directories named ``<name>-<number>`` or holding a ``_COMMIT`` are
    listed (temporary directories of interrupted saves are not; :func:`gc`
    removes them). ``checkpoint_name`` keeps only ``<checkpoint_name>-<n>``.

    Example:
        >>> [c.path for c in list_checkpoints("/ckpts") if c.committed]  # doctest: +SKIP
        ['/ckpts/ckpt-1', '/ckpts/ckpt-2']
    """
    fs, root = resolve_path(directory, storage_options)
    found = []
    for name, is_directory in _entries(fs, root):
        if not is_directory or name.startswith("."):
            continue
        numbered = _NUMBERED.fullmatch(name)
        if checkpoint_name is not None and (not numbered or numbered["name"] != checkpoint_name):
            continue
        path = _join(fs, root, name)
        manifest = _read_manifest(fs, path)
        if manifest is None and not numbered:
            continue
        found.append(
            CheckpointInfo(
                path=_display(fs, path),
                name=name,
                number=int(numbered["number"]) if numbered else None,
                created=manifest.created if manifest else _mtime(fs, path),
                nbytes=manifest.nbytes if manifest else 0,
                committed=manifest is not None,
                metadata=manifest.metadata if manifest else {},
            )
        )
    # By number: times of committed and uncommitted entries come from different
    # clocks (manifests versus the store's modification times, whole seconds on S3).
    found.sort(key=lambda c: (c.number if c.number is not None else -1, c.created, c.name))
    return found


def latest_checkpoint(
    directory: PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    checkpoint_name: str | None = None,
) -> str | None:
    """The most recently committed checkpoint in ``directory``, or None.

    Example:
        >>> ckpt.restore(zarrckpt.latest_checkpoint("s3://bucket/run"))  # doctest: +SKIP
    """
    committed = [
        c
        for c in list_checkpoints(directory, storage_options, checkpoint_name=checkpoint_name)
        if c.committed
    ]
    return max(committed, key=lambda c: (c.created, c.number or 0)).path if committed else None


def delete_checkpoint(path: PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Delete a checkpoint: it stops being a checkpoint first, then its data goes.

    Local: renamed out of the way in one step, then removed. Object stores: the
    ``_COMMIT`` marker is removed first, then every object under the prefix (in
    batches). A crash part-way leaves garbage for :func:`gc`, never a checkpoint
    that looks whole. Deleting a checkpoint that is not there does nothing.

    Example:
        >>> delete_checkpoint("s3://bucket/run/ckpt-3")  # doctest: +SKIP
    """
    fs, root = resolve_path(path, storage_options)
    if is_local(fs):
        parent, name = os.path.split(root)
        doomed = os.path.join(parent, f".{name}{DELETING_MARKER}{uuid.uuid4().hex}")
        try:
            os.rename(root, doomed)
        except FileNotFoundError:
            return
        fsync_directory(parent)  # gone for good before the data goes
        shutil.rmtree(doomed)
        return
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(posixpath.join(root, COMMIT_KEY))
    with contextlib.suppress(FileNotFoundError):
        fs.rm(root, recursive=True)


def gc(
    directory: PathLike,
    older_than: float = 3600.0,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Remove leftovers of interrupted saves and deletes older than ``older_than`` seconds.

    Only what zarrckpt itself leaves behind is touched:

    - local filesystems: temporary directories of saves (``.<name>.zarrckpt-tmp-*``)
      and of deletes (``.<name>.zarrckpt-deleting-*``), and temporary copies of
      a manager's state file;
    - object stores: ``attempt-<hex>`` prefixes of a checkpoint that its
      ``_COMMIT`` does not name (a writer that died, lost a race or was being
      deleted), and multipart uploads under ``directory`` started before the
      threshold.

    A checkpoint whose ``_COMMIT`` exists is never removed, even one this
    version cannot decode (a newer format, or damage: :func:`verify` says
    which), and nothing else in ``directory`` is touched. Returns what was
    removed.

    Example:
        >>> gc("s3://bucket/run", older_than=24 * 3600)  # doctest: +SKIP
        ['s3://bucket/run/ckpt-7/attempt-3f2a...']
    """
    fs, root = resolve_path(directory, storage_options)
    cutoff = time.time() - older_than
    removed: list[str] = []
    local = is_local(fs)

    def stale(path: str) -> bool:
        return _mtime(fs, path) <= cutoff

    for name, is_directory in _entries(fs, root):
        path = _join(fs, root, name)
        if not is_directory:
            if _STATE_TEMP.fullmatch(name) and stale(path):
                fs.rm_file(path)  # a state file replacement that was cut short
                removed.append(_display(fs, path))
            continue
        if local:
            hidden = name.startswith(".") and (TEMP_MARKER in name or DELETING_MARKER in name)
            if hidden and stale(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        children = _entries(fs, path)
        attempts = [child for child, is_dir in children if is_dir and _ATTEMPT.fullmatch(child)]
        if not attempts:
            if not children and _NUMBERED.fullmatch(name) and stale(path):
                _remove_empty_directory(fs, path)  # what an aborted attempt leaves
            continue
        marker = _read_marker(fs, path)
        if marker is None:
            live = None
        else:
            try:
                live = Manifest.decode(marker, where=_display(fs, path)).attempt
            except ZarrckptError:
                continue  # committed in a format this version does not know: not ours to judge
        for attempt in attempts:
            if attempt == live:
                continue
            leftover = _join(fs, path, attempt)
            if not stale(leftover):
                continue
            # A writer may have published this attempt since the marker was read.
            again = _read_manifest(fs, path) if marker is None else None
            if again is not None and again.attempt == attempt:
                continue
            with contextlib.suppress(FileNotFoundError):
                fs.rm(leftover, recursive=True)
            removed.append(_display(fs, leftover))
        if marker is None and not _entries(fs, path):
            _remove_empty_directory(fs, path)
    removed.extend(_abort_stale_uploads(fs, root, cutoff))
    return removed


def _remove_empty_directory(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Filesystems with real directories keep a checkpoint directory emptied of attempts."""
    with contextlib.suppress(OSError):  # not empty after all, or already gone
        fs.rmdir(path)


def _abort_stale_uploads(fs: fsspec.AbstractFileSystem, root: str, cutoff: float) -> list[str]:
    """Abort S3 multipart uploads under ``root`` started before ``cutoff``."""
    if not hasattr(fs, "list_multipart_uploads"):
        return []
    bucket, _, prefix = root.partition("/")
    aborted = []
    try:
        uploads = fs.list_multipart_uploads(bucket)
    except FileNotFoundError:  # no such bucket: nothing to abort
        return []
    for upload in uploads:
        key = upload.get("Key", "")
        started = upload.get("Initiated")
        if not key.startswith(f"{prefix.rstrip('/')}/" if prefix else "") or not isinstance(
            started, datetime
        ):
            continue
        if started.timestamp() <= cutoff:
            fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
            )
            aborted.append(f"s3://{bucket}/{key} (multipart upload)")
    return aborted
