"""CheckpointOptions: how a save or restore uses the disk, the network and memory."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from zarrckpt.codecs import Compression
from zarrckpt.errors import InvalidArgumentError

__all__ = ["CheckpointOptions"]

MiB = 1 << 20


@dataclass(frozen=True)
class CheckpointOptions:
    """Tuning for one save or restore; pass as ``options=`` (TensorFlow's name).

    Attributes:
        chunk_bytes: target size of one chunk (chunks split leading axes only).
        threads: chunk reads/writes running at once.
        inflight_bytes: at most this many chunk bytes are being read, written
            or encoded at once, which bounds the extra memory of a save or
            restore whatever the model size (a chunk larger than the budget
            runs alone).
        fsync: make every file durable before the checkpoint is committed.
        compression: ``{key pattern: Compression}``; the first ``fnmatch``
            pattern matching an array's key picks its compressor. None by
            default: float data gains little and pays time.
        progress: called with the size in bytes of each file once it is written
            or read (from the I/O threads, so it must be thread-safe); for
            progress bars. The sizes of one save or restore add up to
            ``IOStats.nbytes``. In an async save it runs in the background,
            and an error it raises fails that save (reported by the next call).
        enable_async: ``save()`` / ``write()`` return once every value is
            copied into the checkpoint's host staging pool; writing, fsync and
            the commit run in the background (TensorFlow's
            ``experimental_enable_async_checkpoint``). See
            :meth:`Checkpoint.wait_until_finished`.
        staging_bytes: with ``enable_async``, the most host memory the staging
            pool may hold (None: as much as the save needs). Values that do not
            fit are written before ``save()`` returns.

    Example:
        >>> opts = CheckpointOptions(inflight_bytes=64 << 20,
        ...                          compression={"*embedding*": Zstd(level=3)})
        >>> ckpt.save(prefix, options=opts)
    """

    chunk_bytes: int = 32 * MiB
    threads: int = 8
    inflight_bytes: int = 256 * MiB
    fsync: bool = True
    compression: Mapping[str, Compression] = field(default_factory=dict)
    progress: Callable[[int], None] | None = field(default=None, compare=False)
    enable_async: bool = False
    staging_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("chunk_bytes", "threads", "inflight_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(
                    f"CheckpointOptions.{name} must be a positive int, got {value!r}"
                )
        for name in ("fsync", "enable_async"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(
                    f"CheckpointOptions.{name} must be a bool, got {getattr(self, name)!r}"
                )
        staging = self.staging_bytes
        if staging is not None and (
            not isinstance(staging, int) or isinstance(staging, bool) or staging < 0
        ):
            raise InvalidArgumentError(
                f"CheckpointOptions.staging_bytes must be None or an int >= 0, got {staging!r}"
            )
        if not isinstance(self.compression, Mapping):
            raise InvalidArgumentError(
                "CheckpointOptions.compression maps key patterns to Compression objects, "
                f"e.g. {{'*embedding*': Zstd()}}; got {self.compression!r}"
            )
        for pattern, codec in self.compression.items():
            if not isinstance(pattern, str) or not isinstance(codec, Compression):
                raise InvalidArgumentError(
                    f"CheckpointOptions.compression maps key patterns to Compression objects "
                    f"(Zstd(), BloscLZ4()); got {pattern!r}: {codec!r}"
                )
        if self.progress is not None and not callable(self.progress):
            raise InvalidArgumentError(
                f"CheckpointOptions.progress must be callable, got {self.progress!r}"
            )

    def compression_for(self, key: str) -> Compression | None:
        """The compressor for the array at ``key`` (None: stored raw)."""
        for pattern, codec in self.compression.items():
            if fnmatch.fnmatchcase(key, pattern):
                return codec
        return None
