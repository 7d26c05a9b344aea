"""Where a checkpoint's files go: a root URL plus relative keys.

``LocalStorage`` talks to the OS directly (``O_DIRECT`` chunk writes,
``syncfs``, ``readv`` into the caller's buffers) because that is what reaches
disk speed;
``FsspecStorage`` serves every other fsspec filesystem. Every key is checked
here, at the edge, so nothing read from a checkpoint can name a file outside
the root.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from zarrckpt.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidKeyError,
    MissingDependencyError,
    ZarrckptError,
)

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "Storage",
    "check_path_length",
    "check_relative_key",
    "open_storage",
    "resolve",
]

Buffer = bytes | bytearray | memoryview


def _libc_function(name: str, *argtypes: Any) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's ``name`` on Linux (syncfs, sync_file_range: not in the os module), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):  # pragma: no cover - glibc and musl have both
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


_syncfs = _libc_function("syncfs", ctypes.c_int)
_sync_file_range = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the dirty pages, do not wait
_fallocate = _libc_function("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_O_DIRECT: int | None = getattr(os, "O_DIRECT", None)


def _nbytes(parts: Sequence[Buffer]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        count = os.pwrite(fd, data, offset)
        data, offset = data[count:], offset + count


def check_relative_key(key: str) -> str:
    """Return ``key`` if it is a safe relative path, else raise :class:`InvalidKeyError`."""
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise InvalidKeyError(f"unsafe storage key {key!r}: must be relative without '.' or '..'")
    return key


class Storage(ABC):
    """The files of one checkpoint (or checkpoint attempt) under one root."""

    url: str

    @abstractmethod
    def write(self, key: str, parts: Sequence[Buffer]) -> None:
        """Create or replace file ``key`` with the concatenation of ``parts``."""

    @abstractmethod
    def read(self, key: str, limit: int | None = None) -> bytes:
        """The whole content of ``key``; FileNotFoundError if absent.

        A file of more than ``limit`` bytes is refused before it is read
        (:class:`CorruptCheckpointError`), so a hostile size never sizes a buffer.
        """

    @abstractmethod
    def read_into(self, key: str, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in order with the content of ``key``, which must fit exactly."""

    @abstractmethod
    def sizes(self) -> dict[str, int]:
        """Every file under the root with its size, from one listing."""

    # Whether many small files are read sooner by several threads at once (an
    # object store: a round trip each) than one after another after will_read().
    PARALLEL_SMALL_READS = True

    def prepare(self, keys: Iterable[str]) -> None:  # noqa: B027 - nothing to prepare by default
        """Get ready to write the files ``keys`` names (local storage makes their directories)."""

    def will_read(self, keys: Iterable[str]) -> None:  # noqa: B027 - a hint only
        """Say that the files ``keys`` names are read next (local storage starts reading them)."""

    def sync(self) -> None:  # noqa: B027 - nothing to do where writes are durable at once
        """Make every file written so far durable (directory entries included)."""

    def _size_error(self, key: str, found: int, expected: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.url}/{key}: file has {found} bytes, expected {expected}"
        )

    def _limit_error(self, key: str, found: int, limit: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.url}/{key}: file has {found} bytes or more, over the limit of {limit}"
        )


