"""The PyTorch adapter (zarrckpt.torch) against DCP and torch.save/torch.load (issue 12).

    python3 bench/torch_adapter.py [--size 1GiB] [--single-size 1GiB] [--rounds 5]
                                   [--s3-rounds 3] [--storages local,s3]
                                   [--parts distributed,single] [--quick] [--profile]

Two parts, run in the same rounds (interleaved, the order of the libraries
alternating by round):

distributed: a gloo world of ``--world`` ranks (default 2; real processes,
bench/_torch_worker.py started through bench/distributed.py's ``World`` and
kept for the whole run) holds an FSDP2 transformer of ``--size`` float32
parameters (bench/_model.py's shapes as ``nn.Linear`` / ``nn.LayerNorm`` /
``nn.Embedding``; ``fully_shard`` on every block, then on the root), so each
rank holds ``--size / --world`` of it. No optimizer state. Compared:

* zarrckpt: ``zc.Checkpoint(model=zarrckpt.torch.ModuleState(model))``,
  ``.write(path, coordinator=TorchCoordinator(), storage_options=...)`` and
  ``.read(path, coordinator=..., storage_options=...)`` on every rank;
* DCP, the standard recipe: ``dcp.save(get_model_state_dict(model))`` and
  ``sd = get_model_state_dict(model); dcp.load(sd); set_model_state_dict(model, sd)``,
  with ``FileSystemWriter``/``FileSystemReader`` defaults locally and
  ``FsspecWriter(sync_files=False)``/``FsspecReader`` on S3 (as bench/distributed.py).

single: one process holds a plain CPU module of ``--single-size`` (same
shapes). Compared: ``Checkpoint(model=ModuleState(m)).write(path)`` /
``.read(path)`` against ``torch.save(m.state_dict(), f)`` (timed alone and
with an fsync of the file and its directories, zarrckpt fsyncing its own) and
``m.load_state_dict(torch.load(f, weights_only=True))``, also with
``mmap=True``. Both torch loads read the file the torch save of the same
round wrote.

Every local load is cold (the checkpoint's files fsynced and evicted with
``posix_fadvise(DONTNEED)``, the residue checked with mincore, as
bench/run.py); S3 is a moto server in its own process (bench/s3.py). Every
load is verified against the source values, and whether every parameter kept
its ``data_ptr()`` is recorded. Seconds: barrier to barrier (the slowest rank)
when distributed, the call itself in one process. Peak extra memory: VmHWM
over the operation (reset through ``/proc/self/clear_refs``) minus VmRSS just
before, the largest rank's; it counts mapped file pages too (``mmap=True``),
so RssAnon/RssFile at the end of the operation are recorded as well.
"""

from __future__ import annotations

import argparse
import json
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
import distributed as dist_bench
from _model import MiB, parse_size
from distributed import Storage, World, spread

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
# bench/distributed.py's World starts this module's worker instead of its own.
dist_bench.WORKER = BENCH / "_torch_worker.py"

DIST_LIBS = ["zarrckpt", "dcp"]
SINGLE_SAVES = ["zarrckpt", "torch"]
SINGLE_LOADS = ["zarrckpt", "torch", "torch-mmap"]
WARMUP_BYTES = 4 * MiB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[5:]),
    )
    parser.add_argument("--size", type=parse_size, default=None,
                        help="distributed model, all ranks together (default 1GiB: 2 x 512 MiB)")
    parser.add_argument("--single-size", type=parse_size, default=None,
                        help="single-process model (default 1GiB)")
    parser.add_argument("--world", type=int, default=2, help="ranks of the distributed part")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    parser.add_argument("--s3-rounds", type=int, default=None,
                        help="how many of the rounds (the first ones) include S3 (default 3)")
    parser.add_argument("--storages", default="local,s3",
                        help="distributed part: comma list of local,s3 (single is local only)")
    parser.add_argument("--parts", default="distributed,single",
                        help="comma list of distributed,single")
    parser.add_argument("--quick", action="store_true",
                        help="a check: 64 MiB models, 2 rounds, 1 with S3 (under a minute)")
    parser.add_argument("--dir", type=Path,
                        help="where local checkpoints go (default: bench/out/torch-data-<stamp>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile zarrckpt's operations on rank 0 and in the single "
                        "process (pstats next to the worker logs; slows them down)")
    parser.add_argument("--commit", default=None,
                        help="label of the zarrckpt tree (e.g. the commit a git archive came "
                        "from), recorded in the output when the tree is not a git checkout")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds one command may take on every rank")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = args.size or (64 * MiB if quick else 1 << 30)
    args.single_size = args.single_size or (64 * MiB if quick else 1 << 30)
    args.rounds = args.rounds or (2 if quick else 5)
    args.s3_rounds = min(args.s3_rounds if args.s3_rounds is not None else (1 if quick else 3),
                         args.rounds)
    args.storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not args.storages or any(s not in ("local", "s3") for s in args.storages):
        parser.error("--storages is a comma list of local,s3")
    if not args.parts or any(p not in ("distributed", "single") for p in args.parts):
        parser.error("--parts is a comma list of distributed,single")
    if args.rounds < 1 or args.world < 2:
        parser.error("--rounds must be at least 1 and --world at least 2")
    return args


