"""Asynchronous save: the staging pool, the background commit, its errors (zarrckpt/_async.py).

A background save is held at a known point by a ``progress`` callback that
waits on an event, so what is committed while it runs is checked for sure.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import numpy as np
import pytest
from threaded_ranks import run_ranks

import zarrckpt as zc
from zarrckpt._async import BACKGROUND_NICENESS
from zarrckpt.errors import AsyncSaveError, InvalidArgumentError

KEY = "w/.ATTRIBUTES/VARIABLE_VALUE"


class Gate:
    """A ``progress`` callback that holds the writes until :meth:`open` (when ``background``)."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.reached = threading.Event()
        self.blocked: set[str] = set()

    def __call__(self, nbytes: int) -> None:
        if threading.current_thread().name.startswith("zarrckpt-io") and self.background:
            self.reached.set()
            assert self.opened.wait(30), "the gate was never opened"

    background = True

    def open(self) -> None:
        self.opened.set()


def values(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((512, 1024)).astype(np.float32),  # 2 MiB
        "b": rng.integers(0, 1 << 40, (7,), dtype=np.int64),
    }


def model(seed: int = 0) -> tuple[zc.Checkpoint, dict[str, zc.Variable]]:
    variables = {name: zc.Variable(v) for name, v in values(seed).items()}
    return zc.Checkpoint(**variables), variables


def saved(path: str) -> dict[str, np.ndarray]:
    return {
        name: zc.load_variable(path, f"{name}/.ATTRIBUTES/VARIABLE_VALUE") for name in ("w", "b")
    }


def test_save_returns_before_the_commit_and_keeps_the_values_of_the_call(tmp_path: Any) -> None:
    ckpt, variables = model()
    before = {k: v.numpy().copy() for k, v in variables.items()}
    gate = Gate()
    options = zc.CheckpointOptions(enable_async=True, progress=gate, chunk_bytes=1 << 20)
    path = ckpt.save(str(tmp_path / "ckpt"), options=options)
    assert path == str(tmp_path / "ckpt-1")
    assert gate.reached.wait(30)
    # Not committed while the background save is held; the caller changes its values.
    assert zc.latest_checkpoint(str(tmp_path)) is None
    assert not os.path.exists(os.path.join(path, "_COMMIT"))
    for variable in variables.values():
        variable.numpy()[...] = 0
    gate.open()
    ckpt.wait_until_finished()
    stored = saved(path)
    for name in before:
        np.testing.assert_array_equal(stored[name], before[name])
    assert zc.verify(path).files > 0
    stats = ckpt.last_write_stats
    assert stats is not None
    assert stats.staged_bytes >= 512 * 1024 * 4 + 7 * 8
    assert stats.staging_pool_bytes == ckpt.staging_pool_bytes >= stats.staged_bytes
    assert stats.blocked_seconds > 0
    assert stats.nbytes > 512 * 1024 * 4  # the background write counted into the same stats


def test_the_pool_is_allocated_once_and_reused(tmp_path: Any) -> None:
    ckpt, variables = model()
    options = zc.CheckpointOptions(enable_async=True)
    ckpt.save(str(tmp_path / "c"), options=options)
    saver = ckpt._async_saver()
    address, size = saver.pool._buffer.ctypes.data, ckpt.staging_pool_bytes
    allocated = saver.pool.allocation_seconds
    for step in range(3):
        variables["w"].assign(np.full((512, 1024), step, np.float32))
        path = ckpt.save(str(tmp_path / "c"), options=options)
    ckpt.wait_until_finished()
    assert (saver.pool._buffer.ctypes.data, ckpt.staging_pool_bytes) == (address, size)
    assert saver.pool.allocation_seconds == allocated  # no allocation after the first save
    assert path.endswith("c-4")
    assert (saved(path)["w"] == 2).all()
    ckpt.release_staging_pool()
    assert ckpt.staging_pool_bytes == 0


