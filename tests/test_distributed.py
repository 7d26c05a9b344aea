"""Distributed save and restore with ranks as threads (tests/threaded_ranks.py).

Real process groups (gloo, MPI) are in test_distributed_procs.py; here the
protocol, the plan checks, the chunk grids and resharding run fast enough to
be explored with hypothesis.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from threaded_ranks import GatherOnlyCoordinator, ThreadCoordinator, run_ranks

import zarrckpt as zc
from zarrckpt import _storage
from zarrckpt.array_io import group_metadata
from zarrckpt.distributed import LocalCoordinator, even_split, shard_layout
from zarrckpt.errors import (
    CheckpointExistsError,
    DistributedRestoreError,
    DistributedSaveError,
    InvalidArgumentError,
    ShapeMismatchError,
)

NO_FSYNC = zc.CheckpointOptions(fsync=False)


def global_value(shape: tuple[int, ...], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    """Distinct small integers as ``dtype`` (exact under the tests' additions)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def block_of(full: np.ndarray, box: list[tuple[int, int]]) -> np.ndarray:
    return full[tuple(slice(a, b) for a, b in box)].copy()


def row_boxes(shape: tuple[int, ...], world: int, axis: int = 0) -> list[list[tuple[int, int]]]:
    boxes = []
    for rank in range(world):
        start, stop = even_split(shape[axis], world, rank)
        box = [(0, n) for n in shape]
        box[axis] = (start, stop)
        boxes.append(box)
    return boxes


def sharded(full: np.ndarray, box: list[tuple[int, int]], zeros: bool = False) -> zc.Variable:
    block = block_of(full, box)
    if zeros:
        block = np.zeros_like(block)
    return zc.Variable.sharded(block, full.shape, [a for a, _ in box])


def no_leftovers(directory: str) -> list[str]:
    return [name for name in os.listdir(directory) if "zarrckpt-" in name]


# Variable.sharded ------------------------------------------------------------------


def test_sharded_variable_knows_where_its_block_lies() -> None:
    v = zc.Variable.sharded(np.ones((2, 3), np.float32), (6, 3), (4, 0), name="w")
    assert (v.shape, v.global_shape, v.offset) == ((2, 3), (6, 3), (4, 0))
    assert "block at (4, 0) of (6, 3)" in repr(v)
    plain = zc.Variable(np.ones((2, 3)))
    assert (plain.global_shape, plain.offset) == ((2, 3), (0, 0))


@pytest.mark.parametrize(
    ("shape", "offset", "needle"),
    [
        ((6, 3), (5, 0), "outside global_shape [6, 3] (axis 0: rows 5..7 of 6)"),
        ((6, 2), (0, 0), "axis 1: rows 0..3 of 2"),
        ((6,), (0,), "has 2 dimensions"),
        ((6, 3), (-1, 0), "offset must be a sequence of ints >= 0"),
        ((6, 3.0), (0, 0), "global_shape must be a sequence of ints >= 0"),
        ((6, 3), (True, 0), "offset must be a sequence of ints >= 0"),
    ],
)
def test_a_block_outside_the_global_shape_is_refused_at_creation(
    shape: Any, offset: Any, needle: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        zc.Variable.sharded(np.ones((2, 3)), shape, offset)
    assert needle in str(info.value)


def test_import_zarrckpt_imports_neither_torch_nor_mpi4py() -> None:
    import subprocess
    import sys

    code = (
        "import sys, zarrckpt, zarrckpt.distributed; "
        "print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# Saving and resharding --------------------------------------------------------------


def save_ranks(
    path: str,
    values: dict[str, np.ndarray],
    layouts: dict[str, list[list[tuple[int, int]]]],
    world: int,
    replicated: dict[str, np.ndarray] | None = None,
    options: zc.CheckpointOptions = NO_FSYNC,
    storage_options: dict[str, Any] | None = None,
) -> list[Any]:
    """Every rank saves its block of each value (and every replicated value); results by rank."""

    def work(coordinator: Any) -> Any:
        rank = coordinator.rank
        objects = {k: sharded(values[k], layouts[k][rank]) for k in values}
        objects.update({k: zc.Variable(v) for k, v in (replicated or {}).items()})
        ckpt = zc.Checkpoint(**objects)
        returned = ckpt.write(
            path, options=options, storage_options=storage_options, coordinator=coordinator
        )
        return returned, ckpt.last_write_stats

    return run_ranks(world, work)


def restore_ranks(
    path: str,
    values: dict[str, np.ndarray],
    layouts: dict[str, list[list[tuple[int, int]]]],
    world: int,
    replicated: dict[str, np.ndarray] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[Any]:
    """Every rank restores its blocks; results: (bit-exact?, bytes read) by rank."""

    def work(coordinator: Any) -> Any:
        rank = coordinator.rank
        objects = {k: sharded(values[k], layouts[k][rank], zeros=True) for k in values}
        objects.update({k: zc.Variable(np.zeros_like(v)) for k, v in (replicated or {}).items()})
        status = zc.Checkpoint(**objects).restore(
            path, storage_options=storage_options, coordinator=coordinator
        )
        status.assert_existing_objects_matched()
        exact = all(
            np.array_equal(objects[k].numpy(), block_of(values[k], layouts[k][rank]))
            for k in values
        ) and all(np.array_equal(objects[k].numpy(), v) for k, v in (replicated or {}).items())
        return exact, status.io_stats.nbytes

    return run_ranks(world, work)


def test_four_ranks_save_rows_two_restore_columns_and_one_reads_it_plain(tmp_path: Any) -> None:
    values = {"w": global_value((64, 48)), "e": global_value((10, 6), np.int64, 1)}
    replicated = {"b": global_value((5,), np.float64, 2)}
    path = str(tmp_path / "ckpt")
    results = save_ranks(
        path, values, {k: row_boxes(v.shape, 4) for k, v in values.items()}, 4, replicated
    )
    assert [r[0] for r in results] == [path] * 4
    columns = {k: row_boxes(v.shape, 2, axis=1) for k, v in values.items()}
    assert restore_ranks(path, values, columns, 2, replicated) == [
        (True, restore_ranks(path, values, columns, 2, replicated)[r][1]) for r in range(2)
    ]
    whole = zc.Checkpoint(**{k: zc.Variable(np.zeros_like(v)) for k, v in values.items()})
    whole.b = zc.Variable(np.zeros(5))
    whole.restore(path).assert_consumed()
    assert np.array_equal(whole.w.numpy(), values["w"])
    assert np.array_equal(whole.e.numpy(), values["e"])
    # Plain zarr and load_variable read the same hierarchy.
    group = zarr.open_group(path, mode="r")
    assert np.array_equal(group["w/.ATTRIBUTES/VARIABLE_VALUE"][:], values["w"])
    assert np.array_equal(zc.load_variable(path, "e"), values["e"])
    assert not no_leftovers(str(tmp_path))


def test_one_process_of_plain_variables_restores_into_three_ranks_of_blocks(
    tmp_path: Any,
) -> None:
    values = {"w": global_value((31, 7)), "v": global_value((1000,), np.float16, 3)}
    path = str(tmp_path / "plain")
    zc.Checkpoint(**{k: zc.Variable(v) for k, v in values.items()}).write(path, options=NO_FSYNC)
    layouts = {k: row_boxes(v.shape, 3) for k, v in values.items()}
    assert [ok for ok, _ in restore_ranks(path, values, layouts, 3)] == [True] * 3


def test_a_rank_reads_only_the_chunks_overlapping_its_block(tmp_path: Any) -> None:
    full = global_value((1024, 256))  # 1 MiB; 64 KiB chunks below: 16 row chunks
    options = zc.CheckpointOptions(fsync=False, chunk_bytes=64 << 10)
    path = str(tmp_path / "ckpt")
    save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 2)}, 2, options=options)
    layout = zarr.open_array(f"{path}/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r")
    assert layout.chunks == (64, 256)
    results = restore_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 4)}, 4)
    chunk_file = 64 * 256 * 4 + 4
    assert results == [(True, 4 * chunk_file)] * 4  # 256 rows each: exactly 4 chunks


