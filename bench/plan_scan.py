"""What the unsaved-value scan adds to planning a save (issue 10).

Every save looks at every object of the graph once for values it leaves out
(numpy arrays in plain attributes, ...). This times ``build_save_plan`` with
the scan and with it replaced by a no-op, interleaved round by round, on
graphs of growing size (objects x variables per object), and prints medians
with min-max and the ratio. No I/O: planning is pure Python.

    python bench/plan_scan.py --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np

import zarrckpt as zc
from zarrckpt import _graph

SIZES = [(16, 10), (200, 10), (2000, 10)]  # (objects, variables each)


def model(objects: int, per_object: int) -> zc.Checkpoint:
    """A root holding ``objects`` layers, each with variables, config and a plain array."""
    layers = []
    for _ in range(objects):
        layer = zc.AutoTrackable()
        for j in range(per_object):
            setattr(layer, f"w{j}", zc.Variable(np.zeros(4, np.float32)))
        layer.name = "dense"  # configuration a scan must look at and pass over
        layer.units = 4
        layer.activation = None
        layers.append(layer)
    root = zc.AutoTrackable()
    root.layers = layers
    return zc.Checkpoint(model=root)


def timed(ckpt: zc.Checkpoint, scan: bool) -> float:
    original = _graph._warn_unsaved
    if not scan:
        _graph._warn_unsaved = lambda view: None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            _graph.build_save_plan(ckpt)
            return time.perf_counter() - start
    finally:
        _graph._warn_unsaved = original  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"{'graph':>24}  {'plan without scan, ms':>24}  {'plan with scan, ms':>22}  ratio")
    for objects, per_object in SIZES:
        ckpt = model(objects, per_object)
        timed(ckpt, True)  # warm up
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for scan in (False, True):
                times[scan].append(timed(ckpt, scan))

        def shown(values: list[float]) -> str:
            ms = [v * 1000 for v in values]
            return f"{statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})"

        ratio = statistics.median(times[True]) / statistics.median(times[False])
        label = f"{objects} objects x {per_object} vars"
        print(f"{label:>24}  {shown(times[False]):>24}  {shown(times[True]):>22}  {ratio:.3f}")


if __name__ == "__main__":
    main()
