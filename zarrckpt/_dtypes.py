"""The data types zarrckpt stores, and zarr 3.1 data types for ml_dtypes' floats.

zarrckpt stores every value as a Zarr v3 array, and every dtype it accepts has
one canonical name, the Zarr v3 ``data_type`` written in ``zarr.json``:

- core Zarr v3 types, built into zarr: ``bool``, ``int8`` ... ``int64``,
  ``uint8`` ... ``uint64``, ``float16``, ``float32``, ``float64``,
  ``complex64``, ``complex128``;
- ml_dtypes types, which zarr 3.1 lacks and :func:`register_ml_dtypes` adds:
  ``bfloat16``, ``float8_e4m3fn``, ``float8_e4m3fnuz``, ``float8_e4m3b11fnuz``,
  ``float8_e5m2``, ``float8_e5m2fnuz``.

The ml_dtypes names are exactly tensorstore's. tensorstore 0.1.86's zarr3
driver creates and reads all six (none had to be dropped); it also accepts
``float8_e3m4``, ``float8_e8m0fnu``, ``float4_e2m1fn``, ``int2`` and ``int4``,
which zarrckpt does not offer. ``float8_e4m3`` (IEEE-like, with infinities)
exists in ml_dtypes but tensorstore rejects it, so zarrckpt does not offer it.

Fill values use the Zarr v3 float JSON form, as tensorstore reads and writes
it and as the zarr-extensions data type specs define it: a JSON number for a
finite value (``-0.0`` included), ``"NaN"`` for the type's canonical NaN,
``"Infinity"`` / ``"-Infinity"`` where the type has infinities, and
``"0x"`` followed by the big-endian bit pattern (two hex digits per byte) for
any other NaN. Unlike zarr's own float16, a NaN payload therefore survives the
round trip. ``"Infinity"`` for a type without infinities is rejected, as the
specs say it is not a valid fill value there.

bfloat16 carries an endianness (zarr's ``HasEndianness``) so that zarr writes
``{"name": "bytes", "configuration": {"endian": "little"}}``: without it zarr
drops ``endian`` and tensorstore refuses the array. The one-byte float8 types
carry none, like zarr's own int8, and are written as ``{"name": "bytes"}``.

Zarr format 2 has no names for the ml_dtypes types; asking for one raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import (
    ClassVar,
    Final,
    Literal,
    Self,
    SupportsFloat,
    SupportsIndex,
    overload,
)

import ml_dtypes
import numpy as np
from zarr.core.common import JSON, ZarrFormat
from zarr.core.dtype import (
    Bool,
    Complex64,
    Complex128,
    DataTypeValidationError,
    Float16,
    Float32,
    Float64,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    data_type_registry,
)
from zarr.core.dtype.common import DTypeConfig_V2, DTypeJSON, HasEndianness, HasItemSize
from zarr.core.dtype.npy.common import (
    endianness_to_numpy_str,
    get_endianness_from_numpy_dtype,
)
from zarr.core.dtype.wrapper import TBaseDType, TBaseScalar, ZDType

from zarrckpt.errors import UnsupportedDTypeError

__all__ = [
    "SUPPORTED_DTYPE_NAMES",
    "BFloat16",
    "Float8E4M3B11FNUZ",
    "Float8E4M3FN",
    "Float8E4M3FNUZ",
    "Float8E5M2",
    "Float8E5M2FNUZ",
    "dtype_from_name",
    "dtype_name",
    "register_ml_dtypes",
    "zarr_dtype",
]

_SPECIAL_FLOAT_STRINGS: Final = ("NaN", "Infinity", "-Infinity")
_HEX_DIGITS: Final = re.compile(r"[0-9a-fA-F]+")
# Messages quote names read from untrusted files; a huge one must not flood them.
_MAX_QUOTED_CHARS: Final = 80


def _as_float(data: object) -> float | None:
    """Return ``data`` as a Python float, or None if ``float()`` cannot convert it."""
    if isinstance(data, str | bytes | bytearray | SupportsFloat | SupportsIndex):
        try:
            return float(data)
        except (TypeError, ValueError, OverflowError):
            return None
    return None


@dataclass(frozen=True, kw_only=True)
class _MLFloat(ZDType[TBaseDType, np.generic], HasItemSize):
    """Shared logic of the zarr data types wrapping an ml_dtypes floating-point type.

    Subclasses set the class variables below; the two that depend on byte order
    (``from_native_dtype`` and ``to_native_dtype``) differ between the one-byte
    float8 types and bfloat16.
    """

    scalar_type: ClassVar[type[np.generic]]
    """The ml_dtypes scalar type, e.g. ``ml_dtypes.bfloat16``."""
    _item_size: ClassVar[int]
    _bits_type: ClassVar[type[np.unsignedinteger]]
    _nan_bits: ClassVar[int]
    """Bit pattern written as ``"NaN"``; the specs and tensorstore agree on it."""
    has_infinity: ClassVar[bool]

    @property
    def item_size(self) -> int:
        """The size of one element in bytes."""
        return self._item_size

    @classmethod
    def _from_json_v2(cls, data: DTypeJSON) -> Self:
        """Reject every Zarr v2 name: Zarr v2 has none for this type."""
        raise DataTypeValidationError(
            f"{cls._zarr_v3_name} has no Zarr format 2 representation; got {data!r}"
        )

    @classmethod
    def _from_json_v3(cls, data: DTypeJSON) -> Self:
        """Return an instance if ``data`` is this type's Zarr v3 name."""
        if data == cls._zarr_v3_name:
            return cls()
        raise DataTypeValidationError(
            f"Invalid JSON representation of {cls.__name__}: got {data!r}, "
            f"expected {cls._zarr_v3_name!r}"
        )

    @overload
    def to_json(self, zarr_format: Literal[2]) -> DTypeConfig_V2[str, None]: ...

    @overload
    def to_json(self, zarr_format: Literal[3]) -> str: ...

    def to_json(self, zarr_format: ZarrFormat) -> DTypeConfig_V2[str, None] | str:
        """Return the Zarr v3 ``data_type`` name; Zarr format 2 is not supported."""
        if zarr_format == 3:
            return self._zarr_v3_name
        raise ValueError(
            f"{self._zarr_v3_name} can only be stored in Zarr format 3, not {zarr_format!r}"
        )

    def _bits(self, value: np.generic) -> int:
        """Return the bit pattern of a scalar of this type as an unsigned integer."""
        return int(np.array(value, dtype=self.scalar_type).view(self._bits_type)[()])

    def _from_bits(self, bits: int) -> np.generic:
        """Return the scalar whose bit pattern is ``bits``."""
        result: np.generic = np.array([bits], dtype=self._bits_type).view(self.scalar_type)[0]
        return result

    def _from_float(self, value: float) -> np.generic:
        """Round a Python float to this type the way numpy's cast does."""
        if math.isnan(value):
            # Any NaN becomes the canonical one, whatever sign or payload float64 had.
            return self._from_bits(self._nan_bits)
        # Overflow to infinity (or NaN) is the documented rounding, not a fault to warn of.
        with np.errstate(over="ignore", invalid="ignore"):
            result: np.generic = np.array([value], dtype=np.float64).astype(self.scalar_type)[0]
        return result

    def _check_scalar(self, data: object) -> bool:
        """Return whether ``data`` can be cast to a scalar of this type."""
        return type(data) is self.scalar_type or _as_float(data) is not None

    def cast_scalar(self, data: object) -> np.generic:
        """Cast ``data`` (a number, a numeric string or a scalar) to this type.

        A scalar already of this type is returned unchanged, so a NaN payload is
        kept. Out-of-range values round as numpy's cast rounds them (to infinity
        or, for types without infinities, to NaN).
        """
        if isinstance(data, np.generic) and type(data) is self.scalar_type:
            return data
        value = _as_float(data)
        if value is None:
            raise TypeError(
                f"Cannot convert {data!r} of type {type(data).__name__} to a "
                f"{self._zarr_v3_name} scalar"
            )
        return self._from_float(value)

    def default_scalar(self) -> np.generic:
        """Return 0 in this type."""
        return self._from_float(0.0)

    def from_json_scalar(self, data: JSON, *, zarr_format: ZarrFormat) -> np.generic:
        """Read a fill value from its JSON form (see the module docstring)."""
        if isinstance(data, bool):
            # bool is an int subclass, but JSON true/false is not a number.
            raise TypeError(f"Invalid {self._zarr_v3_name} fill value: {data!r}")
        if isinstance(data, int | float):
            return self._from_float(float(data))
        if isinstance(data, str):
            if data == "NaN":
                return self._from_bits(self._nan_bits)
            if data in _SPECIAL_FLOAT_STRINGS:
                if not self.has_infinity:
                    raise TypeError(
                        f"Invalid {self._zarr_v3_name} fill value {data!r}: "
                        f"{self._zarr_v3_name} has no infinities"
                    )
                return self._from_float(math.inf if data == "Infinity" else -math.inf)
            if data.startswith("0x"):
                digits = data[2:]
                if len(digits) == 2 * self._item_size and _HEX_DIGITS.fullmatch(digits):
                    return self._from_bits(int(digits, 16))
                raise TypeError(
                    f"Invalid {self._zarr_v3_name} fill value {data[:_MAX_QUOTED_CHARS]!r}: "
                    f"expected '0x' and {2 * self._item_size} hex digits"
                )
            value = _as_float(data)
            # zarr accepts decimal strings for float16; non-finite spellings other
            # than the three the spec names would be ambiguous, so they are refused.
            if value is not None and math.isfinite(value):
                return self._from_float(value)
        raise TypeError(
            f"Invalid {self._zarr_v3_name} fill value {str(data)[:_MAX_QUOTED_CHARS]!r}: "
            "expected a number, 'NaN', 'Infinity', '-Infinity' or a '0x' hex bit pattern"
        )

    def to_json_scalar(self, data: object, *, zarr_format: ZarrFormat) -> str | float:
        """Return the JSON form of ``data`` cast to this type (see the module docstring)."""
        scalar = self.cast_scalar(data)
        value = float(scalar)
        if math.isnan(value):
            bits = self._bits(scalar)
            if bits == self._nan_bits:
                return "NaN"
            return f"0x{bits:0{2 * self._item_size}x}"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return value