def test_a_replicated_value_is_written_once_and_the_ranks_balance_bytes(tmp_path: Any) -> None:
    replicated = {
        f"r{i}": global_value((n,), np.float32, i)
        for i, n in enumerate([4000, 3000, 2000, 1000, 10])
    }
    values = {"w": global_value((300, 10))}
    path = str(tmp_path / "ckpt")
    results = save_ranks(
        path, values, {"w": row_boxes((300, 10), 3)}, 3, replicated, options=NO_FSYNC
    )
    written = [stats.nbytes for _, stats in results]
    on_disk = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(path)
        for f in files
        if f not in ("_COMMIT", "object_graph.msgpack") and not (d == path and f == "zarr.json")
    )
    assert sum(written) == on_disk  # each byte written by one rank, once
    assert max(written) - min(written) < 4000 * 4 + 2000  # balanced within one value's bytes


@pytest.mark.parametrize("kind", [ThreadCoordinator, GatherOnlyCoordinator])
def test_large_irregular_blocks_exchange_at_most_one_chunk_per_edge(
    tmp_path: Any, kind: type[ThreadCoordinator]
) -> None:
    full = global_value((3001, 256))  # 3 MiB in blocks of 1001, 1000, 1000 rows: gcd 1
    boxes = row_boxes(full.shape, 3)
    path = str(tmp_path / "ckpt")
    sent: list[int] = []

    def work(coordinator: Any) -> Any:
        exchange = type(coordinator).exchange_objects

        if exchange is not None:

            def counting(outgoing: dict[int, Any], sources: list[int]) -> dict[int, Any]:
                sent.extend(p[3].nbytes for pieces in outgoing.values() for p in pieces)
                return exchange(coordinator, outgoing, sources)

            coordinator.exchange_objects = counting
        ckpt = zc.Checkpoint(w=sharded(full, boxes[coordinator.rank]))
        return ckpt.write(path, options=NO_FSYNC, coordinator=coordinator)

    assert run_ranks(3, work, kind=kind) == [path] * 3
    array = zarr.open_array(f"{path}/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r")
    assert array.chunks == (500, 256)  # at most half the thinnest block: a chunk spans <= 2
    assert np.array_equal(array[...], full)
    if kind is ThreadCoordinator:
        # Edges at rows 1001 and 2001 cut chunks [1000:1500] and [2000:2500]; the rank
        # holding most of each writes it, so one row of each is sent, not 499.
        assert sent == [256 * 4, 256 * 4]


