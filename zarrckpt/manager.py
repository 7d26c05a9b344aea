"""CheckpointManager: numbering, retention, the state file, restore-or-initialize."""

from __future__ import annotations

import json
import math
import os
import posixpath
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from zarrckpt._storage import fsync_directory, is_local
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.checkpoint import Checkpoint
from zarrckpt.directory import STATE_FILE, delete_checkpoint, list_checkpoints
from zarrckpt.options import CheckpointOptions
from zarrckpt.variable import Variable

__all__ = ["CheckpointManager"]

_STATE_FORMAT = 1


@dataclass
class _Entry:
    path: str
    number: int | None
    created: float
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointManager:
    """Saves numbered checkpoints into a directory and deletes old ones.

    TensorFlow's ``tf.train.CheckpointManager``, on local paths and fsspec URLs:
    ``max_to_keep`` most recent checkpoints are kept (None keeps all), plus one
    every ``keep_checkpoint_every_n_hours``; ``step_counter`` with
    ``checkpoint_interval`` makes ``save()`` return None until the interval has
    passed; ``restore_or_initialize()`` restores the latest checkpoint or calls
    ``init_fn``. A new manager on an existing directory continues the numbering
    and the retention where the old one stopped: the committed checkpoints in
    the directory are the truth, the state file adds metrics and preserved
    checkpoints.

    Beyond TensorFlow: with ``best_fn`` (a function of the ``metrics`` dict
    given to :meth:`save`, or the name of one metric) and ``best_mode``
    ("max" or "min"), the ``max_to_keep`` best checkpoints are kept, plus the
    latest so training can always resume.

    Example:
        >>> manager = CheckpointManager(zc.Checkpoint(model=model), "s3://bucket/run",
        ...                             max_to_keep=3, storage_options={"anon": False})
        >>> manager.restore_or_initialize()
        >>> for step in range(1000):
        ...     train_step()
        ...     if step % 100 == 0:
        ...         manager.save()
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float | None = None,
        checkpoint_name: str = "ckpt",
        step_counter: Variable | None = None,
        checkpoint_interval: int | None = None,
        init_fn: Callable[[], Any] | None = None,
        best_fn: Callable[[Mapping[str, float]], float] | str | None = None,
        best_mode: Literal["max", "min"] = "max",
        storage_options: dict[str, Any] | None = None,
        options: CheckpointOptions | None = None,
    ) -> None:
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"CheckpointManager needs a zarrckpt Checkpoint, got {checkpoint!r}")
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be None or a positive int, got {max_to_keep!r}")
        if checkpoint_interval is not None and step_counter is None:
            raise ValueError("checkpoint_interval needs a step_counter to measure it")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if not checkpoint_name or "/" in checkpoint_name or checkpoint_name.startswith("."):
            raise ValueError(f"checkpoint_name {checkpoint_name!r} is not a plain file name")
        self._checkpoint = checkpoint
        self._storage_options = storage_options
        self._options = options
        self._fs, self._root = resolve_path(directory, storage_options)
        self._directory = os.fspath(directory).rstrip("/")
        self._max_to_keep = max_to_keep
        self._keep_every = keep_checkpoint_every_n_hours
        self._name = checkpoint_name
        self._step_counter = step_counter
        self._interval = checkpoint_interval
        self._init_fn = init_fn
        self._best_fn = best_fn
        self._best_mode = best_mode
        self._last_saved_step: int | None = None
        self._deleting: threading.Thread | None = None
        self._delete_failures: list[tuple[_Entry, Exception]] = []
        self._entries, self._preserved, self._last_preserved = self._recover()

    # State ----------------------------------------------------------------------

    def _recover(self) -> tuple[list[_Entry], list[_Entry], float]:
        """Committed checkpoints (the truth), with metrics and preservation from the state."""
        committed = [
            c
            for c in list_checkpoints(
                self._directory, self._storage_options, checkpoint_name=self._name
            )
            if c.committed
        ]
        committed.sort(key=lambda c: c.created)  # retention goes by commit order
        state = self._read_state()
        metrics = {e["name"]: e.get("metrics", {}) for e in state.get("checkpoints", [])}
        preserved_names = set(state.get("preserved", []))
        entries: list[_Entry] = []
        preserved: list[_Entry] = []
        for info in committed:
            entry = _Entry(info.path, info.number, info.created, dict(metrics.get(info.name, {})))
            (preserved if info.name in preserved_names else entries).append(entry)
        last = state.get("last_preserved_timestamp")
        return entries, preserved, float(last) if isinstance(last, int | float) else time.time()

    def _state_path(self) -> str:
        return (os.path.join if is_local(self._fs) else posixpath.join)(self._root, STATE_FILE)

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self._fs.cat_file(self._state_path())
            state = json.loads(raw)
        except (FileNotFoundError, ValueError):
            return {}
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            return {}
        checkpoints = state.get("checkpoints")
        if not isinstance(checkpoints, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in checkpoints
        ):
            return {}
        return state

    def _write_state(self) -> None:
        """Replace the state file atomically (rename locally; one PUT on object stores)."""

        def describe(entry: _Entry) -> dict[str, Any]:
            name = posixpath.basename(entry.path.rstrip("/"))
            return {"name": name, "created": entry.created, "metrics": entry.metrics}

        state = {
            "format": _STATE_FORMAT,
            "checkpoint_name": self._name,
            "latest": self.latest_checkpoint,
            "checkpoints": [describe(e) for e in self._entries],
            "preserved": [posixpath.basename(e.path.rstrip("/")) for e in self._preserved],
            "last_preserved_timestamp": self._last_preserved,
        }
        data = json.dumps(state, indent=1).encode()
        path = self._state_path()
        if is_local(self._fs):
            os.makedirs(self._root, exist_ok=True)
            temp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(temp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
            fsync_directory(self._root)
        else:
            self._fs.pipe_file(path, data)

    # Public ---------------------------------------------------------------------

    @property
    def directory(self) -> str:
        """Where the checkpoints are."""
        return self._directory

    @property
    def checkpoints(self) -> list[str]:
        """The managed checkpoints, oldest first (preserved ones not included)."""
        return [e.path for e in self._entries]

    @property
    def latest_checkpoint(self) -> str | None:
        """The most recent checkpoint saved by this manager or found at start."""
        every = self._entries + self._preserved
        return max(every, key=lambda e: e.created).path if every else None

    @property
    def checkpoint_interval(self) -> int | None:
        """Steps between checkpoints when a step counter is given."""
        return self._interval

    def _due(self) -> bool:
        if self._interval is None or self._step_counter is None:
            return True
        step = int(self._step_counter.numpy())
        return self._last_saved_step is None or step - self._last_saved_step >= self._interval

    def _next_number(self, checkpoint_number: int | None) -> tuple[int, Variable]:
        counter = self._checkpoint._create_save_counter()
        counter.assign_add(1)
        if checkpoint_number is not None:
            return int(checkpoint_number), counter
        highest = max((e.number for e in self._entries + self._preserved if e.number), default=0)
        if int(counter.numpy()) <= highest:  # a restarted job that did not restore the counter
            counter.assign(highest + 1)
        return int(counter.numpy()), counter

    def save(
        self,
        checkpoint_number: int | None = None,
        check_interval: bool = True,
        metrics: Mapping[str, float] | None = None,
        options: CheckpointOptions | None = None,
    ) -> str | None:
        """Save a checkpoint numbered ``checkpoint_number`` (default: the save counter).

        Returns its path, or None when a ``checkpoint_interval`` has not passed
        and ``check_interval`` is true. Old checkpoints are deleted in the
        background afterwards.
        """
        if check_interval and not self._due():
            return None
        number, counter = self._next_number(checkpoint_number)
        prefix = os.path.join if is_local(self._fs) else posixpath.join
        target = prefix(self._directory, f"{self._name}-{number}")
        try:
            path = self._checkpoint.write(
                target, options=options or self._options, storage_options=self._storage_options
            )
        except BaseException:
            counter.assign_sub(1)
            raise
        entry = _Entry(path, number, time.time(), {k: float(v) for k, v in (metrics or {}).items()})
        self._entries.append(entry)
        if self._step_counter is not None:
            self._last_saved_step = int(self._step_counter.numpy())
        self._join_deletions(raise_errors=False)
        self._delete_in_background(self._sweep())
        self._write_state()
        return path

    def _sweep(self) -> list[_Entry]:
        """Remove from the managed list what retention says goes; return those entries."""
        if self._max_to_keep is None:
            return []
        if self._best_fn is not None:
            best = sorted(self._entries, key=self._score, reverse=True)[: self._max_to_keep]
            keep = {id(e) for e in best} | {id(self._entries[-1])}
            doomed = [e for e in self._entries if id(e) not in keep]
        else:
            doomed = self._entries[: max(0, len(self._entries) - self._max_to_keep)]
        kept_out = []
        for entry in doomed:
            self._entries.remove(entry)
            hours = self._keep_every
            if hours is not None and entry.created - self._last_preserved >= hours * 3600:
                self._last_preserved = entry.created
                self._preserved.append(entry)
            else:
                kept_out.append(entry)
        return kept_out

    def _score(self, entry: _Entry) -> float:
        if isinstance(self._best_fn, str):
            value = entry.metrics.get(self._best_fn)
        elif self._best_fn is not None:
            try:
                value = self._best_fn(entry.metrics)
            except (KeyError, TypeError, ValueError):
                value = None
        else:
            value = None
        if value is None or math.isnan(float(value)):
            return -math.inf  # checkpoints without the metric rank last
        return float(value) if self._best_mode == "max" else -float(value)

    def _delete_in_background(self, doomed: list[_Entry]) -> None:
        if not doomed:
            return
        failures = self._delete_failures

        def delete(entry: _Entry) -> None:
            try:
                delete_checkpoint(entry.path, self._storage_options)
            except Exception as exc:
                failures.append((entry, exc))

        def run() -> None:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(delete, doomed))

        self._deleting = threading.Thread(target=run, name="zarrckpt-retention", daemon=True)
        self._deleting.start()

    def _join_deletions(self, *, raise_errors: bool) -> None:
        """Wait for background deletions; checkpoints that failed to go are managed again."""
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None
        if not self._delete_failures:
            return
        failures, self._delete_failures[:] = list(self._delete_failures), []
        still_there = {
            c.path
            for c in list_checkpoints(
                self._directory, self._storage_options, checkpoint_name=self._name
            )
            if c.committed
        }
        for entry, _ in failures:
            if entry.path in still_there:
                self._entries.append(entry)  # retried by the next sweep
        self._entries.sort(key=lambda e: e.created)
        message = "; ".join(f"{e.path}: {exc}" for e, exc in failures)
        if raise_errors:
            raise failures[0][1]
        warnings.warn(
            f"could not delete old checkpoints ({message}); will retry",
            RuntimeWarning,
            stacklevel=3,
        )

    def wait(self) -> None:
        """Wait for background deletions; raise the first error if one failed."""
        self._join_deletions(raise_errors=True)

    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint and return its path, else run ``init_fn``; return None."""
        latest = self.latest_checkpoint
        if latest is not None:
            self._checkpoint.restore(
                latest, options=self._options, storage_options=self._storage_options
            )
            return latest
        if self._init_fn is not None:
            self._init_fn()
        return None

    def __repr__(self) -> str:
        return (
            f"<zarrckpt.CheckpointManager {self._directory!r} name={self._name!r} "
            f"max_to_keep={self._max_to_keep} checkpoints={len(self._entries)}>"
        )
