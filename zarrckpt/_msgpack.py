"""Reading msgpack against a schema, one value at a time.

``msgpack.unpackb`` builds the whole document before anything can check it,
and a hostile file of a few MiB of one-byte empty arrays becomes gigabytes of
Python objects. :class:`SchemaReader` walks the document as the schema
expects it instead: containers are opened with their declared length checked
against the schema's limit, and before any value is unpacked its type byte is
checked, so only scalars of the expected kind are ever built. What a decoder
builds is then bounded by its own limits, whatever the bytes say.
"""

from __future__ import annotations

from typing import Any, cast

import msgpack

__all__ = ["SchemaError", "SchemaReader"]

_MAP = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ARRAY = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_STR = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}
_INT = frozenset(range(0x00, 0x80)) | frozenset(range(0xE0, 0x100)) | frozenset(range(0xCC, 0xD4))
_FLOAT = frozenset({0xCA, 0xCB})
_BOOL = frozenset({0xC2, 0xC3})


class SchemaError(ValueError):
    """The document does not have the shape the schema expects (decoders wrap it)."""


class SchemaReader:
    """Reads one msgpack document value by value; every method names the field it reads.

    Example:
        >>> reader = SchemaReader(msgpack.packb({"n": [1, 2]}))
        >>> reader.map("doc", 4), reader.string("key"), reader.array("n", 8)
        (1, 'n', 2)
    """

    def __init__(self, data: bytes, *, max_str_len: int = 1 << 16) -> None:
        self._data = data
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            max_buffer_size=max(len(data), 1),
            max_str_len=max_str_len,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=0,  # unpack() only ever builds scalars
            max_map_len=0,
        )
        self._unpacker.feed(data)

    def _expect(self, kinds: frozenset[int], what: str, field: str) -> None:
        at = self._unpacker.tell()
        if at >= len(self._data):
            raise SchemaError(f"{field}: the data ends where {what} was expected")
        if self._data[at] not in kinds:
            raise SchemaError(f"{field} must be {what} (found type byte {self._data[at]:#04x})")

    def _unpack(self, field: str, read: str = "unpack") -> Any:
        """``unpack`` (a scalar) or a container header, with msgpack's errors as SchemaError."""
        try:
            return getattr(self._unpacker, read)()
        except (ValueError, msgpack.UnpackException) as exc:
            raise SchemaError(f"{field}: {exc or type(exc).__name__}") from None

    def map(self, field: str, most: int) -> int:
        """Open a map of at most ``most`` entries; return its length."""
        self._expect(_MAP, "a map", field)
        count: int = self._unpack(field, "read_map_header")
        if count > most:
            raise SchemaError(f"{field} has {count} entries, at most {most}")
        return count

    def array(self, field: str, most: int, *, exactly: int | None = None) -> int:
        """Open an array of at most ``most`` items (or ``exactly``); return its length."""
        self._expect(_ARRAY, "an array", field)
        count: int = self._unpack(field, "read_array_header")
        if count > most or (exactly is not None and count != exactly):
            wanted = f"exactly {exactly}" if exactly is not None else f"at most {most}"
            raise SchemaError(f"{field} has {count} items, {wanted}")
        return count

    def string(self, field: str) -> str:
        self._expect(_STR, "a string", field)
        return cast(str, self._unpack(field))  # the type byte said so

    def integer(self, field: str) -> int:
        self._expect(_INT, "an int", field)
        return cast(int, self._unpack(field))

    def number(self, field: str) -> int | float:
        self._expect(_INT | _FLOAT, "a number", field)
        return cast(int | float, self._unpack(field))

    def scalar(self, field: str) -> bool | int | float | str:
        """A bool, int, float or string."""
        self._expect(_BOOL | _INT | _FLOAT | _STR, "a bool, number or string", field)
        return cast(bool | int | float | str, self._unpack(field))

    def finish(self, field: str) -> None:
        """The document must end here."""
        if self._unpacker.tell() != len(self._data):
            raise SchemaError(f"{field}: {len(self._data) - self._unpacker.tell()} bytes follow")
