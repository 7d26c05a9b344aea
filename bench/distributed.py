"""Distributed save/load: zarrckpt (TorchCoordinator) against torch.distributed.checkpoint (DCP).

    python3 bench/distributed.py [--mib-per-rank 256] [--rounds 5] [--s3-rounds 2]
                                 [--storages local,s3] [--profile-rank R]

Ranks are real processes (bench/_dist_worker.py) in gloo worlds on 127.0.0.1:
one world of 4 ranks and one of 2, both started once and kept for the whole
run (idle while the other works). Each rank of the 4-rank world holds a row
block (Shard(0)) of every matrix of a transformer-shaped model of
4 x ``--mib-per-rank`` (the layer norms and biases replicated on every rank);
a 2-rank world holds the same values in 2 blocks per matrix. zarrckpt saves
``zc.Variable.sharded`` blocks with ``Checkpoint.write(path,
coordinator=TorchCoordinator())``; DCP saves the same memory as DTensors
(``DTensor.from_local`` on a 1-D CPU DeviceMesh, ``Shard(0)`` / ``Replicate()``)
with ``dcp.save`` and loads with ``dcp.load``, in place. Both with their
defaults: zarrckpt's ``CheckpointOptions()`` (fsync on, 8 threads a rank);
DCP's ``FileSystemWriter`` (fsync per file, one thread) and, on S3,
``FsspecWriter(sync_files=False)`` / ``FsspecReader`` (torch's
``_fsspec_filesystem`` module; with ``sync_files=True`` it would call
``os.sync()`` per file, since an s3fs stream has no file descriptor).

Per round, per storage, per library (the library order alternates by round):

1. save with 4 ranks; 2. load it with 4 ranks; 3. load it with 2 ranks (4->2);
4. save with 2 ranks; 5. load that with 4 ranks (2->4).

Every local load is cold: the checkpoint's files are fsynced and evicted from
the page cache (``posix_fadvise(DONTNEED)``, as bench/run.py does) first, and
the residue checked with mincore. S3 is a moto server in its own process
(as bench/s3.py); what it holds stays where moto keeps it, for both libraries.

Measured per operation: seconds from leaving a barrier to leaving the next one
(the slowest rank's time), bytes read per rank against the bytes the rank's
blocks hold (and zarrckpt's own ``io_stats.nbytes``), and peak memory per rank
(VmHWM, reset through ``/proc/self/clear_refs`` before the operation, minus VmRSS
before it). Bytes read are the ``/proc/self/io`` rchar delta (every thread;
local files) plus the HTTP response body bytes aiohttp received (S3: socket
``recv`` does not count in rchar), the same for both libraries, which both
reach S3 through s3fs. Every load is verified against the source values.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

import _fs
import _report
from _model import MiB, transformer_specs

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
WORKER = BENCH / "_dist_worker.py"
LIBS = ["zarrckpt", "dcp"]
WORLDS = (4, 2)
STEPS = [  # (label, op, world that runs it, world that saved what it loads)
    ("save, 4 ranks", "save", 4, 4),
    ("load 4 -> 4", "load", 4, 4),
    ("load 4 -> 2", "load", 2, 4),
    ("save, 2 ranks", "save", 2, 2),
    ("load 2 -> 4", "load", 4, 2),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mib-per-rank",
        type=float,
        default=256,
        help="MiB of sharded blocks per rank of the 4-rank world (model: 4x)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--s3-rounds",
        type=int,
        default=2,
        help="how many of the rounds (the first ones) include S3; DCP's S3 "
        "loads take minutes a round against moto here",
    )
    parser.add_argument("--storages", default="local,s3", help="comma list of local,s3")
    parser.add_argument(
        "--dir", type=Path, help="where local checkpoints go (default: bench/out/dist-data-<stamp>)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile-rank",
        type=int,
        help="cProfile every measured operation on this rank (pstats files "
        "next to the worker logs; slows that rank down)",
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds one command may take on every rank"
    )
    args = parser.parse_args(argv)
    args.storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    if not args.storages or any(s not in ("local", "s3") for s in args.storages):
        parser.error("--storages is a comma list of local,s3")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.s3_rounds = min(args.s3_rounds, args.rounds)
    return args


def model_specs(total: int) -> list[dict[str, Any]]:
    """The bench model (bench/_model.py), its row counts made divisible by 4 and 2.

    Matrices are sharded by rows; vectors (layer norms, biases) are replicated.
    """
    specs = []
    for spec in transformer_specs(total, "float32"):
        shape = list(spec.shape)
        sharded = len(shape) == 2
        if sharded:
            shape[0] -= shape[0] % math.lcm(*WORLDS)
        specs.append({"index": spec.index, "name": spec.name, "shape": shape, "sharded": sharded})
    return specs


WARMUP_SPECS = [
    {"index": 1000, "name": "w", "shape": [256, 64], "sharded": True},
    {"index": 1001, "name": "b", "shape": [64], "sharded": False},
]


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class World:
    """``size`` worker processes of one gloo world, commanded through their stdin."""

    def __init__(self, size: int, job_file: Path, logs: Path, timeout: float) -> None:
        self.size = size
        self.timeout = timeout
        port = _free_port()
        self.procs: list[subprocess.Popen[str]] = []
        self.answers: list[queue.Queue[str]] = []
        for rank in range(size):
            read_fd, write_fd = os.pipe()
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            log = open(logs / f"world{size}-rank{rank}.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, str(WORKER), str(job_file), str(write_fd)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                text=True,
                env=env,
                pass_fds=(write_fd,),
            )
            log.close()
            os.close(write_fd)
            answers: queue.Queue[str] = queue.Queue()
            threading.Thread(target=self._pump, args=(read_fd, answers), daemon=True).start()
            self.procs.append(proc)
            self.answers.append(answers)
        ready = self._collect("start")
        if not all(r.get("ready") for r in ready):
            raise RuntimeError(f"world of {size} did not start: {ready}")

    @staticmethod
    def _pump(fd: int, answers: queue.Queue[str]) -> None:
        with os.fdopen(fd) as stream:
            for line in stream:
                answers.put(line)
        answers.put("")  # the worker exited

    def _collect(self, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.timeout
        results = []
        for rank, answers in enumerate(self.answers):
            try:
                line = answers.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"world {self.size} rank {rank}: no answer to {what} "
                    f"within {self.timeout:.0f} s"
                ) from None
            if not line:
                raise RuntimeError(f"world {self.size} rank {rank} exited during {what}")
            result = json.loads(line)
            if "error" in result:
                raise RuntimeError(f"world {self.size} rank {rank}, {what}:\n{result['error']}")
            results.append(result)
        return results

    def run(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(command) + "\n")
            proc.stdin.flush()
        return self._collect(json.dumps(command))

    def close(self) -> None:
        for proc in self.procs:
            try:
                if proc.poll() is None and proc.stdin is not None:
                    proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Storage:
    """Where one storage's checkpoints live, and how to make them cold and remove them."""

    def __init__(self, name: str, local_root: Path, s3: dict[str, Any] | None) -> None:
        self.name = name
        self.local_root = local_root
        self.s3 = s3
        if name == "s3":
            import s3fs

            assert s3 is not None
            self.fs = s3fs.S3FileSystem(**s3)

    def path(self, tag: str) -> str:
        return str(self.local_root / tag) if self.name == "local" else f"s3://bench/{tag}"

    def make_cold(self, path: str) -> int | None:
        """Evict a local checkpoint from the page cache; the bytes still resident."""
        if self.name != "local":
            return None
        _fs.drop_cache_tree(Path(path))
        return _fs.resident_bytes(Path(path))

    def size(self, path: str) -> tuple[int, int]:
        """(files, bytes) of a saved checkpoint."""
        if self.name == "local":
            files = _fs.files_under(Path(path))
            return len(files), sum(f.stat().st_size for f in files)
        found = self.fs.find(path, detail=True)
        return len(found), sum(int(v["size"]) for v in found.values())

    def remove(self, path: str) -> None:
        if self.name == "local":
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(path, recursive=True)
            self.fs.invalidate_cache()


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One operation's per-rank answers as one row of numbers."""
    needed = sum(r["needed"] for r in results)
    summary = {
        "seconds": max(r["seconds"] for r in results),
        "own_seconds": [r["own_seconds"] for r in results],
        "read_ratio": sum(r["read"] for r in results) / needed,
        "worst_rank_read_ratio": max(r["read"] / r["needed"] for r in results),
        "peak_extra": max(r["peak_extra"] for r in results),
        "needed_per_rank": [r["needed"] for r in results],
        "rchar_per_rank": [r["rchar"] for r in results],
        "http_body_per_rank": [r["http_body"] for r in results],
    }
    if all("io_nbytes" in r for r in results):
        summary["io_ratio"] = sum(r["io_nbytes"] for r in results) / needed
        summary["worst_rank_io_ratio"] = max(r["io_nbytes"] / r["needed"] for r in results)
    return summary