def test_irregular_blocks_send_boundary_pieces_to_the_chunk_owner(tmp_path: Any) -> None:
    full = global_value((10, 6))
    path = str(tmp_path / "ckpt")
    results = save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 3)}, 3)
    array = zarr.open_array(f"{path}/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r")
    assert array.chunks == (10, 6)  # not 1-row chunks
    assert np.array_equal(array[:], full)
    # Rank 0 owns the one chunk; the others write their share of the metadata
    # (round robin: one small zarr.json each), no chunk.
    assert [(stats.files, stats.nbytes < 1024) for _, stats in results][1:] == [(1, True)] * 2


@pytest.mark.parametrize(
    ("shape", "boxes", "chunks", "exchange"),
    [
        # Blocks of 16 MiB: chunks of 4 MiB inside them.
        (
            (4096, 4096),
            [[(1024 * i, 1024 * i + 1024), (0, 4096)] for i in range(4)],
            (256, 4096),
            0,
        ),
        (
            (4096, 4096),
            [[(0, 4096), (1024 * i, 1024 * i + 1024)] for i in range(4)],
            (1024, 1024),
            0,
        ),
        # Blocks of 8 MiB and 4 MiB: 2 MiB, 1/16 of chunk_bytes, is the smallest chunk.
        ((4096, 4096), [[(512 * i, 512 * i + 512), (0, 4096)] for i in range(8)], (128, 4096), 0),
        ((4096, 4096), [[(256 * i, 256 * i + 256), (0, 4096)] for i in range(16)], (128, 4096), 0),
        # Even splits whose balanced chunks land below the 2 MiB target stay aligned.
        ((3840, 768), [[(960 * i, 960 * i + 960), (0, 768)] for i in range(4)], (480, 768), 0),
        # Blocks of 512 MiB: 32 MiB chunks.
        ((65536, 4096), [[(0, 32768), (0, 4096)], [(32768, 65536), (0, 4096)]], (2048, 4096), 0),
        ((10, 6), [[(0, 4), (0, 6)], [(4, 7), (0, 6)], [(7, 10), (0, 6)]], (10, 6), True),
        ((1000003, 8), [[(0, 333335), (0, 8)], [(333335, 1000003), (0, 8)]], (66667, 8), False),
        (
            (1000003, 8),
            [[(0, 333335), (0, 8)], [(333335, 666669), (0, 8)], [(666669, 1000003), (0, 8)]],
            (55556, 8),  # irregular: at most half a block, so a chunk spans two blocks at most
            True,
        ),
    ],
)
def test_chunk_grids_follow_block_edges_unless_that_makes_them_tiny(
    shape: tuple[int, ...], boxes: Any, chunks: tuple[int, ...], exchange: bool
) -> None:
    boxes = [tuple(tuple(axis) for axis in box) for box in boxes]
    layout, exchanged = shard_layout(shape, np.dtype(np.float32), boxes, 32 << 20, None)
    assert (layout.chunk_shape, exchanged) == (chunks, exchange)
    assert layout.chunk_nbytes <= 32 << 20