class LocalStorage(Storage):
    """Files on a local filesystem; ``sync()`` makes them durable.

    With ``fsync``, a file of ``EAGER_FSYNC_BYTES`` or more (a chunk) is
    written with ``O_DIRECT``: its blocks are reserved first (``fallocate``,
    one extent however many threads write side by side), its bytes are copied
    into the writing thread's page-aligned buffer of ``DIRECT_BUFFER`` bytes
    and go to the disk from there, never through the page cache; the last
    block is padded and the file cut back to its size. Where ``O_DIRECT`` is
    refused (``EINVAL``), that file and every later one are written through
    the page cache instead, each chunk's writeback started as soon as it is
    written (``sync_file_range(WRITE)``). Smaller files (``zarr.json``, the
    record) are written through the page cache.

    :meth:`sync` then makes every file and every directory created durable
    with one ``syncfs()`` on the root (opened before the first write, so Linux
    reports to it every writeback error since), or, for fewer than
    ``SYNCFS_FROM`` of them or without ``syncfs``, with an fsync each,
    ``threads`` at once. :meth:`prepare` makes every directory a save needs
    from one thread before the writing threads start, so they never contend
    on a parent directory's lock. The measurements behind each choice are in
    bench/RESULTS.md (issue 14) and docs/architecture.md ("Durability").
    """

    EAGER_FSYNC_BYTES = 1 << 20
    PARALLEL_SMALL_READS = False  # 148 zarr.json: 0.016 s after will_read, 0.03 s by 8 threads
    # What happens to a chunk file: "direct" (above); "start" its writeback
    # once written through the page cache (sync_file_range, where there is
    # one; else "fsync"); "fsync" it in the writing thread; or "defer"
    # everything to sync(). Class attributes, so bench/ can compare them.
    CHUNK_WRITEBACK = "direct"
    DIRECT_BUFFER = 2 << 20  # per writing thread, a multiple of DIRECT_ALIGN
    DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT writes
    FALLOCATE = True
    # From this many files and directories left to make durable, sync() makes
    # them durable with one syncfs() rather than one fsync (one device cache
    # flush here) each.
    SYNCFS_FROM = 32

    def __init__(self, root: str, *, fsync: bool = True, threads: int = 8) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root
        self.fsync = fsync
        self.threads = threads
        self._made_dirs: set[str] = set()
        self._written: list[str] = []  # files not fsynced yet
        self._safe_dirs: set[str] = {self.root}  # real directories, no symlinks, under root
        self._lock = threading.Lock()
        self._root_fd: int | None = None  # see _watch_errors
        self._close_root: weakref.finalize | None = None  # type: ignore[type-arg]
        self._direct = _O_DIRECT is not None
        self._buffers = threading.local()

    def _watch_errors(self) -> None:
        """Open the root before writing, so that syncfs on it reports every writeback error since.

        Linux reports to syncfs(fd) the filesystem's writeback errors that
        happened after ``fd`` was opened, so it is opened before any file
        this storage makes durable with it is written.
        """
        if self._root_fd is not None or not self.fsync or _syncfs is None:
            return
        with self._lock:
            if self._root_fd is None:
                try:
                    fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:
                    return  # sync() fsyncs file by file
                self._root_fd = fd
                self._close_root = weakref.finalize(self, os.close, fd)

    def _path(self, key: str) -> str:
        return check_path_length(os.path.join(self.root, check_relative_key(key)))

    def _open_regular(self, key: str) -> tuple[int, int]:
        """Open file ``key`` for reading: (descriptor, size); only a regular file inside root.

        No symlink is followed (neither the file nor a directory on the way) and
        nothing but a regular file is opened, so a checkpoint can never make a
        reader read ``/dev/zero``, wait on a FIFO or read outside the root.
        """
        path = self._path(key)
        self._check_directories(os.path.dirname(path), key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._not_regular(key, "a symbolic link") from None
            if exc.errno in (errno.ENOTDIR, errno.ENOENT):
                raise FileNotFoundError(errno.ENOENT, "no such file", path) from None
            raise
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise self._not_regular(key, kind)
        return fd, info.st_size

    def _not_regular(self, key: str, kind: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.url}/{key}: is {kind}; a checkpoint holds only regular files and directories"
        )

    def _check_directories(self, directory: str, key: str) -> None:
        """Every directory from the root down to ``directory`` is a real one (no symlink)."""
        missing = []
        while directory not in self._safe_dirs:
            missing.append(directory)
            directory = os.path.dirname(directory)
            if len(directory) < len(self.root):  # pragma: no cover - keys are relative
                raise InvalidKeyError(f"{key!r} leaves {self.root}")
        for path in reversed(missing):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "no such directory", path) from None
            if stat.S_ISLNK(mode):
                raise self._not_regular(os.path.relpath(path, self.root), "a symbolic link")
            if not stat.S_ISDIR(mode):
                raise FileNotFoundError(errno.ENOTDIR, "not a directory", path)
            with self._lock:
                self._safe_dirs.add(path)

    def _ensure_dir(self, directory: str) -> None:
        with self._lock:
            if directory in self._made_dirs:
                return
        os.makedirs(directory, exist_ok=True)
        with self._lock:
            # makedirs may have created the directories above it too: each one's
            # entry lives in its parent, and sync() fsyncs them all.
            while directory not in self._made_dirs and len(directory) > len(self.root):
                self._made_dirs.add(directory)
                directory = os.path.dirname(directory)

    def prepare(self, keys: Iterable[str]) -> None:
        """Make the directories of every file ``keys`` names, from this thread, in one pass."""
        self._watch_errors()
        directories = {os.path.dirname(self._path(key)) for key in keys}
        for directory in sorted(directories):
            self._ensure_dir(directory)

    def write(self, key: str, parts: Sequence[Buffer]) -> None:
        path = self._path(key)
        self._watch_errors()
        self._ensure_dir(os.path.dirname(path))
        nbytes = _nbytes(parts)
        chunk = self.fsync and nbytes >= self.EAGER_FSYNC_BYTES
        mode = self.CHUNK_WRITEBACK if chunk else "defer"
        if mode == "direct" and not (self._direct and self._write_direct(path, parts, nbytes)):
            mode = "start"
        if mode == "start" and _sync_file_range is None:
            mode = "fsync"
        if mode != "direct":
            self._write_buffered(path, parts, mode)
        if self.fsync and mode != "fsync":
            with self._lock:
                self._written.append(path)  # for sync()

    def _write_buffered(self, path: str, parts: Sequence[Buffer], mode: str) -> None:
        """Write ``path`` through the page cache; then fsync it or start its writeback."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pending = [memoryview(p).cast("B") for p in parts if len(p)]
            while pending:
                written = os.writev(fd, pending)
                while pending and written >= len(pending[0]):
                    written -= len(pending[0])
                    pending.pop(0)
                if pending and written:
                    pending[0] = pending[0][written:]
            if mode == "fsync":
                os.fsync(fd)
            elif mode == "start":
                assert _sync_file_range is not None
                _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # sync() waits for it
        finally:
            os.close(fd)

    def _write_direct(self, path: str, parts: Sequence[Buffer], nbytes: int) -> bool:
        """Write ``path`` with O_DIRECT, bypassing the page cache; False where it cannot.

        The parts are copied into this thread's aligned buffer; the last block
        is padded with zeros, and the file cut back to its size afterwards.
        """
        assert _O_DIRECT is not None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False  # a filesystem without O_DIRECT: buffered from now on
            return False
        try:
            self._fill_direct(path, fd, parts, nbytes)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # O_DIRECT accepted at open but not for these blocks (a larger block
            # size than DIRECT_ALIGN): the caller writes the file again, buffered.
            self._direct = False
            return False
        finally:
            os.close(fd)
        return True

    def _fill_direct(self, path: str, fd: int, parts: Sequence[Buffer], nbytes: int) -> None:
        """Copy ``parts`` into this thread's buffer and write it out each time it is full.

        The last block is padded with zeros to ``DIRECT_ALIGN``, and the file
        cut back to the parts' size after it.
        """
        buffer, align = self._buffer(), self.DIRECT_ALIGN
        offset = filled = 0
        if self.FALLOCATE and _fallocate is not None:
            # The whole file's blocks reserved at once: one extent where the
            # filesystem can, however many threads write files side by side.
            # A full disk says so here, before a byte is copied; a filesystem
            # that cannot reserve blocks (EOPNOTSUPP) is simply written to.
            size = -(-nbytes // align) * align
            if _fallocate(fd, 0, 0, size) != 0:
                code = ctypes.get_errno()
                if code in (errno.ENOSPC, errno.EDQUOT):
                    raise OSError(code, f"cannot reserve {size} bytes: {os.strerror(code)}", path)
        for part in parts:
            view = memoryview(part).cast("B")
            while len(view):
                take = min(len(view), len(buffer) - filled)
                buffer[filled : filled + take] = view[:take]
                filled, view = filled + take, view[take:]
                if filled == len(buffer):
                    _pwrite_all(fd, buffer, offset)
                    offset, filled = offset + filled, 0
        if filled:
            padded = -(-filled // align) * align
            buffer[filled:padded] = bytes(padded - filled)
            _pwrite_all(fd, buffer[:padded], offset)
            if padded != filled:
                os.ftruncate(fd, offset + filled)

    def _buffer(self) -> memoryview:
        """This thread's buffer for O_DIRECT writes: page-aligned, made on first use."""
        buffer: memoryview | None = getattr(self._buffers, "buffer", None)
        if buffer is None:
            buffer = self._buffers.buffer = memoryview(mmap.mmap(-1, self.DIRECT_BUFFER))
        return buffer

    def will_read(self, keys: Iterable[str]) -> None:
        """Ask the kernel to read every file of ``keys`` at once (``POSIX_FADV_WILLNEED``).

        From one thread, without waiting for any: the disk gets all the small
        reads together, and the reads that follow find the pages cached. A
        file that cannot be opened is skipped; reading it reports why.
        """
        for key in keys:
            try:
                fd, _ = self._open_regular(key)
            except (OSError, ZarrckptError):
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def read(self, key: str, limit: int | None = None) -> bytes:
        fd, size = self._open_regular(key)
        with open(fd, "rb", closefd=True) as file:
            if limit is None:
                return file.read()
            if size > limit:
                raise self._limit_error(key, size, limit)
            # read(n) allocates n bytes first: ask for the size found (and one byte
            # more, in case the file grows meanwhile), never for the limit.
            data = file.read(size + 1)
        if len(data) > limit:
            raise self._limit_error(key, len(data), limit)
        return data

    def read_into(self, key: str, buffers: Sequence[memoryview]) -> None:
        expected = sum(len(b) for b in buffers)
        fd, size = self._open_regular(key)
        try:
            if size != expected:
                raise self._size_error(key, size, expected)
            pending = [b.cast("B") if b.format != "B" else b for b in buffers if len(b)]
            total = 0
            while pending:
                count = os.readv(fd, pending)
                if count == 0:
                    raise self._size_error(key, total, expected)
                total += count
                while pending and count >= len(pending[0]):
                    count -= len(pending[0])
                    pending.pop(0)
                if pending and count:
                    pending[0] = pending[0][count:]
            if os.read(fd, 1):
                raise self._size_error(key, os.fstat(fd).st_size, expected)
        finally:
            os.close(fd)

    def sizes(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    found[os.path.relpath(path, self.root).replace(os.sep, "/")] = info.st_size
        return found

    def sync(self) -> None:
        if not self.fsync:
            return
        with self._lock:
            files, self._written = self._written, []
            directories = sorted(self._made_dirs | {self.root})
            root_fd, close_root = self._root_fd, self._close_root
            self._root_fd = self._close_root = None  # later writes watch anew
        if root_fd is not None and close_root is not None:
            try:
                if len(files) + len(directories) >= self.SYNCFS_FROM:
                    # Every dirty file and directory entry of the filesystem, ours
                    # among them, written and flushed at once (one journal commit
                    # and one device flush); any writeback error since the root
                    # was opened is raised.
                    assert _syncfs is not None
                    if _syncfs(root_fd) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, f"syncfs: {os.strerror(code)}", self.root)
                    return
            finally:
                close_root()
        # Every file first (its data and size), then every directory (the
        # entries naming them); each group in parallel, raising the first failure.
        for group, work in ((files, fsync_file), (directories, fsync_directory)):
            if len(group) > 1 and self.threads > 1:
                with ThreadPoolExecutor(min(self.threads, len(group))) as pool:
                    list(pool.map(work, group))
            else:
                for path in group:
                    work(path)


