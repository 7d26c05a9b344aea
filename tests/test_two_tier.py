"""The two-tier manager: commit locally, copy to ``replicate_to`` in the background.

A copy is held at a known point by wrapping the manager's ``copy_checkpoint``
in a function that waits on an event before calling the real one.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import numpy as np
import pytest
from threaded_ranks import run_ranks

import zarrckpt as zc
import zarrckpt.manager as manager_module
from conftest import run_cli
from zarrckpt.errors import AsyncSaveError, InvalidArgumentError

KEY = "w/.ATTRIBUTES/VARIABLE_VALUE"


def model(value: float = 0.0) -> tuple[zc.Checkpoint, zc.Variable]:
    w = zc.Variable(np.full((256, 256), value, np.float32))
    return zc.Checkpoint(w=w), w


def names(directory: Any) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("ckpt-"))


def committed(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    return [info.name for info in zc.list_checkpoints(url, storage_options) if info.committed]


class HeldCopies:
    """Wraps the manager's copy_checkpoint: each copy waits until released; may fail once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail_first: bool = False) -> None:
        self.released = threading.Event()
        self.started: list[str] = []
        self.fail_first = fail_first
        real = manager_module.copy_checkpoint

        def copy(source: str, destination: str, **kwargs: Any) -> str:
            self.started.append(os.path.basename(destination))
            assert self.released.wait(30), "the copies were never released"
            if self.fail_first:
                self.fail_first = False
                raise OSError(104, "Connection reset by peer")
            return real(source, destination, **kwargs)

        monkeypatch.setattr(manager_module, "copy_checkpoint", copy)


