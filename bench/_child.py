"""One benchmark phase of one method, in a fresh process.

Usage: ``python bench/_child.py JOB.json RESULT.json``. The job names the phase
(``save``, ``restore`` or ``partial``), the method, the directory and the model;
the result is JSON with the timings, RSS and checks, or ``error`` / ``skipped``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _fs
from _methods import Method, MethodUnavailable, Rows, create
from _model import ArraySpec, digest, generate, resolve_dtype

Job = dict[str, Any]
Result = dict[str, Any]


class VerificationError(Exception):
    """Restored bytes differ from the deterministic model."""


def ru_maxrss() -> int:
    """getrusage's peak RSS in bytes (KiB on Linux); kept for reference only.

    Linux carries the parent's high-water RSS across fork + exec into the
    child's ru_maxrss, so it can never read lower than the harness's own peak.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_rss() -> int:
    """Peak RSS of this process's own memory so far (VmHWM), in bytes.

    Equal to ru_maxrss whenever this process's peak exceeds the parent's, which
    is the case for every phase that holds the model; unlike ru_maxrss it is
    also right for small values (the imports baseline).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return ru_maxrss()


def _specs(job: Job) -> list[ArraySpec]:
    return [ArraySpec.from_json(s) for s in job["specs"]]


def save_phase(method: Method, job: Job) -> Result:
    path = Path(job["path"])
    base = max_rss()
    items = {s.name: method.wrap(generate(s, job["seed"])) for s in _specs(job)}
    state = method.assemble(items)
    _fs.remove_tree(path)
    path.mkdir(parents=True)
    start = time.perf_counter()
    method.save(state, path)
    _fs.fsync_tree(path)
    seconds = time.perf_counter() - start
    peak, ru_peak = max_rss(), ru_maxrss()
    files = _fs.files_under(path)
    return {"seconds": seconds, "peak_rss": peak, "ru_maxrss": ru_peak, "base_rss": base,
            "files": len(files),
            "bytes_on_disk": sum(f.stat().st_size for f in files)}


def _check(got: dict[str, str], expected: dict[str, str]) -> None:
    bad = [name for name, want in expected.items() if got.get(name) != want]
    if bad:
        examples = ", ".join(f"{n}: got {got.get(n)} want {expected[n]}" for n in bad[:3])
        raise VerificationError(f"{len(bad)} of {len(expected)} arrays differ ({examples})")


def restore_phase(method: Method, job: Job) -> Result:
    path, specs = Path(job["path"]), _specs(job)
    base = max_rss()
    live = method.allocate(specs)
    _fs.drop_cache_tree(path)
    resident = _fs.resident_bytes(path)
    start = time.perf_counter()
    state = method.restore(path, specs, live)
    seconds = time.perf_counter() - start
    peak, ru_peak = max_rss(), ru_maxrss()
    _check({s.name: digest(method.array(state, s.name)) for s in specs}, job["expected"])
    return {"seconds": seconds, "peak_rss": peak, "ru_maxrss": ru_peak, "base_rss": base,
            "resident_after_drop": resident, "verified": True}


def _timed_part(method: Method, path: Path, part: dict[str, Any]) -> Result:
    spec = ArraySpec.from_json(part["spec"])
    rows: Rows = (part["rows"][0], part["rows"][1]) if part["rows"] is not None else None
    where = method.locate(path, spec)
    _fs.drop_cache_tree(path)
    start = time.perf_counter()
    array = method.read_part(where, spec, rows)
    seconds = time.perf_counter() - start
    _check({spec.name: digest(array)}, {spec.name: part["expected"]})
    return {"name": spec.name, "rows": part["rows"], "bytes": array.nbytes, "seconds": seconds,
            "files": method.files_touched(where, spec, rows)}


def partial_phase(method: Method, job: Job) -> Result:
    if not method.partial:
        raise MethodUnavailable(f"{method.name} has no partial-read benchmark")
    path = Path(job["path"])
    return {label: _timed_part(method, path, part) for label, part in job["parts"].items()}


PHASES: dict[str, Callable[[Method, Job], Result]] = {
    "save": save_phase, "restore": restore_phase, "partial": partial_phase,
}


def run(job: Job) -> Result:
    method = create(job["method"])
    try:
        resolve_dtype(job["dtype"])  # the program knows its dtypes: imports ml_dtypes for bf16
        method.setup()
        return PHASES[job["phase"]](method, job)
    except MethodUnavailable as exc:
        return {"skipped": str(exc)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    Path(argv[2]).write_text(json.dumps(run(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
