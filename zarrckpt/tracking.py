"""Managing dependencies: UniqueNameTracker and split_dependency."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from zarrckpt._dtypes import dtype_name
from zarrckpt.errors import DependencyNameError, DTypeMismatchError, UnsupportedValueError
from zarrckpt.trackable import SaveableValue, SaveContext, Trackable
from zarrckpt.variable import VARIABLE_VALUE

__all__ = ["UniqueNameTracker", "split_dependency"]


class UniqueNameTracker(Trackable):
    """Adds dependencies on trackables with name hints, made unique.

    The first object tracked with ``base_name`` is named ``base_name``, the
    next ``base_name_1``, then ``base_name_2``, ...

    Example:
        >>> tracker = UniqueNameTracker()
        >>> tracker.track(Variable(1.0), "x")   # "x"
        >>> tracker.track(Variable(2.0), "x")   # "x_1"
    """

    def __init__(self) -> None:
        self._name_counts: dict[str, int] = {}

    def track(self, trackable: Trackable, base_name: str) -> Trackable:
        """Add ``trackable`` as a dependency named after ``base_name``; return it."""
        if not isinstance(base_name, str):
            raise DependencyNameError(f"base_name must be a str, got {base_name!r}")
        if not isinstance(trackable, Trackable):
            raise TypeError(f"can only track Trackable objects, got {type(trackable).__name__}")
        count = self._name_counts.get(base_name, 0)
        candidate = base_name if count == 0 else f"{base_name}_{count}"
        while self._lookup_dependency(candidate) is not None:
            count += 1
            candidate = f"{base_name}_{count}"
        self._name_counts[base_name] = count + 1
        self._track_trackable(trackable, candidate)
        return trackable

    def __len__(self) -> int:
        return len(self._checkpoint_dependencies())

    def __repr__(self) -> str:
        names = [name for name, _ in self._checkpoint_dependencies()]
        return f"UniqueNameTracker({names})"


class _SplitCoordinator:
    """Fills one save buffer per save and consumes one restore buffer per restore."""

    def __init__(
        self,
        dtypes: Mapping[str, np.dtype[Any]],
        fill_save_buffer_fn: Callable[[dict[str, Any]], None],
        consume_restore_buffer_fn: Callable[[dict[str, np.ndarray[Any, Any]]], None],
    ) -> None:
        self.dtypes = dict(dtypes)
        self.fill = fill_save_buffer_fn
        self.consume = consume_restore_buffer_fn
        self.restored: dict[str, np.ndarray[Any, Any]] = {}

    def saved_component(self, name: str, context: SaveContext) -> np.ndarray[Any, Any]:
        buffer = context.cache.get(id(self))
        if buffer is None:
            filled: dict[str, Any] = {}
            self.fill(filled)
            if set(filled) != set(self.dtypes):
                raise UnsupportedValueError(
                    f"split_dependency: fill_save_buffer_fn filled {sorted(filled)}, "
                    f"expected exactly {sorted(self.dtypes)}"
                )
            buffer = {}
            for component, value in filled.items():
                array = np.asarray(value)
                if array.dtype != self.dtypes[component]:
                    raise DTypeMismatchError(
                        f"split_dependency: component {component!r} has dtype {array.dtype}, "
                        f"declared {self.dtypes[component]}"
                    )
                buffer[component] = array
            context.cache[id(self)] = buffer
        component_value: np.ndarray[Any, Any] = buffer[name]
        return component_value

    def restored_component(self, name: str, array: np.ndarray[Any, Any]) -> None:
        self.restored[name] = array
        if set(self.restored) == set(self.dtypes):
            buffer, self.restored = self.restored, {}
            self.consume(buffer)


class _SplitValue(SaveableValue):
    def __init__(self, coordinator: _SplitCoordinator, name: str) -> None:
        self._coordinator = coordinator
        self._name = name

    def value(self, context: SaveContext) -> np.ndarray[Any, Any]:
        return self._coordinator.saved_component(self._name, context)

    def destination(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], key: str
    ) -> np.ndarray[Any, Any]:
        expected = self._coordinator.dtypes[self._name]
        if dtype != expected:
            raise DTypeMismatchError(f"{key}: checkpoint has dtype {dtype}, declared {expected}")
        return np.empty(shape, dtype)

    def commit(self, array: np.ndarray[Any, Any]) -> None:
        self._coordinator.restored_component(self._name, array)


class _SplitDependency(Trackable):
    def __init__(self, coordinator: _SplitCoordinator, name: str) -> None:
        self._coordinator = coordinator
        self._name = name

    def _saveable_values(self) -> dict[str, SaveableValue]:
        return {VARIABLE_VALUE: _SplitValue(self._coordinator, self._name)}

    def __repr__(self) -> str:
        return f"<split dependency {self._name!r}>"


def split_dependency(
    component_names: Sequence[str],
    component_dtypes: Sequence[npt.DTypeLike],
    fill_save_buffer_fn: Callable[[dict[str, Any]], None],
    consume_restore_buffer_fn: Callable[[dict[str, np.ndarray[Any, Any]]], None],
) -> dict[str, Trackable]:
    """Create dependencies that are saved and restored together through one buffer.

    ``fill_save_buffer_fn(buffer)`` is called once per save and must set
    ``buffer[name]`` for every component name; each component is then saved as
    if it were a variable of its own. ``consume_restore_buffer_fn(buffer)`` is
    called once per restore, when every component has been read, with all of
    them. Returns ``{name: trackable}`` to attach wherever the components
    belong.

    Example:
        >>> deps = split_dependency(["a", "b"], [np.float32, np.float32],
        ...                         lambda buf: buf.update(a=fused[:2], b=fused[2:]),
        ...                         lambda buf: fused.__setitem__(slice(None),
        ...                             np.concatenate([buf["a"], buf["b"]])))
        >>> model.first, model.second = deps["a"], deps["b"]
    """
    names = list(component_names)
    if len(names) != len(component_dtypes) or len(set(names)) != len(names):
        raise DependencyNameError(
            f"split_dependency needs unique names, one per dtype: got {names} and "
            f"{len(component_dtypes)} dtypes"
        )
    dtypes = {}
    for name, dtype in zip(names, component_dtypes, strict=True):
        dtypes[name] = np.dtype(dtype)
        dtype_name(dtypes[name])
    coordinator = _SplitCoordinator(dtypes, fill_save_buffer_fn, consume_restore_buffer_fn)
    return {name: _SplitDependency(coordinator, name) for name in names}
