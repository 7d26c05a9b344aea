"""S3 benchmark: zarrckpt against one s3fs put/get of the same bytes, on a moto server.

    python3 bench/s3.py [--size 512MiB] [--deletes 10] [--rounds 5]

moto runs in its own process (``moto_server`` on 127.0.0.1, a free port) so it
does not share this process's GIL. The numbers are moto's, which is CPU-bound
on this machine (see shared/notes/zarr-3.1-facts.md): compare ratios, not
MB/s, with real S3.

Measured:
- save: ``Checkpoint.write`` of a transformer-shaped model (parallel chunk
  PUTs) versus one ``fs.pipe_file`` of all its bytes as a single object
  (s3fs multipart with its default concurrency);
- restore: ``Checkpoint.read`` into live variables versus one ``fs.cat_file``;
- requests: HTTP requests moto served during one save and one restore
  (counted from its access log), by method;
- each of the above ``--rounds`` times, peer and zarrckpt interleaved; medians (min-max);
- delete: ``CheckpointManager`` retention removing ``--deletes`` old
  checkpoints in its background thread (marker first, batched deletes), timed
  until ``wait()`` returns, plus how long ``save()`` itself took meanwhile.
"""

from __future__ import annotations

import argparse
import collections
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from typing import Any

import numpy as np
import s3fs

import zarrckpt as zc
from zarrckpt.cli import parse_size

MiB = 1 << 20


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_moto(log: Any) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    process = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,  # werkzeug's access log: one line per request
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            with closing(socket.create_connection(("127.0.0.1", port), timeout=0.1)):
                return process, endpoint
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("moto_server did not start")


def _model(size: int, seed: int) -> zc.Dict:
    rng = np.random.default_rng(seed)
    width = 1024
    rows = size // (width * 4) // 24
    arrays = {}
    for layer in range(8):
        arrays[f"layers.{layer}.qkv"] = rng.standard_normal((rows * 1, width), np.float32)
        arrays[f"layers.{layer}.mlp"] = rng.standard_normal((rows * 2, width), np.float32)
    return zc.Dict({name: zc.Variable(a) for name, a in arrays.items()})


_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) ')


def _requests(log_path: str, since: int) -> tuple[collections.Counter[str], int]:
    """Requests moto logged after byte ``since`` of its log, by method; and the new end."""
    time.sleep(0.2)  # let moto flush its log lines
    with open(log_path, "rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return collections.Counter(_REQUEST.findall(text)), since + len(text.encode())


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _timed(action: Any) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _peer_times(fs: s3fs.S3FileSystem, model: zc.Dict) -> tuple[float, float]:
    """Seconds for one put and one get of all the model's bytes as a single object."""
    blob = np.concatenate([v.numpy().reshape(-1) for v in model.values()]).tobytes()
    put = _timed(lambda: fs.pipe_file("bench/blob", blob))
    got: list[bytes] = []
    get = _timed(lambda: got.append(fs.cat_file("bench/blob")))
    if got[0] != blob:
        raise AssertionError("s3fs get returned other bytes")
    return put, get


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("512MiB"))
    parser.add_argument("--deletes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log")  # noqa: SIM115
    process, endpoint = _start_moto(log)
    try:
        options = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        model = _model(args.size, seed=0)
        nbytes = sum(v.nbytes for v in model.values())
        print(
            f"model: {len(model)} arrays, {nbytes / MiB:,.0f} MiB; moto at {endpoint}; "
            f"zarrckpt {zc.__version__} from {zc.__file__}"
        )
        times: dict[str, list[float]] = collections.defaultdict(list)
        requests: dict[str, collections.Counter[str]] = {}
        ckpt = zc.Checkpoint(model=model)
        live = zc.Dict({k: zc.Variable(np.zeros_like(v.numpy())) for k, v in model.items()})
        for round_ in range(args.rounds):
            put, get = _peer_times(fs, model)
            times["put"].append(put)
            times["get"].append(get)
            url = f"s3://bench/ckpt-{round_}"
            _, mark = _requests(log.name, 0)
            times["save"].append(_timed(lambda: ckpt.write(url, storage_options=options)))  # noqa: B023
            requests["save"], mark = _requests(log.name, mark)
            times["restore"].append(
                _timed(
                    lambda: (
                        zc.Checkpoint(model=live)
                        .read(url, storage_options=options)  # noqa: B023
                        .assert_consumed()
                    )
                )
            )
            requests["restore"], mark = _requests(log.name, mark)
            assert all(np.array_equal(live[k].numpy(), model[k].numpy()) for k in model)
            fs.rm(f"bench/ckpt-{round_}", recursive=True)
            print(
                f"round {round_ + 1}: save {times['save'][-1]:.2f} s (put {put:.2f}), "
                f"restore {times['restore'][-1]:.2f} s (get {get:.2f})",
                flush=True,
            )
        files = ckpt.last_write_stats.files if ckpt.last_write_stats else 0

        small = _model(16 * MiB, seed=1)
        keep_all = zc.CheckpointManager(
            zc.Checkpoint(model=small), "s3://bench/run", max_to_keep=None,
            storage_options=options,
        )  # fmt: skip
        for _ in range(args.deletes):
            keep_all.save()
        per_checkpoint = len(fs.find("bench/run/ckpt-1"))
        # A manager keeping one: its first save sweeps the --deletes old ones at once.
        keep_one = zc.CheckpointManager(
            zc.Checkpoint(model=small), "s3://bench/run", max_to_keep=1, storage_options=options
        )
        save_with_sweep = _timed(keep_one.save)
        delete = _timed(keep_one.wait)
        left = [c.name for c in zc.list_checkpoints("s3://bench/run", options)]
        if left != [f"ckpt-{args.deletes + 1}"]:
            raise AssertionError(f"retention left {left}")

        rows = [
            ("save", "put", "one s3fs put (multipart)"),
            ("restore", "get", "one s3fs get"),
        ]
        print(f"\n{args.rounds} rounds, medians (min-max):\n")
        print("| operation | zarrckpt s | peer s | zarrckpt / peer | peer | MiB/s | requests |")
        print("|---|---|---|---|---|---|---|")
        for name, peer, what in rows:
            ours = times[name]
            ratios = [o / p for o, p in zip(ours, times[peer], strict=True)]
            counted = ", ".join(f"{n} {m}" for m, n in sorted(requests[name].items()))
            print(
                f"| {name} | {_median(ours)} | {_median(times[peer])} | {_median(ratios)} | "
                f"{what} | {nbytes / MiB / statistics.median(ours):,.0f} | {counted} |"
            )
        print(
            f"\nsave wrote {files} files; deleting {args.deletes} old checkpoints "
            f"({per_checkpoint} objects each): save() returned after {save_with_sweep:.2f} s "
            f"(its own 16 MiB save included), the background deletion finished {delete:.2f} s "
            f"later: {save_with_sweep + delete:.2f} s in all; left: {left}"
        )
        return 0
    finally:
        process.kill()
        process.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
