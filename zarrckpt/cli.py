"""The ``zarrckpt`` command line (also ``python -m zarrckpt``).

Exit codes: 0 success; 1 ``diff`` found differences; 2 bad usage; 3 no
checkpoint at the path, or not committed; 4 the checkpoint is corrupt
(``verify`` failed, a chunk is missing or damaged); 5 any other error; 130
interrupted (Ctrl-C); 141 standard output was closed early (``| head``).
Every error is one line on stderr, ``zarrckpt: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import posixpath
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

import zarrckpt as zc
from zarrckpt._commit import COMMIT_KEY, CommittedCheckpoint, open_committed
from zarrckpt._storage import missing_bucket, missing_bucket_message
from zarrckpt._storage import resolve as resolve_path
from zarrckpt.array_io import ArrayLayout, read_selection
from zarrckpt.directory import (
    CheckpointInfo,
    GcReport,
    format_duration,
    format_size,
    format_time,
    gc_report,
)
from zarrckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    ZarrckptError,
)
from zarrckpt.record import ObjectGraph, SavedAttribute, printable
from zarrckpt.verify import describe_unlisted

__all__ = ["Progress", "format_size", "main", "parse_size", "value_difference"]

_ARRAY_FILE = re.compile(r"(?P<key>.+)/(?:zarr\.json|c(?:(?:/\d+)+|(?:\.\d+)+)?)")
EXIT_DIFFERENT, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_ERROR = 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `cat big | head -1`
MiB = 1 << 20
_UNITS = {
    "": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1 << 10, "m": MiB, "mib": MiB, "mb": MiB,
    "g": 1 << 30, "gib": 1 << 30, "gb": 1 << 30,
}  # fmt: skip
_MESSAGE_CHARS = 2000  # an error line longer than this is cut
_DIFF_BLOCK_BYTES = 64 * MiB  # diff --values compares arrays this much at a time per side
_CREDENTIALS_HINT = (
    "no S3 credentials were found: pass them with --storage-options "
    '\'{"key": "<access key id>", "secret": "<secret access key>"}\', set '
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a profile of ~/.aws/credentials "
    '(AWS_PROFILE, or --storage-options \'{"profile": "<name>"}\'); a public bucket '
    "needs --storage-options '{\"anon\": true}'"
)


class UsageError(Exception):
    """A command line that cannot be carried out as given (exit 2)."""


class CommandError(Exception):
    """A command that could not finish, for a reason its message says (exit 5)."""


def parse_size(text: str) -> int:
    """``"256MiB"`` -> 268435456; plain numbers are bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64MiB or 1GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _positive_size(text: str) -> int:
    """A size of at least one byte (``--size``)."""
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r} (try 64MiB)")
    return size


def _positive_int(text: str) -> int:
    """A whole number of at least 1 (``--steps``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds (``--older-than``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    """A JSON object given on the command line (``--storage-options``)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"anon\": true}'")
    return value


