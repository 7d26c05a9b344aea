"""Asynchronous save (issue 13): what save() blocks for, and a training loop that checkpoints.

    python3 bench/async_save.py [--sizes 1,4] [--rounds 5] [--saves 3]
                                [--loop-size 1GiB] [--loop-rounds 3] [--steps 30] [--every 5]
                                [--parts stall,loop] [--quick] [--commit LABEL]

The machine is shared: before each process the bench waits (``--quiet-wait``)
until the CPUs have been nearly idle for 3 s, and it reports the CPU time
other processes used during each one ("other CPU"; moto's included).

Every measurement runs in a fresh process (bench/_async_worker.py) holding
bench/_model.py's transformer-shaped model (148 float32 arrays, plus the
checkpoint's save counter: 149 values) as ``zc.Variable(array, copy=False)``,
so the process's arrays are the saved values. Methods are interleaved round
by round, their order rotating; checkpoints go to ``--dir`` (default
bench/out/async-data-<stamp>, the disk the other benches use) and each is
removed as soon as it is measured.

stall (part 1), per ``--sizes`` (GiB) and round, one process per method:

* blocking: ``ckpt.save(prefix)`` (fsync on, default options), ``--saves`` times;
* async: ``ckpt.save(prefix, options=CheckpointOptions(enable_async=True))``,
  then ``ckpt.wait_until_finished()``, ``--saves`` times on one Checkpoint:
  the first allocates the staging pool, the later ones reuse it. Then one
  unmeasured save after which every value is negated while the background
  write runs; reading the checkpoint back must give the values from before;
* dcp: ``torch.distributed.checkpoint.async_save`` of the same arrays as tensors
  (``torch.from_numpy``), ``no_dist=True`` (no process group needed in torch
  2.13), one caller-owned ``DefaultStager`` so its staging buffers are reused,
  ``FileSystemWriter`` defaults; then ``future.result()``.

Every one of those processes first times ``np.copyto`` of every array into a
preallocated, already-touched copy (one thread, median of 3): the copy each of
its saves is divided by. After its saves, the blocking process also times
that copy on 2 threads in 8 MiB pieces (as zarrckpt's staging does) and into
fresh memory (``np.empty_like`` + copy, page faults included); before them, the
memory it frees would make its saves' page cache cheaper on these VMs. Blocked: the wall time of the
save call. Committed: the call plus the wait. Memory: ``ckpt.staging_pool_bytes``,
the process's RSS growth over its saves, and the peak (VmHWM, reset through
``/proc/self/clear_refs``) over the first save minus RSS before it.

loop (part 2), ``--loop-rounds`` rounds, one process per method and round: a
``--loop-size`` model, ``--steps`` compute steps (in-place ``np.multiply`` of
every array, repeated to take ``--step-seconds``, calibrated once in a process
of its own), a checkpoint after every ``--every``-th step, and at the end a
wait for everything. Methods: none; blocking (``CheckpointManager(ckpt, dir,
max_to_keep=2)``); async (the same with ``enable_async=True``); async-1thread
(the same with ``options=CheckpointOptions(threads=1)``: one background
writer thread instead of 8, so the write leaves the compute a core); two-tier
(async, ``replicate_to`` a moto S3 server, ``remote_max_to_keep=2``; a fresh
moto per run, started as bench/s3.py does); dcp (``async_save`` as above,
waiting for the previous future before each save; its checkpoints are deleted
after the run). The newest zarrckpt checkpoint, and its remote copy, are read
back and compared with the final values. Stall: the time the checkpoint call
took in the loop (for dcp with the wait for the previous save). Compute steps
are reported apart for the step right after a checkpoint (when a background
write competes with it) and for the others.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import _report
from _model import GiB, MiB, parse_size
from distributed import spread

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
WORKER = BENCH / "_async_worker.py"
STALL_METHODS = ["blocking", "async", "dcp"]
LOOP_METHODS = ["none", "blocking", "async", "async-1thread", "two-tier", "dcp"]

Record = dict[str, Any]


def parse_sizes(text: str) -> list[int]:
    """``1,4`` (GiB) or sizes with units (``256MiB,1GiB``)."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if item:
            sizes.append(int(float(item) * GiB) if item.replace(".", "").isdigit()
                         else parse_size(item))
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[5:]),
    )
    parser.add_argument("--parts", default="stall,loop", help="comma list of stall,loop")
    parser.add_argument("--sizes", default=None, help="part 1 model sizes in GiB (default 1,4)")
    parser.add_argument("--rounds", type=int, default=None, help="part 1 rounds (default 5)")
    parser.add_argument("--saves", type=int, default=None,
                        help="saves per part 1 process: the first and the later ones (default 3)")
    parser.add_argument("--stall-methods", default=",".join(STALL_METHODS))
    parser.add_argument("--loop-size", type=parse_size, default=None, help="default 1GiB")
    parser.add_argument("--loop-rounds", type=int, default=None, help="default 3")
    parser.add_argument("--steps", type=int, default=None, help="default 30")
    parser.add_argument("--every", type=int, default=None, help="steps per checkpoint (5)")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="compute per step (default 1.0)")
    parser.add_argument("--keep", type=int, default=2, help="max_to_keep of the managers")
    parser.add_argument("--loop-methods", default=",".join(LOOP_METHODS))
    parser.add_argument("--quick", action="store_true",
                        help="a check: 64 MiB models, 2 rounds, a 6-step loop (about a minute)")
    parser.add_argument("--dir", type=Path,
                        help="where checkpoints go (default: bench/out/async-data-<stamp>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--quiet-wait", type=float, default=600,
                        help="before each process, wait up to this many seconds for the "
                        "machine to be idle (0: do not wait)")
    parser.add_argument("--commit", default=None,
                        help="label of the zarrckpt tree (e.g. the commit a git archive came "
                        "from), recorded when the tree is not a git checkout")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = parse_sizes(args.sizes or ("64MiB" if quick else "1,4"))
    args.rounds = args.rounds or (2 if quick else 5)
    args.saves = args.saves or (2 if quick else 3)
    args.loop_size = args.loop_size or (64 * MiB if quick else GiB)
    args.loop_rounds = args.loop_rounds or (1 if quick else 3)
    args.steps = args.steps or (6 if quick else 30)
    args.every = args.every or (3 if quick else 5)
    args.step_seconds = args.step_seconds or (0.2 if quick else 1.0)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    args.stall_methods = [m.strip() for m in args.stall_methods.split(",") if m.strip()]
    args.loop_methods = [m.strip() for m in args.loop_methods.split(",") if m.strip()]
    if not args.parts or any(p not in ("stall", "loop") for p in args.parts):
        parser.error("--parts is a comma list of stall,loop")
    if any(m not in STALL_METHODS for m in args.stall_methods):
        parser.error(f"--stall-methods is a comma list of {','.join(STALL_METHODS)}")
    if any(m not in LOOP_METHODS for m in args.loop_methods):
        parser.error(f"--loop-methods is a comma list of {','.join(LOOP_METHODS)}")
    if min(args.rounds, args.loop_rounds, args.steps, args.every, args.keep) < 1 \
            or args.saves < 2 or not args.sizes:
        parser.error("rounds, steps, every and keep must be at least 1, --saves at least 2")
    return args


