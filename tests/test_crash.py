"""Crash safety: SIGKILL a real saving process at random moments, then check what is left.

On local disk and on S3 (a real moto server), a child process
(tests/crash_child.py) resumes from the latest committed checkpoint and saves
one step through a CheckpointManager. A clean save measures the save time;
then, K times, a child saving the next step is killed with SIGKILL at a random
fraction in [0, 1.2] of the measured save time, and this process checks:

1. the latest committed checkpoint restores bit-exactly, holds the model of
   the step it names, and is the step it must be (the killed step only if its
   commit landed);
2. the committed set is exactly what the protocol allows; every listed
   checkpoint marked committed restores bit-exactly (restored again whenever
   its files changed since it last did, by name, size and mtime / ETag);
   every other one, and the killed step unless committed, raises
   CheckpointNotFoundError;
3. the next save (a child run to completion, resuming from the latest) works;
4. ``gc(older_than=0)`` removes every leftover and leaves every committed
   checkpoint's files as they were;
5. (before 3 and 4, while the killed save's leftovers are still there) a
   restarted manager, a fresh CheckpointManager over a fresh model in this
   process, resumes from the committed checkpoint with the highest number
   (found from storage), holds exactly that step's model, and its next
   ``save()`` commits a checkpoint numbered above every numbered directory
   present before, which ``verify`` passes, leaving the killed save's
   leftovers as they were (see RESTART_EVERY for which kills).

Where each kill landed is read from what is on disk / in the bucket: no trace
yet, data being written, every data file written at full size but not
committed (the window that matters; on local disk it includes the data's
fsyncs, the record, and a _COMMIT written but not renamed), or committed. At
least a quarter of all kills must land in that window (test_kill_window_share,
which runs after the crash tests). The window is a small part of a save (S3 on
moto: ~50 ms of ~250; local: a few ms of ~50) and save times vary more than
that from run to run, so kills come in three kinds:

- uniform: at a fraction uniform over [0, 1.2] of the measured save time;
- band: in a band around the commit window measured in the first clean save,
  whose centre moves after each band kill toward the window (later if the
  kill came before the data was written, earlier if after the commit, halfway
  to a hit);
- signalled: the child prints DATA when its CheckpointOptions.progress has
  counted every data byte, and the kill follows after a random delay of up to
  half the commit's measured duration. Only the moment is chosen this way:
  where the kill landed is still read from storage, like every other kill's.

CI=true runs at least 50 kills in total; otherwise a few per backend.
ZARRCKPT_CRASH_SEED sets the RNG seed; ZARRCKPT_CRASH_KILLS_LOCAL / _S3 the
number of kills.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import crc32c
import msgpack
import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt.errors import CheckpointNotFoundError

CHILD = Path(__file__).with_name("crash_child.py")
_spec = importlib.util.spec_from_file_location("crash_child", CHILD)
assert _spec is not None and _spec.loader is not None
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

MiB = 1 << 20
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SEED = int(os.environ.get("ZARRCKPT_CRASH_SEED", "20261125"))
# backend: (kills in CI, kills otherwise, model bytes, chunk bytes, I/O threads).
# Local saves run every file write at once (64 threads, ~35 files): the files are complete
# early and their fsyncs, then the commit, follow; the 8 default threads would
# leave a window of ~5 ms in a ~50 ms save, narrower than its jitter.
BACKENDS = {
    "local": (30, 10, 16 * MiB, 1 * MiB, 64),
    "s3": (22, 5, 4 * MiB, 512 * 1024, 8),
}
MAX_FRACTION = 1.2
UNIFORM, BAND_KILL, SIGNALLED = "uniform", "band", "signalled"
UNIFORM_SHARE = 0.2  # of the kills, at a uniform fraction of [0, MAX_FRACTION]
SIGNALLED_SHARE = 0.4  # of the kills, after the child's DATA line
SIGNAL_DELAY = 0.5  # a signalled kill waits up to this fraction of the commit's duration
BAND = 0.03  # half-width of the band, as a fraction of the save time
CENTRE_STEP = 0.02  # how far the band's centre moves after a band kill missed
RECENT = 5  # clean saves whose median is the measured save time
# The restarted manager's check (5) follows every n-th kill of a backend, from the first:
# a deterministic subset, to keep the suite's time budget. Each check costs ~0.1 s on local
# disk and ~1 s on S3 (moto), plus one more checkpoint per round for the later checks to
# restore, list and gc: every kill on local disk (30) and every 2nd on S3 (11 of 22) add
# ~15 s to this file under CI=true (every kill on S3 would add ~20 s more).
RESTART_EVERY = {"local": 1, "s3": 2}
READY_TIMEOUT = 120.0
RUN_TIMEOUT = 300.0
STATE_FILE = "zarrckpt_state.ckpt.json"
COMMIT = "_COMMIT"
# Written by the commit itself, after the data: not part of "every data file".
COMMIT_FILES = {COMMIT, "object_graph.msgpack", "zarr.json"}

# Where a kill landed, read from storage afterwards.
BEFORE = "before-data"  # no trace of the killed save
DURING = "during-data"  # a temp dir / attempt prefix with part of the data
WINDOW = "data-written-uncommitted"  # every data file fully written, not committed
COMMITTED = "committed"  # the killed step is a committed checkpoint
CATEGORIES = (BEFORE, DURING, WINDOW, COMMITTED)

LEDGER: dict[str, list[Kill]] = {}  # backend -> its kills, for test_kill_window_share


def kills_for(name: str) -> int:
    in_ci, otherwise, *_ = BACKENDS[name]
    return int(os.environ.get(f"ZARRCKPT_CRASH_KILLS_{name.upper()}", in_ci if CI else otherwise))


# The model ------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def expected_values(seed: int, step: int, size: int) -> tuple[np.ndarray, ...]:
    return tuple(child.model_values(seed, step, size))


def assert_restores_step(
    path: str, storage_options: dict[str, Any] | None, seed: int, size: int
) -> None:
    """Restore ``path`` into a fresh model: it must hold exactly the model of its step."""
    model = child.CrashModel(seed, size)
    zc.Checkpoint(model=model).restore(path, storage_options=storage_options).assert_consumed()
    assert_holds_step(model, seed, child.step_of(path), size, path)


def assert_holds_step(model: Any, seed: int, step: int, size: int, where: str) -> None:
    """``model`` (a CrashModel) holds exactly the model of ``step``, bit for bit."""
    for index, (variable, want) in enumerate(
        zip(model.variables(), expected_values(seed, step, size), strict=True)
    ):
        got = variable.numpy()
        assert got.shape == want.shape and got.dtype == want.dtype, (where, index)
        differ = int(np.count_nonzero(got.view(np.uint32) != want.view(np.uint32)))
        assert differ == 0, f"{where}: w{index} differs from step {step} in {differ} values"


class TrainedCheckpoint(zc.Checkpoint):
    """A Checkpoint of a CrashModel that is trained to the step its manager numbers.

    Each write first assigns the model of the step named by the path, as a job
    trained up to that step would hold: every checkpoint in the directory then
    holds the model its name says, whoever wrote it, and the checks after it
    (and the children resuming from it) can tell.
    """

    def __init__(self, model: Any, seed: int, size: int) -> None:
        super().__init__(model=model)
        object.__setattr__(self, "_crash_model", (model, seed, size))

    def write(self, path: Any, **kwargs: Any) -> str:
        model, seed, size = self.__dict__["_crash_model"]
        step = child.step_of(os.fspath(path))
        for variable, value in zip(
            model.variables(), expected_values(seed, step, size), strict=True
        ):
            variable.assign(value)
        return super().write(path, **kwargs)


def assert_not_restorable(path: str, storage_options: dict[str, Any] | None, size: int) -> None:
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=child.CrashModel(0, size)).restore(
            path, storage_options=storage_options
        )


# Storage, read without zarrckpt -----------------------------------------------------

Files = dict[str, tuple[int, str]]  # key -> (size, version: mtime_ns+inode or ETag)


@dataclass
class Snapshot:
    """The checkpoint directory as it is."""

    committed: dict[int, Files]  # step -> files of its live data (with _COMMIT)
    partial: dict[int, list[Files]]  # step -> files of each temp dir / dead attempt
    leftovers: set[str]  # neither committed data nor the state file
    files: Files  # every file under the directory


class LocalPlace:
    name = "local"

    def __init__(self, directory: Path) -> None:
        self.url = str(directory)
        self.storage_options: dict[str, Any] | None = None

    def path(self, step: int) -> str:
        return os.path.join(self.url, f"{child.CHECKPOINT_NAME}-{step}")

    @staticmethod
    def _files(root: str) -> Files:
        def stamp(path: str) -> tuple[int, str]:
            info = os.stat(path)
            return info.st_size, f"{info.st_mtime_ns}:{info.st_ino}"

        if os.path.isfile(root):
            return {"": stamp(root)}
        files = {}
        for directory, _, names in os.walk(root):
            for name in names:
                full = os.path.join(directory, name)
                files[os.path.relpath(full, root).replace(os.sep, "/")] = stamp(full)
        return files

    def snapshot(self) -> Snapshot:
        committed: dict[int, Files] = {}
        partial: dict[int, list[Files]] = {}
        leftovers: set[str] = set()
        every: Files = {}
        names = sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        for name in names:
            full = os.path.join(self.url, name)
            files = self._files(full)
            every.update({f"{name}/{key}".rstrip("/"): v for key, v in files.items()})
            if name == STATE_FILE:
                continue
            final = re.fullmatch(rf"{child.CHECKPOINT_NAME}-(\d+)", name)
            temp = re.fullmatch(rf"\.{child.CHECKPOINT_NAME}-(\d+)\.zarrckpt-tmp-[0-9a-f]+", name)
            if final and COMMIT in files:
                committed[int(final[1])] = files
                continue
            leftovers.add(full)
            if temp or final:
                partial.setdefault(int((temp or final)[1]), []).append(files)
        return Snapshot(committed, partial, leftovers, every)

    def settle(self) -> Snapshot:
        return self.snapshot()  # a dead process has nothing in flight on a local disk

    def normalize(self, path: str) -> str:
        return os.path.normpath(path)


class S3Place:
    name = "s3"

    def __init__(self, bucket_url: str, storage_options: dict[str, Any]) -> None:
        import s3fs

        self.url = f"{bucket_url.rstrip('/')}/run"
        self.storage_options = storage_options
        # Its own client without a listing cache: the bucket as it is.
        self.fs = s3fs.S3FileSystem(
            **storage_options, skip_instance_cache=True, use_listings_cache=False
        )
        self.root = self.url.removeprefix("s3://")

    def path(self, step: int) -> str:
        return f"{self.url}/{child.CHECKPOINT_NAME}-{step}"

    def snapshot(self) -> Snapshot:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            found = {}
        every: Files = {
            name[len(self.root) + 1 :]: (int(info["size"]), str(info.get("ETag")))
            for name, info in found.items()
            if info.get("type") != "directory"
        }
        groups: dict[str, Files] = {}
        for key, value in every.items():
            top, _, rest = key.partition("/")
            groups.setdefault(top, {})[rest] = value
        committed: dict[int, Files] = {}
        partial: dict[int, list[Files]] = {}
        leftovers: set[str] = set()
        for top, files in groups.items():
            if top == STATE_FILE and set(files) == {""}:
                continue
            numbered = re.fullmatch(rf"{child.CHECKPOINT_NAME}-(\d+)", top)
            attempts: dict[str, Files] = {}
            for key, value in files.items():
                head, _, rest = key.partition("/")
                if re.fullmatch(r"attempt-[0-9a-f]{32}", head) and rest:
                    attempts.setdefault(head, {})[rest] = value
                elif key != COMMIT:
                    leftovers.add(f"{self.root}/{top}/{key}")
            live = None
            if numbered and COMMIT in files:
                live = commit_attempt(self.fs.cat_file(f"{self.root}/{top}/{COMMIT}"))
                assert live in attempts, (top, live, sorted(attempts))
                committed[int(numbered[1])] = {**attempts[live], COMMIT: files[COMMIT]}
            else:
                leftovers.add(f"{self.root}/{top}")
            for attempt, attempt_files in attempts.items():
                if attempt != live:
                    leftovers.add(f"{self.root}/{top}/{attempt}")
                    if numbered:
                        partial.setdefault(int(numbered[1]), []).append(attempt_files)
        return Snapshot(committed, partial, leftovers, every)

    def settle(self) -> Snapshot:
        """The bucket once requests the dead child had already sent are served."""
        previous = self.snapshot()
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            current = self.snapshot()
            if current.files == previous.files:
                return current
            previous = current
        return previous

    def normalize(self, path: str) -> str:
        return path.removeprefix("s3://").rstrip("/")


Place = LocalPlace | S3Place


def commit_attempt(marker: bytes) -> str:
    """The attempt a ``_COMMIT`` names: msgpack, then the CRC32C of it (little-endian)."""
    body, seal = marker[:-4], marker[-4:]
    assert crc32c.crc32c(body) == int.from_bytes(seal, "little"), "_COMMIT's seal differs"
    attempt: str = msgpack.unpackb(body)["attempt"]
    return attempt


# The child process ------------------------------------------------------------------


class Child:
    """One run of crash_child.py; its stdout lines are timestamped as they arrive."""

    def __init__(
        self, place: Place, step: int, seed: int, logs: Path, data_signal_bytes: int | None
    ) -> None:
        _, _, size, chunk, threads = BACKENDS[place.name]
        command = [sys.executable, str(CHILD), "--dir", place.url, "--seed", str(seed)]
        command += ["--size", str(size), "--step", str(step), "--chunk-bytes", str(chunk)]
        command += ["--threads", str(threads)]
        if data_signal_bytes is not None:
            command += ["--data-signal-bytes", str(data_signal_bytes)]
        if place.storage_options is not None:
            command += ["--storage-options", json.dumps(place.storage_options)]
        self.step = step
        self.stderr_path = logs / f"child-{place.name}-{step}-{time.monotonic_ns()}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put((time.perf_counter(), raw.decode().rstrip("\n")))
        self.lines.put((time.perf_counter(), None))

    def expect(self, prefix: str, timeout: float) -> tuple[float, str]:
        """The next line starting with ``prefix`` and when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                when, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                self.wait()
                raise AssertionError(
                    f"step {self.step}: no {prefix} in {timeout} s{self}"
                ) from None
            if line is None:
                self.wait()
                raise AssertionError(f"step {self.step}: exit {self.proc.returncode}{self}")
            self.seen.append(line)
            if line.startswith(prefix):
                return when, line

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # already reaped
            os.kill(self.proc.pid, signal.SIGKILL)

    def wait(self) -> int:
        status = self.proc.wait(timeout=RUN_TIMEOUT)
        self._reader.join(timeout=10)
        while not self.lines.empty():
            _, line = self.lines.get_nowait()
            if line is not None:
                self.seen.append(line)
        return status

    def printed(self, prefix: str) -> list[str]:
        return [line for line in self.seen if line.startswith(prefix)]

    def __str__(self) -> str:
        stderr = self.stderr_path.read_bytes().decode(errors="replace")[-3000:]
        stdout = "\n".join(self.seen)
        return f"\n--- child stdout:\n{stdout}\n--- child stderr:\n{stderr}"


