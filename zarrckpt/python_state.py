"""Saving plain Python and NumPy state: PythonState and NumpyState."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from zarrckpt._dtypes import dtype_name
from zarrckpt.errors import DependencyNameError, DTypeMismatchError, UnsupportedValueError
from zarrckpt.trackable import (
    NoDependency,
    SaveableValue,
    SaveContext,
    Trackable,
    check_compatible,
    wrap_tracked_value,
)
from zarrckpt.variable import VARIABLE_VALUE

__all__ = ["PY_STATE", "NumpyState", "PythonState"]

PY_STATE = "py_state"


class _PythonStateValue(SaveableValue):
    def __init__(self, owner: PythonState) -> None:
        self._owner = owner

    def value(self, context: SaveContext) -> np.ndarray[Any, Any]:
        data = self._owner.serialize()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UnsupportedValueError(
                f"{type(self._owner).__name__}.serialize() must return bytes, "
                f"returned {type(data).__name__}"
            )
        return np.frombuffer(bytes(data), dtype=np.uint8)

    def destination(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], key: str
    ) -> np.ndarray[Any, Any]:
        if dtype != np.uint8 or len(shape) != 1:
            raise DTypeMismatchError(
                f"{key}: Python state must be a 1-d uint8 array, checkpoint has "
                f"{dtype}{list(shape)}"
            )
        return np.empty(shape, np.uint8)

    def commit(self, array: np.ndarray[Any, Any]) -> None:
        self._owner.deserialize(array.tobytes())


class PythonState(Trackable, metaclass=ABCMeta):
    """Mixin for objects whose state is Python data, saved as bytes.

    Subclasses implement :meth:`serialize` and :meth:`deserialize`; the bytes
    are stored under ``<path>/.ATTRIBUTES/py_state`` as a uint8 array. Use a
    data format you trust to parse (JSON, msgpack), never pickle.

    Example:
        >>> class Step(PythonState):
        ...     def __init__(self): self.step = 0
        ...     def serialize(self): return json.dumps(self.step).encode()
        ...     def deserialize(self, data): self.step = json.loads(data)
    """

    @abstractmethod
    def serialize(self) -> bytes:
        """Return this object's state as bytes."""

    @abstractmethod
    def deserialize(self, data: bytes) -> None:
        """Set this object's state from bytes :meth:`serialize` returned."""

    def _saveable_values(self) -> dict[str, SaveableValue]:
        values = super()._saveable_values()
        values[PY_STATE] = _PythonStateValue(self)
        return values


class _NumpyValue(Trackable):
    """Holds one NumpyState attribute: an array (restored in place) or a scalar."""

    def __init__(
        self,
        value: np.ndarray[Any, Any] | np.generic | None,
        attach: Callable[[_NumpyValue], None] | None = None,
    ) -> None:
        # None marks a placeholder created by restore for an attribute the live
        # object does not have yet: it takes whatever shape and dtype was saved,
        # and joins the object (``attach``) only once its value is restored, so
        # a restore that fails leaves no trace.
        self.value = value
        self.attach = attach

    def _saveable_values(self) -> dict[str, SaveableValue]:
        return {VARIABLE_VALUE: _NumpyAttributeValue(self)}

    def __repr__(self) -> str:
        value = self.value
        if value is None:
            return "<NumpyState value: not restored yet>"
        return f"<NumpyState value {value.dtype.name}{list(np.shape(value))}>"


class _NumpyAttributeValue(SaveableValue):
    def __init__(self, holder: _NumpyValue) -> None:
        self._holder = holder

    def value(self, context: SaveContext) -> np.ndarray[Any, Any]:
        if self._holder.value is None:
            raise UnsupportedValueError("a NumpyState attribute was never given a value")
        return np.asarray(self._holder.value)

    def destination(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], key: str
    ) -> np.ndarray[Any, Any]:
        live = self._holder.value
        if live is None:
            return np.empty(shape, dtype)
        live_array = np.asarray(live)
        check_compatible(key, shape, dtype, live_array.shape, live_array.dtype)
        if isinstance(live, np.ndarray) and live.flags.writeable:
            return live
        return np.empty(shape, dtype)

    def commit(self, array: np.ndarray[Any, Any]) -> None:
        holder = self._holder
        live = holder.value
        if live is None or (isinstance(live, np.ndarray) and array is not live):
            holder.value = array
        elif isinstance(live, np.generic):
            holder.value = array[()]
        if holder.attach is not None:
            attach, holder.attach = holder.attach, None
            attach(holder)


class NumpyState(Trackable):
    """A trackable whose NumPy array and NumPy scalar attributes are saved.

    Arrays are restored into their existing memory (shape and dtype must
    match); scalars (``np.float32(1.0)``, ...) are replaced by the saved value.
    Attributes saved in the checkpoint but missing on the live object are
    created by restore. Trackable attributes are tracked as in AutoTrackable.
    Python scalars are not saved: wrap them as ``np.int64(...)``.

    Example:
        >>> state = NumpyState()
        >>> state.step = np.int64(0)
        >>> state.mean = np.zeros(8, np.float32)
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_zc_"):
            object.__setattr__(self, name, value)
            return
        if isinstance(value, np.ndarray | np.generic):
            self._check_value_name(name, "assigned")
            dtype_name(value.dtype)
            holder = self._lookup_dependency(name)
            if isinstance(holder, _NumpyValue):
                holder.value = value
            else:
                self._track_trackable(_NumpyValue(value), name, overwrite=True)
            object.__setattr__(self, name, None)
            return
        if isinstance(value, NoDependency):
            value = value.value
            self._untrack(name)
            self._zc_tracking.silenced.add(name)
        else:
            value = wrap_tracked_value(value)
            if isinstance(value, Trackable):
                self._track_trackable(value, name, overwrite=True)
            else:
                self._untrack(name)
            self._zc_tracking.silenced.discard(name)
        object.__setattr__(self, name, value)

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__"):
            state = object.__getattribute__(self, "__dict__").get("_zc_tracking_state")
            holder = state.dependencies.get(name) if state is not None else None
            if isinstance(holder, _NumpyValue):
                return holder.value
        return object.__getattribute__(self, name)

    def __delattr__(self, name: str) -> None:
        self._untrack(name)
        self._zc_tracking.silenced.discard(name)
        object.__delattr__(self, name)

    def _check_value_name(self, name: str, action: str) -> None:
        """Refuse a saved-value name that would shadow a method, a property or private state."""
        if name.startswith("_") or hasattr(type(self), name):
            what = (
                "starts with '_'"
                if name.startswith("_")
                else (f"is an attribute of class {type(self).__name__} (a method or property)")
            )
            raise DependencyNameError(
                f"NumpyState array {name!r} cannot be {action}: the name {what}. Saved arrays "
                "use public names that the class does not define; wrap a private array in "
                "zc.NoDependency(...) to keep it out of checkpoints."
            )

    def _dependency_for_restore(self, name: str) -> Trackable | None:
        # Saved attributes the live object lacks are created, as TensorFlow does,
        # but never over a method, a property or private state.
        holder = self._lookup_dependency(name)
        if holder is None:
            self._check_value_name(name, "restored from a checkpoint")
            holder = _NumpyValue(None, attach=partial(self._attach_restored, name))
        return holder

    def _attach_restored(self, name: str, holder: _NumpyValue) -> None:
        if self._lookup_dependency(name) is None:  # not assigned meanwhile
            self._track_trackable(holder, name)
            object.__setattr__(self, name, None)
