"""One process of bench/async_save.py: one method, one round, in a fresh interpreter.

Usage: ``python bench/_async_worker.py JOB.json RESULT.json``. Every job builds
the model first (bench/_model.py's transformer of ``size`` float32 bytes,
``zc.Variable(array, copy=False)`` so the arrays are the variables' own
buffers), then runs one of:

* ``{"kind": "stall", "method": "blocking" | "async" | "dcp", ...}``: the
  part 1 measurements. Every process first times ``np.copyto`` of every array
  into a preallocated, already-touched copy (3 times; the baseline its saves
  are divided by), then ``saves`` saves to ``dir``, each followed by its wait
  and the removal of what it wrote: ``blocking`` a plain ``ckpt.save(prefix)``
  (after its saves it also times the copy on 2 threads and into fresh
  memory); ``async``
  ``ckpt.save(prefix, options=CheckpointOptions(enable_async=True))`` and
  ``ckpt.wait_until_finished()``, on one Checkpoint (the first save allocates
  its staging pool), then one more save, unmeasured, after which every value
  is negated at once while the background write runs, to check that the
  checkpoint holds the values of the moment ``save()`` returned; ``dcp``
  ``dcp.async_save`` of the same memory as tensors (``torch.from_numpy``)
  with one caller-owned ``DefaultStager`` (reused staging buffers; the CPU
  wheel cannot pin memory, so ``FileSystemWriter(cache_staged_state_dict=True)``
  is not an option) and ``no_dist=True`` (no process group), then
  ``future.result()``.
* ``{"kind": "calibrate", ...}``: how many in-place passes over every array
  make one compute step of ``step_seconds``.
* ``{"kind": "loop", "method": "none" | "blocking" | "async" | "async-1thread" |
  "two-tier" | "dcp", ...}``: the training-loop simulation of part 2 (``steps`` compute
  steps, a checkpoint after every ``every``-th, everything waited for at the
  end), then a check that the newest checkpoint holds the final values.

A tiny blocking save (and for ``dcp`` a tiny ``dcp.save``) runs first in every
process, so imports and first-use costs are not in any timing.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from _dist_worker import _status_kib, reset_peak
from _methods import touched_empty
from _model import ArraySpec, generate, transformer_specs

Job = dict[str, Any]
Result = dict[str, Any]
Array = np.ndarray[Any, Any]

COPY_REPEATS = 3
PIECE = 8 << 20  # bytes per task of the 2-thread copy (zarrckpt's staging copy uses 8 MiB)
STEP_FACTOR = 1.0001  # the compute step multiplies by this and by its inverse, alternately


def rss() -> int:
    return _status_kib("VmRSS")


def peak() -> int:
    return _status_kib("VmHWM")


# Model -----------------------------------------------------------------------


def build(job: Job) -> tuple[list[ArraySpec], list[Array]]:
    specs = transformer_specs(int(job["size"]), "float32")
    return specs, [generate(spec, int(job["seed"])) for spec in specs]


def zc_model(specs: list[ArraySpec], arrays: list[Array]) -> Any:
    import zarrckpt as zc

    return zc.Dict({s.name: zc.Variable(a, copy=False) for s, a in zip(specs, arrays, strict=True)})


def torch_state(specs: list[ArraySpec], arrays: list[Array]) -> dict[str, Any]:
    import torch

    return {s.name: torch.from_numpy(a) for s, a in zip(specs, arrays, strict=True)}


def warm_up(root: Path, dcp: bool = False) -> None:
    """A tiny save with each library this process uses (imports, thread pools)."""
    import zarrckpt as zc

    small = [np.ones((256, 64), np.float32), np.ones(64, np.float32)]
    path = root / f"warmup-{os.getpid()}"
    try:
        model = zc.Dict({f"w{i}": zc.Variable(a) for i, a in enumerate(small)})
        zc.Checkpoint(model=model).write(str(path / "zarrckpt"))
        if dcp:
            import torch
            import torch.distributed.checkpoint as tdcp

            state = {f"w{i}": torch.from_numpy(a) for i, a in enumerate(small)}
            tdcp.save(state, storage_writer=tdcp.FileSystemWriter(str(path / "dcp")),
                      no_dist=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Copies ----------------------------------------------------------------------


def copy_all(sources: list[Array], targets: list[Array]) -> float:
    start = time.perf_counter()
    for source, target in zip(sources, targets, strict=True):
        np.copyto(target, source)
    return time.perf_counter() - start


def copy_threads(sources: list[Array], targets: list[Array], threads: int) -> float:
    """The same copy in 8 MiB pieces on ``threads`` threads (as zarrckpt's staging does)."""
    def piece(src: Array, dst: Array, a: int) -> None:
        np.copyto(dst[a : a + PIECE], src[a : a + PIECE])

    tasks: list[Callable[[], None]] = []
    for source, target in zip(sources, targets, strict=True):
        src, dst = source.reshape(-1).view(np.uint8), target.reshape(-1).view(np.uint8)
        tasks.extend(partial(piece, src, dst, a) for a in range(0, src.nbytes, PIECE))
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        for future in [pool.submit(task) for task in tasks]:
            future.result()
        return time.perf_counter() - start


def copy_fresh(sources: list[Array]) -> float:
    """Allocate new arrays and copy into them: the page faults of fresh memory included."""
    start = time.perf_counter()
    copies = []
    for source in sources:
        copy = np.empty_like(source)
        np.copyto(copy, source)
        copies.append(copy)
    seconds = time.perf_counter() - start
    del copies
    return seconds


def touched_targets(specs: list[ArraySpec]) -> list[Array]:
    return [touched_empty(spec) for spec in specs]


# Part 1: what save() blocks for ------------------------------------------------


def stall_blocking(job: Job, specs: list[ArraySpec], arrays: list[Array], root: Path,
                   result: Result) -> None:
    import zarrckpt as zc

    targets = touched_targets(specs)
    result["copy_seconds"] = [copy_all(arrays, targets) for _ in range(COPY_REPEATS)]
    ckpt = zc.Checkpoint(model=zc_model(specs, arrays))
    saves = []
    for _ in range(int(job["saves"])):
        before = rss()
        reset_peak()
        start = time.perf_counter()
        path = ckpt.save(str(root / "ckpt"))
        seconds = time.perf_counter() - start
        stats = ckpt.last_write_stats
        saves.append({"blocked": seconds, "total": seconds, "peak_extra": peak() - before,
                      "written": stats.nbytes if stats else None,
                      "files": stats.files if stats else None})
        shutil.rmtree(path)
    result["saves"] = saves
    # After the saves: memory freed just before a save would make its page cache cheap
    # on this VM (see bench/RESULTS.md), an advantage the other processes do not get.
    result["copy2_seconds"] = [copy_threads(arrays, targets, 2) for _ in range(COPY_REPEATS)]
    result["copy_fresh_seconds"] = copy_fresh(arrays)


def stall_async(job: Job, specs: list[ArraySpec], arrays: list[Array], root: Path,
                result: Result) -> None:
    import zarrckpt as zc

    targets = touched_targets(specs)
    result["copy_seconds"] = [copy_all(arrays, targets) for _ in range(COPY_REPEATS)]
    model = zc_model(specs, arrays)
    ckpt = zc.Checkpoint(model=model)
    options = zc.CheckpointOptions(enable_async=True)
    saves = []
    rss_start = rss()
    for _ in range(int(job["saves"])):
        before = rss()
        reset_peak()
        start = time.perf_counter()
        path = ckpt.save(str(root / "ckpt"), options=options)
        blocked = time.perf_counter() - start
        after_save = rss()
        ckpt.wait_until_finished()
        total = time.perf_counter() - start
        stats = ckpt.last_write_stats
        assert stats is not None
        saves.append({
            "blocked": blocked, "total": total, "stats_blocked": stats.blocked_seconds,
            "staged_bytes": stats.staged_bytes, "staging_pool_bytes": stats.staging_pool_bytes,
            "written": stats.nbytes, "files": stats.files,
            "rss_growth_save": after_save - before, "rss_growth": rss() - before,
            "peak_extra": peak() - before,
        })
        shutil.rmtree(path)
    saver = ckpt.__dict__.get("_zc_async")  # private: how much of the first save was the pool
    result["pool_allocation_seconds"] = getattr(getattr(saver, "pool", None),
                                                "allocation_seconds", None)
    result["staging_pool_bytes"] = ckpt.staging_pool_bytes
    result["rss_growth"] = rss() - rss_start
    result["saves"] = saves
    result["verified_under_change"] = verify_async_snapshot(ckpt, model, arrays, targets, root)


def verify_async_snapshot(ckpt: Any, model: Any, arrays: list[Array], snapshot: list[Array],
                          root: Path) -> bool:
    """Save, change every value while the background write runs, read back: the old values?"""
    import zarrckpt as zc

    copy_all(arrays, snapshot)
    path = ckpt.save(str(root / "ckpt"), options=zc.CheckpointOptions(enable_async=True))
    for array in arrays:
        np.negative(array, out=array)
    ckpt.wait_until_finished()
    ckpt.release_staging_pool()
    zc.Checkpoint(model=model).read(path).assert_consumed()  # into the live arrays
    same = all(np.array_equal(a, s) for a, s in zip(arrays, snapshot, strict=True))
    shutil.rmtree(path)
    return same


def stall_dcp(job: Job, specs: list[ArraySpec], arrays: list[Array], root: Path,
              result: Result) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    targets = touched_targets(specs)
    result["copy_seconds"] = [copy_all(arrays, targets) for _ in range(COPY_REPEATS)]
    # The copies stay alive, as in the async process (freeing them just before the first
    # save would hand the stager freshly freed pages).
    state = torch_state(specs, arrays)
    # No pinned memory, shared memory, background staging or non-blocking copies:
    # each needs an accelerator. Its StateDictStager keeps the staged storages.
    stager = DefaultStager(StagingOptions(False, False, False, False))
    saves = []
    rss_start = rss()
    try:
        for number in range(int(job["saves"])):
            path = root / f"dcp-{number}"
            before = rss()
            reset_peak()
            start = time.perf_counter()
            future: Any = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(path)),
                                         async_stager=stager, no_dist=True)
            blocked = time.perf_counter() - start
            after_save = rss()
            future.result()
            total = time.perf_counter() - start
            saves.append({"blocked": blocked, "total": total,
                          "rss_growth_save": after_save - before, "rss_growth": rss() - before,
                          "peak_extra": peak() - before})
            shutil.rmtree(path)
        result["rss_growth"] = rss() - rss_start
    finally:
        stager.close()
    result["saves"] = saves