@dataclass(frozen=True, kw_only=True)
class _Float8(_MLFloat):
    """Base of the one-byte float8 types, which have no byte order."""

    _item_size = 1
    _bits_type = np.uint8

    @classmethod
    def from_native_dtype(cls, dtype: TBaseDType) -> Self:
        """Wrap a numpy dtype of this type; any byte-order flag is meaningless for one byte."""
        if cls._check_native_dtype(dtype):
            return cls()
        raise DataTypeValidationError(
            f"Invalid data type: {dtype}. Expected an instance of {cls.dtype_cls}"
        )

    def to_native_dtype(self) -> TBaseDType:
        """Return the numpy dtype of this type."""
        return np.dtype(self.scalar_type)


@dataclass(frozen=True, kw_only=True)
class BFloat16(_MLFloat, HasEndianness):
    """The ``bfloat16`` Zarr v3 data type, wrapping ``ml_dtypes.bfloat16``."""

    scalar_type = ml_dtypes.bfloat16
    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name = "bfloat16"
    _item_size = 2
    _bits_type = np.uint16
    _nan_bits = 0x7FC0
    has_infinity = True

    @classmethod
    def from_native_dtype(cls, dtype: TBaseDType) -> Self:
        """Wrap a numpy bfloat16 dtype, keeping its byte order."""
        if cls._check_native_dtype(dtype):
            return cls(endianness=get_endianness_from_numpy_dtype(dtype))
        raise DataTypeValidationError(
            f"Invalid data type: {dtype}. Expected an instance of {cls.dtype_cls}"
        )

    def to_native_dtype(self) -> TBaseDType:
        """Return the numpy bfloat16 dtype in this instance's byte order."""
        native: TBaseDType = np.dtype(self.scalar_type)
        return native.newbyteorder(endianness_to_numpy_str(self.endianness))


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(_Float8):
    """The ``float8_e4m3fn`` Zarr v3 data type: no infinities, NaN is 0x7f / 0xff."""

    scalar_type = ml_dtypes.float8_e4m3fn
    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fn))
    _zarr_v3_name = "float8_e4m3fn"
    _nan_bits = 0x7F
    has_infinity = False


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FNUZ(_Float8):
    """The ``float8_e4m3fnuz`` Zarr v3 data type: no infinities, no -0, NaN is 0x80."""

    scalar_type = ml_dtypes.float8_e4m3fnuz
    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fnuz))
    _zarr_v3_name = "float8_e4m3fnuz"
    _nan_bits = 0x80
    has_infinity = False