def test_a_larger_save_grows_the_pool(tmp_path: Any) -> None:
    ckpt, _ = model()
    options = zc.CheckpointOptions(enable_async=True)
    ckpt.save(str(tmp_path / "c"), options=options)
    first = ckpt.staging_pool_bytes
    ckpt.extra = zc.Variable(np.ones((1024, 1024), np.float32))  # 4 MiB more
    path = ckpt.save(str(tmp_path / "c"), options=options)
    ckpt.wait_until_finished()
    assert ckpt.staging_pool_bytes >= first + (4 << 20)
    assert (zc.load_variable(path, "extra/.ATTRIBUTES/VARIABLE_VALUE") == 1).all()


def test_a_background_error_is_raised_once_by_wait_and_nothing_is_committed(
    tmp_path: Any,
) -> None:
    ckpt, _ = model()

    def fail(nbytes: int) -> None:
        raise RuntimeError("progress bar broke")

    path = ckpt.save(
        str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True, progress=fail)
    )
    with pytest.raises(AsyncSaveError, match="progress bar broke") as caught:
        ckpt.wait_until_finished()
    assert caught.value.path == path
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert "not committed" in str(caught.value)
    ckpt.wait_until_finished()  # raised once
    assert os.listdir(tmp_path) == []  # the attempt was removed
    assert zc.latest_checkpoint(str(tmp_path)) is None
    # The next save works and takes the next number.
    path = ckpt.save(str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True))
    ckpt.wait_until_finished()
    assert path.endswith("c-2") and zc.verify(path).files > 0


def test_the_next_save_raises_a_failed_one_and_does_not_start(tmp_path: Any) -> None:
    ckpt, variables = model()
    gate = Gate()

    def fail_later(nbytes: int) -> None:
        gate(nbytes)
        raise OSError(28, "No space left on device")

    first = ckpt.save(str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True))
    ckpt.save(
        str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True, progress=fail_later)
    )
    gate.open()
    with pytest.raises(AsyncSaveError, match="No space left") as caught:
        ckpt.save(str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True))
    assert isinstance(caught.value.__cause__, OSError)
    assert int(ckpt.save_counter) == 2  # the failed third call took no number
    assert sorted(os.listdir(tmp_path)) == ["c-1"]
    assert zc.latest_checkpoint(str(tmp_path)) == first
    np.testing.assert_array_equal(saved(first)["w"], variables["w"].numpy())


def test_a_cap_writes_what_does_not_fit_before_returning(tmp_path: Any) -> None:
    ckpt, variables = model()
    before = {k: v.numpy().copy() for k, v in variables.items()}
    options = zc.CheckpointOptions(enable_async=True, staging_bytes=4096, chunk_bytes=1 << 20)
    path = ckpt.write(str(tmp_path / "c"), options=options)
    # "w" (2 MiB) did not fit the pool: it was written from the live array before
    # write() returned, so changing it now does not reach the checkpoint.
    for variable in variables.values():
        variable.numpy()[...] = 7
    stats = ckpt.last_write_stats
    assert stats is not None
    assert stats.staged_bytes == 64  # "b" (56 bytes, aligned) only
    assert ckpt.staging_pool_bytes <= 4096
    ckpt.wait_until_finished()
    stored = saved(path)
    for name in before:
        np.testing.assert_array_equal(stored[name], before[name])
    assert zc.verify(path).files > 0


def test_a_blocking_write_waits_for_the_async_one_in_flight(tmp_path: Any) -> None:
    ckpt, variables = model()
    gate = Gate()
    first = ckpt.write(
        str(tmp_path / "a"), options=zc.CheckpointOptions(enable_async=True, progress=gate)
    )
    assert gate.reached.wait(30)
    threading.Timer(0.2, gate.open).start()
    variables["w"].assign(np.zeros((512, 1024), np.float32))
    second = ckpt.write(str(tmp_path / "b"))  # blocks until "a" is committed, then writes
    assert zc.verify(first).files > 0 and zc.verify(second).files > 0
    assert (saved(second)["w"] == 0).all() and not (saved(first)["w"] == 0).all()


def test_options_are_checked() -> None:
    with pytest.raises(InvalidArgumentError, match="enable_async must be a bool"):
        zc.CheckpointOptions(enable_async=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="staging_bytes"):
        zc.CheckpointOptions(staging_bytes=-1)
    with pytest.raises(InvalidArgumentError, match="enable_async must be a bool"):
        zc.CheckpointManager(zc.Checkpoint(), "/tmp/x", enable_async="yes")  # type: ignore[arg-type]


