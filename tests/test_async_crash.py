"""Crash safety of asynchronous saves and of the two-tier manager, with real processes.

A child process (tests/async_crash_child.py, on tests/crash_child.py's
deterministic model: checkpoint ``ckpt-N`` must hold ``model_values(SEED, N)``
bit for bit) resumes from the latest checkpoint and saves asynchronously;
this process kills it with SIGKILL at a moment it knows for sure, then checks
what is left, on local disk and on S3 (a real moto server):

1. killed while its background write runs (``save()`` has returned, part of
   the data is written, every I/O thread then waits in ``progress`` so the
   write cannot finish first): the previous checkpoint is intact and the
   latest, the killed one is not a checkpoint, only a leftover that ``gc``
   names; a new run resumes from the previous step exactly, saves the step
   again, and ``gc`` removes the leftover and nothing else;
2. a child returning from main right after ``save()`` returned (the write
   held until then, so the save is not committed when main returns): once
   the process has exited, the checkpoint is committed (the exit hook
   finished it) and holds the values of the ``save()`` call, not the ones
   assigned right after it; with two tiers, the copy to the remote tier that
   the commit started is committed too;
3. two tiers (local directory, ``replicate_to`` on S3): the child reaches S3
   through a proxy that stops forwarding after half a checkpoint's bytes, so
   the copy of step 2 stops part-way, before its commit, and the child is
   killed there (its local saves of steps 2 and 3 committed): the remote
   directory holds only committed checkpoints and a leftover that the remote
   manager's gc removes, the local ones are intact (step 2 kept although
   ``max_to_keep=1``: its copy was not committed); the next run resumes
   replicating: its remote tier then has steps 1, 2 and 3 committed,
   verified and bit-exact.

No assertion depends on timing: every kill follows a line the child printed
at a point where the save cannot go on (or a proxy that forwards nothing more).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from crash_child import CrashModel, model_values, same_bits
from launching import run_launcher, wait_all

import zarrckpt as zc
from zarrckpt.errors import CheckpointNotFoundError

CHILD = Path(__file__).with_name("async_crash_child.py")
SEED = 20261207
MiB = 1 << 20
SIZE = 8 * MiB  # model bytes (4 float32 arrays)
CHUNK = MiB // 2  # 18 chunk files a checkpoint
THREADS = 2  # I/O threads of the child's saves and copies
STALL_AFTER = SIZE // 4  # bytes the killed background write has written
RUN_TIMEOUT = 120.0  # for any one line of a child, or a run to completion

StorageOptions = dict[str, Any] | None


# Children ----------------------------------------------------------------------------


def command(url: str, storage_options: StorageOptions, *args: str) -> list[str]:
    line = [sys.executable, str(CHILD), "--dir", url, "--seed", str(SEED), "--size", str(SIZE)]
    line += ["--chunk-bytes", str(CHUNK), "--threads", str(THREADS), *args]
    if storage_options is not None:
        line += ["--storage-options", json.dumps(storage_options)]
    return line


def two_tiers(local: str, remote: str, remote_options: dict[str, Any], *args: str) -> list[str]:
    """A child whose manager saves in ``local`` and replicates to ``remote`` (max_to_keep=1)."""
    replicate = ["--replicate-to", remote, "--replicate-storage-options"]
    return command(local, None, *replicate, json.dumps(remote_options), "--max-to-keep", "1", *args)


def run_to_completion(logs: Path, line: list[str]) -> dict[str, list[str]]:
    """Run a child to its normal exit (status 0); its stdout lines by first word."""
    printed: dict[str, list[str]] = {}
    for text in run_launcher(line, cwd=logs, timeout=RUN_TIMEOUT).splitlines():
        head, _, rest = text.partition(" ")
        printed.setdefault(head, []).append(rest)
    return printed


class Child:
    """A child to be killed: its stdout lines are read as they come."""

    def __init__(self, line: list[str], logs: Path) -> None:
        self.stderr_path = logs / f"child-{time.monotonic_ns()}.stderr"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                line, stdout=subprocess.PIPE, stderr=stderr, env=env, start_new_session=True
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().rstrip("\n"))
        self.lines.put(None)

    def expect(self, *words: str) -> dict[str, str]:
        """The rest of the first line starting with each of ``words``, once all have come."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(found) < len(words):
            missing = [word for word in words if word not in found]
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                status = self.kill()
                raise AssertionError(f"no {missing} line (exit status {status}){self}")
            self.seen.append(line)
            head, _, rest = line.partition(" ")
            if head in missing:
                found[head] = rest
        return found

    def kill(self) -> int | None:
        """SIGKILL the child (unless it has exited); its exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        codes = wait_all([self.proc], RUN_TIMEOUT)
        return codes[0] if codes else None

    def __repr__(self) -> str:  # what an assertion message shows
        stderr = self.stderr_path.read_bytes().decode(errors="replace")[-3000:]
        return "\n--- child stdout:\n" + "\n".join(self.seen) + f"\n--- child stderr:\n{stderr}"


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[[list[str]], Child]]:
    """Start children to be killed; any still running at the end of the test is killed."""
    started: list[Child] = []

    def start(line: list[str]) -> Child:
        started.append(Child(line, tmp_path))
        return started[-1]

    yield start
    for child in started:
        child.kill()


# Storage -----------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, StorageOptions]:
    """(directory URL, storage_options) of an empty checkpoint directory."""
    if request.param == "local":
        return str(tmp_path / "run"), None
    s3_url = request.getfixturevalue("s3_url")
    return f"{s3_url}/run", request.getfixturevalue("s3_storage_options")


def listing(url: str, storage_options: StorageOptions) -> dict[str, int]:
    """Every file under ``url`` (key relative to it) with its size, read without zarrckpt."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    return {
        path[len(root) :].lstrip("/"): int(info["size"])
        for path, info in fs.find(root, detail=True).items()
    }


