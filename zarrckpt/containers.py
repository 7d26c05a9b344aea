"""Trackable containers: List and Dict.

Elements that are trackable become dependencies named by their index (``"0"``,
``"1"``, ...) or by their string key. A List's names are positions, so a
mutation that moves, replaces or deletes a trackable element would silently
give a saved value to another object on restore: after such a mutation the
List refuses to be saved (:class:`~zarrckpt.errors.NonAppendMutationError`).
A Dict's names are its keys, so replacing or deleting an entry renames nothing
and is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping, MutableSequence
from typing import Any, SupportsIndex, overload

from zarrckpt.errors import DependencyNameError, NonAppendMutationError
from zarrckpt.trackable import NoDependency, Trackable, wrap_tracked_value

__all__ = ["Dict", "List", "wrap_container"]


def wrap_container(value: Any) -> Any:
    """Turn a plain ``list`` / ``dict`` into a trackable List / Dict; other values pass.

    The container holds a copy; the plain one is watched, so that changing it
    afterwards (which the copy would not see) makes a save raise instead of
    silently leaving out what was added to it.
    """
    if type(value) is list:
        wrapped: List | Dict = List(value)
    elif type(value) is dict:
        wrapped = Dict(value)
    else:
        return value
    wrapped._zc_source = _Source(value)
    return wrapped


class _Source:
    """The plain list or dict a container was made from, as it was then."""

    def __init__(self, value: list[Any] | dict[Any, Any]) -> None:
        self.value = value
        self.snapshot: list[Any] | dict[Any, Any] = value.copy()

    def changed_trackables(self) -> bool:
        """Whether it changed since, and a Trackable is or was in it."""
        now, then = self.value, self.snapshot
        if isinstance(now, dict) and isinstance(then, dict):
            same = now.keys() == then.keys() and all(now[k] is then[k] for k in now)
            values = [*now.values(), *then.values()]
        else:
            same = len(now) == len(then) and all(a is b for a, b in zip(now, then, strict=False))
            values = [*now, *then]
        return not same and any(isinstance(v, Trackable) for v in values)

    def check(self, path: str) -> None:
        if self.changed_trackables():
            kind = type(self.value).__name__
            raise NonAppendMutationError(
                f"cannot save {path or '<root>'!r}: the plain {kind} assigned there was "
                f"changed afterwards, but the attribute holds a tracked copy made at the "
                f"assignment, so the change would not be saved. Change it through the "
                f"attribute (obj.attr.append(...), obj.attr[key] = ...) or assign the "
                f"{kind} again."
            )


def _unwrap(value: Any) -> tuple[Any, bool]:
    """The value to store, and whether it is a dependency (NoDependency: stored untracked)."""
    if isinstance(value, NoDependency):
        return value.value, False
    value = wrap_tracked_value(value)
    return value, isinstance(value, Trackable)


class List(Trackable, MutableSequence[Any]):
    """A list whose trackable elements are dependencies named by their index.

    Appending (``append``, ``extend``, ``+=``) is always safe. Replacing,
    deleting, inserting before or reordering trackable elements marks the list
    as mutated and makes a later save raise, because restore matches values by
    position.

    Example:
        >>> layers = List([Variable(np.zeros(2)), Variable(np.ones(2))])
        >>> layers.append(Variable(np.full(2, 2.0)))   # saved as "2"
    """

    def __init__(self, values: Iterable[Any] = ()) -> None:
        self._storage: list[Any] = []
        # Per position, whether the element was stored through NoDependency: kept
        # beside the elements (never by id, which Python reuses once an object dies).
        self._silenced: list[bool] = []
        self._non_append_mutation: str | None = None
        self._zc_source: _Source | None = None  # see wrap_container
        self.extend(values)

    def _pairs(self) -> Iterator[tuple[Any, bool]]:
        return zip(self._storage, self._silenced, strict=True)

    @staticmethod
    def _counts(value: Any, silenced: bool) -> bool:
        return isinstance(value, Trackable) and not silenced

    def _holds_trackable(self, *extra: tuple[Any, bool]) -> bool:
        return any(self._counts(v, s) for v, s in (*self._pairs(), *extra))

    def _store(self, value: Any) -> tuple[Any, bool]:
        """The element to store and whether it is silenced (NoDependency)."""
        silenced = isinstance(value, NoDependency)
        value, _ = _unwrap(value)
        return value, silenced

    def _unsaved_items(self) -> list[tuple[int, Any]]:
        """(index, element) of the elements that are not silenced, for the save warning."""
        return [(i, v) for i, (v, s) in enumerate(self._pairs()) if not s]

    def _mark_mutated(self, operation: str, *extra: tuple[Any, bool]) -> None:
        if self._holds_trackable(*extra) and self._non_append_mutation is None:
            self._non_append_mutation = operation

    def _retrack(self) -> None:
        state = self._zc_tracking
        state.dependencies.clear()
        for index, (value, silenced) in enumerate(self._pairs()):
            if self._counts(value, silenced):
                state.dependencies[str(index)] = value

    # Appending -------------------------------------------------------------

    def append(self, value: Any) -> None:
        value, silenced = self._store(value)
        index = len(self._storage)
        self._storage.append(value)
        self._silenced.append(silenced)
        if self._counts(value, silenced):
            try:
                self._track_trackable(value, str(index))
            except BaseException:
                self._storage.pop()
                self._silenced.pop()
                raise

    def extend(self, values: Iterable[Any]) -> None:
        for value in values:
            self.append(value)

    def __iadd__(self, values: Iterable[Any]) -> List:
        self.extend(values)
        return self

    # Mutations that rename ---------------------------------------------------

    @overload
    def __setitem__(self, index: SupportsIndex, value: Any) -> None: ...
    @overload
    def __setitem__(self, index: slice, value: Iterable[Any]) -> None: ...
    def __setitem__(self, index: SupportsIndex | slice, value: Any) -> None:
        if isinstance(index, slice):
            new = [self._store(v) for v in value]
            self._mark_mutated("slice assignment", *new)
            values = [v for v, _ in new]
            self._storage[index] = values  # raises (changing nothing) on a bad length
            self._silenced[index] = [s for _, s in new]
        else:
            new_value, silenced = self._store(value)
            if self._storage[index] is not new_value:
                self._mark_mutated("item replacement", (new_value, silenced))
            self._storage[index] = new_value
            self._silenced[index] = silenced
        self._retrack()

    def __delitem__(self, index: SupportsIndex | slice) -> None:
        self._mark_mutated("deletion")
        del self._storage[index]
        del self._silenced[index]
        self._retrack()

    def insert(self, index: SupportsIndex, value: Any) -> None:
        if int(index) >= len(self._storage):
            self.append(value)
            return
        stored = self._store(value)
        self._mark_mutated("insert", stored)
        self._storage.insert(index, stored[0])
        self._silenced.insert(index, stored[1])
        self._retrack()

    def sort(self, *, key: Any = None, reverse: bool = False) -> None:
        self._mark_mutated("sort")
        order = list(range(len(self._storage)))
        items = self._storage
        order.sort(key=(lambda i: key(items[i])) if key else (lambda i: items[i]), reverse=reverse)
        self._storage[:] = [items[i] for i in order]
        self._silenced[:] = [self._silenced[i] for i in order]
        self._retrack()

    def reverse(self) -> None:
        self._mark_mutated("reverse")
        self._storage.reverse()
        self._silenced.reverse()
        self._retrack()

    # Reading ----------------------------------------------------------------

    @overload
    def __getitem__(self, index: SupportsIndex) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: SupportsIndex | slice) -> Any:
        return self._storage[index]

    def __len__(self) -> int:
        return len(self._storage)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._storage)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, List):
            return self._storage == other._storage
        return self._storage == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"List({self._storage!r})"

    def _check_saveable(self, path: str) -> None:
        if self._zc_source is not None:
            self._zc_source.check(path)
        if self._non_append_mutation is not None:
            raise NonAppendMutationError(
                f"cannot save the List at {path or '<root>'!r}: a trackable element was "
                f"moved, replaced or deleted ({self._non_append_mutation}). List "
                "dependencies are named by position, so restoring would give saved "
                "values to the wrong objects. Build a new List (or use a Dict) instead."
            )


class Dict(Trackable, MutableMapping[Any, Any]):
    """A dict whose trackable values are dependencies named by their string key.

    Keys of trackable values must be strings (checked when the value is set).

    Example:
        >>> heads = Dict(policy=Variable(np.zeros(4)), value=Variable(np.zeros(1)))
    """

    def __init__(self, *args: Mapping[Any, Any] | Iterable[tuple[Any, Any]], **kwargs: Any) -> None:
        self._storage: dict[Any, Any] = {}
        self._silenced: set[Any] = set()  # keys set through NoDependency
        self._zc_source: _Source | None = None  # see wrap_container
        self.update(*args, **kwargs)

    def _check_saveable(self, path: str) -> None:
        if self._zc_source is not None:
            self._zc_source.check(path)

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, NoDependency):
            self._silenced.add(key)
        else:
            self._silenced.discard(key)
        value, tracked = _unwrap(value)
        if tracked:
            if not isinstance(key, str):
                raise DependencyNameError(
                    f"Dict keys of trackable values must be str (they name the dependency); "
                    f"got {type(key).__name__} key {key!r}"
                )
            self._track_trackable(value, key, overwrite=True)
        elif isinstance(key, str):
            self._untrack(key)
        self._storage[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._storage[key]
        self._silenced.discard(key)
        if isinstance(key, str):
            self._untrack(key)

    def __getitem__(self, key: Any) -> Any:
        return self._storage[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._storage)

    def __len__(self) -> int:
        return len(self._storage)

    def __repr__(self) -> str:
        return f"Dict({self._storage!r})"