def test_dtypes_views_and_scalars_are_staged_exactly(tmp_path: Any) -> None:
    from ml_dtypes import bfloat16

    base = np.arange(4096, dtype=np.float64).reshape(64, 64)
    ckpt = zc.Checkpoint(
        bf=zc.Variable(np.linspace(-3, 3, 1000).astype(bfloat16)),
        scalar=zc.Variable(np.float32(2.5)),
        empty=zc.Variable(np.zeros((0, 3), np.int16)),
        flag=zc.Variable(np.array([True, False, True])),
        state=zc.NumpyState(),
    )
    ckpt.state.strided = base[::2, ::3]  # not contiguous: copied row block by row block
    ckpt.state.fortran = np.asfortranarray(base)
    expected = {
        "bf/.ATTRIBUTES/VARIABLE_VALUE": ckpt.bf.numpy().copy(),
        "scalar/.ATTRIBUTES/VARIABLE_VALUE": np.float32(2.5),
        "empty/.ATTRIBUTES/VARIABLE_VALUE": np.zeros((0, 3), np.int16),
        "flag/.ATTRIBUTES/VARIABLE_VALUE": np.array([True, False, True]),
        "state/strided/.ATTRIBUTES/VARIABLE_VALUE": base[::2, ::3].copy(),
        "state/fortran/.ATTRIBUTES/VARIABLE_VALUE": base.copy(),
    }
    path = ckpt.write(str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True))
    base[...] = -1
    ckpt.bf.numpy()[...] = 0
    ckpt.scalar.assign(np.float32(0))
    ckpt.wait_until_finished()
    for key, value in expected.items():
        stored = zc.load_variable(path, key)
        assert stored.dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(stored, value, err_msg=key)


# Manager ---------------------------------------------------------------------


def test_manager_lists_a_checkpoint_once_committed_and_keeps_retention(tmp_path: Any) -> None:
    ckpt, variables = model()
    gate = Gate()
    gate.background = False
    manager = zc.CheckpointManager(
        ckpt,
        str(tmp_path),
        max_to_keep=2,
        enable_async=True,
        options=zc.CheckpointOptions(progress=gate, chunk_bytes=1 << 20),
    )
    assert "async" in repr(manager)
    gate.open()
    paths = []
    for step in range(3):
        variables["w"].assign(np.full((512, 1024), step, np.float32))
        paths.append(manager.save())
    manager.wait_until_finished()
    assert manager.checkpoints == paths[1:]
    gate.opened.clear()
    gate.background = True
    variables["w"].assign(np.full((512, 1024), 3, np.float32))
    fourth = manager.save()
    assert gate.reached.wait(30)
    assert manager.latest_checkpoint == paths[2]
    assert manager.checkpoints == paths[1:]
    assert zc.latest_checkpoint(str(tmp_path)) == paths[2]
    variables["w"].assign(np.zeros((512, 1024), np.float32))
    gate.open()
    manager.wait()  # the old name of wait_until_finished
    assert manager.checkpoints == [paths[2], fourth]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-3", "ckpt-4", "zarrckpt_state.ckpt.json"]
    assert (saved(fourth)["w"] == 3).all()
    # A new manager resumes from it.
    fresh, fresh_variables = model(seed=5)
    assert zc.CheckpointManager(fresh, str(tmp_path)).restore_or_initialize() == fourth
    assert (fresh_variables["w"].numpy() == 3).all()


def test_manager_allocates_the_pool_when_created(tmp_path: Any) -> None:
    ckpt, _ = model()
    manager = zc.CheckpointManager(ckpt, str(tmp_path), enable_async=True)
    saver = ckpt._async_saver()
    saver.pool.reserve(0)  # waits for the background allocation
    allocated = saver.pool.allocation_seconds
    assert ckpt.staging_pool_bytes >= 512 * 1024 * 4
    manager.save()
    manager.wait_until_finished()
    assert saver.pool.allocation_seconds == allocated  # the first save found it ready


