"""Coordinators: how the ranks of a distributed save exchange small objects.

A coordinator carries plans, attempt names, file lists and outcomes between
ranks: every rank calls the same collective in the same order. Every
collective has a timeout, so a rank that died or hangs makes the others raise
:class:`~zarrckpt.errors.DistributedError` instead of waiting for ever.

torch and mpi4py are imported only when their coordinator is created, never by
``import zarrckpt``.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Protocol, runtime_checkable

from zarrckpt.errors import DistributedError, InvalidArgumentError, MissingDependencyError

__all__ = [
    "DEFAULT_TIMEOUT",
    "Coordinator",
    "LocalCoordinator",
    "MPICoordinator",
    "TorchCoordinator",
    "exchange_objects",
]

DEFAULT_TIMEOUT = 600.0  # seconds; a save of many GiB per rank between two collectives fits


@runtime_checkable
class Coordinator(Protocol):
    """The collectives a distributed save needs; every rank calls each one in the same order.

    Implementations raise :class:`~zarrckpt.errors.DistributedError` when a
    collective fails or times out (a rank died, or never arrived). They may
    also offer ``exchange_objects(outgoing, sources)`` (see
    :func:`exchange_objects`) to send objects point to point; the
    coordinators here do, and any other works without it.
    """

    @property
    def rank(self) -> int:
        """This process's rank, 0 to ``world_size - 1``."""
        ...

    @property
    def world_size(self) -> int:
        """The number of ranks."""
        ...

    def barrier(self) -> None:
        """Return once every rank has called it."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj``, on every rank."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, indexed by rank, on every rank."""
        ...


def exchange_objects(
    coordinator: Coordinator, outgoing: dict[int, Any], sources: list[int]
) -> dict[int, Any]:
    """Send ``outgoing[dst]`` to each rank ``dst``; return ``{src: object}`` from ``sources``.

    Every rank calls it; ``sources`` are the ranks that send to this one
    (known from an earlier gather). A coordinator with an ``exchange_objects``
    method sends point to point, so each rank receives only its own objects;
    any other coordinator falls back to ``all_gather_object``, where every
    rank receives everything.
    """
    method = getattr(coordinator, "exchange_objects", None)
    if method is not None:
        received: dict[int, Any] = method(outgoing, sources)
        return received
    gathered = coordinator.all_gather_object(outgoing)
    return {src: gathered[src][coordinator.rank] for src in sources}


