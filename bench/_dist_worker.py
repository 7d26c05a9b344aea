"""One rank of bench/distributed.py: a long-lived process of a gloo world on 127.0.0.1.

Started by bench/distributed.py with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` set, and a JSON job (``argv[1]``: model, seed, S3 options). It
builds its blocks of the model once (the source state, the same global values
whatever the world size), allocates the live state a load fills, then reads
one command per line (JSON) on stdin and answers one JSON line on the file
descriptor given as ``argv[2]`` (stdout itself goes to stderr, so nothing a
library prints can break the protocol):

* ``{"op": "warmup", "local": DIR, "s3": URL | null}``: a small save and load
  with both libraries on each storage, so imports and first-use costs (which
  would also count in ``rchar``) happen outside the measurements;
* ``{"op": "save" | "load", "lib": "zarrckpt" | "dcp", "storage": "local" | "s3",
  "path": ...}``: one measured operation;
* ``{"op": "quit"}``.

Every rank answers every command: ``seconds`` (from leaving a barrier before the
operation to leaving a barrier after it: the slowest rank's time, seen by
every rank), ``own_seconds`` (this rank's operation alone), ``rchar`` (the
``/proc/self/io`` delta around the operation, all threads), ``needed`` (this
rank's block bytes), ``peak_extra`` (VmHWM after the operation minus VmRSS
before it, the high-water mark reset through ``/proc/self/clear_refs``), and
for loads whether the live state now equals the source state.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np

GEN_ELEMENTS = 1 << 18  # elements per generated row group (1 MiB of float32)
WEIGHT_RANGE = 0.05


# Model -----------------------------------------------------------------------


def rows_of(shape: list[int], rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s rows of a Shard(0) value (the distributed script makes rows divisible)."""
    per = shape[0] // world
    return rank * per, (rank + 1) * per


