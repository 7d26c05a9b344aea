"""Distributed save and restore: N ranks save one checkpoint, any number restore it.

Each rank holds blocks of the model (``zarrckpt.Variable.sharded``) and plain
values every rank holds alike (replicated). Every rank calls the same method
with a coordinator::

    coordinator = TorchCoordinator()            # or MPICoordinator()
    ckpt.save("/shared/run/ckpt", coordinator=coordinator)

and the ranks write one checkpoint together: the same Zarr hierarchy, with the
same record, that one process writes, committed once by rank 0 when every
rank succeeded. Restoring needs no coordinator: each rank reads the chunks
overlapping its own blocks, whatever number of ranks and layout wrote them.
See docs/distributed.md.

Importing this package imports neither torch nor mpi4py; their coordinators
import them when created.
"""

from __future__ import annotations

from zarrckpt.distributed._coordinator import (
    DEFAULT_TIMEOUT,
    Coordinator,
    LocalCoordinator,
    MPICoordinator,
    TorchCoordinator,
)
from zarrckpt.distributed._plan import shard_layout

__all__ = [
    "DEFAULT_TIMEOUT",
    "Coordinator",
    "LocalCoordinator",
    "MPICoordinator",
    "TorchCoordinator",
    "even_split",
    "shard_layout",
]


def even_split(size: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows ``(start, stop)`` of ``size`` rows split as evenly as possible.

    The first ``size % world_size`` ranks get one row more (torch's ``chunk``
    gives the last ranks fewer; any split works, this one is the most even).

    Example:
        >>> [even_split(10, 3, r) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
