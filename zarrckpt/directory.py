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
from functools import partial
from typing import Any

import fsspec

from zarrckpt._commit import (
    COMMIT_KEY,
    DELETING_MARKER,
    TEMP_MARKER,
    Manifest,
    MetadataValue,
    read_marker,
)
from zarrckpt._storage import (
    fsync_directory,
    is_local,
    missing_bucket,
    missing_bucket_message,
    open_storage,
)
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.errors import CheckpointNotFoundError, ZarrckptError

__all__ = [
    "CheckpointInfo",
    "GcReport",
    "Leftover",
    "delete_checkpoint",
    "format_duration",
    "format_size",
    "format_time",
    "gc",
    "gc_report",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_leftovers",
]

_NUMBERED = re.compile(r"(?P<name>.+)-(?P<number>\d+)")
_STATE_TEMP = re.compile(r"zarrckpt_state\.(?P<name>.+)\.json\.[0-9a-f]{32}\.tmp")
_HIDDEN = re.compile(
    rf"\.(?P<checkpoint>.+?)(?:{re.escape(TEMP_MARKER)}|{re.escape(DELETING_MARKER)}).*"
)
_ATTEMPT = re.compile(r"attempt-[0-9a-f]{32}")
PathLike = str | os.PathLike[str]


def state_file_name(checkpoint_name: str) -> str:
    """The name of the state file of a manager of ``<checkpoint_name>-<n>`` checkpoints."""
    return f"zarrckpt_state.{checkpoint_name}.json"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory: where, its number, when, how large, and whether committed.

    ``created`` is the commit time for committed checkpoints and the last
    modification time otherwise (information only: checkpoints are ordered by
    number); ``nbytes`` is 0 when not committed; ``metadata`` is what the
    writer stored in the manifest (a manager's metrics). ``damage`` says why a
    ``_COMMIT`` that exists could not be read ("" when there is none or it
    decodes): such a checkpoint is not committed, and is never removed by
    zarrckpt (``zarrckpt verify`` tells more).
    """

    path: str
    name: str
    number: int | None
    created: float
    nbytes: int
    committed: bool
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)
    damage: str = ""
    stored_nbytes: int = 0

    @property
    def state(self) -> str:
        """ "committed", "DAMAGED" or "NOT COMMITTED"."""
        return "committed" if self.committed else "DAMAGED" if self.damage else "NOT COMMITTED"

    @property
    def size(self) -> int:
        """Bytes of the checkpoint: the manifest's total, or what is stored when not committed."""
        return self.nbytes if self.committed else self.stored_nbytes

    def __str__(self) -> str:
        return f"{self.path}  {format_time(self.created)}  {format_size(self.size)}  {self.state}"


def format_time(seconds: float) -> str:
    """A local date and time, or a placeholder for a time no calendar takes."""
    try:
        return datetime.fromtimestamp(seconds).isoformat(sep=" ", timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return "?" * 19


def format_size(nbytes: float) -> str:
    """A byte count in the unit its magnitude calls for: ``1536`` -> ``"1.5 KiB"``.

    Whole bytes below 1 KiB (``"512 B"``), else one decimal in KiB, MiB, GiB
    or TiB (binary units), so that the number shown is always under 1024
    except for TiB.
    """
    value = float(nbytes)
    if abs(round(value)) < 1024:
        return f"{value:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(round(value, 1)) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:,.1f} TiB"


def format_duration(seconds: float) -> str:
    """A duration for people: ``"42 s"``, ``"5.0 min"``, ``"2.0 h"``, ``"3.0 days"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.1f} days"


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
    """The bytes of ``path``'s ``_COMMIT``, or None if it has none.

    Only a regular file within the size limit is read (CorruptCheckpointError else).
    """
    try:
        return read_marker(open_storage(fs, path))
    except FileNotFoundError:
        return None


def _inspect(fs: fsspec.AbstractFileSystem, path: str) -> tuple[Manifest | None, str]:
    """``path``'s commit manifest (None if it has none or it does not decode) and why not."""
    try:
        data = _read_marker(fs, path)
        if data is None:
            return None, ""
        return Manifest.decode(data, where=_display(fs, _join(fs, path, COMMIT_KEY))), ""
    except ZarrckptError as exc:
        return None, str(exc)


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str) -> Manifest | None:
    """``path``'s commit manifest, or None if it has none or it does not decode."""
    return _inspect(fs, path)[0]


def _usage(fs: fsspec.AbstractFileSystem, path: str) -> tuple[float, int]:
    """The newest modification time (0 if unknown) and the total bytes at or under ``path``."""
    newest, total = 0.0, 0
    if is_local(fs):
        newest = os.lstat(path).st_mtime
        for directory, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    info = os.lstat(os.path.join(directory, name))
                    newest, total = max(newest, info.st_mtime), total + info.st_size
        return newest, total
    found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    for info in found.values():
        stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
        if isinstance(stamp, datetime):
            newest = max(newest, stamp.timestamp())
        elif isinstance(stamp, int | float):
            newest = max(newest, float(stamp))
        total += int(info.get("size") or 0)
    return newest, total


def _mtime(fs: fsspec.AbstractFileSystem, path: str) -> float:
    """The newest modification time of anything at or under ``path`` (0 if unknown)."""
    return _usage_or_nothing(fs, path)[0]


def _usage_or_nothing(fs: fsspec.AbstractFileSystem, path: str) -> tuple[float, int]:
    """:func:`_usage`, or (0, 0) for a path removed meanwhile."""
    try:
        return _usage(fs, path)
    except FileNotFoundError:
        return 0.0, 0


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
    A directory that does not exist holds none, but a bucket that does not
    exist is a :class:`~zarrckpt.errors.CheckpointNotFoundError` naming it.

    Example:
        >>> [c.path for c in list_checkpoints("/ckpts") if c.committed]  # doctest: +SKIP
        ['/ckpts/ckpt-1', '/ckpts/ckpt-2']
    """
    fs, root = resolve_path(directory, storage_options)
    found = []
    entries = _entries(fs, root)
    if not entries:
        bucket = missing_bucket(fs, root)  # one probe, only when there is nothing
        if bucket is not None:
            raise CheckpointNotFoundError(missing_bucket_message(fs, _display(fs, root), bucket))
    for name, is_directory in entries:
        if not is_directory or name.startswith("."):
            continue
        numbered = _NUMBERED.fullmatch(name)
        if checkpoint_name is not None and (not numbered or numbered["name"] != checkpoint_name):
            continue
        path = _join(fs, root, name)
        manifest, damage = _inspect(fs, path)
        if manifest is None and not numbered and not damage:
            continue
        newest, stored = (0.0, 0) if manifest else _usage_or_nothing(fs, path)
        found.append(
            CheckpointInfo(
                path=_display(fs, path),
                name=name,
                number=int(numbered["number"]) if numbered else None,
                created=manifest.created if manifest else newest,
                nbytes=manifest.nbytes if manifest else 0,
                committed=manifest is not None,
                metadata=manifest.metadata if manifest else {},
                damage=damage,
                stored_nbytes=stored,
            )
        )
    # By number, never by time: clocks of other hosts differ, and a time read
    # from storage is only information.
    found.sort(key=lambda c: (c.number if c.number is not None else -1, c.name))
    return found


def latest_checkpoint(
    directory: PathLike,
    storage_options: dict[str, Any] | None = None,
    *,
    checkpoint_name: str | None = None,
) -> str | None:
    """The committed checkpoint with the highest number in ``directory``, or None.

    Checkpoints are ordered by their number (``<name>-<number>``), never by a
    clock; unnumbered ones come first.

    Example:
        >>> ckpt.restore(zarrckpt.latest_checkpoint("s3://bucket/run"))  # doctest: +SKIP
    """
    committed = [
        c
        for c in list_checkpoints(directory, storage_options, checkpoint_name=checkpoint_name)
        if c.committed
    ]
    return committed[-1].path if committed else None


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


@dataclass(frozen=True)
class Leftover:
    """Something an interrupted save or delete left behind, and what :func:`gc_report` did.

    ``path`` as the other functions here show it (a URL off the local disk);
    ``nbytes`` what it takes on storage (0 for a multipart upload: unknown);
    ``age`` seconds since anything in it last changed (None when storage
    gives no time); ``reason`` says why a leftover was kept ("" when removed).
    """

    path: str
    nbytes: int
    age: float | None
    reason: str = ""


@dataclass(frozen=True)
class GcReport:
    """What :func:`gc_report` removed (or, in a dry run, would remove) and what it kept, why.

    ``removed`` are leftovers older than the threshold: removed, or with
    ``dry_run`` only found; ``kept`` are leftovers left in place, each with
    its reason (too young for the threshold, inside a checkpoint whose
    ``_COMMIT`` cannot be read, or still there after the removal).
    Committed checkpoints are never leftovers and never appear here.
    """

    directory: str
    older_than: float
    dry_run: bool
    removed: tuple[Leftover, ...]
    kept: tuple[Leftover, ...]

    @property
    def removed_nbytes(self) -> int:
        """Bytes freed (or, in a dry run, that would be freed)."""
        return sum(leftover.nbytes for leftover in self.removed)


def gc(
    directory: PathLike,
    older_than: float = 3600.0,
    storage_options: dict[str, Any] | None = None,
    *,
    checkpoint_name: str | None = None,
    dry_run: bool = False,
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
    which), and nothing else in ``directory`` is touched. With
    ``checkpoint_name``, only leftovers of ``<checkpoint_name>-<n>``
    checkpoints (and of that name's state file) go. Returns what was removed;
    with ``dry_run``, what would be, removing nothing. :func:`gc_report` also
    tells what was kept and why.

    Example:
        >>> gc("s3://bucket/run", older_than=24 * 3600)  # doctest: +SKIP
        ['s3://bucket/run/ckpt-7/attempt-3f2a...']
    """
    removed = remove_leftovers(
        directory, older_than, storage_options, checkpoint_name, dry_run=dry_run
    )
    return [path for path, _ in removed]


def remove_leftovers(
    directory: PathLike,
    older_than: float,
    storage_options: dict[str, Any] | None = None,
    checkpoint_name: str | None = None,
    *,
    dry_run: bool = False,
) -> list[tuple[str, int]]:
    """:func:`gc`, returning each removed leftover with its size in bytes."""
    report = gc_report(
        directory,
        older_than,
        storage_options,
        checkpoint_name=checkpoint_name,
        dry_run=dry_run,
    )
    return [(leftover.path, leftover.nbytes) for leftover in report.removed]


def gc_report(
    directory: PathLike,
    older_than: float = 3600.0,
    storage_options: dict[str, Any] | None = None,
    *,
    checkpoint_name: str | None = None,
    dry_run: bool = False,
) -> GcReport:
    """:func:`gc` (same arguments), telling what was removed and what was kept and why.

    With ``dry_run`` nothing is removed or aborted: :attr:`GcReport.removed`
    lists what :func:`gc` would remove now.

    Example:
        >>> report = gc_report("/ckpts", dry_run=True)  # doctest: +SKIP
        >>> [(k.path, k.reason) for k in report.kept]  # doctest: +SKIP
        [('/ckpts/.ckpt-8.zarrckpt-tmp-1f...', 'too young: last changed 3 s ago, ...')]
    """
    fs, root = resolve_path(directory, storage_options)
    now = time.time()
    cutoff = now - older_than
    removed: list[Leftover] = []
    kept: list[Leftover] = []
    local = is_local(fs)

    def ours(name: str) -> bool:  # any checkpoint directory, or one of the name asked for
        if checkpoint_name is None:
            return True
        numbered = _NUMBERED.fullmatch(name)
        return numbered is not None and numbered["name"] == checkpoint_name

    def remove_if_stale(path: str, remove: Any) -> None:
        try:
            newest, nbytes = _usage(fs, path)
        except FileNotFoundError:
            return  # removed by someone else meanwhile (another gc, a retention delete)
        age = now - newest if newest > 0 else None
        shown = _display(fs, path)
        if newest > cutoff:
            kept.append(Leftover(shown, nbytes, age, _too_young(now - newest, older_than)))
            return
        if dry_run:
            removed.append(Leftover(shown, nbytes, age))
            return
        with contextlib.suppress(FileNotFoundError):
            remove(path)
        fs.invalidate_cache(path)
        if fs.exists(path):  # rmtree ignores errors: report only what went
            kept.append(
                Leftover(shown, nbytes, age, "could not be removed (check its permissions)")
            )
        else:
            removed.append(Leftover(shown, nbytes, age))

    for name, is_directory in _entries(fs, root):
        path = _join(fs, root, name)
        if not is_directory:
            temp = _STATE_TEMP.fullmatch(name)
            if temp and checkpoint_name in (None, temp["name"]):
                remove_if_stale(path, fs.rm_file)  # a state file replacement cut short
            continue
        if local:
            hidden = _HIDDEN.fullmatch(name)
            if hidden and ours(hidden["checkpoint"]):
                remove_if_stale(path, partial(shutil.rmtree, ignore_errors=True))
            continue
        if not ours(name):
            continue
        children = _entries(fs, path)
        attempts = [child for child, is_dir in children if is_dir and _ATTEMPT.fullmatch(child)]
        if not attempts:
            empty = not children and _NUMBERED.fullmatch(name) is not None
            if empty and not dry_run and _mtime(fs, path) <= cutoff:
                _remove_empty_directory(fs, path)  # what an aborted attempt leaves
            continue
        try:
            marker = _read_marker(fs, path)
            live = None if marker is None else Manifest.decode(marker, where=path).attempt
        except ZarrckptError:
            # Damaged, or a format this version does not know: not ours to judge.
            for attempt in attempts:
                leftover = _join(fs, path, attempt)
                newest, nbytes = _usage_or_nothing(fs, leftover)
                kept.append(
                    Leftover(
                        _display(fs, leftover),
                        nbytes,
                        now - newest if newest > 0 else None,
                        f"its checkpoint's {COMMIT_KEY} cannot be read (damaged, or a newer "
                        "format), so gc cannot tell whether it is the committed data",
                    )
                )
            continue
        for attempt in attempts:
            if attempt == live:
                continue
            leftover = _join(fs, path, attempt)
            # A writer may have published this attempt since the marker was read.
            again = _read_manifest(fs, path) if marker is None else None
            if again is not None and again.attempt == attempt:
                continue
            remove_if_stale(leftover, partial(fs.rm, recursive=True))
        if not dry_run and marker is None and not _entries(fs, path):
            _remove_empty_directory(fs, path)
    prefix = "" if checkpoint_name is None else f"{checkpoint_name}-"
    aborted, waiting = _stale_uploads(fs, root, now, older_than, prefix, dry_run=dry_run)
    return GcReport(
        directory=_display(fs, root),
        older_than=older_than,
        dry_run=dry_run,
        removed=(*removed, *aborted),
        kept=(*kept, *waiting),
    )


def _too_young(age: float, older_than: float) -> str:
    """Why a leftover was kept: it changed too recently for a writer to be surely gone."""
    return (
        f"too young: last changed {format_duration(max(age, 0.0))} ago, under the threshold "
        f"of {format_duration(older_than)} (a writer may still be using it)"
    )


def _remove_empty_directory(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Filesystems with real directories keep a checkpoint directory emptied of attempts."""
    with contextlib.suppress(OSError):  # not empty after all, or already gone
        fs.rmdir(path)


def _stale_uploads(
    fs: fsspec.AbstractFileSystem,
    root: str,
    now: float,
    older_than: float,
    name_prefix: str = "",
    *,
    dry_run: bool = False,
) -> tuple[list[Leftover], list[Leftover]]:
    """S3 multipart uploads under ``root/<name_prefix>``: (aborted, kept as too young).

    Uploads started more than ``older_than`` seconds before ``now`` are
    aborted (with ``dry_run``, only listed).
    """
    if not hasattr(fs, "list_multipart_uploads"):
        return [], []
    bucket, _, prefix = root.partition("/")
    aborted: list[Leftover] = []
    young: list[Leftover] = []
    try:
        uploads = fs.list_multipart_uploads(bucket)
    except FileNotFoundError:  # no such bucket: nothing to abort
        return [], []
    for upload in uploads:
        key = upload.get("Key", "")
        started = upload.get("Initiated")
        if not key.startswith(
            (f"{prefix.rstrip('/')}/" if prefix else "") + name_prefix
        ) or not isinstance(started, datetime):
            continue
        name = f"s3://{bucket}/{key} (multipart upload)"
        age = now - started.timestamp()
        if age < older_than:
            young.append(Leftover(name, 0, age, _too_young(age, older_than)))
            continue
        if not dry_run:
            fs.call_s3(
                "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload["UploadId"]
            )
        aborted.append(Leftover(name, 0, age))
    return aborted, young
