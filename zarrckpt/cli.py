"""The ``zarrckpt`` command line (also ``python -m zarrckpt``).

So far: ``demo``. Inspection commands (``ls``, ``show``, ``verify``, ...) build
on the same public functions.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import zarrckpt as zc
from zarrckpt.errors import ZarrckptError

__all__ = ["main"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456; plain numbers are bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB or 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class _Block(zc.AutoTrackable):
    def __init__(self, width: int, rng: np.random.Generator) -> None:
        self.attention = zc.Variable(rng.standard_normal((width, 3 * width), np.float32))
        self.mlp = [
            zc.Variable(rng.standard_normal((width, 4 * width), np.float32)),
            zc.Variable(rng.standard_normal((4 * width, width), np.float32)),
        ]
        self.norm = zc.Variable(np.ones(width, np.float32))


class _DemoModel(zc.AutoTrackable):
    """A transformer-shaped stack of float32 variables of about ``size`` bytes."""

    def __init__(self, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        layers = 4
        width = max(8, int((size / 4 / (layers * 11 + 8)) ** 0.5))
        self.embedding = zc.Variable(rng.standard_normal((8 * width, width), np.float32))
        self.blocks = [_Block(width, rng) for _ in range(layers)]


class _SGD(zc.Optimizer):
    def step(self, variables: list[zc.Variable], rng: np.random.Generator) -> None:
        for var in variables:
            momentum = self.add_slot(var, "momentum")
            momentum.assign(0.9 * momentum.numpy() + rng.standard_normal(var.shape, np.float32))
            var.assign(var.numpy() - 1e-3 * momentum.numpy())


def _variables(model: _DemoModel) -> list[zc.Variable]:
    return [o for o in zc.list_objects(model) if isinstance(o, zc.Variable)]


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / (1 << 20) / max(seconds, 1e-9):,.0f} MiB/s"


def demo(size: int, directory: Path) -> int:
    """Build a model, save two training steps, restore them, and print what happened."""
    print(f"zarrckpt {zc.__version__} demo: model of {size / (1 << 20):,.0f} MiB in {directory}")
    rng = np.random.default_rng(0)
    model, optimizer = _DemoModel(size, seed=0), _SGD()
    ckpt = zc.Checkpoint(model=model, optimizer=optimizer)
    nbytes = sum(v.nbytes for v in _variables(model))
    paths = []
    for step in (1, 2):
        optimizer.step(_variables(model), rng)
        start = time.perf_counter()
        paths.append(ckpt.save(directory / "ckpt"))
        elapsed = time.perf_counter() - start
        print(f"  step {step}: saved {paths[-1]} ({_rate(2 * nbytes, elapsed)}, fsync'ed)")

    fresh, fresh_optimizer = _DemoModel(size, seed=1), _SGD()
    start = time.perf_counter()
    status = zc.Checkpoint(model=fresh, optimizer=fresh_optimizer).restore(paths[-1])
    elapsed = time.perf_counter() - start
    same = all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(_variables(model), _variables(fresh), strict=True)
    )
    print(
        f"  restored {paths[-1]} into a new model ({_rate(nbytes, elapsed)}): "
        f"{'bit-exact' if same else 'DIFFERENT'}"
    )
    fresh_optimizer.step(_variables(fresh), np.random.default_rng(5))
    status.assert_consumed()
    print(
        "  optimizer slots created after the restore got their saved values "
        "(deferred restoration); assert_consumed() passed"
    )

    embedding = zc.Variable(np.zeros_like(model.embedding.numpy()))
    partial = zc.AutoTrackable()
    partial.embedding = embedding
    zc.Checkpoint(model=partial).restore(paths[-1]).expect_partial().assert_nontrivial_match()
    ok = np.array_equal(embedding.numpy(), model.embedding.numpy())
    verdict = "bit-exact" if ok else "DIFFERENT"
    print(f"  restored only model.embedding into a partial model: {verdict}")
    print(f"  plain zarr can read it: zarr.open_group({paths[-1]!r})")
    return 0 if same and ok else 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zarrckpt", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="save and restore a demo model")
    demo_parser.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("64MiB"),
        help="model size, e.g. 64MiB, 1GiB (default 64MiB)",
    )
    demo_parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the checkpoints (default: a new temporary one)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zarrckpt`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            if args.dir is not None:
                return demo(args.size, args.dir)
            with tempfile.TemporaryDirectory(prefix="zarrckpt-demo-") as tmp:
                return demo(args.size, Path(tmp))
    except ZarrckptError as exc:
        print(f"zarrckpt: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
