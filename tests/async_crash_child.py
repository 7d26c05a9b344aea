"""Child program of tests/test_async_crash.py: resume, then save asynchronously (or in two tiers).

Usage::

    python tests/async_crash_child.py --dir URL [--storage-options JSON] --seed S --size BYTES
        [--steps N[,M...]] [--api manager|checkpoint] [--chunk-bytes B] [--threads T]
        [--stall-after BYTES] [--exit wait|return|hold] [--max-to-keep K]
        [--replicate-to URL [--replicate-storage-options JSON]] [--gc-older-than SECONDS]

Builds tests/crash_child.py's model (``CrashModel``: at step N it holds
``model_values(seed, N, size)``, bit for bit), resumes from the latest
committed checkpoint and checks that it holds exactly the model of the step
it names, then, for each of ``--steps``: assigns that step's model, saves it
asynchronously as ``ckpt-<step>``, and as soon as ``save()`` returned assigns
the next step's model (training goes on while the save runs in the
background). ``--api manager`` (the default) saves and resumes with a
``CheckpointManager(enable_async=True)`` (two tiers with ``--replicate-to``);
``--api checkpoint`` with ``Checkpoint.save(prefix,
options=CheckpointOptions(enable_async=True))`` and
``latest_checkpoint`` + ``restore``. It prints, one line each, flushed:

    RESUMED <path|-> <step|->  what was restored (or "-" for a fresh start)
    SAVED <path>               save() returned (the write runs in the background)
    DATA                       with --stall-after D: the background write has written
                               D bytes; from then on every I/O thread waits in
                               CheckpointOptions.progress, writing nothing more, and
                               the process waits to be killed
    AT-RETURN <json>           --exit return: whether the last save was committed
                               ("committed", in storage) and listed by the manager
                               ("listed") just before main returns, without waiting:
                               the exit hook must finish the save. Until then the
                               background write waits after its first files, then it
                               takes FILE_DELAY per file, so it is still running then.
    LOCAL <json>               --exit hold: every save is committed in --dir
                               (manager.checkpoints); copies to --replicate-to may still
                               run; the process then waits to be killed
    DONE <json>                --exit wait: wait_until_finished() returned; the
                               manager's checkpoints, remote_checkpoints and
                               latest_checkpoint (or latest_checkpoint(--dir))

Exit status 3: the restored checkpoint did not hold the model it names;
4: a save returned a path not named after its step; 5: still alive after
HOLD_SECONDS of --exit hold (the parent should have killed it).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from crash_child import (
    CHECKPOINT_NAME,
    CrashModel,
    DataSignal,
    model_values,
    same_bits,
    say,
    step_of,
)

import zarrckpt as zc

HOLD_SECONDS = 300.0  # the longest a child waits to be killed
FILE_DELAY = 0.02  # --exit return: seconds per file the background write takes, once released


class Progress:
    """The child's ``CheckpointOptions.progress``: stalls or gates the background write.

    Called by the I/O threads after each file they wrote or read; does nothing
    until :meth:`arm` (so not during the resume's restore). With ``stall_after``
    it prints DATA once that many bytes are written and then holds every
    thread that calls it (the write stops part-way, for the kill). With
    ``gated`` it holds every thread until :meth:`release`, then slows each
    file by FILE_DELAY.
    """

    def __init__(self, stall_after: int | None, gated: bool) -> None:
        self.signal = DataSignal(stall_after) if stall_after else None
        self.released = threading.Event()
        if not gated:
            self.released.set()
        self.delay = FILE_DELAY if gated else 0.0
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def __call__(self, nbytes: int) -> None:
        if not self.armed:
            return
        if self.signal is not None:
            self.signal(nbytes)
            if self.signal.said:
                time.sleep(HOLD_SECONDS)
        self.released.wait(HOLD_SECONDS)
        time.sleep(self.delay)

    def release(self) -> None:
        self.released.set()


def assign_step(model: CrashModel, seed: int, step: int, size: int) -> None:
    for variable, value in zip(model.variables(), model_values(seed, step, size), strict=True):
        variable.assign(value)


def holds_step(model: CrashModel, seed: int, step: int, size: int) -> bool:
    return all(
        same_bits(variable.numpy(), want)
        for variable, want in zip(model.variables(), model_values(seed, step, size), strict=True)
    )


def committed_names(directory: str, storage_options: dict[str, Any] | None) -> list[str]:
    return [c.name for c in zc.list_checkpoints(directory, storage_options) if c.committed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--storage-options", type=json.loads, default=None)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", default="")
    parser.add_argument("--api", choices=("manager", "checkpoint"), default="manager")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stall-after", type=int, default=None)
    parser.add_argument("--exit", choices=("wait", "return", "hold"), default="wait")
    parser.add_argument("--max-to-keep", type=int, default=3)
    parser.add_argument("--replicate-to", default=None)
    parser.add_argument("--replicate-storage-options", type=json.loads, default=None)
    parser.add_argument("--gc-older-than", type=float, default=3600.0)
    args = parser.parse_args(argv)
    so = args.storage_options
    steps = [int(step) for step in args.steps.split(",") if step]

    progress = Progress(args.stall_after, gated=args.exit == "return")
    options = zc.CheckpointOptions(
        chunk_bytes=args.chunk_bytes, threads=args.threads, progress=progress, enable_async=True
    )
    model = CrashModel(args.seed, args.size)
    checkpoint = zc.Checkpoint(model=model)
    manager = None
    if args.api == "manager":
        manager = zc.CheckpointManager(
            checkpoint,
            args.dir,
            max_to_keep=args.max_to_keep,
            checkpoint_name=CHECKPOINT_NAME,
            storage_options=so,
            options=options,
            gc_older_than=args.gc_older_than,
            enable_async=True,
            replicate_to=args.replicate_to,
            replicate_storage_options=args.replicate_storage_options,
        )
        latest = manager.restore_or_initialize()
    else:
        latest = zc.latest_checkpoint(args.dir, so)
        if latest is not None:
            checkpoint.restore(latest, storage_options=so).assert_consumed()

    # Resume: the latest committed checkpoint must hold exactly the model of its step.
    if latest is None:
        say("RESUMED - -")
    elif not holds_step(model, args.seed, step_of(latest), args.size):
        say(f"RESUME-MISMATCH {latest}")
        return 3
    else:
        say(f"RESUMED {latest} {step_of(latest)}")

    path = None
    progress.arm()
    for step in steps:
        assign_step(model, args.seed, step, args.size)
        if manager is not None:
            path = manager.save(checkpoint_number=step)
        else:
            path = checkpoint.save(
                f"{args.dir}/{CHECKPOINT_NAME}", options=options, storage_options=so
            )
        say(f"SAVED {path}")
        if path is None or step_of(path) != step:
            return 4
        # Training goes on at once: the save must hold the values it was given.
        assign_step(model, args.seed, step + 1, args.size)

    if args.exit == "wait":
        if manager is not None:
            manager.wait_until_finished()
            done = {
                "checkpoints": manager.checkpoints,
                "remote_checkpoints": manager.remote_checkpoints,
                "latest": manager.latest_checkpoint,
            }
        else:
            checkpoint.wait_until_finished()
            done = {"latest": zc.latest_checkpoint(args.dir, so)}
        say(f"DONE {json.dumps(done)}")
        return 0
    if args.exit == "return":
        assert path is not None, "--exit return needs a save"
        name = path.rstrip("/").rsplit("/", 1)[-1]
        state = {
            "committed": name in committed_names(args.dir, so),
            "listed": manager is not None and path in manager.checkpoints,
        }
        say(f"AT-RETURN {json.dumps(state)}")
        progress.release()
        return 0  # the save is still running: the exit hook finishes it
    checkpoint.wait_until_finished()  # the local saves, not the copies to --replicate-to
    assert manager is not None, "--exit hold needs --api manager"
    say(f"LOCAL {json.dumps(manager.checkpoints)}")
    time.sleep(HOLD_SECONDS)
    return 5


if __name__ == "__main__":
    sys.exit(main())
