"""Failing every single write, rename and delete of a save or a retention pass.

The commit protocol promises that a failure at any moment leaves every earlier
checkpoint intact and nothing half-written visible. These tests fail the 1st,
2nd, ... Nth operation of one save (or one retention pass) in turn and check
exactly that, through a faulty fsspec filesystem (the object-store protocol:
attempt prefix + conditional PUT of ``_COMMIT``) over memory and over a local
directory, and through failing ``os`` calls for the local rename protocol.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import zarrckpt as zc
from tests.conftest import Adam, Model, model_variables
from tests.faulty_fs import FaultPlan, FaultyFileSystem, InjectedFault
from zarrckpt import _storage
from zarrckpt.errors import CheckpointNotFoundError, ZarrckptError
from zarrckpt.options import CheckpointOptions

NO_FSYNC = CheckpointOptions(fsync=False)


@dataclass
class Faulty:
    base: str  # faulty:///... URL of an empty directory
    storage_options: dict
    plan: FaultPlan


@pytest.fixture(params=["memory", "file"])
def faulty(request, tmp_path) -> Iterator[Faulty]:
    """A FaultyFileSystem over memory or a local directory, with an empty namespace."""
    plan = FaultPlan()
    if request.param == "memory":
        root = f"/zc-fault-{uuid.uuid4().hex}"
    else:
        root = str(tmp_path / "faulty")
        os.makedirs(root)
    yield Faulty(f"faulty://{root}", {"plan": plan, "target": request.param}, plan)
    if request.param == "memory":  # quicker than rm() of thousands of files
        store, pseudo_dirs = MemoryFileSystem.store, MemoryFileSystem.pseudo_dirs
        for key in [k for k in store if k.startswith(f"{root}/")]:
            del store[key]
        pseudo_dirs[:] = [d for d in pseudo_dirs if d != root and not d.startswith(f"{root}/")]


# Helpers ------------------------------------------------------------------------------


def _trained(seed: int) -> tuple[Model, Adam]:
    model, opt = Model(seed=seed), Adam()
    opt.step(model_variables(model), seed=seed + 1)
    return model, opt


def _state(model: Model, opt: Adam | None = None) -> list[tuple[str, tuple, bytes]]:
    arrays = []
    for var in model_variables(model):
        arrays.append(var.numpy())
        if opt is not None:
            arrays.extend(opt.get_slot(var, name).numpy() for name in ("m", "v"))
    return [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]


def _restored_state(path: str, so: dict | None, with_optimizer: bool) -> list:
    """Restore ``path`` into fresh objects (all values consumed) and return their state."""
    model, opt = Model(seed=1234), Adam()
    ckpt = (
        zc.Checkpoint(model=model, optimizer=opt) if with_optimizer else zc.Checkpoint(model=model)
    )
    status = ckpt.restore(path, storage_options=so)
    if with_optimizer:
        for var in model_variables(model):
            for name in ("m", "v"):
                opt.add_slot(var, name)
    status.assert_consumed()
    return _state(model, opt if with_optimizer else None)


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _committed_names(directory: str, so: dict | None) -> list[str]:
    return [c.name for c in zc.list_checkpoints(directory, storage_options=so) if c.committed]


def _assert_injected(exc: BaseException, plan: FaultPlan | None = None) -> None:
    """The error is the injected OSError or a zarrckpt error caused by it, and says so."""
    chain = [exc, exc.__cause__, exc.__context__]
    assert isinstance(exc, OSError | ZarrckptError), repr(exc)
    assert any(isinstance(e, InjectedFault) or "injected fault" in str(e) for e in chain if e), (
        repr(exc)
    )
    if plan is not None:
        assert plan.injected, "the planned fault never happened"


def _assert_directory(
    directory: str,
    so: dict | None,
    committed: dict[str, list],
    *,
    with_optimizer: bool,
    absent: tuple[str, ...] = (),
) -> None:
    """Exactly ``committed`` are listed as committed, each restores bit-exactly; ``absent``
    are not committed and not restorable."""
    assert _committed_names(directory, so) == [_name(p) for p in committed]
    latest = zc.latest_checkpoint(directory, storage_options=so)
    assert latest is not None and _name(latest) == _name(list(committed)[-1])
    for path, expected in committed.items():
        assert _restored_state(path, so, with_optimizer) == expected, path
    for path in absent:
        with pytest.raises(CheckpointNotFoundError):
            zc.Checkpoint(model=Model(seed=1)).restore(path, storage_options=so)


# The harness itself -------------------------------------------------------------------


def test_faulty_filesystem_counts_and_fails_the_chosen_operation():
    plan = FaultPlan(fail={"write": 2, "rename": 1, "delete": 2})
    fs, root = fsspec.core.url_to_fs(f"faulty:///zc-harness-{uuid.uuid4().hex}", plan=plan)
    assert isinstance(fs, FaultyFileSystem) and fs.plan is plan
    fs.pipe_file(f"{root}/a", b"1")
    with pytest.raises(InjectedFault) as info:
        fs.pipe_file(f"{root}/b", b"2")
    assert info.value.errno == errno.EIO and not fs.exists(f"{root}/b")
    with fs.open(f"{root}/c", "wb") as f:
        f.write(b"3")
    with pytest.raises(InjectedFault):
        fs.mv(f"{root}/a", f"{root}/z")
    assert fs.cat_file(f"{root}/a") == b"1" and not fs.exists(f"{root}/z")
    fs.pipe_file(f"{root}/d/e", b"4")
    with pytest.raises(InjectedFault):
        fs.rm(root, recursive=True)  # one delete per file: the 2nd fails
    assert plan.counts == {"write": 4, "rename": 1, "delete": 2}
    assert [k for k, _, _ in plan.injected] == ["write", "rename", "delete"]
    assert len(fs.find(root)) == 2  # one file went, the failed one and one more stay
    plan.reset(fail={"write": 1}, after=True)  # done, then reported as failed
    with pytest.raises(InjectedFault):
        fs.pipe_file(f"{root}/f", b"5")
    assert fs.cat_file(f"{root}/f") == b"5"
    plan.reset()
    fs.rm(root, recursive=True)
    assert not fs.exists(root) and plan.counts == {"delete": 3}


def test_object_store_protocol_never_renames(faulty):
    """On S3 a rename is a copy and a delete: a save and a retention pass use none."""
    model, opt = _trained(seed=1)
    manager = zc.CheckpointManager(
        zc.Checkpoint(model=model, optimizer=opt),
        f"{faulty.base}/run",
        max_to_keep=1,
        storage_options=faulty.storage_options,
    )
    for _ in range(3):
        manager.save(options=NO_FSYNC)
    manager.wait()
    counts = faulty.plan.counts
    assert counts["rename"] == 0 and counts["write"] > 0 and counts["delete"] > 0
    assert _committed_names(f"{faulty.base}/run", faulty.storage_options) == ["ckpt-3"]


# Failing each write of a save -----------------------------------------------------------


def test_every_failed_write_of_a_save_leaves_earlier_checkpoints_intact(faulty):
    base, so, plan = f"{faulty.base}/run", faulty.storage_options, faulty.plan
    model = Model(seed=2)
    ckpt = zc.Checkpoint(model=model)
    committed = {ckpt.save(f"{base}/ckpt", storage_options=so): _state(model)}
    model.embedding.assign(np.full(model.embedding.shape, -1, np.float32))
    plan.reset()
    committed[ckpt.save(f"{base}/ckpt", storage_options=so)] = _state(model)
    writes = plan.counts["write"]
    assert writes > 20  # every chunk, metadata, record, marker
    assert plan.paths("write")[-1].endswith("/ckpt-2/_COMMIT")  # the marker is written last
    for n in range(1, writes + 1):
        model.embedding.assign(np.full(model.embedding.shape, n, np.float32))
        plan.reset(fail={"write": n})
        with pytest.raises((OSError, ZarrckptError)) as info:
            ckpt.save(f"{base}/ckpt", storage_options=so)
        _assert_injected(info.value, plan)
        assert int(ckpt.save_counter.numpy()) == 2, n
        plan.reset()
        _assert_directory(base, so, committed, with_optimizer=False, absent=(f"{base}/ckpt-3",))
    # The failed attempts left nothing a collector must keep, and the next save works.
    zc.gc(base, older_than=0.0, storage_options=so)
    assert [c.name for c in zc.list_checkpoints(base, storage_options=so)] == ["ckpt-1", "ckpt-2"]
    committed[ckpt.save(f"{base}/ckpt", storage_options=so)] = _state(model)
    _assert_directory(base, so, committed, with_optimizer=False)


@pytest.mark.parametrize("faulty", ["memory"], indirect=True)  # same code path as "file"
def test_every_write_failing_after_it_happened_never_shows_a_broken_checkpoint(faulty):
    """A write that reaches the store but reports an error (a lost response).

    Whatever the save then reports, the new checkpoint is either whole and
    restorable or not a checkpoint at all, and earlier ones are intact.
    """
    base, so, plan = f"{faulty.base}/run", faulty.storage_options, faulty.plan
    model = Model(seed=4)
    ckpt = zc.Checkpoint(model=model)
    committed = {ckpt.save(f"{base}/ckpt", storage_options=so): _state(model)}
    model.embedding.assign(np.full(model.embedding.shape, -1, np.float32))
    plan.reset()
    committed[ckpt.save(f"{base}/ckpt", storage_options=so)] = _state(model)
    writes = plan.counts["write"]
    for n in range(1, writes + 1):
        model.embedding.assign(np.full(model.embedding.shape, n, np.float32))
        plan.reset(fail={"write": n}, after=True)
        try:
            path = ckpt.save(f"{base}/ckpt", storage_options=so)
        except (OSError, ZarrckptError) as exc:
            _assert_injected(exc, plan)
            path = f"{base}/ckpt-{int(ckpt.save_counter.numpy()) + 1}"
        plan.reset()
        infos = {c.name: c for c in zc.list_checkpoints(base, storage_options=so)}
        info = infos.get(_name(path))
        if info is not None and info.committed:  # listed: then it must be whole
            try:
                restored = _restored_state(path, so, False)
            except ZarrckptError as exc:
                pytest.fail(
                    f"write #{n} of {writes} reported an error after it happened; {path} is "
                    f"listed as committed but does not restore: {exc!r}"
                )
            assert restored == _state(model)
            committed[path] = _state(model)
        else:
            with pytest.raises(CheckpointNotFoundError):
                zc.Checkpoint(model=Model(seed=1)).restore(path, storage_options=so)
        _assert_directory(base, so, committed, with_optimizer=False)


@pytest.mark.parametrize("faulty", ["memory"], indirect=True)  # same code path as "file"
def test_every_failed_write_of_a_manager_save(faulty):
    """Checkpoint data, marker and the manager's state file: each write fails in turn."""
    base, so, plan = f"{faulty.base}/run", faulty.storage_options, faulty.plan
    model = Model(seed=5)
    ckpt = zc.Checkpoint(model=model)
    manager = zc.CheckpointManager(ckpt, base, max_to_keep=2, storage_options=so)
    committed = {}
    for _ in range(2):
        committed[manager.save(options=NO_FSYNC)] = _state(model)
    manager.wait()
    plan.reset()
    probe = zc.CheckpointManager(
        zc.Checkpoint(model=Model(seed=5)), f"{faulty.base}/probe", storage_options=so
    )
    probe.save(options=NO_FSYNC)
    probe.wait()
    writes = plan.counts["write"]
    for n in range(1, writes + 1):
        model.embedding.assign(np.full(model.embedding.shape, n, np.float32))
        plan.reset(fail={"write": n})
        number = int(ckpt.save_counter.numpy()) + 1
        raised: BaseException | None = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                manager.save(options=NO_FSYNC)
            except (OSError, ZarrckptError) as exc:
                raised = exc
        if raised is None:  # only the state file may fail without failing the save
            assert [_name(path) for _, _, path in plan.injected] == ["zarrckpt_state.ckpt.json"]
            assert any("could not be written" in str(w.message) for w in caught), caught
        else:
            _assert_injected(raised, plan)
        manager.wait()
        plan.reset()
        path = f"{base}/ckpt-{number}"
        names = _committed_names(base, so)
        if _name(path) in names:  # failed after its commit (the state file): then whole
            assert _restored_state(path, so, False) == _state(model)
            committed[path] = _state(model)
        for path_, expected in committed.items():
            if _name(path_) in names:
                assert _restored_state(path_, so, False) == expected
        # Whatever failed, the newest committed checkpoint is what both report.
        latest = zc.latest_checkpoint(base, storage_options=so)
        assert _name(latest) == names[-1]
        # The next good save restores order: retention holds again.
        good = manager.save(options=NO_FSYNC)
        manager.wait()
        committed[good] = _state(model)
        names = _committed_names(base, so)
        assert names[-1] == _name(good) and _name(manager.latest_checkpoint) == _name(good)
        assert len(names) <= 2, f"write #{n} failed: max_to_keep=2 but committed {names}"
        committed = {p: v for p, v in committed.items() if _name(p) in names}


# Failing each delete of a retention pass --------------------------------------------------


def _retention_setup(directory: str, so: dict, seed: int):
    model = Model(seed=seed)
    ckpt = zc.Checkpoint(model=model)
    manager = zc.CheckpointManager(ckpt, directory, max_to_keep=2, storage_options=so)
    saved = {}
    for step in range(2):
        model.embedding.assign(np.full(model.embedding.shape, step, np.float32))
        saved[manager.save(options=NO_FSYNC)] = _state(model)
    manager.wait()
    model.embedding.assign(np.full(model.embedding.shape, 7, np.float32))
    return model, manager, saved


@pytest.mark.parametrize("faulty", ["memory"], indirect=True)  # local disk: see below
def test_every_failed_delete_of_a_retention_pass(faulty):
    so, plan = faulty.storage_options, faulty.plan
    _, manager, _ = _retention_setup(f"{faulty.base}/probe", so, seed=6)
    plan.reset()
    manager.save(options=NO_FSYNC)
    manager.wait()
    deletes = plan.counts["delete"]
    assert deletes > 10 and plan.paths("delete")[0].endswith("/ckpt-1/_COMMIT")  # marker first
    for n in range(1, deletes + 1):
        directory = f"{faulty.base}/run-{n}"
        model, manager, saved = _retention_setup(directory, so, seed=6)
        oldest, kept = list(saved)
        plan.reset(fail={"delete": n})
        newest = manager.save(options=NO_FSYNC)  # the deletion runs in the background
        with pytest.raises(OSError) as info:
            manager.wait()
        _assert_injected(info.value, plan)
        plan.reset()
        expected_new = _state(model)
        infos = {c.name: c for c in zc.list_checkpoints(directory, storage_options=so)}
        # Kept and new checkpoints: listed, whole, bit-exact.
        assert infos["ckpt-2"].committed and infos["ckpt-3"].committed
        assert _restored_state(kept, so, False) == saved[kept]
        assert _restored_state(newest, so, False) == expected_new
        assert _name(zc.latest_checkpoint(directory, storage_options=so)) == "ckpt-3"
        # The one whose delete failed: intact and listed, or no checkpoint at all.
        old = infos.get("ckpt-1")
        if n == 1:  # the marker could not be removed: still a whole checkpoint
            assert old is not None and old.committed
        if old is not None and old.committed:
            assert _restored_state(oldest, so, False) == saved[oldest]
        else:
            with pytest.raises(CheckpointNotFoundError):
                zc.Checkpoint(model=Model(seed=1)).restore(oldest, storage_options=so)
            removed = zc.gc(directory, older_than=0.0, storage_options=so)
            # What the failed delete left of ckpt-1 is its attempt, if anything.
            assert all(re.fullmatch(r".*/ckpt-1/attempt-[0-9a-f]{32}", r) for r in removed)
            fs, root = fsspec.core.url_to_fs(f"{directory}/ckpt-1", **(so or {}))
            assert not (fs.exists(root) and fs.find(root)), removed
        assert _committed_names(directory, so) == (
            ["ckpt-1", "ckpt-2", "ckpt-3"]
            if old is not None and old.committed
            else ["ckpt-2", "ckpt-3"]
        )
        # A new manager on the directory recovers and retention catches up.
        again = zc.CheckpointManager(
            zc.Checkpoint(model=model), directory, max_to_keep=2, storage_options=so
        )
        again.save(options=NO_FSYNC)
        again.wait()
        assert _committed_names(directory, so) == ["ckpt-3", "ckpt-4"]


def test_failed_background_delete_does_not_lose_the_next_save(faulty):
    """The error of a failed deletion surfaces, but the manager still knows its checkpoints."""
    so, plan = faulty.storage_options, faulty.plan
    directory = f"{faulty.base}/run"
    model, manager, _ = _retention_setup(directory, so, seed=7)
    plan.reset(fail={"delete": 1})  # ckpt-1's marker cannot be removed
    manager.save(options=NO_FSYNC)  # ckpt-3; deleting ckpt-1 fails in the background
    try:
        path = manager.save(options=NO_FSYNC)  # reports the earlier failure, or not
    except OSError as exc:
        _assert_injected(exc)
        path = None
    manager.wait()
    newest = zc.latest_checkpoint(directory, storage_options=so)
    assert _name(newest) == "ckpt-4"
    assert _restored_state(newest, so, False) == _state(model)
    assert manager.latest_checkpoint is not None
    assert _name(manager.latest_checkpoint) == "ckpt-4", (
        f"save() raised={path is None}; ckpt-4 is committed but the manager's latest is "
        f"{manager.latest_checkpoint} and its list {manager.checkpoints}"
    )
    assert [_name(p) for p in manager.checkpoints][-1] == "ckpt-4"


# Local disk: failing os calls of the rename protocol ------------------------------------


class _OsFaults:
    """Fails the Nth call of an os function (writev, pwrite, rename, unlink, fsync, replace).

    With EIO.

    Also libc's syncfs, which a local save calls once to make its small files
    and directories durable.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        for name in ("writev", "pwrite", "rename", "unlink", "fsync", "replace"):
            self._wrap(name)
        self._wrap("syncfs", _storage)

    def _wrap(self, name: str, module: Any = os) -> None:
        attribute = "_syncfs" if module is _storage else name
        real = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            with self.lock:
                self.counts[name] = self.counts.get(name, 0) + 1
                hit = self.fail.get(name) == self.counts[name]
            if hit:
                raise InjectedFault(errno.EIO, f"injected fault: os.{name}", str(args[0]))
            return real(*args, **kwargs)

        self.monkeypatch.setattr(module, attribute, wrapper)

    def reset(self, **fail: int) -> None:
        with self.lock:
            self.counts = {}
            self.fail = dict(fail)


@pytest.mark.parametrize("call", ["writev", "pwrite", "rename", "fsync", "syncfs"])
def test_local_save_with_each_failing_os_call(tmp_path, monkeypatch, call):
    base = str(tmp_path / "run")
    options = CheckpointOptions() if call in ("fsync", "syncfs", "pwrite") else NO_FSYNC
    if call == "fsync":  # every file and directory fsynced one by one, not by one syncfs
        monkeypatch.setattr(_storage.LocalStorage, "SYNCFS_FROM", 1 << 30)
    if call == "pwrite":  # every file written with O_DIRECT, as chunks of 1 MiB and more are
        monkeypatch.setattr(_storage.LocalStorage, "EAGER_FSYNC_BYTES", 1)
    model = Model(seed=8)
    ckpt = zc.Checkpoint(model=model)
    committed = {ckpt.save(f"{base}/ckpt", options=options): _state(model)}
    faults = _OsFaults(monkeypatch)
    faults.reset()
    model.embedding.assign(np.full(model.embedding.shape, -1, np.float32))
    committed[ckpt.save(f"{base}/ckpt", options=options)] = _state(model)
    total = faults.counts.get(call, 0)
    # fsync: every file and directory; syncfs: once for all of them (more than 32);
    # pwrite: every file (all written with O_DIRECT here)
    assert total == 1 if call == "syncfs" else total >= (20 if call in ("fsync", "pwrite") else 1)
    for n in range(1, total + 1):
        model.embedding.assign(np.full(model.embedding.shape, n, np.float32))
        faults.reset(**{call: n})
        with pytest.raises(OSError) as info:
            ckpt.save(f"{base}/ckpt", options=options)
        assert "injected fault" in str(info.value)
        faults.reset()
        assert int(ckpt.save_counter.numpy()) == 2
        _assert_directory(base, None, committed, with_optimizer=False, absent=(f"{base}/ckpt-3",))
        assert sorted(os.listdir(base)) == ["ckpt-1", "ckpt-2"]  # no temporary left behind


def test_local_state_file_that_cannot_be_replaced_loses_no_checkpoint(tmp_path, monkeypatch):
    faults = _OsFaults(monkeypatch)
    model = Model(seed=11)
    manager = zc.CheckpointManager(zc.Checkpoint(model=model), str(tmp_path), max_to_keep=2)
    manager.save(options=NO_FSYNC)
    faults.reset(replace=1)  # the state file's atomic replacement
    with pytest.warns(RuntimeWarning, match=r"ckpt-2 is saved, but .*could not be written"):
        path = manager.save(options=NO_FSYNC)
    faults.reset()
    assert _restored_state(path, None, False) == _state(model)
    assert _name(zc.latest_checkpoint(str(tmp_path))) == "ckpt-2"
    temporaries = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(temporaries) == 1  # the new state file, written but not moved into place
    assert zc.gc(str(tmp_path), older_than=0.0) == [str(tmp_path / temporaries[0])]
    manager.save(options=NO_FSYNC)
    manager.wait()
    state = json.loads((tmp_path / "zarrckpt_state.ckpt.json").read_text())
    assert [c["name"] for c in state["checkpoints"]] == ["ckpt-2", "ckpt-3"]


@pytest.mark.parametrize("call", ["rename", "unlink"])
def test_local_retention_with_each_failing_os_call(tmp_path, monkeypatch, call):
    faults = _OsFaults(monkeypatch)
    probe = zc.CheckpointManager(
        zc.Checkpoint(model=Model(seed=10)), str(tmp_path / "probe"), max_to_keep=2
    )
    probe.save(options=NO_FSYNC)
    faults.reset()
    probe.save(options=NO_FSYNC)  # a save without a retention pass
    probe.wait()
    save_calls = dict(faults.counts)
    faults.reset()
    zc.delete_checkpoint(str(tmp_path / "probe" / "ckpt-1"))  # what a retention pass does
    deletes = faults.counts.get(call, 0)
    assert deletes >= 1
    for n in range(1, deletes + 1):
        directory = str(tmp_path / f"run-{n}")
        model, manager, saved = _retention_setup(directory, None, seed=10)
        oldest, kept = list(saved)
        # Fail the Nth call of the retention pass: skip those the save itself makes.
        faults.reset(**{call: save_calls.get(call, 0) + n})
        newest = manager.save(options=NO_FSYNC)
        try:
            manager.wait()
        except OSError as exc:
            assert "injected fault" in str(exc)
        faults.reset()
        assert _restored_state(kept, None, False) == saved[kept]
        assert _restored_state(newest, None, False) == _state(model)
        infos = {c.name: c for c in zc.list_checkpoints(directory)}
        old = infos.get("ckpt-1")
        if old is not None and old.committed:
            assert _restored_state(oldest, None, False) == saved[oldest]
        else:
            assert old is None  # renamed away in one step: nothing half-listed
            with pytest.raises(CheckpointNotFoundError):
                zc.Checkpoint(model=Model(seed=1)).restore(oldest)
        zc.gc(directory, older_than=0.0)
        names = sorted(n_ for n_ in os.listdir(directory) if n_.startswith("."))
        assert names == [], names
        assert _name(zc.latest_checkpoint(directory)) == "ckpt-3"