STALL = {"blocking": stall_blocking, "async": stall_async, "dcp": stall_dcp}


# Part 2: a training loop ---------------------------------------------------------


def compute(arrays: list[Array], passes: float, nbytes: int) -> None:
    """One "training step": ``passes`` in-place multiplications of every value (the last
    pass fractional, over the first arrays), by a factor and its inverse alternately."""
    whole = int(passes)
    for number in range(whole + 1):
        factor = STEP_FACTOR if number % 2 == 0 else 1 / STEP_FACTOR
        budget = nbytes if number < whole else (passes - whole) * nbytes
        done = 0
        for array in arrays:
            if done >= budget:
                break
            np.multiply(array, factor, out=array)
            done += array.nbytes


def calibrate(job: Job, specs: list[ArraySpec], arrays: list[Array], root: Path,
              result: Result) -> None:
    nbytes = sum(a.nbytes for a in arrays)
    compute(arrays, 2, nbytes)  # warm
    times = []
    for _ in range(5):
        start = time.perf_counter()
        compute(arrays, 4, nbytes)
        times.append((time.perf_counter() - start) / 4)
    per_pass = float(np.median(times))
    passes = float(job["step_seconds"]) / per_pass
    start = time.perf_counter()
    compute(arrays, passes, nbytes)
    result.update(pass_seconds=per_pass, passes=passes, check_seconds=time.perf_counter() - start)


