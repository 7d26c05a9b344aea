"""The global write plan of a distributed save, computed alike on every rank.

Every rank sends a :class:`RankPlan` (its path, its record's hash, and per
saved value the global shape, dtype and its block) through the coordinator.
From the gathered plans every rank computes the same :class:`GlobalPlan`:
the checks (same record, blocks that tile each value exactly), each sharded
value's chunk grid and the owner of each chunk, and the writer of each
replicated value. So every rank raises the same message, or writes its own
part of one agreed layout, with no further round trip.

Chunk grids. A chunk written by two ranks is a lost write waiting to happen,
so every chunk has one owner, which alone writes it. Where the block edges
allow it, the chunk grid is aligned with them (chunk edges on every block
edge, at least four chunks a block down to a useful size), so every chunk
lies in one block and its owner writes it from its own memory. Where blocks
are irregular (10 rows over 3 ranks), aligned chunks would be tiny: a small
value keeps the single-process grid, a larger one gets chunks of at most
half the thinnest block, so a chunk spans at most two blocks along each
split axis. Such a chunk is owned by the rank holding most of it, and the
other ranks send it their pieces (per block edge, at most one chunk).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zarrckpt._dtypes import dtype_from_name
from zarrckpt.array_io import ArrayLayout
from zarrckpt.codecs import Compression

__all__ = [
    "GlobalPlan",
    "LocalValue",
    "PlanError",
    "RankPlan",
    "ValuePlan",
    "make_global_plan",
]

Box = tuple[tuple[int, int], ...]  # (start, stop) per axis
_CHUNKS_PER_BLOCK = 4


@dataclass(frozen=True)
class LocalValue:
    """One saved value as one rank holds it: its block (or the whole value, replicated)."""

    key: str
    dtype: str
    shape: tuple[int, ...]  # the saved value's (global) shape
    offset: tuple[int, ...] | None  # None: replicated (every rank holds all of it)
    block: tuple[int, ...]  # the shape of what this rank holds
    itemsize: int

    @property
    def box(self) -> Box:
        offset = self.offset or (0,) * len(self.shape)
        return tuple((o, o + b) for o, b in zip(offset, self.block, strict=True))


@dataclass(frozen=True)
class RankPlan:
    """What one rank wants to save (or the error that stopped it from planning)."""

    rank: int
    path: str
    record_sha256: str
    values: tuple[LocalValue, ...]
    error: str | None = None


class PlanError(Exception):
    """The gathered plans cannot be saved; the message is the same on every rank."""


def _describe(box: Box) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in box) + "]"


def _volume(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None."""
    box = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
    return box if all(lo < hi for lo, hi in box) else None


@dataclass
class ValuePlan:
    """How one saved value is written: its layout and who writes which chunk."""

    key: str
    layout: ArrayLayout
    blocks: dict[int, Box] = field(default_factory=dict)  # sharded: rank -> its block
    writer: int | None = None  # replicated: the rank that writes every chunk
    exchange: bool = False  # sharded chunks cross block edges: pieces go to owners

    @property
    def sharded(self) -> bool:
        return self.writer is None

    def chunk_box(self, coords: tuple[int, ...]) -> Box:
        return tuple((r.start, r.stop) for r in self.layout.region(coords))

    def owner(self, coords: tuple[int, ...]) -> int:
        """The rank that writes chunk ``coords``: the one holding most of it (lowest on ties)."""
        if self.writer is not None:
            return self.writer
        box = self.chunk_box(coords)
        if not self.exchange:  # aligned: the chunk lies in one block, the one holding its origin
            for rank, block in self.blocks.items():
                if all(a <= x < b for (x, _), (a, b) in zip(box, block, strict=True)):
                    return rank
            raise AssertionError(f"{self.key}: no block holds chunk {coords}")  # tiling checked
        ranks, starts, stops = self._arrays()
        low = np.array([a for a, _ in box], dtype=np.int64)
        high = np.array([b for _, b in box], dtype=np.int64)
        overlap = np.clip(np.minimum(stops, high) - np.maximum(starts, low), 0, None)
        return int(ranks[int(np.argmax(overlap.prod(axis=1)))])

    def _arrays(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        cached: Any = self.__dict__.get("_cached_arrays")
        if cached is None:
            ranks = sorted(self.blocks)
            ndim = len(self.layout.shape)
            starts = np.array([[a for a, _ in self.blocks[r]] for r in ranks], np.int64)
            stops = np.array([[b for _, b in self.blocks[r]] for r in ranks], np.int64)
            cached = (np.array(ranks), starts.reshape(-1, ndim), stops.reshape(-1, ndim))
            self.__dict__["_cached_arrays"] = cached
        return cached  # type: ignore[no-any-return]

    def touching(self, box: Box) -> Iterator[tuple[int, ...]]:
        """Grid coordinates of every chunk that overlaps ``box``."""
        ranges = [
            range(a // c, -(-b // c))
            for (a, b), c in zip(box, self.layout.chunk_shape, strict=True)
        ]
        for index in np.ndindex(*[len(r) for r in ranges]):
            yield tuple(r[i] for r, i in zip(ranges, index, strict=True))

    def inside(self, coords: tuple[int, ...], rank: int) -> bool:
        """Whether chunk ``coords`` lies entirely in ``rank``'s block."""
        block = self.blocks[rank]
        return all(
            a <= x and y <= b for (x, y), (a, b) in zip(self.chunk_box(coords), block, strict=True)
        )

    def owned_by(self, rank: int) -> list[tuple[int, ...]]:
        """The chunks ``rank`` writes, in grid order."""
        if self.writer is not None:
            return [tuple(c) for c in np.ndindex(*self.layout.grid)] if self.writer == rank else []
        box = self.blocks.get(rank)
        if box is None or _volume(box) == 0:
            return []
        if not self.exchange:
            ranges = [
                range(-(-a // c), -(-b // c))
                for (a, b), c in zip(box, self.layout.chunk_shape, strict=True)
            ]
            return [
                tuple(r[i] for r, i in zip(ranges, index, strict=True))
                for index in np.ndindex(*[len(r) for r in ranges])
            ]
        return [
            coords
            for coords in self.touching(box)
            if self.inside(coords, rank) or self.owner(coords) == rank
        ]


@dataclass
class GlobalPlan:
    """The agreed plan of one distributed save: every value's layout and writers."""

    path: str
    world_size: int
    values: list[ValuePlan]
    written_bytes: list[int]  # per rank: chunk bytes it writes (before padding and CRC)

    @property
    def exchange(self) -> bool:
        """Whether any chunk takes pieces from another rank's block."""
        return any(v.exchange for v in self.values)


def _first_difference(a: RankPlan, b: RankPlan) -> str:
    """The first saved value where two ranks' plans differ, in words."""
    by_key = {v.key: v for v in b.values}
    for value in a.values:
        other = by_key.get(value.key)
        if other is None:
            return f"{value.key!r} is saved by rank {a.rank} but not by rank {b.rank}"
        if (other.shape, other.dtype) != (value.shape, value.dtype):
            return (
                f"{value.key!r} is {value.dtype}{list(value.shape)} on rank {a.rank} but "
                f"{other.dtype}{list(other.shape)} on rank {b.rank}"
            )
    keys = {v.key for v in a.values}
    for other in b.values:
        if other.key not in keys:
            return f"{other.key!r} is saved by rank {b.rank} but not by rank {a.rank}"
    return (
        f"ranks {a.rank} and {b.rank} save the same values but their object graphs differ "
        "(dependency names, types or slot variables)"
    )


def _largest_divisor_at_most(n: int, limit: int) -> int:
    best = 1
    d = 1
    while d * d <= n:
        if n % d == 0:
            for candidate in (d, n // d):
                if best < candidate <= limit:
                    best = candidate
        d += 1
    return best


def shard_layout(
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    boxes: list[Box],
    chunk_bytes: int,
    compression: Compression | None,
) -> tuple[ArrayLayout, bool]:
    """The chunk grid of a sharded value, and whether chunks cross block edges.

    Aligned when the block edges allow chunks of a useful size: along each
    axis with inner block edges, chunks divide the gcd of the edges (so every
    chunk lies inside one block); the size is what a single process would use
    for a value of that gcd's extent, with chunks of at most a quarter of the
    smallest block (but at least 1/16 of ``chunk_bytes``), so that restoring
    into another number of ranks reads little more than each rank's block.
    Useful means at least the smaller of the unaligned chunk, 1/8 of that
    target and the smallest block. Otherwise chunks cross block
    edges and their pieces are exchanged: a small value (at most 1/16 of
    ``chunk_bytes``) keeps the single-process grid; a larger one gets chunks
    of at most half the thinnest block along each split axis.
    """
    default = ArrayLayout.plan(shape, dtype, chunk_bytes, compression)
    smallest_block = min((_volume(b) for b in boxes if _volume(b)), default=0) * dtype.itemsize
    # At least 4 chunks a block (down to 1/16 of chunk_bytes): a restore into
    # another layout then reads little beyond its own block.
    target = min(chunk_bytes, max(chunk_bytes // 16, smallest_block // _CHUNKS_PER_BLOCK))
    unit: list[int] = []
    edges: list[int] = []
    for axis, size in enumerate(shape):
        inner = {a for box in boxes for a in box[axis]} - {0, size}
        g = math.gcd(*inner) if inner else 0
        edges.append(g)
        unit.append(g or size)
    tile = ArrayLayout.plan(tuple(unit), dtype, target, compression).chunk_shape
    aligned = tuple(
        _largest_divisor_at_most(g, c) if g else c for g, c in zip(edges, tile, strict=True)
    )
    if not any(edges):
        return default, False
    # Balanced rows and divisors land below the target: only much smaller is tiny.
    useful = min(default.chunk_nbytes, target // 8, smallest_block)
    layout = ArrayLayout(tuple(shape), dtype, aligned, compression)
    if layout.chunk_nbytes >= useful:
        return layout, False
    if math.prod(shape) * dtype.itemsize <= chunk_bytes // 16:
        return default, True  # small: its few chunks gather at their owners
    # Irregular blocks: chunks of at most half the thinnest block along each
    # split axis, so a chunk spans at most two blocks and an owner receives
    # at most one chunk per block edge.
    halves = []
    for axis, size in enumerate(shape):
        extents = [b - a for box in boxes if _volume(box) for a, b in [box[axis]]]
        halves.append(max(1, min(extents) // 2) if edges[axis] else size)
    thin = ArrayLayout.plan(tuple(halves), dtype, target, compression).chunk_shape
    return ArrayLayout(tuple(shape), dtype, thin, compression), True


def make_global_plan(
    plans: list[RankPlan],
    chunk_bytes: int,
    compression_for: Any,
) -> GlobalPlan:
    """Check the gathered plans and choose layouts and writers; raise PlanError if they disagree.

    Deterministic: every rank computes the same plan from the same inputs.
    """
    world = len(plans)
    failed = [p for p in plans if p.error is not None]
    if failed:
        raise PlanError(
            "could not plan the save on " + "; ".join(f"rank {p.rank}: {p.error}" for p in failed)
        )
    first = plans[0]
    paths = sorted({p.path for p in plans})
    if len(paths) > 1:
        shown = ", ".join(f"rank {p.rank}: {p.path!r}" for p in plans[:8])
        raise PlanError(f"the ranks save to different paths ({shown}); every rank must save one")
    for other in plans[1:]:
        if other.record_sha256 != first.record_sha256:
            differing = [p.rank for p in plans if p.record_sha256 != first.record_sha256]
            raise PlanError(
                f"the ranks save different objects: {_first_difference(first, other)} "
                f"(ranks whose record differs from rank 0's: {differing[:16]})"
            )
    loads = [0] * world
    values: list[ValuePlan] = []
    replicated: list[tuple[int, int]] = []  # (bytes, index in values)
    for index, value in enumerate(first.values):
        dtype = dtype_from_name(value.dtype)
        per_rank = [p.values[index] for p in plans]
        kinds = {v.offset is None for v in per_rank}
        if len(kinds) > 1:
            sharded = [p.rank for p, v in zip(plans, per_rank, strict=True) if v.offset is not None]
            plain = [p.rank for p, v in zip(plans, per_rank, strict=True) if v.offset is None]
            raise PlanError(
                f"{value.key!r} is a sharded Variable on ranks {sharded[:16]} but a plain "
                f"(replicated) one on ranks {plain[:16]}"
            )
        compression = compression_for(value.key)
        if value.offset is None:
            layout = ArrayLayout.plan(value.shape, dtype, chunk_bytes, compression)
            values.append(ValuePlan(value.key, layout))
            replicated.append((math.prod(value.shape) * dtype.itemsize, index))
            continue
        boxes = {p.rank: v.box for p, v in zip(plans, per_rank, strict=True)}
        _check_tiling(value.key, value.shape, boxes)
        layout, exchange = shard_layout(
            value.shape, dtype, list(boxes.values()), chunk_bytes, compression
        )
        plan = ValuePlan(value.key, layout, blocks=boxes, exchange=exchange)
        values.append(plan)
        for rank in range(world):
            for coords in plan.owned_by(rank):
                loads[rank] += _volume(plan.chunk_box(coords)) * dtype.itemsize
    # Replicated values, largest first, each to the rank with the fewest bytes so far.
    for nbytes, index in sorted(replicated, key=lambda item: (-item[0], item[1])):
        writer = min(range(world), key=lambda r: (loads[r], r))
        values[index].writer = writer
        loads[writer] += nbytes
    return GlobalPlan(first.path, world, values, loads)


def _check_tiling(key: str, shape: tuple[int, ...], boxes: dict[int, Box]) -> None:
    """The blocks lie inside the value, do not overlap, and cover it."""
    for rank, box in boxes.items():
        if any(not 0 <= a <= b <= n for (a, b), n in zip(box, shape, strict=True)):
            raise PlanError(
                f"{key!r}: the block of rank {rank} {_describe(box)} lies outside the value's "
                f"shape {list(shape)}"
            )
    ranks = [r for r, box in boxes.items() if _volume(box)]
    if _is_grid_of_cells(shape, [boxes[r] for r in ranks]):
        return
    if ranks:
        starts = np.array([[a for a, _ in boxes[r]] for r in ranks], dtype=np.int64)
        stops = np.array([[b for _, b in boxes[r]] for r in ranks], dtype=np.int64)
        if starts.shape[1] == 0:  # scalars: one block each
            overlap = ~np.eye(len(ranks), dtype=bool)
        else:
            overlap = np.all(
                (starts[:, None, :] < stops[None, :, :]) & (starts[None, :, :] < stops[:, None, :]),
                axis=2,
            )
            np.fill_diagonal(overlap, False)
        if overlap.any():
            i, j = (int(x) for x in np.argwhere(overlap)[0])
            a, b = ranks[i], ranks[j]
            raise PlanError(
                f"{key!r}: the blocks of rank {a} {_describe(boxes[a])} and rank {b} "
                f"{_describe(boxes[b])} overlap; each element is saved by one rank"
            )
    covered = sum(_volume(boxes[r]) for r in ranks)
    total = math.prod(shape)
    if covered != total:
        shown = ", ".join(f"rank {r} {_describe(boxes[r])}" for r in sorted(boxes)[:8])
        raise PlanError(
            f"{key!r}: the blocks cover {covered} of the {total} elements of shape "
            f"{list(shape)} ({shown}); together the blocks must cover the value exactly"
            + (
                ". A sharded Variable is saved by all the ranks that hold its blocks "
                "together: pass coordinator= (zarrckpt.distributed) to the save on every rank"
                if len(boxes) == 1
                else ""
            )
        )


def _is_grid_of_cells(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    """Whether the boxes are the cells of one grid, each once: an exact tiling, in O(blocks).

    The common layouts (rows, columns, a 2-D mesh) are; the pairwise overlap
    check, quadratic in the number of blocks, is left for the others.
    """
    edges = [
        {edge: i for i, edge in enumerate(sorted({a for box in boxes for a in box[axis]} | {0, n}))}
        for axis, n in enumerate(shape)
    ]
    cells = math.prod(len(e) - 1 for e in edges)
    if len(boxes) != cells or len(set(boxes)) != cells:
        return False
    return all(
        edges[axis][b] == edges[axis][a] + 1 for box in boxes for axis, (a, b) in enumerate(box)
    )
