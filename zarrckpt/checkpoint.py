"""Checkpoint: save and restore a graph of trackable objects.

Saving traverses the graph (see :mod:`zarrckpt._graph`), writes one Zarr array
per saved value and the object-graph record, and commits atomically (see
:mod:`zarrckpt._commit`). Restoring matches the record's nodes to live objects
by dependency names, starting from the root, checks every match's shape and
dtype before reading any byte, then reads each value straight into the live
object's memory. Checkpointed objects the program has not created yet are
restored when they are attached (deferred restoration).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from zarrckpt import array_io
from zarrckpt._async import AsyncSaver
from zarrckpt._commit import (
    CommittedCheckpoint,
    MetadataValue,
    begin_commit,
    check_metadata,
    open_committed,
)
from zarrckpt._dtypes import dtype_from_name
from zarrckpt._graph import SavePlan, build_save_plan, list_objects
from zarrckpt.errors import (
    CheckpointExistsError,
    DistributedError,
    DistributedRestoreError,
    InvalidArgumentError,
    MatchError,
    UnmatchedValuesWarning,
    caller_location,
)
from zarrckpt.optimizer import Optimizer
from zarrckpt.options import CheckpointOptions
from zarrckpt.record import SavedAttribute, SlotVariableReference
from zarrckpt.trackable import AutoTrackable, SaveableValue, Trackable
from zarrckpt.variable import Variable

if TYPE_CHECKING:
    from zarrckpt.distributed import Coordinator
    from zarrckpt.distributed._save import Stage

__all__ = ["Checkpoint", "CheckpointLoadStatus", "InitializationOnlyStatus"]

SAVE_COUNTER = "save_counter"
PathLike = str | os.PathLike[str]


class Checkpoint(AutoTrackable):
    """Groups trackable objects, saves them to and restores them from checkpoints.

    Keyword arguments name the root's dependencies; more can be attached later
    as attributes. ``save()`` numbers checkpoints with ``save_counter``, which
    is saved with them and restored by ``read()`` / ``restore()``.

    Example:
        >>> ckpt = Checkpoint(model=model, optimizer=opt)
        >>> path = ckpt.save("/ckpts/run")          # "/ckpts/run-1"
        >>> Checkpoint(model=fresh_model).restore(path).assert_existing_objects_matched()
    """

    def __init__(self, **objects: Trackable) -> None:
        for name, obj in objects.items():
            if name == SAVE_COUNTER:
                raise InvalidArgumentError(
                    f"{SAVE_COUNTER!r} is reserved for the checkpoint's counter"
                )
            if not isinstance(obj, Trackable):
                raise InvalidArgumentError(
                    f"Checkpoint({name}=...) expects a Trackable, got {type(obj).__name__}"
                )
            setattr(self, name, obj)

    @property
    def save_counter(self) -> Variable:
        """The int64 scalar Variable counting ``save()`` calls; 0 before the first.

        Created on first access (as in TensorFlow), after which it is a
        dependency that ``write()`` saves too; ``int(ckpt.save_counter)`` reads it.
        """
        return self._create_save_counter()

    def _existing_save_counter(self) -> Variable | None:
        counter = self._lookup_dependency(SAVE_COUNTER)
        return counter if isinstance(counter, Variable) else None

    def _create_save_counter(self) -> Variable:
        counter = self._existing_save_counter()
        if counter is None:
            counter = Variable(np.int64(0), name=None, dtype=np.int64)
            self._track_trackable(counter, SAVE_COUNTER)
        return counter

    def write(
        self,
        path: PathLike,
        *,
        options: CheckpointOptions | None = None,
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, MetadataValue] | None = None,
        coordinator: Coordinator | None = None,
    ) -> str:
        """Write a committed checkpoint at ``path``; ``save_counter`` is not incremented.

        Returns ``path``. Refuses to write over an existing checkpoint.
        ``options`` tunes chunking, parallelism, the in-flight byte budget and
        compression; what the write moved is in :attr:`last_write_stats`.
        ``metadata`` (up to 256 ``str -> bool | int | float | str``, e.g. the
        step and the loss) is stored in the commit manifest and listed by
        :func:`~zarrckpt.list_checkpoints` without reading the checkpoint.

        With a ``coordinator`` (:mod:`zarrckpt.distributed`), every rank calls
        ``write`` with the same path and the ranks write one checkpoint
        together: each its blocks of sharded Variables, each replicated value
        written once; rank 0 commits when all succeeded, and any failure raises
        :class:`~zarrckpt.errors.DistributedSaveError` on every rank.
        :attr:`last_write_stats` is then what this rank wrote.
        With ``options=CheckpointOptions(enable_async=True)`` it returns once
        every value is copied into this checkpoint's staging pool, and writes
        and commits in the background (see :meth:`wait_until_finished`).
        """
        # A CheckpointManager's callback for an async commit (it calls this method,
        # which a subclass may override, rather than _write).
        on_commit: Callable[[], None] | None = self.__dict__.pop("_zc_on_commit", None)
        return self._write(path, options, storage_options, metadata, coordinator, on_commit)

    def _write(
        self,
        path: PathLike,
        options: CheckpointOptions | None,
        storage_options: dict[str, Any] | None,
        metadata: Mapping[str, MetadataValue] | None,
        coordinator: Coordinator | None,
        on_commit: Callable[[], None] | None = None,
    ) -> str:
        """:meth:`write`; ``on_commit`` runs once the checkpoint is committed.

        That is before returning, or on the background thread after an async
        commit (its error is then the save's error).
        """
        options = options or CheckpointOptions()
        metadata = check_metadata(metadata, where=os.fspath(path))
        self.wait_until_finished()  # one save at a time, in order; raises a failed one
        plan = build_save_plan(self) if coordinator is None else None
        if plan is not None and plan.shards:
            from zarrckpt.distributed import LocalCoordinator

            coordinator = LocalCoordinator()
        if options.enable_async:
            written = self._write_async(
                path, plan, options, storage_options, metadata, coordinator, on_commit
            )
        elif coordinator is not None:
            stats, finish = self._start_distributed(
                path, coordinator, options, storage_options, metadata, plan
            )
            finish()
            object.__setattr__(self, "_zc_last_write_stats", stats)
            written = os.fspath(path)
        else:
            assert plan is not None
            written = self._write_local(path, plan, options, storage_options, metadata)
        if on_commit is not None and not options.enable_async:
            on_commit()
        return written

    def _write_local(
        self,
        path: PathLike,
        plan: SavePlan,
        options: CheckpointOptions,
        storage_options: dict[str, Any] | None,
        metadata: dict[str, MetadataValue],
    ) -> str:
        commit = begin_commit(path, storage_options, fsync=options.fsync, threads=options.threads)
        storage = commit.create()
        stats = array_io.IOStats(progress=options.progress)
        start = time.perf_counter()
        try:
            files = array_io.write_arrays(storage, plan.arrays, options, stats)
            commit.finalize(plan.graph.encode(), files, metadata)
        except BaseException as exc:
            commit.abort()
            clearer = commit.explain_failure(exc)
            if clearer is not None:
                raise clearer from exc
            raise
        stats.blocked_seconds = time.perf_counter() - start
        object.__setattr__(self, "_zc_last_write_stats", stats)
        return os.fspath(path)

    def _async_saver(self) -> AsyncSaver:
        saver: AsyncSaver | None = self.__dict__.get("_zc_async")
        if saver is None:
            saver = AsyncSaver()
            object.__setattr__(self, "_zc_async", saver)
        return saver

    def _write_async(
        self,
        path: PathLike,
        plan: SavePlan | None,
        options: CheckpointOptions,
        storage_options: dict[str, Any] | None,
        metadata: dict[str, MetadataValue],
        coordinator: Coordinator | None,
        on_commit: Callable[[], None] | None,
    ) -> str:
        """Stage every value, write what does not fit, and commit on a background thread."""
        saver = self._async_saver()
        start = time.perf_counter()
        where = os.fspath(path)
        if coordinator is not None:
            stats, finish = self._start_distributed(
                path, coordinator, options, storage_options, metadata, plan, saver.stage
            )
        else:
            assert plan is not None
            stats, finish = self._start_local_async(
                path, plan, saver, options, storage_options, metadata
            )
        stats.blocked_seconds = time.perf_counter() - start
        stats.staging_pool_bytes = saver.pool.nbytes
        object.__setattr__(self, "_zc_last_write_stats", stats)

        def work() -> None:
            finish()
            if on_commit is not None:
                on_commit()

        saver.submit(where, work)
        return where

    def _start_local_async(
        self,
        path: PathLike,
        plan: SavePlan,
        saver: AsyncSaver,
        options: CheckpointOptions,
        storage_options: dict[str, Any] | None,
        metadata: dict[str, MetadataValue],
    ) -> tuple[array_io.IOStats, Callable[[], None]]:
        record = plan.graph.encode()
        commit = begin_commit(path, storage_options, fsync=options.fsync, threads=options.threads)
        storage = commit.create()
        stats = array_io.IOStats(progress=options.progress)

        def fail(exc: BaseException) -> BaseException:
            commit.abort()
            return commit.explain_failure(exc) or exc

        try:
            staged, left, stats.staged_bytes = saver.stage(plan.arrays, options.staging_bytes)
            # What did not fit is written now, from the live values.
            files = array_io.write_arrays(storage, left, options, stats, groups_of=())
        except BaseException as exc:
            clearer = fail(exc)
            if clearer is not exc:
                raise clearer from exc
            raise
        keys = [key for key, _ in plan.arrays]

        def finish() -> None:
            try:
                files.extend(array_io.write_arrays(storage, staged, options, stats, keys))
                commit.finalize(record, files, metadata)
            except BaseException as exc:
                clearer = fail(exc)
                if clearer is not exc:
                    raise clearer from exc
                raise

        return stats, finish

    def wait_until_finished(self) -> None:
        """Block until the background save in flight (if any) is committed.

        Raises :class:`~zarrckpt.errors.AsyncSaveError` if it failed (its
        cause is the original error); the error is raised once. Without an
        async save in flight it returns at once. Orbax's name.
        """
        saver: AsyncSaver | None = self.__dict__.get("_zc_async")
        if saver is not None:
            saver.wait()

    @property
    def staging_pool_bytes(self) -> int:
        """Host memory held by this checkpoint's async staging pool (0 before an async save)."""
        saver: AsyncSaver | None = self.__dict__.get("_zc_async")
        return saver.pool.nbytes if saver is not None else 0

    def release_staging_pool(self) -> None:
        """Wait for a save in flight, then give the staging pool's memory back."""
        saver: AsyncSaver | None = self.__dict__.get("_zc_async")
        if saver is not None:
            saver.wait()
            saver.pool.release()

    def _start_distributed(
        self,
        path: PathLike,
        coordinator: Coordinator,
        options: CheckpointOptions,
        storage_options: dict[str, Any] | None,
        metadata: dict[str, MetadataValue],
        plan: SavePlan | None,
        stage: Stage | None = None,
    ) -> tuple[array_io.IOStats, Callable[[], None]]:
        """Plan, open and exchange with the other ranks; the rest of the save to run next."""
        from zarrckpt.distributed._save import start_distributed

        return start_distributed(
            self,
            path,
            coordinator,
            options=options,
            storage_options=storage_options,
            metadata=metadata,
            save_plan=plan,
            stage=stage,
        )

    @property
    def last_write_stats(self) -> array_io.IOStats | None:
        """Bytes, files, peak in-flight bytes and seconds of the last write or save."""
        stats: array_io.IOStats | None = self.__dict__.get("_zc_last_write_stats")
        return stats

    def save(
        self,
        file_prefix: PathLike,
        *,
        options: CheckpointOptions | None = None,
        storage_options: dict[str, Any] | None = None,
        metadata: Mapping[str, MetadataValue] | None = None,
        coordinator: Coordinator | None = None,
    ) -> str:
        """Increment ``save_counter`` and write ``<file_prefix>-<counter>``; return that path.

        With a ``coordinator``, every rank calls it and gets the same path (see :meth:`write`).
        With ``options=CheckpointOptions(enable_async=True)`` the path is committed
        in the background (:meth:`wait_until_finished`).
        """
        counter = self._create_save_counter()
        counter.assign_add(1)
        number = int(counter.numpy())
        path = f"{os.fspath(file_prefix)}-{number}"
        try:
            return self.write(
                path,
                options=options,
                storage_options=storage_options,
                metadata=metadata,
                coordinator=coordinator,
            )
        except CheckpointExistsError as exc:
            counter.assign_sub(1)
            raise CheckpointExistsError(
                f"{exc} (save() numbers checkpoints from save_counter, which is {number - 1} "
                f"here). To continue an earlier run, restore its latest checkpoint first "
                f"(ckpt.restore(zarrckpt.latest_checkpoint(...)) brings the counter back), "
                f"or let a CheckpointManager number the checkpoints in a directory; "
                f"to start afresh, save under another prefix or write() to a new path."
            ) from None
        except BaseException:
            counter.assign_sub(1)
            raise

    def read(
        self,
        path: PathLike,
        *,
        options: CheckpointOptions | None = None,
        storage_options: dict[str, Any] | None = None,
        coordinator: Coordinator | None = None,
    ) -> CheckpointLoadStatus:
        """Restore values from the checkpoint at ``path`` into the live objects.

        Values go into the objects' existing memory. Objects in the checkpoint
        that do not exist yet get their values when they are attached. A shape
        or dtype mismatch raises before anything is changed.

        A sharded Variable gets its block, read from the chunks that overlap it
        only, whatever layout and number of ranks wrote the checkpoint; a
        restore needs no coordinator. With one, the ranks learn each other's
        outcome: if the restore failed on any rank, every rank raises
        :class:`~zarrckpt.errors.DistributedRestoreError` naming it.
        """
        if coordinator is None:
            return self._read(path, options, storage_options)
        saver: AsyncSaver | None = self.__dict__.get("_zc_async")
        if saver is not None:  # its collectives first; its error stays for the next save
            saver.wait(raise_error=False)
        error: str | None = None
        status: CheckpointLoadStatus | None = None
        local: BaseException | None = None
        try:
            status = self._read(path, options, storage_options)
        except BaseException as exc:
            local = exc
            error = f"{type(exc).__name__}: {exc}"
        try:
            outcomes = coordinator.all_gather_object(error)
        except DistributedError as exc:
            raise DistributedRestoreError(f"{os.fspath(path)}: restore: {exc}") from (local or exc)
        failures = {rank: text for rank, text in enumerate(outcomes) if text is not None}
        if failures:
            if local is not None and not isinstance(local, Exception):
                raise local
            shown = "; ".join(f"rank {r}: {t}" for r, t in sorted(failures.items())[:8])
            raise DistributedRestoreError(
                f"{os.fspath(path)}: restore failed on ranks {sorted(failures)[:8]} ({shown})",
                failures,
            ) from local
        assert status is not None
        return status

    def _read(
        self,
        path: PathLike,
        options: CheckpointOptions | None,
        storage_options: dict[str, Any] | None,
    ) -> CheckpointLoadStatus:
        checkpoint = open_committed(path, storage_options)
        root_children = {c.name for c in checkpoint.graph.nodes[0].children}
        if SAVE_COUNTER in root_children:
            self._create_save_counter()
        session = RestoreSession(checkpoint, options or CheckpointOptions())
        try:
            session.restore_root(self)
        except BaseException:
            session.progress.expect_partial = True  # the error says enough; no warning too
            raise
        return CheckpointLoadStatus(session, self)

    def restore(
        self,
        path: PathLike | None,
        *,
        options: CheckpointOptions | None = None,
        storage_options: dict[str, Any] | None = None,
        coordinator: Coordinator | None = None,
    ) -> CheckpointLoadStatus | InitializationOnlyStatus:
        """Like :meth:`read`; ``None`` restores nothing and returns a status that says so."""
        if path is None:
            return InitializationOnlyStatus(self)
        return self.read(
            path, options=options, storage_options=storage_options, coordinator=coordinator
        )

    def __repr__(self) -> str:
        names = [name for name, _ in self._checkpoint_dependencies()]
        return f"<zarrckpt.Checkpoint dependencies={names}>"


@dataclass
class _RestoreProgress:
    """What a restore has done so far; outlives the session for the final warning."""

    checkpoint_url: str
    all_keys: list[str]
    restored_keys: set[str] = field(default_factory=set)
    expect_partial: bool = False
    called_from: tuple[str, int] = field(default_factory=caller_location)

    def unrestored(self) -> list[str]:
        return [key for key in self.all_keys if key not in self.restored_keys]


def _warn_unrestored(progress: _RestoreProgress) -> None:
    if progress.expect_partial:
        return
    missing = progress.unrestored()
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        # Raised when the status is collected, so point at the restore() call instead.
        filename, lineno = progress.called_from
        warnings.warn_explicit(
            f"restore of {progress.checkpoint_url} left {len(missing)} saved values unused: "
            f"{shown}. Call expect_partial() on the status to silence this.",
            UnmatchedValuesWarning,
            filename,
            lineno,
        )


_Transfer = tuple[
    SavedAttribute,
    SaveableValue,
    array_io.ArrayLayout,
    np.ndarray[Any, Any],
    tuple[slice, ...] | None,  # a sharded value's block of the saved value
]


class RestoreSession:
    """Matches one checkpoint's nodes to live objects, now and as objects appear."""

    def __init__(self, checkpoint: CommittedCheckpoint, options: CheckpointOptions) -> None:
        self.checkpoint = checkpoint
        self.options = options
        self.io_stats = array_io.IOStats(progress=options.progress)
        self.graph = checkpoint.graph
        self._matched: dict[int, weakref.ref[Trackable]] = {}  # node id -> first live object
        # id(obj) -> (node id, obj): every live object matched, several per node possible
        self._matched_objects: dict[int, tuple[int, weakref.ref[Trackable]]] = {}
        self._slots_of_variable: dict[int, list[tuple[int, SlotVariableReference]]] = {}
        self._paths: dict[int, str] | None = None  # for messages, computed once
        for node_id, node in enumerate(self.graph.nodes):
            for ref in node.slot_variables:
                self._slots_of_variable.setdefault(ref.original_variable_node_id, []).append(
                    (node_id, ref)
                )
        self.progress = _RestoreProgress(
            checkpoint.url, [attribute.key for _, attribute in self.graph.attributes()]
        )
        weakref.finalize(self, _warn_unrestored, self.progress)

    # Matching -------------------------------------------------------------

    def restore_root(self, root: Trackable) -> None:
        # Every saved value's zarr.json, fetched in parallel: one round trip each,
        # overlapped, rather than one after another while matching.
        self.checkpoint.prefetch_metadata(
            [attribute for _, attribute in self.graph.attributes()], self.options.threads
        )
        self._restore(0, root)

    def restore_deferred(self, node_id: int, obj: Trackable) -> None:
        """Restore checkpoint node ``node_id`` and its subtree into ``obj``, attached late."""
        self._restore(node_id, obj)

    def _restore(self, node_id: int, obj: Trackable) -> None:
        transfers: list[_Transfer] = []
        deferrals: list[Callable[[], None]] = []
        begun: list[Trackable] = []  # objects whose _restore_begin ran, to end
        matched_before = dict(self._matched), dict(self._matched_objects)
        try:
            self._match(node_id, obj, transfers, deferrals, begun)
            self._transfer(transfers)
            for matched in begun:
                matched._restore_end(True)
        except BaseException:
            self._matched, self._matched_objects = matched_before
            for matched in begun:
                with contextlib.suppress(Exception):  # the first error is the one to see
                    matched._restore_end(False)
            raise
        for defer in deferrals:
            defer()

    def matched_object(self, node_id: int) -> Trackable | None:
        ref = self._matched.get(node_id)
        return ref() if ref is not None else None

    def is_matched(self, obj: Trackable) -> bool:
        entry = self._matched_objects.get(id(obj))
        return entry is not None and entry[1]() is obj

    def _match(
        self,
        node_id: int,
        obj: Trackable,
        transfers: list[_Transfer],
        deferrals: list[Callable[[], None]],
        begun: list[Trackable],
        inside_duplicate: bool = False,
    ) -> None:
        first = self.matched_object(node_id)
        if first is obj:
            return
        if first is None:
            self._matched[node_id] = weakref.ref(obj)
        elif not inside_duplicate:
            # One saved object reached through two paths that now lead to two live
            # objects: both get its values (TensorFlow restores the first only).
            filename, lineno = caller_location()
            warnings.warn_explicit(
                f"{self.checkpoint.url}: saved object {self.describe_node(node_id)!r} matches "
                f"two live objects ({first!r} and {obj!r}); both get its values",
                UserWarning,
                filename,
                lineno,
            )
        duplicate = inside_duplicate or first is not None
        self._matched_objects[id(obj)] = (node_id, weakref.ref(obj))
        obj._restore_begin()
        begun.append(obj)
        node = self.graph.nodes[node_id]
        values = obj._saveable_values()
        for attribute in node.attributes:
            saveable = values.get(attribute.name)
            if saveable is not None:
                # The stored layout is checked against record and manifest before
                # the record's shape may size a buffer (a placeholder's, say).
                with self.checkpoint.reading():
                    layout = self.checkpoint.layout(attribute)
                dtype = dtype_from_name(attribute.dtype)
                destination = saveable.destination(attribute.shape, dtype, attribute.key)
                shard = saveable.shard()
                region = None if shard is None else shard.region(destination.shape)
                transfers.append((attribute, saveable, layout, destination, region))
        for child in node.children:
            live = obj._dependency_for_restore(child.name)
            if live is None:
                deferrals.append(partial(obj._defer_restoration, child.name, self, child.node_id))
            else:
                self._match(child.node_id, live, transfers, deferrals, begun, duplicate)
        for ref in node.slot_variables:
            variable = self.matched_object(ref.original_variable_node_id)
            if variable is not None:
                self._match_slot(obj, variable, ref, transfers, deferrals, begun)
        for optimizer_id, ref in self._slots_of_variable.get(node_id, []):
            optimizer = self.matched_object(optimizer_id)
            if optimizer is not None and optimizer is not obj:
                self._match_slot(optimizer, obj, ref, transfers, deferrals, begun)

    def _match_slot(
        self,
        optimizer: Trackable,
        variable: Trackable,
        ref: SlotVariableReference,
        transfers: list[_Transfer],
        deferrals: list[Callable[[], None]],
        begun: list[Trackable],
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            return
        try:
            slot = optimizer.get_slot(variable, ref.slot_name)
        except KeyError:
            deferrals.append(
                partial(
                    optimizer._defer_slot_restoration,
                    variable,
                    ref.slot_name,
                    self,
                    ref.slot_variable_node_id,
                )
            )
            return
        self._match(ref.slot_variable_node_id, slot, transfers, deferrals, begun)

    def _transfer(self, transfers: list[_Transfer]) -> None:
        checkpoint = self.checkpoint
        targets = [
            (attribute.key, layout, destination, region)
            for attribute, _, layout, destination, region in transfers
        ]
        with checkpoint.reading():
            array_io.read_arrays(
                checkpoint.storage, targets, checkpoint.files, self.options, self.io_stats
            )
        for attribute, saveable, _, destination, _ in transfers:
            saveable.commit(destination)
            self.progress.restored_keys.add(attribute.key)

    # Reporting ------------------------------------------------------------

    def describe_node(self, node_id: int) -> str:
        if self._paths is None:
            self._paths = self.graph.paths(limit=400)
        path = self._paths.get(node_id)
        if path is None:
            return f"slot variable (node {node_id})"
        return path or "<root>"


class CheckpointLoadStatus:
    """What a restore matched; methods assert on it and return the status to chain.

    Example:
        >>> ckpt.restore(path).expect_partial().assert_nontrivial_match()
    """

    def __init__(self, session: RestoreSession, root: Trackable) -> None:
        self._session = session
        self._root = root

    def assert_consumed(self) -> Self:
        """Every object and value in the checkpoint was matched, and vice versa.

        Raises :class:`~zarrckpt.errors.MatchError` naming what is unmatched.
        """
        session = self._session
        unmatched = [
            session.describe_node(n)
            for n in range(len(session.graph.nodes))
            if session.matched_object(n) is None
        ]
        if unmatched:
            raise MatchError(
                f"objects in checkpoint {session.progress.checkpoint_url} not matched to live "
                f"objects: {unmatched}"
            )
        unrestored = session.progress.unrestored()
        if unrestored:
            raise MatchError(f"saved values never restored: {unrestored}")
        return self.assert_existing_objects_matched()

    def assert_existing_objects_matched(self) -> Self:
        """Every live object with values (reachable from the root) got them from the checkpoint."""
        session = self._session
        # A save counter the checkpoint lacks (written by write(), say) is not the
        # user's state: it keeps its value, as TensorFlow's does.
        counter = self._root._lookup_dependency(SAVE_COUNTER)
        unmatched = [
            obj
            for obj in list_objects(self._root)
            if obj._saveable_values() and not session.is_matched(obj) and obj is not counter
        ]
        if unmatched:
            raise MatchError(
                f"{len(unmatched)} live objects found no value in checkpoint "
                f"{session.progress.checkpoint_url}: {[repr(o)[:80] for o in unmatched[:10]]}"
            )
        restored = session.progress.restored_keys
        partial = sorted(
            attribute.key
            for node_id, attribute in session.graph.attributes()
            if session.matched_object(node_id) is not None and attribute.key not in restored
        )
        if partial:
            raise MatchError(f"matched objects do not take these saved values: {partial}")
        return self

    def assert_nontrivial_match(self) -> Self:
        """At least one object besides the root and its save counter was matched."""
        session = self._session
        counter = self._root._lookup_dependency(SAVE_COUNTER)
        for node_id in range(1, len(session.graph.nodes)):
            obj = session.matched_object(node_id)
            if obj is not None and obj is not counter:
                return self
        raise MatchError(
            f"nothing in checkpoint {session.progress.checkpoint_url} matched an object "
            "other than the root"
        )

    @property
    def io_stats(self) -> array_io.IOStats:
        """Bytes, files, peak in-flight bytes and seconds read so far (deferred reads too)."""
        return self._session.io_stats

    def expect_partial(self) -> Self:
        """Silence the warning about saved values left unused."""
        self._session.progress.expect_partial = True
        return self

    def initialize_or_restore(self) -> Self:
        """Nothing left to run: values were restored eagerly (kept for TensorFlow parity)."""
        return self

    def __repr__(self) -> str:
        progress = self._session.progress
        return (
            f"<CheckpointLoadStatus {progress.checkpoint_url}: "
            f"{len(progress.restored_keys)}/{len(progress.all_keys)} values restored>"
        )


class InitializationOnlyStatus:
    """The status of ``restore(None)``: nothing was restored; variables keep their values."""

    def __init__(self, root: Trackable) -> None:
        self._root = root

    def _fail(self) -> MatchError:
        return MatchError("no checkpoint was given to restore (path is None)")

    def assert_consumed(self) -> Self:
        """Raises :class:`~zarrckpt.errors.MatchError`: nothing was restored."""
        raise self._fail()

    def assert_existing_objects_matched(self) -> Self:
        """Raises :class:`~zarrckpt.errors.MatchError`: nothing was restored."""
        raise self._fail()

    def assert_nontrivial_match(self) -> Self:
        """Raises :class:`~zarrckpt.errors.MatchError`: nothing was restored."""
        raise self._fail()

    def expect_partial(self) -> Self:
        """Nothing to silence: no saved values were read."""
        return self

    def initialize_or_restore(self) -> Self:
        """Variables are initialized when created, so there is nothing to do."""
        return self

    def __repr__(self) -> str:
        return "<InitializationOnlyStatus: nothing restored (the path was None)>"