@dataclass(frozen=True, kw_only=True)
class Float8E4M3B11FNUZ(_Float8):
    """The ``float8_e4m3b11fnuz`` Zarr v3 data type: exponent bias 11, NaN is 0x80."""

    scalar_type = ml_dtypes.float8_e4m3b11fnuz
    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3b11fnuz))
    _zarr_v3_name = "float8_e4m3b11fnuz"
    _nan_bits = 0x80
    has_infinity = False


@dataclass(frozen=True, kw_only=True)
class Float8E5M2(_Float8):
    """The ``float8_e5m2`` Zarr v3 data type: IEEE-like, with infinities; NaN is 0x7e."""

    scalar_type = ml_dtypes.float8_e5m2
    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2))
    _zarr_v3_name = "float8_e5m2"
    _nan_bits = 0x7E
    has_infinity = True


@dataclass(frozen=True, kw_only=True)
class Float8E5M2FNUZ(_Float8):
    """The ``float8_e5m2fnuz`` Zarr v3 data type: no infinities, no -0, NaN is 0x80."""

    scalar_type = ml_dtypes.float8_e5m2fnuz
    dtype_cls = type(np.dtype(ml_dtypes.float8_e5m2fnuz))
    _zarr_v3_name = "float8_e5m2fnuz"
    _nan_bits = 0x80
    has_infinity = False


