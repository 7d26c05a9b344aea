"""Asynchronous save: the reusable host staging pool and the background save.

An async save copies every value it writes into a :class:`StagingPool` (host
memory allocated once per checkpoint, pre-faulted, reused by every later
save), then writes, syncs and commits from those copies on a background
thread while the caller goes on changing its values. The copy is all the
caller waits for: at most the cost of a ``memcpy``, since the pool's pages
are already mapped (a first touch of fresh memory costs about 30 times the
copy here) and the copy runs on several threads.

One :class:`AsyncSaver` per :class:`~zarrckpt.Checkpoint` runs at most one
background save at a time; the next save, ``wait_until_finished()`` and
process exit wait for it. Its error is kept until one of those calls raises
it as :class:`~zarrckpt.errors.AsyncSaveError`.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.thread  # registers its exit hook before ours
import ctypes
import logging
import mmap
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from zarrckpt.errors import AsyncSaveError
from zarrckpt.trackable import ArrayWindow

__all__ = ["AsyncSaver", "StagingPool", "lower_priority", "wait_at_exit"]

logger = logging.getLogger("zarrckpt")

_ALIGN = 64  # every staged value starts on a cache line
_HUGE_PAGE = 2 << 20
_PIECE = 8 << 20  # the unit of one copy task
_MADV_NOHUGEPAGE = 15  # Linux
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
# How much lower than the caller's the background save's CPU priority is (its
# I/O threads inherit it): the training's threads keep their cores.
BACKGROUND_NICENESS = 10
_PAGE = mmap.PAGESIZE

Array = np.ndarray[Any, Any]


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` (it releases the GIL, unlike ``mmap.madvise``), where there is one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has it
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class StagingPool:
    """Host memory that async saves copy values into: allocated once, pre-faulted, reused.

    ``nbytes`` is the memory it holds. It grows (to what the save needs,
    rounded up to 2 MiB) when a save needs more and never shrinks until
    :meth:`release`. On Linux it is an anonymous mapping populated at once
    (``MADV_POPULATE_WRITE``): 0.25 s a GiB here, against 2.7 s for faulting
    fresh pages in one by one during a copy. It is kept off huge pages: on
    the VMs measured (bench/RESULTS.md), populating huge pages cost 2.5 s a
    GiB in a new process, and writes from them were slower too.
    """

    def __init__(self) -> None:
        self._buffer: Array = np.empty(0, np.uint8)
        self._lock = threading.Lock()
        self._growing: threading.Thread | None = None
        self._grow_error: BaseException | None = None
        self.allocation_seconds = 0.0  # spent allocating and populating, in all

    @property
    def nbytes(self) -> int:
        """Bytes of host memory the pool holds."""
        return int(self._buffer.nbytes)

    def reserve(self, nbytes: int, limit: int | None = None) -> None:
        """Make the pool hold at least ``nbytes``, populated; waits for a background reserve.

        It rounds up to whole huge pages, but never above ``limit`` bytes.
        """
        self._join()
        with self._lock:
            if nbytes > self._buffer.nbytes:
                size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
                if limit is not None:
                    size = max(nbytes, min(size, limit))
                self._buffer = np.empty(0, np.uint8)  # the old mapping goes before the new
                self._buffer = self._allocate(size)

    def reserve_in_background(self, nbytes: int, limit: int | None = None) -> None:
        """Start :meth:`reserve` on a thread (at setup, so the first save finds the pool ready)."""
        self._join()

        def run() -> None:
            try:
                self.reserve(nbytes, limit)
            except BaseException as exc:  # reported by the next reserve()
                self._grow_error = exc

        self._growing = threading.Thread(target=run, name="zarrckpt-staging-pool", daemon=True)
        self._growing.start()

    def _join(self) -> None:
        growing = self._growing
        if growing is not None and growing is not threading.current_thread():
            growing.join()
            self._growing = None
        error, self._grow_error = self._grow_error, None
        if error is not None:
            raise error

    def _allocate(self, nbytes: int) -> Array:
        start = time.perf_counter()
        if os.name == "nt":  # pragma: no cover - not tested here
            buffer: Array = np.ones(nbytes, np.uint8)
        else:
            mapping = mmap.mmap(
                -1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )
            whole = np.frombuffer(mapping, np.uint8)
            skip = -whole.ctypes.data % _HUGE_PAGE
            buffer = whole[skip : skip + nbytes]
            populated = False
            if _MADVISE is not None:
                address = buffer.ctypes.data
                _MADVISE(address, nbytes, _MADV_NOHUGEPAGE)
                populated = _MADVISE(address, nbytes, _MADV_POPULATE_WRITE) == 0
            if not populated:
                buffer[::_PAGE] = 0  # touch every page now, not during a save
        self.allocation_seconds += time.perf_counter() - start
        return buffer

    def view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Array:
        """An array of ``shape`` and ``dtype`` over the pool's bytes from ``offset``."""
        count = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return self._buffer[offset : offset + count].view(dtype).reshape(shape)

    def release(self) -> None:
        """Give the memory back (it is freed once no staged view refers to it)."""
        self._join()
        with self._lock:
            self._buffer = np.empty(0, np.uint8)

    def __repr__(self) -> str:
        return f"<zarrckpt StagingPool {self.nbytes / (1 << 20):.1f} MiB>"


