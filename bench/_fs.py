"""File-system helpers: durable fsync, page-cache dropping, residency checks."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
from pathlib import Path

import numpy as np

PAGE = mmap.PAGESIZE


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def dirs_under(root: Path) -> list[Path]:
    return [root, *sorted(p for p in root.rglob("*") if p.is_dir())]


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in files_under(root))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, and ``root``'s parent."""
    for path in [*files_under(root), *dirs_under(root), root.parent]:
        _fsync_path(path)


def drop_cache_tree(root: Path) -> None:
    """Evict the page cache of every file under ``root`` (fsync first, so pages are clean)."""
    for path in files_under(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def file_resident_bytes(path: Path) -> int:
    """Bytes of ``path`` currently in the page cache (mincore on a fresh mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            vec = np.zeros((size + PAGE - 1) // PAGE, np.uint8)
            if _libc.mincore(addr, size, vec.ctypes.data) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            return int(np.count_nonzero(vec & 1)) * PAGE
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_bytes(root: Path) -> int:
    return sum(file_resident_bytes(p) for p in files_under(root))


def remove_tree(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)


def pwrite_all(fd: int, view: memoryview, offset: int = 0) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def pread_into(fd: int, view: memoryview, offset: int = 0) -> None:
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise EOFError(f"file ended {len(view)} bytes early")
        view, offset = view[got:], offset + got