def test_manager_error_of_a_background_save_is_raised_by_the_next_save(tmp_path: Any) -> None:
    ckpt, _ = model()
    fail = threading.Event()

    def progress(nbytes: int) -> None:
        if fail.is_set():
            raise OSError(5, "Input/output error")

    manager = zc.CheckpointManager(
        ckpt, str(tmp_path), enable_async=True, options=zc.CheckpointOptions(progress=progress)
    )
    first = manager.save()
    manager.wait_until_finished()
    fail.set()
    second = manager.save()
    with pytest.raises(AsyncSaveError, match="Input/output error") as caught:
        manager.save()
    assert caught.value.path == second
    fail.clear()
    third = manager.save()
    manager.wait_until_finished()
    assert manager.checkpoints == [first, third]
    assert third.endswith("ckpt-3")  # the failed number is not reused


# Distributed and the PyTorch adapter --------------------------------------------


def test_ranks_snapshot_their_blocks_and_commit_together(tmp_path: Any) -> None:
    full = np.arange(96 * 40, dtype=np.float32).reshape(96, 40)
    path = str(tmp_path / "ckpt")
    options = zc.CheckpointOptions(enable_async=True, chunk_bytes=2048, fsync=False)

    def work(coordinator: Any) -> Any:
        rank = coordinator.rank
        rows = slice(32 * rank, 32 * (rank + 1))
        block = zc.Variable.sharded(full[rows].copy(), full.shape, (32 * rank, 0))
        bias = zc.Variable(np.full((5,), 9.0))
        ckpt = zc.Checkpoint(w=block, b=bias)
        returned = ckpt.write(path, options=options, coordinator=coordinator)
        block.numpy()[...] = -1  # after write() returned: not in the checkpoint
        bias.numpy()[...] = -1
        ckpt.wait_until_finished()
        return returned, ckpt.last_write_stats.staged_bytes

    results = run_ranks(3, work)
    assert [r[0] for r in results] == [path] * 3, results
    assert all(r[1] > 0 for r in results)
    np.testing.assert_array_equal(zc.load_variable(path, KEY), full)
    np.testing.assert_array_equal(zc.load_variable(path, "b/.ATTRIBUTES/VARIABLE_VALUE"), [9.0] * 5)
    assert zc.verify(path).files > 0


def test_a_rank_failing_in_the_background_fails_the_save_on_every_rank(tmp_path: Any) -> None:
    full = np.arange(60 * 8, dtype=np.float64).reshape(60, 8)
    path = str(tmp_path / "ckpt")

    def work(coordinator: Any) -> Any:
        rank = coordinator.rank

        def progress(nbytes: int) -> None:
            if rank == 1:
                raise RuntimeError("rank 1's disk failed")

        block = zc.Variable.sharded(
            full[20 * rank : 20 * (rank + 1)].copy(), full.shape, (20 * rank, 0)
        )
        ckpt = zc.Checkpoint(w=block)
        options = zc.CheckpointOptions(enable_async=True, progress=progress, fsync=False)
        ckpt.write(path, options=options, coordinator=coordinator)
        try:
            ckpt.wait_until_finished()
        except AsyncSaveError as exc:
            return exc
        return None

    results = run_ranks(3, work)
    for result in results:
        assert isinstance(result, AsyncSaveError), results
        assert "rank 1's disk failed" in str(result)
    assert os.listdir(tmp_path) == []