def settled(url: str, storage_options: StorageOptions) -> dict[str, int]:
    """:func:`listing` once requests a killed child had sent are served (it stops changing)."""
    previous = listing(url, storage_options)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = listing(url, storage_options)
        if current == previous:
            return current
        previous = current
    return previous


def leftovers_of(files: dict[str, int], step: int) -> dict[str, int]:
    """What a save of ``step``, not committed, left in a :func:`listing`, with its bytes.

    A temporary directory ``.ckpt-<step>.zarrckpt-tmp-<hex>`` (local disk) or
    an attempt prefix ``ckpt-<step>/attempt-<hex>`` (S3).
    """
    assert f"ckpt-{step}/_COMMIT" not in files, f"ckpt-{step} is committed"
    found: dict[str, int] = {}
    for key, size in files.items():
        parts = key.split("/")
        if re.fullmatch(rf"\.ckpt-{step}\.zarrckpt-tmp-[0-9a-f]+", parts[0]):
            top = parts[0]
        elif parts[0] == f"ckpt-{step}" and re.fullmatch(r"attempt-[0-9a-f]{32}", parts[1]):
            top = "/".join(parts[:2])
        else:
            continue
        found[top] = found.get(top, 0) + size
    return found


def numbered(url: str, storage_options: StorageOptions) -> dict[int, bool]:
    """zc.list_checkpoints: each numbered checkpoint directory -> committed."""
    return {
        info.number: info.committed
        for info in zc.list_checkpoints(url, storage_options)
        if info.number is not None
    }


def assert_holds_step(path: str, storage_options: StorageOptions, step: int) -> None:
    """``path`` restores into a fresh model exactly the model of ``step``, bit for bit."""
    model = CrashModel(SEED, SIZE)
    zc.Checkpoint(model=model).restore(path, storage_options=storage_options).assert_consumed()
    wanted = model_values(SEED, step, SIZE)
    for index, (variable, want) in enumerate(zip(model.variables(), wanted, strict=True)):
        got = variable.numpy()
        differ = (
            int(np.count_nonzero(got.view(np.uint32) != want.view(np.uint32)))
            if got.shape == want.shape
            else got.size
        )
        assert same_bits(got, want), f"{path}: w{index} differs from step {step} in {differ}"


def assert_verified(path: str, storage_options: StorageOptions, step: int) -> None:
    report = zc.verify(path, storage_options)
    assert report.unlisted == (), (path, report)
    assert_holds_step(path, storage_options, step)


def assert_not_a_checkpoint(path: str, storage_options: StorageOptions) -> None:
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=CrashModel(SEED, SIZE)).restore(path, storage_options=storage_options)


# 1. SIGKILL during a background save ------------------------------------------------