def test_local_checkpoints_stay_until_their_remote_copy_is_committed(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    held = HeldCopies(monkeypatch)
    ckpt, w = model()
    manager = zc.CheckpointManager(
        ckpt, str(local), max_to_keep=1, replicate_to=str(remote), remote_max_to_keep=2
    )
    for step in range(1, 4):
        w.assign(np.full((256, 256), step, np.float32))
        manager.save()
    # Nothing copied yet: retention (max_to_keep=1) must not delete any local one.
    assert names(local) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert committed(str(remote)) == []
    assert "pending=3" in repr(manager)
    held.released.set()
    manager.wait_until_finished()
    assert names(local) == ["ckpt-3"]
    assert committed(str(remote)) == ["ckpt-2", "ckpt-3"]
    assert manager.remote_checkpoints == [str(remote / "ckpt-2"), str(remote / "ckpt-3")]
    assert held.started == ["ckpt-1", "ckpt-2", "ckpt-3"]
    for step in (2, 3):
        path = str(remote / f"ckpt-{step}")
        zc.verify(path)
        assert (zc.load_variable(path, KEY) == step).all()
    state = json.loads((local / "zarrckpt_state.ckpt.json").read_text())
    assert state["replicate_to"] == str(remote) and state["replicated"] == ["ckpt-3"]


def test_a_failed_copy_is_raised_kept_locally_and_copied_again(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    held = HeldCopies(monkeypatch, fail_first=True)
    held.released.set()
    ckpt, w = model(1.0)
    manager = zc.CheckpointManager(ckpt, str(local), max_to_keep=1, replicate_to=str(remote))
    first = manager.save()
    with pytest.raises(AsyncSaveError, match="Connection reset by peer") as caught:
        manager.wait_until_finished()
    assert "ckpt-1 is committed locally" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert committed(str(remote)) == []
    w.assign(np.full((256, 256), 2.0, np.float32))
    second = manager.save()
    manager.wait_until_finished()
    # ckpt-1 was copied after all (before ckpt-2), then both local ones could go but the last.
    assert committed(str(remote)) == ["ckpt-1", "ckpt-2"]
    assert names(local) == ["ckpt-2"]
    assert manager.latest_checkpoint == second
    assert (zc.load_variable(str(remote / "ckpt-1"), KEY) == 1).all()
    assert first == str(local / "ckpt-1")


def test_a_new_manager_copies_what_the_last_run_did_not(tmp_path: Any) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    ckpt, w = model()
    plain = zc.CheckpointManager(ckpt, str(local), max_to_keep=None)
    for step in range(1, 4):
        w.assign(np.full((256, 256), step, np.float32))
        plain.save()
    zc.copy_checkpoint(str(local / "ckpt-2"), str(remote / "ckpt-2"))
    manager = zc.CheckpointManager(
        zc.Checkpoint(w=zc.Variable(np.zeros((256, 256), np.float32))),
        str(local),
        max_to_keep=None,
        replicate_to=str(remote),
    )
    manager.wait_until_finished()
    # ckpt-1 is older than the newest remote copy (ckpt-2): superseded, not copied.
    assert committed(str(remote)) == ["ckpt-2", "ckpt-3"]
    assert (zc.load_variable(str(remote / "ckpt-3"), KEY) == 3).all()


def test_the_latest_checkpoint_of_either_tier_is_restored(tmp_path: Any) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    ckpt, _ = model(5.0)
    manager = zc.CheckpointManager(ckpt, str(local), replicate_to=str(remote))
    saved = manager.save()
    manager.wait_until_finished()
    assert committed(str(remote)) == ["ckpt-1"]
    assert manager.latest_checkpoint == saved  # both tiers have it: the local one
    # A new machine: the local directory is empty.
    fresh, fresh_w = model()
    other = zc.CheckpointManager(fresh, str(tmp_path / "new-local"), replicate_to=str(remote))
    assert other.latest_checkpoint == str(remote / "ckpt-1")
    assert other.restore_or_initialize() == str(remote / "ckpt-1")
    assert (fresh_w.numpy() == 5).all()
    assert other.save() == str(tmp_path / "new-local" / "ckpt-2")  # numbering goes on
    other.wait_until_finished()
    assert committed(str(remote)) == ["ckpt-1", "ckpt-2"]


def test_arguments_are_checked(tmp_path: Any) -> None:
    ckpt, _ = model()
    with pytest.raises(InvalidArgumentError, match="own directory"):
        zc.CheckpointManager(ckpt, str(tmp_path), replicate_to=str(tmp_path) + "/")
    with pytest.raises(InvalidArgumentError, match="need replicate_to"):
        zc.CheckpointManager(ckpt, str(tmp_path), remote_max_to_keep=3)
    with pytest.raises(InvalidArgumentError, match="remote_max_to_keep"):
        zc.CheckpointManager(ckpt, str(tmp_path), replicate_to="memory://r", remote_max_to_keep=0)


def test_async_saves_to_s3_and_ls_shows_both_tiers(
    tmp_path: Any, s3_url: str, s3_storage_options: dict[str, Any], capsys: Any
) -> None:
    local = tmp_path / "local"
    remote = f"{s3_url}/run"
    ckpt, w = model()
    manager = zc.CheckpointManager(
        ckpt,
        str(local),
        max_to_keep=1,
        enable_async=True,
        replicate_to=remote,
        replicate_storage_options=s3_storage_options,
        remote_max_to_keep=2,
    )
    for step in range(1, 4):
        w.assign(np.full((256, 256), step, np.float32))
        manager.save()
        w.numpy()[...] = -1  # after save() returned: not in the checkpoint
    manager.wait_until_finished()
    assert committed(remote, s3_storage_options) == ["ckpt-2", "ckpt-3"]
    assert names(local) == ["ckpt-3"]
    zc.verify(f"{remote}/ckpt-3", storage_options=s3_storage_options)
    stored = zc.load_variable(f"{remote}/ckpt-3", KEY, storage_options=s3_storage_options)
    assert (stored == 3).all()
    code, out, _ = run_cli(
        capsys,
        "ls",
        str(local),
        "--remote-storage-options",
        json.dumps(s3_storage_options),
    )
    assert code == 0
    lines = out.splitlines()
    assert "remote" in lines[0]
    assert lines[1].split()[-2:] == ["copied", str(local / "ckpt-3")]
    assert lines[2] == f"remote tier of 'ckpt': {remote}: 2 committed"
    assert lines[3].endswith(f"{remote}/ckpt-2") and lines[4].endswith(f"{remote}/ckpt-3")
    code, out, _ = run_cli(
        capsys,
        "ls",
        str(local),
        "--json",
        "--remote-storage-options",
        json.dumps(s3_storage_options),
    )
    document = json.loads(out)
    assert document["checkpoints"][0]["remote"] == "copied"
    (tier,) = document["replication"]
    assert tier["replicate_to"] == remote and tier["replicated"] == ["ckpt-3"]
    assert [c["name"] for c in tier["remote"]] == ["ckpt-2", "ckpt-3"]
    # Without the remote's credentials, ls says it cannot list it and lists the local tier.
    code, out, err = run_cli(capsys, "ls", str(local))
    assert code == 0, err and "cannot list" in out and "--remote-storage-options" in out


def test_ranks_save_locally_and_rank_0_copies(tmp_path: Any) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"

    def work(coordinator: Any) -> Any:
        rank = coordinator.rank
        block = zc.Variable.sharded(np.full((4, 8), rank, np.int64), (12, 8), (4 * rank, 0))
        manager = zc.CheckpointManager(
            zc.Checkpoint(w=block),
            str(local),
            max_to_keep=1,
            replicate_to=str(remote),
            enable_async=True,
            coordinator=coordinator,
            options=zc.CheckpointOptions(fsync=False),
        )
        for step in range(2):
            block.assign(np.full((4, 8), 10 * step + rank, np.int64))
            manager.save()
        manager.wait_until_finished()
        return manager.latest_checkpoint

    results = run_ranks(3, work)
    assert results == [str(local / "ckpt-2")] * 3, results
    assert committed(str(remote)) == ["ckpt-1", "ckpt-2"]
    stored = zc.load_variable(str(remote / "ckpt-2"), KEY)
    np.testing.assert_array_equal(stored[:, 0], np.repeat([10, 11, 12], 4))
    assert names(local) == ["ckpt-2"]
