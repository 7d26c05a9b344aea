"""Trackable objects: the nodes of the object graph a checkpoint saves.

A :class:`Trackable` names its dependencies explicitly with
:meth:`Trackable._track_trackable`; an :class:`AutoTrackable` also tracks every
trackable value assigned to one of its attributes, under the attribute's name.
Objects that hold data expose it through :meth:`Trackable._saveable_values`,
one :class:`SaveableValue` per saved attribute.

A restore that finds a checkpointed dependency the live object does not have
yet leaves a *deferred restoration* on the object: when a dependency of that
name is added later, it receives its saved values at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from zarrckpt.errors import DependencyNameError, DTypeMismatchError, ShapeMismatchError

__all__ = [
    "ArrayWindow",
    "AutoTrackable",
    "NoDependency",
    "SaveContext",
    "SaveableValue",
    "ShardInfo",
    "Trackable",
]

T = TypeVar("T")


class SaveContext:
    """State shared by every value of one save (so a buffer is filled once per save)."""

    def __init__(self) -> None:
        self.cache: dict[int, Any] = {}


@dataclass(frozen=True)
class ShardInfo:
    """Where one process's block lies in a value of ``global_shape``: at ``offset``.

    TensorFlow's ``ShardInfo``: the block ``value[offset[0]:offset[0] + b[0], ...]``
    of the value a distributed save writes and a restore reads.
    """

    global_shape: tuple[int, ...]
    offset: tuple[int, ...]

    def region(self, block_shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The block's part of the global value."""
        return tuple(slice(o, o + b) for o, b in zip(self.offset, block_shape, strict=True))


class _WindowFlags:
    c_contiguous = False  # never addressed directly: every chunk goes through the window
    writeable = True


class ArrayWindow(ABC):
    """An array whose memory the engine cannot address (a GPU tensor), seen one region at a time.

    :meth:`SaveableValue.value` and :meth:`SaveableValue.destination` may
    return one instead of an ndarray. The engine then copies each chunk
    through it: a save reads ``window[region]`` (a host array of that
    region) as it writes the chunk, a restore assigns ``window[region] =
    values`` as it reads one. So the host memory in use is the chunks in
    flight, bounded by ``CheckpointOptions.inflight_bytes``, not the value.
    The engine uses nothing else of it: ``shape``, ``dtype``, ``size``,
    ``nbytes`` and ``flags.c_contiguous`` (false).
    """

    flags = _WindowFlags()

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The shape of the whole array."""

    @property
    @abstractmethod
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the values."""

    @abstractmethod
    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
        """A host array holding ``array[region]``."""

    @abstractmethod
    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray[Any, Any]) -> None:
        """Copy ``values`` into ``array[region]``."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        size = 1
        for n in self.shape:
            size *= n
        return size

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize


class SaveableValue(ABC):
    """One saved attribute of a trackable: how to produce it and where to restore it."""

    def shard(self) -> ShardInfo | None:
        """Where :meth:`value` lies in the saved value, when it is one block of it.

        None (the default): the value is the whole saved value. A sharded value's
        record shape is its global shape, and :meth:`destination` gets that
        shape but returns the block, which a restore fills with its region.
        """
        return None

    @abstractmethod
    def value(self, context: SaveContext) -> np.ndarray[Any, Any]:
        """The array to save (any memory layout; it is not copied when contiguous).

        Or an :class:`ArrayWindow` over memory the engine cannot address.
        """

    @abstractmethod
    def destination(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], key: str
    ) -> np.ndarray[Any, Any]:
        """An array of ``shape`` and ``dtype`` to read the saved value into.

        Raise :class:`ShapeMismatchError` / :class:`DTypeMismatchError` naming
        ``key`` when the saved value cannot be restored here; this runs before
        any byte is read, so a mismatch changes nothing.
        """

    def commit(self, array: np.ndarray[Any, Any]) -> None:  # noqa: B027 - optional hook
        """Called once ``array`` (from :meth:`destination`) holds the saved value."""


class ArrayValue(SaveableValue):
    """A saved value restored in place into an existing array's memory."""

    def __init__(self, get_array: Any, shard: ShardInfo | None = None) -> None:
        self._get_array = get_array
        self._shard = shard

    def shard(self) -> ShardInfo | None:
        return self._shard

    def value(self, context: SaveContext) -> np.ndarray[Any, Any]:
        array: np.ndarray[Any, Any] = self._get_array()
        return array

    def destination(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], key: str
    ) -> np.ndarray[Any, Any]:
        array: np.ndarray[Any, Any] = self._get_array()
        live_shape = array.shape if self._shard is None else self._shard.global_shape
        check_compatible(key, shape, dtype, live_shape, array.dtype)
        if not array.flags.writeable:
            raise ValueError(f"cannot restore {key!r}: the live array is read-only")
        return array