def run_round(
    number: int,
    worlds: dict[int, World],
    storages: list[Storage],
    records: dict[str, Any],
    s3_rounds: int,
) -> None:
    order = LIBS if number % 2 == 1 else LIBS[::-1]
    for storage in storages:
        if storage.name == "s3" and number > s3_rounds:
            continue
        for lib in order:
            paths = {w: storage.path(f"r{number}-{lib}-w{w}") for w in WORLDS}
            try:
                for label, op, world, saved_by in STEPS:
                    path = paths[saved_by]
                    resident = storage.make_cold(path) if op == "load" else None
                    results = worlds[world].run(
                        {"op": op, "lib": lib, "storage": storage.name, "path": path}
                    )
                    row = summarize(results)
                    row["round"] = number
                    row["resident_after_drop"] = resident
                    if op == "save":
                        row["files"], row["bytes"] = storage.size(path)
                    records[storage.name][label][lib].append(row)
                    print(
                        f"  round {number} {storage.name:<5} {lib:<8} {label:<13} "
                        f"{row['seconds']:6.2f} s  {describe(op, row)}",
                        flush=True,
                    )
            finally:
                for path in paths.values():
                    storage.remove(path)


def describe(op: str, row: dict[str, Any]) -> str:
    text = f"peak +{row['peak_extra'] / MiB:.0f} MiB"
    if op == "save":
        return text + f", {row['files']} files, {row['bytes'] / MiB:.0f} MiB"
    text += f", read/needed {row['read_ratio']:.3f} (worst rank {row['worst_rank_read_ratio']:.3f})"
    if "io_ratio" in row:
        text += f", io_stats/needed {row['io_ratio']:.3f}"
    if row["resident_after_drop"] is not None:
        text += f", {row['resident_after_drop'] / MiB:.1f} MiB cached after drop"
    return text + ", verified"