def _path_limits() -> tuple[int, int]:
    """PATH_MAX and NAME_MAX of this platform (Linux: 4096 and 255)."""
    try:
        return os.pathconf("/", "PC_PATH_MAX"), os.pathconf("/", "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - not POSIX
        return 4096, 255


_PATH_MAX, _NAME_MAX = _path_limits()


def check_path_length(path: str) -> str:
    """Return local ``path`` if the OS can open it, else raise :class:`InvalidKeyError`.

    So a deep key below a long directory is a clear error before anything is
    written, not an ``ENAMETOOLONG`` half-way through a save.
    """
    encoded = os.fsencode(path)
    longest = max(len(part) for part in encoded.split(b"/"))
    if len(encoded) >= _PATH_MAX or longest > _NAME_MAX:
        raise InvalidKeyError(
            f"path of {len(encoded)} bytes with a name of {longest} bytes: {path[:120]}... "
            f"This system allows {_PATH_MAX - 1} and {_NAME_MAX}: save to a shorter "
            "directory, or use shorter names"
        )
    return path


def fsync_file(path: str) -> None:
    """fsync a file written earlier (its data and size become durable)."""
    _fsync(path, os.O_RDONLY)


def fsync_directory(directory: str) -> None:
    """fsync a directory so the entries created in it are durable."""
    _fsync(directory, os.O_RDONLY | os.O_DIRECTORY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecStorage(Storage):
    """Files on any fsspec filesystem (memory, object stores, ...)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = fs.unstrip_protocol(self.root)

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_relative_key(key)}"

    def write(self, key: str, parts: Sequence[Buffer]) -> None:
        self.fs.pipe_file(self._path(key), b"".join(parts))

    def read(self, key: str, limit: int | None = None) -> bytes:
        path = self._path(key)
        # s3fs answers FileNotFoundError from a cached listing without asking the
        # store; files other processes wrote since must be seen.
        self.fs.invalidate_cache(path)
        try:
            if limit is None:
                data: bytes = self.fs.cat_file(path)
            else:  # one ranged GET: never more than the limit (and one byte) in memory
                data = self.fs.cat_file(path, start=0, end=limit + 1)
        except (IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "not a file", path) from None
        if limit is not None and len(data) > limit:
            raise self._limit_error(key, len(data), limit)
        return data

    def read_into(self, key: str, buffers: Sequence[memoryview]) -> None:
        expected = sum(len(b) for b in buffers)
        # A ranged GET: an object grown past its expected size costs one byte
        # more, never its whole size in memory.
        try:
            data = memoryview(self.read(key, limit=expected))
        except CorruptCheckpointError:
            raise CorruptCheckpointError(
                f"{self.url}/{key}: file has more than {expected} bytes, expected {expected}"
            ) from None
        if len(data) != expected:
            raise self._size_error(key, len(data), expected)
        offset = 0
        for buffer in buffers:
            flat = buffer.cast("B") if buffer.format != "B" else buffer
            flat[:] = data[offset : offset + len(flat)]
            offset += len(flat)

    def sizes(self) -> dict[str, int]:
        self.fs.invalidate_cache(self.root)
        try:
            listing = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        start = len(self.fs._strip_protocol(self.root).rstrip("/")) + 1
        return {
            str(name)[start:]: int(info.get("size") or 0)
            for name, info in listing.items()
            if info.get("type") != "directory"
        }


def open_storage(fs: fsspec.AbstractFileSystem, root: str) -> Storage:
    """A read-only view of the files under ``root`` (local or any fsspec filesystem)."""
    return LocalStorage(root, fsync=False) if is_local(fs) else FsspecStorage(fs, root)


def resolve(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for a local path or fsspec URL.

    An unknown protocol is an :class:`InvalidArgumentError` and a protocol whose
    package is missing a :class:`MissingDependencyError`, both naming the fix.
    """
    url = os.fspath(path)
    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as exc:
        protocol = fsspec.core.split_protocol(url)[0] or "file"
        if protocol in ("s3", "s3a"):
            hint = "pip install 'zarrckpt[s3]' (it installs s3fs)"
        else:
            known = known_implementations.get(protocol, {})
            hint = known.get("err") or str(exc)
        raise MissingDependencyError(
            f"{url}: the {protocol}:// protocol needs a package that is not installed: {hint}"
        ) from exc
    except ValueError as exc:
        if not str(exc).startswith("Protocol not known"):
            raise
        protocol = fsspec.core.split_protocol(url)[0]
        raise InvalidArgumentError(
            f"{url}: unknown protocol {protocol!r}; a path is a local path or an fsspec URL "
            "such as s3://bucket/run or gs://bucket/run"
        ) from None
    if isinstance(fs, LocalFileSystem):
        root = os.path.abspath(root)
    return fs, str(root).rstrip("/") or "/"


def missing_bucket(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The bucket of ``path`` if ``fs`` is an object store and the bucket does not exist.

    Probes once (s3fs: HEAD bucket); None where there are no buckets, where the
    bucket exists, or where the probe itself fails (the caller's own error then
    says more).
    """
    split_path = getattr(fs, "split_path", None)
    if split_path is None or is_local(fs):
        return None
    try:
        bucket = str(split_path(path)[0])
        fs.invalidate_cache(bucket)
        return None if fs.exists(bucket) else bucket
    except Exception:
        return None


def missing_bucket_message(fs: fsspec.AbstractFileSystem, url: str, bucket: str) -> str:
    """What to say about a missing bucket: that zarrckpt never creates one."""
    return (
        f"{url}: the bucket {bucket!r} does not exist. zarrckpt never creates buckets: "
        f"create it first (for example `aws s3 mb {fs.unstrip_protocol(bucket)}`)"
    )


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (where LocalStorage applies)."""
    return isinstance(fs, LocalFileSystem)