# Refusals: the same message on every rank, nothing on storage ------------------------


def refusal(tmp_path: Any, make: Any, world: int = 3) -> list[BaseException]:
    path = str(tmp_path / "ckpt")

    def work(coordinator: Any) -> Any:
        return zc.Checkpoint(**make(coordinator.rank)).write(
            path, options=NO_FSYNC, coordinator=coordinator
        )

    results = run_ranks(world, work)
    assert all(isinstance(r, DistributedSaveError) for r in results), results
    assert len({str(r) for r in results}) == 1  # the same message on every rank
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary directory
    return results


def test_overlapping_blocks_are_refused_on_every_rank_before_any_byte(tmp_path: Any) -> None:
    full = global_value((9, 4))
    boxes = [[(0, 4), (0, 4)], [(3, 7), (0, 4)], [(7, 9), (0, 4)]]
    [error, *_] = refusal(tmp_path, lambda r: {"w": sharded(full, boxes[r])})
    assert "the blocks of rank 0 [0:4, 0:4] and rank 1 [3:7, 0:4] overlap" in str(error)


def test_blocks_leaving_a_gap_are_refused(tmp_path: Any) -> None:
    full = global_value((9, 4))
    boxes = [[(0, 3), (0, 4)], [(3, 6), (0, 4)], [(7, 9), (0, 4)]]
    [error, *_] = refusal(tmp_path, lambda r: {"w": sharded(full, boxes[r])})
    assert "the blocks cover 32 of the 36 elements of shape [9, 4]" in str(error)


def test_ranks_disagreeing_on_the_global_shape_are_refused(tmp_path: Any) -> None:
    def make(rank: int) -> dict[str, Any]:
        n = 9 if rank else 10
        return {"w": zc.Variable.sharded(np.ones((3, 4)), (n, 4), (3 * rank, 0))}

    [error, *_] = refusal(tmp_path, make)
    assert (
        "'w/.ATTRIBUTES/VARIABLE_VALUE' is float64[10, 4] on rank 0 but float64[9, 4] on rank 1"
        in str(error)
    )


def test_ranks_saving_different_objects_are_refused_naming_the_first_key(tmp_path: Any) -> None:
    def make(rank: int) -> dict[str, Any]:
        objects = {"a": zc.Variable(np.ones(3))}
        if rank == 2:
            objects["extra"] = zc.Variable(np.ones(2))
        return objects

    [error, *_] = refusal(tmp_path, make)
    assert "'extra/.ATTRIBUTES/VARIABLE_VALUE' is saved by rank 2 but not by rank 0" in str(error)
    assert "[2]" in str(error)


def test_a_value_sharded_on_some_ranks_and_plain_on_others_is_refused(tmp_path: Any) -> None:
    def make(rank: int) -> dict[str, Any]:
        if rank == 1:
            return {"w": zc.Variable(np.ones((3, 2)))}
        return {"w": zc.Variable.sharded(np.ones((1, 2)), (3, 2), (rank, 0))}

    [error, *_] = refusal(tmp_path, make)
    assert "sharded Variable on ranks [0, 2] but a plain (replicated) one on ranks [1]" in str(
        error
    )


def test_ranks_saving_to_different_paths_are_refused(tmp_path: Any) -> None:
    def work(coordinator: Any) -> Any:
        return zc.Checkpoint(a=zc.Variable(np.ones(2))).write(
            str(tmp_path / f"ckpt-{coordinator.rank}"), options=NO_FSYNC, coordinator=coordinator
        )

    results = run_ranks(2, work)
    assert all("the ranks save to different paths" in str(r) for r in results)
    assert os.listdir(tmp_path) == []


