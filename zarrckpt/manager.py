"""CheckpointManager: numbering, retention, the state file, restore-or-initialize."""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from zarrckpt._async import lower_priority, wait_at_exit
from zarrckpt._commit import Manifest, check_metadata, read_marker, writer_identity
from zarrckpt._graph import build_save_plan
from zarrckpt._storage import fsync_directory, is_local, open_storage
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.checkpoint import Checkpoint
from zarrckpt.copy import copy_checkpoint
from zarrckpt.directory import (
    delete_checkpoint,
    list_checkpoints,
    remove_leftovers,
    state_file_name,
)
from zarrckpt.errors import (
    AsyncSaveError,
    CheckpointExistsError,
    ConcurrentWriterError,
    DistributedError,
    InvalidArgumentError,
    ZarrckptError,
)
from zarrckpt.options import CheckpointOptions
from zarrckpt.variable import Variable

if TYPE_CHECKING:
    from zarrckpt.distributed import Coordinator

__all__ = ["CheckpointManager"]

_STATE_FORMAT = 1
_MAX_STATE_BYTES = 64 << 20
logger = logging.getLogger("zarrckpt")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


@dataclass
class _Entry:
    path: str
    number: int
    created: float
    metrics: dict[str, float] = field(default_factory=dict)
    # Found when the state file was missing or damaged: it may have been preserved.
    maybe_preserved: bool = False

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/").replace(os.sep, "/"))