# Recording -------------------------------------------------------------------


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One operation's per-process answers as one row."""
    row: dict[str, Any] = {
        "seconds": max(r["seconds"] for r in results),
        "own_seconds": [r["own_seconds"] for r in results],
        "peak_extra": max(r["peak_extra"] for r in results),
        "peak_extra_per_rank": [r["peak_extra"] for r in results],
        "model_bytes": max(r["model_bytes"] for r in results),
        "read_ratio": sum(r["rchar"] + r["http_body"] for r in results)
        / sum(r["model_bytes"] for r in results),
        "rss_anon": [r["rss_anon"] for r in results],
        "rss_file": [r["rss_file"] for r in results],
    }
    row["peak_extra_fraction"] = max(r["peak_extra"] / r["model_bytes"] for r in results)
    for key in ("save_seconds", "fsync_seconds", "io_nbytes", "files_written"):
        if key in results[0]:
            row[key] = max(r[key] for r in results) if key.endswith("seconds") else [
                r[key] for r in results]
    if "verified" in results[0]:
        row["verified"] = all(r["verified"] for r in results)
        row["same_data_ptr"] = all(r["same_data_ptr"] for r in results)
    return row


def describe(op: str, row: dict[str, Any]) -> str:
    text = (f"peak +{row['peak_extra'] / MiB:.0f} MiB "
            f"({100 * row['peak_extra_fraction']:.1f}% of the rank's model)")
    if "save_seconds" in row:
        text += f", torch.save {row['save_seconds']:.2f} s + fsync {row['fsync_seconds']:.2f} s"
    if op == "save" and "files" in row:
        text += f", {row['files']} files, {row['bytes'] / MiB:.0f} MiB"
    if op == "load":
        text += f", read/model {row['read_ratio']:.3f}"
        if row.get("resident_after_drop") is not None:
            text += f", {row['resident_after_drop'] / MiB:.1f} MiB cached after drop"
        text += ", verified" if row["verified"] else ", NOT VERIFIED"
        text += ", same data_ptr" if row["same_data_ptr"] else ", parameters moved"
    return text


def step(world: World, storage: Storage, part: str, op: str, lib: str, path: str,
         number: int, records: list[dict[str, Any]], where: str) -> dict[str, Any]:
    resident = storage.make_cold(path) if op == "load" else None
    results = world.run({"op": op, "lib": lib, "storage": storage.name, "path": path})
    row = summarize(results)
    row.update({"part": part, "storage": storage.name, "op": op, "lib": lib, "round": number,
                "resident_after_drop": resident})
    if op == "save":
        row["files"], row["bytes"] = storage.size(path)
    records.append(row)
    print(f"  round {number} {where:<17} {op:<4} {lib:<10} {row['seconds']:6.2f} s  "
          f"{describe(op, row)}", flush=True)
    return row


