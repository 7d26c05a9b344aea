"""CheckpointManager: numbering, retention, intervals, restart, best-N, the state file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt.directory import state_file_name

STATE_FILE = state_file_name("ckpt")


def _model(value: float = 0.0) -> tuple[zc.Checkpoint, zc.AutoTrackable]:
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.full(4, value, np.float32))
    return zc.Checkpoint(model=model), model


def _names(paths: list[str]) -> list[str]:
    return [os.path.basename(p.rstrip("/")) for p in paths]


def _on_disk(directory: Path) -> list[str]:
    """The checkpoint directories (every name but the state files)."""
    return sorted(n for n in os.listdir(directory) if not n.startswith("zarrckpt_state."))


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


def test_metrics_live_in_the_manifests_so_a_lost_state_file_loses_no_best(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=2, best_fn="acc")
    for acc in [0.5, 0.95, 0.7, 0.6]:
        manager.save(metrics={"acc": acc, "step": 10})
    manager.wait()
    assert _on_disk(tmp_path) == ["ckpt-2", "ckpt-3", "ckpt-4"]  # best two and the latest
    infos = {i.name: i for i in zc.list_checkpoints(tmp_path)}
    assert infos["ckpt-2"].metadata == {"acc": 0.95, "step": 10}
    (tmp_path / STATE_FILE).unlink()
    restarted = zc.CheckpointManager(_model()[0], tmp_path, max_to_keep=2, best_fn="acc")
    restarted.save(metrics={"acc": 0.1})
    restarted.wait()
    assert _on_disk(tmp_path) == ["ckpt-2", "ckpt-3", "ckpt-5"]  # 0.95 and 0.7 stay


def test_lost_state_file_keeps_what_may_have_been_preserved(tmp_path):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=0)
    for _ in range(3):
        manager.save()
    manager.wait()
    assert _on_disk(tmp_path) == ["ckpt-1", "ckpt-2", "ckpt-3"]
    (tmp_path / STATE_FILE).write_text("{damaged")
    with pytest.warns(RuntimeWarning, match="missing or damaged"):
        restarted = zc.CheckpointManager(
            _model()[0], tmp_path, max_to_keep=1, keep_checkpoint_every_n_hours=1000
        )
    restarted.save()
    restarted.save()
    restarted.wait()
    # ckpt-1..3 may have been preserved: kept; ckpt-4 was saved since and is not.
    assert _on_disk(tmp_path) == ["ckpt-1", "ckpt-2", "ckpt-3", "ckpt-5"]
    assert _names(restarted.checkpoints) == ["ckpt-5"]


def test_managers_of_two_names_share_a_directory(tmp_path):
    def managers() -> tuple[zc.CheckpointManager, zc.CheckpointManager]:
        best = zc.CheckpointManager(
            _model()[0], tmp_path, max_to_keep=1, checkpoint_name="best", best_fn="acc"
        )
        recent = zc.CheckpointManager(
            _model()[0], tmp_path, max_to_keep=2, checkpoint_name="recent"
        )
        return best, recent

    best, recent = managers()
    for acc in [0.9, 0.2, 0.3]:
        best.save(metrics={"acc": acc})
        recent.save()
    best.wait()
    recent.wait()
    files = sorted(os.listdir(tmp_path))
    assert "zarrckpt_state.best.json" in files and "zarrckpt_state.recent.json" in files
    for restart in range(2):  # each new pair reads its own state and checkpoints
        best, recent = managers()
        best.save(metrics={"acc": 0.1})
        recent.save()
        best.wait()
        recent.wait()
        assert _names(best.checkpoints) == ["best-1", f"best-{4 + restart}"]  # 0.9 and latest
        assert _names(recent.checkpoints) == [f"recent-{3 + restart}", f"recent-{4 + restart}"]
    assert _on_disk(tmp_path) == ["best-1", "best-5", "recent-4", "recent-5"]


def test_interval_never_saves_twice_at_one_step_as_tensorflow(tmp_path):
    step = zc.Variable(np.int64(100))
    ckpt = zc.Checkpoint(model=_model()[1], step=step)
    manager = zc.CheckpointManager(ckpt, tmp_path, step_counter=step, checkpoint_interval=10)
    assert _names([manager.save()]) == ["ckpt-1"]
    assert manager.save(check_interval=False) is None  # the step has not moved
    step.assign(101)
    assert manager.save() is None
    assert _names([manager.save(check_interval=False)]) == ["ckpt-2"]

    resumed_step = zc.Variable(np.int64(0))
    resumed = zc.CheckpointManager(
        zc.Checkpoint(model=_model()[1], step=resumed_step),
        tmp_path,
        step_counter=resumed_step,
        checkpoint_interval=10,
    )
    assert resumed.restore_or_initialize() == str(tmp_path / "ckpt-2")
    assert int(resumed_step.numpy()) == 101
    assert resumed.save() is None and resumed.save(check_interval=False) is None
    resumed_step.assign(111)
    assert _names([resumed.save()]) == ["ckpt-3"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metrics": {"acc": "high"}}, "metrics are numbers"),
        ({"metrics": {"acc": float("nan")}}, "finite"),
        ({"metrics": {1: 0.5}}, "metadata key"),
        ({"checkpoint_number": -1}, "checkpoint_number"),
        ({"checkpoint_number": "7"}, "checkpoint_number"),
        ({"checkpoint_number": True}, "checkpoint_number"),
    ],
)
def test_save_refuses_bad_arguments_before_writing(tmp_path, kwargs, match):
    ckpt, _ = _model()
    manager = zc.CheckpointManager(ckpt, tmp_path)
    manager.save()
    with pytest.raises(zc.errors.InvalidArgumentError, match=match):
        manager.save(**kwargs)
    assert _on_disk(tmp_path) == ["ckpt-1"] and int(ckpt.save_counter.numpy()) == 1
    assert _names(manager.checkpoints) == ["ckpt-1"]
    assert _names([manager.save()]) == ["ckpt-2"]


def test_manager_validates_arguments(tmp_path):
    ckpt, _ = _model()
    with pytest.raises(ValueError, match="max_to_keep"):
        zc.CheckpointManager(ckpt, tmp_path, max_to_keep=0)
    for bad in [
        {"max_to_keep": True},
        {"checkpoint_interval": -3, "step_counter": zc.Variable(np.int64(0))},
        {"keep_checkpoint_every_n_hours": "2"},
        {"keep_checkpoint_every_n_hours": float("inf")},
        {"step_counter": zc.Variable(np.zeros(2))},
        {"init_fn": 3},
        {"best_fn": 3},
        {"checkpoint_name": ".hidden"},
    ]:
        with pytest.raises(zc.errors.InvalidArgumentError):
            zc.CheckpointManager(ckpt, tmp_path, **bad)
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
    (tmp_path / "ckpt-9").mkdir()  # named like a checkpoint, not written by zarrckpt
    (tmp_path / ".ckpt-2.zarrckpt-tmp-0123").mkdir()  # a local save killed mid-way
    infos = zc.list_checkpoints(tmp_path)
    assert [(i.name, i.committed) for i in infos] == [("ckpt-1", True), ("ckpt-9", False)]
    assert infos[0].nbytes > 0 and infos[1].nbytes == 0
    assert "committed" in str(infos[0])
    assert zc.gc(tmp_path, older_than=3600) == []  # too recent to be sure the writer is dead
    removed = zc.gc(tmp_path, older_than=0)
    # A local save never leaves a final-named directory without _COMMIT (it is
    # renamed into place whole), so ckpt-9 is not zarrckpt's to remove.
    assert [os.path.basename(p) for p in removed] == [".ckpt-2.zarrckpt-tmp-0123"]
    assert _on_disk(tmp_path) == ["ckpt-1", "ckpt-9"]
    zc.Checkpoint(model=_model()[1]).restore(tmp_path / "ckpt-1").assert_consumed()


def test_gc_removes_a_state_file_replacement_cut_short(tmp_path):
    ckpt, _ = _model()
    zc.CheckpointManager(ckpt, tmp_path).save()
    temp = tmp_path / f"{STATE_FILE}.{'ab' * 16}.tmp"
    temp.write_text("{half")
    assert zc.gc(tmp_path, older_than=3600) == []
    assert zc.gc(tmp_path, older_than=0) == [str(temp)]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1", STATE_FILE]