# Processes ---------------------------------------------------------------------


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _, _, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(limit: float, window: float = 3.0, busy_fraction: float = 0.15) -> float:
    """Wait (up to ``limit`` s) until the machine is nearly idle over ``window`` s.

    The machine is shared: a test suite starting next to a measurement would
    be measured with it. Returns the seconds waited.
    """
    cores = len(os.sched_getaffinity(0))
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        busy = busy_cpu_seconds()
        time.sleep(window)
        if busy_cpu_seconds() - busy < busy_fraction * cores * window:
            break
    return time.perf_counter() - start


class Runner:
    """Runs worker jobs, each in a fresh interpreter, its output in a log file."""

    def __init__(self, root: Path, logs: Path, timeout: float, seed: int,
                 quiet_wait: float) -> None:
        self.root, self.logs, self.timeout, self.seed = root, logs, timeout, seed
        self.quiet_wait = quiet_wait
        self.count = 0

    def run(self, job: dict[str, Any], tag: str) -> Record:
        self.count += 1
        name = f"{self.count:03d}-{tag}"
        where = self.root / name
        job = {**job, "dir": str(where), "seed": self.seed}
        job_file, result_file = self.logs / f"{name}.job.json", self.logs / f"{name}.result.json"
        job_file.write_text(json.dumps(job))
        waited = wait_for_quiet(self.quiet_wait) if self.quiet_wait > 0 else 0.0
        busy, ours = busy_cpu_seconds(), children_cpu_seconds() + time.process_time()
        try:
            with open(self.logs / f"{name}.log", "w") as log:
                proc = subprocess.run(
                    [sys.executable, str(WORKER), str(job_file), str(result_file)],
                    stdout=log, stderr=subprocess.STDOUT, timeout=self.timeout, check=False)
            if result_file.exists():
                result: Record = json.loads(result_file.read_text())
            else:
                tail = (self.logs / f"{name}.log").read_text().strip().splitlines()[-3:]
                result = {"error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}
        except subprocess.TimeoutExpired:
            result = {"error": f"timed out after {self.timeout:.0f} s"}
        finally:
            shutil.rmtree(where, ignore_errors=True)
        # Other processes' CPU time meanwhile (the machine is shared; moto's counts here too).
        result["other_cpu_seconds"] = (busy_cpu_seconds() - busy) - (
            children_cpu_seconds() + time.process_time() - ours)
        result["waited_for_quiet"] = waited
        if "traceback" in result:
            print("\n".join("    " + line
                            for line in result["traceback"].strip().splitlines()[-6:]))
        return result


def quiet_note(result: Record) -> str:
    waited = result.get("waited_for_quiet", 0.0)
    return f" (waited {waited:.0f} s for the machine to be idle)" if waited > 10 else ""


def rotated(methods: list[str], number: int) -> list[str]:
    shift = (number - 1) % len(methods)
    return methods[shift:] + methods[:shift]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# Part 1 --------------------------------------------------------------------------


def describe_stall(method: str, r: Record) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    copy = median(r["copy_seconds"])
    saves = r["saves"]
    text = (f"copy {copy:.3f} s; blocked " + ", ".join(f"{s['blocked']:.3f}" for s in saves)
            + " s; committed " + ", ".join(f"{s['total']:.2f}" for s in saves) + " s")
    if method == "blocking":
        text += (f"; copy 2 threads {median(r['copy2_seconds']):.3f} s, "
                 f"fresh {r['copy_fresh_seconds']:.3f} s")
    if method == "async":
        text += (f"; pool {r['staging_pool_bytes'] / MiB:.0f} MiB "
                 f"(allocated in {r['pool_allocation_seconds']:.3f} s), "
                 f"RSS +{r['rss_growth'] / MiB:.0f} MiB, "
                 f"{'verified' if r['verified_under_change'] else 'NOT VERIFIED'} under change")
    if method == "dcp":
        text += f"; RSS +{r['rss_growth'] / MiB:.0f} MiB"
    return text


def run_stall(args: argparse.Namespace, runner: Runner, records: list[Record]) -> None:
    for size in args.sizes:
        for number in range(1, args.rounds + 1):
            for method in rotated(args.stall_methods, number):
                need = 3 * size + 2 * GiB
                if disk_free(runner.root) < need:
                    raise RuntimeError(f"{runner.root}: less than {need / GiB:.0f} GiB free")
                result = runner.run({"kind": "stall", "method": method, "size": size,
                                     "saves": args.saves},
                                    f"stall-{size // MiB}MiB-r{number}-{method}")
                records.append({"part": "stall", "size": size, "round": number,
                                "method": method, **result})
                print(f"  {size / GiB:g} GiB round {number} {method:<8} "
                      f"{describe_stall(method, result)}; "
                      f"other CPU {result['other_cpu_seconds']:.1f} s"
                      f"{quiet_note(result)}", flush=True)


def _ok(records: list[Record], **match: Any) -> list[Record]:
    return sorted((r for r in records if "error" not in r
                   and all(r.get(k) == v for k, v in match.items())), key=lambda r: r["round"])


def _per_save(rows: list[Record], key: str, first: bool, over_copy: bool = False) -> list[float]:
    values: list[float] = []
    for r in rows:
        base = median(r["copy_seconds"]) if over_copy else 1.0
        saves = r["saves"][:1] if first else r["saves"][1:]
        values.extend(s[key] / base for s in saves)
    return values


def _paired(ours: list[Record], peer: list[Record], first: bool) -> list[float]:
    """Per round: our committed time over the blocking save's, save by save."""
    by_round = {r["round"]: r for r in peer}
    values: list[float] = []
    for r in ours:
        other = by_round.get(r["round"])
        if other is None:
            continue
        pairs = zip(r["saves"], other["saves"], strict=False)
        values.extend(a["total"] / b["total"] for i, (a, b) in enumerate(pairs)
                      if (i == 0) == first)
    return values


def stall_tables(records: list[Record], args: argparse.Namespace) -> str:
    parts = []
    for size in args.sizes:
        rows = [r for r in records if r["part"] == "stall" and r["size"] == size]
        blocking, async_, dcp = (_ok(rows, method=m) for m in ("blocking", "async", "dcp"))
        every = blocking + async_ + dcp
        if not every:
            continue
        label = f"{size / GiB:g} GiB ({every[0]['model_bytes'] / MiB:.0f} MiB in " \
                f"{every[0]['arrays']} arrays + the save counter)"
        copies = [median(r["copy_seconds"]) for r in every]
        blocked = [["`np.copyto`, 1 thread, into touched memory (the baseline)", "-",
                    spread(copies, ".3f"), "-", "1.00"]]
        if blocking:
            for key, what in (("copy2_seconds", "`np.copyto`, 2 threads, 8 MiB pieces"),):
                vals = [median(r[key]) for r in blocking]
                ratio = [median(r[key]) / median(r["copy_seconds"]) for r in blocking]
                blocked.append([what, "-", spread(vals, ".3f"), "-", spread(ratio)])
            fresh = [r["copy_fresh_seconds"] for r in blocking]
            blocked.append(["`np.copyto` into fresh memory (`np.empty_like`)", "-",
                            spread(fresh, ".3f"), "-",
                            spread([r["copy_fresh_seconds"] / median(r["copy_seconds"])
                                    for r in blocking])])
        for rows_, what in ((async_, "zarrckpt async `save()`"),
                            (dcp, "DCP `async_save` (reused stager)"),
                            (blocking, "zarrckpt blocking `save()` (all of it)")):
            if rows_:
                blocked.append([what, spread(_per_save(rows_, "blocked", True), ".3f"),
                                spread(_per_save(rows_, "blocked", False), ".3f"),
                                spread(_per_save(rows_, "blocked", True, over_copy=True)),
                                spread(_per_save(rows_, "blocked", False, over_copy=True))])
        parts.append(f"{label}: what the caller is blocked for, s\n\n" + _report.markdown(
            ["method", "first save", "later saves", "first / copy", "later / copy"], blocked))
        committed = []
        if blocking:
            committed.append(["zarrckpt blocking `save()`",
                              spread(_per_save(blocking, "total", True)),
                              spread(_per_save(blocking, "total", False)), "1.00", "1.00"])
        for rows_, what in ((async_, "zarrckpt async `save()` + `wait_until_finished()`"),
                            (dcp, "DCP `async_save` + `result()`")):
            if rows_:
                committed.append([what, spread(_per_save(rows_, "total", True)),
                                  spread(_per_save(rows_, "total", False)),
                                  spread(_paired(rows_, blocking, True)),
                                  spread(_paired(rows_, blocking, False))])
        if committed:
            parts.append(f"{label}: until committed, s\n\n" + _report.markdown(
                ["method", "first save", "later saves", "first / blocking",
                 "later / blocking"], committed))
        memory = []
        model = every[0]["model_bytes"]

        def mib(values: list[float], model: int = model) -> str:
            return spread([v / MiB for v in values], ".0f") + \
                f" ({100 * median(values) / model:.1f}%)"

        if async_:
            memory.append(["zarrckpt async",
                           mib([r["staging_pool_bytes"] for r in async_]),
                           mib([r["rss_growth"] for r in async_]),
                           mib([r["saves"][0]["peak_extra"] for r in async_]),
                           spread([r["pool_allocation_seconds"] for r in async_], ".3f"),
                           f"{sum(r['verified_under_change'] for r in async_)}/{len(async_)}"])
        if dcp:
            memory.append(["DCP async_save", "-", mib([r["rss_growth"] for r in dcp]),
                           mib([r["saves"][0]["peak_extra"] for r in dcp]), "-", "-"])
        if blocking:
            memory.append(["zarrckpt blocking", "-", "-",
                           mib([r["saves"][0]["peak_extra"] for r in blocking]), "-", "-"])
        if memory:
            parts.append(f"{label}: memory, MiB (% of the model)\n\n" + _report.markdown(
                ["method", "staging pool", "RSS growth over the saves",
                 "peak extra, first save", "pool allocation s", "values of save() time, "
                 "read back after changing them during the write"], memory))
    return "\n\n".join(parts)


# Part 2 --------------------------------------------------------------------------


def describe_loop(r: Record) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    stalls = [s["seconds"] for s in r["stalls"]]
    text = (f"wall {r['wall']:.1f} s, steps {statistics.mean(r['steps']):.3f} s mean, "
            f"final wait {r['final_wait']:.2f} s")
    if stalls:
        text += ", stalls " + ", ".join(f"{s:.2f}" for s in stalls) + " s"
    check = r.get("check", {})
    if "verified" in check:
        text += f", newest {'verified' if check['verified'] else 'NOT VERIFIED'}"
        if check["remote"]:
            text += f" (local {len(check['local'])}, remote {len(check['remote'])} kept)"
    return text


def run_loop(args: argparse.Namespace, runner: Runner, records: list[Record],
             info: dict[str, Any]) -> None:
    calibration = runner.run({"kind": "calibrate", "size": args.loop_size,
                              "step_seconds": args.step_seconds}, "calibrate")
    if "error" in calibration:
        raise RuntimeError(f"calibration failed: {calibration['error']}")
    info["calibration"] = calibration
    passes = calibration["passes"]
    print(f"  calibration: one in-place pass over {calibration['model_bytes'] / MiB:.0f} MiB "
          f"takes {calibration['pass_seconds']:.3f} s; {passes:.2f} passes a step "
          f"(checked: {calibration['check_seconds']:.3f} s)", flush=True)
    for number in range(1, args.loop_rounds + 1):
        for method in rotated(args.loop_methods, number):
            if disk_free(runner.root) < 8 * args.loop_size + 2 * GiB:
                raise RuntimeError(f"{runner.root}: not enough free disk for the loop")
            job: dict[str, Any] = {"kind": "loop", "method": method, "size": args.loop_size,
                                   "passes": passes, "steps": args.steps, "every": args.every,
                                   "keep": args.keep, "s3": None, "remote": None}
            moto = None
            try:
                if method == "two-tier":
                    import s3fs
                    from s3 import _start_moto

                    moto, endpoint = _start_moto()
                    job["s3"] = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
                    s3fs.S3FileSystem(**job["s3"]).mkdir("bench")
                    job["remote"] = f"s3://bench/run-{number}"
                result = runner.run(job, f"loop-r{number}-{method}")
            finally:
                if moto is not None:
                    moto.kill()
                    moto.wait()
            records.append({"part": "loop", "round": number, "method": method, **result})
            print(f"  loop round {number} {method:<8} {describe_loop(result)}; "
                  f"other CPU {result['other_cpu_seconds']:.1f} s{quiet_note(result)}",
                  flush=True)


LOOP_LABELS = {
    "none": "no checkpointing",
    "blocking": "zarrckpt manager, blocking",
    "async": "zarrckpt manager, async",
    "async-1thread": "zarrckpt manager, async, `CheckpointOptions(threads=1)`",
    "two-tier": "zarrckpt manager, async + replicate_to moto S3",
    "dcp": "DCP async_save (reused stager)",
}


def after(run: Record, checkpoint: bool) -> list[float]:
    """The compute steps right after a checkpoint, or all the others."""
    marks = {s["step"] + 1 for s in run["stalls"]}
    return [t for i, t in enumerate(run["steps"], 1) if (i in marks) == checkpoint]


def loop_table(records: list[Record], args: argparse.Namespace) -> str:
    rows = [r for r in records if r["part"] == "loop"]
    none = {r["round"]: r for r in _ok(rows, method="none")}
    table = []
    for method in args.loop_methods:
        runs = _ok(rows, method=method)
        if not runs:
            continue
        walls = [r["wall"] for r in runs]
        ratio = [r["wall"] / none[r["round"]]["wall"] for r in runs if r["round"] in none]
        stalls = [s["seconds"] for r in runs for s in r["stalls"]]
        first = [r["stalls"][0]["seconds"] for r in runs if r["stalls"]]
        later = [s["seconds"] for r in runs for s in r["stalls"][1:]]
        count = len(runs[0]["stalls"])
        overhead = [(r["wall"] - none[r["round"]]["wall"]) / count
                    for r in runs if r["round"] in none and count]
        table.append([
            LOOP_LABELS[method], spread(walls, ".1f"),
            "1.00" if method == "none" else spread(ratio, ".3f"),
            spread(first) if stalls else "-", spread(later) if later else "-",
            spread(overhead) if method != "none" and overhead else "-",
            spread([statistics.mean(after(r, True)) for r in runs], ".3f")
            if method != "none" else "-",
            spread([statistics.mean(after(r, False)) for r in runs], ".3f"),
            spread([r["final_wait"] for r in runs]) if stalls else "-",
        ])
    checks = [r for r in _ok(rows) if "verified" in r.get("check", {})]
    note = (f"\n\nnewest checkpoint read back equal to the final values (and its remote copy, "
            f"two-tier): {sum(r['check']['verified'] for r in checks)}/{len(checks)} runs")
    rounds = f"{args.loop_rounds} round" + ("s" if args.loop_rounds != 1 else "")
    return (f"Training loop: {args.steps} steps of ~{args.step_seconds:g} s on "
            f"{args.loop_size / MiB:.0f} MiB, a checkpoint every {args.every} steps, "
            f"{rounds}\n\n" + _report.markdown(
                ["method", "wall s", "x no checkpointing", "first stall s",
                 "later stalls s", "wall added per checkpoint s",
                 "step after a checkpoint s", "other steps s", "final wait s"], table) + note)


# Main ----------------------------------------------------------------------------


def header(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import zarrckpt

    library = Path(zarrckpt.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(library), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    versions = _report.versions()
    from importlib import metadata

    for package in ("moto", "s3fs"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _report.machine(root),
        "versions": versions,
        "transparent_hugepage": thp.read_text().strip() if thp.exists() else "unknown",
        "zarrckpt": {"path": str(library), "commit": commit or args.commit or "not a git tree"},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: the dcp methods are skipped")
        args.stall_methods = [m for m in args.stall_methods if m != "dcp"]
        args.loop_methods = [m for m in args.loop_methods if m != "dcp"]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = (args.dir or OUT / f"async-data-{stamp}").resolve()
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    info = header(args, root)
    m = info["machine"]
    print(f"command:  {info['command']}\ndate:     {info['date']}\n"
          f"machine:  {m['nproc']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, "
          f"Linux {m['kernel']}, Python {m['python']}, THP {info['transparent_hugepage']}\n"
          f"data dir: {root} ({m['data_dir_free_bytes'] / 2**30:.0f} GiB free)\n"
          "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n"
          f"zarrckpt: {info['zarrckpt']['path']} ({info['zarrckpt']['commit']})", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="zarrckpt-async-logs-"))
    runner = Runner(root, logs, args.timeout, args.seed, args.quiet_wait)
    records: list[Record] = []
    started = time.perf_counter()
    try:
        if "stall" in args.parts:
            print("part 1: what save() blocks for", flush=True)
            run_stall(args, runner, records)
        if "loop" in args.parts:
            print("part 2: training loop", flush=True)
            run_loop(args, runner, records, info)
    finally:
        if created and root.exists() and not any(root.iterdir()):
            root.rmdir()
        print(f"worker logs: {logs} ({time.perf_counter() - started:.0f} s in all)")
    print("\nmedian (min-max); ratios: median (min-max) of the per-save or per-round ratios "
          "(a save over its own process's copy; committed times over the blocking save of "
          "the same round and index)\n")
    texts = []
    if "stall" in args.parts:
        texts.append(stall_tables(records, args))
    if "loop" in args.parts:
        texts.append(loop_table(records, args))
    print("\n\n".join(texts))
    other = [r["other_cpu_seconds"] for r in records if "other_cpu_seconds" in r
             and r["method"] != "two-tier"]
    if other:
        print(f"\nCPU seconds used by other processes during each job (two-tier, whose moto "
              f"counts, left out): {spread(other, '.1f')}")
    errors = [r for r in records if "error" in r]
    if errors:
        print("\nErrors:")
        for r in errors:
            print(f"  {r['part']} {r['method']} round {r['round']}: {r['error']}")
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"async-save-{stamp}.json"
    out.write_text(json.dumps({**info, "args": {k: str(v) for k, v in vars(args).items()},
                               "records": records}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