def test_one_process_saving_a_partial_block_is_told_to_pass_a_coordinator(tmp_path: Any) -> None:
    ckpt = zc.Checkpoint(w=zc.Variable.sharded(np.ones((2, 2)), (4, 2), (0, 0)))
    with pytest.raises(DistributedSaveError, match="pass coordinator="):
        ckpt.write(str(tmp_path / "c"), options=NO_FSYNC)
    assert os.listdir(tmp_path) == []
    whole = zc.Checkpoint(w=zc.Variable.sharded(np.ones((4, 2)), (4, 2), (0, 0)))
    path = whole.write(str(tmp_path / "c"), options=NO_FSYNC, coordinator=LocalCoordinator())
    assert np.array_equal(zc.load_variable(path, "w"), np.ones((4, 2)))


# Failures ---------------------------------------------------------------------------


def test_a_failing_progress_callback_on_one_rank_fails_every_rank(tmp_path: Any) -> None:
    full = global_value((66, 16))  # 22 rows a rank: each writes its own chunk
    boxes = row_boxes(full.shape, 3)
    directory = str(tmp_path)
    save_ranks(f"{directory}/ckpt-1", {"w": full}, {"w": boxes}, 3)

    def work(coordinator: Any) -> Any:
        def progress(nbytes: int) -> None:
            if coordinator.rank == 1:
                raise RuntimeError("disk on fire")

        ckpt = zc.Checkpoint(w=sharded(full + 1, boxes[coordinator.rank]))
        options = zc.CheckpointOptions(fsync=False, progress=progress)
        return ckpt.write(f"{directory}/ckpt-2", options=options, coordinator=coordinator)

    start = time.monotonic()
    results = run_ranks(3, work)
    assert time.monotonic() - start < 10
    assert all(isinstance(r, DistributedSaveError) for r in results), results
    assert all(set(r.failures) == {1} and "disk on fire" in r.failures[1] for r in results)
    assert "rank 1: RuntimeError: disk on fire" in str(results[0])
    assert sorted(os.listdir(directory)) == ["ckpt-1"]  # the attempt is gone
    assert restore_ranks(f"{directory}/ckpt-1", {"w": full}, {"w": boxes}, 3)[0][0]


def test_a_rank_that_dies_makes_the_others_raise_instead_of_hanging(tmp_path: Any) -> None:
    full = global_value((30, 4))
    boxes = row_boxes(full.shape, 3)

    def work(coordinator: Any) -> Any:
        ckpt = zc.Checkpoint(w=sharded(full, boxes[coordinator.rank]))
        if coordinator.rank == 2:
            raise SystemExit("rank 2 died")  # before its first collective
        return ckpt.write(str(tmp_path / "ckpt"), options=NO_FSYNC, coordinator=coordinator)

    results = run_ranks(3, work, timeout=5)
    assert isinstance(results[2], SystemExit)
    assert all(isinstance(r, DistributedSaveError) for r in results[:2])
    assert "a rank died or did not arrive" in str(results[0])
    assert os.listdir(tmp_path) == []


def test_saving_onto_an_existing_checkpoint_raises_exists_on_every_rank(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    zc.Checkpoint(a=zc.Variable(np.ones(2))).write(path, options=NO_FSYNC)

    def work(coordinator: Any) -> Any:
        ckpt = zc.Checkpoint(a=zc.Variable(np.zeros(2)))
        return ckpt.write(path, options=NO_FSYNC, coordinator=coordinator)

    results = run_ranks(2, work)
    assert all(isinstance(r, CheckpointExistsError) for r in results)
    assert np.array_equal(zc.load_variable(path, "a"), np.ones(2))


def test_a_restore_failing_on_one_rank_raises_on_every_rank(tmp_path: Any) -> None:
    full = global_value((12, 4))
    path = str(tmp_path / "ckpt")
    save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 2)}, 2)

    def work(coordinator: Any) -> Any:
        shape = (13, 4) if coordinator.rank == 1 else (12, 4)  # rank 1 built the wrong model
        v = zc.Variable.sharded(np.zeros((6, 4), np.float32), shape, (6 * coordinator.rank, 0))
        return zc.Checkpoint(w=v).restore(path, coordinator=coordinator)

    results = run_ranks(2, work)
    assert all(isinstance(r, DistributedRestoreError) for r in results)
    assert set(results[0].failures) == {1}
    assert isinstance(results[1].__cause__, ShapeMismatchError)