class Progress:
    """A progress bar for long work, and the one measurement its summary line reports.

    Counts every ``progress(nbytes)`` call from any thread; draws a bar on
    ``stream`` (default stderr) only when it is a terminal, at most every
    0.1 s, each line padded over the longest one drawn before it. ``total``
    may be an estimate: it grows to what has been done, so the bar never shows
    more done than its total. :meth:`finish` stops the measurement and draws
    the final state (100%, with the rate of :meth:`summary`); :meth:`close`
    ends the bar's line. ``clock`` (seconds) is for tests.
    """

    def __init__(
        self,
        label: str,
        total: int,
        stream: TextIO | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.label, self.total, self.done = label, max(total, 0), 0
        self.stream = stream or sys.stderr
        self._clock = clock
        try:
            self.enabled = self.stream.isatty()
        except (AttributeError, ValueError):  # a closed or unusual stream
            self.enabled = False
        self.start = clock()
        self.seconds = 0.0  # set by finish()
        self.finished = False
        self._lock = threading.Lock()
        self._drawn = -math.inf  # the first call draws
        self._width = 0

    def __call__(self, amount: int) -> None:
        with self._lock:
            if self.finished:
                return
            self.done += amount
            self.total = max(self.total, self.done)
            now = self._clock()
            if self.enabled and now - self._drawn > 0.1:
                self._drawn = now
                self._draw(now - self.start)

    @property
    def elapsed(self) -> float:
        """Seconds measured: until :meth:`finish`, or until now."""
        return self.seconds if self.finished else self._clock() - self.start

    @property
    def rate(self) -> float:
        """Bytes per second over :attr:`elapsed`."""
        return self.done / max(self.elapsed, 1e-9)

    def summary(self) -> str:
        """``"512.0 MiB in 1.20 s, 426.7 MiB/s"``: the numbers the final bar shows."""
        return f"{format_size(self.done)} in {self.elapsed:.2f} s, {format_size(self.rate)}/s"

    def finish(self, seconds: float | None = None) -> None:
        """Stop measuring (after ``seconds`` if given, else now) and draw the final bar.

        The total becomes what was done; later ``progress`` calls are ignored.
        """
        with self._lock:
            if self.finished:
                return
            self.seconds = self._clock() - self.start if seconds is None else seconds
            self.finished = True
            self.total = self.done
            if self.enabled:
                self._draw(self.seconds)

    def close(self) -> None:
        """End the bar's line; later calls draw nothing."""
        with self._lock:
            if self.enabled:
                self.stream.write("\n")
                self.stream.flush()
                self.enabled = False

    def _draw(self, seconds: float) -> None:
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(30 * fraction)
        rate = format_size(self.done / max(seconds, 1e-9))
        line = (
            f"{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
            f"{format_size(self.done)} / {format_size(self.total)}, {rate}/s"
        )
        padding = " " * max(self._width - len(line), 0)  # hide the end of a longer line
        self._width = max(self._width, len(line))
        self.stream.write(f"\r{line}{padding}")
        self.stream.flush()


@contextlib.contextmanager
def _bar(label: str, total: int) -> Iterator[Progress]:
    """A :class:`Progress` on stderr whose line is ended however the block ends."""
    bar = Progress(label, total)
    try:
        yield bar
    finally:
        bar.close()


def _say(text: str) -> None:
    """Print a line naming paths found on storage, control characters escaped."""
    print(printable(text))


def _print_json(document: Any) -> None:
    """One JSON document on stdout; NaN and infinities become the strings JSON lacks."""

    def safe(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
        if isinstance(value, dict):
            return {str(k): safe(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [safe(v) for v in value]
        return value

    print(json.dumps(safe(document), indent=2, allow_nan=False))


# Commands ---------------------------------------------------------------------


def _require_directory(directory: str, storage_options: dict[str, Any] | None) -> None:
    """Raise CheckpointNotFoundError unless ``directory`` is an existing directory."""
    fs, root = resolve_path(directory, storage_options)
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        if fs.exists(root):
            raise CheckpointNotFoundError(f"{directory} is not a directory")
        bucket = missing_bucket(fs, root)
        if bucket is not None:
            raise CheckpointNotFoundError(missing_bucket_message(fs, directory, bucket))
        raise CheckpointNotFoundError(f"{directory} does not exist")


def _holds_commit(path: str, storage_options: dict[str, Any] | None) -> bool:
    """Whether ``path`` is a checkpoint itself (holds a ``_COMMIT``) rather than a directory."""
    fs, root = resolve_path(path, storage_options)
    marker = f"{root.rstrip('/')}/{COMMIT_KEY}"
    fs.invalidate_cache(marker)
    return bool(fs.exists(marker))


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    """One checkpoint of ``ls --json`` (keys in docs/cli.md)."""
    return {
        "name": info.name,
        "path": info.path,
        "number": info.number,
        "state": info.state,
        "committed": info.committed,
        "created": info.created,
        "nbytes": info.size,
        "metadata": dict(info.metadata),
        "damage": info.damage,
    }


_STATE_FILE = re.compile(r"zarrckpt_state\.(.+)\.json")


def _replication(directory: str, storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The two-tier managers of a directory, from their state files: name, remote, copied."""
    fs, root = resolve_path(directory, storage_options)
    found = []
    for entry in sorted(fs.ls(root, detail=False)):
        match = _STATE_FILE.fullmatch(posixpath.basename(str(entry).rstrip("/")))
        if match is None:
            continue
        try:
            with fs.open(entry, "rb") as file:
                state = json.loads(file.read(64 << 20))
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(state, dict):
            continue
        remote, copied = state.get("replicate_to"), state.get("replicated", [])
        if not isinstance(remote, str) or not isinstance(copied, list):
            continue
        found.append(
            {
                "checkpoint_name": match.group(1),
                "replicate_to": remote,
                "replicated": sorted(name for name in copied if isinstance(name, str)),
            }
        )
    return found


def _remote_tier(tier: dict[str, Any], storage_options: dict[str, Any] | None) -> None:
    """Add the remote directory's checkpoints of ``tier``'s name (or why they cannot be listed)."""
    try:
        infos = zc.list_checkpoints(
            tier["replicate_to"], storage_options, checkpoint_name=tier["checkpoint_name"]
        )
    except Exception as exc:  # no credentials, no network...: the local tier is still listed
        tier["error"] = f"{type(exc).__name__}: {exc}"
        tier["remote"] = []
    else:
        tier["remote"] = infos


def cmd_ls(args: argparse.Namespace) -> int:
    """``zarrckpt ls DIR``: the checkpoints in a directory, or a checkpoint's variables."""
    if _holds_commit(args.directory, args.storage_options):
        # A single checkpoint: what is in it, as `show` prints it.
        return cmd_show(
            argparse.Namespace(
                checkpoint=args.directory,
                storage_options=args.storage_options,
                tree=False,
                json=args.json,
            )
        )
    _require_directory(args.directory, args.storage_options)
    infos = zc.list_checkpoints(args.directory, args.storage_options)
    tiers = _replication(args.directory, args.storage_options)
    remote_options = getattr(args, "remote_storage_options", None)
    for tier in tiers:
        _remote_tier(tier, remote_options)
    copied = {name for tier in tiers for name in tier["replicated"]}
    names = {tier["checkpoint_name"] for tier in tiers}

    def remote_state(info: CheckpointInfo) -> str:
        """'copied' / 'pending' for a committed checkpoint of a two-tier manager, else ''."""
        name = info.name.rpartition("-")[0]
        if name not in names or not info.committed:
            return ""
        return "copied" if info.name in copied else "pending"

    if args.json:
        document: dict[str, Any] = {
            "directory": args.directory,
            "checkpoints": [
                {**_info_json(info), "remote": remote_state(info) or None}
                if tiers
                else _info_json(info)
                for info in infos
            ],
        }
        if tiers:
            document["replication"] = [
                {**tier, "remote": [_info_json(info) for info in tier["remote"]]} for tier in tiers
            ]
        _print_json(document)
        return 0
    if not infos:
        print(f"no checkpoints in {args.directory}")
    else:
        remote_column = f"  {'remote':7}" if tiers else ""
        print(f"{'number':>8}  {'created':19}  {'size':>10}  {'state':13}{remote_column}  path")
        for info in infos:
            number = "-" if info.number is None else str(info.number)
            when = format_time(info.created)
            size = format_size(info.size)
            column = f"  {remote_state(info):7}" if tiers else ""
            print(
                f"{number:>8}  {when}  {size:>10}  {info.state:13}{column}  {printable(info.path)}"
            )
    for tier in tiers:
        remote = tier["remote"]
        committed = [info for info in remote if info.committed]
        print(
            f"remote tier of '{printable(tier['checkpoint_name'])}': "
            f"{printable(tier['replicate_to'])}: "
            + (
                f"cannot list ({printable(tier['error'])}; "
                "--remote-storage-options gives its credentials)"
                if "error" in tier
                else f"{len(committed)} committed"
                + (f", {len(remote) - len(committed)} not committed" if remote != committed else "")
            )
        )
        for info in remote:
            number = "-" if info.number is None else str(info.number)
            print(
                f"{number:>8}  {format_time(info.created)}  {format_size(info.size):>10}  "
                f"{info.state:13}  {printable(info.path)}"
            )
    for info in infos:
        if info.damage:
            print(f"damaged: {info.path}: {printable(info.damage)}", file=sys.stderr)
    return 0


def _codecs(layout: ArrayLayout) -> list[str]:
    """The codec chain of a stored array, by name."""
    names = ["bytes"]
    if layout.compression is not None:
        names.append(type(layout.compression).__name__.lower())
    return [*names, "crc32c"]


def _graph_json(graph: ObjectGraph) -> list[dict[str, Any]]:
    """The object graph's nodes for ``show --tree --json``."""
    paths = graph.paths(limit=200)
    return [
        {
            "id": node_id,
            "path": paths.get(node_id),
            "type": node.type_name,
            "children": [{"name": c.name, "node": c.node_id} for c in node.children],
            "attributes": [
                {"name": a.name, "key": a.key, "shape": list(a.shape), "dtype": a.dtype}
                for a in node.attributes
            ],
            "slot_variables": [
                {
                    "variable": s.original_variable_node_id,
                    "slot": s.slot_name,
                    "node": s.slot_variable_node_id,
                }
                for s in node.slot_variables
            ],
        }
        for node_id, node in enumerate(graph.nodes)
    ]


def cmd_show(args: argparse.Namespace) -> int:
    """``zarrckpt show CKPT``: every saved value with its layout, or the object graph."""
    checkpoint = open_committed(args.checkpoint, args.storage_options)
    manifest = checkpoint.manifest
    attributes = sorted((a for _, a in checkpoint.graph.attributes()), key=lambda a: a.key)
    if getattr(args, "json", False):
        document: dict[str, Any] = {
            "checkpoint": checkpoint.url,
            "zarr_group": checkpoint.storage.url,
            "created": manifest.created,
            "files": len(manifest.files),
            "nbytes": manifest.nbytes,
            "metadata": dict(manifest.metadata),
        }
        if args.tree:
            document["nodes"] = _graph_json(checkpoint.graph)
        else:
            with checkpoint.reading():
                layouts = [checkpoint.layout(a) for a in attributes]
            document["variables"] = [
                {
                    "key": a.key,
                    "shape": list(a.shape),
                    "dtype": a.dtype,
                    "nbytes": a.nbytes,
                    "chunks": list(layout.chunk_shape),
                    "codecs": _codecs(layout),
                }
                for a, layout in zip(attributes, layouts, strict=True)
            ]
        _print_json(document)
        return 0
    print(f"checkpoint: {checkpoint.url}")
    print(f"zarr group: {checkpoint.storage.url}   (zarr.open_group(...) reads it)")
    print(
        f"committed:  {format_time(manifest.created)}, {len(manifest.files)} files, "
        f"{format_size(manifest.nbytes)}"
    )
    if args.tree:
        print(checkpoint.graph)
        return 0
    limit = getattr(args, "limit", None)
    shown = attributes if limit is None else attributes[:limit]
    rows = []
    with checkpoint.reading():
        for attribute in shown:
            layout = checkpoint.layout(attribute)
            rows.append(
                (
                    attribute.key,
                    str(list(attribute.shape)),
                    attribute.dtype,
                    format_size(attribute.nbytes),
                    str(list(layout.chunk_shape)),
                    "+".join(_codecs(layout)),
                )
            )
    header = ("key", "shape", "dtype", "size", "chunks", "codecs")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    if len(shown) < len(attributes):
        print(f"... and {len(attributes) - len(shown)} more")
    return 0


def cmd_dot(args: argparse.Namespace) -> int:
    """``zarrckpt dot CKPT``: Graphviz text of the object graph, or a PNG of it."""
    text = zc.dot_graph_from_checkpoint(args.checkpoint, args.storage_options)
    if args.png is None:
        sys.stdout.write(text)
        return 0
    dot = shutil.which("dot")
    if dot is None:
        raise CommandError("--png needs Graphviz's 'dot' program on PATH")
    result = subprocess.run(
        [dot, "-Tpng", "-o", str(args.png)], input=text.encode(), capture_output=True, check=False
    )
    if result.returncode != 0:
        said = result.stderr.decode(errors="replace").strip().splitlines()
        raise CommandError(
            f"'dot' failed with exit code {result.returncode}" + (f": {said[-1]}" if said else "")
        )
    print(f"wrote {args.png}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """``zarrckpt verify CKPT``: every byte against the manifest; unlisted files named."""
    checkpoint = open_committed(args.checkpoint, args.storage_options)
    with _bar("verifying", checkpoint.manifest.nbytes) as bar:
        report = zc.verify(args.checkpoint, args.storage_options, progress=bar, strict=args.strict)
        bar.finish(report.seconds)  # the bar's last rate is the report's
    if report.unlisted:
        print(
            f"zarrckpt: warning: {printable(report.path)}: {describe_unlisted(report.unlisted)}; "
            "--strict makes this an error",
            file=sys.stderr,
        )
    if args.json:
        _print_json(
            {
                "checkpoint": report.path,
                "ok": True,
                "arrays": report.arrays,
                "files": report.files,
                "nbytes": report.nbytes,
                "seconds": report.seconds,
                "unlisted": list(report.unlisted),
            }
        )
        return 0
    print(printable(str(report)))
    return 0


def _fingerprints(checkpoint: CommittedCheckpoint) -> dict[str, tuple[tuple[str, int, int], ...]]:
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


class _ValueDifference:
    """How two arrays of one shape differ, accumulated block by block."""

    def __init__(self) -> None:
        self.different = False
        self.max_delta = 0.0
        self.nan_in_one = 0

    def add(self, x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> None:
        """Compare one block of each side (equal shapes)."""
        if x.dtype.kind in "biu" and y.dtype.kind in "biu":
            differ = x != y  # exact, where float64 would round 64-bit integers
            if not differ.any():
                return
            self.different = True
            p, q = x[differ], y[differ]
            if max(x.dtype.itemsize, y.dtype.itemsize) < 8:
                exact = int(np.max(np.abs(p.astype(np.int64) - q.astype(np.int64))))
            else:  # Python ints: no overflow (only the values that differ)
                pairs = zip(p.tolist(), q.tolist(), strict=True)
                exact = max(abs(int(i) - int(j)) for i, j in pairs)
            self.max_delta = max(self.max_delta, float(exact))
            return
        wide = np.complex128 if "c" in (x.dtype.kind, y.dtype.kind) else np.float64
        a, b = x.astype(wide), y.astype(wide)  # exact for every float type zarrckpt stores
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        both = ~(nan_a | nan_b)
        a, b = a[both], b[both]
        with np.errstate(invalid="ignore"):  # inf - inf; np.where keeps 0 for those
            delta = np.where(a == b, 0.0, np.abs(a - b))  # equal infinities differ by 0
        nan_changed = int(np.count_nonzero(nan_a != nan_b))
        largest = float(delta.max()) if delta.size else 0.0
        if largest or nan_changed:
            self.different = True
            self.max_delta = max(self.max_delta, largest)
            self.nan_in_one += nan_changed

    def __str__(self) -> str:
        text = f"max abs difference {self.max_delta:.6g}"
        if self.nan_in_one:
            text += f", {self.nan_in_one} values NaN in one only"
        return text


def value_difference(x: np.ndarray[Any, Any], y: np.ndarray[Any, Any]) -> str:
    """How two arrays of one shape differ: the max abs difference, and NaNs in one only."""
    difference = _ValueDifference()
    difference.add(x, y)
    return str(difference)


def _blocks(shape: tuple[int, ...], itemsize: int, rows_per_chunk: int) -> Iterator[slice]:
    """Runs of leading rows of about ``_DIFF_BLOCK_BYTES``, whole chunks of rows each."""
    if not shape or shape[0] == 0:
        yield slice(None)
        return
    row_bytes = max(math.prod(shape[1:]) * itemsize, 1)
    step = max(rows_per_chunk, _DIFF_BLOCK_BYTES // row_bytes // rows_per_chunk * rows_per_chunk)
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def _read_rows(
    checkpoint: CommittedCheckpoint,
    attribute: SavedAttribute,
    layout: ArrayLayout,
    rows: slice,
) -> np.ndarray[Any, Any]:
    """``value[rows]`` read as :func:`zarrckpt.load_variable` reads it, every chunk checked."""
    selection = tuple(
        slice(*(rows.indices(n) if axis == 0 else (0, n, 1))) for axis, n in enumerate(layout.shape)
    )
    with checkpoint.reading():
        return read_selection(
            checkpoint.storage, attribute.key, layout, selection, checkpoint.files
        )


def _compare_values(
    a: CommittedCheckpoint,
    b: CommittedCheckpoint,
    left: SavedAttribute,
    right: SavedAttribute,
) -> _ValueDifference:
    """Read one saved value on both sides, block by block, through the manifests' checks.

    A missing, truncated or damaged chunk or ``zarr.json`` on either side
    raises (:class:`~zarrckpt.errors.CorruptCheckpointError`).
    """
    with a.reading():
        layout_a = a.layout(left)
    with b.reading():
        layout_b = b.layout(right)
    chunk_a = layout_a.chunk_shape[0] if layout_a.chunk_shape else 1
    chunk_b = layout_b.chunk_shape[0] if layout_b.chunk_shape else 1
    rows_per_chunk = math.lcm(chunk_a, chunk_b)
    if rows_per_chunk > 4 * max(chunk_a, chunk_b):  # chunkings that rarely line up
        rows_per_chunk = chunk_a
    difference = _ValueDifference()
    for rows in _blocks(layout_a.shape, layout_a.dtype.itemsize, rows_per_chunk):
        difference.add(_read_rows(a, left, layout_a, rows), _read_rows(b, right, layout_b, rows))
    return difference


def cmd_diff(args: argparse.Namespace) -> int:
    """``zarrckpt diff A B``: keys removed, added and changed (``--values``: by value)."""
    a = open_committed(args.a, args.storage_options)
    b = open_committed(args.b, args.storage_options)
    attributes_a = {x.key: x for _, x in a.graph.attributes()}
    attributes_b = {x.key: x for _, x in b.graph.attributes()}
    prints_a, prints_b = _fingerprints(a), _fingerprints(b)
    differences = 0
    for key in sorted(attributes_a.keys() | attributes_b.keys()):
        left, right = attributes_a.get(key), attributes_b.get(key)
        if right is None:
            print(f"- {printable(key)}")
        elif left is None:
            print(f"+ {printable(key)}")
        elif (left.shape, left.dtype) != (right.shape, right.dtype):
            print(
                f"~ {printable(key)}: {left.dtype}{list(left.shape)} -> "
                f"{right.dtype}{list(right.shape)}"
            )
        elif args.values:
            # Every common value is read on both sides, equal CRCs or not: a
            # damaged side is an error, never "no differences".
            difference = _compare_values(a, b, left, right)
            if not difference.different:
                continue  # same values (perhaps other bytes: other chunks or codecs)
            print(f"~ {printable(key)}: {difference}")
        elif prints_a.get(key) != prints_b.get(key):
            print(f"~ {printable(key)}")
        else:
            continue
        differences += 1
    if differences == 0:
        print("no differences")
        return 0
    return EXIT_DIFFERENT


def _base_name(path: str) -> str:
    """The last component of a local path or URL (``s3://b/run/ckpt-3/`` -> ``ckpt-3``)."""
    if "://" in path:
        return posixpath.basename(path.rstrip("/"))
    return os.path.basename(os.path.abspath(path))


def copy_destination(source: str, destination: str, storage_options: dict[str, Any] | None) -> str:
    """Where ``cp source destination`` copies to, as ``cp`` would.

    Into ``destination`` under the source's base name when ``destination``
    ends in ``/`` or is an existing directory that is not itself a
    checkpoint; ``destination`` itself otherwise.
    """
    into = destination.endswith("/") or destination.endswith(os.sep)
    if not into:
        fs, root = resolve_path(destination, storage_options)
        fs.invalidate_cache(root)
        into = bool(fs.isdir(root)) and not _holds_commit(destination, storage_options)
    if not into:
        return destination
    name = _base_name(source)
    if not name or name in (".", ".."):
        raise UsageError(f"cannot name a copy of {source!r} inside {destination!r}: give its path")
    if "://" in destination:
        return f"{destination.rstrip('/')}/{name}"
    return os.path.join(destination, name)


def cmd_cp(args: argparse.Namespace) -> int:
    """``zarrckpt cp SRC DST``: a verified copy, committed atomically."""
    source = open_committed(args.source, args.storage_options)
    destination_options = args.destination_storage_options or args.storage_options
    destination = copy_destination(args.source, args.destination, destination_options)
    with _bar("copying", source.manifest.nbytes) as bar:
        zc.copy_checkpoint(
            args.source,
            destination,
            source_storage_options=args.storage_options,
            destination_storage_options=destination_options,
            progress=bar,
        )
        bar.finish()
    _say(f"copied {source.url} -> {destination} ({bar.summary()}, verified)")
    return 0


def _describe_leftover(path: str, nbytes: int, age: float | None) -> str:
    """``"PATH (2.0 KiB, last changed 3.0 days ago)"``."""
    when = "" if age is None else f", last changed {format_duration(max(age, 0.0))} ago"
    return f"{path} ({format_size(nbytes)}{when})"


def cmd_gc(args: argparse.Namespace) -> int:
    """``zarrckpt gc DIR``: remove stale leftovers; say what was kept and why."""
    _require_directory(args.directory, args.storage_options)
    report: GcReport = gc_report(
        args.directory, args.older_than, args.storage_options, dry_run=args.dry_run
    )
    verb = "would remove" if args.dry_run else "removed"
    for leftover in report.removed:
        _say(f"{verb} {_describe_leftover(leftover.path, leftover.nbytes, leftover.age)}")
    for leftover in report.kept:
        _say(f"kept {leftover.path} ({format_size(leftover.nbytes)}): {leftover.reason}")
    infos = zc.list_checkpoints(args.directory, args.storage_options)
    leftovers = [leftover.path for leftover in (*report.removed, *report.kept)]
    for info in infos:
        if info.committed:
            continue
        if info.damage:
            _say(
                f"kept {info.path} ({format_size(info.size)}): DAMAGED, its {COMMIT_KEY} cannot "
                f"be read; gc never removes a checkpoint with a {COMMIT_KEY} "
                f"(zarrckpt verify {info.path} tells more)"
            )
        elif not any(path.startswith(info.path.rstrip("/") + "/") for path in leftovers):
            _say(
                f"kept {info.path} ({format_size(info.size)}): NOT COMMITTED, and not a "
                "leftover gc knows (zarrckpt saves into a hidden temporary directory or an "
                "attempt-<hex> prefix); remove it yourself if nothing writes to it"
            )
    committed = [info for info in infos if info.committed]
    if committed:
        total = format_size(sum(info.nbytes for info in committed))
        print(
            f"kept {len(committed)} committed checkpoints ({total}): gc never removes a "
            "committed checkpoint"
        )
    count, size = len(report.removed), format_size(report.removed_nbytes)
    if args.dry_run:
        print(
            f"{count} leftovers would be removed ({size}), {len(report.kept)} kept; "
            "nothing was removed (--dry-run)"
        )
    else:
        print(f"{count} leftovers removed ({size}), {len(report.kept)} kept")
    return 0


# Demo -------------------------------------------------------------------------

_DEMO_LAYERS = 4
_DEMO_MAX_TO_KEEP = 2


def _demo_width(size: int) -> int:
    """The model width that makes :class:`_DemoModel` about ``size`` bytes of float32."""
    return max(8, int((size / 4 / (_DEMO_LAYERS * 11 + 8)) ** 0.5))


def _demo_nbytes(size: int) -> int:
    """Bytes of the variables of a :class:`_DemoModel` of ``size`` (before building it)."""
    width = _demo_width(size)
    per_block = width * 3 * width + 2 * (width * 4 * width) + width
    return 4 * (8 * width * width + _DEMO_LAYERS * per_block)


class _Block(zc.AutoTrackable):
    """One transformer block's weights: attention, a two-layer MLP, a norm."""

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
        width = _demo_width(size)
        self.embedding = zc.Variable(rng.standard_normal((8 * width, width), np.float32))
        self.blocks = [_Block(width, rng) for _ in range(_DEMO_LAYERS)]


class _SGD(zc.Optimizer):
    """SGD with momentum: one ``momentum`` slot per variable."""

    def step(self, variables: list[zc.Variable], rng: np.random.Generator) -> None:
        """One step of SGD with momentum on random gradients."""
        for var in variables:
            momentum = self.add_slot(var, "momentum")
            momentum.assign(0.9 * momentum.numpy() + rng.standard_normal(var.shape, np.float32))
            var.assign(var.numpy() - 1e-3 * momentum.numpy())


def _variables(model: _DemoModel) -> list[zc.Variable]:
    """Every variable of the demo model, in a fixed order."""
    return [o for o in zc.list_objects(model) if isinstance(o, zc.Variable)]


def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    """``action()`` and the seconds it took."""
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


def _written_bytes(path: str) -> int:
    """What a save of the same state reports to ``progress``: every file but the record's two.

    The object-graph record and the root ``zarr.json`` are written outside
    the progress count; every array file (chunks with their CRC trailers,
    each array's ``zarr.json``) is in it.
    """
    manifest = open_committed(path).manifest
    prefix = f"{manifest.attempt}/" if manifest.attempt else ""
    skipped = {f"{prefix}object_graph.msgpack", f"{prefix}zarr.json"}
    return sum(entry.size for entry in manifest.files if entry.key not in skipped)


def _count(number: int, noun: str) -> str:
    """``"1 step"``, ``"3 steps"``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def demo(size: int, directory: Path, steps: int = 3, *, temporary: bool = False) -> int:
    """Train a model for a few steps with a CheckpointManager, restore, inspect.

    ``temporary`` says ``directory`` is deleted when the demo ends: then the
    ``ls`` and ``show`` output is not shown as commands to rerun.
    """
    nbytes = _demo_nbytes(size)
    kept = min(steps, _DEMO_MAX_TO_KEEP + 1)  # the new one lands before the oldest goes
    print(
        f"zarrckpt {zc.__version__} demo: a transformer-shaped model of {format_size(nbytes)} "
        f"(float32) trained for {_count(steps, 'step')}, with one optimizer slot per variable"
    )
    print(
        f"  memory: about {format_size(4 * nbytes)}: the model and its slots, twice (the "
        "restore fills a second model), plus working space"
    )
    print(
        f"  disk:   up to about {format_size(kept * 2 * nbytes)} "
        f"({_count(kept, 'checkpoint')} of the model + slots, {format_size(2 * nbytes)} each: "
        f"max_to_keep={_DEMO_MAX_TO_KEEP}, and the newest is written before the oldest is "
        "deleted)"
    )
    if temporary:
        print(
            f"  in:     {directory}, a temporary directory deleted when the demo ends "
            "(pass --dir DIR to keep the checkpoints)"
        )
    else:
        print(f"  in:     {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < kept * 2 * nbytes:
        print(
            f"zarrckpt: warning: {directory} has {format_size(free)} free, the demo needs about "
            f"{format_size(kept * 2 * nbytes)}; pass a smaller --size or another --dir",
            file=sys.stderr,
        )
    rng = np.random.default_rng(0)
    model, optimizer = _DemoModel(size, seed=0), _SGD()
    ckpt = zc.Checkpoint(model=model, optimizer=optimizer)
    manager = zc.CheckpointManager(ckpt, directory, max_to_keep=_DEMO_MAX_TO_KEEP)
    estimate = 2 * nbytes  # the first save's; then what the previous one wrote
    for step in range(1, steps + 1):
        optimizer.step(_variables(model), rng)
        with _bar(f"  saving step {step}", estimate) as bar:
            path = manager.save(options=zc.CheckpointOptions(progress=bar))
            bar.finish()
        print(f"  step {step}: saved {path} (model + slots, {bar.summary()}, fsync'ed)")
        if path is not None:
            estimate = _written_bytes(path)
    manager.wait()

    fresh, fresh_optimizer = _DemoModel(size, seed=1), _SGD()
    cold = _drop_page_cache(directory)
    # The model's values now; the optimizer's slots when the first step creates them.
    with _bar("  restoring", nbytes) as bar:
        fresh_manager = zc.CheckpointManager(
            zc.Checkpoint(model=fresh, optimizer=fresh_optimizer),
            directory,
            max_to_keep=_DEMO_MAX_TO_KEEP,
            options=zc.CheckpointOptions(progress=bar),
        )
        restored = fresh_manager.restore_or_initialize()
        bar.finish()
    if restored is None:
        raise CommandError(f"{directory}: no checkpoint to restore after the saves")
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
    print(f"  restored {restored} into a new model ({bar.summary()}"
          f"{', cold' if cold else ''}): "
          f"{'bit-exact' if same else 'DIFFERENT'}")  # fmt: skip
    print("  optimizer slots created after the restore got their saved values (deferred): "
          f"{'bit-exact' if slots_same else 'DIFFERENT'}")  # fmt: skip

    key = "model/embedding"
    embedding, seconds = _timed(lambda: zc.load_variable(restored, key))
    ok = np.array_equal(embedding, model.embedding.numpy())
    print(f"  load_variable({key!r}) alone: {format_size(embedding.nbytes)} in "
          f"{seconds * 1e3:.0f} ms, {'bit-exact' if ok else 'DIFFERENT'}")  # fmt: skip
    if temporary:
        print(
            "\nWhat `zarrckpt ls DIR` and `zarrckpt show CKPT` print for these checkpoints "
            "(run the demo with --dir DIR to keep them and run the commands yourself):"
        )
        print("\n# zarrckpt ls DIR")
    else:
        print(f"\n$ zarrckpt ls {directory}")
    cmd_ls(argparse.Namespace(directory=str(directory), storage_options=None, json=False))
    print(f"\n{'# zarrckpt show CKPT' if temporary else f'$ zarrckpt show {restored}'}")
    cmd_show(argparse.Namespace(checkpoint=restored, storage_options=None, tree=False, limit=6))
    if temporary:
        print(f"\nThe temporary directory {directory} is deleted now.")
    else:
        print(f"\nThe checkpoints stay in {directory}; `rm -r {directory}` deletes them.")
    return 0 if same and slots_same and ok else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    """``zarrckpt demo``: in ``--dir``, or in a temporary directory deleted at the end."""
    if args.dir is not None:
        return demo(args.size, args.dir, args.steps)
    with tempfile.TemporaryDirectory(prefix="zarrckpt-demo-") as tmp:
        return demo(args.size, Path(tmp), args.steps, temporary=True)


# Parsing ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        line = f"{printable(message)} (see '{self.prog} --help')"
        print(f"zarrckpt: error: {_cut(line)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zarrckpt",
        description="Inspect, verify, copy and clean zarrckpt checkpoints (local paths or "
        "fsspec URLs such as s3://bucket/run/ckpt-10).",
        epilog="exit codes: 0 ok, 1 differences (diff), 2 usage, 3 not found or not "
        "committed, 4 corrupt, 5 other errors, 130 interrupted, 141 output closed early",
    )
    storage_help = (
        "fsspec storage options as a JSON object (e.g. S3 endpoint and credentials); "
        "before or after the command"
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"zarrckpt {zc.__version__}",
        help="print the version",
    )
    parser.add_argument(
        "--storage-options", type=_json_object, default=None, metavar="JSON", help=storage_help
    )
    # The same option after the command; SUPPRESS keeps one given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--storage-options",
        type=_json_object,
        default=argparse.SUPPRESS,
        metavar="JSON",
        help=storage_help,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=summary, description=summary, parents=[common]
        )
        return sub

    json_help = "print one JSON document on stdout (keys in docs/cli.md)"

    ls = command("ls", "list the checkpoints in a directory (a checkpoint: its variables)")
    ls.add_argument(
        "directory",
        help="directory holding checkpoints (local path or URL such as s3://bucket/run); "
        "a single checkpoint lists its variables as 'show' does",
    )
    ls.add_argument("--json", action="store_true", help=json_help)
    ls.add_argument(
        "--remote-storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="storage options of a two-tier manager's remote directory (replicate_to)",
    )
    ls.set_defaults(run=cmd_ls)

    show = command("show", "variables of a checkpoint (or --tree: its graph)")
    show.add_argument("checkpoint", help="the checkpoint (local path or URL)")
    show.add_argument("--tree", action="store_true", help="print the object graph instead")
    show.add_argument("--json", action="store_true", help=json_help)
    show.set_defaults(run=cmd_show)

    dot = command("dot", "Graphviz DOT text of the object graph")
    dot.add_argument("checkpoint", help="the checkpoint (local path or URL)")
    dot.add_argument("--png", type=Path, default=None, help="render to this PNG with 'dot'")
    dot.set_defaults(run=cmd_dot)

    verify = command("verify", "read every byte and check every CRC")
    verify.add_argument("checkpoint", help="the checkpoint to check (local path or URL)")
    verify.add_argument(
        "--strict",
        action="store_true",
        help="files in the checkpoint that its manifest does not list fail it (exit 4)",
    )
    verify.add_argument("--json", action="store_true", help=json_help)
    verify.set_defaults(run=cmd_verify)

    diff = command("diff", "keys added, removed and changed from A to B")
    diff.add_argument("a", help="the first checkpoint (local path or URL)")
    diff.add_argument("b", help="the second checkpoint")
    diff.add_argument(
        "--values",
        action="store_true",
        help="read every common value on both sides, every chunk checked: max abs difference",
    )
    diff.set_defaults(run=cmd_diff)

    cp = command("cp", "copy a checkpoint (local <-> S3), verified, atomically")
    cp.add_argument("source", help="the checkpoint to copy (local path or URL)")
    cp.add_argument(
        "destination",
        help="where the copy goes; ending in '/' or an existing directory that is not a "
        "checkpoint: into it, under the source's name",
    )
    cp.add_argument(
        "--destination-storage-options",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="storage options for the destination (default: --storage-options)",
    )
    cp.set_defaults(run=cmd_cp)

    gc = command("gc", "remove leftovers of interrupted saves and deletes")
    gc.add_argument("directory", help="directory holding checkpoints (local path or URL)")
    gc.add_argument(
        "--older-than",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="only leftovers older than this (default 3600: a live writer is never touched)",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="list what would be removed; remove nothing"
    )
    gc.set_defaults(run=cmd_gc)

    demo_parser = command("demo", "train, save, restore and inspect a demo model")
    demo_parser.add_argument(
        "--size",
        type=_positive_size,
        default=parse_size("1GiB"),
        help="model size (default 1GiB; the demo states the memory and disk it needs)",
    )
    demo_parser.add_argument(
        "--steps", type=_positive_int, default=3, help="steps to save (default 3)"
    )
    demo_parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to save, kept afterwards (default: a temporary directory, deleted at the end)",
    )
    demo_parser.set_defaults(run=cmd_demo)
    return parser


# Errors -----------------------------------------------------------------------


def _cut(text: str) -> str:
    """``text``, cut at the length of an error line."""
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def _error(message: str) -> None:
    """Print ``zarrckpt: error: <message>`` as one line on stderr."""
    with contextlib.suppress(OSError, ValueError):  # stderr itself may be gone
        print(f"zarrckpt: error: {_cut(printable(message))}", file=sys.stderr)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _missing_credentials(exc: BaseException) -> BaseException | None:
    """botocore's NoCredentialsError in ``exc``'s chain (by class name: botocore is optional)."""
    for link in _chain(exc):
        if any(cls.__name__ == "NoCredentialsError" for cls in type(link).__mro__):
            return link
    return None


def _missing_s3fs(exc: BaseException) -> bool:
    """Whether ``exc`` comes from fsspec failing to import s3fs."""
    return any(
        isinstance(link, ImportError) and ("s3fs" in str(link) or link.name == "s3fs")
        for link in _chain(exc)
    )


def _describe(exc: BaseException) -> str:
    """The message of an unexpected exception, with its type."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _exit_code(exc: Exception) -> int:
    """Print the one error line for ``exc`` and return the exit code it means."""
    credentials = _missing_credentials(exc)
    if credentials is not None:
        _error(f"{_CREDENTIALS_HINT} ({_describe(credentials)})")
        return EXIT_ERROR
    if isinstance(exc, CommandError):
        _error(str(exc))
        return EXIT_ERROR
    if isinstance(exc, UsageError):
        _error(str(exc))
        return EXIT_USAGE
    if isinstance(exc, CheckpointNotFoundError):
        _error(str(exc))
        return EXIT_NOT_FOUND
    if isinstance(exc, CorruptCheckpointError | FormatVersionError):
        _error(str(exc))
        return EXIT_CORRUPT
    message = str(exc) if isinstance(exc, ZarrckptError | OSError) else _describe(exc)
    if _missing_s3fs(exc) and "zarrckpt[s3]" not in message:
        message = f"S3 needs s3fs, which is not installed: pip install 'zarrckpt[s3]' ({message})"
    elif isinstance(exc, ValueError) and str(exc).startswith("Protocol not known"):
        message += " (a path is a local path or an fsspec URL such as s3://bucket/run)"
    _error(message)
    return EXIT_ERROR


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll(), or no real stdout
        return True


def _closed_pipe() -> int:
    """Exit quietly after the reader of stdout went away (``zarrckpt show X | head -1``).

    What is still buffered would fail again when Python flushes stdout at
    exit, so stdout is pointed at /dev/null first.
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_CLOSED_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zarrckpt`` console script; returns the exit code.

    Usage errors exit 2 (``SystemExit`` from argument parsing, as ``--help``
    and ``--version`` exit 0); every other outcome is returned.
    """
    args = _build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
    except KeyboardInterrupt:
        with contextlib.suppress(OSError, ValueError):
            print("zarrckpt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError as exc:
        if _stdout_closed():
            return _closed_pipe()
        return _exit_code(exc)
    except Exception as exc:
        return _exit_code(exc)
    return code


if __name__ == "__main__":
    sys.exit(main())