def _copy_tasks(target: Array, source: Array | ArrayWindow) -> list[Callable[[], None]]:
    """Tasks that together copy ``source`` into ``target`` (same shape), each about 8 MiB."""
    if (
        isinstance(source, np.ndarray)
        and source.flags.c_contiguous
        and source.dtype == target.dtype
        and source.size
    ):
        flat_source = source.reshape(-1).view(np.uint8)
        flat_target = target.reshape(-1).view(np.uint8)

        def copy_bytes(a: int) -> None:
            np.copyto(flat_target[a : a + _PIECE], flat_source[a : a + _PIECE])

        return [partial(copy_bytes, a) for a in range(0, flat_source.nbytes, _PIECE)]
    if target.ndim == 0 or target.size == 0:
        region = tuple(slice(0, n) for n in target.shape)

        def copy_whole() -> None:
            np.copyto(target, source[region] if isinstance(source, ArrayWindow) else source)

        return [copy_whole]
    rows = target.shape[0]
    step = max(1, _PIECE // max(1, target.nbytes // rows))
    rest = tuple(slice(0, n) for n in target.shape[1:])

    def copy_rows(a: int) -> None:
        region = (slice(a, min(a + step, rows)), *rest)
        np.copyto(target[region], source[region])

    return [partial(copy_rows, a) for a in range(0, rows, step)]


def lower_priority() -> None:
    """Lower this thread's CPU priority (and so its future threads') by BACKGROUND_NICENESS.

    On Linux a thread's niceness is its own and new threads inherit it, so a
    background save's I/O threads leave the cores to the caller's threads
    when both want them. Elsewhere (the call would renice the whole process)
    it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, now + BACKGROUND_NICENESS))
    except OSError:  # pragma: no cover - raising one's own niceness is always allowed
        pass


class AsyncSaver:
    """One checkpoint's staging pool and its background save (at most one in flight)."""

    def __init__(self) -> None:
        self.pool = StagingPool()
        self._thread: threading.Thread | None = None
        self._error: AsyncSaveError | None = None
        self._path = ""
        self._copiers: ThreadPoolExecutor | None = None
        _savers.add(self)

    @property
    def in_flight(self) -> str | None:
        """The path of the save running in the background, if one is."""
        thread = self._thread
        return self._path if thread is not None and thread.is_alive() else None

    def stage(
        self, arrays: Sequence[tuple[str, Array]], limit: int | None
    ) -> tuple[list[tuple[str, Array]], list[tuple[str, Array]], int]:
        """Copy ``arrays`` into the pool, in order, while they fit ``limit`` bytes.

        Returns the staged copies, the arrays left out (to be written before
        the caller goes on), and the bytes staged. Must not run while a save
        in flight still writes from the pool (:meth:`wait` first).
        """
        placed: list[tuple[str, Array, int]] = []  # an ArrayWindow passes as an array
        left: list[tuple[str, Array]] = []
        end = 0
        for key, array in arrays:
            size = _aligned(int(array.nbytes))
            if limit is not None and end + size > limit:
                left.append((key, array))
                continue
            placed.append((key, array, end))
            end += size
        self.pool.reserve(end, limit)
        staged: list[tuple[str, Array]] = []
        tasks: list[Callable[[], None]] = []
        for key, array, offset in placed:
            copy = self.pool.view(offset, tuple(array.shape), array.dtype)
            staged.append((key, copy))
            tasks.extend(_copy_tasks(copy, array))
        if len(tasks) > 1:
            if self._copiers is None:
                workers = max(1, min(4, os.cpu_count() or 1))
                self._copiers = ThreadPoolExecutor(workers, thread_name_prefix="zarrckpt-stage")
            futures = [self._copiers.submit(task) for task in tasks]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                # No copy may still run into the pool once this returns (Ctrl-C, an error).
                for future in futures:
                    future.cancel()
                concurrent.futures.wait(futures)
                raise
        elif tasks:
            tasks[0]()
        return staged, left, end

    def submit(self, path: str, work: Callable[[], None]) -> None:
        """Run ``work`` (write, sync, commit) on a background thread; keep its error."""
        self.wait()

        def run() -> None:
            try:
                lower_priority()
                work()
            except BaseException as exc:
                error = AsyncSaveError(
                    f"{path}: the background save failed ({type(exc).__name__}: {exc}); "
                    "the checkpoint was not committed and this call did not start "
                    "anything. Earlier checkpoints are intact.",
                    path,
                )
                error.__cause__ = exc
                self._error = error
                logger.warning("background save of %s failed: %s", path, exc)

        self._path = path
        self._thread = threading.Thread(target=run, name="zarrckpt-async-save", daemon=True)
        self._thread.start()

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until the save in flight (if any) has ended; raise its error once."""
        thread = self._thread
        if thread is not None:
            if thread is threading.current_thread():
                return
            thread.join()
            self._thread = None
        if raise_error and self._error is not None:
            error, self._error = self._error, None
            raise error

    def __repr__(self) -> str:
        state = f"saving {self.in_flight}" if self.in_flight else "idle"
        return f"<zarrckpt AsyncSaver {state}, pool {self.pool.nbytes / (1 << 20):.1f} MiB>"


_savers: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()
_waiters: weakref.WeakSet[Any] = weakref.WeakSet()  # objects with a _wait_at_exit() method


def wait_at_exit(obj: Any) -> None:
    """Have ``obj._wait_at_exit()`` called when the process exits normally (a manager's copies)."""
    _waiters.add(obj)


def _finish_at_exit() -> None:
    """A process that exits normally finishes its saves in flight first.

    Registered with threading's exit hooks, after concurrent.futures' own,
    so it runs before thread pools refuse new work.
    """
    for saver in list(_savers):
        path = saver.in_flight
        if path is None:
            continue
        logger.info("waiting for the background save of %s before exiting", path)
        saver.wait(raise_error=False)
        error = saver._error
        if error is not None:
            saver._error = None
            print(
                f"zarrckpt: {error} (while the process exited; cause: {error.__cause__!r})",
                file=sys.stderr,
            )
    for waiter in list(_waiters):
        waiter._wait_at_exit()


_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_finish_at_exit)
else:  # pragma: no cover - every supported Python has it
    import atexit

    atexit.register(_finish_at_exit)