def run_round(number: int, worlds: dict[str, World], storages: dict[str, Storage],
              args: argparse.Namespace, records: list[dict[str, Any]]) -> None:
    flip = number % 2 == 0
    if "distributed" in worlds:
        for name in args.storages:
            if name == "s3" and number > args.s3_rounds:
                continue
            storage = storages[name]
            for lib in DIST_LIBS[::-1] if flip else DIST_LIBS:
                path = storage.path(f"r{number}-{lib}-w{args.world}")
                try:
                    for op in ("save", "load"):
                        step(worlds["distributed"], storage, "distributed", op, lib, path,
                             number, records, f"{args.world} ranks {name}")
                finally:
                    storage.remove(path)
    if "single" in worlds:
        storage = storages["local"]
        paths = {lib: storage.path(f"r{number}-single-{lib}") for lib in SINGLE_SAVES}
        try:
            for lib in SINGLE_SAVES[::-1] if flip else SINGLE_SAVES:
                step(worlds["single"], storage, "single", "save", lib, paths[lib], number,
                     records, "1 process local")
            shift = (number - 1) % len(SINGLE_LOADS)
            for lib in SINGLE_LOADS[shift:] + SINGLE_LOADS[:shift]:
                path = paths["zarrckpt" if lib == "zarrckpt" else "torch"]
                step(worlds["single"], storage, "single", "load", lib, path, number, records,
                     "1 process local")
        finally:
            for path in paths.values():
                storage.remove(path)


# Tables ----------------------------------------------------------------------