class NoCheckpoint:
    def checkpoint(self) -> dict[str, Any]:
        return {}

    def finish(self) -> None:
        pass

    def verify(self, arrays: list[Array]) -> dict[str, Any]:
        return {}


class ManagerSaves:
    """A zarrckpt CheckpointManager (blocking, async, or async with a remote tier)."""

    def __init__(self, method: str, specs: list[ArraySpec], arrays: list[Array], root: Path,
                 job: Job) -> None:
        import zarrckpt as zc

        self.zc = zc
        self.specs = specs
        self.ckpt = zc.Checkpoint(model=zc_model(specs, arrays))
        remote: dict[str, Any] = {}
        if method == "two-tier":
            remote = {"replicate_to": job["remote"], "replicate_storage_options": job["s3"],
                      "remote_max_to_keep": int(job["keep"])}
        self.s3 = job["s3"]
        options = zc.CheckpointOptions(threads=1) if method == "async-1thread" else None
        self.manager = zc.CheckpointManager(self.ckpt, str(root / "run"),
                                            max_to_keep=int(job["keep"]), options=options,
                                            enable_async=method != "blocking", **remote)

    def checkpoint(self) -> dict[str, Any]:
        self.manager.save()
        stats = self.ckpt.last_write_stats
        # IOStats.blocked_seconds: the whole write when blocking, the staging when async.
        return {"library_blocked": stats.blocked_seconds if stats is not None else None}

    def finish(self) -> None:
        self.manager.wait_until_finished()

    def verify(self, arrays: list[Array]) -> dict[str, Any]:
        """The newest checkpoint (and its remote copy) read back equal the final values."""
        latest = self.manager.latest_checkpoint
        assert latest is not None, "no checkpoint committed"
        found: dict[str, Any] = {"latest": latest, "local": list(self.manager.checkpoints),
                                 "remote": list(self.manager.remote_checkpoints)}
        self.ckpt.release_staging_pool()
        live = [np.zeros_like(a) for a in arrays]
        places: list[tuple[str, dict[str, Any] | None]] = [(latest, None)]
        if found["remote"]:
            places.append((found["remote"][-1], self.s3))
        ok = True
        for path, options in places:
            for array in live:
                array.fill(0)
            self.zc.Checkpoint(model=zc_model(self.specs, live)).read(
                path, storage_options=options).assert_consumed()
            ok = ok and all(np.array_equal(a, b) for a, b in zip(arrays, live, strict=True))
        found["verified"] = ok
        return found


