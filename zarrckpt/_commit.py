"""Publishing a checkpoint atomically, and opening only committed ones.

A checkpoint counts as written once its ``_COMMIT`` manifest exists. The
manifest lists every file with its size and CRC32C plus the record's SHA-256,
and is written last. On a local filesystem everything is written into a
temporary sibling directory, fsync'ed (files, then directories), and renamed
to the final name in one step; the parent directory is fsync'ed after. A crash
at any moment leaves either no checkpoint at the final path or a whole one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import crc32c
import msgpack

from zarrckpt._storage import LocalStorage, Storage, check_relative_key, fsync_directory, is_local
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.array_io import ChunkFile, group_metadata
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    ZarrckptError,
)
from zarrckpt.record import ObjectGraph

__all__ = [
    "COMMIT_KEY",
    "FORMAT",
    "RECORD_KEY",
    "LocalCommit",
    "Manifest",
    "open_committed",
]

FORMAT = 1
COMMIT_KEY = "_COMMIT"
RECORD_KEY = "object_graph.msgpack"
TEMP_MARKER = ".zarrckpt-tmp-"
_MANIFEST_NAME = "zarrckpt.commit"
_MAX_MANIFEST_BYTES = 256 << 20


@dataclass(frozen=True)
class Manifest:
    """The commit manifest: format, record hash and every file with size and CRC32C."""

    record_sha256: str
    files: tuple[ChunkFile, ...]
    format: int = FORMAT

    def encode(self) -> bytes:
        document = {
            "format_name": _MANIFEST_NAME,
            "format": self.format,
            "record_sha256": self.record_sha256,
            "files": [[f.key, f.size, f.crc32c] for f in self.files],
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
                max_map_len=8,
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
            digest = doc["record_sha256"]
            if not isinstance(digest, str) or len(digest) != 64:
                raise ValueError("record_sha256 must be 64 hex digits")
            files = []
            for item in doc["files"]:
                key, size, crc = item
                if not (isinstance(key, str) and type(size) is int and type(crc) is int):
                    raise ValueError(f"bad file entry {item!r}")
                files.append(ChunkFile(check_relative_key(key), size, crc))
        except ZarrckptError:
            raise
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise CorruptCheckpointError(f"{where}: malformed commit manifest ({exc})") from exc
        return cls(record_sha256=digest, files=tuple(files), format=version)


def root_group_attributes() -> dict[str, Any]:
    """The ``zarrckpt`` attributes of a checkpoint's root group."""
    return {"zarrckpt": {"format": FORMAT, "record": RECORD_KEY, "commit": COMMIT_KEY}}


class LocalCommit:
    """A checkpoint being written on a local filesystem: create, write, finalize.

    Example:
        >>> commit = LocalCommit("/ckpts/step-10")
        >>> storage = commit.create()
        >>> ...  # write every file through storage
        >>> commit.finalize(record, files)
    """

    def __init__(self, path: str, *, fsync: bool = True) -> None:
        self.path = os.path.abspath(path)
        parent, name = os.path.split(self.path)
        self.parent = parent
        self.temp_path = os.path.join(parent, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}")
        self.fsync = fsync
        self.storage: LocalStorage | None = None

    def create(self) -> LocalStorage:
        """Create the temporary directory and return the storage to write into."""
        if os.path.lexists(self.path):
            raise CheckpointExistsError(
                f"{self.path} already exists; a checkpoint is never written over another"
            )
        os.makedirs(self.parent, exist_ok=True)
        os.mkdir(self.temp_path)
        self.storage = LocalStorage(self.temp_path, fsync=self.fsync)
        return self.storage

    def finalize(self, record: bytes, files: list[ChunkFile]) -> Manifest:
        """Write record, group metadata and manifest; make durable; publish atomically."""
        storage = self.storage
        if storage is None:
            raise RuntimeError("finalize() before create()")
        group = group_metadata(root_group_attributes())
        storage.write(RECORD_KEY, [record])
        storage.write("zarr.json", [group])
        files = [
            *files,
            ChunkFile(RECORD_KEY, len(record), crc32c.crc32c(record)),
            ChunkFile("zarr.json", len(group), crc32c.crc32c(group)),
        ]
        manifest = Manifest(hashlib.sha256(record).hexdigest(), tuple(files))
        storage.write(COMMIT_KEY, [manifest.encode()])
        storage.sync()
        if os.path.lexists(self.path):
            raise CheckpointExistsError(f"{self.path} was created by someone else meanwhile")
        os.rename(self.temp_path, self.path)
        if self.fsync:
            fsync_directory(self.parent)
        return manifest

    def abort(self) -> None:
        """Remove what was written; the final path is untouched."""
        shutil.rmtree(self.temp_path, ignore_errors=True)


@dataclass
class CommittedCheckpoint:
    """A committed checkpoint opened for reading: its storage, manifest and record."""

    storage: Storage
    manifest: Manifest
    graph: ObjectGraph

    @property
    def url(self) -> str:
        return self.storage.url


def open_committed(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> CommittedCheckpoint:
    """Open the committed checkpoint at ``path``, checking manifest and record."""
    fs, root = resolve_path(path, storage_options)
    if not is_local(fs):
        raise ZarrckptError(
            f"{path}: only local paths are supported so far; fsspec URLs come with the "
            "object-store commit protocol"
        )
    storage = LocalStorage(root, fsync=False)
    where = storage.url
    try:
        manifest_bytes = storage.read(COMMIT_KEY)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.isdir(root):
            raise CheckpointNotFoundError(
                f"{where}: not a committed checkpoint (no {COMMIT_KEY} manifest); it may be "
                "a save that did not finish"
            ) from None
        raise CheckpointNotFoundError(f"{where}: no checkpoint at this path") from None
    manifest = Manifest.decode(manifest_bytes, where=f"{where}/{COMMIT_KEY}")
    try:
        record = storage.read(RECORD_KEY)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{where}: {RECORD_KEY} is missing") from None
    if hashlib.sha256(record).hexdigest() != manifest.record_sha256:
        raise CorruptCheckpointError(
            f"{where}/{RECORD_KEY}: SHA-256 does not match the commit manifest"
        )
    graph = ObjectGraph.decode(record, where=f"{where}/{RECORD_KEY}")
    return CommittedCheckpoint(storage=storage, manifest=manifest, graph=graph)