# Save counter and manager -------------------------------------------------------------


def test_save_with_a_coordinator_numbers_alike_on_every_rank(tmp_path: Any) -> None:
    full = global_value((8, 2))
    boxes = row_boxes(full.shape, 2)

    def work(coordinator: Any) -> Any:
        ckpt = zc.Checkpoint(w=sharded(full, boxes[coordinator.rank]))
        prefix = str(tmp_path / "run")
        return [ckpt.save(prefix, options=NO_FSYNC, coordinator=coordinator) for _ in range(2)]

    results = run_ranks(2, work)
    assert results == [[str(tmp_path / "run-1"), str(tmp_path / "run-2")]] * 2


def test_a_manager_with_a_coordinator_agrees_on_every_rank(tmp_path: Any) -> None:
    full = global_value((12, 4))
    boxes = row_boxes(full.shape, 3)
    directory = str(tmp_path)

    def work(coordinator: Any) -> Any:
        w = sharded(full, boxes[coordinator.rank])
        manager = zc.CheckpointManager(
            zc.Checkpoint(w=w), directory, max_to_keep=2, options=NO_FSYNC, coordinator=coordinator
        )
        restored = manager.restore_or_initialize()
        paths = []
        for step in range(3):
            w.assign(w.numpy() + 1)
            paths.append(manager.save(metrics={"step": step}))
        manager.wait()
        return restored, paths, manager.checkpoints, manager.latest_checkpoint

    results = run_ranks(3, work)
    assert all(r == results[0] for r in results)
    restored, paths, kept, latest = results[0]
    assert restored is None
    assert paths == [os.path.join(directory, f"ckpt-{n}") for n in (1, 2, 3)]
    assert kept == paths[1:] and latest == paths[2]
    assert sorted(n for n in os.listdir(directory) if n.startswith("ckpt-")) == ["ckpt-2", "ckpt-3"]

    def resume(coordinator: Any) -> Any:
        w = zc.Variable.sharded(np.zeros((6, 4), np.float32), (12, 4), (6 * coordinator.rank, 0))
        manager = zc.CheckpointManager(
            zc.Checkpoint(w=w), directory, max_to_keep=2, options=NO_FSYNC, coordinator=coordinator
        )
        restored = manager.restore_or_initialize()
        return (
            restored,
            np.array_equal(w.numpy(), full[6 * coordinator.rank :][:6] + 3),
            manager.save(),
        )

    assert run_ranks(2, resume) == [(paths[2], True, os.path.join(directory, "ckpt-4"))] * 2


# Object stores --------------------------------------------------------------------


def test_distributed_save_on_an_object_store_commits_one_attempt() -> None:
    root = f"memory://dist-{uuid.uuid4().hex}"
    full = global_value((40, 8))
    path = f"{root}/ckpt"
    save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 2)}, 2, {"b": np.arange(3.0)})
    layouts = {"w": row_boxes(full.shape, 3, axis=1)}
    assert [
        ok for ok, _ in restore_ranks(path, {"w": full}, layouts, 3, {"b": np.arange(3.0)})
    ] == [True] * 3
    assert zc.list_checkpoints(root)[0].committed


# Hypothesis: any layout to any layout ---------------------------------------------------


