"""Publishing a checkpoint atomically, and opening only committed ones.

A checkpoint counts as written once its ``_COMMIT`` manifest exists. The
manifest lists every file with its size and CRC32C plus the record's SHA-256,
and is written last.

- Local filesystems (:class:`LocalCommit`): everything is written into a
  temporary sibling directory, fsync'ed (files, then directories), and renamed
  to the final name in one step; the parent directory is fsync'ed after. The
  checkpoint directory is the Zarr group.
- Object stores and every other fsspec filesystem (:class:`ObjectStoreCommit`):
  there is no rename. The data goes under a fresh attempt prefix
  ``<checkpoint>/<attempt>/`` (itself the Zarr group); then one conditional PUT
  (``If-None-Match: *``) creates ``<checkpoint>/_COMMIT`` naming the attempt.
  Two writers can never both win; a retried PUT that finds its own marker is
  a success.

A crash at any moment leaves either no checkpoint at the final path or a whole
one; leftovers are removed by :func:`zarrckpt.gc`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import crc32c
import fsspec
import msgpack
import numpy as np

from zarrckpt._dtypes import dtype_from_name
from zarrckpt._storage import (
    FsspecStorage,
    LocalStorage,
    Storage,
    check_relative_key,
    fsync_directory,
    is_local,
)
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.array_io import ArrayLayout, ChunkFile, group_metadata, read_layout
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidArgumentError,
    ZarrckptError,
)
from zarrckpt.record import ObjectGraph, SavedAttribute

__all__ = [
    "COMMIT_KEY",
    "FORMAT",
    "RECORD_KEY",
    "Commit",
    "CommittedCheckpoint",
    "LocalCommit",
    "Manifest",
    "ObjectStoreCommit",
    "begin_commit",
    "open_committed",
]

FORMAT = 1
COMMIT_KEY = "_COMMIT"
RECORD_KEY = "object_graph.msgpack"
TEMP_MARKER = ".zarrckpt-tmp-"
DELETING_MARKER = ".zarrckpt-deleting-"
_MANIFEST_NAME = "zarrckpt.commit"
_MAX_MANIFEST_BYTES = 256 << 20
_ATTEMPT = re.compile(r"attempt-[0-9a-f]{32}")
_MAX_METADATA_ENTRIES = 256
_MAX_METADATA_TEXT = 1024

MetadataValue = bool | int | float | str


def check_metadata(metadata: Mapping[str, Any] | None, *, where: str) -> dict[str, MetadataValue]:
    """Validate checkpoint metadata: at most 256 ``str -> bool | int | float | str`` entries.

    Numbers must be finite (NaN sorts nowhere) and ints fit in 64 bits; keys
    and strings are at most 1024 characters. Raises :class:`InvalidArgumentError`.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"{where}: metadata must be a mapping, got {metadata!r}")
    if len(metadata) > _MAX_METADATA_ENTRIES:
        raise InvalidArgumentError(
            f"{where}: metadata has {len(metadata)} entries, at most {_MAX_METADATA_ENTRIES}"
        )
    checked: dict[str, MetadataValue] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not 0 < len(key) <= _MAX_METADATA_TEXT:
            raise InvalidArgumentError(f"{where}: metadata key {key!r} is not a short string")
        if isinstance(value, np.generic) and value.shape == ():
            value = value.item()  # numpy scalars, e.g. a loss computed with numpy
        ok = (
            isinstance(value, bool)
            or (isinstance(value, int) and -(1 << 63) <= value < (1 << 63))
            or (isinstance(value, float) and math.isfinite(value))
            or (isinstance(value, str) and len(value) <= _MAX_METADATA_TEXT)
        )
        if not ok:
            raise InvalidArgumentError(
                f"{where}: metadata[{key!r}] = {value!r}; values are bools, 64-bit ints, "
                "finite floats or short strings"
            )
        checked[key] = value
    return checked