def test_manager_with_ranks_saves_asynchronously(tmp_path: Any) -> None:
    def work(coordinator: Any) -> Any:
        rank = coordinator.rank
        block = zc.Variable.sharded(np.full((4, 3), rank, np.int32), (12, 3), (4 * rank, 0))
        ckpt = zc.Checkpoint(w=block)
        manager = zc.CheckpointManager(
            ckpt,
            str(tmp_path),
            max_to_keep=2,
            enable_async=True,
            coordinator=coordinator,
            options=zc.CheckpointOptions(fsync=False),
        )
        for step in range(3):
            block.assign(np.full((4, 3), 10 * step + rank, np.int32))
            manager.save()
        manager.wait_until_finished()
        return manager.checkpoints

    results = run_ranks(3, work)
    expected = [str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-3")]
    assert results == [expected] * 3, results
    stored = zc.load_variable(expected[1], KEY)
    np.testing.assert_array_equal(stored[:, 0], np.repeat([20, 21, 22], 4))


def test_torch_module_and_optimizer_are_snapshot_at_the_call(tmp_path: Any) -> None:
    torch = pytest.importorskip("torch")
    from zarrckpt import torch as zt

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)

    def step() -> None:
        opt.zero_grad()
        net(torch.randn(8, 64)).pow(2).sum().backward()
        opt.step()

    step()
    ckpt = zc.Checkpoint(model=zt.ModuleState(net), optim=zt.OptimizerState(opt, net))
    snapshot = {k: v.detach().clone() for k, v in net.state_dict().items()}
    moments = [state["exp_avg"].clone() for state in opt.state.values()]
    path = ckpt.save(str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True))
    step()  # changes every parameter and moment while the save runs
    ckpt.wait_until_finished()
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    zc.Checkpoint(model=zt.ModuleState(fresh), optim=zt.OptimizerState(fresh_opt, fresh)).restore(
        path
    ).assert_consumed()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, snapshot[key]), key
    restored = [state["exp_avg"] for state in fresh_opt.state.values()]
    assert len(restored) == len(moments) == 4
    for value, expected in zip(restored, moments, strict=True):
        assert torch.equal(value, expected)


def test_ranks_write_what_does_not_fit_their_pool_before_returning(tmp_path: Any) -> None:
    full = np.arange(90 * 16, dtype=np.float64).reshape(90, 16)
    path = str(tmp_path / "ckpt")

    def work(coordinator: Any) -> Any:
        rank = coordinator.rank
        # 30 rows a rank, chunks of 8 rows: chunks cross blocks, pieces are exchanged.
        rows = full[30 * rank : 30 * (rank + 1)].copy()
        block = zc.Variable.sharded(rows, full.shape, (30 * rank, 0))
        small = zc.Variable(np.full((3,), rank + 1.0))
        ckpt = zc.Checkpoint(w=block, s=small)
        options = zc.CheckpointOptions(
            enable_async=True, staging_bytes=1024, chunk_bytes=8 * 16 * 8, fsync=False
        )
        ckpt.write(path, options=options, coordinator=coordinator)
        block.numpy()[...] = -1
        small.numpy()[...] = -1
        ckpt.wait_until_finished()
        return ckpt.last_write_stats.staged_bytes

    staged = run_ranks(3, work)
    assert staged[0] == 64, staged  # "s" (written by one rank) fits; no rank's block does
    np.testing.assert_array_equal(zc.load_variable(path, KEY), full)
    assert zc.load_variable(path, "s/.ATTRIBUTES/VARIABLE_VALUE").tolist() in (
        [1.0] * 3,
        [2.0] * 3,
        [3.0] * 3,
    )
    assert zc.verify(path).files > 0


def test_manager_calls_an_overridden_write_of_a_checkpoint_subclass(tmp_path: Any) -> None:
    calls: list[str] = []

    class Traced(zc.Checkpoint):
        def write(self, path: Any, **kwargs: Any) -> str:
            calls.append(str(path))
            return super().write(path, **kwargs)

    for directory, enable_async in ((tmp_path / "a", True), (tmp_path / "b", False)):
        manager = zc.CheckpointManager(
            Traced(w=zc.Variable(np.ones((4,), np.float32))),
            str(directory),
            enable_async=enable_async,
        )
        path = manager.save()
        manager.wait_until_finished()
        assert calls[-1] == path
        assert manager.checkpoints == [path]
        assert zc.verify(path).files > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_background_write_runs_at_a_lower_cpu_priority(tmp_path: Any) -> None:
    seen: list[int] = []

    def progress(nbytes: int) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ckpt, _ = model()
    ckpt.save(
        str(tmp_path / "c"), options=zc.CheckpointOptions(enable_async=True, progress=progress)
    )
    ckpt.wait_until_finished()
    assert seen and set(seen) == {min(19, mine + BACKGROUND_NICENESS)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    seen.clear()
    ckpt.save(str(tmp_path / "c"), options=zc.CheckpointOptions(progress=progress))
    assert set(seen) == {mine}  # a blocking save keeps the caller's priority