def _numeric(metadata: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a checkpoint's metadata: the metrics ``best_fn`` sees."""
    return {
        key: float(value)
        for key, value in metadata.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def _is_finite_number(value: object) -> bool:
    """A JSON number that is a finite float (ints of 400 digits are not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_number(name: str, value: object, *, integer: bool, least: int) -> None:
    """``value`` is None or a finite (integer) number of at least ``least``."""
    if value is None:
        return
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not least <= value < math.inf:
        kind = "an int" if integer else "a number"
        raise InvalidArgumentError(f"{name} must be None or {kind} >= {least}, got {value!r}")


class CheckpointManager:
    """Saves numbered checkpoints into a directory and deletes old ones.

    TensorFlow's ``tf.train.CheckpointManager``, on local paths and fsspec URLs:
    ``max_to_keep`` most recent checkpoints are kept (None keeps all), plus one
    every ``keep_checkpoint_every_n_hours``; ``step_counter`` with
    ``checkpoint_interval`` makes ``save()`` return None until the interval has
    passed; ``restore_or_initialize()`` restores the latest checkpoint or calls
    ``init_fn``. A new manager on an existing directory continues the numbering
    and the retention where the old one stopped: the committed checkpoints in
    the directory are the truth (their manifests hold the metrics given to
    :meth:`save`); the state file only adds which were preserved. If it is
    lost, checkpoints that may have been preserved are kept, never deleted.
    Each ``checkpoint_name`` has its own state file, so managers of several
    names can share a directory; one name in one directory has one writer (a
    second one is detected at its first conflicting save:
    :class:`~zarrckpt.errors.ConcurrentWriterError`).

    Checkpoints are ordered by number, never by clock: the latest is the
    committed one with the highest number. A numbered checkpoint whose
    ``_COMMIT`` cannot be read is skipped with a warning, its number is never
    reused, and it is never deleted automatically. On start, leftovers of this
    name's interrupted saves and deletes older than ``gc_older_than`` seconds
    are removed (None: never), and what was removed is logged on the
    ``zarrckpt`` logger.

    Beyond TensorFlow: with ``best_fn`` (a function of the ``metrics`` dict
    given to :meth:`save`, or the name of one metric) and ``best_mode``
    ("max" or "min"), the ``max_to_keep`` best checkpoints are kept, plus the
    latest so training can always resume.

    With ``enable_async=True``, :meth:`save` returns once the values are
    copied into the checkpoint's staging pool and the checkpoint is written
    and committed in the background; it joins ``checkpoints`` once committed.
    :meth:`wait_until_finished` waits for it (and raises its error, as the
    next :meth:`save` does).

    With ``replicate_to`` (a second directory, typically ``s3://...``, with
    ``replicate_storage_options``), the manager keeps two tiers: every save
    commits in ``directory`` (fast, local), then a background copy
    (:func:`~zarrckpt.copy_checkpoint`, verified) commits it in
    ``replicate_to``. ``max_to_keep`` applies to the local tier and
    ``remote_max_to_keep`` to the remote one (None keeps all); a local
    checkpoint is deleted only once its remote copy is committed, or a newer
    one is. A new manager copies what an earlier run did not.
    :attr:`latest_checkpoint` (so :meth:`restore_or_initialize`) is the
    newest committed checkpoint of either tier, the local one when equal.

    With a ``coordinator`` (:mod:`zarrckpt.distributed`), every rank creates
    the manager and calls its methods alike: the ranks save each checkpoint
    together; numbering, retention, the state file and leftover removal run
    on rank 0, and every rank gets the same paths, ``checkpoints`` and
    ``latest_checkpoint``.

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
        gc_older_than: float | None = 3600.0,
        coordinator: Coordinator | None = None,
        enable_async: bool = False,
        replicate_to: str | os.PathLike[str] | None = None,
        replicate_storage_options: dict[str, Any] | None = None,
        remote_max_to_keep: int | None = None,
    ) -> None:
        if not isinstance(checkpoint, Checkpoint):
            raise InvalidArgumentError(
                f"CheckpointManager needs a zarrckpt Checkpoint, got {checkpoint!r}"
            )
        _check_number("max_to_keep", max_to_keep, integer=True, least=1)
        _check_number(
            "keep_checkpoint_every_n_hours", keep_checkpoint_every_n_hours, integer=False, least=0
        )
        _check_number("checkpoint_interval", checkpoint_interval, integer=True, least=0)
        _check_number("gc_older_than", gc_older_than, integer=False, least=0)
        if checkpoint_interval is not None and step_counter is None:
            raise InvalidArgumentError("checkpoint_interval needs a step_counter to measure it")
        if step_counter is not None and (
            not isinstance(step_counter, Variable) or step_counter.shape != ()
        ):
            raise InvalidArgumentError(
                f"step_counter must be a scalar zarrckpt Variable, got {step_counter!r}"
            )
        if best_mode not in ("max", "min"):
            raise InvalidArgumentError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if best_fn is not None and not (isinstance(best_fn, str) or callable(best_fn)):
            raise InvalidArgumentError(
                f"best_fn must be a metric name or a function, got {best_fn!r}"
            )
        if init_fn is not None and not callable(init_fn):
            raise InvalidArgumentError(f"init_fn must be callable, got {init_fn!r}")
        if not isinstance(checkpoint_name, str) or not _PLAIN_NAME.fullmatch(checkpoint_name):
            raise InvalidArgumentError(
                f"checkpoint_name {checkpoint_name!r} is not a plain file name "
                "(letters, digits, '_', '-', '.', not starting with '.')"
            )
        if not isinstance(enable_async, bool):
            raise InvalidArgumentError(f"enable_async must be a bool, got {enable_async!r}")
        _check_number("remote_max_to_keep", remote_max_to_keep, integer=True, least=1)
        if replicate_to is None and (
            replicate_storage_options is not None or remote_max_to_keep is not None
        ):
            raise InvalidArgumentError(
                "replicate_storage_options and remote_max_to_keep need replicate_to"
            )
        self._checkpoint = checkpoint
        self._storage_options = storage_options
        if enable_async:
            options = replace(options or CheckpointOptions(), enable_async=True)
        self._options = options
        self._async = enable_async or (options is not None and options.enable_async)
        self._lock = threading.RLock()  # the lists below change on background threads too
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
        self._highest_taken = 0  # the highest checkpoint number seen in the directory
        self._coordinator = coordinator
        self._leader = coordinator is None or coordinator.rank == 0
        self._entries: list[_Entry] = []
        self._preserved: list[_Entry] = []
        self._last_preserved = 0.0
        # The remote tier (replicate_to): its manager lives on rank 0 only.
        self._replicate_to = None if replicate_to is None else os.fspath(replicate_to).rstrip("/")
        self._replicate_options = replicate_storage_options
        self._remote: CheckpointManager | None = None
        self._remote_latest: _Entry | None = None
        self._remote_highest = 0
        self._pending: list[_Entry] = []  # local checkpoints waiting for their remote copy
        self._replicating: threading.Thread | None = None
        self._replication_error: AsyncSaveError | None = None
        error = ""
        if self._leader:
            try:
                if gc_older_than is not None:
                    self._remove_leftovers(gc_older_than)
                self._entries, self._preserved, self._last_preserved = self._recover()
                if self._replicate_to is not None:
                    self._open_remote(remote_max_to_keep, gc_older_than)
            except Exception as exc:
                if coordinator is None:
                    raise
                error = f"{type(exc).__name__}: {exc}"
        self._share_state("starting", error)
        if self._async:
            self._reserve_staging_pool()
        if self._replicate_to is not None:
            wait_at_exit(self)
            self._start_replication()

    def _open_remote(self, remote_max_to_keep: int | None, gc_older_than: float | None) -> None:
        """The remote tier's manager; which local checkpoints it still lacks."""
        assert self._replicate_to is not None
        local_root = resolve_path(self._directory, self._storage_options)
        remote_root = resolve_path(self._replicate_to, self._replicate_options)
        if type(local_root[0]) is type(remote_root[0]) and local_root[1] == remote_root[1]:
            raise InvalidArgumentError(
                f"replicate_to={self._replicate_to!r} is the manager's own directory"
            )
        options = self._options and replace(self._options, enable_async=False)
        self._remote = CheckpointManager(
            self._checkpoint,
            self._replicate_to,
            max_to_keep=remote_max_to_keep,
            keep_checkpoint_every_n_hours=self._keep_every,
            checkpoint_name=self._name,
            best_fn=self._best_fn,
            best_mode=self._best_mode,
            storage_options=self._replicate_options,
            options=options,
            gc_older_than=gc_older_than,
        )
        self._remote_latest = self._remote._latest_entry()
        self._remote_highest = self._remote._highest_taken
        newest = self._remote_latest.number if self._remote_latest is not None else 0
        # Older ones are superseded by a newer remote copy: never copied again.
        self._pending = [e for e in self._entries + self._preserved if e.number > newest]
        self._pending.sort(key=lambda e: e.number)

    def _reserve_staging_pool(self) -> None:
        """Allocate the staging pool now, in the background, so the first save finds it."""
        try:
            with warnings.catch_warnings():  # the first save warns of what it leaves out
                warnings.simplefilter("ignore")
                plan = build_save_plan(self._checkpoint)
        except Exception:  # the first save reports what cannot be saved
            return
        nbytes = plan.nbytes + 64 * len(plan.arrays) + 4096  # and a save counter
        limit = self._options.staging_bytes if self._options is not None else None
        self._checkpoint._async_saver().pool.reserve_in_background(
            nbytes if limit is None else min(nbytes, limit), limit
        )

    def _share_state(self, step: str, error: str = "") -> None:
        """Rank 0's view of the directory, on every rank (nothing to do without a coordinator)."""
        if self._coordinator is None or self._coordinator.world_size == 1:
            return
        state = (
            error,
            self._entries,
            self._preserved,
            self._last_preserved,
            self._highest_taken,
            self._remote_latest,
            self._remote_highest,
        )
        try:
            shared = self._coordinator.broadcast_object(state if self._leader else None, 0)
        except DistributedError as exc:
            raise DistributedError(f"{self._directory}: CheckpointManager {step}: {exc}") from exc
        if shared[0]:
            raise DistributedError(
                f"{self._directory}: CheckpointManager {step} failed on rank 0: {shared[0]}",
                {0: shared[0]},
            )
        if not self._leader:
            with self._lock:
                (
                    _,
                    self._entries,
                    self._preserved,
                    self._last_preserved,
                    self._highest_taken,
                    self._remote_latest,
                    self._remote_highest,
                ) = shared

    # State ----------------------------------------------------------------------

    def _remove_leftovers(self, older_than: float) -> None:
        """Remove this name's leftovers of killed saves and deletes; log what went."""
        removed = remove_leftovers(
            self._directory, older_than, self._storage_options, checkpoint_name=self._name
        )
        if removed:
            nbytes = sum(size for _, size in removed)
            logger.warning(
                "%s: removed %d leftovers of interrupted saves and deletes older than %.0f s "
                "(%.1f MiB): %s",
                self._directory,
                len(removed),
                older_than,
                nbytes / (1 << 20),
                ", ".join(path for path, _ in removed[:10]),
            )

    def _recover(self) -> tuple[list[_Entry], list[_Entry], float]:
        """Committed checkpoints (the truth), with metrics and preservation from the state."""
        found = list_checkpoints(self._directory, self._storage_options, checkpoint_name=self._name)
        self._highest_taken = max((c.number or 0 for c in found), default=0)
        damaged = [c for c in found if c.damage]
        if damaged:
            warnings.warn(
                f"{self._directory}: {len(damaged)} checkpoints have a _COMMIT that cannot be "
                f"read and are skipped: "
                + "; ".join(f"{c.path}: {c.damage}" for c in damaged[:5])
                + f". New checkpoints are numbered after {self._highest_taken}; damaged ones "
                "are never deleted automatically (`zarrckpt verify` tells more).",
                RuntimeWarning,
                stacklevel=3,
            )
        committed = [c for c in found if c.committed]  # by number: retention goes by it
        state = self._read_state()
        preserved_names = set(state.get("preserved", []))
        state_lost = not state and bool(committed)
        entries: list[_Entry] = []
        preserved: list[_Entry] = []
        for info in committed:
            entry = _Entry(
                info.path,
                info.number or 0,
                info.created,
                _numeric(info.metadata),
                maybe_preserved=state_lost,
            )
            (preserved if info.name in preserved_names else entries).append(entry)
        if state_lost and self._keep_every is not None:
            warnings.warn(
                f"{self._state_path()} is missing or damaged: which of the {len(committed)} "
                "checkpoints found were kept by keep_checkpoint_every_n_hours is unknown, so "
                "none of them will be deleted by retention",
                RuntimeWarning,
                stacklevel=3,
            )
        last = state.get("last_preserved_timestamp")
        return entries, preserved, float(last) if last is not None else time.time()

    def _state_path(self) -> str:
        join = os.path.join if is_local(self._fs) else posixpath.join
        return join(self._root, state_file_name(self._name))

    def _read_state(self) -> dict[str, Any]:
        """The state file's content, or {} when it is missing or damaged in any way."""
        try:
            raw = open_storage(self._fs, self._root).read(
                state_file_name(self._name), _MAX_STATE_BYTES
            )
            state = json.loads(raw)
        except (OSError, ValueError, RecursionError, ZarrckptError):
            return {}
        if (
            not isinstance(state, dict)
            or state.get("format") != _STATE_FORMAT
            or state.get("checkpoint_name") != self._name
        ):
            return {}
        checkpoints, preserved = state.get("checkpoints"), state.get("preserved", [])
        last = state.get("last_preserved_timestamp")
        if (
            not isinstance(checkpoints, list)
            or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in checkpoints)
            or not isinstance(preserved, list)
            or not all(isinstance(name, str) for name in preserved)
            or not (last is None or _is_finite_number(last))
        ):
            return {}
        return state

    def _write_state(self) -> None:
        """Replace the state file atomically (rename locally; one PUT on object stores)."""

        def describe(entry: _Entry) -> dict[str, Any]:
            return {"name": entry.name, "created": entry.created, "metrics": entry.metrics}

        state = {
            "format": _STATE_FORMAT,
            "checkpoint_name": self._name,
            "latest": self.latest_checkpoint,
            "checkpoints": [describe(e) for e in self._entries],
            "preserved": [e.name for e in self._preserved],
            "last_preserved_timestamp": self._last_preserved,
        }
        if self._replicate_to is not None:
            pending = {e.name for e in self._pending}
            state["replicate_to"] = self._replicate_to
            state["replicated"] = [
                e.name for e in self._entries + self._preserved if e.name not in pending
            ]
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
        """The managed committed checkpoints, oldest first (preserved ones not included)."""
        with self._lock:
            return [e.path for e in self._entries]

    @property
    def remote_checkpoints(self) -> list[str]:
        """The remote tier's managed committed checkpoints, oldest first ([] without one).

        With a coordinator, rank 0 knows them; the other ranks get [].
        """
        remote = self._remote
        return remote.checkpoints if remote is not None else []

    def _latest_entry(self) -> _Entry | None:
        with self._lock:
            every = self._entries + self._preserved
        return max(every, key=lambda e: e.number) if every else None

    @property
    def latest_checkpoint(self) -> str | None:
        """The committed checkpoint with the highest number, saved or found at start.

        With ``replicate_to``: of either tier, the local one when both have it.
        """
        latest = self._latest_entry()
        remote = self._remote_latest
        if remote is not None and (latest is None or remote.number > latest.number):
            return remote.path
        return latest.path if latest is not None else None

    @property
    def checkpoint_interval(self) -> int | None:
        """Steps between checkpoints when a step counter is given."""
        return self._interval

    def _due(self, check_interval: bool) -> bool:
        """TensorFlow's rule: never twice at one step; else every ``checkpoint_interval``."""
        if self._interval is None or self._step_counter is None or self._last_saved_step is None:
            return True
        step = int(self._step_counter.numpy())
        if step == self._last_saved_step:
            return False
        return not check_interval or step >= self._last_saved_step + self._interval

    def _next_number(self, checkpoint_number: int | None) -> tuple[int, Variable]:
        counter = self._checkpoint._create_save_counter()
        counter.assign_add(1)
        if checkpoint_number is not None:
            return checkpoint_number, counter
        # A restarted job that did not restore the counter, or a newest checkpoint
        # that cannot be read (restore took the one before): never reuse a number.
        with self._lock:
            numbers = [e.number for e in self._entries + self._preserved]
        highest = max([self._highest_taken, self._remote_highest, *numbers])
        if int(counter.numpy()) <= highest:
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
        and ``check_interval`` is true, or (as in TensorFlow) the step counter
        has not moved since the last save or restore. ``metrics`` (names to
        numbers, e.g. ``{"loss": 0.31}``) are stored in the checkpoint's
        manifest, where ``best_fn`` finds them even after a restart. Old
        checkpoints are deleted in the background afterwards.

        With ``enable_async`` it returns once the values are staged: the path
        joins :attr:`checkpoints` when committed. It first waits for the
        previous save and raises its error, or a failed copy's to
        ``replicate_to`` (:class:`~zarrckpt.errors.AsyncSaveError`), without
        saving.
        """
        if checkpoint_number is not None and (
            isinstance(checkpoint_number, bool)
            or not isinstance(checkpoint_number, int | np.integer)
            or checkpoint_number < 0
        ):
            raise InvalidArgumentError(
                f"checkpoint_number must be a non-negative int, got {checkpoint_number!r}"
            )
        metadata = check_metadata(metrics, where=f"{self._directory}: save(metrics=...)")
        if any(not isinstance(v, int | float) or isinstance(v, bool) for v in metadata.values()):
            raise InvalidArgumentError(
                f"{self._directory}: save(metrics={metrics!r}): metrics are numbers"
            )
        if not self._due(check_interval):
            return None
        self._raise_background_errors()  # before a number is taken
        number, counter = self._next_number(
            None if checkpoint_number is None else int(checkpoint_number)
        )
        prefix = os.path.join if is_local(self._fs) else posixpath.join
        target = prefix(self._directory, f"{self._name}-{number}")
        entry = _Entry(target, number, time.time(), _numeric(metadata))
        options = options or self._options
        if self._async and options is not None and not options.enable_async:
            options = replace(options, enable_async=True)  # the manager's setting holds
        background = options is not None and options.enable_async
        if background:  # taken by Checkpoint.write, which runs it once committed
            object.__setattr__(self._checkpoint, "_zc_on_commit", lambda: self._committed(entry))
        try:
            path = self._checkpoint.write(
                target,
                options=options,
                storage_options=self._storage_options,
                metadata=metadata,
                coordinator=self._coordinator,
            )
        except CheckpointExistsError as exc:
            counter.assign_sub(1)
            if checkpoint_number is None:  # a number this manager chose was taken meanwhile
                self._highest_taken = max(self._highest_taken, number)
                raise self._conflict(target) from exc
            raise
        except BaseException:
            counter.assign_sub(1)
            raise
        finally:
            # Not taken: a subclass's write() that did not call Checkpoint.write
            # (so it is committed now), or an error before it.
            unused = self._checkpoint.__dict__.pop("_zc_on_commit", None)
        self._highest_taken = max(self._highest_taken, number)
        if self._step_counter is not None:
            self._last_saved_step = int(self._step_counter.numpy())
        if not background or unused is not None:
            self._committed(entry)
        return path

    def _committed(self, entry: _Entry) -> None:
        """``entry`` is committed: list it, apply retention, write the state, replicate it.

        Runs on the background thread after an async save, on every rank.
        """
        with self._lock:
            self._entries.append(entry)
            if self._replicate_to is not None and self._leader:
                self._pending.append(entry)
        error = ""
        if self._leader:
            try:
                self._after_save(entry.path)
            except Exception as exc:
                if self._coordinator is None:
                    raise
                error = f"{type(exc).__name__}: {exc}"  # the other ranks must hear of it
        self._share_state("after saving", error)
        self._start_replication()

    def _after_save(self, path: str) -> None:
        """Retention and the state file (rank 0's work with a coordinator)."""
        with self._lock:
            self._join_deletions(raise_errors=False)
            self._delete_in_background(self._sweep())
        try:
            self._write_state()
        except OSError as exc:
            # The checkpoint is committed; the state file only caches what was
            # preserved, and the next save writes it again.
            warnings.warn(
                f"{path} is saved, but {self._state_path()} could not be written ({exc}); "
                "the next save writes it again",
                RuntimeWarning,
                stacklevel=3,
            )

    def _conflict(self, target: str) -> ConcurrentWriterError:
        """The error for a checkpoint another writer committed under this manager's name."""
        fs, root = resolve_path(target, self._storage_options)
        try:
            other = Manifest.decode(read_marker(open_storage(fs, root)), where=target).writer
        except (OSError, ZarrckptError):
            other = ""
        host, _, rest = other.partition(":")
        pid = rest.partition(":")[0]
        if other == writer_identity():
            who = f"another CheckpointManager in this process (pid {pid})"
        elif other:
            who = f"process {pid} on host {host}"
        else:
            who = "a writer that cannot be identified"
        return ConcurrentWriterError(
            f"{target} was written by {who} while this manager saves '{self._name}-<n>' "
            f"checkpoints in {self._directory}: one checkpoint name in one directory has one "
            "writer. Give each writer its own checkpoint_name or directory."
        )

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
        waiting = {e.name for e in self._pending}  # kept until their remote copy is committed
        kept_out = []
        for entry in doomed:
            if entry.name in waiting:
                continue
            self._entries.remove(entry)
            hours = self._keep_every
            if hours is not None and entry.maybe_preserved:
                self._preserved.append(entry)  # the state file that knew was lost
            elif hours is not None and entry.created - self._last_preserved >= hours * 3600:
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
            c.name
            for c in list_checkpoints(
                self._directory, self._storage_options, checkpoint_name=self._name
            )
            if c.committed
        }
        for entry, _ in failures:
            if entry.name in still_there:
                self._entries.append(entry)  # retried by the next sweep
        self._entries.sort(key=lambda e: e.number)
        message = "; ".join(f"{e.path}: {exc}" for e, exc in failures)
        if raise_errors:
            raise failures[0][1]
        warnings.warn(
            f"could not delete old checkpoints ({message}); will retry",
            RuntimeWarning,
            stacklevel=3,
        )

    # Replication (replicate_to) -----------------------------------------------------

    def _start_replication(self) -> None:
        """Copy the pending checkpoints on a background thread, unless one already does."""
        with self._lock:
            if self._remote is None or not self._pending or self._replicating is not None:
                return
            self._replicating = threading.Thread(
                target=self._replicate_and_end, name="zarrckpt-replicate", daemon=True
            )
            self._replicating.start()

    def _replicate_and_end(self) -> None:
        try:
            lower_priority()
            self._replicate()
        finally:  # whatever happened, this thread no longer copies
            with self._lock:
                if self._replicating is threading.current_thread():
                    self._replicating = None

    def _replicate(self) -> None:
        """Copy pending checkpoints oldest first, each committed remotely before the next."""
        remote = self._remote
        assert remote is not None and self._replicate_to is not None
        join = os.path.join if is_local(remote._fs) else posixpath.join
        while True:
            with self._lock:
                newest = self._remote_latest.number if self._remote_latest is not None else 0
                self._pending = [e for e in self._pending if e.number > newest]
                if not self._pending:
                    self._replicating = None
                    break
                entry = self._pending[0]
            target = join(self._replicate_to, entry.name)
            try:
                copy_checkpoint(
                    entry.path,
                    target,
                    source_storage_options=self._storage_options,
                    destination_storage_options=self._replicate_options,
                    options=remote._options,
                )
                remote._adopt(_Entry(target, entry.number, entry.created, dict(entry.metrics)))
            except Exception as exc:
                error = AsyncSaveError(
                    f"copying {entry.path} to {target} failed ({type(exc).__name__}: {exc}); "
                    f"{entry.name} is committed locally and kept there, and is copied "
                    "again after the next save",
                    target,
                )
                error.__cause__ = exc
                logger.warning("%s", error)
                with self._lock:
                    self._replication_error = error
                    self._replicating = None
                return
            with self._lock:
                self._remote_latest = remote._latest_entry()
                self._remote_highest = max(self._remote_highest, entry.number)
                self._pending = [e for e in self._pending if e is not entry]
            try:  # the local copy may go now, if retention says so
                self._after_save(entry.path)
            except Exception as exc:
                logger.warning("%s: retention after replicating failed: %s", self._directory, exc)

    def _adopt(self, entry: _Entry) -> None:
        """A checkpoint committed in this (remote) directory by a copy: manage it."""
        with self._lock:
            self._highest_taken = max(self._highest_taken, entry.number)
            self._entries.append(entry)
            self._entries.sort(key=lambda e: e.number)
        self._after_save(entry.path)

    def _raise_background_errors(self) -> None:
        """Wait for the save in flight; raise its error, or a failed copy's, once."""
        self._checkpoint.wait_until_finished()
        with self._lock:
            error, self._replication_error = self._replication_error, None
        if error is not None:
            raise error

    def _wait_at_exit(self) -> None:
        while (thread := self._replicating) is not None:
            logger.info("waiting for the copies to %s before exiting", self._replicate_to)
            thread.join()
        if self._replication_error is not None:
            print(f"zarrckpt: {self._replication_error}", file=sys.stderr)

    def wait_until_finished(self) -> None:
        """Wait for the async save in flight, the copies to ``replicate_to`` and deletions.

        Raises the first error among them (a failed async save or copy as
        :class:`~zarrckpt.errors.AsyncSaveError`). Orbax's name.
        """
        self._checkpoint.wait_until_finished()
        while (thread := self._replicating) is not None:
            thread.join()
        self._raise_background_errors()
        if self._remote is not None:
            self._remote._join_deletions(raise_errors=True)
        self._join_deletions(raise_errors=True)

    def wait(self) -> None:
        """:meth:`wait_until_finished` (kept from before async saves)."""
        self.wait_until_finished()

    def restore_or_initialize(self) -> str | None:
        """Restore the latest checkpoint and return its path, else run ``init_fn``; return None.

        With ``replicate_to``, the latest of either tier (a new machine with an
        empty local directory restores from the remote one).
        """
        self._raise_background_errors()
        latest = self.latest_checkpoint
        if latest is not None:
            remote = self._remote_latest is not None and latest == self._remote_latest.path
            self._checkpoint.restore(
                latest,
                options=self._options,
                storage_options=self._replicate_options if remote else self._storage_options,
                coordinator=self._coordinator,
            )
            if self._step_counter is not None:  # no save at the step just restored
                self._last_saved_step = int(self._step_counter.numpy())
            return latest
        if self._init_fn is not None:
            self._init_fn()
        return None

    def __repr__(self) -> str:
        extra = " async" if self._async else ""
        if self._replicate_to is not None:
            extra += f" replicate_to={self._replicate_to!r} pending={len(self._pending)}"
        return (
            f"<zarrckpt.CheckpointManager {self._directory!r} name={self._name!r} "
            f"max_to_keep={self._max_to_keep} checkpoints={len(self._entries)}{extra}>"
        )
