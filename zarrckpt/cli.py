"""The ``zarrckpt`` command line (also ``python -m zarrckpt``).

Exit codes: 0 success; 1 ``diff`` found differences; 2 bad usage; 3 no
checkpoint at the path, or not committed; 4 the checkpoint is corrupt
(``verify`` failed, a chunk is missing or damaged); 5 any other error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import zarrckpt as zc
from zarrckpt._commit import open_committed
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.directory import format_time
from zarrckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    ZarrckptError,
)
from zarrckpt.record import printable

__all__ = ["main"]

_ARRAY_FILE = re.compile(r"(?P<key>.+)/(?:zarr\.json|c(?:/\d+)*)")
EXIT_DIFFERENT, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_ERROR = 1, 2, 3, 4, 5
MiB = 1 << 20
_UNITS = {
    "": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1 << 10, "m": MiB, "mib": MiB, "mb": MiB,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1 << 30,
}  # fmt: skip


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456; plain numbers are bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB or 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:,.1f} MiB"


class Progress:
    """A progress bar on stderr for long work (only drawn when stderr is a terminal)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._drawn = 0.0

    def __call__(self, amount: int) -> None:
        with self._lock:
            self.done += amount
            now = time.perf_counter()
            if self.enabled and (now - self._drawn > 0.1 or self.done >= self.total):
                self._drawn = now
                filled = int(30 * min(self.done / self.total, 1.0))
                rate = self.done / MiB / max(now - self.start, 1e-9)
                self.stream.write(
                    f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                    f"{_mib(self.done)} / {_mib(self.total)} {rate:,.0f} MiB/s"
                )
                self.stream.flush()

    def close(self) -> None:
        """End the bar's line; later calls draw nothing."""
        if self.enabled:
            self.stream.write("\n")
            self.enabled = False


# Commands ---------------------------------------------------------------------


def _require_directory(directory: str, storage_options: dict[str, Any] | None) -> None:
    fs, root = resolve_path(directory, storage_options)
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        what = "is not a directory" if fs.exists(root) else "does not exist"
        raise CheckpointNotFoundError(f"{directory} {what}")


def cmd_ls(args: argparse.Namespace) -> int:
    _require_directory(args.directory, args.storage_options)
    infos = zc.list_checkpoints(args.directory, args.storage_options)
    if not infos:
        print(f"no checkpoints in {args.directory}")
        return 0
    print(f"{'number':>8}  {'created':19}  {'size':>12}  state          path")
    for info in infos:
        number = "-" if info.number is None else str(info.number)
        when = format_time(info.created)
        print(f"{number:>8}  {when}  {_mib(info.nbytes):>12}  {info.state:13}  {info.path}")
    for info in infos:
        if info.damage:
            print(f"damaged: {info.path}: {printable(info.damage)}", file=sys.stderr)
    return 0


def _codecs(layout: Any) -> str:
    names = ["bytes"]
    if layout.compression is not None:
        names.append(type(layout.compression).__name__.lower())
    return "+".join([*names, "crc32c"])


def cmd_show(args: argparse.Namespace) -> int:
    checkpoint = open_committed(args.checkpoint, args.storage_options)
    manifest = checkpoint.manifest
    when = format_time(manifest.created)
    print(f"checkpoint: {checkpoint.url}")
    print(f"zarr group: {checkpoint.storage.url}   (zarr.open_group(...) reads it)")
    print(f"committed:  {when}, {len(manifest.files)} files, {_mib(manifest.nbytes)}")
    if args.tree:
        print(checkpoint.graph)
        return 0
    rows = []
    for _, attribute in sorted(checkpoint.graph.attributes(), key=lambda item: item[1].key):
        layout = checkpoint.layout(attribute)
        rows.append(
            (
                attribute.key,
                str(list(attribute.shape)),
                attribute.dtype,
                _mib(attribute.nbytes),
                str(list(layout.chunk_shape)),
                _codecs(layout),
            )
        )
    header = ("key", "shape", "dtype", "size", "chunks", "codecs")
    limit = getattr(args, "limit", None)
    shown = rows if limit is None else rows[:limit]
    widths = [max(len(r[i]) for r in [header, *shown]) for i in range(len(header))]
    for row in [header, *shown]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    if len(shown) < len(rows):
        print(f"... and {len(rows) - len(shown)} more")
    return 0