@st.composite
def grids(draw: Any, shape: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    """A block layout of at most 8 blocks: each axis cut at random (irregular) points."""
    cuts = []
    budget = 8
    for n in shape:
        most = min(n - 1, budget // max(1, math.prod(len(c) for c in cuts)) - 1, 3)
        k = draw(st.integers(0, max(most, 0)))
        points = draw(st.sets(st.integers(1, n - 1), min_size=k, max_size=k)) if k else set()
        edges = [0, *sorted(points), n]
        cuts.append(list(itertools.pairwise(edges)))
    return [list(box) for box in itertools.product(*cuts)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_layout_restores_bit_exact_into_any_other_and_no_chunk_has_two_writers(
    data: Any,
) -> None:
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 13), min_size=ndim, max_size=ndim)))
    dtype = data.draw(st.sampled_from([np.float32, np.int16, np.float64]))
    full = global_value(shape, dtype, data.draw(st.integers(0, 1000)))
    saved = data.draw(grids(shape))
    restored = data.draw(grids(shape))
    chunk_bytes = data.draw(st.sampled_from([16, 64, 1 << 20]))
    options = zc.CheckpointOptions(fsync=False, chunk_bytes=chunk_bytes)
    path = f"memory://hyp-{uuid.uuid4().hex}/ckpt"
    writes: list[str] = []
    lock = threading.Lock()
    original = _storage.FsspecStorage.write

    def counting(self: Any, key: str, parts: Any) -> None:
        with lock:
            writes.append(key)
        original(self, key, parts)

    _storage.FsspecStorage.write = counting  # type: ignore[method-assign]
    try:
        results = save_ranks(path, {"w": full}, {"w": saved}, len(saved), options=options)
    finally:
        _storage.FsspecStorage.write = original  # type: ignore[method-assign]
    assert all(r[0] == path for r in results), results
    chunks = [k for k in writes if re.search(r"/c(\.\d+)*$", k)]
    assert len(chunks) == len(set(chunks))  # no chunk written twice, by any rank
    layout = zarr.open_array(
        zc.inspection.zarr_group_url(path) + "/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r"
    )
    assert len(chunks) == math.prod(layout.cdata_shape)
    assert np.array_equal(layout[...], full)  # plain zarr reads every grid alike
    outcome = restore_ranks(path, {"w": full}, {"w": restored}, len(restored))
    assert [ok for ok, _ in outcome] == [True] * len(restored)


# Column chunks: every reader --------------------------------------------------------


def test_a_column_sharded_checkpoint_is_read_by_every_reader(tmp_path: Any) -> None:
    import subprocess
    import sys

    import tensorstore as ts

    full = global_value((64, 48))
    path = str(tmp_path / "cols")
    save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 4, axis=1)}, 4)
    key = "w/.ATTRIBUTES/VARIABLE_VALUE"
    assert zarr.open_array(f"{path}/{key}", mode="r").chunks == (64, 12)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{key}"}}
    assert np.array_equal(ts.open(spec).result().read().result(), full)
    assert np.array_equal(zc.load_variable(path, "w", np.s_[3:40, 5:30]), full[3:40, 5:30])
    assert zc.verify(path).files == 4 + 5  # chunks, 4 zarr.json files, the record
    copied = zc.copy_checkpoint(path, str(tmp_path / "copy"))
    assert np.array_equal(zc.load_variable(copied, "w"), full)
    shown = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "show", path], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "[64, 12]" in shown.stdout


def test_restoring_a_block_from_column_chunks_holds_one_budget_of_chunks(tmp_path: Any) -> None:
    from conftest import traced_peak

    full = global_value((4096, 256))  # 4 MiB saved by 4 ranks as 1 MiB column chunks
    path = str(tmp_path / "cols")
    save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 4, axis=1)}, 4)
    block = zc.Variable.sharded(np.zeros((2048, 256), np.float32), full.shape, (1024, 0))
    ckpt = zc.Checkpoint(w=block)
    options = zc.CheckpointOptions(inflight_bytes=1 << 20, threads=4)
    peak = traced_peak(lambda: ckpt.restore(path, options=options))
    assert np.array_equal(block.numpy(), full[1024:3072])
    # Each of the 4 chunks is read whole (1 MiB) into a buffer, one at a time.
    assert peak < (1 << 20) + (512 << 10), peak


def test_restoring_a_block_from_row_chunks_reads_straight_into_it(tmp_path: Any) -> None:
    """Row chunks inside a row block are read into the block's memory: no chunk buffer.

    (A region is ``slice(a, b)``, whose step is None: this once counted as "not
    step 1", and every chunk of every sharded restore went through a buffer.)
    """
    from conftest import traced_peak

    full = global_value((4096, 256))  # 4 MiB saved by 4 ranks: one 1 MiB chunk per block
    path = str(tmp_path / "rows")
    save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, 4)}, 4)
    assert zarr.open_array(f"{path}/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r").chunks == (1024, 256)
    block = zc.Variable.sharded(np.zeros((2048, 256), np.float32), full.shape, (1024, 0))
    ckpt = zc.Checkpoint(w=block)
    peak = traced_peak(lambda: ckpt.restore(path).assert_consumed())
    assert np.array_equal(block.numpy(), full[1024:3072])
    assert peak < 256 << 10, peak  # not one 1 MiB chunk buffer


