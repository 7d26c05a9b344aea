"""Child program of tests/test_crash.py: resume from the latest checkpoint, then save one step.

Usage::

    python tests/crash_child.py --dir URL [--storage-options JSON] --seed S --size BYTES
        --step N [--chunk-bytes B] [--threads T] [--data-signal-bytes D]

Builds a deterministic model (a few float32 Variables totalling ``--size``
bytes whose bit patterns are a function of ``(seed, step)``), restores the
latest committed checkpoint in ``--dir`` if there is one and checks that it
holds exactly the model of the step it names, then saves step N with a
CheckpointManager (max_to_keep=3). It prints, one line each, flushed:

    RESUMED <path|-> <step|->   what was restored (or "-" for a fresh start)
    READY                      the save starts now (the parent's clock starts here);
                               the disk was synced just before, so saves time alike
    DATA                       with --data-signal-bytes D: the save has written D bytes
                               of data files (CheckpointOptions.progress), i.e. all of
                               them; what follows is the commit
    SAVED <path> <json>        save() returned; json holds the child's timings
    DONE                       background deletions of old checkpoints finished

Exit status 3 means the restored checkpoint did not hold the model it names.
The parent kills this program with SIGKILL at random moments of the save.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from typing import Any

import numpy as np

import zarrckpt as zc

ROW = 256  # float32 values per row: every array is (rows, ROW)
SHARES = (0.4, 0.3, 0.2, 0.1)  # of the rows, per array
MAX_TO_KEEP = 3
CHECKPOINT_NAME = "ckpt"


def array_shapes(size: int) -> list[tuple[int, int]]:
    """Shapes of the model's arrays: (rows, ROW) float32, totalling ``size`` bytes exactly."""
    row_bytes = ROW * 4
    if size % row_bytes or size // row_bytes < len(SHARES):
        raise ValueError(f"--size must be a multiple of {row_bytes} and at least {4 * row_bytes}")
    rows = size // row_bytes
    counts = [max(1, int(rows * share)) for share in SHARES[:-1]]
    counts.append(rows - sum(counts))
    return [(count, ROW) for count in counts]


def model_values(seed: int, step: int, size: int) -> list[np.ndarray]:
    """The model's arrays at ``step``: random bit patterns (NaN payloads too), float32."""
    values = []
    for index, shape in enumerate(array_shapes(size)):
        rng = np.random.default_rng([seed, step, index])
        bits = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
        values.append(bits.view(np.float32))
    return values


class CrashModel(zc.AutoTrackable):
    """A few float32 Variables, zero until restored or assigned."""

    def __init__(self, seed: int, size: int) -> None:
        for index, shape in enumerate(array_shapes(size)):
            setattr(self, f"w{index}", zc.Variable(np.zeros(shape, np.float32)))

    def variables(self) -> list[zc.Variable]:
        return [getattr(self, f"w{index}") for index in range(len(SHARES))]


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))
    )


def step_of(path: str) -> int:
    match = re.search(rf"{CHECKPOINT_NAME}-(\d+)/*$", path)
    if match is None:
        raise ValueError(f"{path} is not named {CHECKPOINT_NAME}-<step>")
    return int(match.group(1))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class DataSignal:
    """A ``CheckpointOptions.progress`` that prints DATA once ``total`` bytes are written."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.said = total, 0, False
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if not self.said and self.done >= self.total:
                self.said = True
                say("DATA")


class TimedCheckpoint(zc.Checkpoint):
    """A Checkpoint that remembers when its last write (data + commit) started and ended."""

    def write(self, path: Any, **kwargs: Any) -> str:
        object.__setattr__(self, "_crash_write_start", time.perf_counter())
        result = super().write(path, **kwargs)
        object.__setattr__(self, "_crash_write_end", time.perf_counter())
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--storage-options", default=None)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--data-signal-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    signal = DataSignal(args.data_signal_bytes) if args.data_signal_bytes else None
    storage_options = json.loads(args.storage_options) if args.storage_options else None

    model = CrashModel(args.seed, args.size)
    checkpoint = TimedCheckpoint(model=model)
    manager = zc.CheckpointManager(
        checkpoint,
        args.dir,
        max_to_keep=MAX_TO_KEEP,
        checkpoint_name=CHECKPOINT_NAME,
        storage_options=storage_options,
        options=zc.CheckpointOptions(
            chunk_bytes=args.chunk_bytes, threads=args.threads, progress=signal
        ),
    )

    # Resume: the latest committed checkpoint must hold exactly the model of its step.
    latest = zc.latest_checkpoint(args.dir, storage_options)
    if latest is None:
        say("RESUMED - -")
    else:
        checkpoint.restore(latest, storage_options=storage_options).assert_consumed()
        resumed_step = step_of(latest)
        expected = model_values(args.seed, resumed_step, args.size)
        for variable, want in zip(model.variables(), expected, strict=True):
            if not same_bits(variable.numpy(), want):
                say(f"RESUME-MISMATCH {latest}")
                return 3
        say(f"RESUMED {latest} {resumed_step}")

    # Train to step N (deterministically), then save it.
    for variable, value in zip(
        model.variables(), model_values(args.seed, args.step, args.size), strict=True
    ):
        variable.assign(value)
    # Start from a quiet disk (earlier deletions flushed), so the save time is reproducible.
    os.sync()
    say("READY")
    start = time.perf_counter()
    path = manager.save(checkpoint_number=args.step)
    end = time.perf_counter()
    stats = checkpoint.last_write_stats
    timings = {
        "save": end - start,
        "write_start": checkpoint.__dict__["_crash_write_start"] - start,
        "write_end": checkpoint.__dict__["_crash_write_end"] - start,
        "data": stats.seconds if stats is not None else None,
        "files": stats.files if stats is not None else None,
    }
    say(f"SAVED {path} {json.dumps(timings)}")
    manager.wait()
    say("DONE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
