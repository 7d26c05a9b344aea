"""The one exception tree of zarrckpt.

Every error raised on purpose by zarrckpt derives from :class:`ZarrckptError`.
Each also derives from the builtin exception a caller would naturally catch
(``KeyError`` for a missing key, ``ValueError`` for bad input, ...), so code
may catch either. Messages name the path, the key and what was expected
versus what was found.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "AsyncSaveError",
    "CheckpointExistsError",
    "ChecksumError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DependencyNameError",
    "DistributedError",
    "DistributedRestoreError",
    "DistributedSaveError",
    "DTypeMismatchError",
    "ConcurrentWriterError",
    "FormatVersionError",
    "IncompleteSaveError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "MatchError",
    "MissingChunkError",
    "MissingDependencyError",
    "NonAppendMutationError",
    "RecordError",
    "ShapeMismatchError",
    "UnmatchedValuesWarning",
    "UnsavedValueWarning",
    "UnsupportedDTypeError",
    "UnsupportedValueError",
    "VariableNotFoundError",
    "ZarrckptError",
    "caller_location",
    "caller_module",
]


class ZarrckptError(Exception):
    """Base class of every error zarrckpt raises on purpose."""


class CheckpointNotFoundError(ZarrckptError, FileNotFoundError):
    """The path holds no committed zarrckpt checkpoint."""


class CheckpointExistsError(ZarrckptError, FileExistsError):
    """A checkpoint already exists where a new one was to be written."""


class ConcurrentWriterError(CheckpointExistsError):
    """Another process saves checkpoints of the same name in the same directory.

    One checkpoint name in one directory has one writer; the message names the
    other writer (host, process) and the directory.
    """


class IncompleteSaveError(ZarrckptError, OSError):
    """Files a save wrote vanished or changed before it committed; nothing was committed."""


class VariableNotFoundError(ZarrckptError, KeyError):
    """The checkpoint has no saved value under the key asked for."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class CorruptCheckpointError(ZarrckptError, ValueError):
    """A checkpoint's bytes are not what its format and manifest promise."""


class ChecksumError(CorruptCheckpointError):
    """A chunk's stored CRC32C does not match its bytes."""


class MissingChunkError(CorruptCheckpointError):
    """A chunk file every committed checkpoint must hold is absent."""


class RecordError(CorruptCheckpointError):
    """The object-graph record is truncated, malformed or inconsistent."""


class FormatVersionError(ZarrckptError, ValueError):
    """The checkpoint was written in a format version this zarrckpt cannot read."""


class MissingDependencyError(ZarrckptError, ImportError):
    """A package a path's storage needs is not installed (s3fs for ``s3://``, say).

    The message names what to install, e.g. ``pip install 'zarrckpt[s3]'``.
    """


class InvalidArgumentError(ZarrckptError, ValueError, TypeError):
    """An argument has a value or type the function cannot take; nothing was changed.

    Also a ``ValueError`` and a ``TypeError``, so either catches it.
    """


class InvalidKeyError(ZarrckptError, ValueError):
    """A key or name would escape the checkpoint or is not a valid component."""


class UnsupportedDTypeError(ZarrckptError, TypeError):
    """A value's dtype cannot be stored in a checkpoint."""


class UnsupportedValueError(ZarrckptError, TypeError):
    """A value of a type zarrckpt cannot save was given where an array was needed."""


class ShapeMismatchError(ZarrckptError, ValueError):
    """A saved value's shape differs from the live object's."""


class DTypeMismatchError(ZarrckptError, TypeError):
    """A saved value's dtype differs from the live object's."""


class DependencyNameError(ZarrckptError, ValueError):
    """A dependency name is invalid or already names another object."""


class NonAppendMutationError(ZarrckptError, ValueError):
    """A tracked list was mutated in a way that renames its dependencies."""


class DistributedError(ZarrckptError, RuntimeError):
    """A collective operation of several ranks failed; ``failures`` maps rank to its error text.

    Every rank that is still alive raises the same error (same message), so no
    rank goes on training while another gave up. A rank that died or stopped
    answering within the coordinator's timeout is named with what its peers saw.
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[int, str] = dict(failures or {})


class DistributedSaveError(DistributedError):
    """A distributed save failed on one or more ranks; no checkpoint was committed."""


class DistributedRestoreError(DistributedError):
    """A distributed restore failed on one or more ranks (every rank raises it)."""


class AsyncSaveError(ZarrckptError, RuntimeError):
    """A background (``enable_async``) save failed; nothing of it was committed.

    Raised by the next ``save()``, ``write()`` or ``wait_until_finished()``
    after the failure, which therefore did not start anything itself.
    ``path`` is the checkpoint that was not committed; the original error is
    the ``__cause__``.
    """

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class MatchError(ZarrckptError, AssertionError):
    """A restore status assertion failed: checkpoint and live objects differ."""


class UnmatchedValuesWarning(UserWarning):
    """Some checkpointed values were never matched to a live object."""


class UnsavedValueWarning(UserWarning):
    """A save left out state it cannot track: arrays, numbers or tuples in plain attributes.

    Only trackables are dependencies (as in TensorFlow); a numpy array, a
    number or a tuple holding them in an attribute is not saved. Raised once
    per save, naming every such attribute and pointing at the caller's line.
    """


def caller_module() -> str:
    """The module name of the first frame outside zarrckpt (``module=`` of warn_explicit).

    With it, ``warnings.filterwarnings(..., module="mytrainer")`` matches a
    warning zarrckpt points at the user's code.
    """
    frame = sys._getframe(1)
    package = os.path.dirname(__file__)
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith("<")
        or os.path.dirname(frame.f_code.co_filename) == package
    ):
        frame = frame.f_back
    return str(frame.f_globals.get("__name__", "__main__"))


def caller_location() -> tuple[str, int]:
    """File and line of the first frame outside zarrckpt: where to point a warning.

    For ``warnings.warn_explicit``: a warning raised deep in a save or restore,
    or when a status is collected, then names the user's call.
    """
    frame = sys._getframe(1)
    package = os.path.dirname(__file__)

    def ours(filename: str) -> bool:  # zarrckpt's own, or generated (a dataclass __init__)
        return filename.startswith("<") or os.path.dirname(filename) == package

    while frame.f_back is not None and ours(frame.f_code.co_filename):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno
