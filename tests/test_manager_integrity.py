"""One bad checkpoint must never stop training.

A CheckpointManager orders checkpoints by number (never by a clock), steps over
a damaged newest checkpoint without ever deleting it, names another writer of
the same checkpoint name, removes its own stale leftovers on start, and starts
whatever its state file holds. A save whose files vanish before it commits
fails; a reader racing a delete gets CheckpointNotFoundError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import zarrckpt as zc
import zarrckpt._commit
import zarrckpt.directory
import zarrckpt.manager
from tests.conftest import deadline, reseal_manifest
from zarrckpt import errors
from zarrckpt._commit import COMMIT_KEY, Manifest
from zarrckpt.cli import main
from zarrckpt.directory import state_file_name

STATE_FILE = state_file_name("ckpt")
MiB = 1 << 20
SMALL_CHUNKS = zc.CheckpointOptions(chunk_bytes=16)  # 16 float32 values: 4 chunks


# Helpers ------------------------------------------------------------------------------


def _model(value: float = 0.0, n: int = 4) -> tuple[zc.Checkpoint, zc.AutoTrackable]:
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.full(n, value, np.float32))
    return zc.Checkpoint(model=model), model


def _set(model: zc.AutoTrackable, value: float) -> None:
    model.w.assign(np.full(model.w.shape, value, np.float32))


def _names(paths: list[str | None]) -> list[str]:
    return [posixpath.basename(str(p).rstrip("/").replace(os.sep, "/")) for p in paths]


def _is_local(url: str) -> bool:
    return "://" not in url


def _join(directory: str, name: str) -> str:
    """A path inside ``directory`` spelled as the manager spells the paths it returns."""
    return os.path.join(directory, name) if _is_local(directory) else f"{directory}/{name}"


def _run_dir(backend: tuple[str, dict[str, Any] | None]) -> tuple[str, dict[str, Any] | None]:
    base, storage_options = backend
    return _join(base, "run"), storage_options


def _fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()
    return fs, root.rstrip("/")


def _committed(directory: str, storage_options: dict[str, Any] | None) -> list[str]:
    return [c.name for c in zc.list_checkpoints(directory, storage_options) if c.committed]


def _snapshot(path: str, storage_options: dict[str, Any] | None) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes)."""
    fs, root = _fs(path, storage_options)
    return {name[len(root) :]: fs.cat_file(name) for name in fs.find(root)}


def _set_commit_time(path: str, storage_options: dict[str, Any] | None, created: float) -> None:
    """Forge the commit time in ``path``'s ``_COMMIT`` (with a correct seal)."""
    if _is_local(path):
        reseal_manifest(path, created=created)
        return
    fs, root = _fs(path, storage_options)
    marker = f"{root}/{COMMIT_KEY}"
    manifest = Manifest.decode(fs.cat_file(marker), where=marker)
    fs.pipe_file(marker, dataclasses.replace(manifest, created=created).encode())


def _restored_value(path: str, storage_options: dict[str, Any] | None) -> np.ndarray:
    return zc.load_variable(path, "model/w", storage_options=storage_options)


# 1. Ordered by number, never by the commit time --------------------------------------