def rows_of(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return sorted((r for r in records if all(r[k] == v for k, v in match.items())),
                  key=lambda r: r["round"])


def ratios(ours: list[dict[str, Any]], peer: list[dict[str, Any]], key: str = "seconds",
           peer_key: str = "seconds") -> str:
    by_round = {r["round"]: r[peer_key] for r in peer}
    values = [r[key] / by_round[r["round"]] for r in ours if r["round"] in by_round]
    return spread(values)


def peak(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "-"
    mib = [r["peak_extra"] / MiB for r in rows]
    pct = [100 * r["peak_extra_fraction"] for r in rows]
    return f"{statistics.median(mib):.0f} ({min(mib):.0f}-{max(mib):.0f}), " \
           f"{statistics.median(pct):.1f}%"


def tables(records: list[dict[str, Any]], args: argparse.Namespace) -> str:
    parts = []
    dist_rows = []
    for name in args.storages:
        for op in ("save", "load"):
            zc = rows_of(records, part="distributed", storage=name, op=op, lib="zarrckpt")
            dcp = rows_of(records, part="distributed", storage=name, op=op, lib="dcp")
            if not zc or not dcp:
                continue
            dist_rows.append([
                name, op if op == "save" else "load (cold)" if name == "local" else "load",
                str(len(zc)), spread([r["seconds"] for r in zc]),
                spread([r["seconds"] for r in dcp]), ratios(zc, dcp), peak(zc), peak(dcp),
            ])
    if dist_rows:
        parts.append(f"Distributed, {args.world} ranks x {args.size / args.world / MiB:.0f} MiB "
                     "FSDP2 (no optimizer state)\n\n" + _report.markdown(
                         ["storage", "operation", "rounds", "zarrckpt s", "DCP s",
                          "zarrckpt / DCP", "zarrckpt peak extra MiB, % of rank's model",
                          "DCP peak extra MiB, %"], dist_rows))
    single_rows = []
    zc_save = rows_of(records, part="single", op="save", lib="zarrckpt")
    torch_save = rows_of(records, part="single", op="save", lib="torch")
    if zc_save and torch_save:
        single_rows.append(["save", "zarrckpt write (fsync)",
                            spread([r["seconds"] for r in zc_save]), "1.00", peak(zc_save)])
        single_rows.append(["save", "torch.save + fsync",
                            spread([r["seconds"] for r in torch_save]),
                            ratios(zc_save, torch_save), peak(torch_save)])
        single_rows.append(["save", "torch.save, no fsync",
                            spread([r["save_seconds"] for r in torch_save]),
                            ratios(zc_save, torch_save, peer_key="save_seconds"), "-"])
    zc_load = rows_of(records, part="single", op="load", lib="zarrckpt")
    for lib, label in (("zarrckpt", "zarrckpt read"),
                       ("torch", "torch.load + load_state_dict"),
                       ("torch-mmap", "torch.load(mmap=True) + load_state_dict")):
        rows = rows_of(records, part="single", op="load", lib=lib)
        if rows and zc_load:
            single_rows.append(["load (cold)", label, spread([r["seconds"] for r in rows]),
                                "1.00" if lib == "zarrckpt" else ratios(zc_load, rows), peak(rows)])
    if single_rows:
        parts.append(f"Single process, {args.single_size / MiB:.0f} MiB module\n\n"
                     + _report.markdown(["operation", "method", "s", "zarrckpt / method",
                                         "peak extra MiB, % of model"], single_rows))
    return "\n\n".join(parts)


# Main ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = (args.dir or OUT / f"torch-data-{stamp}").resolve()
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    import zarrckpt

    library = Path(zarrckpt.__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(library), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    info: dict[str, Any] = {
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _report.machine(root),
        "versions": _report.versions(),
        "zarrckpt": {"path": str(library), "commit": commit or args.commit or "not a git tree"},
    }
    m = info["machine"]
    print(f"command:  {info['command']}\ndate:     {info['date']}\n"
          f"machine:  {m['nproc']} CPUs ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB RAM, "
          f"Linux {m['kernel']}, Python {m['python']}\n"
          f"data dir: {root} ({m['data_dir_free_bytes'] / 2**30:.0f} GiB free)\n"
          "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n"
          f"zarrckpt: {library} ({info['zarrckpt']['commit']})", flush=True)

    moto = None
    s3_options = None
    logs = Path(tempfile.mkdtemp(prefix="zarrckpt-torch-logs-"))
    worlds: dict[str, World] = {}
    records: list[dict[str, Any]] = []
    storages_used = set(args.storages) if "distributed" in args.parts else set()
    if "single" in args.parts:
        storages_used.add("local")
    try:
        if "s3" in storages_used:
            from s3 import _start_moto

            moto, endpoint = _start_moto()
            s3_options = {"key": "bench", "secret": "bench", "endpoint_url": endpoint}
            print(f"moto:     {endpoint}", flush=True)
        storages = {s: Storage(s, root, s3_options) for s in storages_used}
        if "s3" in storages:
            storages["s3"].fs.mkdir("bench")
        started = time.perf_counter()
        plan = []
        if "distributed" in args.parts:
            plan.append(("distributed", args.world, args.size))
        if "single" in args.parts:
            plan.append(("single", 1, args.single_size))
        for part, size, nbytes in plan:
            per_process = ""
            job = {"bytes": nbytes, "warmup_bytes": WARMUP_BYTES, "seed": args.seed,
                   "s3": s3_options if part == "distributed" else None,
                   "timeout": args.timeout, "profile": args.profile, "profile_dir": str(logs)}
            job_file = logs / f"job-{part}.json"
            job_file.write_text(json.dumps(job))
            worlds[part] = World(size, job_file, logs, args.timeout)
            warm = worlds[part].run({
                "op": "warmup", "local": str(root / "warmup"),
                "s3": "s3://bench/warmup" if part == "distributed" and s3_options else None,
            })
            info[part] = {"processes": size, "model_bytes": warm[0]["global_bytes"],
                          "per_process_bytes": [w["model_bytes"] for w in warm],
                          "parameters": warm[0]["parameters"]}
            per_process = ", ".join(f"{w['model_bytes'] / MiB:.1f}" for w in warm)
            print(f"{part}: {size} process(es), model {warm[0]['global_bytes'] / MiB:.1f} MiB in "
                  f"{warm[0]['parameters']} parameters "
                  f"({per_process} MiB per process), "
                  f"built in {max(w['build_seconds'] for w in warm):.1f} s, warmed up in "
                  f"{max(w['seconds'] for w in warm):.1f} s, "
                  f"RSS {max(w['rss'] for w in warm) / MiB:.0f} MiB "
                  f"({time.perf_counter() - started:.0f} s since start)", flush=True)
        for number in range(1, args.rounds + 1):
            run_round(number, worlds, storages, args, records)
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
    text = tables(records, args)
    print("\nmedian (min-max) over rounds; ratios: median (min-max) of the per-round ratios; "
          "peak extra: VmHWM over the operation minus VmRSS before (largest rank), and that "
          "over the process's model bytes\n")
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"torch-adapter-{stamp}.json"
    out.write_text(json.dumps({**info, "args": {k: str(v) for k, v in vars(args).items()},
                               "records": records}, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