def generate_rows(index: int, shape: list[int], seed: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of array ``index``: the same values whichever rank or world asks.

    Values come in row groups of about ``GEN_ELEMENTS`` elements, each from its own
    generator ``(seed, index, group)``, so a block costs at most two groups more
    than its own rows.
    """
    cols = math.prod(shape[1:])
    group = max(1, GEN_ELEMENTS // cols)
    out = np.empty((stop - start, cols), np.float32)
    for g in range(start // group, (stop - 1) // group + 1 if stop > start else 0):
        a, b = g * group, min((g + 1) * group, shape[0])
        values = np.random.default_rng([seed, index, g]).random((b - a) * cols, np.float32)
        values -= 0.5
        values *= 2 * WEIGHT_RANGE
        lo, hi = max(a, start), min(b, stop)
        out[lo - start : hi - start] = values.reshape(b - a, cols)[lo - a : hi - a]
    return out.reshape((stop - start, *shape[1:]))


class State:
    """This rank's source blocks and live (load target) blocks, for both libraries."""

    def __init__(self, specs: list[dict[str, Any]], seed: int, rank: int, world: int) -> None:
        import torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Replicate, Shard

        import zarrckpt as zc

        self.specs = specs
        self.mesh = init_device_mesh("cpu", (world,))
        self.source: dict[str, np.ndarray] = {}
        self.live: dict[str, np.ndarray] = {}
        self.where: dict[str, tuple[int, int] | None] = {}
        for spec in specs:
            shape = spec["shape"]
            if spec["sharded"]:
                start, stop = rows_of(shape, rank, world)
                self.where[spec["name"]] = (start, stop)
            else:
                start, stop = 0, shape[0]
                self.where[spec["name"]] = None
            self.source[spec["name"]] = generate_rows(spec["index"], shape, seed, start, stop)
            live = np.empty_like(self.source[spec["name"]])
            live.fill(np.nan)  # touched: a live model's memory
            self.live[spec["name"]] = live
        self.needed = sum(a.nbytes for a in self.live.values())

        def zc_state(arrays: dict[str, np.ndarray]) -> Any:
            variables = {}
            for spec in specs:
                name, array = spec["name"], arrays[spec["name"]]
                rows = self.where[name]
                if rows is None:
                    variables[name] = zc.Variable(array, copy=False)
                else:
                    offset = (rows[0],) + (0,) * (array.ndim - 1)
                    variables[name] = zc.Variable.sharded(
                        array, tuple(spec["shape"]), offset, copy=False
                    )
            return zc.Dict(variables)

        def dcp_state(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
            state = {}
            for spec in specs:
                name = spec["name"]
                placement = Shard(0) if self.where[name] is not None else Replicate()
                state[name] = DTensor.from_local(
                    torch.from_numpy(arrays[name]), self.mesh, [placement], run_check=False
                )
            return state

        self.zc_source, self.zc_live = zc_state(self.source), zc_state(self.live)
        self.dcp_source, self.dcp_live = dcp_state(self.source), dcp_state(self.live)

    def reset_live(self) -> None:
        for array in self.live.values():
            array.fill(np.nan)

    def live_matches(self) -> bool:
        return all(np.array_equal(self.live[k], self.source[k]) for k in self.source)


# Measurements ----------------------------------------------------------------


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


_http_body = [0]  # HTTP response body bytes received by this process (S3 reads)


def count_http_body_bytes() -> None:
    """Count every HTTP response body byte aiohttp receives (s3fs, for both libraries).

    Socket reads (recv) do not count in /proc/self/io's rchar, so S3 reads are
    counted where aiohttp's parser hands each piece of a body to its stream.
    """
    import aiohttp.streams

    original = aiohttp.streams.StreamReader.feed_data
    lock = threading.Lock()

    def feed_data(self: Any, data: bytes, *args: Any, **kwargs: Any) -> Any:
        with lock:
            _http_body[0] += len(data)
        return original(self, data, *args, **kwargs)

    aiohttp.streams.StreamReader.feed_data = feed_data  # type: ignore[method-assign]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


# Operations ------------------------------------------------------------------


class Worker:
    def __init__(self, job: dict[str, Any]) -> None:
        import torch.distributed as dist

        import zarrckpt as zc
        from zarrckpt.distributed import TorchCoordinator

        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        timeout = datetime.timedelta(seconds=job["timeout"])
        dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=timeout)
        self.dist = dist
        self.zc = zc
        self.coordinator = TorchCoordinator(timeout=job["timeout"])
        self.s3 = job["s3"]  # storage options, or None
        self.profile_rank = job.get("profile_rank")
        self.profile_dir = job.get("profile_dir", ".")
        if self.s3 is not None:
            count_http_body_bytes()
        started = time.perf_counter()
        self.state = State(job["specs"], job["seed"], self.rank, self.world)
        self.build_seconds = time.perf_counter() - started
        self.small = State(job["warmup_specs"], job["seed"], self.rank, self.world)

    def storage_options(self, storage: str) -> dict[str, Any] | None:
        return self.s3 if storage == "s3" else None

    def _save(self, state: State, lib: str, storage: str, path: str) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if lib == "zarrckpt":
            ckpt = self.zc.Checkpoint(model=state.zc_source)
            ckpt.write(
                path, coordinator=self.coordinator, storage_options=self.storage_options(storage)
            )
            stats = ckpt.last_write_stats
            info["written"] = stats.nbytes if stats is not None else None
        else:
            import torch.distributed.checkpoint as dcp

            if storage == "s3":
                from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

                # sync_files=False: with True, DCP falls back to os.sync() (the whole
                # machine's page cache) for every fsspec stream, which S3 durability
                # does not need.
                writer = FsspecWriter(path, sync_files=False, **self.s3)
            else:
                writer = dcp.FileSystemWriter(path)  # sync_files=True: fsync per file
            dcp.save(state.dcp_source, storage_writer=writer)
        return info

    def _load(self, state: State, lib: str, storage: str, path: str) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if lib == "zarrckpt":
            status = self.zc.Checkpoint(model=state.zc_live).restore(
                path, storage_options=self.storage_options(storage)
            )
            info["io_nbytes"] = status.io_stats.nbytes
            info["io_files"] = status.io_stats.files
            info["status"] = status  # asserted after the measurement
        else:
            import torch.distributed.checkpoint as dcp

            if storage == "s3":
                from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

                reader = FsspecReader(path, **self.s3)
            else:
                reader = dcp.FileSystemReader(path)
            dcp.load(state.dcp_live, storage_reader=reader)
        return info

    def measured(self, op: str, state: State, lib: str, storage: str, path: str) -> dict[str, Any]:
        if op == "load":
            state.reset_live()
        self.dist.barrier()
        rss_before = _status_kib("VmRSS")
        reset_peak()
        read_before, http_before = rchar(), _http_body[0]
        profile = None
        if self.rank == self.profile_rank and state is self.state:
            import cProfile

            profile = cProfile.Profile()
            profile.enable()
        start = time.perf_counter()
        info = (self._save if op == "save" else self._load)(state, lib, storage, path)
        own = time.perf_counter() - start
        if profile is not None:
            profile.disable()
            name = f"{op}-{lib}-{storage}-world{self.world}-{os.path.basename(path)}.pstats"
            profile.dump_stats(os.path.join(self.profile_dir, name))
        read = rchar() - read_before
        http = _http_body[0] - http_before
        peak = _status_kib("VmHWM")
        self.dist.barrier()
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {
            "seconds": seconds,
            "own_seconds": own,
            "rchar": read,
            "http_body": http,
            "read": read + http,
            "needed": state.needed,
            "peak_extra": peak - rss_before,
            "rss_before": rss_before,
        }
        status = info.pop("status", None)
        if status is not None:
            status.assert_consumed()
        result.update(info)
        if op == "load":
            result["verified"] = state.live_matches()
            if not result["verified"]:
                raise AssertionError(f"rank {self.rank}: loaded values differ from the source")
        return result

    def warmup(self, local: str, s3: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        for storage, root in (("local", local), ("s3", s3)):
            if root is None:
                continue
            for lib in ("zarrckpt", "dcp"):
                path = f"{root}/warmup-{lib}-w{self.world}"
                self.measured("save", self.small, lib, storage, path)
                self.measured("load", self.small, lib, storage, path)
        return {
            "seconds": time.perf_counter() - started,
            "build_seconds": self.build_seconds,
            "rss": _status_kib("VmRSS"),
        }

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "warmup":
            return self.warmup(command["local"], command.get("s3"))
        if op in ("save", "load"):
            return self.measured(
                op, self.state, command["lib"], command["storage"], command["path"]
            )
        raise ValueError(f"unknown op {op!r}")


def serve(make_worker: Any, argv: list[str]) -> int:
    """A worker's life: built from the job file ``argv[1]``, it answers one JSON line on
    file descriptor ``argv[2]`` per command line read on stdin, until "quit"."""
    with open(argv[1]) as f:
        job = json.loads(f.read())
    answers = os.fdopen(int(argv[2]), "w", buffering=1)
    os.dup2(2, 1)  # anything printed goes to the log, not into the answers
    sys.stdout = sys.stderr
    try:
        worker = make_worker(job)
    except BaseException:
        answers.write(json.dumps({"error": traceback.format_exc()}) + "\n")
        return 1
    answers.write(json.dumps({"ready": True, "rank": worker.rank}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        try:
            result = worker.handle(command)
        except BaseException:
            result = {"error": traceback.format_exc()}
        answers.write(json.dumps(result) + "\n")
    if getattr(worker, "dist", None) is not None:
        worker.dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    return serve(Worker, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