class DcpSaves:
    """torch DCP ``async_save`` with one reused stager, waiting for the previous save first."""

    def __init__(self, specs: list[ArraySpec], arrays: list[Array], root: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.dcp = dcp
        self.state = torch_state(specs, arrays)
        self.stager = DefaultStager(StagingOptions(False, False, False, False))
        self.root = root
        self.future: Any = None
        self.number = 0

    def checkpoint(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self.future is not None:
            self.future.result()
        waited = time.perf_counter() - start
        self.number += 1
        path = self.root / f"dcp-{self.number}"
        self.future = self.dcp.async_save(
            self.state, storage_writer=self.dcp.FileSystemWriter(str(path)),
            async_stager=self.stager, no_dist=True)
        return {"waited_for_previous": waited,
                "async_save_call": time.perf_counter() - start - waited}

    def finish(self) -> None:
        if self.future is not None:
            self.future.result()
        self.stager.close()

    def verify(self, arrays: list[Array]) -> dict[str, Any]:
        return {"checkpoints": self.number}


def loop(job: Job, specs: list[ArraySpec], arrays: list[Array], root: Path,
         result: Result) -> None:
    method = job["method"]
    nbytes = sum(a.nbytes for a in arrays)
    saver: NoCheckpoint | ManagerSaves | DcpSaves
    if method == "none":
        saver = NoCheckpoint()
    elif method == "dcp":
        saver = DcpSaves(specs, arrays, root)
    else:
        saver = ManagerSaves(method, specs, arrays, root, job)
    passes, every = float(job["passes"]), int(job["every"])
    steps: list[float] = []
    stalls: list[dict[str, Any]] = []
    rss_start = rss()
    start = time.perf_counter()
    for step in range(1, int(job["steps"]) + 1):
        begin = time.perf_counter()
        compute(arrays, passes, nbytes)
        steps.append(time.perf_counter() - begin)
        if method != "none" and step % every == 0:
            begin = time.perf_counter()
            info = saver.checkpoint()
            stalls.append({"step": step, "seconds": time.perf_counter() - begin, **info})
    begin = time.perf_counter()
    saver.finish()
    end = time.perf_counter()
    result.update(wall=end - start, final_wait=end - begin, steps=steps, stalls=stalls,
                  rss_growth=rss() - rss_start, peak_extra=peak() - rss_start)
    result["check"] = saver.verify(arrays)


# Entry -------------------------------------------------------------------------


def run(job: Job) -> Result:
    root = Path(job["dir"])
    root.mkdir(parents=True, exist_ok=True)
    result: Result = {"pid": os.getpid()}
    try:
        warm_up(root, dcp=job.get("method") == "dcp")
        start = time.perf_counter()
        specs, arrays = build(job)
        gc.collect()
        result.update(build_seconds=time.perf_counter() - start, arrays=len(arrays),
                      model_bytes=sum(a.nbytes for a in arrays), rss_model=rss())
        if job["kind"] == "stall":
            STALL[job["method"]](job, specs, arrays, root, result)
        elif job["kind"] == "calibrate":
            calibrate(job, specs, arrays, root, result)
        elif job["kind"] == "loop":
            loop(job, specs, arrays, root, result)
        else:
            raise ValueError(f"unknown job kind {job['kind']!r}")
    except Exception as exc:
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return result


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    Path(argv[2]).write_text(json.dumps(run(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
