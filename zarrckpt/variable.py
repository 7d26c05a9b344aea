"""Variable: a mutable n-d array whose memory a restore writes into."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from zarrckpt._dtypes import dtype_name
from zarrckpt.errors import InvalidArgumentError, ShapeMismatchError
from zarrckpt.trackable import ArrayValue, SaveableValue, Trackable

__all__ = ["VARIABLE_VALUE", "Variable", "capture_dependencies"]

VARIABLE_VALUE = "VARIABLE_VALUE"

# The templates of the enclosing capture_dependencies() blocks, innermost last.
# A context variable (not a module global) so threads and tasks do not share it.
_capture_stack: contextvars.ContextVar[tuple[Trackable, ...]] = contextvars.ContextVar(
    "zarrckpt_capture_stack", default=()
)


class Variable(Trackable):
    """A mutable n-d array held in numpy memory; the unit a checkpoint saves.

    By default the initial value is copied into a new C-contiguous buffer that
    the variable owns for its whole life. With ``copy=False`` the variable
    adopts ``initial_value`` itself as that buffer (no second copy of a large
    array): it must then be a writeable, C-contiguous, native-byte-order
    ``numpy.ndarray``, and anything else is refused with the reason.
    :meth:`assign` and restore write into the buffer, and :meth:`numpy`
    returns it (the live buffer, not a copy).

    Example:
        >>> v = Variable(np.zeros((2, 3), np.float32), name="kernel")
        >>> v.assign(np.ones((2, 3)))
        >>> v.numpy().sum()
        6.0
        >>> weights = np.zeros(1024, np.float32)
        >>> Variable(weights, copy=False).numpy() is weights
        True
    """

    def __init__(
        self,
        initial_value: npt.ArrayLike,
        name: str | None = None,
        dtype: npt.DTypeLike | None = None,
        copy: bool = True,
    ) -> None:
        if copy:
            value = np.array(initial_value, dtype=dtype, order="C", copy=True)
            dtype_name(value.dtype)  # refuse unsupported dtypes at creation, not at save
            if not value.dtype.isnative:
                value = value.astype(value.dtype.newbyteorder("="))
        else:
            value = _adoptable(initial_value, dtype, name)
        self._value: np.ndarray[Any, Any] = value
        self.name = name
        if name is not None:
            for template in _capture_stack.get()[-1:]:
                template._track_trackable(self, name)

    def numpy(self) -> np.ndarray[Any, Any]:
        """The live buffer (not a copy): writes to it change the variable."""
        return self._value

    def assign(self, value: npt.ArrayLike) -> Variable:
        """Copy ``value`` into the variable's memory; its shape must match exactly."""
        array = np.asarray(value)
        if array.shape != self._value.shape:
            where = f"variable {self.name!r}" if self.name else "variable"
            raise ShapeMismatchError(
                f"cannot assign shape {array.shape} to {where} of shape {self._value.shape}"
            )
        np.copyto(self._value, array, casting="same_kind")
        return self

    def assign_add(self, delta: npt.ArrayLike) -> Variable:
        """Add ``delta`` in place."""
        return self.assign(self._value + np.asarray(delta))

    def assign_sub(self, delta: npt.ArrayLike) -> Variable:
        """Subtract ``delta`` in place."""
        return self.assign(self._value - np.asarray(delta))

    @property
    def shape(self) -> tuple[int, ...]:
        """The variable's shape."""
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The variable's numpy dtype."""
        dtype: np.dtype[Any] = self._value.dtype
        return dtype

    @property
    def nbytes(self) -> int:
        """Size of the value in bytes."""
        return int(self._value.nbytes)

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> Any:
        if dtype is None and not copy:
            return self._value
        return np.array(self._value, dtype=dtype, copy=True)

    def __int__(self) -> int:
        return int(self._value)

    def __float__(self) -> float:
        return float(self._value)

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        body = np.array2string(self._value, threshold=6, edgeitems=2, separator=", ")
        body = " ".join(body.split())  # one line, whatever the rank
        return f"<zarrckpt.Variable{name} shape={self.shape} dtype={self.dtype.name} {body}>"

    def _saveable_values(self) -> dict[str, SaveableValue]:
        return {VARIABLE_VALUE: ArrayValue(self.numpy)}


def _adoptable(
    initial_value: Any, dtype: npt.DTypeLike | None, name: str | None
) -> np.ndarray[Any, Any]:
    """``initial_value`` itself, if a Variable can use it as its buffer; else why not."""
    where = f"Variable(name={name!r}, copy=False)" if name else "Variable(copy=False)"
    fix = "pass copy=True (the default) to let the variable copy it"
    if not isinstance(initial_value, np.ndarray) or isinstance(initial_value, np.ma.MaskedArray):
        raise InvalidArgumentError(
            f"{where} adopts a numpy.ndarray as its buffer, got {type(initial_value).__name__}; "
            f"{fix}"
        )
    array: np.ndarray[Any, Any] = initial_value
    dtype_name(array.dtype)  # an unsupported dtype fails here, naming it
    reason = None
    if dtype is not None and np.dtype(dtype) != array.dtype:
        reason = f"has dtype {array.dtype}, not the requested {np.dtype(dtype)}"
    elif not array.flags.c_contiguous:
        reason = (
            "is not C-contiguous (a transposed or strided view?); restores write the "
            "checkpoint's bytes into the buffer in C order"
        )
    elif not array.dtype.isnative:
        reason = f"is not in native byte order (dtype {array.dtype.str})"
    elif not array.flags.writeable:
        reason = "is read-only; assign() and restores write into the buffer"
    if reason is not None:
        raise InvalidArgumentError(f"{where}: the array {reason}; {fix}")
    return array


@contextmanager
def capture_dependencies(template: Trackable) -> Iterator[Trackable]:
    """Make every named ``Variable`` created in this block a dependency of ``template``.

    The dependency is named by the variable's ``name``; a name already used by
    another dependency of ``template`` raises :class:`DependencyNameError`.

    Example:
        >>> layer = AutoTrackable()
        >>> with capture_dependencies(layer):
        ...     w = Variable(np.zeros(3), name="w")
        >>> layer._lookup_dependency("w") is w
        True
    """
    token = _capture_stack.set((*_capture_stack.get(), template))
    try:
        yield template
    finally:
        _capture_stack.reset(token)
