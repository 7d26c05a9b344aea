"""The distributed save protocol: plan, open, exchange, write, commit.

Every rank runs :func:`start_distributed` with the same arguments, then the
function it returns:

1. each rank plans its save; the plans are gathered and checked on every rank
   alike (:mod:`zarrckpt.distributed._plan`): a disagreement raises the same
   :class:`~zarrckpt.errors.DistributedSaveError` everywhere, before any byte;
2. rank 0 opens the attempt (the temporary directory, or the object-store
   attempt prefix) and broadcasts where it is;
3. where chunks cross block edges, the pieces go to the chunks' owners;
4. every rank writes its own chunks and its share of the metadata and makes them
   durable, then reports its files (size and CRC32C) or its error;
5. rank 0 checks that every chunk was written exactly once and commits with
   every rank's files in the manifest, or aborts; the outcome is broadcast.

Any failure, on any rank and at any step, leaves no checkpoint: every rank
that is alive raises, and rank 0 removes the attempt. A rank that dies makes
the others' next collective fail within the coordinator's timeout; what it
left behind is an uncommitted attempt that :func:`zarrckpt.gc` removes.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from zarrckpt._commit import Commit, MetadataValue, begin_commit
from zarrckpt._dtypes import dtype_name
from zarrckpt._graph import SavePlan, build_save_plan
from zarrckpt._storage import FsspecStorage, LocalStorage, Storage, is_local
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.array_io import (
    ChunkFile,
    IOStats,
    Task,
    group_metadata,
    run_tasks,
    write_chunk,
    write_file,
)
from zarrckpt.distributed._coordinator import Coordinator, exchange_objects
from zarrckpt.distributed._plan import (
    Box,
    GlobalPlan,
    LocalValue,
    PlanError,
    RankPlan,
    ValuePlan,
    intersect,
    make_global_plan,
)
from zarrckpt.errors import (
    CheckpointExistsError,
    DistributedError,
    DistributedSaveError,
    ZarrckptError,
)
from zarrckpt.options import CheckpointOptions
from zarrckpt.trackable import Trackable

__all__ = ["Stage", "start_distributed"]

Piece = tuple[str, tuple[int, ...], Box, np.ndarray[Any, Any]]  # key, chunk, box, values


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _failures(reports: list[tuple[str | None, Any]]) -> dict[int, str]:
    return {rank: error for rank, (error, _) in enumerate(reports) if error is not None}


def _failed_message(path: str, what: str, failures: dict[int, str]) -> str:
    ranks = sorted(failures)
    shown = "; ".join(f"rank {r}: {failures[r]}" for r in ranks[:8])
    names = ", ".join(map(str, ranks[:8])) + (
        f" and {len(ranks) - 8} more" if len(ranks) > 8 else ""
    )
    return (
        f"{path}: distributed save failed {what} on rank{'s' if len(ranks) > 1 else ''} "
        f"{names} ({shown}); nothing was committed"
    )


class _Save:
    """One rank's side of one distributed save."""

    def __init__(
        self,
        root: Trackable,
        path: str,
        coordinator: Coordinator,
        options: CheckpointOptions,
        storage_options: dict[str, Any] | None,
        metadata: dict[str, MetadataValue],
    ) -> None:
        self.root = root
        self.path = path
        self.coordinator = coordinator
        self.rank = coordinator.rank
        self.options = options
        self.storage_options = storage_options
        self.metadata = metadata
        self.stats = IOStats(progress=options.progress)
        self.commit: Commit | None = None  # rank 0's, once opened
        self.record = b""
        self.arrays: dict[str, np.ndarray[Any, Any]] = {}
        self.local_error: BaseException | None = None
        # An async save writes the values that did not fit its staging pool
        # before returning: those keys, their files, or the error it met.
        self.early_keys: set[str] = set()
        self.early_files: list[ChunkFile] = []
        self.early_error: str | None = None

    # Collectives: a failure of the coordinator itself ends the save on this rank.

    def _gather(self, obj: Any, step: str) -> list[Any]:
        try:
            return self.coordinator.all_gather_object(obj)
        except DistributedError as exc:
            raise self._fail(f"{step}: {exc}", {}) from exc

    def _broadcast(self, obj: Any, step: str) -> Any:
        try:
            return self.coordinator.broadcast_object(obj, 0)
        except DistributedError as exc:
            raise self._fail(f"{step}: {exc}", {}) from exc

    def _fail(self, message: str, failures: dict[int, str]) -> DistributedSaveError:
        """Abort rank 0's attempt; the error every rank raises."""
        if self.commit is not None:
            self.commit.abort()
            self.commit = None
        if not message.startswith(self.path):
            message = f"{self.path}: distributed save failed, nothing was committed: {message}"
        return DistributedSaveError(message, failures)

    def _raise(self, error: DistributedSaveError) -> None:
        # An interrupt on this rank stays an interrupt here, once the others know.
        if self.local_error is not None and not isinstance(self.local_error, Exception):
            raise self.local_error
        raise error from self.local_error

    # Steps ----------------------------------------------------------------------

    def plan(self, save_plan: SavePlan | None) -> GlobalPlan:
        try:
            if save_plan is None:
                save_plan = build_save_plan(self.root)
            self.record = save_plan.graph.encode()
            values = []
            for key, array in save_plan.arrays:
                shard = save_plan.shards.get(key)
                values.append(
                    LocalValue(
                        key,
                        dtype_name(array.dtype),
                        tuple(array.shape) if shard is None else shard.global_shape,
                        None if shard is None else shard.offset,
                        tuple(array.shape),
                        array.dtype.itemsize,
                    )
                )
                self.arrays[key] = array
            mine = RankPlan(
                self.rank, self.path, hashlib.sha256(self.record).hexdigest(), tuple(values)
            )
        except BaseException as exc:
            self.local_error = exc
            mine = RankPlan(self.rank, self.path, "", (), error=_text(exc))
        plans = self._gather(mine, "gathering the ranks' plans")
        try:
            return make_global_plan(plans, self.options.chunk_bytes, self.options.compression_for)
        except PlanError as exc:
            failures = {p.rank: p.error for p in plans if p.error is not None}
            self._raise(DistributedSaveError(f"{self.path}: {exc}; nothing was written", failures))
            raise  # pragma: no cover - _raise always raises

    def open(self) -> Storage:
        """Rank 0 creates the attempt; every rank opens it."""
        opened: tuple[str, str, bool]  # (error or "", where, exists)
        if self.rank == 0:
            commit: Commit | None = None
            try:
                commit = begin_commit(
                    self.path,
                    self.storage_options,
                    fsync=self.options.fsync,
                    threads=self.options.threads,
                )
                storage = commit.create()
                self.commit = commit
                where = storage.root if isinstance(storage, LocalStorage) else commit.attempt
                opened = ("", where, False)
            except BaseException as exc:
                self.local_error = exc
                clearer = commit.explain_failure(exc) if commit is not None else None
                shown = clearer if clearer is not None else exc
                opened = (str(shown), "", isinstance(exc, CheckpointExistsError))
        else:
            opened = ("", "", False)
        error, where, exists = self._broadcast(opened, "opening the checkpoint")
        if error:
            if exists:
                raise CheckpointExistsError(error) from self.local_error
            self._raise(self._fail(f"rank 0 could not open it: {error}", {0: error}))
        if self.commit is not None:
            return self.commit.storage
        fs, root = resolve_path(self.path, self.storage_options)
        if is_local(fs):
            return LocalStorage(where, fsync=self.options.fsync, threads=self.options.threads)
        return FsspecStorage(fs, f"{root.rstrip('/')}/{where}")

    def _explained(self, exc: BaseException) -> BaseException:
        """A clearer error for a failed write when the storage can name its cause (a bucket)."""
        try:
            commit = self.commit or begin_commit(self.path, self.storage_options)
            return commit.explain_failure(exc) or exc
        except Exception:
            return exc

    def exchange(self, plan: GlobalPlan) -> dict[tuple[str, tuple[int, ...]], list[Piece]]:
        """Send the pieces of chunks other ranks own; receive those of the chunks this rank owns."""
        if not plan.exchange:
            return {}
        outgoing: dict[int, list[Piece]] = defaultdict(list)
        error = None
        try:
            for value in plan.values:
                if not value.exchange:
                    continue
                mine = value.blocks[self.rank]
                array = self.arrays[value.key]
                for coords in value.touching(mine):
                    if value.inside(coords, self.rank):
                        continue
                    owner = value.owner(coords)
                    if owner == self.rank:
                        continue  # this rank writes it, with the others' pieces
                    box = value.chunk_box(coords)
                    part = intersect(box, mine)
                    if part is None:
                        continue
                    local = tuple(
                        slice(a - o, b - o) for (a, b), (o, _) in zip(part, mine, strict=True)
                    )
                    piece = np.ascontiguousarray(array[local])
                    outgoing[owner].append((value.key, coords, part, piece))
        except BaseException as exc:
            self.local_error = exc
            error = _text(exc)
            outgoing.clear()
        counts = {dst: len(pieces) for dst, pieces in outgoing.items()}
        reports = self._gather((error, counts), "planning the exchange of chunk pieces")
        failures = _failures(reports)
        if failures:
            self._raise(
                self._fail(_failed_message(self.path, "exchanging pieces", failures), failures)
            )
        sources = [src for src, (_, sent) in enumerate(reports) if sent.get(self.rank)]
        try:
            received = exchange_objects(self.coordinator, dict(outgoing), sources)
        except DistributedError as exc:
            raise self._fail(f"sending chunk pieces to their owners: {exc}", {}) from exc
        incoming: dict[tuple[str, tuple[int, ...]], list[Piece]] = defaultdict(list)
        for src in sources:
            for piece in received[src]:
                incoming[(piece[0], piece[1])].append(piece)
        return incoming

    def tasks(
        self,
        plan: GlobalPlan,
        storage: Storage,
        incoming: dict[tuple[str, tuple[int, ...]], list[Piece]],
        *,
        only: set[str] | None = None,
    ) -> list[Task]:
        """This rank's write tasks; ``only``: the chunks of those keys alone, no metadata.

        Without ``only``, the chunks of :attr:`early_keys` are left out (written already).
        """
        tasks: list[Task] = []
        stats = self.stats
        groups: set[str] = set()
        for index, value in enumerate(plan.values):
            layout = value.layout
            if only is None:  # the metadata goes with the last part
                if self._writes_metadata(index, plan.world_size):
                    data = layout.metadata()
                    path = f"{value.key}/zarr.json"
                    tasks.append((len(data), partial(write_file, storage, path, data, stats)))
                parts = value.key.split("/")
                groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
                if value.key in self.early_keys:
                    continue
            elif value.key not in only:
                continue
            cost = layout.chunk_nbytes * (1 if layout.compression is None else 2)
            array = self.arrays[value.key]
            if value.writer is not None:
                for coords in value.owned_by(self.rank):
                    tasks.append(
                        (
                            cost,
                            partial(write_chunk, storage, value.key, layout, array, coords, stats),
                        )
                    )
                continue
            mine = value.blocks[self.rank]
            origin = tuple(a for a, _ in mine)
            for coords in value.owned_by(self.rank):
                box = value.chunk_box(coords)
                if intersect(box, mine) == box:
                    work = partial(
                        write_chunk, storage, value.key, layout, array, coords, stats, origin
                    )
                else:
                    pieces = incoming.get((value.key, coords), [])
                    work = partial(self._write_assembled, storage, value, coords, pieces)
                tasks.append((cost, work))
        data = group_metadata()
        for index, group in enumerate(sorted(groups), start=len(plan.values)):
            if self._writes_metadata(index, plan.world_size):
                tasks.append(
                    (len(data), partial(write_file, storage, f"{group}/zarr.json", data, stats))
                )
        return tasks

    def _writes_metadata(self, index: int, world_size: int) -> bool:
        """Whether this rank writes metadata file ``index`` (values', then groups').

        Round robin from rank 1: with blocks by rows, the first chunk of every
        value is rank 0's, and a rank writing hundreds of small files (148
        parameters make 444 here) is the one every other rank waits for.
        """
        return (index + 1) % world_size == self.rank

    def _write_assembled(
        self, storage: Storage, value: ValuePlan, coords: tuple[int, ...], pieces: list[Piece]
    ) -> ChunkFile:
        """Write a chunk that spans blocks: this rank's part plus the pieces sent to it."""
        box = value.chunk_box(coords)
        chunk = np.empty(tuple(b - a for a, b in box), value.layout.dtype)
        covered = 0
        mine = value.blocks[self.rank]
        parts = [(intersect(box, mine), None)] + [(p[2], p[3]) for p in pieces]
        for part, data in parts:
            if part is None:
                continue
            target = tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(part, box, strict=True))
            if data is None:
                source = tuple(
                    slice(a - o, b - o) for (a, b), (o, _) in zip(part, mine, strict=True)
                )
                data = self.arrays[value.key][source]
            chunk[target] = data
            covered += int(np.prod([b - a for a, b in part]))
        if covered != chunk.size:
            raise DistributedSaveError(
                f"{value.key!r}: chunk {coords} received {covered} of its {chunk.size} elements"
            )
        origin = tuple(a for a, _ in box)
        return write_chunk(storage, value.key, value.layout, chunk, coords, self.stats, origin)

    def _check_shared(self, storage: Storage) -> None:
        if isinstance(storage, LocalStorage) and not os.path.isdir(storage.root):
            raise FileNotFoundError(
                f"rank 0's temporary directory {storage.root} does not exist here: the "
                "checkpoint path must be on a filesystem every rank shares"
            )

    def stage(
        self,
        plan: GlobalPlan,
        storage: Storage,
        incoming: Any,
        stage: Stage,
        limit: int | None,
    ) -> int:
        """Copy the values this rank writes into the staging pool; write those that do not fit.

        Returns the bytes staged. An error writing is kept for the report of
        :meth:`write`, so every rank learns of it at the same collective.
        """
        writes = [
            (value.key, self.arrays[value.key])
            for value in plan.values
            if value.owned_by(self.rank)  # the pieces sent to other ranks are copies already
        ]
        staged, left, nbytes = stage(writes, limit)
        self.arrays.update(staged)
        if left:
            self.early_keys = {key for key, _ in left}
            try:
                self._check_shared(storage)
                tasks = self.tasks(plan, storage, incoming, only=self.early_keys)
                self.early_files = run_tasks(tasks, self.options, self.stats)
            except Exception as exc:
                self.local_error = exc
                self.early_error = _text(self._explained(exc))
        return nbytes

    def write(self, plan: GlobalPlan, storage: Storage, incoming: Any) -> None:
        """Write and sync this rank's files; report them; rank 0 commits. Raises on any failure."""
        error: str | None = self.early_error
        files: list[tuple[str, int, int]] = []
        try:
            if error is None:
                self._check_shared(storage)
                written = run_tasks(self.tasks(plan, storage, incoming), self.options, self.stats)
                storage.sync()
                files = [(f.key, f.size, f.crc32c) for f in self.early_files + written]
        except BaseException as exc:
            self.local_error = exc
            error = _text(self._explained(exc))
        reports = self._gather((error, files), "reporting the files written")
        failures = _failures(reports)
        if failures:
            self._raise(self._fail(_failed_message(self.path, "writing", failures), failures))
        outcome = ""
        if self.rank == 0:
            assert self.commit is not None
            try:
                every = _check_complete(plan, reports)
                self.commit.finalize(self.record, every, self.metadata)
            except BaseException as exc:
                self.local_error = exc
                outcome = _text(exc)
                self.commit.abort()
            self.commit = None  # committed, or aborted: nothing left to undo
        outcome = self._broadcast(outcome, "committing")
        if outcome:
            self._raise(self._fail(f"rank 0 could not commit: {outcome}", {0: outcome}))


