"""Checkpoint save/restore benchmark: zarrckpt against its peers. See bench/README.md."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import _fs
import _report
from _methods import REGISTRY
from _model import ArraySpec, MiB, digest, generate, parse_size, row_slice, transformer_specs

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
CHILD = BENCH / "_child.py"
DEFAULT_METHODS = ["raw1", "raw8", "npy", "safetensors", "torch", "tensorstore", "zarr-default",
                   "zarrckpt"]
DEFAULT_SIZES = "2GiB"
VARIABLE_TARGET = 64 * MiB
TRACEBACK_LINES = 6  # printed per failure; the JSON keeps the whole traceback


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", help="comma list of model sizes, e.g. 0.5GiB,1GiB,2GiB,4GiB "
                        f"(default {DEFAULT_SIZES})")
    parser.add_argument("--size", help="one model size; the same as --sizes SIZE")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of {', '.join(REGISTRY)}")
    parser.add_argument("--dir", type=Path, help="where checkpoint files go "
                        "(default: a new bench/out/data-<timestamp>)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved rounds over all methods, per size")
    parser.add_argument("--seed", type=int, default=0, help="model generator seed")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child phase")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    args = parser.parse_args(argv)
    args.methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in args.methods if m not in REGISTRY]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(REGISTRY)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.size is not None and (args.sizes is not None or "," in args.size):
        parser.error("--size takes one size and cannot be combined with --sizes")
    text = args.size or args.sizes or DEFAULT_SIZES
    labels = dict.fromkeys("".join(t.split()) for t in text.split(",") if t.strip())
    args.sizes = []  # (label, bytes), in the order given
    for label in labels:
        try:
            args.sizes.append((label, parse_size(label)))
        except ValueError as exc:
            parser.error(str(exc))
    if not args.sizes or any(nbytes <= 0 for _, nbytes in args.sizes):
        parser.error("--sizes needs at least one size, each above 0 bytes")
    return args


def partial_targets(specs: list[ArraySpec]) -> dict[str, ArraySpec]:
    """The variable nearest 64 MiB (read alone) and the largest one (row slice)."""
    return {"variable": min(specs, key=lambda s: abs(s.nbytes - VARIABLE_TARGET)),
            "slice": max(specs, key=lambda s: s.nbytes)}


def expectations(specs: list[ArraySpec], seed: int) -> tuple[dict[str, str], dict[str, Any]]:
    """Expected digests of every array and of the partial reads, one array in memory at a time."""
    targets = partial_targets(specs)
    expected: dict[str, str] = {}
    parts: dict[str, Any] = {}
    for spec in specs:
        array = generate(spec, seed)
        expected[spec.name] = digest(array)
        for label, target in targets.items():
            if target.name == spec.name:
                rows = row_slice(spec) if label == "slice" else None
                part = array if rows is None else array[rows[0] : rows[1]]
                parts[label] = {"spec": spec.to_json(), "rows": rows, "expected": digest(part)}
    return expected, parts


def run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; always returns a result dict."""
    with tempfile.TemporaryDirectory(prefix="zarrckpt-bench-") as tmp:
        job_file, result_file = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_file.write_text(json.dumps(job))
        try:
            proc = subprocess.run([sys.executable, str(CHILD), str(job_file), str(result_file)],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if result_file.exists():
            return dict(json.loads(result_file.read_text()))
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        return {"error": f"child exited with {proc.returncode}: {tail}"}


def describe(phase: str, result: dict[str, Any], model_bytes: int) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"ERROR {result['error']}"
    if phase == "partial":
        return "; ".join(f"{label} {r['seconds']:.3f} s, {r['files']} file(s)"
                         for label, r in result.items())
    extra = (result["peak_rss"] - model_bytes) / MiB
    text = f"{result['seconds']:.2f} s, peak RSS {extra:+.0f} MiB over model"
    if phase == "restore":
        text += f", {result['resident_after_drop'] / MiB:.1f} MiB cached after drop, verified"
    return text


def run_method(name: str, common: dict[str, Any], timeout: float) -> dict[str, Any]:
    """save, restore and (where supported) partial reads of one method."""
    record: dict[str, Any] = {}
    phases = ["save", "restore"] + (["partial"] if REGISTRY[name].partial else [])
    for phase in phases:
        result = run_child({**common, "method": name, "phase": phase,
                            "path": str(Path(common["root"], name))}, timeout)
        record[phase] = result
        print(f"  {name:<13} {phase:<8} {describe(phase, result, common['model_bytes'])}",
              flush=True)
        if result.get("traceback"):
            tail = result["traceback"].strip().splitlines()[-TRACEBACK_LINES:]
            print("\n".join("    " + line for line in tail), flush=True)
        if phase == "save" and ("error" in result or "skipped" in result):
            break
    return record


def data_root(args: argparse.Namespace, stamp: str) -> tuple[Path, bool]:
    root = args.dir.resolve() if args.dir else OUT / f"data-{stamp}"
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    return root, created


def cleanup(root: Path, created: bool, labels: list[str], methods: list[str]) -> None:
    """Remove what this run wrote: each size's method directories, then the directories
    it created if they are empty."""
    for label in labels:
        for name in methods:
            _fs.remove_tree(root / label / name)
        if (root / label).is_dir() and not any((root / label).iterdir()):
            (root / label).rmdir()
    if created and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def model_info(specs: list[ArraySpec], dtype: str) -> dict[str, Any]:
    largest = max(specs, key=lambda s: s.nbytes)
    return {"arrays": len(specs), "bytes": sum(s.nbytes for s in specs), "dtype": dtype,
            "width": specs[-1].shape[0],
            "largest": f"{largest.name} {largest.shape} {_report.mib(largest.nbytes)} MiB"}


def print_tables(summaries: dict[str, dict[str, Any]], model_bytes: int) -> None:
    print()
    print(_report.markdown(_report.MAIN_HEADERS, _report.main_rows(summaries, model_bytes)))
    partial = _report.partial_rows(summaries)
    if partial:
        print("\nCold partial reads out of the full checkpoint:\n")
        print(_report.markdown(_report.PARTIAL_HEADERS, partial))
    problems = [(name, p) for name, s in summaries.items() for p in s["problems"]]
    if problems:
        print("\nNotes:")
        for name, problem in problems:
            print(f"  {name}: {problem}")


def print_sweep(data: dict[str, Any]) -> None:
    headers, rows = _report.sweep_table(data)
    print(f"\nSummary over sizes: median of the per-round ratios to {_report.REFERENCE}"
          + (", and median seconds at the largest size over the smallest" if data["growth"]
             else "") + ":\n")
    print(_report.markdown(headers, rows))
    if _report.REFERENCE not in data["methods"]:
        print(f"({_report.REFERENCE} did not run: no ratios)")
    line = _report.restore_rss_line(data)
    if line:
        print(f"\n{line}")


def run_size(args: argparse.Namespace, root: Path, label: str, nbytes: int) -> dict[str, Any]:
    """Every round of every method at one model size, in ``root / label``."""
    specs = transformer_specs(nbytes, args.dtype)
    model = model_info(specs, args.dtype)
    size: dict[str, Any] = {
        "label": label, "requested_bytes": nbytes, "model": model,
        "partial_targets": {name: {"name": s.name, "bytes": s.nbytes, "shape": s.shape,
                                   "rows": row_slice(s) if name == "slice" else None}
                            for name, s in partial_targets(specs).items()},
    }
    print(f"\n== size {label} ==")
    print("\n".join(_report.model_lines(size)), flush=True)
    started = time.perf_counter()
    expected, parts = expectations(specs, args.seed)
    print(f"expected digests computed in {time.perf_counter() - started:.1f} s", flush=True)
    common = {"root": str(root / label), "seed": args.seed, "dtype": args.dtype,
              "specs": [s.to_json() for s in specs], "expected": expected, "parts": parts,
              "model_bytes": model["bytes"]}
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for repeat in range(args.repeat):
        print(f"size {label}, round {repeat + 1}/{args.repeat}", flush=True)
        # Each round starts one method later: on this disk a save is faster or slower
        # depending on what the method before it left behind, so no method always
        # follows the same one.
        shift = repeat % len(args.methods)
        for name in args.methods[shift:] + args.methods[:shift]:
            records[name].append(run_method(name, common, args.timeout))
    reference = records.get(_report.REFERENCE)
    size["summary"] = {m: _report.summarize(recs, model["bytes"], reference)
                       for m, recs in records.items()}
    size["runs"] = records
    return size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root, created = data_root(args, stamp)
    labels = [label for label, _ in args.sizes]
    info: dict[str, Any] = {
        "command": shlex.join(["python3", *sys.argv]),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": _report.machine(root), "versions": _report.versions(),
        "size_labels": labels, "repeat": args.repeat, "methods": args.methods,
        "reference": _report.REFERENCE,
    }
    print("\n".join(_report.header_lines(info)), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"results-{stamp}.json"
    done: list[dict[str, Any]] = []
    try:
        for label, nbytes in args.sizes:
            size = run_size(args, root, label, nbytes)
            if not args.keep:
                cleanup(root, False, [label], args.methods)
            done.append(size)
            print_tables(size["summary"], size["model"]["bytes"])
            # written after every size, so a long sweep keeps what it finished
            out.write_text(json.dumps({**info, "sizes": done, "sweep": _report.sweep(done)},
                                      indent=1, default=str))
    finally:
        if not args.keep:
            cleanup(root, created, labels, args.methods)
    print_sweep(_report.sweep(done))
    print(f"\nresults: {out}" + (f"\nfiles kept in {root}" if args.keep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