def test_sigkill_during_a_background_save_keeps_the_previous_checkpoint(
    place: tuple[str, StorageOptions], spawn: Callable[[list[str]], Child], tmp_path: Path
) -> None:
    url, so = place
    first, second = f"{url}/ckpt-1", f"{url}/ckpt-2"
    printed = run_to_completion(tmp_path, command(url, so, "--steps", "1"))
    assert printed["RESUMED"] == ["- -"] and printed["SAVED"] == [first], printed

    killed = spawn(command(url, so, "--steps", "2", "--stall-after", str(STALL_AFTER)))
    assert killed.expect("RESUMED")["RESUMED"] == f"{first} 1", killed
    # save() returned, and its background write has written STALL_AFTER bytes and stopped.
    assert killed.expect("SAVED", "DATA")["SAVED"] == second, killed
    assert killed.kill() == -signal.SIGKILL, killed

    files = settled(url, so)
    left = leftovers_of(files, 2)
    assert len(left) == 1, sorted(files)
    ((dead, dead_bytes),) = left.items()
    assert STALL_AFTER <= dead_bytes < SIZE, (dead, dead_bytes)
    # Only step 1 is a checkpoint (S3 lists the killed step's directory, uncommitted).
    assert {n: c for n, c in numbered(url, so).items() if c} == {1: True}, sorted(files)
    assert set(numbered(url, so)) <= {1, 2}, sorted(files)
    assert zc.latest_checkpoint(url, so) == first
    assert_verified(first, so, 1)
    assert_not_a_checkpoint(second, so)
    assert zc.gc(url, older_than=0, storage_options=so, dry_run=True) == [f"{url}/{dead}"]

    # The next run resumes from step 1 exactly (the child checks every bit) and saves step 2.
    printed = run_to_completion(tmp_path, command(url, so, "--steps", "2"))
    assert printed["RESUMED"] == [f"{first} 1"] and printed["SAVED"] == [second], printed
    done = json.loads(printed["DONE"][0])
    assert done["checkpoints"] == [first, second] and done["latest"] == second, done
    assert zc.latest_checkpoint(url, so) == second
    assert_verified(second, so, 2)

    # gc removes the killed save's leftover, and only it.
    before = {k: size for k, size in listing(url, so).items() if not k.startswith(f"{dead}/")}
    assert zc.gc(url, older_than=0, storage_options=so) == [f"{url}/{dead}"]
    assert listing(url, so) == before
    assert numbered(url, so) == {1: True, 2: True}
    assert zc.gc(url, older_than=0, storage_options=so, dry_run=True) == []
    assert_holds_step(first, so, 1)
    assert_verified(second, so, 2)


# 2. A normal exit finishes the save in flight ----------------------------------------


@pytest.mark.parametrize("api", ["manager", "checkpoint"])
def test_normal_exit_commits_the_save_in_flight_with_the_values_of_the_call(
    place: tuple[str, StorageOptions], api: str, tmp_path: Path
) -> None:
    url, so = place
    path = f"{url}/ckpt-1"
    line = command(url, so, "--steps", "1", "--api", api, "--exit", "return")
    printed = run_to_completion(tmp_path, line)
    assert printed["RESUMED"] == ["- -"] and printed["SAVED"] == [path], printed
    # When main returned, the save was not committed yet (the child had assigned step 2).
    assert json.loads(printed["AT-RETURN"][0]) == {"committed": False, "listed": False}

    # The process has exited: the exit hook committed the save, with step 1's values.
    assert numbered(url, so) == {1: True}
    assert zc.latest_checkpoint(url, so) == path
    assert_verified(path, so, 1)
    assert zc.gc(url, older_than=0, storage_options=so, dry_run=True) == []
    manager = zc.CheckpointManager(
        zc.Checkpoint(model=CrashModel(SEED, SIZE)), url, storage_options=so
    )
    assert manager.checkpoints == [path]


def test_normal_exit_finishes_the_copy_to_the_remote_tier(
    s3_url: str, s3_storage_options: dict[str, Any], tmp_path: Path
) -> None:
    local, remote, so = str(tmp_path / "local"), f"{s3_url}/run", s3_storage_options
    printed = run_to_completion(
        tmp_path, two_tiers(local, remote, so, "--steps", "1", "--exit", "return")
    )
    assert printed["SAVED"] == [f"{local}/ckpt-1"], printed
    assert json.loads(printed["AT-RETURN"][0]) == {"committed": False, "listed": False}

    # The exit hook finished the local save, then the copy it started.
    assert numbered(local, None) == {1: True}
    assert_holds_step(f"{local}/ckpt-1", None, 1)
    assert numbered(remote, so) == {1: True}
    assert_verified(f"{remote}/ckpt-1", so, 1)
    assert zc.gc(remote, older_than=0, storage_options=so, dry_run=True) == []


# 3. Two tiers: SIGKILL during the copy to the remote tier -----------------------------


