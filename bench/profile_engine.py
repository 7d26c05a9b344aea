"""Where a zarrckpt save and cold restore spend their time, next to raw8 in the same process.

Usage: ``python3 bench/profile_engine.py [--size 2GiB] [--dtype float32] [--rounds 3]``;
``PYTHONPATH=/tmp/zc-old python3 bench/profile_engine.py`` profiles another checkout.

Each round writes the model with ``raw8`` (8 threads, one file per array, an
fsync each) and with ``zc.Checkpoint(...).write``, then drops the page cache
and reads both back into preallocated arrays (raw8: 8 threads of ``preadv``;
zarrckpt: ``Checkpoint.read``), in that interleaved order. zarrckpt's
functions are wrapped with timers: *wall* phases are the stretches the
calling thread spends in one step (they add up to the total), *thread-seconds*
are summed over the I/O threads (8 of them overlap, so they only show shares).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import _fs
import numpy as np
from _model import MiB, byte_view, generate, parse_size, transformer_specs

import zarrckpt as zc
from zarrckpt import _commit, _storage, array_io, checkpoint

OUT = Path(__file__).resolve().parent / "out"


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.seconds[name] += seconds
            self.calls[name] += 1

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)


TIMERS = Timers()


def wrap(owner: Any, attr: str, name: str) -> None:
    """Replace ``owner.attr`` by a version that adds its time to ``TIMERS[name]``.

    Skipped where ``owner`` has no ``attr`` (an older zarrckpt, for before/after runs).
    """
    original = getattr(owner, attr, None)
    if original is None:
        return

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMERS.add(name, time.perf_counter() - start)

    setattr(owner, attr, timed)


def instrument() -> None:
    # wall phases (caller thread)
    wrap(array_io, "write_arrays", "wall: data + metadata writes (write_arrays)")
    wrap(_commit.Commit, "finalize", "wall: commit (record, checks, _COMMIT, fsyncs, rename)")
    wrap(_storage.LocalStorage, "sync", "wall:   of which fsyncs (LocalStorage.sync)")
    wrap(_commit.Commit, "check_written", "wall:   of which listing check (check_written)")
    wrap(checkpoint, "build_save_plan", "wall: plan (object graph, record, value scan)")
    wrap(_commit.LocalCommit, "create", "wall: temporary directory")
    wrap(checkpoint, "open_committed", "wall: open (_COMMIT, manifest, record)")
    wrap(_commit.CommittedCheckpoint, "prefetch_metadata", "wall: array metadata prefetch")
    wrap(_commit.CommittedCheckpoint, "layout", "wall: array metadata (zarr.json, checks)")
    wrap(array_io, "read_arrays", "wall: chunk reads (read_arrays)")
    # thread-seconds (I/O threads)
    wrap(array_io, "_chunk_crc", "threads: CRC32C")
    wrap(_storage.LocalStorage, "_ensure_dir", "threads: makedirs")
    wrap(os, "fsync", "threads: every fsync (chunks as written, files, directories)")
    wrap(_storage, "fsync_directory", "threads: fsync of a directory")
    wrap(_storage, "_syncfs", "wall:   of which syncfs")
    wrap(_storage.LocalStorage, "prepare", "wall:   of which making directories (prepare)")
    wrap(array_io, "write_file", "threads: metadata file write")
    wrap(_storage.LocalStorage, "_open_regular", "threads: open for read (+ dir checks)")


def raw8_save(arrays: dict[str, np.ndarray], path: Path) -> None:
    def one(item: tuple[str, np.ndarray]) -> None:
        fd = os.open(path / f"{item[0]}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _fs.pwrite_all(fd, byte_view(item[1]))
            os.fsync(fd)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, arrays.items()))
    _fs.fsync_tree(path)


def raw8_restore(live: dict[str, np.ndarray], path: Path) -> None:
    def one(item: tuple[str, np.ndarray]) -> None:
        fd = os.open(path / f"{item[0]}.bin", os.O_RDONLY)
        try:
            _fs.pread_into(fd, byte_view(item[1]))
        finally:
            os.close(fd)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, live.items()))


def zarrckpt_save(model: Any, ckpt: str) -> None:
    with TIMERS.span("wall: Checkpoint.write"):
        zc.Checkpoint(model=model).write(ckpt)
    with TIMERS.span("wall: the harness's fsync of every file and directory"):
        _fs.fsync_tree(Path(ckpt))


def timed(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="2GiB")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=OUT / "profile")
    parser.add_argument("--pause", type=float, default=3.0, help="seconds idle before each step")
    args = parser.parse_args(argv)
    specs = transformer_specs(parse_size(args.size), args.dtype)
    arrays = {s.name: generate(s, 0) for s in specs}
    live = {name: np.zeros_like(a) for name, a in arrays.items()}
    model = zc.Dict({name: zc.Variable(a) for name, a in arrays.items()})
    target = zc.Dict({name: zc.Variable(a) for name, a in live.items()})
    total = sum(a.nbytes for a in arrays.values())
    print(f"{len(arrays)} arrays, {total / MiB:.0f} MiB {args.dtype}; zarrckpt {zc.__version__}")
    instrument()
    results: dict[str, list[float]] = defaultdict(list)
    phases: dict[int, dict[str, float]] = {}
    ckpt = str(args.dir / "zc")
    save = {"raw8": lambda: raw8_save(arrays, args.dir / "raw8"),
            "zarrckpt": lambda: zarrckpt_save(model, ckpt)}
    restore = {"raw8": lambda: raw8_restore(live, args.dir / "raw8"),
               "zarrckpt": lambda: zc.Checkpoint(model=target).read(ckpt).assert_consumed()}
    for round_ in range(args.rounds):
        # The virtual disk slows down for a while after a burst of writes, so the
        # order alternates between rounds and every timed step starts after a pause.
        order = ["raw8", "zarrckpt"] if round_ % 2 == 0 else ["zarrckpt", "raw8"]
        _fs.remove_tree(args.dir)
        (args.dir / "raw8").mkdir(parents=True)
        times: dict[str, float] = {}
        for kind, work in (("save", save), ("restore", restore)):
            for name in order:
                if kind == "restore":
                    _fs.drop_cache_tree(args.dir)
                os.sync()
                time.sleep(args.pause)
                TIMERS.seconds.clear()
                times[f"{name} {kind}"] = timed(work[name])
                if name == "zarrckpt":
                    phases.setdefault(round_, {}).update(
                        {f"{kind} {k}": v for k, v in TIMERS.seconds.items()})
        for key in sorted(times):
            results[key].append(times[key])
        print(f"round {round_ + 1} ({' first, '.join(order)} second): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(times.items())), flush=True)
    _fs.remove_tree(args.dir)
    print()
    for name, values in results.items():
        print(f"{name:<18} {statistics.median(values):6.2f} s "
              f"({min(values):.2f}-{max(values):.2f})")
    for kind in ("save", "restore"):
        ratios = [z / r for z, r in zip(results[f"zarrckpt {kind}"], results[f"raw8 {kind}"],
                                        strict=True)]
        print(f"zarrckpt {kind} / raw8: {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")
    print("\nphases (median seconds over rounds):")
    for key in sorted({k for p in phases.values() for k in p}):
        print(f"  {key:<72} {statistics.median(p.get(key, 0.0) for p in phases.values()):7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