def test_resharding_two_to_four_and_four_to_two_reads_only_what_each_rank_needs(
    tmp_path: Any,
) -> None:
    full = global_value((4096, 2048))  # 32 MiB: 16 MiB blocks on 2 ranks, 8 MiB on 4
    for saved, restored in ((2, 4), (4, 2)):
        path = str(tmp_path / f"from-{saved}")
        save_ranks(path, {"w": full}, {"w": row_boxes(full.shape, saved)}, saved)
        results = restore_ranks(path, {"w": full}, {"w": row_boxes(full.shape, restored)}, restored)
        chunks = zarr.open_array(f"{path}/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r").nchunks
        needed = full.nbytes // restored
        # Exactly each rank's block, plus the 4-byte CRC of each chunk it reads.
        assert results == [(True, needed + 4 * chunks // restored)] * restored


@pytest.mark.parametrize("compression", [None, zc.Zstd()])
def test_edge_chunks_short_along_an_inner_axis_are_padded_inside_rows_as_zarr_does(
    tmp_path: Any, compression: Any
) -> None:
    import tensorstore as ts

    full = global_value((13, 11), np.float64)
    boxes = [[(0, 13), (0, 4)], [(0, 13), (4, 11)]]  # chunks (13, 4): the last holds 3 columns
    path = str(tmp_path / "ckpt")
    options = zc.CheckpointOptions(
        fsync=False, compression={} if compression is None else {"*": compression}
    )
    save_ranks(path, {"w": full}, {"w": boxes}, 2, options=options)
    key = f"{path}/w/.ATTRIBUTES/VARIABLE_VALUE"
    array = zarr.open_array(key, mode="r")
    assert array.chunks == (13, 4)
    assert np.array_equal(array[...], full)
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": key}}
    assert np.array_equal(ts.open(spec).result().read().result(), full)
    whole = zc.Variable(np.zeros_like(full))
    zc.Checkpoint(w=whole).restore(path).assert_consumed()
    assert np.array_equal(whole.numpy(), full)
    assert np.array_equal(zc.load_variable(path, "w", np.s_[2:9, 7:11]), full[2:9, 7:11])


def test_ranks_saving_into_a_missing_bucket_are_told_to_create_it(s3_storage_options: Any) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    full = global_value((8, 4))
    results = save_ranks(
        f"s3://{bucket}/run/ckpt",
        {"w": full},
        {"w": row_boxes(full.shape, 2)},
        2,
        storage_options=s3_storage_options,
    )
    assert all(isinstance(r, DistributedSaveError) for r in results), results
    assert all(set(r.failures) == {0, 1} for r in results)
    assert bucket in str(results[0]) and "never creates buckets" in str(results[0])


def test_s3_distributed_save_and_restore_by_another_number_of_ranks(
    s3_url: str, s3_storage_options: Any
) -> None:
    full = global_value((96, 40))
    path = f"{s3_url}/run/ckpt"
    results = save_ranks(
        path, {"w": full}, {"w": row_boxes(full.shape, 3)}, 3, storage_options=s3_storage_options
    )
    assert [r[0] for r in results] == [path] * 3
    layouts = {"w": row_boxes(full.shape, 2, axis=1)}
    outcome = restore_ranks(path, {"w": full}, layouts, 2, storage_options=s3_storage_options)
    assert [ok for ok, _ in outcome] == [True, True]
    group = zc.inspection.zarr_group_url(path, storage_options=s3_storage_options)
    array = zarr.open_array(
        f"{group}/w/.ATTRIBUTES/VARIABLE_VALUE", mode="r", storage_options=s3_storage_options
    )
    assert np.array_equal(array[...], full)


def test_a_rank_holding_none_of_a_value_passes_an_empty_block(tmp_path: Any) -> None:
    full = global_value((12, 5))
    boxes = [[(0, 7), (0, 5)], [(7, 12), (0, 5)], [(0, 0), (0, 5)]]  # rank 2: no rows
    path = str(tmp_path / "ckpt")
    results = save_ranks(path, {"w": full}, {"w": boxes}, 3)
    assert [r[0] for r in results] == [path] * 3
    # No chunk: only its share of the metadata (one group's zarr.json).
    assert (results[2][1].files, results[2][1].nbytes) == (1, len(group_metadata()))
    assert np.array_equal(zc.load_variable(path, "w"), full)
    assert [ok for ok, _ in restore_ranks(path, {"w": full}, {"w": boxes}, 3)] == [True] * 3
