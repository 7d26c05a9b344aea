"""CheckpointManager: numbering, retention, intervals, restart, best-N, the state file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt.manager import STATE_FILE


def _model(value: float = 0.0) -> tuple[zc.Checkpoint, zc.AutoTrackable]:
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.full(4, value, np.float32))
    return zc.Checkpoint(model=model), model


def _names(paths: list[str]) -> list[str]:
    return [os.path.basename(p.rstrip("/")) for p in paths]


def _on_disk(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != STATE_FILE)


def test_max_to_keep_deletes_oldest_and_numbering_follows_the_counter(tmp_path):
    ckpt, model = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=2)
    paths = []
    for step in range(4):
        model.w.assign(np.full(4, step))
        paths.append(manager.save())
    manager.wait()
    assert _names(paths) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-4"]
    assert _names(manager.checkpoints) == ["ckpt-3", "ckpt-4"]
    assert _on_disk(tmp_path) == ["ckpt-3", "ckpt-4"]
    assert manager.latest_checkpoint == str(tmp_path / "ckpt-4")
    assert zc.latest_checkpoint(tmp_path) == str(tmp_path / "ckpt-4")
    fresh, fresh_model = _model(-1.0)
    fresh.restore(manager.latest_checkpoint).assert_consumed()
    np.testing.assert_array_equal(fresh_model.w.numpy(), np.full(4, 3.0))


def test_max_to_keep_none_keeps_everything(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=None)
    for _ in range(6):
        manager.save()
    manager.wait()
    assert len(_on_disk(tmp_path)) == 6 and len(manager.checkpoints) == 6


def test_new_manager_continues_numbering_and_retention(tmp_path):
    ckpt, _ = _model()
    first = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=3)
    for _ in range(3):
        first.save()
    first.wait()
    # A restarted job: fresh objects, counter not restored.
    again, _ = _model()
    second = zc.CheckpointManager(again, tmp_path, max_to_keep=3)
    assert _names(second.checkpoints) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert _names([second.save()]) == ["ckpt-4"]
    second.wait()
    assert _on_disk(tmp_path) == ["ckpt-2", "ckpt-3", "ckpt-4"]


def test_restore_or_initialize(tmp_path):
    calls = []
    ckpt, _ = _model(7.0)
    manager = zc.CheckpointManager(ckpt, tmp_path, init_fn=lambda: calls.append("init"))
    assert manager.restore_or_initialize() is None and calls == ["init"]
    saved = manager.save()
    restored_ckpt, restored = _model()
    resumed = zc.CheckpointManager(restored_ckpt, tmp_path, init_fn=lambda: calls.append("x"))
    assert resumed.restore_or_initialize() == saved
    assert calls == ["init"]
    np.testing.assert_array_equal(restored.w.numpy(), np.full(4, 7.0))
    assert int(restored_ckpt.save_counter.numpy()) == 1
    assert _names([resumed.save()]) == ["ckpt-2"]


def test_checkpoint_interval_with_step_counter(tmp_path):
    ckpt, _ = _model()
    step = zc.Variable(np.int64(0))
    manager = zc.CheckpointManager(
        ckpt, tmp_path, step_counter=step, checkpoint_interval=10, max_to_keep=None
    )
    saved = []
    for value in range(0, 35, 5):
        step.assign(value)
        saved.append(manager.save())
    assert [p is not None for p in saved] == [True, False, True, False, True, False, True]
    step.assign(31)
    assert manager.save() is None
    assert manager.save(check_interval=False) is not None


def test_checkpoint_number_argument(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, checkpoint_name="step")
    assert _names([manager.save(checkpoint_number=1000)]) == ["step-1000"]
    with pytest.raises(zc.errors.CheckpointExistsError):
        manager.save(checkpoint_number=1000)
    assert _names(manager.checkpoints) == ["step-1000"]


def test_keep_checkpoint_every_n_hours_preserves_old_ones(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=0.0)
    for _ in range(3):
        manager.save()
    manager.wait()
    # Every checkpoint is old enough to preserve: none is deleted, only the
    # latest is managed.
    assert _on_disk(tmp_path) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    assert _names(manager.checkpoints) == ["ckpt-3"]
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["preserved"] == ["ckpt-1", "ckpt-2"]
    restarted = zc.CheckpointManager(_model()[0], tmp_path, max_to_keep=1)
    assert _names(restarted.checkpoints) == ["ckpt-3"]  # preserved stay preserved


@pytest.mark.parametrize("best_fn", ["loss", lambda metrics: metrics["loss"]])
def test_best_n_by_metric_keeps_best_and_latest(tmp_path, best_fn):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=2, best_fn=best_fn, best_mode="min")
    for loss in [5.0, 1.0, 3.0, 0.5, 4.0, 6.0]:
        manager.save(metrics={"loss": loss})
    manager.wait()
    # best two: 0.5 (ckpt-4) and 1.0 (ckpt-2); latest: ckpt-6
    assert _on_disk(tmp_path) == ["ckpt-2", "ckpt-4", "ckpt-6"]
    restarted = zc.CheckpointManager(
        _model()[0], tmp_path, max_to_keep=2, best_fn=best_fn, best_mode="min"
    )
    restarted.save(metrics={"loss": 0.1})
    restarted.wait()
    assert _on_disk(tmp_path) == ["ckpt-4", "ckpt-7"]  # metrics survived the restart


def test_state_file_is_json_and_disagreement_follows_the_checkpoints(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=5)
    manager.save()
    manager.save()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["latest"] == str(tmp_path / "ckpt-2")
    assert [c["name"] for c in state["checkpoints"]] == ["ckpt-1", "ckpt-2"]
    # The state says ckpt-1 and ckpt-2, but ckpt-2 was deleted behind its back
    # and the state file is stale: the directory wins.
    zc.delete_checkpoint(tmp_path / "ckpt-2")
    restarted = zc.CheckpointManager(_model()[0], tmp_path)
    assert _names(restarted.checkpoints) == ["ckpt-1"]
    (tmp_path / STATE_FILE).write_text("{not json")
    assert _names(zc.CheckpointManager(_model()[0], tmp_path).checkpoints) == ["ckpt-1"]


def test_manager_validates_arguments(tmp_path):
    ckpt, _ = _model()
    with pytest.raises(ValueError, match="max_to_keep"):
        zc.CheckpointManager(ckpt, tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="step_counter"):
        zc.CheckpointManager(ckpt, tmp_path, checkpoint_interval=5)
    with pytest.raises(ValueError, match="best_mode"):
        zc.CheckpointManager(ckpt, tmp_path, best_mode="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="checkpoint_name"):
        zc.CheckpointManager(ckpt, tmp_path, checkpoint_name="a/b")
    with pytest.raises(TypeError, match="Checkpoint"):
        zc.CheckpointManager(zc.AutoTrackable(), tmp_path)  # type: ignore[arg-type]


def test_failed_save_does_not_consume_a_number(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path)
    manager.save()
    (tmp_path / "ckpt-2").mkdir()  # something is in the way
    with pytest.raises(zc.errors.CheckpointExistsError):
        manager.save()
    assert int(ckpt.save_counter.numpy()) == 1
    assert _names(manager.checkpoints) == ["ckpt-1"]


def test_list_checkpoints_reports_uncommitted_and_gc_removes_them(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path)
    manager.save()
    (tmp_path / "ckpt-9").mkdir()  # a dead writer's directory without _COMMIT
    (tmp_path / ".ckpt-2.zarrckpt-tmp-0123").mkdir()  # a local save killed mid-way
    infos = zc.list_checkpoints(tmp_path)
    assert [(i.name, i.committed) for i in infos] == [("ckpt-1", True), ("ckpt-9", False)]
    assert infos[0].nbytes > 0 and infos[1].nbytes == 0
    assert "committed" in str(infos[0])
    assert zc.gc(tmp_path, older_than=3600) == []  # too recent to be sure the writer is dead
    removed = zc.gc(tmp_path, older_than=0)
    assert sorted(os.path.basename(p) for p in removed) == [".ckpt-2.zarrckpt-tmp-0123", "ckpt-9"]
    assert _on_disk(tmp_path) == ["ckpt-1"]
    zc.Checkpoint(model=_model()[1]).restore(tmp_path / "ckpt-1").assert_consumed()


def test_gc_removes_a_state_file_replacement_cut_short(tmp_path):
    ckpt, _ = _model()
    zc.CheckpointManager(ckpt, tmp_path).save()
    temp = tmp_path / f"{STATE_FILE}.{'ab' * 16}.tmp"
    temp.write_text("{half")
    assert zc.gc(tmp_path, older_than=3600) == []
    assert zc.gc(tmp_path, older_than=0) == [str(temp)]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1", STATE_FILE]