_ML_CLASSES: Final[tuple[type[_MLFloat], ...]] = (
    BFloat16,
    Float8E4M3FN,
    Float8E4M3FNUZ,
    Float8E4M3B11FNUZ,
    Float8E5M2,
    Float8E5M2FNUZ,
)

# One immutable instance per name, little-endian wherever byte order exists: the
# in-memory byte order of a live array does not matter, what is stored does.
_ZDTYPES: Final[dict[str, ZDType[TBaseDType, TBaseScalar]]] = {
    "bool": Bool(),
    "int8": Int8(),
    "int16": Int16(endianness="little"),
    "int32": Int32(endianness="little"),
    "int64": Int64(endianness="little"),
    "uint8": UInt8(),
    "uint16": UInt16(endianness="little"),
    "uint32": UInt32(endianness="little"),
    "uint64": UInt64(endianness="little"),
    "float16": Float16(endianness="little"),
    "float32": Float32(endianness="little"),
    "float64": Float64(endianness="little"),
    "complex64": Complex64(endianness="little"),
    "complex128": Complex128(endianness="little"),
    "bfloat16": BFloat16(endianness="little"),
    **{cls._zarr_v3_name: cls() for cls in _ML_CLASSES if cls is not BFloat16},
}

SUPPORTED_DTYPE_NAMES: Final[tuple[str, ...]] = tuple(_ZDTYPES)
"""Every dtype name zarrckpt can store, core Zarr v3 types first."""

# Native byte order, as dtype_from_name promises. numpy.dtype() only ever sees the
# fixed core names here, never a name read from a file.
_NATIVE_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    name: np.dtype(zdtype.scalar_type if isinstance(zdtype, _MLFloat) else name)
    for name, zdtype in _ZDTYPES.items()
}

