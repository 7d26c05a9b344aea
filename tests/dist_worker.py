"""One rank of tests/test_distributed_procs.py: real processes saving and restoring together.

Usage::

    python tests/dist_worker.py CONFIG.json             # gloo: env RANK, WORLD_SIZE,
                                                         # MASTER_ADDR, MASTER_PORT
    mpiexec -n N python tests/dist_worker.py CONFIG.json  # MPI

CONFIG holds ``backend`` ("gloo" or "mpi"), ``timeout`` (the coordinator's, in
seconds), ``out`` (a directory) and ``steps``: a list of ``{"name", "scenario",
...arguments}`` run in order by every rank. After each step the rank rewrites
``out/rank<r>.json`` (``{step name: result}``); arrays it restored go to
``out/<step>.rank<r>.<value>.npy`` as unsigned-integer views of their bits, so
the parent compares them bit for bit (NaN payloads too). An unexpected error
in a step is recorded as ``{"unexpected": traceback}`` and ends the rank with
exit status 1 (the others' next collective then fails within the timeout).

The model, its values and their block layouts are defined here and imported by
the parent test, so both sides agree on every byte. Importing this module
imports neither torch nor mpi4py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import zarrckpt as zc
from zarrckpt.distributed import even_split
from zarrckpt.errors import DistributedError, DistributedSaveError

# name: (global shape, dtype). "table" is always a plain (replicated) Variable.
VALUES: dict[str, tuple[tuple[int, ...], str]] = {
    "small": ((10, 6), "float32"),  # rows split unevenly (3, 3, 2, 2): chunks cross blocks
    "big": ((1000, 64), "float32"),  # rows split evenly: chunks aligned with the blocks
    "ints": ((37, 5), "int64"),  # rows split at skewed, irregular boundaries
    "bf16": ((48, 40), "bfloat16"),  # columns split evenly
    "grid": ((13, 11), "float64"),  # 4 ranks: 2 x 2 blocks cut at (7, 4)
    "table": ((7, 3), "float32"),  # replicated
}
REPLICATED = ("table",)
CHUNK_BYTES = 16 << 10  # small enough that every rank writes several chunks of "big"

Block = tuple[tuple[int, ...], tuple[int, ...]]  # (offset, block shape)


def dtype_of(name: str) -> np.dtype[Any]:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def bits_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The unsigned integer type of the same size: comparisons of views are bit-exact."""
    return np.dtype(f"u{dtype.itemsize}")


def global_value(name: str, version: int = 0) -> np.ndarray[Any, Any]:
    """The whole value ``name`` at ``version``: random bit patterns (NaNs too), deterministic."""
    shape, dtype_name = VALUES[name]
    dtype = dtype_of(dtype_name)
    seed = 1000 * version + sorted(VALUES).index(name)
    raw = np.random.default_rng(seed).integers(
        0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8
    )
    return raw.view(dtype).reshape(shape)


def _split(size: int, world: int, rank: int, axis: int, ndim: int, shape: tuple[int, ...]) -> Block:
    start, stop = even_split(size, world, rank)
    offset = tuple(start if a == axis else 0 for a in range(ndim))
    block = tuple(stop - start if a == axis else shape[a] for a in range(ndim))
    return offset, block