def spread(values: list[float], fmt: str = ".2f") -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def tables(records: dict[str, Any]) -> str:
    time_rows, byte_rows = [], []
    for storage, steps in records.items():
        for label, op, _, _ in STEPS:
            zc, dcp = steps[label]["zarrckpt"], steps[label]["dcp"]
            if not zc or not dcp:
                continue
            ratios = [a["seconds"] / b["seconds"] for a, b in zip(zc, dcp, strict=True)]
            time_rows.append(
                [
                    storage,
                    label,
                    spread([r["seconds"] for r in zc]),
                    spread([r["seconds"] for r in dcp]),
                    spread(ratios),
                ]
            )
            zc_peak = [r["peak_extra"] / MiB for r in zc]
            dcp_peak = [r["peak_extra"] / MiB for r in dcp]
            read = (
                (lambda rows, key: spread([r[key] for r in rows], ".3f"))
                if op == "load"
                else (lambda rows, key: "-")
            )
            byte_rows.append(
                [
                    storage,
                    label,
                    read(zc, "read_ratio"),
                    read(zc, "worst_rank_read_ratio"),
                    read(zc, "io_ratio") if op == "load" else "-",
                    read(dcp, "read_ratio"),
                    read(dcp, "worst_rank_read_ratio"),
                    spread(zc_peak, ".0f"),
                    spread(dcp_peak, ".0f"),
                ]
            )
    first = _report.markdown(
        ["storage", "operation", "zarrckpt s", "DCP s", "zarrckpt / DCP"], time_rows
    )
    second = _report.markdown(
        [
            "storage",
            "operation",
            "zarrckpt read / needed",
            "worst rank",
            "zarrckpt io_stats / needed",
            "DCP read / needed",
            "worst rank",
            "zarrckpt peak extra MiB",
            "DCP peak extra MiB",
        ],
        byte_rows,
    )
    return first + "\n\n" + second


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = (args.dir or OUT / f"dist-data-{stamp}").resolve()
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    specs = model_specs(int(args.mib_per_rank * MiB * 4))
    sharded = sum(math.prod(s["shape"]) * 4 for s in specs if s["sharded"])
    replicated = sum(math.prod(s["shape"]) * 4 for s in specs if not s["sharded"])
    info = {
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _report.machine(root),
        "versions": _report.versions(),
        "model": {
            "arrays": len(specs),
            "sharded_bytes": sharded,
            "replicated_bytes": replicated,
            "sharded_arrays": sum(s["sharded"] for s in specs),
        },
    }
    import zarrckpt

    library = Path(zarrckpt.__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "-C", str(library), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    info["zarrckpt"] = {"path": str(library), "commit": commit or "not a git tree"}
    m = info["machine"]
    print(
        f"command:  {info['command']}\ndate:     {info['date']}\n"
        f"machine:  {m['nproc']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, "
        f"Linux {m['kernel']}, Python {m['python']}\n"
        f"data dir: {root} ({m['data_dir_free_bytes'] / 2**30:.0f} GiB free)\n"
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n"
        f"zarrckpt: {library} ({info['zarrckpt']['commit']})\n"
        f"model:    {len(specs)} float32 arrays, {info['model']['sharded_arrays']} sharded by "
        f"rows ({sharded / MiB:.1f} MiB: {sharded / 4 / MiB:.1f} MiB per rank of 4, "
        f"{sharded / 2 / MiB:.1f} per rank of 2), the rest replicated "
        f"({replicated / MiB:.2f} MiB on every rank)",
        flush=True,
    )

    moto = None
    s3_options = None
    logs = Path(tempfile.mkdtemp(prefix="zarrckpt-dist-logs-"))
    worlds: dict[int, World] = {}
    records: dict[str, Any] = {
        s: {label: {lib: [] for lib in LIBS} for label, *_ in STEPS} for s in args.storages
    }
    try:
        if "s3" in args.storages:
            from s3 import _start_moto

            moto, endpoint = _start_moto()
            s3_options = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
            print(f"moto:     {endpoint}", flush=True)
        storages = [Storage(s, root, s3_options) for s in args.storages]
        for storage in storages:
            if storage.name == "s3":
                storage.fs.mkdir("bench")
        job = {
            "specs": specs,
            "warmup_specs": WARMUP_SPECS,
            "seed": args.seed,
            "s3": s3_options,
            "timeout": args.timeout,
            "profile_rank": args.profile_rank,
            "profile_dir": str(logs),
        }
        job_file = logs / "job.json"
        job_file.write_text(json.dumps(job))
        started = time.perf_counter()
        for size in WORLDS:
            worlds[size] = World(size, job_file, logs, args.timeout)
        for size, world in worlds.items():
            warm = world.run(
                {
                    "op": "warmup",
                    "local": str(root / "warmup"),
                    "s3": "s3://bench/warmup" if s3_options else None,
                }
            )
            print(
                f"world of {size}: started, blocks built in "
                f"{max(w['build_seconds'] for w in warm):.1f} s, warmed up in "
                f"{max(w['seconds'] for w in warm):.1f} s, RSS per rank "
                f"{max(w['rss'] for w in warm) / MiB:.0f} MiB "
                f"({time.perf_counter() - started:.0f} s since start)",
                flush=True,
            )
        for number in range(1, args.rounds + 1):
            run_round(number, worlds, storages, records, args.s3_rounds)
    finally:
        for world in worlds.values():
            world.close()
        if moto is not None:
            moto.kill()
            moto.wait()
        shutil.rmtree(root / "warmup", ignore_errors=True)
        if created and root.exists() and not any(root.iterdir()):
            root.rmdir()
        print(f"worker logs: {logs}")
    text = tables(records)
    print(
        "\nmedian (min-max) over rounds; seconds: the slowest rank, barrier to barrier; "
        "read: /proc/self/io rchar + HTTP body bytes, summed over ranks / the ranks' "
        "block bytes; peak extra: "
        "the largest rank's VmHWM over the operation minus its RSS before\n"
    )
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"distributed-{stamp}.json"
    out.write_text(
        json.dumps(
            {**info, "args": {k: str(v) for k, v in vars(args).items()}, "records": records},
            indent=1,
        )
    )
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