# dtype_name compares against little-endian forms, so any input byte order matches.
_LITTLE_ENDIAN_DTYPES: Final[tuple[tuple[str, np.dtype[np.generic]], ...]] = tuple(
    (name, native.newbyteorder("<")) for name, native in _NATIVE_DTYPES.items()
)


def register_ml_dtypes() -> None:
    """Register the ml_dtypes types with zarr's data type registry.

    Safe to call any number of times: a name already bound to the same class is
    left alone, and a name another registration rebound is bound back to ours,
    so zarr resolves ``data_type`` names in ``zarr.json`` and numpy ml_dtypes
    dtypes to these classes.
    """
    for cls in _ML_CLASSES:
        data_type_registry.register(cls._zarr_v3_name, cls)


def _unsupported_dtype(dtype: object) -> UnsupportedDTypeError:
    """Build the error for a dtype zarrckpt cannot store."""
    if isinstance(dtype, np.dtype):
        what = f"dtype {dtype!r}"
    else:
        what = f"{type(dtype).__name__} {str(dtype)[:_MAX_QUOTED_CHARS]!r} (not a numpy.dtype)"
    return UnsupportedDTypeError(
        f"{what} cannot be stored in a zarrckpt checkpoint; "
        f"supported dtypes: {', '.join(SUPPORTED_DTYPE_NAMES)}"
    )


def dtype_name(dtype: np.dtype[np.generic]) -> str:
    """Return the canonical name of ``dtype``, e.g. ``"float32"`` or ``"bfloat16"``.

    The name is the one in zarrckpt's record and in ``zarr.json``; every byte order
    of a dtype has the same name.

    Raises:
        UnsupportedDTypeError: ``dtype`` is not a numpy dtype zarrckpt can store.
    """
    # Structured and subarray dtypes can never match; numpy would still compare them.
    if isinstance(dtype, np.dtype) and dtype.fields is None and dtype.subdtype is None:
        try:
            little = dtype.newbyteorder("<")
        except (TypeError, ValueError):
            # Some dtypes (e.g. numpy's StringDType) refuse a byte order at all.
            raise _unsupported_dtype(dtype) from None
        for name, candidate in _LITTLE_ENDIAN_DTYPES:
            # Equality, not identity of dtype.type: 'q' (longlong) and 'l' (long)
            # are distinct numpy types but the same int64.
            if little == candidate:
                return name
    raise _unsupported_dtype(dtype)


def zarr_dtype(dtype: np.dtype[np.generic]) -> ZDType[TBaseDType, TBaseScalar]:
    """Return the zarr data type that stores ``dtype``, little-endian where that matters.

    Passing the result to ``zarr.create_array(dtype=...)`` bypasses zarr's own
    inference, which for instance fails on ``numpy.dtype("q")``.

    Raises:
        UnsupportedDTypeError: ``dtype`` is not a numpy dtype zarrckpt can store.
    """
    return _ZDTYPES[dtype_name(dtype)]


def dtype_from_name(name: str) -> np.dtype[np.generic]:
    """Return the native-byte-order numpy dtype named ``name`` (from :func:`dtype_name`).

    ``name`` may come from an untrusted file: it is only looked up in a fixed
    table, never passed to ``numpy.dtype``, evaluated or imported.

    Raises:
        UnsupportedDTypeError: ``name`` is not one of :data:`SUPPORTED_DTYPE_NAMES`.
    """
    if isinstance(name, str):
        native = _NATIVE_DTYPES.get(name)
        if native is not None:
            return native
        quoted = repr(name[:_MAX_QUOTED_CHARS]) + ("..." if len(name) > _MAX_QUOTED_CHARS else "")
    else:
        quoted = f"{str(name)[:_MAX_QUOTED_CHARS]!r} of type {type(name).__name__}"
    raise UnsupportedDTypeError(
        f"unknown dtype name {quoted}; supported dtypes: {', '.join(SUPPORTED_DTYPE_NAMES)}"
    )
