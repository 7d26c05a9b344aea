"""Checkpoint keys: escaping dependency names and validating keys read back.

A checkpoint key is ``<object path>/.ATTRIBUTES/<attribute>`` (or, for a slot
variable, ``<variable path>/.OPTIMIZER_SLOT/<optimizer path>/<slot>/.ATTRIBUTES/
<attribute>``), TensorFlow's layout. The key is also the array's path inside the
Zarr group, so every component must be a safe file and Zarr node name.

Escaping: the characters ``[A-Za-z0-9_-]`` stay as they are, and so does ``.``
except as the first or last character (so ``layers.3.weight`` reads as
itself); every other character, a leading or trailing ``.``, and the first
``_`` of a leading ``__`` (reserved by Zarr v3) are written as ``~XX`` for each
byte of their UTF-8 form; the empty name is ``~``. Escaped names never contain
``/`` and never start or end with ``.``, so no component can be empty, ``.``,
``..``, or collide with the reserved ``.ATTRIBUTES`` / ``.OPTIMIZER_SLOT``
components (nor lose a trailing dot on Windows), and the mapping is injective
(``~`` itself is escaped). Names equal to the checkpoint's own file names
(``zarr.json``, ``_COMMIT``, ``object_graph.msgpack``) get their first
character escaped.
"""

from __future__ import annotations

import re

from zarrckpt.errors import InvalidKeyError

__all__ = [
    "ATTRIBUTES",
    "OPTIMIZER_SLOT",
    "escape_name",
    "unescape_name",
    "attribute_key",
    "slot_variable_path",
    "validate_key",
]

ATTRIBUTES = ".ATTRIBUTES"
OPTIMIZER_SLOT = ".OPTIMIZER_SLOT"
RESERVED_COMPONENTS = frozenset({ATTRIBUTES, OPTIMIZER_SLOT})
# File names the checkpoint itself uses; a dependency so named would clash with them.
RESERVED_FILE_NAMES = frozenset({"zarr.json", "_COMMIT", "object_graph.msgpack"})

# Well under the 255-byte file name limit of common filesystems.
MAX_COMPONENT_BYTES = 200
MAX_KEY_BYTES = 4096

_PLAIN_EDGE = r"(?:[A-Za-z0-9_-]|~[0-9A-F]{2})"
_PLAIN_INNER = r"(?:[A-Za-z0-9_.-]|~[0-9A-F]{2})"
_PLAIN = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9_.-]*[A-Za-z0-9_-])?")
_ESCAPED_COMPONENT = re.compile(rf"{_PLAIN_EDGE}(?:{_PLAIN_INNER}*{_PLAIN_EDGE})?|~")


def escape_name(name: str) -> str:
    """Escape one dependency or attribute name into a safe key component.

    >>> escape_name("dense_1"), escape_name("layers.0"), escape_name("a/b"), escape_name("..")
    ('dense_1', 'layers.0', 'a~2Fb', '~2E~2E')
    """
    if not isinstance(name, str):
        raise InvalidKeyError(f"dependency names must be str, got {type(name).__name__}: {name!r}")
    if name == "":
        return "~"
    if name in RESERVED_FILE_NAMES:
        escaped = f"~{ord(name[0]):02X}{name[1:]}"
    elif _PLAIN.fullmatch(name) and not name.startswith("__"):
        escaped = name
    else:
        out: list[str] = []
        for index, char in enumerate(name):
            leading_underscore = index == 0 and name.startswith("__")
            edge_dot = char == "." and index in (0, len(name) - 1)
            plain = char == "." or _PLAIN.fullmatch(char) is not None
            if plain and not leading_underscore and not edge_dot:
                out.append(char)
                continue
            try:
                raw = char.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidKeyError(
                    f"name {name[:60]!r} is not valid Unicode (lone surrogate at {index})"
                ) from None
            out.extend(f"~{byte:02X}" for byte in raw)
        escaped = "".join(out)
    if len(escaped.encode()) > MAX_COMPONENT_BYTES:
        raise InvalidKeyError(
            f"name {name[:60]!r}... escapes to {len(escaped)} bytes; "
            f"at most {MAX_COMPONENT_BYTES} fit in a file name"
        )
    return escaped


def unescape_name(component: str) -> str:
    """Invert :func:`escape_name`."""
    if component == "~":
        return ""
    raw = bytearray()
    i = 0
    while i < len(component):
        if component[i] == "~":
            raw.append(int(component[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(component[i].encode())
            i += 1
    return raw.decode("utf-8")


def attribute_key(object_path: str, attribute: str) -> str:
    """The key of one saved attribute of the object at ``object_path``.

    ``object_path`` is already escaped ("" for the root).
    """
    suffix = f"{ATTRIBUTES}/{escape_name(attribute)}"
    return f"{object_path}/{suffix}" if object_path else suffix


def slot_variable_path(variable_path: str, optimizer_path: str, slot_name: str) -> str:
    """The object path of a slot variable (TensorFlow's ``.OPTIMIZER_SLOT`` form)."""
    parts = [variable_path, OPTIMIZER_SLOT, optimizer_path, escape_name(slot_name)]
    return "/".join(part for part in parts if part)


def validate_key(key: object, *, where: str = "checkpoint") -> str:
    """Check a key read from a checkpoint; return it or raise :class:`InvalidKeyError`.

    A valid key is relative, ends in ``.ATTRIBUTES/<name>``, has no empty,
    ``.`` or ``..`` components, and every component is either a reserved one or
    a well-formed escaped name.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"{where}: key must be a string, found {type(key).__name__}")
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"{where}: key {key[:80]!r} is empty or longer than {MAX_KEY_BYTES}")
    components = key.split("/")
    if len(components) < 2 or components[-2] != ATTRIBUTES:
        raise InvalidKeyError(f"{where}: key {key!r} does not end in {ATTRIBUTES}/<name>")
    for component in components:
        if component in RESERVED_COMPONENTS:
            continue
        if (
            not _ESCAPED_COMPONENT.fullmatch(component)
            or component.startswith("__")
            or component in RESERVED_FILE_NAMES
        ):
            raise InvalidKeyError(
                f"{where}: key {key!r} has an invalid component {component!r} "
                "(empty, '.' or '..', absolute, a reserved file name, a leading or "
                "trailing '.', or characters outside [A-Za-z0-9_.~-])"
            )
        if len(component.encode()) > MAX_COMPONENT_BYTES:
            raise InvalidKeyError(f"{where}: key {key!r} has a component over 200 bytes")
    return key