def test_a_newest_checkpoint_with_an_older_commit_time_is_still_the_latest(backend):
    directory, so = _run_dir(backend)
    ckpt, model = _model(1.0)
    first = zc.CheckpointManager(ckpt, directory, max_to_keep=None, storage_options=so)
    first.save()
    _set(model, 2.0)
    first.save()
    ckpt1, ckpt2 = _join(directory, "ckpt-1"), _join(directory, "ckpt-2")
    _set_commit_time(ckpt2, so, 1000.0)  # ckpt-2 claims to be from 1970
    times = {c.name: c.created for c in zc.list_checkpoints(directory, so)}
    assert times["ckpt-2"] == 1000.0 < times["ckpt-1"]

    assert zc.latest_checkpoint(directory, so) == ckpt2
    assert zc.latest_checkpoint(directory, so, checkpoint_name="ckpt") == ckpt2
    fresh, fresh_model = _model(-1.0)
    manager = zc.CheckpointManager(fresh, directory, max_to_keep=2, storage_options=so)
    assert manager.checkpoints == [ckpt1, ckpt2]
    assert manager.latest_checkpoint == ckpt2
    assert manager.restore_or_initialize() == ckpt2
    np.testing.assert_array_equal(fresh_model.w.numpy(), np.full(4, 2.0))
    assert _names([manager.save()]) == ["ckpt-3"]
    manager.wait()
    # Retention deletes the lowest number, never the (time-wise "oldest") newest.
    assert _committed(directory, so) == ["ckpt-2", "ckpt-3"]
    assert manager.checkpoints == [ckpt2, _join(directory, "ckpt-3")]
    np.testing.assert_array_equal(_restored_value(ckpt2, so), np.full(4, 2.0))


def test_a_host_whose_clock_is_ten_minutes_behind_never_loses_its_checkpoint(backend, monkeypatch):
    directory, so = _run_dir(backend)
    ckpt, model = _model(1.0)
    host_a = zc.CheckpointManager(ckpt, directory, max_to_keep=3, storage_options=so)
    host_a.save()
    _set(model, 2.0)
    host_a.save()

    real_time = time.time
    behind = types.SimpleNamespace(time=lambda: real_time() - 600.0)
    with monkeypatch.context() as patch:  # the job resumes on a host 10 minutes behind
        for module in (zarrckpt._commit, zarrckpt.manager, zarrckpt.directory):
            patch.setattr(module, "time", behind)
        resumed, resumed_model = _model(-1.0)
        host_b = zc.CheckpointManager(resumed, directory, max_to_keep=3, storage_options=so)
        assert host_b.restore_or_initialize() == _join(directory, "ckpt-2")
        _set(resumed_model, 3.0)
        assert _names([host_b.save()]) == ["ckpt-3"]
        host_b.wait()
    times = {c.name: c.created for c in zc.list_checkpoints(directory, so)}
    assert times["ckpt-3"] < times["ckpt-1"] < times["ckpt-2"]  # the clocks disagree

    ckpt3 = _join(directory, "ckpt-3")
    assert zc.latest_checkpoint(directory, so) == ckpt3
    again, again_model = _model(-1.0)
    host_a2 = zc.CheckpointManager(again, directory, max_to_keep=3, storage_options=so)
    assert host_a2.latest_checkpoint == ckpt3
    assert host_a2.restore_or_initialize() == ckpt3
    np.testing.assert_array_equal(again_model.w.numpy(), np.full(4, 3.0))
    assert _names([host_a2.save()]) == ["ckpt-4"]
    host_a2.wait()
    assert _committed(directory, so) == ["ckpt-2", "ckpt-3", "ckpt-4"]


# 2. A damaged _COMMIT in the newest checkpoint --------------------------------------