class LocalCoordinator:
    """One process alone: rank 0 of 1 (the default wherever a coordinator is optional)."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        """Nothing to wait for."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` itself."""
        if src != 0:
            raise InvalidArgumentError(f"LocalCoordinator has only rank 0, not src={src}")
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``[obj]``."""
        return [obj]

    def exchange_objects(self, outgoing: dict[int, Any], sources: list[int]) -> dict[int, Any]:
        """What this rank sends itself."""
        return {src: outgoing[0] for src in sources}

    def __repr__(self) -> str:
        return "<zarrckpt LocalCoordinator rank 0 of 1>"


def _seconds(timeout: float | datetime.timedelta) -> float:
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(seconds)


class TorchCoordinator:
    """Collectives over ``torch.distributed``, on a gloo group of its own.

    ``torch.distributed.init_process_group`` must have been called (any
    backend: NCCL jobs work, since objects travel over the coordinator's own
    gloo group, created here with ``timeout``). Every rank of the default
    group must create the coordinator at the same point (``new_group`` is
    collective). ``group`` limits it to the ranks of that group; ``rank`` and
    ``world_size`` are then positions in it.

    Example:
        >>> torch.distributed.init_process_group("nccl")
        >>> coordinator = TorchCoordinator(timeout=300)
        >>> ckpt.save("/shared/run/ckpt", coordinator=coordinator)
    """

    def __init__(self, group: Any = None, timeout: float | datetime.timedelta = DEFAULT_TIMEOUT):
        try:
            import torch.distributed as dist
        except ImportError as exc:  # pragma: no cover - the test extra installs torch
            raise MissingDependencyError("TorchCoordinator needs torch: pip install torch") from exc
        if not dist.is_available() or not dist.is_initialized():
            raise InvalidArgumentError(
                "TorchCoordinator needs torch.distributed initialized first "
                "(torch.distributed.init_process_group, or run under torchrun)"
            )
        self.timeout = _seconds(timeout)
        self._dist = dist
        ranks = None if group is None else list(dist.get_process_group_ranks(group))
        self._group = dist.new_group(
            ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=self.timeout)
        )
        self._global_ranks = ranks if ranks is not None else list(range(dist.get_world_size()))
        self._rank = self._global_ranks.index(dist.get_rank())
        self._broken: str | None = None  # the failure that made the group unusable

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return len(self._global_ranks)

    def _failed(self, operation: str, exc: BaseException) -> DistributedError:
        self._broken = f"{operation} failed ({exc})"
        return DistributedError(
            f"rank {self._rank}: {operation} over torch.distributed failed ({exc}); "
            f"a rank died or did not arrive within {self.timeout:g} s"
        )

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise DistributedError(
                f"rank {self._rank}: this TorchCoordinator is unusable since an earlier "
                f"collective {self._broken}; the ranks no longer agree on where they are"
            )

    def barrier(self) -> None:
        self._check_usable()
        try:
            self._dist.monitored_barrier(
                group=self._group,
                timeout=datetime.timedelta(seconds=self.timeout),
                wait_all_ranks=True,
            )
        except Exception as exc:
            raise self._failed("barrier", exc) from exc

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        self._check_usable()
        holder = [obj if self._rank == src else None]
        try:
            self._dist.broadcast_object_list(holder, src=self._global_ranks[src], group=self._group)
        except Exception as exc:
            raise self._failed("broadcast_object", exc) from exc
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        self._check_usable()
        gathered: list[Any] = [None] * self.world_size
        try:
            self._dist.all_gather_object(gathered, obj, group=self._group)
        except Exception as exc:
            raise self._failed("all_gather_object", exc) from exc
        return gathered

    def exchange_objects(self, outgoing: dict[int, Any], sources: list[int]) -> dict[int, Any]:
        """Point to point: every (sender, receiver) pair in one global order.

        Each rank takes part only in its own pairs, in ascending (sender,
        receiver) order; the smallest pair not done yet always has both ends
        ready, so the exchange cannot deadlock.
        """
        self._check_usable()
        me = self._rank
        pairs = sorted(
            [(me, dst) for dst in outgoing if dst != me]
            + [(src, me) for src in sources if src != me]
        )
        received: dict[int, Any] = {}
        if me in sources:
            received[me] = outgoing[me]
        try:
            for src, dst in pairs:
                if src == me:
                    self._dist.send_object_list(
                        [outgoing[dst]], dst=self._global_ranks[dst], group=self._group
                    )
                else:
                    holder: list[Any] = [None]
                    self._dist.recv_object_list(
                        holder, src=self._global_ranks[src], group=self._group
                    )
                    received[src] = holder[0]
        except Exception as exc:
            raise self._failed("exchange_objects", exc) from exc
        return received

    def __repr__(self) -> str:
        return (
            f"<zarrckpt TorchCoordinator rank {self._rank} of {self.world_size}, "
            f"timeout {self.timeout:g} s>"
        )


class MPICoordinator:
    """Collectives over an MPI communicator (``mpi4py``; default ``COMM_WORLD``, duplicated).

    MPI's collectives cannot time out, so these are built from non-blocking
    point-to-point messages, each waited for until ``timeout``: a gather is
    every rank sending to rank 0, which answers every rank; a broadcast is
    the source sending to every rank; an exchange sends straight to each
    receiver. A rank that died or never arrives makes the others raise
    :class:`~zarrckpt.errors.DistributedError`, never hang. Messages carry
    the collective's sequence number as their tag, so a rank that arrives
    late never takes a message of another collective. After a timeout the
    coordinator refuses every further collective: end the job then
    (``MPI.COMM_WORLD.Abort``), as the ranks no longer agree on where they are.

    Example:
        >>> coordinator = MPICoordinator()       # under mpiexec -n 4 python train.py
        >>> ckpt.save("/shared/run/ckpt", coordinator=coordinator)
    """

    _TAGS = 30000  # MPI guarantees tags up to 32767

    def __init__(self, comm: Any = None, timeout: float | datetime.timedelta = DEFAULT_TIMEOUT):
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - the test extra installs mpi4py
            raise MissingDependencyError(
                "MPICoordinator needs mpi4py: pip install mpi4py mpich"
            ) from exc
        self.timeout = _seconds(timeout)
        self._comm = (comm if comm is not None else MPI.COMM_WORLD).Dup()
        self._rank: int = self._comm.Get_rank()
        self._size: int = self._comm.Get_size()
        self._broken: str | None = None
        self._sequence = 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._size

    def _start(self, operation: str) -> tuple[int, float, list[Any]]:
        """A new collective: its tag, its deadline and a list for its sends."""
        if self._broken is not None:
            raise DistributedError(
                f"rank {self._rank}: this MPICoordinator is unusable since {self._broken}; "
                "end the job (MPI.COMM_WORLD.Abort) rather than go on"
            )
        self._sequence = self._sequence % self._TAGS + 1
        return self._sequence, time.monotonic() + self.timeout, []

    def _timed_out(self, operation: str, waiting_for: str) -> DistributedError:
        self._broken = f"{operation} timed out after {self.timeout:g} s"
        return DistributedError(
            f"rank {self._rank}: {operation} over MPI: {waiting_for} did not arrive within "
            f"{self.timeout:g} s (a rank died or hangs)"
        )

    def _receive(self, source: int, tag: int, deadline: float, operation: str) -> Any:
        pause = 1e-4
        while not self._comm.iprobe(source=source, tag=tag):
            if time.monotonic() > deadline:
                raise self._timed_out(operation, f"rank {source}")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        return self._comm.recv(source=source, tag=tag)

    def _finish(self, sends: list[Any], deadline: float, operation: str) -> None:
        pause = 1e-4
        for request in sends:
            while not request.Test():
                if time.monotonic() > deadline:
                    raise self._timed_out(operation, "a receiver")
                time.sleep(pause)
                pause = min(pause * 2, 0.01)

    def barrier(self) -> None:
        self.all_gather_object(None)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        tag, deadline, sends = self._start("broadcast_object")
        if self._rank == src:
            for rank in range(self._size):
                if rank != src:
                    sends.append(self._comm.isend(obj, dest=rank, tag=tag))
            self._finish(sends, deadline, "broadcast_object")
            return obj
        return self._receive(src, tag, deadline, "broadcast_object")

    def all_gather_object(self, obj: Any) -> list[Any]:
        tag, deadline, sends = self._start("all_gather_object")
        if self._rank != 0:
            sends.append(self._comm.isend(obj, dest=0, tag=tag))
            gathered: list[Any] = self._receive(0, tag, deadline, "all_gather_object")
            self._finish(sends, deadline, "all_gather_object")
            return gathered
        gathered = [obj] + [
            self._receive(rank, tag, deadline, "all_gather_object") for rank in range(1, self._size)
        ]
        for rank in range(1, self._size):
            sends.append(self._comm.isend(gathered, dest=rank, tag=tag))
        self._finish(sends, deadline, "all_gather_object")
        return gathered

    def exchange_objects(self, outgoing: dict[int, Any], sources: list[int]) -> dict[int, Any]:
        """Point to point: each rank receives only its own objects."""
        tag, deadline, sends = self._start("exchange_objects")
        for rank, obj in outgoing.items():
            if rank != self._rank:
                sends.append(self._comm.isend(obj, dest=rank, tag=tag))
        received = {
            src: outgoing[src]
            if src == self._rank
            else self._receive(src, tag, deadline, "exchange_objects")
            for src in sources
        }
        self._finish(sends, deadline, "exchange_objects")
        return received

    def __repr__(self) -> str:
        return (
            f"<zarrckpt MPICoordinator rank {self.rank} of {self.world_size}, "
            f"timeout {self.timeout:g} s>"
        )
