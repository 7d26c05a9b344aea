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
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c
import fsspec
import msgpack
import numpy as np

from zarrckpt._dtypes import dtype_from_name
from zarrckpt._msgpack import SchemaReader
from zarrckpt._storage import (
    FsspecStorage,
    LocalStorage,
    Storage,
    check_path_length,
    check_relative_key,
    fsync_directory,
    is_local,
    missing_bucket,
    missing_bucket_message,
    open_storage,
)
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.array_io import (
    MAX_METADATA_BYTES,
    ArrayLayout,
    ChunkFile,
    chunk_size_limits,
    group_metadata,
    parse_layout,
    read_checked,
)
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    IncompleteSaveError,
    InvalidArgumentError,
    MissingChunkError,
    ZarrckptError,
)
from zarrckpt.record import MAX_RECORD_BYTES, ObjectGraph, SavedAttribute

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

# Format 2 (zarrckpt 0.2) differs from format 1 only in the arrays' chunk keys
# ("c.0.1" rather than "c/0/1", declared in every zarr.json); both are read.
FORMAT = 2
READABLE_FORMATS = (1, 2)
COMMIT_KEY = "_COMMIT"
RECORD_KEY = "object_graph.msgpack"
TEMP_MARKER = ".zarrckpt-tmp-"
DELETING_MARKER = ".zarrckpt-deleting-"
_MANIFEST_NAME = "zarrckpt.commit"
MAX_MANIFEST_BYTES = 64 << 20
_SEAL_BYTES = 4
# Commit times beyond the year 9999 are damage (and no clock or calendar takes them).
_LATEST_TIME = 253402300799.0
_MAX_FILES = 1 << 20  # 32 TiB in chunks of 32 MiB
_MANIFEST_FIELDS = frozenset(
    {"format_name", "format", "attempt", "created", "record_sha256", "files", "metadata", "writer"}
)
_ARRAY_CHUNK = re.compile(r"(?P<key>.+)/c(?:(?:/\d+)+|(?:\.\d+)+)?")
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
    ``created`` is the commit time (seconds since the epoch), information only:
    checkpoints are ordered by number. ``metadata`` is what the writer attached
    (``Checkpoint.write(metadata=...)``; the manager's metrics), validated by
    :func:`check_metadata`. ``writer`` names the process that committed it
    (``host:pid:id``).

    Encoded as msgpack followed by the CRC32C of those bytes (4 bytes, little
    endian), so any changed byte of the manifest is detected.
    """

    record_sha256: str
    files: tuple[ChunkFile, ...]
    attempt: str = ""
    created: float = 0.0
    format: int = FORMAT
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)
    writer: str = ""

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
            "writer": self.writer,
        }
        packed: bytes = msgpack.packb(document, use_bin_type=True)
        return packed + crc32c.crc32c(packed).to_bytes(_SEAL_BYTES, "little")

    @classmethod
    def decode(cls, data: bytes, *, where: str) -> Manifest:
        """Check the manifest's own CRC32C, then parse and validate every field."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: commit manifest is too large")
        body, seal = data[:-_SEAL_BYTES], data[-_SEAL_BYTES:]
        if len(data) <= _SEAL_BYTES or crc32c.crc32c(body) != int.from_bytes(seal, "little"):
            raise CorruptCheckpointError(
                f"{where}: the commit manifest's CRC32C does not match its bytes (damaged, "
                "truncated, or written by zarrckpt 0.1, whose manifests carry no checksum)"
            )
        try:
            fields = _decode_manifest(SchemaReader(body), where)
            version = fields["format"]
            files = fields["files"]
            if len({f.key for f in files}) != len(files):
                raise ValueError("a file is listed twice")
            attempt, created, digest = fields["attempt"], fields["created"], fields["record_sha256"]
            if attempt and not _ATTEMPT.fullmatch(attempt):
                raise ValueError(f"attempt {attempt!r} is not a valid attempt name")
            if not 0 <= created <= _LATEST_TIME:  # NaN fails too
                raise ValueError(f"created {created!r} is not a time between 1970 and 9999")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError("record_sha256 must be 64 hex digits")
            metadata = check_metadata(fields["metadata"], where=where)
        except FormatVersionError:
            raise
        except (ZarrckptError, ValueError, KeyError) as exc:
            raise CorruptCheckpointError(f"{where}: malformed commit manifest ({exc})") from exc
        return cls(
            digest, tuple(files), attempt, float(created), version, metadata, fields["writer"]
        )


def _decode_manifest(reader: SchemaReader, where: str) -> dict[str, Any]:
    """The manifest's fields, each read with its type checked before it is built."""
    fields: dict[str, Any] = {}
    for _ in range(reader.map("manifest", 16)):
        key = reader.string("manifest field name")
        if key in fields:
            raise ValueError(f"{key} appears twice")
        if key == "format_name":
            if reader.string(key) != _MANIFEST_NAME:
                raise ValueError("not a zarrckpt commit manifest")
            fields[key] = _MANIFEST_NAME
        elif key == "format":
            version = fields[key] = reader.integer(key)
            if version not in READABLE_FORMATS:
                raise FormatVersionError(
                    f"{where}: checkpoint format {version}; this zarrckpt reads formats "
                    f"{', '.join(map(str, READABLE_FORMATS))}"
                )
        elif key in ("attempt", "record_sha256", "writer"):
            fields[key] = reader.string(key)
        elif key == "created":
            fields[key] = reader.number(key)
        elif key == "files":
            files = fields[key] = []
            for i in range(reader.array(key, _MAX_FILES)):
                reader.array(f"files[{i}]", 3, exactly=3)
                name = check_relative_key(reader.string(f"files[{i}] path"))
                size, crc = reader.integer(f"files[{i}] size"), reader.integer(f"files[{i}] crc")
                if not (0 <= size < 1 << 63 and 0 <= crc < 1 << 32):
                    raise ValueError(f"files[{i}]: size {size} or CRC32C {crc} out of range")
                files.append(ChunkFile(name, size, crc))
        elif key == "metadata":
            count = reader.map(key, _MAX_METADATA_ENTRIES)
            fields[key] = {reader.string("metadata key"): reader.scalar(key) for _ in range(count)}
        else:
            raise ValueError(f"unknown field {key!r}")
    reader.finish("manifest")
    missing = _MANIFEST_FIELDS - fields.keys()
    if missing:
        raise ValueError(f"fields {sorted(missing)} are missing")
    return fields


def writer_identity() -> str:
    """``host:pid:id`` of this process: who committed a checkpoint (see Manifest.writer)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_ID}"


_PROCESS_ID = uuid.uuid4().hex[:12]


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

    def explain_failure(self, exc: BaseException) -> ZarrckptError | None:
        """A clearer error for a failed save whose cause the commit can name, else None."""
        return None

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
        try:
            storage.write(RECORD_KEY, [record])
            storage.write("zarr.json", [group])
        except FileNotFoundError as exc:  # the temporary directory itself is gone
            raise IncompleteSaveError(
                f"{self.url}: the directory this save writes into vanished before it could "
                f"commit ({exc}). Was `zarrckpt gc` run with an age threshold shorter than "
                "this save took? Nothing was committed."
            ) from exc
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
            writer=writer_identity(),
        )
        self.check_readable(manifest)
        self.check_written(every_file)
        self.publish(manifest)
        return manifest

    def check_readable(self, manifest: Manifest) -> None:
        """Refuse to commit a manifest that readers would refuse (too many files, too large)."""
        size = len(manifest.encode())
        if len(manifest.files) > _MAX_FILES or size > MAX_MANIFEST_BYTES:
            raise InvalidArgumentError(
                f"{self.url}: this checkpoint has {len(manifest.files)} files and a "
                f"{size / (1 << 20):.1f} MiB _COMMIT manifest; readers accept at most "
                f"{_MAX_FILES} files and {MAX_MANIFEST_BYTES >> 20} MiB. Use larger chunks "
                "(CheckpointOptions.chunk_bytes) or fewer, larger values. Nothing was committed."
            )

    def check_written(self, files: list[ChunkFile]) -> None:
        """Every file about to be listed in ``_COMMIT`` is there with its size (one listing).

        A save paused for longer than ``gc``'s age threshold can find its files
        removed; it must fail rather than commit a checkpoint with holes.
        """
        found = self.storage.sizes()
        lost = [f for f in files if found.get(f.key) != f.size]
        if lost:
            shown = ", ".join(
                f"{f.key} ({'missing' if f.key not in found else f'{found[f.key]} bytes'}, "
                f"wrote {f.size})"
                for f in lost[:5]
            )
            raise IncompleteSaveError(
                f"{self.url}: {len(lost)} of {len(files)} files written by this save vanished "
                f"or changed before it could commit: {shown}. Was `zarrckpt gc` run with an "
                "age threshold shorter than this save took? Nothing was committed."
            )


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
        check_path_length(self.temp_path)
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
        # A second Ctrl-C must not cut the cleanup short and leave the directory.
        interrupted: BaseException | None = None
        while True:
            try:
                shutil.rmtree(self.temp_path, ignore_errors=True)
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
        if interrupted is not None:
            raise interrupted


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

    def explain_failure(self, exc: BaseException) -> ZarrckptError | None:
        # Object stores answer a write into a missing bucket with NoSuchBucket,
        # which fsspec turns into a FileNotFoundError naming no bucket.
        if not isinstance(exc, FileNotFoundError) or isinstance(exc, ZarrckptError):
            return None
        bucket = missing_bucket(self.fs, self.root)
        if bucket is None:
            return None
        return CheckpointNotFoundError(missing_bucket_message(self.fs, self.url, bucket))

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
    """A committed checkpoint opened for reading: its data storage, manifest and record.

    Every read is checked against the manifest read here (see :attr:`files`):
    a file from another checkpoint or another moment is an error. ``marker`` is
    the ``_COMMIT`` as read, so a reader can tell a checkpoint deleted or
    replaced while it read (:meth:`reading`) from a damaged one.
    """

    url: str
    storage: Storage
    manifest: Manifest
    graph: ObjectGraph
    marker: bytes = b""
    top: Storage | None = None
    _layouts: dict[str, ArrayLayout] = field(default_factory=dict, repr=False)
    _metadata: dict[str, bytes] = field(default_factory=dict, repr=False)  # checked zarr.json
    _files: dict[str, ChunkFile] | None = field(default=None, repr=False)
    _chunks: dict[str, list[ChunkFile]] | None = field(default=None, repr=False)

    @property
    def files(self) -> dict[str, ChunkFile]:
        """The manifest's entries by key relative to :attr:`storage` (the Zarr group)."""
        if self._files is None:
            prefix = f"{self.manifest.attempt}/" if self.manifest.attempt else ""
            files: dict[str, ChunkFile] = {}
            for entry in self.manifest.files:
                if not entry.key.startswith(prefix):
                    raise CorruptCheckpointError(
                        f"{self.url}/{COMMIT_KEY}: lists {entry.key!r} outside the attempt "
                        f"{self.manifest.attempt!r}"
                    )
                relative = entry.key[len(prefix) :]
                files[relative] = ChunkFile(relative, entry.size, entry.crc32c) if prefix else entry
            self._files = files
        return self._files

    def chunk_files(self, key: str) -> list[ChunkFile]:
        """The manifest's chunk entries of the array stored at ``key``."""
        if self._chunks is None:
            chunks: dict[str, list[ChunkFile]] = {}
            for relative, entry in self.files.items():
                match = _ARRAY_CHUNK.fullmatch(relative)
                if match is not None:
                    chunks.setdefault(match["key"], []).append(entry)
            self._chunks = chunks
        return self._chunks.get(key, [])

    def layout(self, attribute: SavedAttribute) -> ArrayLayout:
        """The stored layout of a saved value, checked against the record and the manifest.

        ``zarr.json`` must be the file the manifest lists (size and CRC32C),
        agree with the record's shape and dtype, and describe exactly the chunk
        files the manifest lists, each of a size the layout allows, before any
        per-chunk structure is built or any buffer sized.
        """
        cached = self._layouts.get(attribute.key)
        if cached is not None:
            return cached
        key = f"{attribute.key}/zarr.json"
        entry = self.files.get(key)
        if entry is None:
            raise MissingChunkError(f"{self.storage.url}/{key}: not listed in {COMMIT_KEY}")
        raw = self._metadata.pop(key, None) or read_checked(self.storage, key, entry)
        layout = parse_layout(
            raw, f"{self.storage.url}/{key}", attribute.shape, dtype_from_name(attribute.dtype)
        )
        where = f"{self.storage.url}/{attribute.key}"
        listed = self.chunk_files(attribute.key)
        count = math.prod(layout.grid)
        if count != len(listed):
            raise CorruptCheckpointError(
                f"{where}: zarr.json makes {count} chunks (grid {list(layout.grid)}), "
                f"{COMMIT_KEY} lists {len(listed)}"
            )
        smallest, largest = chunk_size_limits(layout)
        for chunk in listed:
            if not smallest <= chunk.size <= largest:
                raise CorruptCheckpointError(
                    f"{self.storage.url}/{chunk.key}: {COMMIT_KEY} lists {chunk.size} bytes; a "
                    f"chunk of this array has {smallest}"
                    + ("" if largest == smallest else f" to {largest}")
                )
        self._layouts[attribute.key] = layout
        return layout

    def prefetch_metadata(self, attributes: Iterable[SavedAttribute], threads: int) -> None:
        """Read the ``zarr.json`` of ``attributes`` ahead, for :meth:`layout`.

        From an object store on ``threads`` threads (a round trip each); from
        a local disk one after another, once the kernel has been asked for all
        of them (:meth:`Storage.will_read`), which is faster there than
        threads contending for the GIL. Each file is checked against the
        manifest (size, CRC32C) as it is read; one that fails is left for
        :meth:`layout` to read again and report.
        """
        keys = [
            f"{a.key}/zarr.json"
            for a in attributes
            if a.key not in self._layouts and f"{a.key}/zarr.json" in self.files
        ]
        if len(keys) < 2:
            return

        def fetch(key: str) -> None:
            # On an error, layout() reads the file again and raises it in its place.
            with contextlib.suppress(OSError, ZarrckptError):
                self._metadata[key] = read_checked(self.storage, key, self.files[key])

        if not self.storage.PARALLEL_SMALL_READS:
            self.storage.will_read(keys)
            for key in keys:
                fetch(key)
        elif threads > 1:
            with ThreadPoolExecutor(min(threads, len(keys))) as pool:
                list(pool.map(fetch, keys))

    def check_manifest(self) -> dict[str, ArrayLayout]:
        """Every saved value's layout, after checking that every listed file belongs.

        A checkpoint's files are its record, ``zarr.json`` files and the chunks
        of the record's arrays (each within its layout's size limits, see
        :meth:`layout`); anything else listed, or any file over its kind's
        size limit, is corruption, found before a byte of it is read.
        """
        layouts = {a.key: self.layout(a) for _, a in self.graph.attributes()}
        for key, entry in self.files.items():
            if key == RECORD_KEY:
                limit = MAX_RECORD_BYTES
            elif key == "zarr.json" or key.endswith("/zarr.json"):
                limit = MAX_METADATA_BYTES
            else:
                match = _ARRAY_CHUNK.fullmatch(key)
                if match is None or match["key"] not in layouts:
                    raise CorruptCheckpointError(
                        f"{self.storage.url}/{key}: {COMMIT_KEY} lists a file that is neither "
                        "the record, a zarr.json nor a chunk of a saved value"
                    )
                continue  # sizes checked by layout()
            if entry.size > limit:
                raise CorruptCheckpointError(
                    f"{self.storage.url}/{key}: {COMMIT_KEY} lists {entry.size} bytes, over the "
                    f"limit of {limit} for this file"
                )
        return layouts

    def still_committed(self) -> bool:
        """Whether ``_COMMIT`` is still the one this checkpoint was opened with."""
        if self.top is None:
            return True
        try:
            return self.top.read(COMMIT_KEY, MAX_MANIFEST_BYTES) == self.marker
        except (OSError, ZarrckptError):
            return False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Turn a read that failed because the checkpoint went away into CheckpointNotFoundError.

        A reader racing a manager's retention (or a delete and a new save of the
        same path) finds files missing or from another checkpoint: that is not
        damage, and is reported as "deleted while reading".
        """
        try:
            yield
        except CorruptCheckpointError as exc:
            if self.still_committed():
                raise
            raise CheckpointNotFoundError(
                f"{self.url} was deleted or replaced while it was being read ({exc})"
            ) from exc


def read_marker(storage: Storage) -> bytes:
    """The bytes of ``_COMMIT`` under ``storage``; at most the manifest limit is read.

    FileNotFoundError if there is none; CorruptCheckpointError if it is not a
    regular file or over the limit.
    """
    try:
        return storage.read(COMMIT_KEY, MAX_MANIFEST_BYTES)
    except (NotADirectoryError, IsADirectoryError):
        raise FileNotFoundError(errno.ENOENT, "no commit marker", storage.url) from None


def _not_a_checkpoint(
    url: str, path: str | os.PathLike[str], storage_options: dict[str, Any] | None
) -> str:
    """Why the directory at ``path`` is not a checkpoint: a directory of them, or unfinished."""
    from zarrckpt.directory import list_checkpoints  # directory builds on this module

    try:
        inside = list_checkpoints(path, storage_options)
    except (OSError, ZarrckptError):
        inside = []
    committed = [c for c in inside if c.committed]
    if committed:
        return (
            f"{url} is a directory of checkpoints, not a checkpoint; its latest is "
            f"{committed[-1].path} (zarrckpt.latest_checkpoint({url!r}) finds it)"
        )
    if inside:
        return (
            f"{url} is a directory of checkpoints, none of them committed "
            f"({', '.join(c.name for c in inside[:5])}"
            f"{' ...' if len(inside) > 5 else ''}): saves that did not finish"
        )
    return (
        f"{url}: not a committed checkpoint (no {COMMIT_KEY} manifest); it may be "
        "a save that did not finish"
    )


def open_committed(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> CommittedCheckpoint:
    """Open the committed checkpoint at ``path``, checking manifest and record."""
    fs, root = resolve_path(path, storage_options)
    top = open_storage(fs, root)
    url = top.url
    try:
        marker = read_marker(top)
    except FileNotFoundError:
        if fs.isdir(root):
            raise CheckpointNotFoundError(_not_a_checkpoint(url, path, storage_options)) from None
        raise CheckpointNotFoundError(f"{url}: no checkpoint at this path") from None
    manifest = Manifest.decode(marker, where=f"{url}/{COMMIT_KEY}")
    data = open_storage(fs, f"{root.rstrip('/')}/{manifest.attempt}") if manifest.attempt else top
    checkpoint = CommittedCheckpoint(
        url=url, storage=data, manifest=manifest, graph=ObjectGraph(()), marker=marker, top=top
    )
    entry = checkpoint.files.get(RECORD_KEY)
    if entry is None:
        raise CorruptCheckpointError(f"{data.url}: {RECORD_KEY} is not listed in {COMMIT_KEY}")
    if entry.size > MAX_RECORD_BYTES:
        raise CorruptCheckpointError(
            f"{data.url}/{RECORD_KEY}: {COMMIT_KEY} lists {entry.size} bytes, over the limit "
            f"of {MAX_RECORD_BYTES}"
        )
    with checkpoint.reading():
        record = read_checked(data, RECORD_KEY, entry)
    if hashlib.sha256(record).hexdigest() != manifest.record_sha256:
        raise CorruptCheckpointError(
            f"{data.url}/{RECORD_KEY}: SHA-256 does not match the commit manifest"
        )
    checkpoint.graph = ObjectGraph.decode(record, where=f"{data.url}/{RECORD_KEY}")
    return checkpoint