def check_compatible(
    key: str,
    saved_shape: tuple[int, ...],
    saved_dtype: np.dtype[Any],
    live_shape: tuple[int, ...],
    live_dtype: np.dtype[Any],
) -> None:
    """Raise a mismatch error naming ``key`` unless saved and live shape/dtype agree."""
    if tuple(saved_shape) != tuple(live_shape):
        raise ShapeMismatchError(
            f"{key}: checkpoint has shape {tuple(saved_shape)}, live object has "
            f"shape {tuple(live_shape)}"
        )
    if saved_dtype.newbyteorder("=") != live_dtype.newbyteorder("="):
        raise DTypeMismatchError(
            f"{key}: checkpoint has dtype {saved_dtype}, live object has dtype {live_dtype}"
        )


class DeferredRestorer(Protocol):
    """A restore in progress that can finish restoring an object attached later."""

    def restore_deferred(self, node_id: int, obj: Trackable) -> None:
        """Match checkpoint node ``node_id`` to ``obj`` and restore its subtree."""


class _TrackingState:
    __slots__ = ("deferred", "dependencies", "silenced")

    def __init__(self) -> None:
        self.dependencies: dict[str, Trackable] = {}
        self.deferred: dict[str, list[tuple[DeferredRestorer, int]]] = {}
        # Attributes assigned through NoDependency: never reported as unsaved.
        self.silenced: set[str] = set()