def _check_complete(plan: GlobalPlan, reports: list[tuple[str | None, Any]]) -> list[ChunkFile]:
    """Every chunk of every value written exactly once, and nothing else; the manifest entries."""
    writers: dict[str, int] = {}
    files: list[ChunkFile] = []
    for rank, (_, written) in enumerate(reports):
        for key, size, crc in written:
            if key in writers:
                raise ZarrckptError(
                    f"{key} was written by ranks {writers[key]} and {rank}; refusing to commit"
                )
            writers[key] = rank
            files.append(ChunkFile(key, size, crc))
    missing = [
        value.layout.chunk_key(value.key, tuple(coords))
        for value in plan.values
        for coords in np.ndindex(*value.layout.grid)
        if value.layout.chunk_key(value.key, tuple(coords)) not in writers
    ]
    if missing:
        raise ZarrckptError(f"{len(missing)} chunks were written by no rank, e.g. {missing[:3]}")
    return files


Stage = Callable[
    [list[tuple[str, np.ndarray[Any, Any]]], int | None],
    tuple[list[tuple[str, np.ndarray[Any, Any]]], list[tuple[str, np.ndarray[Any, Any]]], int],
]


def start_distributed(
    root: Trackable,
    path: str | os.PathLike[str],
    coordinator: Coordinator,
    *,
    options: CheckpointOptions,
    storage_options: dict[str, Any] | None,
    metadata: dict[str, MetadataValue],
    save_plan: SavePlan | None = None,
    stage: Stage | None = None,
) -> tuple[IOStats, Callable[[], None]]:
    """Plan, open and exchange chunk pieces; return this rank's stats and the rest of the save.

    With ``stage`` (an async save), this rank's values are copied into the
    staging pool before returning. The returned function writes (from the
    copies), reports and commits; every rank runs it, an async save on its
    background thread, with the same collectives as a blocking save.
    ``save_plan``: this rank's plan, when the caller made it already.
    """
    save = _Save(root, os.fspath(path), coordinator, options, storage_options, metadata)
    plan = save.plan(save_plan)
    storage = save.open()

    def aborting(step: Callable[[], None]) -> None:
        try:
            step()
        except BaseException:
            if save.commit is not None:  # an interrupt between collectives, on rank 0
                save.commit.abort()
            raise

    incoming: dict[tuple[str, tuple[int, ...]], list[Piece]] = {}

    def prepare() -> None:
        incoming.update(save.exchange(plan))
        if stage is not None:
            save.stats.staged_bytes = save.stage(
                plan, storage, incoming, stage, options.staging_bytes
            )

    aborting(prepare)
    return save.stats, partial(aborting, partial(save.write, plan, storage, incoming))
