"""An fsspec filesystem that fails chosen operations, for fault-injection tests.

``FaultyFileSystem`` (protocol ``faulty``) delegates every call to a real
filesystem (``memory`` or ``file``) and counts the operations that change
state: writes (``pipe_file``, ``open`` for writing, ``touch``), renames
(``mv`` / ``rename``) and deletes (one per file removed). A :class:`FaultPlan`,
passed in ``storage_options={"plan": plan}``, says which occurrence of which
kind raises ``OSError(EIO)`` instead of running. Paths are absolute:
``faulty:///run/ckpt-1`` is ``/run/ckpt-1`` of the wrapped filesystem.

Example:
    >>> plan = FaultPlan(fail={"write": 3})
    >>> ckpt.save("faulty:///run/ckpt", storage_options={"plan": plan})  # 3rd write fails
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractFileSystem

__all__ = ["KINDS", "FaultPlan", "FaultyFileSystem", "InjectedFault", "register"]

KINDS = ("write", "rename", "delete")


class InjectedFault(OSError):
    """The error an injected fault raises (an OSError with errno EIO)."""


class FaultPlan:
    """Counts operations by kind and fails the chosen occurrences.

    ``fail={"write": 3}`` fails the 3rd write counted from the last
    :meth:`reset` (only that one unless ``sticky``: then every later one too).
    With ``after=True`` the operation is carried out and then reports the
    error, like a request whose response was lost. ``log`` records ``(kind,
    number, path)`` of every operation, and ``injected`` the ones that failed.
    """

    def __init__(
        self, fail: dict[str, int] | None = None, *, sticky: bool = False, after: bool = False
    ) -> None:
        self._lock = threading.Lock()
        self.fail: dict[str, int] = {}
        self.sticky = sticky
        self.after = after
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, int, str]] = []
        self.injected: list[tuple[str, int, str]] = []
        self.reset(fail, sticky=sticky, after=after)

    def reset(
        self, fail: dict[str, int] | None = None, *, sticky: bool = False, after: bool = False
    ) -> None:
        """Start counting from zero with a new set of faults."""
        unknown = set(fail or {}) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown operation kinds {sorted(unknown)}; known: {KINDS}")
        with self._lock:
            self.fail = dict(fail or {})
            self.sticky = sticky
            self.after = after
            self.counts = Counter()
            self.log = []
            self.injected = []

    def tick(self, kind: str, path: str) -> bool:
        """Count one ``kind`` operation on ``path``; True if it is to fail.

        Callers raise :meth:`error` before the operation, or after it when
        :attr:`after` is set.
        """
        with self._lock:
            self.counts[kind] += 1
            number = self.counts[kind]
            self.log.append((kind, number, path))
            target = self.fail.get(kind)
            hit = target is not None and (number == target or (self.sticky and number > target))
            if hit:
                self.injected.append((kind, number, path))
        return hit

    @staticmethod
    def error(kind: str, path: str) -> InjectedFault:
        return InjectedFault(errno.EIO, f"injected fault: {kind}", path)

    def run(self, kind: str, path: str, operation: Callable[[], Any]) -> Any:
        """Count the operation and run it, failing it as planned."""
        if not self.tick(kind, path):
            return operation()
        if self.after:
            operation()
        raise self.error(kind, path)

    def paths(self, kind: str) -> list[str]:
        """The paths of every counted ``kind`` operation, in order."""
        with self._lock:
            return [path for k, _, path in self.log if k == kind]


def _inner(target: str) -> AbstractFileSystem:
    if target == "memory":
        return MemoryFileSystem()
    if target == "file":
        return LocalFileSystem(auto_mkdir=True)
    raise ValueError(f"target must be 'memory' or 'file', got {target!r}")


class FaultyFileSystem(AbstractFileSystem):
    """Delegates to a real filesystem and fails operations as its FaultPlan says."""

    protocol = "faulty"
    root_marker = "/"
    cachable = False  # every instance carries its own plan

    def __init__(self, plan: FaultPlan | None = None, target: str = "memory", **kwargs: Any):
        super().__init__(**kwargs)
        self.plan = plan if plan is not None else FaultPlan()
        self.target = target
        self.fs = _inner(target)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://") :]
        path = "/" + path.lstrip("/")
        return path.rstrip("/") or "/"

    # Reads: straight through -------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self.fs.ls(self._strip_protocol(path), detail=detail, **kwargs)

    def info(self, path: str, **kwargs: Any) -> Any:
        return self.fs.info(self._strip_protocol(path), **kwargs)

    def cat_file(self, path: str, start: Any = None, end: Any = None, **kwargs: Any) -> Any:
        return self.fs.cat_file(self._strip_protocol(path), start=start, end=end, **kwargs)

    def exists(self, path: str, **kwargs: Any) -> bool:
        return bool(self.fs.exists(self._strip_protocol(path)))

    def isfile(self, path: str) -> bool:
        return bool(self.fs.isfile(self._strip_protocol(path)))

    def isdir(self, path: str) -> bool:
        return bool(self.fs.isdir(self._strip_protocol(path)))

    def find(self, path: str, maxdepth: Any = None, withdirs: bool = False, **kwargs: Any) -> Any:
        return self.fs.find(
            self._strip_protocol(path), maxdepth=maxdepth, withdirs=withdirs, **kwargs
        )

    def created(self, path: str) -> Any:
        return self.fs.created(self._strip_protocol(path))

    def modified(self, path: str) -> Any:
        return self.fs.modified(self._strip_protocol(path))

    # Writes ----------------------------------------------------------------------

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if any(flag in mode for flag in "wxa+") and self.plan.tick("write", path):
            raise self.plan.error("write", path)  # no "after" for streams
        return self.fs.open(path, mode, **kwargs)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self.plan.run("write", path, lambda: self.fs.pipe_file(path, value, mode=mode, **kwargs))

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        self.plan.run("write", path, lambda: self.fs.touch(path, truncate=truncate, **kwargs))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.fs.mkdir(self._strip_protocol(path), create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.fs.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self.plan.run("write", path2, lambda: self.fs.cp_file(path1, path2, **kwargs))

    # Renames -----------------------------------------------------------------------

    def mv(self, path1: str, path2: str, recursive: bool = False, **kwargs: Any) -> None:
        path1, path2 = self._strip_protocol(path1), self._strip_protocol(path2)
        self.plan.run(
            "rename",
            f"{path1} -> {path2}",
            lambda: self.fs.mv(path1, path2, recursive=recursive, **kwargs),
        )

    def rename(self, path1: str, path2: str, **kwargs: Any) -> None:
        self.mv(path1, path2, **kwargs)

    # Deletes: one counted operation per file ---------------------------------

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        if self.fs.isdir(path) and not self.fs.isfile(path):
            self.rmdir(path)
            return
        self.plan.run("delete", path, lambda: self.fs.rm_file(path))

    def _rm(self, path: str) -> None:
        self.rm_file(path)

    def rmdir(self, path: str) -> None:
        path = self._strip_protocol(path)
        # memory: a directory without a pseudo-dir entry vanishes with its files
        with contextlib.suppress(FileNotFoundError):
            self.fs.rmdir(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: Any = None) -> None:
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        for p in sorted(paths, key=len, reverse=True):
            if self.fs.isfile(p):
                self.rm_file(p)
            elif self.fs.isdir(p):
                self.rmdir(p)


def register() -> None:
    """Make ``faulty://`` URLs resolve to :class:`FaultyFileSystem`."""
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


register()