# The scenario -----------------------------------------------------------------------


@dataclass
class Clean:
    """A save that ran to completion: its time seen here, its phases seen by the child."""

    seconds: float  # READY to SAVED, measured here
    data_done: float  # end of the data phase, as a fraction of the child's save time
    commit_done: float  # end of Checkpoint.write (commit included), as a fraction
    commit_seconds: float  # from the end of the data phase to the end of the commit


@dataclass
class Kill:
    step: int
    fraction: float  # of the save time after READY, or (signalled) of the commit after DATA
    kind: str  # UNIFORM, BAND_KILL or SIGNALLED
    category: str
    saved_before_kill: bool
    detail: str = ""  # for WINDOW: which commit files the dead save had written


@dataclass
class Scenario:
    place: Place
    logs: Path
    seed: int
    size: int = field(init=False)  # model bytes
    chunk: int = field(init=False)  # chunk bytes
    rng: random.Random = field(init=False)
    cleans: list[Clean] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    centre: float | None = None  # of the band, as a fraction of the save time
    reference: dict[str, int] = field(default_factory=dict)  # every data file: its size
    committed: list[int] = field(default_factory=list)  # the steps committed now
    verified: dict[int, Files] = field(default_factory=dict)  # files when restored last
    # (5): per restarted manager, whether the killed step's number was taken but not committed
    restarts: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        _, _, self.size, self.chunk, _ = BACKENDS[self.place.name]
        self.rng = random.Random(f"{self.seed}-{self.place.name}")

    @property
    def so(self) -> dict[str, Any] | None:
        return self.place.storage_options

    def spawn(self, step: int, *, signal: bool = False) -> Child:
        data_bytes = sum(self.reference.values()) if signal else None
        return Child(self.place, step, self.seed, self.logs, data_bytes)

    # Saves

    def save_to_completion(self, step: int) -> str:
        """(3): a child resumes from the latest committed checkpoint and saves ``step``."""
        run = self.spawn(step)
        ready, _ = run.expect("READY", READY_TIMEOUT)
        saved, line = run.expect("SAVED", RUN_TIMEOUT)
        run.expect("DONE", RUN_TIMEOUT)
        assert run.wait() == 0, f"step {step}: exit {run.proc.returncode}{run}"
        latest = self.committed[-1] if self.committed else None
        want = f"RESUMED {self.place.path(latest)} {latest}" if latest else "RESUMED - -"
        assert run.printed("RESUMED") == [want], run
        _, path, raw_timings = line.split(" ", 2)
        assert path == self.place.path(step), run
        timings = json.loads(raw_timings)
        save = timings["save"]
        data_done = timings["write_start"] + timings["data"]
        self.cleans.append(
            Clean(
                saved - ready,
                data_done / save,
                timings["write_end"] / save,
                timings["write_end"] - data_done,
            )
        )
        return path

    def draw_kill(self) -> tuple[str, float]:
        """The kind of the next kill and its fraction (see the module docstring)."""
        draw = self.rng.random()
        if draw < UNIFORM_SHARE:
            return UNIFORM, self.rng.uniform(0.0, MAX_FRACTION)
        if draw < UNIFORM_SHARE + SIGNALLED_SHARE:
            return SIGNALLED, self.rng.uniform(0.0, SIGNAL_DELAY)
        if self.centre is None:
            first = self.cleans[0]
            self.centre = (first.data_done + first.commit_done) / 2
        low = min(max(self.centre - BAND, 0.0), MAX_FRACTION)
        high = min(max(self.centre + BAND, 0.0), MAX_FRACTION)
        return BAND_KILL, self.rng.uniform(low, high)

    def kill_during_save(self, step: int) -> tuple[Kill, Snapshot]:
        # Measured durations: medians of the last clean saves (one alone is noisier).
        recent = self.cleans[-RECENT:]
        measured = statistics.median(clean.seconds for clean in recent)
        commit = statistics.median(clean.commit_seconds for clean in recent)
        kind, fraction = self.draw_kill()
        run = self.spawn(step, signal=kind == SIGNALLED)
        ready, _ = run.expect("READY", READY_TIMEOUT)
        if kind == SIGNALLED:
            data, _ = run.expect("DATA", RUN_TIMEOUT)
            time.sleep(max(0.0, data + fraction * commit - time.perf_counter()))
        else:
            time.sleep(max(0.0, ready + fraction * measured - time.perf_counter()))
        run.kill()
        status = run.wait()
        assert status in (-signal.SIGKILL, 0), f"step {step}: exit {status}{run}"
        snapshot = self.place.settle()
        category, detail = self.where(snapshot, step)
        kill = Kill(step, fraction, kind, category, bool(run.printed("SAVED")), detail)
        if kill.saved_before_kill:
            assert kill.category == COMMITTED, (kill, run)
        if kind == SIGNALLED:  # every data file was written before DATA was printed
            assert kill.category in (WINDOW, COMMITTED), (kill, run)
        if kind == BAND_KILL and self.centre is not None:  # move the band toward the window
            if kill.category in (BEFORE, DURING):
                self.centre = min(self.centre + CENTRE_STEP, MAX_FRACTION)
            elif kill.category == COMMITTED:
                self.centre = max(self.centre - CENTRE_STEP, 0.0)
            else:
                self.centre += (fraction - self.centre) / 2
        self.kills.append(kill)
        return kill, snapshot

    def where(self, snapshot: Snapshot, step: int) -> tuple[str, str]:
        """Where the kill of the save of ``step`` landed, from what it left."""
        if step in snapshot.committed:
            return COMMITTED, ""
        attempts = snapshot.partial.get(step, [])
        for files in attempts:
            if all(files.get(key, (-1,))[0] == size for key, size in self.reference.items()):
                return WINDOW, "+".join(sorted(COMMIT_FILES & set(files))) or "data only"
        return (DURING if attempts else BEFORE), ""

    # Checks

    def check_checkpoints(self, snapshot: Snapshot) -> None:
        """(1) and (2), given the committed steps in storage."""
        place, so = self.place, self.so
        expected = self.committed
        assert sorted(snapshot.committed) == expected, (sorted(snapshot.committed), expected)
        latest = zc.latest_checkpoint(place.url, so)
        assert latest == place.path(expected[-1]), (latest, expected)
        infos = zc.list_checkpoints(place.url, so)
        assert sorted(i.number for i in infos if i.committed) == expected, (infos, expected)
        for info in infos:
            assert info.name == f"{child.CHECKPOINT_NAME}-{info.number}", info
            assert info.path == place.path(info.number), info
            if not info.committed:
                assert info.nbytes == 0, info
                assert_not_restorable(info.path, so, self.size)
                continue
            assert info.nbytes > self.size, info
            files = snapshot.committed[info.number]
            if info.path == latest or self.verified.get(info.number) != files:
                assert_restores_step(info.path, so, self.seed, self.size)
                self.verified[info.number] = files
        manager = zc.CheckpointManager(
            zc.Checkpoint(model=child.CrashModel(self.seed, self.size)),
            place.url,
            max_to_keep=child.MAX_TO_KEEP,
            checkpoint_name=child.CHECKPOINT_NAME,
            storage_options=so,
        )
        assert manager.latest_checkpoint == latest
        assert manager.checkpoints == [place.path(step) for step in expected]

    def check_restarted_manager(self, killed: int, before: Snapshot) -> str:
        """(5): a restarted manager resumes from the newest checkpoint by number and saves.

        ``before`` is the directory after the kill of the save of ``killed``,
        its leftovers still there. Returns the path of the new checkpoint.
        """
        place, so = self.place, self.so
        _, _, _, chunk, threads = BACKENDS[place.name]
        infos = zc.list_checkpoints(place.url, so)
        # The newest committed checkpoint by number, from storage: the numbered
        # directories whose _COMMIT exists and decodes, as zarrckpt lists them and
        # as the files say (S3Place decodes each _COMMIT; LocalPlace sees it exist).
        newest = max(i.number for i in infos if i.committed and i.number is not None)
        assert newest == max(before.committed), (newest, sorted(before.committed), infos)
        # Committed or not: on S3 also the killed save's ckpt-<n>/ holding its dead attempt.
        taken = [i.number for i in infos if i.number is not None]

        model = child.CrashModel(self.seed, self.size)
        manager = zc.CheckpointManager(
            TrainedCheckpoint(model, self.seed, self.size),
            place.url,
            max_to_keep=child.MAX_TO_KEEP,
            checkpoint_name=child.CHECKPOINT_NAME,
            storage_options=so,
            options=zc.CheckpointOptions(chunk_bytes=chunk, threads=threads),
        )
        restored = manager.restore_or_initialize()
        assert restored == place.path(newest), (restored, newest, infos)
        assert_holds_step(model, self.seed, newest, self.size, f"restored {restored}")

        path = manager.save()
        manager.wait()  # retention's deletes too
        assert path is not None
        number = child.step_of(path)
        assert path == place.path(number), path
        assert number > max(taken), (
            f"killed step {killed}: the restarted manager saved {path}, but "
            f"{sorted(taken)} were there before (committed: {sorted(before.committed)})"
        )
        assert manager.latest_checkpoint == path, (manager.latest_checkpoint, path)

        after = place.snapshot()
        # Committed, with every data file of the children's saves (same layout).
        assert number in after.committed, (path, sorted(after.committed))
        files = after.committed[number]
        data = {key: size for key, (size, _) in files.items() if key not in COMMIT_FILES}
        assert data == self.reference, (path, data, self.reference)
        listed = {i.number: i for i in zc.list_checkpoints(place.url, so)}
        assert listed[number].committed and listed[number].nbytes > self.size, listed[number]
        report = zc.verify(path, so)
        assert place.normalize(report.path) == place.normalize(path), report
        # The model's Variables and the save counter, every file of the manifest.
        assert report.arrays == len(child.SHARES) + 1, report
        assert report.files == len(files) - 1, (report, files)
        assert report.nbytes > self.size, report
        # The killed save's leftovers are as it left them.
        assert after.partial.get(killed) == before.partial.get(killed), killed
        # Retention kept the newest MAX_TO_KEEP, by number.
        self.committed = sorted([*self.committed, number])[-child.MAX_TO_KEEP :]
        assert sorted(after.committed) == self.committed, (sorted(after.committed), self.committed)
        self.restarts.append(killed in taken and killed not in before.committed)
        return path

    def check_gc(self, before: Snapshot) -> None:
        """(4): gc removes every leftover and nothing committed."""
        place = self.place
        removed = zc.gc(place.url, older_than=0, storage_options=self.so)
        after = place.snapshot()
        assert after.leftovers == set(), (after.leftovers, removed)
        assert after.committed == before.committed, "gc changed a committed checkpoint"
        # gc removed leftovers only: each removed path is one, lies inside one or holds one.
        leftovers = [place.normalize(path) for path in before.leftovers]
        for path in map(place.normalize, removed):
            assert any(
                path == left or path.startswith(f"{left}/") or left.startswith(f"{path}/")
                for left in leftovers
            ), (path, leftovers)
        infos = zc.list_checkpoints(place.url, self.so)
        assert [(i.number, i.committed) for i in infos] == [(n, True) for n in self.committed]

    # The run

    def run(self, kills: int) -> None:
        place = self.place
        self.save_to_completion(1)
        self.committed = [1]
        first = place.snapshot()
        assert sorted(first.committed) == [1] and not first.leftovers, first
        self.reference = {
            key: size for key, (size, _) in first.committed[1].items() if key not in COMMIT_FILES
        }
        assert sum(self.reference.values()) > self.size, self.reference
        assert len(self.reference) > self.size // self.chunk, self.reference
        self.check_checkpoints(first)

        for index in range(kills):
            step = self.committed[-1] + 1
            kill, snapshot = self.kill_during_save(step)
            now = sorted(snapshot.committed)
            if kill.category == COMMITTED:
                allowed = [*self.committed, step]
                # Retention may have deleted the oldest (marker first) before the kill.
                choices = [allowed, allowed[1:]] if len(allowed) > child.MAX_TO_KEEP else [allowed]
                assert now in choices, (kill, now, choices)
            else:
                assert now == self.committed, (kill, now, self.committed)
                assert_not_restorable(place.path(step), self.so, self.size)
            self.committed = now
            self.check_checkpoints(snapshot)
            if index % RESTART_EVERY[place.name] == 0:
                self.check_restarted_manager(step, snapshot)

            step = self.committed[-1] + 1
            path = self.save_to_completion(step)
            self.committed = [*self.committed, step][-child.MAX_TO_KEEP :]
            snapshot = place.snapshot()
            assert sorted(snapshot.committed) == self.committed, snapshot.committed
            assert zc.latest_checkpoint(place.url, self.so) == path  # restored by the next check

            self.check_gc(snapshot)

        self.check_checkpoints(place.snapshot())

    def summary(self) -> str:
        counts = Counter(kill.category for kill in self.kills)
        kinds = {
            kind: dict(Counter(kill.category for kill in self.kills if kill.kind == kind))
            for kind in (UNIFORM, BAND_KILL, SIGNALLED)
        }
        seconds = sorted(clean.seconds for clean in self.cleans)
        window = [kill for kill in self.kills if kill.category == WINDOW]
        spread = {
            category: f"{min(fs):.2f}-{max(fs):.2f}"
            for category in CATEGORIES
            if (fs := [kill.fraction for kill in self.kills if kill.category == category])
        }
        return (
            f"{self.place.name}: {len(self.kills)} kills (seed {self.seed}): "
            f"{ {c: counts[c] for c in CATEGORIES} }; by kind {kinds}; "
            f"SAVED printed before the kill "
            f"{sum(k.saved_before_kill for k in self.kills)}; clean saves "
            f"{seconds[0]:.3f}-{seconds[-1]:.3f} s (median {seconds[len(seconds) // 2]:.3f}); "
            f"window kills had written {dict(Counter(kill.detail for kill in window))}; "
            f"fractions by category {spread}; restarted managers {len(self.restarts)} "
            f"({sum(self.restarts)} numbered past the killed save's uncommitted directory)"
        )