class Trackable:
    """Base class of objects that can be saved in a checkpoint.

    Dependencies are explicit: ``self._track_trackable(obj, "name")``. No
    ``__init__`` call is required from subclasses.

    Example:
        >>> class Pair(Trackable):
        ...     def __init__(self, a, b):
        ...         self._track_trackable(a, "a")
        ...         self._track_trackable(b, "b")
    """

    @property
    def _zc_tracking(self) -> _TrackingState:
        try:
            state: _TrackingState = object.__getattribute__(self, "_zc_tracking_state")
        except AttributeError:
            state = _TrackingState()
            object.__setattr__(self, "_zc_tracking_state", state)
        return state

    def _track_trackable(self, trackable: Trackable, name: str, overwrite: bool = False) -> Any:
        """Add ``trackable`` as a dependency named ``name`` and return it.

        Raises :class:`DependencyNameError` when ``name`` already names another
        object and ``overwrite`` is false. Saved values waiting for ``name``
        (deferred restoration) are restored into ``trackable`` now; if that
        fails, the dependency is not added.
        """
        if not isinstance(trackable, Trackable):
            raise TypeError(f"dependency {name!r} must be a Trackable, got {type(trackable)}")
        if not isinstance(name, str):
            raise DependencyNameError(f"dependency names must be str, got {name!r}")
        state = self._zc_tracking
        previous = state.dependencies.get(name)
        if previous is not None and previous is not trackable and not overwrite:
            raise DependencyNameError(
                f"{type(self).__name__} already has a dependency named {name!r} "
                f"({type(previous).__name__}); pass overwrite=True to replace it"
            )
        state.dependencies[name] = trackable
        pending = state.deferred.pop(name, [])
        try:
            for restorer, node_id in pending:
                restorer.restore_deferred(node_id, trackable)
        except BaseException:
            if previous is None:
                del state.dependencies[name]
            else:
                state.dependencies[name] = previous
            state.deferred[name] = pending
            raise
        return trackable

    def _untrack(self, name: str) -> None:
        """Remove the dependency named ``name`` if there is one."""
        self._zc_tracking.dependencies.pop(name, None)

    def _lookup_dependency(self, name: str) -> Trackable | None:
        """The dependency named ``name``, or None."""
        return self._zc_tracking.dependencies.get(name)

    def _dependency_for_restore(self, name: str) -> Trackable | None:
        """The dependency a restore should match to checkpointed child ``name``.

        Defaults to :meth:`_lookup_dependency`; containers that create missing
        entries on restore override it.
        """
        return self._lookup_dependency(name)

    def _checkpoint_dependencies(self) -> list[tuple[str, Trackable]]:
        """This object's dependencies in the order they were added."""
        return list(self._zc_tracking.dependencies.items())

    def _saveable_values(self) -> dict[str, SaveableValue]:
        """The values this object saves itself, by attribute name."""
        return {}

    def _check_saveable(self, path: str) -> None:
        """Raise if this object cannot be saved now (``path`` is for the message)."""

    def _restore_begin(self) -> None:
        """Called when a restore matches this object, before its values and dependencies.

        Objects whose dependencies are computed from outside state (the PyTorch
        adapter's state dicts) take one snapshot of it here for the whole restore.
        """

    def _restore_end(self, completed: bool) -> None:
        """Called once the restore that matched this object has read every value.

        ``completed`` is false when the restore failed (nothing more will be
        read into this object by it): undo what :meth:`_restore_begin` did.
        """

    def __repr__(self) -> str:
        names = [name for name, _ in self._checkpoint_dependencies()]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        return f"<{type(self).__qualname__} dependencies: [{shown}]>"

    def _defer_restoration(self, name: str, restorer: DeferredRestorer, node_id: int) -> None:
        """Remember that dependency ``name`` has saved values waiting for it."""
        self._zc_tracking.deferred.setdefault(name, []).append((restorer, node_id))

    def _zc_type_name(self) -> str:
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"


class NoDependency(Generic[T]):
    """Wrap a value so that assigning it to an AutoTrackable attribute does not track it.

    Example:
        >>> model.cache = NoDependency(other_model)  # stored as is, never saved
    """

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"NoDependency({self.value!r})"


def wrap_tracked_value(value: Any) -> Any:
    """Wrap plain lists and dicts holding data into trackable List / Dict."""
    from zarrckpt.containers import wrap_container

    return wrap_container(value)


class AutoTrackable(Trackable):
    """A Trackable whose trackable attributes are dependencies named after the attribute.

    Lists and dicts assigned to attributes are wrapped as trackable
    :class:`~zarrckpt.List` / :class:`~zarrckpt.Dict` (copies of the original
    containers). Wrap a value in :class:`NoDependency` to store it untracked.

    Example:
        >>> class Dense(AutoTrackable):
        ...     def __init__(self, n, m):
        ...         self.kernel = Variable(np.zeros((n, m), np.float32))
        ...         self.bias = Variable(np.zeros(m, np.float32))
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_zc_"):
            object.__setattr__(self, name, value)
            return
        if isinstance(value, NoDependency):
            self._untrack(name)
            self._zc_tracking.silenced.add(name)
            object.__setattr__(self, name, value.value)
            return
        value = wrap_tracked_value(value)
        if isinstance(value, Trackable):
            self._track_trackable(value, name, overwrite=True)
        elif self._lookup_dependency(name) is not None:
            self._untrack(name)
        self._zc_tracking.silenced.discard(name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self._untrack(name)
        self._zc_tracking.silenced.discard(name)
        object.__delattr__(self, name)
