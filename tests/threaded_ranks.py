"""Ranks as threads of one process: a coordinator for fast in-process distributed tests.

Objects are deep-copied through the collectives, as a real coordinator
serializes them, so ranks never share an array by accident.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import Any

from zarrckpt.errors import DistributedError


class ThreadGroup:
    """What the ranks of one thread group share."""

    def __init__(self, world_size: int, timeout: float = 30.0) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[Any] = [None] * world_size
        self.calls = [0] * world_size  # collectives each rank entered


class ThreadCoordinator:
    """A Coordinator whose ranks are threads sharing a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    def _wait(self, operation: str) -> None:
        try:
            self.group.barrier.wait()
        except threading.BrokenBarrierError:
            raise DistributedError(
                f"rank {self.rank}: {operation}: a rank died or did not arrive"
            ) from None

    def barrier(self) -> None:
        self.group.calls[self.rank] += 1
        self._wait("barrier")

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self.group.calls[self.rank] += 1
        if self.rank == src:
            self.group.slots[src] = copy.deepcopy(obj)
        self._wait("broadcast_object")
        result = copy.deepcopy(self.group.slots[src])
        self._wait("broadcast_object")
        return result

    def all_gather_object(self, obj: Any) -> list[Any]:
        self.group.calls[self.rank] += 1
        self.group.slots[self.rank] = copy.deepcopy(obj)
        self._wait("all_gather_object")
        result = copy.deepcopy(self.group.slots)
        self._wait("all_gather_object")
        return result

    def exchange_objects(self, outgoing: dict[int, Any], sources: list[int]) -> dict[int, Any]:
        self.group.calls[self.rank] += 1
        self.group.slots[self.rank] = copy.deepcopy(outgoing)
        self._wait("exchange_objects")
        result = {src: copy.deepcopy(self.group.slots[src][self.rank]) for src in sources}
        self._wait("exchange_objects")
        return result


class GatherOnlyCoordinator(ThreadCoordinator):
    """A coordinator with only the Protocol's collectives (pieces travel by all_gather)."""

    exchange_objects = None  # type: ignore[assignment]


def run_ranks(
    world_size: int,
    work: Callable[[ThreadCoordinator], Any],
    timeout: float = 30.0,
    kind: type[ThreadCoordinator] = ThreadCoordinator,
) -> list[Any]:
    """Run ``work(coordinator)`` on ``world_size`` thread ranks; each rank's result or exception."""
    group = ThreadGroup(world_size, timeout)
    results: list[Any] = [None] * world_size

    def run(rank: int) -> None:
        try:
            results[rank] = work(kind(group, rank))
        except BaseException as exc:  # the others' next collective times out, as in real groups
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,), name=f"rank-{r}") for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout * 4)
        if thread.is_alive():
            raise AssertionError(f"{thread.name} hangs")
    return results