@pytest.fixture(params=list(BACKENDS))
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return LocalPlace(tmp_path / "run")
    return S3Place(request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options"))


def test_sigkill_during_save(place, tmp_path):
    scenario = Scenario(place, tmp_path, SEED)
    LEDGER[place.name] = scenario.kills
    started = time.monotonic()
    try:
        scenario.run(kills_for(place.name))
    finally:
        if scenario.cleans:
            print(f"{scenario.summary()}; {time.monotonic() - started:.1f} s")


def test_kill_window_share():
    """At least a quarter of the kills landed after the data and before the commit."""
    kills = [kill for backend in LEDGER.values() for kill in backend]
    if not kills:
        pytest.skip("no crash test ran in this session")
    in_window = sum(kill.category == WINDOW for kill in kills)
    by_backend = {
        name: dict(Counter(kill.category for kill in backend)) for name, backend in LEDGER.items()
    }
    assert 4 * in_window >= len(kills), f"{in_window}/{len(kills)} in the window: {by_backend}"


def test_s3_process_that_listed_before_sees_a_later_commit(s3_url, s3_storage_options, tmp_path):
    """A save of step 2 died; the restarted job commits step 2 from another process.

    This process listed the directory before (as a monitor, or a trainer
    calling latest_checkpoint, does). It must then see the new commit, restore
    it, and its gc must remove only the dead attempt, never the checkpoint.
    """
    place = S3Place(s3_url, s3_storage_options)
    so = place.storage_options
    scenario = Scenario(place, tmp_path, SEED)
    size = scenario.size
    scenario.save_to_completion(1)
    scenario.committed = [1]
    # What a dead writer of step 2 leaves: an attempt prefix with data, no _COMMIT.
    dead = f"{place.root}/{child.CHECKPOINT_NAME}-2/attempt-{'0' * 32}"
    place.fs.pipe_file(f"{dead}/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')
    assert zc.latest_checkpoint(place.url, so) == place.path(1)
    infos = zc.list_checkpoints(place.url, so)
    assert sorted((i.number, i.committed) for i in infos) == [(1, True), (2, False)]
    assert_not_restorable(place.path(2), so, size)

    path = scenario.save_to_completion(2)  # another process commits step 2
    assert sorted(place.snapshot().committed) == [1, 2]
    assert zc.latest_checkpoint(place.url, so) == path
    assert_restores_step(path, so, SEED, size)
    removed = zc.gc(place.url, older_than=0, storage_options=so)
    assert sorted(place.snapshot().committed) == [1, 2], removed
    assert [place.normalize(p) for p in removed] == [dead], removed
    assert_restores_step(path, so, SEED, size)
