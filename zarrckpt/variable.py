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
from zarrckpt.trackable import ArrayValue, SaveableValue, ShardInfo, Trackable

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
        self._shard: ShardInfo | None = None
        self.name = name
        if name is not None:
            for template in _capture_stack.get()[-1:]:
                template._track_trackable(self, name)

    @classmethod
    def sharded(
        cls,
        local_block: npt.ArrayLike,
        global_shape: tuple[int, ...] | list[int],
        offset: tuple[int, ...] | list[int],
        name: str | None = None,
        dtype: npt.DTypeLike | None = None,
        copy: bool = True,
    ) -> Variable:
        """A Variable holding one block of a larger value: ``value[offset : offset + block.shape]``.

        For distributed saves (:mod:`zarrckpt.distributed`): each rank holds its
        block, the ranks together save one array of ``global_shape``, and a
        restore fills each rank's block from whatever layout wrote it (any
        number of ranks, rows or columns, or one plain Variable). ``numpy()``,
        ``assign()`` and ``shape`` are the block's; :attr:`global_shape` and
        :attr:`offset` say where it lies. A block outside ``global_shape`` is
        refused here, with :class:`~zarrckpt.errors.InvalidArgumentError`.

        Example:
            >>> rank, world = 1, 4     # rows 256..511 of a (1024, 64) matrix
            >>> w = Variable.sharded(np.zeros((256, 64), np.float32), (1024, 64), (256, 0))
            >>> w.global_shape, w.offset, w.shape
            ((1024, 64), (256, 0), (256, 64))
        """
        variable = cls(local_block, name=name, dtype=dtype, copy=copy)
        where = f"Variable.sharded(name={name!r})" if name else "Variable.sharded()"
        shape = _int_tuple(global_shape, "global_shape", where)
        start = _int_tuple(offset, "offset", where)
        block = variable.shape
        if not len(shape) == len(start) == len(block):
            raise InvalidArgumentError(
                f"{where}: the block has {len(block)} dimensions, global_shape {list(shape)} "
                f"and offset {list(start)} must have as many"
            )
        for axis, (o, b, n) in enumerate(zip(start, block, shape, strict=True)):
            if o + b > n:
                raise InvalidArgumentError(
                    f"{where}: the block of shape {list(block)} at offset {list(start)} lies "
                    f"outside global_shape {list(shape)} (axis {axis}: rows {o}..{o + b} of {n})"
                )
        variable._shard = ShardInfo(shape, start)
        return variable

    @property
    def global_shape(self) -> tuple[int, ...]:
        """The shape of the whole value (the block's own shape unless :meth:`sharded`)."""
        return self._shard.global_shape if self._shard is not None else self.shape

    @property
    def offset(self) -> tuple[int, ...]:
        """Where the block starts in the whole value (zeros unless :meth:`sharded`)."""
        return self._shard.offset if self._shard is not None else (0,) * self._value.ndim

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
        if self._shard is not None:
            name += f" block at {self.offset} of {self.global_shape}"
        body = np.array2string(self._value, threshold=6, edgeitems=2, separator=", ")
        body = " ".join(body.split())  # one line, whatever the rank
        return f"<zarrckpt.Variable{name} shape={self.shape} dtype={self.dtype.name} {body}>"

    def _saveable_values(self) -> dict[str, SaveableValue]:
        return {VARIABLE_VALUE: ArrayValue(self.numpy, self._shard)}


def _int_tuple(value: Any, what: str, where: str) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(
        isinstance(i, int | np.integer) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise InvalidArgumentError(
            f"{where}: {what} must be a sequence of ints >= 0, got {value!r}"
        )
    return tuple(int(i) for i in items)


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