def cmd_dot(args: argparse.Namespace) -> int:
    text = zc.dot_graph_from_checkpoint(args.checkpoint, args.storage_options)
    if args.png is None:
        sys.stdout.write(text)
        return 0
    dot = shutil.which("dot")
    if dot is None:
        print("zarrckpt: error: --png needs Graphviz's 'dot' program on PATH", file=sys.stderr)
        return EXIT_ERROR
    subprocess.run([dot, "-Tpng", "-o", str(args.png)], input=text.encode(), check=True)
    print(f"wrote {args.png}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    checkpoint = open_committed(args.checkpoint, args.storage_options)
    progress = Progress("verifying", checkpoint.manifest.nbytes)
    try:
        report = zc.verify(args.checkpoint, args.storage_options, progress=progress)
    finally:
        progress.close()
    print(report)
    return 0


def _fingerprints(checkpoint: Any) -> dict[str, tuple[tuple[str, int, int], ...]]:
    """Per key, the (file, size, CRC32C) of its files: equal fingerprints, equal bytes."""
    prefix = f"{checkpoint.manifest.attempt}/" if checkpoint.manifest.attempt else ""
    by_key: dict[str, list[tuple[str, int, int]]] = {}
    keys = {a.key for _, a in checkpoint.graph.attributes()}
    for entry in checkpoint.manifest.files:
        relative = entry.key[len(prefix) :]
        # <key>/zarr.json or a chunk <key>/c[/i/j...]; a key's own components may be "c".
        match = _ARRAY_FILE.fullmatch(relative)
        if match is not None and match["key"] in keys:
            by_key.setdefault(match["key"], []).append((relative, entry.size, entry.crc32c))
    return {key: tuple(sorted(files)) for key, files in by_key.items()}


def value_difference(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> str:
    """How two arrays of one shape differ: the max abs difference, and NaNs in one only."""
    wide = np.complex128 if "c" in (x.dtype.kind, y.dtype.kind) else np.float64
    a, b = x.astype(wide), y.astype(wide)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    both = ~(nan_a | nan_b)
    a, b = a[both], b[both]
    with np.errstate(invalid="ignore"):  # inf - inf; np.where keeps 0 for those
        delta = np.where(a == b, 0.0, np.abs(a - b))  # equal infinities differ by 0
    text = f"max abs difference {delta.max() if delta.size else 0.0:.6g}"
    nan_changed = int(np.count_nonzero(nan_a != nan_b))
    if nan_changed:
        text += f", {nan_changed} values NaN in one only"
    return text


def cmd_diff(args: argparse.Namespace) -> int:
    a = open_committed(args.a, args.storage_options)
    b = open_committed(args.b, args.storage_options)
    attributes_a = {x.key: x for _, x in a.graph.attributes()}
    attributes_b = {x.key: x for _, x in b.graph.attributes()}
    prints_a, prints_b = _fingerprints(a), _fingerprints(b)
    differences = 0
    for key in sorted(attributes_a.keys() | attributes_b.keys()):
        left, right = attributes_a.get(key), attributes_b.get(key)
        if right is None:
            print(f"- {key}")
        elif left is None:
            print(f"+ {key}")
        elif (left.shape, left.dtype) != (right.shape, right.dtype):
            print(f"~ {key}: {left.dtype}{list(left.shape)} -> {right.dtype}{list(right.shape)}")
        elif prints_a.get(key) != prints_b.get(key):
            detail = ""
            if args.values:
                x = zc.load_variable(args.a, key, storage_options=args.storage_options)
                y = zc.load_variable(args.b, key, storage_options=args.storage_options)
                if np.array_equal(x, y, equal_nan=x.dtype.kind in "fc"):
                    continue  # same values, other bytes (say, other chunks or codecs)
                detail = f": {value_difference(x, y)}"
            print(f"~ {key}{detail}")
        else:
            continue
        differences += 1
    if differences == 0:
        print("no differences")
        return 0
    return EXIT_DIFFERENT


def cmd_cp(args: argparse.Namespace) -> int:
    source = open_committed(args.source, args.storage_options)
    progress = Progress("copying", source.manifest.nbytes)
    try:
        zc.copy_checkpoint(
            args.source,
            args.destination,
            source_storage_options=args.storage_options,
            destination_storage_options=args.destination_storage_options or args.storage_options,
            progress=progress,
        )
    finally:
        progress.close()
    print(f"copied {source.url} -> {args.destination} ({_mib(source.manifest.nbytes)}, verified)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    _require_directory(args.directory, args.storage_options)
    removed = zc.gc(args.directory, args.older_than, args.storage_options)
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} leftovers removed")
    return 0


# Demo -------------------------------------------------------------------------


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
    return f"{nbytes / MiB / max(seconds, 1e-9):,.0f} MiB/s"


def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def _drop_page_cache(directory: Path) -> bool:
    """Ask the kernel to forget the cached pages of every file under ``directory``.

    So that the restore that follows reads from the disk, as after a restart.
    Returns False where the platform has no ``posix_fadvise``.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[zc.CheckpointOptions]:
    """Options whose ``progress`` draws a bar of ``total`` bytes while the block runs."""
    bar = Progress(label, total)
    try:
        yield zc.CheckpointOptions(progress=bar)
    finally:
        bar.close()


def demo(size: int, directory: Path, steps: int = 3) -> int:
    """Train a model for a few steps with a CheckpointManager, restore, inspect."""
    print(f"zarrckpt {zc.__version__} demo: model of {_mib(size)} in {directory}")
    rng = np.random.default_rng(0)
    model, optimizer = _DemoModel(size, seed=0), _SGD()
    ckpt = zc.Checkpoint(model=model, optimizer=optimizer)
    manager = zc.CheckpointManager(ckpt, directory, max_to_keep=2)
    nbytes = sum(v.nbytes for v in _variables(model))
    for step in range(1, steps + 1):
        optimizer.step(_variables(model), rng)
        with _progress(f"  saving step {step}", 2 * nbytes) as options:
            path, seconds = _timed(lambda: manager.save(options=options))
        print(
            f"  step {step}: saved {path} (model + slots, {_rate(2 * nbytes, seconds)}, fsync'ed)"
        )
    manager.wait()

    fresh, fresh_optimizer = _DemoModel(size, seed=1), _SGD()
    cold = _drop_page_cache(directory)
    # The model's values now; the optimizer's slots when the first step creates them.
    with _progress("  restoring", 2 * nbytes) as options:
        fresh_manager = zc.CheckpointManager(
            zc.Checkpoint(model=fresh, optimizer=fresh_optimizer),
            directory,
            max_to_keep=2,
            options=options,
        )
        restored, seconds = _timed(fresh_manager.restore_or_initialize)
        same = all(
            np.array_equal(a.numpy(), b.numpy())
            for a, b in zip(_variables(model), _variables(fresh), strict=True)
        )
        slots_same = all(
            np.array_equal(
                optimizer.get_slot(a, "momentum").numpy(),
                fresh_optimizer.add_slot(b, "momentum").numpy(),
            )
            for a, b in zip(_variables(model), _variables(fresh), strict=True)
        )
    print(f"  restored {restored} into a new model ({_rate(nbytes, seconds)}"
          f"{', cold' if cold else ''}): "
          f"{'bit-exact' if same else 'DIFFERENT'}")  # fmt: skip
    print("  optimizer slots created after the restore got their saved values (deferred): "
          f"{'bit-exact' if slots_same else 'DIFFERENT'}")  # fmt: skip

    key = "model/embedding"
    embedding, seconds = _timed(lambda: zc.load_variable(restored, key))
    ok = np.array_equal(embedding, model.embedding.numpy())
    print(f"  load_variable({key!r}) alone: {_mib(embedding.nbytes)} in {seconds * 1e3:.0f} ms, "
          f"{'bit-exact' if ok else 'DIFFERENT'}")  # fmt: skip
    print(f"\n$ zarrckpt ls {directory}")
    cmd_ls(argparse.Namespace(directory=str(directory), storage_options=None))
    print(f"\n$ zarrckpt show {restored}")
    cmd_show(argparse.Namespace(checkpoint=restored, storage_options=None, tree=False, limit=6))
    return 0 if same and slots_same and ok else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    if args.dir is not None:
        return demo(args.size, args.dir, args.steps)
    with tempfile.TemporaryDirectory(prefix="zarrckpt-demo-") as tmp:
        return demo(args.size, Path(tmp), args.steps)


# Parsing ----------------------------------------------------------------------


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zarrckpt",
        description="Inspect, verify, copy and clean zarrckpt checkpoints (local paths or "
        "fsspec URLs such as s3://bucket/run/ckpt-10).",
        epilog="exit codes: 0 ok, 1 differences (diff), 2 usage, 3 not found or not "
        "committed, 4 corrupt, 5 other errors",
    )
    parser.add_argument(
        "--storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="fsspec storage options as a JSON object (e.g. S3 endpoint and credentials)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    ls = commands.add_parser("ls", help="list the checkpoints in a directory")
    ls.add_argument("directory")
    ls.set_defaults(run=cmd_ls)

    show = commands.add_parser("show", help="variables of a checkpoint (or --tree: its graph)")
    show.add_argument("checkpoint")
    show.add_argument("--tree", action="store_true", help="print the object graph instead")
    show.set_defaults(run=cmd_show)

    dot = commands.add_parser("dot", help="Graphviz DOT text of the object graph")
    dot.add_argument("checkpoint")
    dot.add_argument("--png", type=Path, default=None, help="render to this PNG with 'dot'")
    dot.set_defaults(run=cmd_dot)

    verify = commands.add_parser("verify", help="read every byte and check every CRC")
    verify.add_argument("checkpoint")
    verify.set_defaults(run=cmd_verify)

    diff = commands.add_parser("diff", help="keys added, removed and changed from A to B")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--values", action="store_true", help="compare numbers: max abs difference")
    diff.set_defaults(run=cmd_diff)

    cp = commands.add_parser("cp", help="copy a checkpoint (local <-> S3), verified, atomically")
    cp.add_argument("source")
    cp.add_argument("destination")
    cp.add_argument(
        "--destination-storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="storage options for the destination (default: --storage-options)",
    )
    cp.set_defaults(run=cmd_cp)

    gc = commands.add_parser("gc", help="remove leftovers of interrupted saves and deletes")
    gc.add_argument("directory")
    gc.add_argument(
        "--older-than",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="only leftovers older than this (default 3600: a live writer is never touched)",
    )
    gc.set_defaults(run=cmd_gc)

    demo_parser = commands.add_parser("demo", help="train, save, restore and inspect a demo model")
    demo_parser.add_argument(
        "--size", type=parse_size, default=parse_size("1GiB"), help="model size (default 1GiB)"
    )
    demo_parser.add_argument("--steps", type=int, default=3, help="steps to save (default 3)")
    demo_parser.add_argument(
        "--dir", type=Path, default=None, help="where to save (default: a temporary directory)"
    )
    demo_parser.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zarrckpt`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except CheckpointNotFoundError as exc:
        print(f"zarrckpt: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except (CorruptCheckpointError, FormatVersionError) as exc:
        print(f"zarrckpt: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_CORRUPT
    except (ZarrckptError, OSError) as exc:
        print(f"zarrckpt: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
