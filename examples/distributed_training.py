"""The training program of examples/distributed_torch.py and examples/distributed_mpi.py.

Each rank holds a block of rows of two matrices (``zc.Variable.sharded``) and
a copy of the replicated values (a bias and the step). :func:`run` restores
the latest checkpoint of the directory, trains, and saves a checkpoint after
every step; all ranks write one checkpoint together through the coordinator
the launcher made. ``--check`` restores the latest checkpoint with however
many ranks run it, checks every value and saves nothing: each rank reads
only the chunks that overlap its rows.

The values are a function of the step (see ``expected``), so every rank checks
its own block after restoring and after training, and rank 0 prints one line
``RESULT {json}`` at the end for scripts (tests/test_distributed_docs.py).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import zarrckpt as zc
from zarrckpt.distributed import Coordinator, even_split

EMBEDDING = (10, 6)  # 10 rows over 3 ranks: blocks of 4, 3, 3 rows
KERNEL = (12, 8)  # 12 rows over 3 ranks: blocks of 4 rows each


def expected(name: str, step: int) -> np.ndarray:
    """The whole value of ``name`` after ``step`` training steps."""
    if name == "embedding":
        rows, cols = EMBEDDING
        start = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
        return start + step * np.arange(1, rows + 1, dtype=np.float32)[:, None]
    if name == "kernel":
        rows, cols = KERNEL
        start = np.subtract.outer(np.arange(rows), np.arange(cols)).astype(np.float32) / 4
        return start + np.float32(0.5 * step)
    if name == "bias":
        return np.full(KERNEL[1], step, np.float32)
    raise KeyError(name)


class Model(zc.AutoTrackable):
    """This rank's part of the model: blocks of rows of two matrices, one replicated bias."""

    def __init__(self, rank: int, world_size: int) -> None:
        rows = {}  # name -> (start, stop): this rank's rows of each sharded matrix
        for name, shape in (("embedding", EMBEDDING), ("kernel", KERNEL)):
            start, stop = even_split(shape[0], world_size, rank)
            rows[name] = (start, stop)
            block = expected(name, 0)[start:stop]
            setattr(self, name, zc.Variable.sharded(block, shape, (start, 0)))
        self.bias = zc.Variable(expected("bias", 0))  # plain Variable: replicated
        self.rows = zc.NoDependency(rows)  # bookkeeping, not state: never saved

    def train_step(self) -> None:
        """Deterministic "training": each value moves by a fixed amount per step."""
        start, stop = self.rows["embedding"]
        self.embedding.assign_add(np.arange(start + 1, stop + 1, dtype=np.float32)[:, None])
        self.kernel.assign_add(np.float32(0.5))
        self.bias.assign_add(np.float32(1.0))

    def check(self, step: int) -> None:
        """Every value this rank holds is the one ``step`` steps give."""
        for name in ("embedding", "kernel"):
            start, stop = self.rows[name]
            mine = getattr(self, name).numpy()
            assert np.array_equal(mine, expected(name, step)[start:stop]), (name, step)
        assert np.array_equal(self.bias.numpy(), expected("bias", step)), ("bias", step)


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dir", required=True, help="the checkpoint directory (shared)")
    parser.add_argument("--steps", type=int, default=3, help="training steps to run")
    parser.add_argument("--check", action="store_true", help="restore the latest and check it")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per collective")
    return parser.parse_args()


def run(coordinator: Coordinator, args: argparse.Namespace) -> None:
    """Train and checkpoint (or ``--check`` the latest checkpoint) on every rank."""
    rank, world_size = coordinator.rank, coordinator.world_size

    model = Model(rank, world_size)
    step = zc.Variable(np.int64(0))  # replicated: every rank holds the same step
    ckpt = zc.Checkpoint(model=model, step=step)
    manager = zc.CheckpointManager(
        ckpt, args.dir, max_to_keep=3, step_counter=step, coordinator=coordinator
    )
    result: dict[str, object] = {"world_size": world_size}

    if args.check:
        latest = manager.latest_checkpoint  # the same on every rank (rank 0 listed it)
        if latest is None:
            raise SystemExit(f"{args.dir}: no checkpoint to check")
        status = ckpt.restore(latest, coordinator=coordinator)
        status.assert_consumed()
        model.check(int(step))
        stats = status.io_stats  # what this rank read: only chunks overlapping its rows
        reads = coordinator.all_gather_object((model.rows, stats.files, stats.nbytes))
        for r, (rows, files, nbytes) in enumerate(reads if rank == 0 else []):
            print(f"rank {r}/{world_size}: rows {rows}: read {files} chunk files, {nbytes} bytes")
        result.update(checked=latest, step=int(step), reads=reads)
    else:
        restored = manager.restore_or_initialize()  # None on the first run
        model.check(int(step))
        if rank == 0:
            print(f"restored {restored} at step {int(step)}" if restored else "starting afresh")
        for _ in range(args.steps):
            model.train_step()
            step.assign_add(1)
            path = manager.save(metrics={"loss": 1.0 / int(step)})  # every rank, same path
            if rank == 0:
                print(f"step {int(step)}: saved {path}")
        model.check(int(step))
        result.update(
            restored=restored,
            step=int(step),
            latest=manager.latest_checkpoint,
            checkpoints=manager.checkpoints,
        )

    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    manager.wait()  # background deletions of old checkpoints (rank 0)