def block_of(name: str, layout: str, rank: int, world: int) -> Block | None:
    """Where rank ``rank`` of ``world`` holds ``name`` in ``layout``; None: a plain Variable.

    layouts: "mixed" (each value its own split, as VALUES says), "rows" (every
    value split by rows, evenly), "cols" (by columns), "plain" (no blocks),
    "mostly_plain" (only "bf16" and "grid" split, by rows).
    """
    shape, _ = VALUES[name]
    if layout == "plain" or name in REPLICATED:
        return None
    if layout == "mostly_plain":
        layout = "rows" if name in ("bf16", "grid") else "plain"
        return block_of(name, layout, rank, world)
    if layout == "rows":
        return _split(shape[0], world, rank, 0, 2, shape)
    if layout == "cols":
        return _split(shape[1], world, rank, 1, 2, shape)
    assert layout == "mixed", layout
    if name == "ints":  # boundaries at 37 * (r / world)^2: 0, 2, 9, 21, 37 for 4 ranks
        start, stop = (round(shape[0] * (r / world) ** 2) for r in (rank, rank + 1))
        return (start, 0), (stop - start, shape[1])
    if name == "bf16":
        return _split(shape[1], world, rank, 1, 2, shape)
    if name == "grid" and world == 4:
        rows = ((0, 7), (7, 13))[rank // 2]
        cols = ((0, 4), (4, 11))[rank % 2]
        return (rows[0], cols[0]), (rows[1] - rows[0], cols[1] - cols[0])
    return _split(shape[0], world, rank, 0, 2, shape)


def region(block: Block) -> tuple[slice, ...]:
    offset, shape = block
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def build(
    layout: str,
    rank: int,
    world: int,
    version: int | None = 0,
    names: tuple[str, ...] | None = None,
    blocks: dict[str, Block] | None = None,
) -> tuple[zc.Checkpoint, dict[str, zc.Variable]]:
    """A Checkpoint of ``model`` holding this rank's part of every value.

    ``version`` None fills the variables with 0x5A bytes (a restore must
    overwrite all of them); ``blocks`` overrides ``block_of`` for some values.
    """
    variables: dict[str, zc.Variable] = {}
    model = zc.AutoTrackable()
    for name in names or tuple(VALUES):
        shape, dtype_name = VALUES[name]
        dtype = dtype_of(dtype_name)
        block = (blocks or {}).get(name, block_of(name, layout, rank, world))
        part_shape = shape if block is None else block[1]
        if version is None:
            part = np.full(math.prod(part_shape) * dtype.itemsize, 0x5A, np.uint8)
            part = part.view(dtype).reshape(part_shape)
        else:
            whole = global_value(name, version)
            part = whole if block is None else whole[region(block)]
        if block is None:
            variable = zc.Variable(part)
        else:
            variable = zc.Variable.sharded(part, shape, block[0])
        setattr(model, name, variable)
        variables[name] = variable
    return zc.Checkpoint(model=model), variables


# The rank's side ---------------------------------------------------------------


class Rank:
    """One rank: its coordinator and its results."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.out = Path(config["out"])
        self.backend = config["backend"]
        timeout = float(config["timeout"])
        if self.backend == "gloo":
            import datetime

            import torch.distributed as dist

            log("torch imported")
            dist.init_process_group(
                "gloo",
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=datetime.timedelta(seconds=timeout),
            )
            log("process group initialized")
            self.coordinator: Any = zc.distributed.TorchCoordinator(timeout=timeout)
        else:
            self.coordinator = zc.distributed.MPICoordinator(timeout=timeout)
        self.rank = self.coordinator.rank
        self.world = self.coordinator.world_size
        self.results: dict[str, Any] = {}
        self.storage_options = config.get("storage_options")

    def record(self, step: str, result: Any) -> None:
        self.results[step] = result
        path = self.out / f"rank{self.rank}.json"
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.results, indent=1))
        os.replace(temp, path)

    def dump(self, step: str, variables: dict[str, zc.Variable]) -> dict[str, Any]:
        """Save each variable's bits for the parent; return where each block lies."""
        where = {}
        for name, variable in variables.items():
            array = variable.numpy()
            np.save(
                self.out / f"{step}.rank{self.rank}.{name}.npy", array.view(bits_dtype(array.dtype))
            )
            where[name] = {"offset": list(variable.offset), "shape": list(variable.shape)}
        return where

    def error(self, exc: BaseException, started: float) -> dict[str, Any]:
        return {
            "type": type(exc).__name__,
            "message": str(exc),
            "failures": {str(k): v for k, v in getattr(exc, "failures", {}).items()},
            "seconds": time.monotonic() - started,
        }

    # Scenarios ---------------------------------------------------------------

    def save(self, step: dict[str, Any]) -> dict[str, Any]:
        """Write the model in ``layout`` at ``version`` to ``path``; what this rank wrote."""
        ckpt, variables = build(step["layout"], self.rank, self.world, step.get("version", 0))
        options = zc.CheckpointOptions(
            chunk_bytes=step.get("chunk_bytes", CHUNK_BYTES),
            enable_async=bool(step.get("async")),
        )
        written: list[str] = []
        with _recording_writes(written, step.get("record_writes", False)):
            path = ckpt.write(
                step["path"],
                options=options,
                storage_options=self.storage_options,
                coordinator=self.coordinator,
            )
            if step.get("async"):  # written in the background: the values of the call
                for variable in variables.values():
                    variable.numpy()[...] = 0
                ckpt.wait_until_finished()
        result = {"path": path, "nbytes": ckpt.last_write_stats.nbytes}
        if step.get("record_writes"):
            result["written"] = written
        return result

    def restore(self, step: dict[str, Any]) -> dict[str, Any]:
        """Restore ``path`` into a model of ``layout`` filled with 0x5A; dump the blocks."""
        ckpt, variables = build(step["layout"], self.rank, self.world, version=None)
        status = ckpt.restore(
            step["path"],
            options=zc.CheckpointOptions(chunk_bytes=CHUNK_BYTES),
            storage_options=self.storage_options,
            coordinator=self.coordinator,
        )
        status.assert_existing_objects_matched()
        return {"blocks": self.dump(step["name"], variables), "nbytes": status.io_stats.nbytes}

    def overlap(self, step: dict[str, Any]) -> dict[str, Any]:
        """Rank 1's block of "big" starts 5 rows inside rank 0's: every rank must refuse."""
        blocks = {}
        if self.rank == 1:
            (start, _), (rows, cols) = block_of("big", "rows", 1, self.world)
            blocks["big"] = ((start - 5, 0), (rows, cols))
        ckpt, _ = build("rows", self.rank, self.world, blocks=blocks)
        started = time.monotonic()
        try:
            ckpt.write(step["path"], coordinator=self.coordinator)
        except DistributedSaveError as exc:
            return self.error(exc, started)
        return {"type": None}

    def failing_rank(self, step: dict[str, Any]) -> dict[str, Any]:
        """A good save of version 1, then a save of version 2 whose rank 1 fails while writing."""
        ckpt, variables = build("mixed", self.rank, self.world, version=1)
        good = ckpt.save(step["prefix"], coordinator=self.coordinator)
        for name, variable in variables.items():  # the model moves on to version 2
            block = block_of(name, "mixed", self.rank, self.world)
            whole = global_value(name, 2)
            variable.assign(whole if block is None else whole[region(block)])

        def progress(nbytes: int) -> None:
            if self.rank == 1:
                raise RuntimeError(f"injected failure on rank 1 after a file of {nbytes} bytes")

        options = zc.CheckpointOptions(chunk_bytes=CHUNK_BYTES, progress=progress)
        started = time.monotonic()
        try:
            ckpt.save(step["prefix"], options=options, coordinator=self.coordinator)
        except DistributedSaveError as exc:
            result = self.error(exc, started)
        else:
            result = {"type": None}
        result["good"] = good
        result["save_counter"] = int(ckpt.save_counter)
        return result

    def killed_rank(self, step: dict[str, Any]) -> dict[str, Any]:
        """A good save (ckpt-1), then a save during which rank ``victim`` SIGKILLs itself."""
        ckpt, _ = build("mixed", self.rank, self.world, version=1)
        good = ckpt.save(step["prefix"], coordinator=self.coordinator)
        self.record(step["name"], {"good": good})  # what the victim leaves
        victim = step["victim"]

        def progress(nbytes: int) -> None:
            if self.rank == victim:
                os.kill(os.getpid(), signal.SIGKILL)

        options = zc.CheckpointOptions(chunk_bytes=CHUNK_BYTES, progress=progress)
        started = time.monotonic()
        try:
            ckpt.save(step["prefix"], options=options, coordinator=self.coordinator)
        except DistributedError as exc:
            result = self.error(exc, started)
        else:
            result = {"type": None, "seconds": time.monotonic() - started}
        result["good"] = good
        try:  # the group lost a rank: the coordinator refuses to go on, at once
            started = time.monotonic()
            self.coordinator.barrier()
            result["after"] = "barrier passed"
        except DistributedError as exc:
            result["after"] = str(exc)
        result["after_seconds"] = time.monotonic() - started
        return result

    def manager(self, step: dict[str, Any]) -> dict[str, Any]:
        """A CheckpointManager(max_to_keep=2): restore_or_initialize, then ``saves`` saves.

        The model holds version ``first_version + i`` at save i (and is checked
        after the restore by the parent from the dumped blocks).
        """
        ckpt, variables = build("mixed", self.rank, self.world, version=None)
        manager = zc.CheckpointManager(
            ckpt, step["directory"], max_to_keep=2, coordinator=self.coordinator
        )
        result: dict[str, Any] = {"found": manager.checkpoints}
        result["restored"] = manager.restore_or_initialize()
        result["save_counter"] = int(ckpt.save_counter)
        result["blocks"] = self.dump(step["name"], variables)
        paths, views = [], []
        for i in range(step["saves"]):
            for name, variable in variables.items():
                block = block_of(name, "mixed", self.rank, self.world)
                whole = global_value(name, step["first_version"] + i)
                variable.assign(whole if block is None else whole[region(block)])
            paths.append(manager.save(options=zc.CheckpointOptions(chunk_bytes=CHUNK_BYTES)))
            views.append({"checkpoints": manager.checkpoints, "latest": manager.latest_checkpoint})
        if self.rank == 0:
            manager.wait()
        self.coordinator.barrier()  # the parent looks at the directory once every rank is done
        result.update(paths=paths, views=views)
        return result

    def run(self) -> int:
        log(f"rank {self.rank} of {self.world} ready")
        for step in self.config["steps"]:
            scenario = getattr(self, step["scenario"])
            try:
                result = scenario(step)
            except BaseException:
                self.record(step["name"], {"unexpected": traceback.format_exc()})
                log(f"step {step['name']!r} failed")
                return 1
            self.record(step["name"], result)
            log(f"step {step['name']!r} done")
        return 0


EPOCH = float(os.environ.get("DIST_WORKER_EPOCH", time.time()))  # the parent's launch time


def log(message: str) -> None:
    """A line of the rank's log, timed from the launch (the parent shows failed launches' logs)."""
    print(f"[{time.time() - EPOCH:7.2f} s] {message}", flush=True)


@contextlib.contextmanager
def _recording_writes(keys: list[str], enabled: bool) -> Iterator[None]:
    """Append to ``keys`` every key this process writes through LocalStorage meanwhile."""
    from zarrckpt._storage import LocalStorage

    original = LocalStorage.write

    def write(self: LocalStorage, key: str, parts: Any) -> None:
        keys.append(key)
        original(self, key, parts)

    if enabled:
        LocalStorage.write = write  # type: ignore[method-assign]
    try:
        yield
    finally:
        LocalStorage.write = original  # type: ignore[method-assign]


def main() -> int:
    log("imported")
    config = json.loads(Path(sys.argv[1]).read_text())
    rank = Rank(config)
    status = rank.run()
    sys.stdout.flush()
    sys.stderr.flush()
    if rank.backend == "gloo":
        if status == 0 and not config.get("broken_group"):
            import torch.distributed as dist

            dist.destroy_process_group()
        log("exiting")
        # A group a rank left (died, or failed) may block at exit: leave at once.
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
