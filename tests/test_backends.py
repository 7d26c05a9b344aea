"""Checkpoints and the checkpoint manager on every backend: local disk, memory, S3 (moto).

Local paths commit by rename; every other fsspec URL commits with an attempt
prefix and one conditional PUT of ``_COMMIT``. The same behaviour is expected
from both: round trips are bit-exact, nothing uncommitted is ever restorable,
an existing checkpoint is never written over, and of two racing writers of one
checkpoint exactly one wins.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time

import crc32c
import fsspec
import msgpack
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

import zarrckpt as zc
from tests.conftest import Adam, Model, model_variables
from zarrckpt import array_io
from zarrckpt._commit import (
    COMMIT_KEY,
    Manifest,
    ObjectStoreCommit,
    begin_commit,
    open_committed,
)
from zarrckpt._graph import build_save_plan
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    MissingChunkError,
)

EMBEDDING_KEY = "model/embedding/.ATTRIBUTES/VARIABLE_VALUE"


# Helpers ------------------------------------------------------------------------------


def _fs(url: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _trained(seed: int = 0) -> tuple[Model, Adam]:
    model, opt = Model(seed=seed), Adam()
    opt.step(model_variables(model), seed=seed + 1)
    return model, opt


def _state(model: Model, opt: Adam | None = None) -> list[tuple[str, tuple, bytes]]:
    """Every value (and slot) as (dtype, shape, raw bytes): equal means bit-exact."""
    arrays = []
    for var in model_variables(model):
        arrays.append(var.numpy())
        if opt is not None:
            arrays.extend(opt.get_slot(var, name).numpy() for name in ("m", "v"))
    return [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]


def _files(url: str, storage_options: dict | None) -> dict[str, tuple[int, bytes | None]]:
    """Every file under ``url``: relative path -> (size, bytes of markers and records).

    A commit marker holds the size and CRC32C of every file of its checkpoint,
    so equal markers plus a restore that passes every chunk's CRC mean equal data.
    """
    fs, root = _fs(url, storage_options)
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    found = {}
    for path, info in fs.find(root, detail=True).items():
        rel = path[len(root) :].lstrip("/")
        content = fs.cat_file(path) if rel.endswith((COMMIT_KEY, "object_graph.msgpack")) else None
        found[rel] = (info["size"], content)
    return found


def _norm(path: str) -> str:
    """A path as fsspec resolves it, so that URL spellings compare equal."""
    return fsspec.core.url_to_fs(path)[1].rstrip("/") if "://" in path else path


# Checkpoint round trips ----------------------------------------------------------------


def test_save_restore_round_trip_is_bit_exact(backend):
    base, so = backend
    model, opt = _trained(seed=1)
    path = zc.Checkpoint(model=model, optimizer=opt).save(f"{base}/run/ckpt", storage_options=so)
    assert path == f"{base}/run/ckpt-1"
    fresh, fresh_opt = Model(seed=77), Adam()
    buffers = [v.numpy() for v in model_variables(fresh)]
    status = zc.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path, storage_options=so)
    for var in model_variables(fresh):  # slots are restored when created (deferred)
        for name in ("m", "v"):
            fresh_opt.add_slot(var, name)
    status.assert_consumed()
    assert _state(fresh, fresh_opt) == _state(model, opt)
    # Restored in place: the live buffers are the ones the variables had.
    assert all(v.numpy() is b for v, b in zip(model_variables(fresh), buffers, strict=True))
    # The committed checkpoint holds a _COMMIT manifest naming every file it needs.
    committed = open_committed(path, so)
    assert committed.manifest.nbytes == sum(f.size for f in committed.manifest.files) > 0
    keys = {
        f.key.split("/", 1)[1] if committed.manifest.attempt else f.key
        for f in committed.manifest.files
    }
    assert f"{EMBEDDING_KEY}/c.0.0" in keys and "object_graph.msgpack" in keys


def test_deferred_restore_on_attach(backend):
    base, so = backend
    model, _ = _trained(seed=3)
    path = zc.Checkpoint(model=model).save(f"{base}/run/ckpt", storage_options=so)
    root = zc.Checkpoint()
    status = root.restore(path, storage_options=so)
    late = Model(seed=42)
    assert _state(late) != _state(model)
    root.model = late  # attached after the restore: values arrive now
    assert _state(late) == _state(model)
    status.assert_consumed()


def test_numbering_continues_after_restore(backend):
    base, so = backend
    model, _ = _trained(seed=4)
    ckpt = zc.Checkpoint(model=model)
    assert ckpt.save(f"{base}/run/ckpt", storage_options=so) == f"{base}/run/ckpt-1"
    second = ckpt.save(f"{base}/run/ckpt", storage_options=so)
    assert second == f"{base}/run/ckpt-2"
    for method in ("read", "restore"):
        fresh = zc.Checkpoint(model=Model(seed=9))
        getattr(fresh, method)(second, storage_options=so).assert_consumed()
        assert int(fresh.save_counter.numpy()) == 2
    assert fresh.save(f"{base}/run/ckpt", storage_options=so) == f"{base}/run/ckpt-3"
    assert int(fresh.save_counter.numpy()) == 3


def test_write_over_existing_checkpoint_raises_and_leaves_it_intact(backend):
    base, so = backend
    model, _ = _trained(seed=5)
    expected = _state(model)
    ckpt = zc.Checkpoint(model=model)
    path = ckpt.write(f"{base}/c", storage_options=so)
    before = _files(base, so)
    model.embedding.assign(np.zeros(model.embedding.shape, np.float32))
    with pytest.raises(CheckpointExistsError, match="already exists"):
        ckpt.write(path, storage_options=so)
    with pytest.raises(CheckpointExistsError):
        ckpt.write(f"{base}/c/", storage_options=so)  # same checkpoint, other spelling
    assert _files(base, so) == before  # not one byte changed, nothing left behind
    fresh = Model(seed=11)
    zc.Checkpoint(model=fresh).read(path, storage_options=so).assert_consumed()
    assert _state(fresh) == expected


def test_failed_save_rolls_back_counter_and_leaves_nothing(backend):
    base, so = backend
    model, _ = _trained(seed=6)
    ckpt = zc.Checkpoint(model=model)
    ckpt.save(f"{base}/run/ckpt", storage_options=so)
    before = _files(base, so)

    class Broken(zc.PythonState):
        def serialize(self) -> bytes:
            raise RuntimeError("serializer broke")

        def deserialize(self, data: bytes) -> None:
            raise AssertionError("never called")

    ckpt.broken = Broken()
    with pytest.raises(RuntimeError, match="serializer broke"):
        ckpt.save(f"{base}/run/ckpt", storage_options=so)
    assert int(ckpt.save_counter.numpy()) == 1
    assert _files(base, so) == before


# Nothing uncommitted is restorable ------------------------------------------------------


def test_checkpoint_without_commit_marker_is_not_restorable(backend):
    base, so = backend
    model, _ = _trained(seed=7)
    path = zc.Checkpoint(model=model).write(f"{base}/run/ckpt-5", storage_options=so)
    fs, root = _fs(path, so)
    manifest = open_committed(path, so).manifest
    fs.rm_file(f"{root}/{COMMIT_KEY}")
    fs.invalidate_cache()
    data_root = f"{root}/{manifest.attempt}" if manifest.attempt else root
    assert fs.isfile(f"{data_root}/zarr.json") and fs.isfile(f"{data_root}/object_graph.msgpack")
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        zc.Checkpoint(model=Model(seed=1)).restore(path, storage_options=so)
    with pytest.raises(CheckpointNotFoundError):
        open_committed(path, so)
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        zc.Checkpoint(model=Model(seed=1)).restore(f"{base}/run/ckpt-6", storage_options=so)


def test_attempt_prefix_itself_is_not_restorable(backend):
    """Users pass the checkpoint path; its data prefix alone carries no commit."""
    base, so = backend
    fs, root = _fs(f"{base}/run/ckpt-1", so)
    if isinstance(fs, LocalFileSystem):
        fs = LocalFileSystem(auto_mkdir=True)
    model, _ = _trained(seed=8)
    commit = ObjectStoreCommit(fs, root)
    storage = commit.create()
    plan = build_save_plan(zc.Checkpoint(model=model))
    files = array_io.write_arrays(storage, plan.arrays)
    commit.finalize(plan.graph.encode(), files)
    attempt_url = f"{base}/run/ckpt-1/{commit.attempt}"
    assert _files(attempt_url, so)["object_graph.msgpack"][1] == plan.graph.encode()
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        zc.Checkpoint(model=Model(seed=1)).restore(attempt_url, storage_options=so)
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(f"{base}/run/ckpt-1", storage_options=so)
    assert _state(fresh) == _state(model)


def test_attempt_written_but_never_published_is_not_restorable(backend):
    """A writer that died after its data and before the marker leaves nothing restorable."""
    base, so = backend
    model, _ = _trained(seed=9)
    commit = begin_commit(f"{base}/run/ckpt-3", so, fsync=False)
    storage = commit.create()
    plan = build_save_plan(zc.Checkpoint(model=model))
    array_io.write_arrays(storage, plan.arrays)  # the writer dies here
    assert _files(base, so)  # its data is there
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=Model(seed=1)).restore(f"{base}/run/ckpt-3", storage_options=so)
    commit.abort()
    # A restarted job reuses the step number.
    path = zc.Checkpoint(model=model).write(f"{base}/run/ckpt-3", storage_options=so)
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
    assert _state(fresh) == _state(model)


def test_object_store_restarted_job_reuses_step_over_dead_attempt(backend):
    base, so = backend
    if "://" not in base:
        pytest.skip("local saves go through a temporary sibling, never an attempt prefix")
    dead, _ = _trained(seed=10)
    commit = begin_commit(f"{base}/run/ckpt-4", so)
    plan = build_save_plan(zc.Checkpoint(model=dead))
    array_io.write_arrays(commit.create(), plan.arrays)  # dies before publishing
    model, _ = _trained(seed=11)
    path = zc.Checkpoint(model=model).write(f"{base}/run/ckpt-4", storage_options=so)
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
    assert _state(fresh) == _state(model)
    # The winner's manifest names its own attempt, not the dead one.
    assert open_committed(path, so).manifest.attempt != commit.attempt


# Racing writers --------------------------------------------------------------------------


def test_two_interleaved_commits_exactly_one_wins(backend):
    """Both writers pass create() and write their data; the second publish loses."""
    base, so = backend
    path = f"{base}/run/ckpt-7"
    models = [_trained(seed=20)[0], _trained(seed=21)[0]]
    commits, written = [], []
    for model in models:
        commit = begin_commit(path, so, fsync=False)
        plan = build_save_plan(zc.Checkpoint(model=model))
        written.append((plan, array_io.write_arrays(commit.create(), plan.arrays)))
        commits.append(commit)
    commits[0].finalize(written[0][0].graph.encode(), written[0][1])
    with pytest.raises(CheckpointExistsError):
        commits[1].finalize(written[1][0].graph.encode(), written[1][1])
    commits[1].abort()
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
    assert _state(fresh) == _state(models[0])


def _race(path: str, models: list[Model], so: dict | None) -> list[object]:
    """Each model written to ``path`` by its own thread, started together; the outcomes."""
    barrier = threading.Barrier(len(models))
    outcomes: list[object] = [None] * len(models)

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = zc.Checkpoint(model=models[i]).write(path, storage_options=so)
        except BaseException as exc:  # the test inspects it
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_two_racing_writer_threads_exactly_one_wins(backend):
    base, so = backend
    rounds = 1 if base.startswith("s3://") else 5  # moto is slow; see also the test above
    for round_ in range(rounds):
        path = f"{base}/race/ckpt-{round_}"
        models = [_trained(seed=30 + 2 * round_)[0], _trained(seed=31 + 2 * round_)[0]]
        outcomes = _race(path, models, so)
        winners = [i for i, o in enumerate(outcomes) if o == path]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1, f"round {round_}: outcomes {outcomes!r}"
        assert len(losers) == 1 and isinstance(losers[0], CheckpointExistsError), outcomes
        fresh = Model(seed=1)
        zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
        assert _state(fresh) == _state(models[winners[0]])


def test_retried_publish_meeting_its_own_marker_succeeds(backend):
    base, so = backend
    fs, root = _fs(f"{base}/run/ckpt-8", so)
    if isinstance(fs, LocalFileSystem):
        fs = LocalFileSystem(auto_mkdir=True)  # the object-store protocol on a plain disk
    model, _ = _trained(seed=12)
    commit = ObjectStoreCommit(fs, root)
    plan = build_save_plan(zc.Checkpoint(model=model))
    files = array_io.write_arrays(commit.create(), plan.arrays)
    manifest = commit.finalize(plan.graph.encode(), files)
    marker = fs.cat_file(f"{root}/{COMMIT_KEY}")
    assert marker == manifest.encode()
    commit.publish(manifest)  # a retried PUT whose first try went through
    commit.publish(manifest)
    assert fs.cat_file(f"{root}/{COMMIT_KEY}") == marker
    # Another manifest (another writer, or another attempt) is a lost race.
    other = type(manifest)(
        manifest.record_sha256, manifest.files, manifest.attempt, manifest.created + 1.0
    )
    with pytest.raises(CheckpointExistsError, match="another writer"):
        commit.publish(other)
    assert fs.cat_file(f"{root}/{COMMIT_KEY}") == marker
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(f"{base}/run/ckpt-8", storage_options=so).assert_consumed()
    assert _state(fresh) == _state(model)


class _ConflictingPut:
    """A filesystem whose conditional PUT of _COMMIT fails as S3 answers a race: 409.

    ``race()`` runs first: the other writer's commit, landing meanwhile.
    """

    def __init__(self, fs, race) -> None:
        self._fs, self._race = fs, race

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def pipe_file(self, path, data, mode="overwrite", **kwargs):
        if path.endswith(f"/{COMMIT_KEY}") and mode == "create":
            self._race()
            raise OSError(5, "An error occurred (ConditionalRequestConflict) (409)", path)
        return self._fs.pipe_file(path, data, mode=mode, **kwargs)


def test_publish_losing_a_race_with_any_error_is_a_clear_conflict(backend):
    base, so = backend
    fs, root = _fs(f"{base}/run/ckpt-9", so)
    if isinstance(fs, LocalFileSystem):
        fs = LocalFileSystem(auto_mkdir=True)
    commits, plans, written = [], [], []
    for seed in (13, 14):
        model = _trained(seed=seed)[0]
        commit = ObjectStoreCommit(fs, root)
        plan = build_save_plan(zc.Checkpoint(model=model))
        commits.append(commit)
        plans.append((model, plan))
        written.append(array_io.write_arrays(commit.create(), plan.arrays))
    (winner_model, winner_plan), (_, loser_plan) = plans
    winner, loser = commits
    loser.fs = _ConflictingPut(fs, lambda: winner.finalize(winner_plan.graph.encode(), written[0]))
    with pytest.raises(CheckpointExistsError, match="another writer"):
        loser.finalize(loser_plan.graph.encode(), written[1])
    loser.abort()
    assert (
        Manifest.decode(fs.cat_file(f"{root}/{COMMIT_KEY}"), where=root).attempt == winner.attempt
    )
    assert not fs.exists(f"{root}/{loser.attempt}")
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(f"{base}/run/ckpt-9", storage_options=so).assert_consumed()
    assert _state(fresh) == _state(winner_model)


# Corruption ---------------------------------------------------------------------------


def test_damaged_chunk_is_found_by_restore_and_verify(backend):
    base, so = backend
    model, _ = _trained(seed=13)
    path = zc.Checkpoint(model=model).write(f"{base}/c", storage_options=so)
    committed = open_committed(path, so)
    report = zc.verify(path, storage_options=so)  # a whole checkpoint verifies
    manifest = committed.manifest
    assert (report.files, report.nbytes) == (len(manifest.files), manifest.nbytes)
    assert report.arrays == len(model_variables(model))  # write() adds no counter
    fs, root = _fs(path, so)
    prefix = f"{manifest.attempt}/" if manifest.attempt else ""
    chunk = f"{root}/{prefix}{EMBEDDING_KEY}/c.0.0"
    original = fs.cat_file(chunk)
    for position in (100, len(original) - 1):  # data, then the stored CRC itself
        data = bytearray(original)
        data[position] ^= 0x20
        fs.pipe_file(chunk, bytes(data))
        fs.invalidate_cache()
        with pytest.raises(ChecksumError) as info:
            zc.Checkpoint(model=Model(seed=1)).restore(path, storage_options=so)
        assert EMBEDDING_KEY in str(info.value) and "(0, 0)" in str(info.value)
        if position == 100:  # verify reads everything: once is enough (S3 is slow)
            with pytest.raises(ChecksumError, match="model/embedding"):
                zc.verify(path, storage_options=so)
    fs.rm_file(chunk)
    fs.invalidate_cache()
    with pytest.raises(MissingChunkError, match=r"c\.0\.0"):
        zc.verify(path, storage_options=so)
    with pytest.raises(MissingChunkError, match=r"c\.0\.0"):
        zc.Checkpoint(model=Model(seed=1)).restore(path, storage_options=so)
    fs.pipe_file(chunk, original)  # repaired: whole again
    fs.invalidate_cache()
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
    assert _state(fresh) == _state(model)


# CheckpointManager and directory functions ------------------------------------------------


def _save_series(manager, model: Model, count: int) -> list[tuple[str, list]]:
    saved = []
    for step in range(count):
        model.embedding.assign(np.full(model.embedding.shape, step, np.float32))
        path = manager.save()
        assert path is not None
        saved.append((path, _state(model)))
    return saved


def test_manager_keeps_max_to_keep_newest(backend):
    base, so = backend
    model, _ = _trained(seed=15)
    ckpt = zc.Checkpoint(model=model)
    manager = zc.CheckpointManager(ckpt, f"{base}/run", max_to_keep=2, storage_options=so)
    saved = _save_series(manager, model, 3)
    manager.wait()
    assert [_norm(p) for p, _ in saved] == [_norm(f"{base}/run/ckpt-{n}") for n in (1, 2, 3)]
    assert [_norm(p) for p in manager.checkpoints] == [_norm(p) for p, _ in saved[1:]]
    assert _norm(manager.latest_checkpoint) == _norm(saved[-1][0])
    listed = zc.list_checkpoints(f"{base}/run", storage_options=so)
    assert [(c.name, c.number, c.committed) for c in listed] == [
        ("ckpt-2", 2, True),
        ("ckpt-3", 3, True),
    ]
    assert _files(saved[0][0], so) == {}  # marker and data gone
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=Model(seed=1)).restore(saved[0][0], storage_options=so)
    for path, expected in saved[1:]:
        fresh = Model(seed=1)
        zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
        assert _state(fresh) == expected


def _committed(directory: str, so: dict | None) -> list[str]:
    return [c.name for c in zc.list_checkpoints(directory, storage_options=so) if c.committed]


def test_manager_best_n_survives_a_lost_state_file(backend):
    base, so = backend
    directory = f"{base}/run"
    model, _ = _trained(seed=40)

    def manager() -> zc.CheckpointManager:
        return zc.CheckpointManager(
            zc.Checkpoint(model=model), directory, max_to_keep=2, best_fn="loss",
            best_mode="min", storage_options=so,
        )  # fmt: skip

    first = manager()
    for loss in [3.0, 0.5, 2.0, 4.0]:
        first.save(metrics={"loss": loss})
    first.wait()
    assert _committed(directory, so) == ["ckpt-2", "ckpt-3", "ckpt-4"]  # best two + latest
    fs, root = _fs(directory, so)
    fs.rm_file(f"{root}/zarrckpt_state.ckpt.json")
    second = manager()  # the metrics come from the manifests
    second.save(metrics={"loss": 9.0})
    second.wait()
    assert _committed(directory, so) == ["ckpt-2", "ckpt-3", "ckpt-5"]
    infos = {c.name: c for c in zc.list_checkpoints(directory, storage_options=so)}
    assert infos["ckpt-2"].metadata == {"loss": 0.5}


def test_managers_of_two_names_keep_their_own_state(backend):
    base, so = backend
    directory = f"{base}/run"
    model, _ = _trained(seed=41)
    for restart in range(2):
        best = zc.CheckpointManager(
            zc.Checkpoint(model=model), directory, max_to_keep=1, checkpoint_name="best",
            best_fn="acc", storage_options=so,
        )  # fmt: skip
        recent = zc.CheckpointManager(
            zc.Checkpoint(model=model), directory, max_to_keep=1, checkpoint_name="recent",
            storage_options=so,
        )  # fmt: skip
        for acc in [0.9, 0.1] if restart == 0 else [0.2]:
            best.save(metrics={"acc": acc})
            recent.save()
        best.wait()
        recent.wait()
    assert _committed(directory, so) == ["best-1", "best-3", "recent-3"]
    fs, root = _fs(directory, so)
    fs.invalidate_cache()
    names = sorted(posixpath.basename(p) for p in fs.ls(root, detail=False))
    assert "zarrckpt_state.best.json" in names and "zarrckpt_state.recent.json" in names


def test_manager_numbering_continues_with_new_manager(backend):
    base, so = backend
    model, _ = _trained(seed=16)
    first = zc.CheckpointManager(zc.Checkpoint(model=model), f"{base}/run", storage_options=so)
    saved = _save_series(first, model, 2)
    first.wait()
    fresh = Model(seed=3)
    ckpt = zc.Checkpoint(model=fresh)
    second = zc.CheckpointManager(ckpt, f"{base}/run", max_to_keep=5, storage_options=so)
    assert _norm(second.latest_checkpoint) == _norm(saved[-1][0])
    assert [_norm(p) for p in second.checkpoints] == [_norm(p) for p, _ in saved]
    second.restore_or_initialize()
    assert _state(fresh) == saved[-1][1]
    assert int(ckpt.save_counter.numpy()) == 2
    third = second.save()
    second.wait()
    assert _norm(third) == _norm(f"{base}/run/ckpt-3")
    assert [c.number for c in zc.list_checkpoints(f"{base}/run", storage_options=so)] == [1, 2, 3]
    # A manager whose checkpoint was not restored still continues the numbering.
    third_manager = zc.CheckpointManager(
        zc.Checkpoint(model=Model(seed=4)), f"{base}/run", storage_options=so
    )
    assert _norm(third_manager.save()) == _norm(f"{base}/run/ckpt-4")
    third_manager.wait()
    assert [c.number for c in zc.list_checkpoints(f"{base}/run", storage_options=so)] == [
        1,
        2,
        3,
        4,
    ]


def test_manager_refuses_to_overwrite_and_keeps_existing(backend):
    base, so = backend
    model, _ = _trained(seed=17)
    manager = zc.CheckpointManager(zc.Checkpoint(model=model), f"{base}/run", storage_options=so)
    path = manager.save(checkpoint_number=5)
    assert _norm(path) == _norm(f"{base}/run/ckpt-5")
    expected = _state(model)
    model.embedding.assign(np.zeros(model.embedding.shape, np.float32))
    with pytest.raises(CheckpointExistsError):
        manager.save(checkpoint_number=5)
    manager.wait()
    fresh = Model(seed=1)
    zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
    assert _state(fresh) == expected
    assert _norm(manager.latest_checkpoint) == _norm(path)
    assert [_norm(p) for p in manager.checkpoints] == [_norm(path)]
    assert _norm(zc.latest_checkpoint(f"{base}/run", storage_options=so)) == _norm(path)


def test_restore_or_initialize_on_empty_directory(backend):
    base, so = backend
    model = Model(seed=18)
    before = _state(model)
    calls = []
    manager = zc.CheckpointManager(
        zc.Checkpoint(model=model),
        f"{base}/empty",
        init_fn=lambda: calls.append(1),
        storage_options=so,
    )
    assert manager.latest_checkpoint is None and manager.checkpoints == []
    assert manager.restore_or_initialize() is None
    assert calls == [1] and _state(model) == before
    assert zc.latest_checkpoint(f"{base}/empty", storage_options=so) is None
    assert zc.list_checkpoints(f"{base}/empty", storage_options=so) == []


def test_latest_and_list_checkpoints(backend):
    base, so = backend
    model, _ = _trained(seed=19)
    ckpt = zc.Checkpoint(model=model)
    paths = [ckpt.save(f"{base}/run/ckpt", storage_options=so) for _ in range(3)]
    assert _norm(zc.latest_checkpoint(f"{base}/run", storage_options=so)) == _norm(paths[-1])
    infos = zc.list_checkpoints(f"{base}/run", storage_options=so)
    assert [(i.name, i.number, i.committed) for i in infos] == [
        (f"ckpt-{n}", n, True) for n in (1, 2, 3)
    ]
    assert [_norm(i.path) for i in infos] == [_norm(p) for p in paths]
    for info, path in zip(infos, paths, strict=True):
        manifest = open_committed(path, so).manifest
        assert info.nbytes == manifest.nbytes > 0
        assert info.created == pytest.approx(manifest.created)
    assert infos[0].created <= infos[1].created <= infos[2].created
    assert time.time() - infos[-1].created < 300


def test_delete_checkpoint_removes_it_and_nothing_else(backend):
    base, so = backend
    model, _ = _trained(seed=22)
    ckpt = zc.Checkpoint(model=model)
    paths = [ckpt.save(f"{base}/run/ckpt", storage_options=so) for _ in range(3)]
    kept = {p: _files(p, so) for p in (paths[0], paths[2])}
    zc.delete_checkpoint(paths[1], storage_options=so)
    assert _files(paths[1], so) == {}  # marker and data gone
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=Model(seed=1)).restore(paths[1], storage_options=so)
    assert {p: _files(p, so) for p in kept} == kept
    names = [c.name for c in zc.list_checkpoints(f"{base}/run", storage_options=so)]
    assert names == ["ckpt-1", "ckpt-3"]
    zc.delete_checkpoint(paths[1], storage_options=so)  # deleting twice is harmless
    assert _norm(zc.latest_checkpoint(f"{base}/run", storage_options=so)) == _norm(paths[2])


def test_delete_checkpoint_removes_marker_first(backend):
    """A delete stopped after the marker leaves data that is no longer a checkpoint."""
    base, so = backend
    if "://" not in base:
        pytest.skip("local deletes rename the directory away in one step")
    model, _ = _trained(seed=23)
    path = zc.Checkpoint(model=model).write(f"{base}/run/ckpt-1", storage_options=so)
    fs, root = _fs(path, so)
    # What delete_checkpoint does first, alone: the data stays but is not a checkpoint.
    fs.rm_file(f"{root}/{COMMIT_KEY}")
    infos = zc.list_checkpoints(f"{base}/run", storage_options=so)
    assert [(i.name, i.committed, i.nbytes) for i in infos] == [("ckpt-1", False, 0)]
    assert zc.latest_checkpoint(f"{base}/run", storage_options=so) is None
    zc.delete_checkpoint(path, storage_options=so)  # finishing the interrupted delete
    assert _files(f"{base}/run", so) == {}


def _make_leftovers(base: str, so: dict | None) -> tuple[list[str], dict, dict]:
    """Committed ckpt-1, ckpt-2 and every kind of leftover.

    Returns the leftovers' names, the committed paths with their values, and
    the committed checkpoints' files before the leftovers were made.
    """
    model, _ = _trained(seed=24)
    ckpt = zc.Checkpoint(model=model)
    committed = {}
    for _ in range(2):
        path = ckpt.save(f"{base}/run/ckpt", storage_options=so)
        committed[path] = _state(model)
    snapshot = {p: _files(p, so) for p in committed}
    fs, root = _fs(f"{base}/run", so)
    leftovers = []
    # A save that died before its commit: ckpt-3 without _COMMIT.
    dead = begin_commit(f"{base}/run/ckpt-3", so, fsync=False)
    array_io.write_arrays(dead.create(), build_save_plan(ckpt).arrays)
    if isinstance(fs, LocalFileSystem):
        leftovers.append(os.path.basename(dead.temp_path))  # a temporary sibling
        # A delete that died after its rename.
        doomed = os.path.join(root, f".ckpt-0.zarrckpt-deleting-{'0' * 32}")
        os.makedirs(os.path.join(doomed, "model"))
        with open(os.path.join(doomed, "model", "zarr.json"), "w") as f:
            f.write("{}")
        leftovers.append(os.path.basename(doomed))
    else:
        leftovers.append(f"ckpt-3/{dead.attempt}")
        # A writer that lost the race for ckpt-2 left its attempt inside the winner.
        loser = begin_commit(next(p for p in committed if p.endswith("-2")), so)
        with pytest.raises(CheckpointExistsError):
            loser.create()
        fs.pipe_file(f"{root}/ckpt-2/{loser.attempt}/zarr.json", b"{}")
        fs.pipe_file(f"{root}/ckpt-2/{loser.attempt}/model/c.0", b"x" * 10)
        leftovers.append(f"ckpt-2/{loser.attempt}")
    return leftovers, committed, snapshot


def _make_foreign(base: str, so: dict | None) -> dict[str, dict[str, int]]:
    """What gc must never touch besides committed checkpoints; returns its files.

    Directories zarrckpt did not write, though named like checkpoints, and a
    checkpoint whose _COMMIT this version cannot decode (a newer format), with
    an attempt inside it that the unreadable manifest may well name.
    """
    fs, root = _fs(f"{base}/run", so)
    join = os.path.join if isinstance(fs, LocalFileSystem) else posixpath.join
    future = msgpack.packb({"format_name": "zarrckpt.commit", "format": 2})
    future += crc32c.crc32c(future).to_bytes(4, "little")  # sealed, as every manifest is
    for path, data in [
        (join(root, "ckpt-4", "zarr.json"), b"{}"),
        (join(root, "tensorboard-1", "events.out"), b"not a checkpoint"),
        (join(root, "ckpt-5", "_COMMIT"), future),
        (join(root, "ckpt-5", f"attempt-{'7' * 32}", "zarr.json"), b"{}"),
    ]:
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, data)
    names = ("ckpt-4", "tensorboard-1", "ckpt-5")
    return {name: _files(f"{base}/run/{name}", so) for name in names}


def test_gc_removes_leftovers_but_never_committed_checkpoints(backend):
    base, so = backend
    leftovers, committed, before_committed = _make_leftovers(base, so)
    foreign = _make_foreign(base, so)
    assert zc.gc(f"{base}/run", older_than=3600.0, storage_options=so) == []  # all too young
    time.sleep(0.01)
    removed = zc.gc(f"{base}/run", older_than=0.0, storage_options=so)
    removed_names = sorted(
        _norm(r)[len(_norm(f"{base}/run")) :].strip("/").replace(os.sep, "/") for r in removed
    )
    assert removed_names == sorted(leftovers)
    after = _files(f"{base}/run", so)
    for name in leftovers:
        assert not any(k.startswith(f"{name}/") or k == name for k in after), name
    # Committed checkpoints: every byte still there, each restores bit-exactly.
    assert {p: _files(p, so) for p in committed} == before_committed
    for path, expected in committed.items():
        fresh = Model(seed=1)
        zc.Checkpoint(model=fresh).restore(path, storage_options=so).assert_consumed()
        assert _state(fresh) == expected
    assert {name: _files(f"{base}/run/{name}", so) for name in foreign} == foreign
    assert zc.gc(f"{base}/run", older_than=0.0, storage_options=so) == []
    listed = zc.list_checkpoints(f"{base}/run", storage_options=so)
    assert sorted((c.name, c.committed) for c in listed) == [
        ("ckpt-1", True),
        ("ckpt-2", True),
        ("ckpt-4", False),
        ("ckpt-5", False),  # unreadable manifest: not restorable, but never collected
        ("tensorboard-1", False),  # listed as named like one; never collected
    ]