@dataclass(frozen=True)
class Manifest:
    """The commit manifest: format, where the data is, record hash, every file, metadata.

    ``attempt`` is "" when the data is in the checkpoint directory itself
    (local filesystems), else the attempt prefix holding it (object stores).
    ``created`` is the commit time (seconds since the epoch). ``metadata`` is
    what the writer attached (``Checkpoint.write(metadata=...)``; the
    manager's metrics), validated by :func:`check_metadata`.
    """

    record_sha256: str
    files: tuple[ChunkFile, ...]
    attempt: str = ""
    created: float = 0.0
    format: int = FORMAT
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Total size of the checkpoint's files."""
        return sum(f.size for f in self.files)

    def encode(self) -> bytes:
        document = {
            "format_name": _MANIFEST_NAME,
            "format": self.format,
            "attempt": self.attempt,
            "created": self.created,
            "record_sha256": self.record_sha256,
            "files": [[f.key, f.size, f.crc32c] for f in self.files],
            "metadata": dict(self.metadata),
        }
        packed: bytes = msgpack.packb(document, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes, *, where: str) -> Manifest:
        if len(data) > _MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: commit manifest is too large")
        try:
            doc = msgpack.unpackb(
                data,
                raw=False,
                max_bin_len=0,
                max_ext_len=0,
                max_map_len=_MAX_METADATA_ENTRIES,
                max_str_len=1 << 16,
                max_array_len=1 << 24,
            )
            if not isinstance(doc, dict) or doc.get("format_name") != _MANIFEST_NAME:
                raise ValueError("not a zarrckpt commit manifest")
            version = doc["format"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise ValueError("format must be an int")
            if version != FORMAT:
                raise FormatVersionError(
                    f"{where}: checkpoint format {version}; this zarrckpt reads format {FORMAT}"
                )
            attempt, created, digest = doc["attempt"], doc["created"], doc["record_sha256"]
            if not isinstance(attempt, str) or (attempt and not _ATTEMPT.fullmatch(attempt)):
                raise ValueError(f"attempt {attempt!r} is not a valid attempt name")
            if not isinstance(created, float | int) or isinstance(created, bool):
                raise ValueError("created must be a number")
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("record_sha256 must be 64 hex digits")
            files = []
            for item in doc["files"]:
                key, size, crc = item
                if not (isinstance(key, str) and type(size) is int and type(crc) is int):
                    raise ValueError(f"bad file entry {item!r}")
                files.append(ChunkFile(check_relative_key(key), size, crc))
            try:
                metadata = check_metadata(doc.get("metadata", {}), where=where)
            except InvalidArgumentError as exc:
                raise ValueError(str(exc)) from None
        except ZarrckptError:
            raise
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise CorruptCheckpointError(f"{where}: malformed commit manifest ({exc})") from exc
        return cls(digest, tuple(files), attempt, float(created), version, metadata)


def root_group_attributes() -> dict[str, Any]:
    """The ``zarrckpt`` attributes of a checkpoint's root group."""
    return {"zarrckpt": {"format": FORMAT, "record": RECORD_KEY, "commit": COMMIT_KEY}}


class Commit(ABC):
    """A checkpoint being written: ``create()``, write through the storage, ``finalize()``.

    Example:
        >>> commit = begin_commit("s3://bucket/run/ckpt-10")
        >>> storage = commit.create()
        >>> files = write_arrays(storage, arrays)      # every data file
        >>> commit.finalize(record_bytes, files)       # atomic publish
    """

    url: str

    @abstractmethod
    def create(self) -> Storage:
        """Prepare the place the data is written to; refuse if a checkpoint exists."""

    @abstractmethod
    def publish(self, manifest: Manifest) -> None:
        """Make the written checkpoint visible, atomically."""

    @abstractmethod
    def abort(self) -> None:
        """Remove what was written; an existing checkpoint is untouched."""

    @property
    @abstractmethod
    def attempt(self) -> str:
        """The attempt prefix the data goes under ("" for the checkpoint directory)."""

    @property
    @abstractmethod
    def storage(self) -> Storage:
        """The storage data is written to (after :meth:`create`)."""

    def finalize(
        self,
        record: bytes,
        files: list[ChunkFile],
        metadata: Mapping[str, MetadataValue] | None = None,
    ) -> Manifest:
        """Write record and root group metadata, then the manifest, atomically.

        ``metadata`` (checked with :func:`check_metadata`) goes into the manifest.
        """
        storage = self.storage
        group = group_metadata(root_group_attributes())
        storage.write(RECORD_KEY, [record])
        storage.write("zarr.json", [group])
        prefix = f"{self.attempt}/" if self.attempt else ""
        every_file = [
            *files,
            ChunkFile(RECORD_KEY, len(record), crc32c.crc32c(record)),
            ChunkFile("zarr.json", len(group), crc32c.crc32c(group)),
        ]
        manifest = Manifest(
            hashlib.sha256(record).hexdigest(),
            tuple(ChunkFile(prefix + f.key, f.size, f.crc32c) for f in every_file),
            attempt=self.attempt,
            created=time.time(),
            metadata=check_metadata(metadata, where=self.url),
        )
        self.publish(manifest)
        return manifest


class LocalCommit(Commit):
    """Temporary sibling directory, fsync, ``_COMMIT``, rename, fsync of the parent."""

    def __init__(self, path: str, *, fsync: bool = True, threads: int = 8) -> None:
        self.path = os.path.abspath(path)
        self.threads = threads
        self.url = self.path
        parent, name = os.path.split(self.path)
        self.parent = parent
        self.temp_path = os.path.join(parent, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")
        self.fsync = fsync
        self._storage: LocalStorage | None = None
        self._new_parents: list[str] = []

    @property
    def attempt(self) -> str:
        return ""

    @property
    def storage(self) -> LocalStorage:
        if self._storage is None:
            raise RuntimeError("create() first")
        return self._storage

    def create(self) -> LocalStorage:
        if os.path.lexists(self.path):
            raise CheckpointExistsError(
                f"{self.path} already exists; a checkpoint is never written over another"
            )
        missing = self.parent
        while not os.path.isdir(missing):  # parents this save creates, deepest first
            self._new_parents.append(missing)
            missing = os.path.dirname(missing)
        os.makedirs(self.parent, exist_ok=True)
        os.mkdir(self.temp_path)
        self._storage = LocalStorage(self.temp_path, fsync=self.fsync, threads=self.threads)
        return self._storage

    def publish(self, manifest: Manifest) -> None:
        self.storage.write(COMMIT_KEY, [manifest.encode()])
        self.storage.sync()
        taken = CheckpointExistsError(f"{self.path} was committed by another writer meanwhile")
        if os.path.lexists(self.path):
            raise taken
        try:
            # Renaming onto a directory that is not empty fails: a racing writer
            # that committed first keeps its checkpoint.
            os.rename(self.temp_path, self.path)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise taken from None
            raise
        if self.fsync:
            try:
                fsync_directory(self.parent)
                for created in self._new_parents:
                    fsync_directory(os.path.dirname(created))
            except OSError:
                # Not durable, so not committed: take it back (abort() removes it),
                # so that a failed save never leaves a checkpoint behind.
                os.rename(self.path, self.temp_path)
                raise

    def abort(self) -> None:
        shutil.rmtree(self.temp_path, ignore_errors=True)


class ObjectStoreCommit(Commit):
    """Attempt prefix, then one conditional PUT of ``_COMMIT`` naming it."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = fs.unstrip_protocol(self.root)
        self._attempt = f"attempt-{uuid.uuid4().hex}"
        self._storage: FsspecStorage | None = None

    @property
    def attempt(self) -> str:
        return self._attempt

    @property
    def storage(self) -> FsspecStorage:
        if self._storage is None:
            raise RuntimeError("create() first")
        return self._storage

    def create(self) -> FsspecStorage:
        self.fs.invalidate_cache(self.root)
        if self.fs.exists(f"{self.root}/{COMMIT_KEY}"):
            raise CheckpointExistsError(
                f"{self.url} already exists; a checkpoint is never written over another"
            )
        self._storage = FsspecStorage(self.fs, f"{self.root}/{self._attempt}")
        return self._storage

    def publish(self, manifest: Manifest) -> None:
        data = manifest.encode()
        marker = f"{self.root}/{COMMIT_KEY}"
        try:
            self.fs.pipe_file(marker, data, mode="create")
        except BaseException as exc:
            # A retried PUT whose first try succeeded meets its own marker, and a
            # PUT may have landed although its response was lost: read it back.
            # A marker with other bytes is another writer's, whatever the error
            # (S3 answers a conditional PUT racing another with 412 or 409).
            found = self._marker()
            if found == data:
                return
            if found is not None:
                raise CheckpointExistsError(
                    f"{self.url}: another writer committed this checkpoint first"
                ) from None
            if isinstance(exc, FileExistsError):
                raise CheckpointExistsError(
                    f"{self.url}: {COMMIT_KEY} exists but cannot be read back"
                ) from exc
            raise

    def _marker(self) -> bytes | None:
        self.fs.invalidate_cache(f"{self.root}/{COMMIT_KEY}")
        try:
            data: bytes = self.fs.cat_file(f"{self.root}/{COMMIT_KEY}")
        except FileNotFoundError:
            return None
        return data

    def abort(self) -> None:
        marker = self._marker()
        if marker is not None:
            with contextlib.suppress(ZarrckptError):
                committed = Manifest.decode(marker, where=self.url)
                if committed.attempt == self._attempt:
                    return  # committed after all: the data is the checkpoint's
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.root}/{self._attempt}", recursive=True)


def begin_commit(
    path: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    fsync: bool = True,
    threads: int = 8,
) -> Commit:
    """The commit protocol for ``path``: rename on local disks, conditional PUT elsewhere.

    ``fsync`` and ``threads`` (fsyncs at once) apply to local disks.
    """
    fs, root = resolve_path(path, storage_options)
    if is_local(fs):
        return LocalCommit(root, fsync=fsync, threads=threads)
    return ObjectStoreCommit(fs, root)


@dataclass
class CommittedCheckpoint:
    """A committed checkpoint opened for reading: its data storage, manifest and record."""

    url: str
    storage: Storage
    manifest: Manifest
    graph: ObjectGraph

    def layout(self, attribute: SavedAttribute) -> ArrayLayout:
        """The stored layout of a saved value, checked against the record's shape and dtype."""
        return read_layout(
            self.storage, attribute.key, attribute.shape, dtype_from_name(attribute.dtype)
        )


def open_committed(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> CommittedCheckpoint:
    """Open the committed checkpoint at ``path``, checking manifest and record."""
    fs, root = resolve_path(path, storage_options)
    top: Storage = LocalStorage(root, fsync=False) if is_local(fs) else FsspecStorage(fs, root)
    url = top.url
    try:
        manifest_bytes = top.read(COMMIT_KEY)
    except (FileNotFoundError, NotADirectoryError):
        if fs.isdir(root):
            raise CheckpointNotFoundError(
                f"{url}: not a committed checkpoint (no {COMMIT_KEY} manifest); it may be "
                "a save that did not finish"
            ) from None
        raise CheckpointNotFoundError(f"{url}: no checkpoint at this path") from None
    manifest = Manifest.decode(manifest_bytes, where=f"{url}/{COMMIT_KEY}")
    if manifest.attempt:
        data: Storage = FsspecStorage(fs, f"{root.rstrip('/')}/{manifest.attempt}")
        if is_local(fs):
            data = LocalStorage(os.path.join(root, manifest.attempt), fsync=False)
    else:
        data = top
    try:
        record = data.read(RECORD_KEY)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{data.url}: {RECORD_KEY} is missing") from None
    if hashlib.sha256(record).hexdigest() != manifest.record_sha256:
        raise CorruptCheckpointError(
            f"{data.url}/{RECORD_KEY}: SHA-256 does not match the commit manifest"
        )
    graph = ObjectGraph.decode(record, where=f"{data.url}/{RECORD_KEY}")
    return CommittedCheckpoint(url=url, storage=data, manifest=manifest, graph=graph)