def _flip_a_bit(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x08]) + data[middle + 1 :]


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[:-1],
    "bit-flipped": _flip_a_bit,
    "garbage": lambda data: b"\x00\xffthis is not a manifest\x80" * 4,
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_is_skipped_never_reused_never_deleted(backend, damage, capsys):
    directory, so = _run_dir(backend)
    ckpt, model = _model()
    writer = zc.CheckpointManager(ckpt, directory, max_to_keep=None, storage_options=so)
    for value in (1.0, 2.0, 3.0):
        _set(model, value)
        writer.save()
    ckpt2, ckpt3 = _join(directory, "ckpt-2"), _join(directory, "ckpt-3")
    fs, root = _fs(ckpt3, so)
    marker = f"{root}/{COMMIT_KEY}"
    fs.pipe_file(marker, DAMAGES[damage](fs.cat_file(marker)))
    before = _snapshot(ckpt3, so)

    fresh, fresh_model = _model(-1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = zc.CheckpointManager(fresh, directory, max_to_keep=2, storage_options=so)
    assert manager.latest_checkpoint == ckpt2
    assert manager.restore_or_initialize() == ckpt2
    np.testing.assert_array_equal(fresh_model.w.numpy(), np.full(4, 2.0))
    saved = []
    for value in range(4, 9):  # before the fix, every one raised CheckpointExistsError
        _set(fresh_model, float(value))
        saved.append(manager.save())
    manager.wait()
    assert _names(saved) == ["ckpt-4", "ckpt-5", "ckpt-6", "ckpt-7", "ckpt-8"]
    assert _committed(directory, so) == ["ckpt-7", "ckpt-8"]
    assert manager.latest_checkpoint == _join(directory, "ckpt-8")
    np.testing.assert_array_equal(_restored_value(saved[-1], so), np.full(4, 8.0))
    zc.gc(directory, 0, so)  # nor by gc: not zarrckpt's to judge
    assert _snapshot(ckpt3, so) == before  # never deleted, not a byte changed

    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1, warned
    assert ckpt3 in warned[0] and "cannot be read" in warned[0]

    infos = {c.name: c for c in zc.list_checkpoints(directory, so)}
    assert sorted(infos) == ["ckpt-3", "ckpt-7", "ckpt-8"]
    damaged = infos["ckpt-3"]
    assert (damaged.committed, damaged.state, damaged.nbytes) == (False, "DAMAGED", 0)
    assert "_COMMIT" in damaged.damage and damaged.path == ckpt3
    assert infos["ckpt-8"].state == "committed" and infos["ckpt-8"].damage == ""

    capsys.readouterr()
    options = ["--storage-options", json.dumps(so)] if so else []
    assert main([*options, "ls", directory]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[-1]: line for line in out.splitlines()[1:]}
    assert "DAMAGED" in rows[ckpt3] and "committed" in rows[_join(directory, "ckpt-8")]
    assert f"damaged: {ckpt3}" in err


def test_a_damaged_only_checkpoint_initializes_and_saves_after_it(tmp_path):
    directory = str(tmp_path / "run")
    ckpt, _ = _model(1.0)
    path = zc.CheckpointManager(ckpt, directory).save()
    Path(path, COMMIT_KEY).write_bytes(b"")  # emptied by a full disk, say
    calls = []
    fresh, _ = _model(-1.0)
    with pytest.warns(RuntimeWarning, match=re.escape(path)):
        manager = zc.CheckpointManager(fresh, directory, init_fn=lambda: calls.append("init"))
    assert manager.latest_checkpoint is None and manager.checkpoints == []
    assert manager.restore_or_initialize() is None and calls == ["init"]
    assert _names([manager.save()]) == ["ckpt-2"]
    assert zc.latest_checkpoint(directory) == _join(directory, "ckpt-2")
    assert [(c.name, c.state) for c in zc.list_checkpoints(directory)] == [
        ("ckpt-1", "DAMAGED"),
        ("ckpt-2", "committed"),
    ]


# 3. Two writers of one name in one directory -----------------------------------------


def test_a_second_manager_of_the_same_name_in_this_process_is_named(backend):
    directory, so = _run_dir(backend)
    winner_ckpt, winner_model = _model(1.0)
    loser_ckpt, _ = _model(9.0)
    winner = zc.CheckpointManager(winner_ckpt, directory, storage_options=so)
    loser = zc.CheckpointManager(loser_ckpt, directory, storage_options=so)
    path = winner.save()
    before = _snapshot(path, so)

    with pytest.raises(errors.CheckpointExistsError) as raised:
        loser.save()
    message = str(raised.value)
    assert f"another CheckpointManager in this process (pid {os.getpid()})" in message
    assert directory in message and path in message
    assert isinstance(raised.value, errors.ConcurrentWriterError)

    assert _snapshot(path, so) == before
    assert winner.checkpoints == [path] and _committed(directory, so) == ["ckpt-1"]
    np.testing.assert_array_equal(_restored_value(path, so), np.full(4, 1.0))
    _set(winner_model, 2.0)
    assert _names([winner.save()]) == ["ckpt-2"]  # the winner goes on


CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import zarrckpt as zc
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.full(4, 5.0, np.float32))
    path = zc.CheckpointManager(zc.Checkpoint(model=model), sys.argv[1]).save()
    print(os.getpid(), path)
    """
)


def test_a_second_writer_in_another_process_is_named_with_pid_and_host(tmp_path):
    directory = str(tmp_path / "run")
    ckpt, _ = _model(1.0)
    ours = zc.CheckpointManager(ckpt, directory)  # starts before the other writer saves
    child = subprocess.run(
        [sys.executable, "-c", CHILD, directory],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    child_pid, child_path = child.stdout.split()
    assert int(child_pid) != os.getpid() and child_path == _join(directory, "ckpt-1")
    before = _snapshot(child_path, None)

    with pytest.raises(errors.CheckpointExistsError) as raised:
        ours.save()
    message = str(raised.value)
    assert f"process {child_pid} on host {socket.gethostname()}" in message
    assert "in this process" not in message
    assert directory in message and child_path in message
    assert isinstance(raised.value, errors.ConcurrentWriterError)
    assert _snapshot(child_path, None) == before
    np.testing.assert_array_equal(_restored_value(child_path, None), np.full(4, 5.0))


# 4. Stale leftovers removed on start -------------------------------------------------


def _leftover(directory: Path, name: str, files: dict[str, int], age: float | None) -> str:
    """A leftover directory holding ``files`` (relative name -> size), ``age`` seconds old."""
    top = directory / name
    for relative, size in files.items():
        (top / relative).parent.mkdir(parents=True, exist_ok=True)
        (top / relative).write_bytes(bytes(size))
    if age is not None:
        stamp = time.time() - age
        for parent, dirs, names in os.walk(top):
            for entry in [*dirs, *names]:
                os.utime(os.path.join(parent, entry), (stamp, stamp))
        os.utime(top, (stamp, stamp))
    return name


def _old_file(directory: Path, name: str) -> str:
    """A state file replacement cut short two hours ago."""
    (directory / name).write_text('{"format": 1, "checkp')
    stamp = time.time() - 7200
    os.utime(directory / name, (stamp, stamp))
    return name


def _local_leftovers(directory: Path) -> dict[str, list[str]]:
    chunk = "model/w/.ATTRIBUTES/VARIABLE_VALUE/c.0"
    return {
        "stale": [
            _leftover(
                directory,
                f".ckpt-7.zarrckpt-tmp-{uuid.uuid4().hex}",
                {chunk: 3 * MiB, "model/zarr.json": 100},
                age=7200,
            ),
            _leftover(
                directory,
                f".ckpt-2.zarrckpt-deleting-{uuid.uuid4().hex}",
                {"_COMMIT": 60, "object_graph.msgpack": 40},
                age=7200,
            ),
            _old_file(directory, f"{STATE_FILE}.{uuid.uuid4().hex}.tmp"),
        ],
        "kept": [
            _leftover(directory, f".ckpt-8.zarrckpt-tmp-{uuid.uuid4().hex}", {chunk: 10}, None),
            _old_file(directory, f"{state_file_name('best')}.{uuid.uuid4().hex}.tmp"),
            _leftover(directory, f".best-7.zarrckpt-tmp-{uuid.uuid4().hex}", {chunk: 10}, 7200),
            _leftover(
                directory, f".ckpt-best-3.zarrckpt-deleting-{uuid.uuid4().hex}", {chunk: 10}, 7200
            ),
        ],
    }


def test_a_manager_removes_its_own_stale_leftovers_on_start_and_logs_them(tmp_path, caplog):
    directory = tmp_path / "run"
    ckpt, _ = _model(1.0)
    path = zc.CheckpointManager(ckpt, directory).save()
    leftovers = _local_leftovers(directory)

    with caplog.at_level(logging.INFO, logger="zarrckpt"):
        manager = zc.CheckpointManager(_model()[0], directory)
    assert sorted(os.listdir(directory)) == sorted([*leftovers["kept"], "ckpt-1", STATE_FILE])
    records = [r for r in caplog.records if r.name == "zarrckpt"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "removed 3 leftovers" in message and "3.0 MiB" in message and "3600 s" in message
    assert all(name in message for name in leftovers["stale"])
    assert not any(name in message for name in leftovers["kept"])
    assert manager.checkpoints == [path]
    np.testing.assert_array_equal(_restored_value(path, None), np.full(4, 1.0))


def test_gc_older_than_none_removes_nothing(tmp_path, caplog):
    directory = tmp_path / "run"
    ckpt, _ = _model(1.0)
    path = zc.CheckpointManager(ckpt, directory, gc_older_than=None).save()
    leftovers = _local_leftovers(directory)
    with caplog.at_level(logging.INFO, logger="zarrckpt"):
        manager = zc.CheckpointManager(_model()[0], directory, gc_older_than=None)
    everything = [*leftovers["stale"], *leftovers["kept"], "ckpt-1", STATE_FILE]
    assert sorted(os.listdir(directory)) == sorted(everything)
    assert [r for r in caplog.records if r.name == "zarrckpt"] == []
    assert manager.checkpoints == [path]


def test_a_leftover_removed_by_someone_else_meanwhile_never_stops_a_manager(tmp_path, monkeypatch):
    directory = str(tmp_path / "run")
    path = zc.CheckpointManager(_model(1.0)[0], directory).save()
    listed = zarrckpt.directory._entries
    gone = f".ckpt-9.zarrckpt-deleting-{uuid.uuid4().hex}"

    def listing_then_removed(fs: Any, root: str) -> list[tuple[str, bool]]:
        # The leftover was there when the directory was listed and is gone now.
        return [*listed(fs, root), (gone, True)] if root == directory else listed(fs, root)

    monkeypatch.setattr(zarrckpt.directory, "_entries", listing_then_removed)
    manager = zc.CheckpointManager(_model()[0], directory, gc_older_than=0)
    assert manager.checkpoints == [path]


def test_a_manager_removes_stale_attempts_on_s3(s3_url, s3_storage_options, caplog):
    so = s3_storage_options
    directory = f"{s3_url}/run"
    ckpt, _ = _model(1.0)
    path = zc.CheckpointManager(ckpt, directory, storage_options=so).save()
    before = _snapshot(path, so)
    fs, root = _fs(directory, so)
    chunk = "model/w/.ATTRIBUTES/VARIABLE_VALUE/c.0"
    dead = f"{root}/ckpt-7/attempt-{uuid.uuid4().hex}"  # a writer that died
    fs.pipe_file(f"{dead}/{chunk}", bytes(MiB))
    fs.pipe_file(f"{dead}/zarr.json", b"{}")
    lost = f"{root}/ckpt-1/attempt-{uuid.uuid4().hex}"  # a writer that lost the race
    fs.pipe_file(f"{lost}/{chunk}", bytes(100))
    other = f"{root}/best-7/attempt-{uuid.uuid4().hex}"  # another name's: not ours
    fs.pipe_file(f"{other}/{chunk}", bytes(100))

    with caplog.at_level(logging.INFO, logger="zarrckpt"):
        manager = zc.CheckpointManager(_model()[0], directory, storage_options=so, gc_older_than=0)
    fs.invalidate_cache()
    assert fs.find(f"{root}/ckpt-7") == []
    assert fs.find(lost) == []
    assert fs.find(other) == [f"{other}/{chunk}"]
    assert _snapshot(path, so) == before
    assert manager.checkpoints == [path]
    np.testing.assert_array_equal(_restored_value(path, so), np.full(4, 1.0))
    message = " ".join(r.getMessage() for r in caplog.records if r.name == "zarrckpt")
    assert "removed 2 leftovers" in message and "1.0 MiB" in message
    assert "/ckpt-7/attempt-" in message and "best-7" not in message


# 5. A save whose files vanish before it commits --------------------------------------


def _files_of_one_save(manager: zc.CheckpointManager) -> int:
    """Save once with a counting progress callback: how many files a save writes."""
    calls: list[int] = []
    manager.save(options=dataclasses.replace(SMALL_CHUNKS, progress=calls.append))
    return len(calls)


def _after_last_file(count: int, act: Callable[[], None]) -> zc.CheckpointOptions:
    """Options whose progress callback runs ``act`` once the ``count``-th file is written."""
    seen: list[int] = []
    lock = threading.Lock()

    def progress(nbytes: int) -> None:
        with lock:
            seen.append(nbytes)
            last = len(seen) == count
        if last:
            act()

    return dataclasses.replace(SMALL_CHUNKS, progress=progress)


def _in_progress_root(directory: str, so: dict[str, Any] | None, name: str) -> str:
    """Where the save of checkpoint ``name`` is writing now (temp dir or attempt prefix)."""
    if _is_local(directory):
        (temp,) = [n for n in os.listdir(directory) if n.startswith(f".{name}.zarrckpt-tmp-")]
        return os.path.join(directory, temp)
    fs, root = _fs(_join(directory, name), so)
    (attempt,) = {p[len(root) + 1 :].split("/")[0] for p in fs.find(root)}
    assert attempt.startswith("attempt-")
    return f"{root}/{attempt}"


def _assert_nothing_committed_for_ckpt2(
    manager: zc.CheckpointManager, directory: str, so: dict[str, Any] | None, first: str
) -> None:
    assert _committed(directory, so) == ["ckpt-1"]
    assert zc.latest_checkpoint(directory, so) == first
    assert manager.latest_checkpoint == first and manager.checkpoints == [first]
    if _is_local(directory):
        assert sorted(os.listdir(directory)) == ["ckpt-1", STATE_FILE]  # temp dir removed
    else:
        fs, root = _fs(_join(directory, "ckpt-2"), so)
        assert fs.find(root) == []  # the attempt removed


def test_a_save_whose_chunk_vanishes_before_commit_fails_and_commits_nothing(backend):
    directory, so = _run_dir(backend)
    ckpt, model = _model(1.0, n=16)
    manager = zc.CheckpointManager(ckpt, directory, max_to_keep=None, storage_options=so)
    count = _files_of_one_save(manager)
    first = _join(directory, "ckpt-1")
    victim = "model/w/.ATTRIBUTES/VARIABLE_VALUE/c.2"

    def gc_runs() -> None:  # what `zarrckpt gc` does to a save paused too long
        fs, _ = _fs(directory, so)
        fs.rm_file(f"{_in_progress_root(directory, so, 'ckpt-2')}/{victim}")

    _set(model, 2.0)
    with pytest.raises(errors.ZarrckptError) as raised:
        manager.save(options=_after_last_file(count, gc_runs))
    assert isinstance(raised.value, errors.IncompleteSaveError)
    assert f"{victim} (missing" in str(raised.value)
    assert "Nothing was committed" in str(raised.value)
    _assert_nothing_committed_for_ckpt2(manager, directory, so, first)
    np.testing.assert_array_equal(_restored_value(first, so), np.full(16, 1.0))

    assert _names([manager.save(options=SMALL_CHUNKS)]) == ["ckpt-2"]  # the next save works
    np.testing.assert_array_equal(_restored_value(_join(directory, "ckpt-2"), so), 2.0)


def test_a_save_whose_whole_temporary_directory_vanishes_fails(tmp_path):
    directory = str(tmp_path / "run")
    ckpt, model = _model(1.0, n=16)
    manager = zc.CheckpointManager(ckpt, directory, max_to_keep=None)
    count = _files_of_one_save(manager)
    first = _join(directory, "ckpt-1")

    def gc_runs() -> None:
        shutil.rmtree(_in_progress_root(directory, None, "ckpt-2"))

    _set(model, 2.0)
    with pytest.raises(errors.ZarrckptError) as raised:
        manager.save(options=_after_last_file(count, gc_runs))
    assert isinstance(raised.value, errors.IncompleteSaveError)
    message = str(raised.value)
    assert "vanished" in message and "Nothing was committed" in message
    _assert_nothing_committed_for_ckpt2(manager, directory, None, first)
    assert _names([manager.save(options=SMALL_CHUNKS)]) == ["ckpt-2"]


# 6. A reader losing a race with deletion ---------------------------------------------


def _read(reader: str, path: str, so: dict[str, Any] | None, progress: Callable[[int], None]):
    options = zc.CheckpointOptions(threads=1, progress=progress)
    if reader == "load_variable":
        return zc.load_variable(path, "model/w", storage_options=so, options=options)
    ckpt, _ = _model(-1.0, n=16)
    return ckpt.restore(path, options=options, storage_options=so)


def _once(action: Callable[[], None]) -> tuple[Callable[[int], None], list[int]]:
    calls: list[int] = []

    def progress(nbytes: int) -> None:
        calls.append(nbytes)
        if len(calls) == 1:
            action()

    return progress, calls


@pytest.mark.parametrize("reader", ["load_variable", "restore"])
def test_a_reader_racing_a_delete_gets_checkpoint_not_found(backend, reader):
    directory, so = _run_dir(backend)
    ckpt, model = _model(n=16)
    model.w.assign(np.arange(16, dtype=np.float32))
    path = ckpt.write(_join(directory, "ckpt-1"), options=SMALL_CHUNKS, storage_options=so)
    progress, calls = _once(lambda: zc.delete_checkpoint(path, so))
    with pytest.raises(errors.CheckpointNotFoundError) as raised:
        _read(reader, path, so, progress)
    assert "deleted or replaced while it was being read" in str(raised.value)
    assert path in str(raised.value)
    assert not isinstance(raised.value, errors.MissingChunkError)
    assert len(calls) == 1  # one chunk was read, the rest had gone
    assert zc.list_checkpoints(directory, so) == []


def test_a_reader_racing_the_managers_retention_gets_checkpoint_not_found(backend):
    directory, so = _run_dir(backend)
    ckpt, _ = _model(n=16)
    manager = zc.CheckpointManager(
        ckpt, directory, max_to_keep=1, storage_options=so, options=SMALL_CHUNKS
    )
    path = manager.save()

    def training_goes_on() -> None:  # the next save's retention deletes ckpt-1
        manager.save()
        manager.wait()

    progress, calls = _once(training_goes_on)
    with pytest.raises(errors.CheckpointNotFoundError, match="deleted or replaced while"):
        _read("load_variable", path, so, progress)
    assert len(calls) == 1
    assert _committed(directory, so) == ["ckpt-2"]


@pytest.mark.parametrize("reader", ["load_variable", "restore"])
def test_a_reader_racing_a_delete_and_a_new_save_never_mixes_values(tmp_path, reader):
    directory = str(tmp_path / "run")
    ckpt, model = _model(n=16)
    model.w.assign(np.arange(16, dtype=np.float32))
    path = ckpt.write(_join(directory, "ckpt-1"), options=SMALL_CHUNKS)
    other, other_model = _model(n=16)
    other_model.w.assign(np.arange(100, 116, dtype=np.float32))

    def replace() -> None:
        zc.delete_checkpoint(path)
        other.write(path, options=SMALL_CHUNKS)

    progress, calls = _once(replace)
    with pytest.raises(errors.CheckpointNotFoundError, match="deleted or replaced"):
        _read(reader, path, None, progress)
    assert len(calls) == 1
    # The path now holds the other checkpoint, whole.
    np.testing.assert_array_equal(_restored_value(path, None), np.arange(100, 116))


# 7. A damaged state file ---------------------------------------------------------------


def _with(**changes: Any) -> Callable[[dict[str, Any]], bytes]:
    return lambda state: json.dumps({**state, **changes}).encode()


STATE_DAMAGES: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "preserved-nested-list": _with(preserved=[[1]]),
    "preserved-null": _with(preserved=None),
    "preserved-number": _with(preserved=5),
    "timestamp-string": _with(last_preserved_timestamp="x"),
    "timestamp-nan": _with(last_preserved_timestamp=float("nan")),
    "checkpoints-mapping": _with(checkpoints={"a": 1}),
    "deeply-nested": lambda state: b"[" * 100_000 + b"]" * 100_000,
    "binary-garbage": lambda state: b"\xff\xfe\x00\x80garbage\x00" * 64,
}


@pytest.mark.parametrize("damage", [*STATE_DAMAGES, "directory", "fifo"])
def test_a_damaged_state_file_never_stops_a_manager(tmp_path, damage):
    directory = tmp_path / "run"
    ckpt, model = _model(1.0)
    writer = zc.CheckpointManager(ckpt, directory, max_to_keep=3)
    writer.save()
    _set(model, 2.0)
    writer.save()
    state = directory / STATE_FILE
    if damage == "directory":
        state.unlink()
        (state / "inside").mkdir(parents=True)
    elif damage == "fifo":
        state.unlink()
        os.mkfifo(state)
    else:
        state.write_bytes(STATE_DAMAGES[damage](json.loads(state.read_text())))

    fresh, fresh_model = _model(-1.0)
    with deadline(20), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a state file that cannot be rewritten
        manager = zc.CheckpointManager(fresh, directory, max_to_keep=3)
        assert _names(manager.checkpoints) == ["ckpt-1", "ckpt-2"]
        assert manager.restore_or_initialize() == str(directory / "ckpt-2")
        np.testing.assert_array_equal(fresh_model.w.numpy(), np.full(4, 2.0))
        assert _names([manager.save()]) == ["ckpt-3"]
        manager.wait()
    assert _committed(str(directory), None) == ["ckpt-1", "ckpt-2", "ckpt-3"]


def test_a_state_file_with_a_huge_integer_timestamp_never_stops_a_manager(tmp_path):
    directory = tmp_path / "run"
    zc.CheckpointManager(_model(1.0)[0], directory).save()
    state = directory / STATE_FILE
    text = state.read_text()
    damaged = re.sub(r'("last_preserved_timestamp": )[^,\n}]+', r"\g<1>1" + "0" * 400, text)
    assert damaged != text
    state.write_text(damaged)
    manager = zc.CheckpointManager(_model()[0], directory)
    assert _names(manager.checkpoints) == ["ckpt-1"]
    assert _names([manager.save()]) == ["ckpt-2"]


def test_a_nan_preservation_time_never_ends_keep_checkpoint_every_n_hours(tmp_path):
    directory = tmp_path / "run"
    ckpt, _ = _model()
    writer = zc.CheckpointManager(ckpt, directory, max_to_keep=1, keep_checkpoint_every_n_hours=0)
    for _ in range(3):
        writer.save()
    writer.wait()
    state = directory / STATE_FILE
    state.write_bytes(_with(last_preserved_timestamp=float("nan"))(json.loads(state.read_text())))
    assert '"last_preserved_timestamp": NaN' in state.read_text()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restarted = zc.CheckpointManager(
            _model()[0], directory, max_to_keep=1, keep_checkpoint_every_n_hours=0
        )
    restarted.save()
    restarted.save()
    restarted.wait()
    # Every checkpoint is old enough to preserve after 0 hours: none is ever deleted.
    assert _committed(str(directory), None) == [f"ckpt-{n}" for n in range(1, 6)]
    assert _names(restarted.checkpoints) == ["ckpt-5"]
    assert any("missing or damaged" in str(w.message) for w in caught)