class StallingProxy:
    """A TCP proxy to the moto server that forwards ``budget`` bytes of requests, then stalls.

    Past the budget it forwards nothing more from its clients (responses still
    flow back): a copy through it stops part-way, surely before its commit,
    which comes after every data file, as on a network that stops mid-upload.
    """

    def __init__(self, upstream: str, budget: int) -> None:
        split = urllib.parse.urlsplit(upstream)
        self._upstream = (split.hostname, split.port)
        self._budget = budget
        self._forwarded = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.stalled = threading.Event()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def __enter__(self) -> StallingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for args in ((client, server, True), (server, client, False)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if requests:
                    with self._lock:
                        allowed = data[: max(0, self._budget - self._forwarded)]
                        self._forwarded += len(allowed)
                    if len(allowed) < len(data):
                        sink.sendall(allowed)
                        self.stalled.set()
                        self._closed.wait()
                        return
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Drop every connection (moto sees the requests cut short) and stop."""
        self._closed.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)
        for sock in [*sockets, self._listener]:
            sock.close()


def test_sigkill_during_the_remote_copy_then_the_next_run_resumes_replicating(
    s3_server: str,
    s3_url: str,
    s3_storage_options: dict[str, Any],
    spawn: Callable[[list[str]], Child],
    tmp_path: Path,
) -> None:
    local, remote, so = str(tmp_path / "local"), f"{s3_url}/run", s3_storage_options

    def tiers(endpoint: str, *args: str) -> list[str]:
        return two_tiers(local, remote, {**so, "endpoint_url": endpoint}, *args)

    printed = run_to_completion(tmp_path, tiers(s3_server, "--steps", "1"))
    done = json.loads(printed["DONE"][0])
    assert done["remote_checkpoints"] == [f"{remote}/ckpt-1"], done
    assert done["checkpoints"] == [f"{local}/ckpt-1"], done

    # Steps 2 and 3 commit locally; the copy of step 2 stops at half its bytes; kill.
    with StallingProxy(s3_server, budget=SIZE // 2) as proxy:
        killed = spawn(tiers(proxy.url, "--steps", "2,3", "--exit", "hold"))
        assert killed.expect("RESUMED")["RESUMED"] == f"{local}/ckpt-1 1", killed
        held = json.loads(killed.expect("LOCAL")["LOCAL"])
        assert held == [f"{local}/ckpt-2", f"{local}/ckpt-3"], killed
        assert proxy.stalled.wait(RUN_TIMEOUT), f"the copy never reached the proxy's budget{killed}"
        assert killed.kill() == -signal.SIGKILL, killed

    # The remote tier: step 1 committed and the latest; step 2 only a dead attempt.
    files = settled(remote, so)
    assert numbered(remote, so) == {1: True, 2: False}, sorted(files)
    assert zc.latest_checkpoint(remote, so) == f"{remote}/ckpt-1"
    assert_holds_step(f"{remote}/ckpt-1", so, 1)
    assert_not_a_checkpoint(f"{remote}/ckpt-2", so)
    left = leftovers_of(files, 2)
    assert len(left) == 1, sorted(files)
    ((dead, dead_bytes),) = left.items()
    assert 0 < dead_bytes < SIZE, (dead, dead_bytes)
    assert zc.gc(remote, older_than=0, storage_options=so, dry_run=True) == [f"{remote}/{dead}"]
    # The local tier: steps 2 and 3 intact; step 2 kept (max_to_keep=1) until it is copied.
    assert numbered(local, None) == {2: True, 3: True}
    assert_holds_step(f"{local}/ckpt-2", None, 2)
    assert_holds_step(f"{local}/ckpt-3", None, 3)

    # The next run (its managers remove leftovers at once) copies steps 2 and 3.
    printed = run_to_completion(tmp_path, tiers(s3_server, "--gc-older-than", "0"))
    assert printed["RESUMED"] == [f"{local}/ckpt-3 3"], printed
    done = json.loads(printed["DONE"][0])
    assert done["remote_checkpoints"] == [f"{remote}/ckpt-{n}" for n in (1, 2, 3)], done
    assert done["checkpoints"] == [f"{local}/ckpt-3"], done
    assert done["latest"] == f"{local}/ckpt-3", done

    assert numbered(remote, so) == {1: True, 2: True, 3: True}
    for step in (1, 2, 3):
        assert_verified(f"{remote}/ckpt-{step}", so, step)
    assert not any(key.startswith(f"{dead}/") for key in listing(remote, so)), dead
    assert zc.gc(remote, older_than=0, storage_options=so, dry_run=True) == []
    assert numbered(local, None) == {3: True}
    assert_holds_step(f"{local}/ckpt-3", None, 3)
    assert zc.gc(local, older_than=0, dry_run=True) == []
