"""Checkpoint keys: escaping dependency names and validating keys read back.

A checkpoint key is ``<object path>/.ATTRIBUTES/<attribute>`` (or, for a slot
variable, ``<variable path>/.OPTIMIZER_SLOT/<optimizer path>/<slot>/.ATTRIBUTES/
<attribute>``), TensorFlow's layout. The key is also the array's path inside the
Zarr group, so every component must be a safe file and Zarr node name.

Escaping: a name made only of ``[A-Za-z0-9_-]`` that does not start with ``__``
(reserved by Zarr v3) stays as it is; any other character is written as ``~XX``
for each byte of its UTF-8 form, and the empty name is ``~``. Escaped names
never contain ``/`` or ``.``, so no component can be empty, ``.``, ``..``, or
collide with the reserved ``.ATTRIBUTES`` / ``.OPTIMIZER_SLOT`` components, and
the mapping is injective (``~`` itself is escaped).
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

# Well under the 255-byte file name limit of common filesystems.
MAX_COMPONENT_BYTES = 200
MAX_KEY_BYTES = 4096

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPED_COMPONENT = re.compile(r"(?:[A-Za-z0-9_-]|~[0-9A-F]{2})+|~")


def escape_name(name: str) -> str:
    """Escape one dependency or attribute name into a safe key component.

    >>> escape_name("dense_1"), escape_name("a/b"), escape_name("")
    ('dense_1', 'a~2Fb', '~')
    """
    if not isinstance(name, str):
        raise InvalidKeyError(f"dependency names must be str, got {type(name).__name__}: {name!r}")
    if name == "":
        return "~"
    if _PLAIN.fullmatch(name) and not name.startswith("__"):
        escaped = name
    else:
        out: list[str] = []
        for index, char in enumerate(name):
            leading_underscore = index == 0 and name.startswith("__")
            if _PLAIN.fullmatch(char) is not None and not leading_underscore:
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

    A valid key is relative, has no empty, ``.`` or ``..`` components, and every
    component is either a reserved one or a well-formed escaped name.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(f"{where}: key must be a string, found {type(key).__name__}")
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidKeyError(f"{where}: key {key[:80]!r} is empty or longer than {MAX_KEY_BYTES}")
    for component in key.split("/"):
        if component in RESERVED_COMPONENTS:
            continue
        if not _ESCAPED_COMPONENT.fullmatch(component) or component.startswith("__"):
            raise InvalidKeyError(
                f"{where}: key {key!r} has an invalid component {component!r} "
                "(empty, '.', '..', absolute, or characters outside [A-Za-z0-9_~-])"
            )
        if len(component.encode()) > MAX_COMPONENT_BYTES:
            raise InvalidKeyError(f"{where}: key {key!r} has a component over 200 bytes")
    return key
