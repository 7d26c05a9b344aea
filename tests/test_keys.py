"""Key escaping and validation (zarrckpt._keys) and storage key checks (_storage)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zarrckpt._keys import (
    ATTRIBUTES,
    MAX_COMPONENT_BYTES,
    OPTIMIZER_SLOT,
    attribute_key,
    escape_name,
    slot_variable_path,
    unescape_name,
    validate_key,
)
from zarrckpt._storage import LocalStorage, check_relative_key
from zarrckpt.errors import InvalidKeyError, ZarrckptError

SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_~.-]+")

# Names short enough that even 4-byte characters escape within the component limit
# (each byte becomes "~XX": 12 characters per 4-byte character).
short_names = st.text(max_size=MAX_COMPONENT_BYTES // 12)


def _assert_safe_component(escaped: str) -> None:
    assert SAFE_COMPONENT.fullmatch(escaped), escaped
    assert escaped not in ("", ".", "..")
    assert "/" not in escaped
    assert not escaped.startswith(".") and not escaped.endswith(".")
    assert not escaped.startswith("__")
    assert escaped not in (ATTRIBUTES, OPTIMIZER_SLOT)
    assert len(escaped.encode()) <= MAX_COMPONENT_BYTES
    key = f"{escaped}/{ATTRIBUTES}/VARIABLE_VALUE"
    assert validate_key(key) == key


@given(short_names)
def test_escape_round_trips(name):
    assert unescape_name(escape_name(name)) == name


@given(short_names)
def test_escaped_name_is_a_safe_key_component(name):
    _assert_safe_component(escape_name(name))


@given(short_names, short_names)
def test_escape_is_injective(a, b):
    if a != b:
        assert escape_name(a) != escape_name(b)
    else:
        assert escape_name(a) == escape_name(b)


@given(st.text(alphabet="_~.-/a%", max_size=8))
def test_escape_is_injective_on_confusable_alphabet(name):
    # Names built from the characters escaping treats specially: a collision here
    # would show up as a failed round trip, since unescape is a left inverse.
    escaped = escape_name(name)
    assert unescape_name(escaped) == name
    _assert_safe_component(escaped)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dense_1", "dense_1"),
        ("kernel-0", "kernel-0"),
        ("", "~"),
        ("~", "~7E"),
        ("a/b", "a~2Fb"),
        (".", "~2E"),
        ("..", "~2E~2E"),
        ("__x", "~5F_x"),
        ("_x", "_x"),
        (".ATTRIBUTES", "~2EATTRIBUTES"),
        ("é", "~C3~A9"),
        ("a b", "a~20b"),
        ("layers.3.mlp.weight", "layers.3.mlp.weight"),
        ("a.", "a~2E"),
        ("...", "~2E.~2E"),
        (".x.", "~2Ex~2E"),
    ],
)
def test_escape_examples(name, expected):
    assert escape_name(name) == expected
    assert unescape_name(expected) == name


def test_distinct_confusable_names_escape_differently():
    names = [
        "",
        "~",
        "~7E",
        "_",
        "__",
        "__x",
        "~5F_x",
        "_~5Fx",
        ".",
        "..",
        "~2E",
        "/",
        "a/b",
        "a~2Fb",
        "a.b",
        "a~2Eb",
        "...",
    ]
    escaped = [escape_name(n) for n in names]
    assert len(set(escaped)) == len(names)


def test_escaped_dunder_never_starts_with_double_underscore():
    for name in ["__", "___", "__init__", "__zarr.json", "__a/b"]:
        escaped = escape_name(name)
        assert not escaped.startswith("__"), escaped
        assert unescape_name(escaped) == name


@pytest.mark.parametrize(
    "name",
    [
        "é" * 40,  # escapes to 240 bytes
        "/" * 67,  # escapes to 201 bytes
        "a" * (MAX_COMPONENT_BYTES + 1),  # plain, but longer than a component may be
        "x" * 300,
    ],
    ids=["2-byte-chars", "slashes", "plain-201", "plain-300"],
)
def test_overlong_names_raise_invalid_key(name):
    with pytest.raises(InvalidKeyError):
        escape_name(name)


@given(st.text(max_size=120) | st.text(alphabet="ab_", min_size=190, max_size=260))
def test_escape_either_fits_a_component_or_raises(name):
    try:
        escaped = escape_name(name)
    except InvalidKeyError:
        return
    _assert_safe_component(escaped)


def test_longest_allowed_names_escape():
    plain = "a" * MAX_COMPONENT_BYTES
    assert escape_name(plain) == plain
    escaped = escape_name("/" * (MAX_COMPONENT_BYTES // 3))
    assert len(escaped) == 3 * (MAX_COMPONENT_BYTES // 3)
    key = f"{escaped}/{ATTRIBUTES}/{plain}"
    assert validate_key(key) == key


def test_non_string_names_raise_invalid_key():
    for name in (1, None, b"abc", ("a",)):
        with pytest.raises(InvalidKeyError):
            escape_name(name)


def test_unencodable_name_raises_value_error():
    # A lone surrogate has no UTF-8 form, so it cannot be escaped.
    with pytest.raises(ValueError):
        escape_name("\ud800")


def test_attribute_and_slot_keys_are_valid():
    assert attribute_key("", "VARIABLE_VALUE") == ".ATTRIBUTES/VARIABLE_VALUE"
    assert attribute_key("model/kernel", "VARIABLE_VALUE") == (
        "model/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    )
    assert attribute_key("a", "odd/name") == "a/.ATTRIBUTES/odd~2Fname"
    slot = slot_variable_path("model/kernel", "optimizer", "m")
    assert slot == "model/kernel/.OPTIMIZER_SLOT/optimizer/m"
    for key in (attribute_key("a/b", "x.y"), attribute_key(slot, "VARIABLE_VALUE")):
        assert validate_key(key) == key


@given(st.lists(short_names, min_size=1, max_size=5), short_names)
def test_keys_built_from_escaped_names_validate(path_names, attribute):
    path = "/".join(escape_name(n) for n in path_names)
    key = attribute_key(path, attribute)
    assert validate_key(key) == key
    components = key.split("/")
    assert [unescape_name(c) for c in components[: len(path_names)]] == path_names
    assert components[len(path_names)] == ATTRIBUTES
    assert unescape_name(components[-1]) == attribute


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../x",
        "a/../../x",
        "..",
        ".",
        "/abs",
        "/",
        "a//b",
        "a/./b",
        "a/",
        "__x",
        "a/__zarr",
        "a\\b",
        "a\x00b",
        "a b",
        ".a",
        "a.",
        "zarr.json",
        "a/_COMMIT",
        "object_graph.msgpack",
        "a/~zz",
        "a/~2f",  # escapes are upper-case hex
        "a/~2",
        "ümlaut",
        "x" * (MAX_COMPONENT_BYTES + 1),
        "/".join(["abc"] * 2000),  # over the whole-key limit
    ],
)
def test_validate_key_rejects_unsafe_keys(key):
    # Bare, and as the object path of an otherwise well-formed attribute key.
    for candidate in (key, f"{key}/{ATTRIBUTES}/VARIABLE_VALUE"):
        with pytest.raises(InvalidKeyError) as info:
            validate_key(candidate)
        assert isinstance(info.value, ZarrckptError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("key", ["a/b/c", "a/.ATTRIBUTES", ".ATTRIBUTES/x/y", "a/.OPTIMIZER_SLOT"])
def test_validate_key_requires_an_attribute_suffix(key):
    with pytest.raises(InvalidKeyError, match="does not end in"):
        validate_key(key)


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("zarr.json", "~7Aarr.json"),
        ("_COMMIT", "~5FCOMMIT"),
        ("object_graph.msgpack", "~6Fbject_graph.msgpack"),
    ],
)
def test_names_of_checkpoint_files_are_escaped(name, escaped):
    assert escape_name(name) == escaped
    assert unescape_name(escaped) == name


@pytest.mark.parametrize("key", [None, 3, b"a/b", ["a"]])
def test_validate_key_rejects_non_strings(key):
    with pytest.raises(InvalidKeyError):
        validate_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "a/.ATTRIBUTES/VARIABLE_VALUE",
        ".ATTRIBUTES/VARIABLE_VALUE",
        "m/k/.OPTIMIZER_SLOT/opt/m/.ATTRIBUTES/VARIABLE_VALUE",
        "~/~2E~2E/a~2Fb/.ATTRIBUTES/x",  # "~" alone is the escaped empty name
        "a-b_c/0/.ATTRIBUTES/1",
        "layers.0.mlp/.ATTRIBUTES/VARIABLE_VALUE",
    ],
)
def test_validate_key_accepts_well_formed_keys(key):
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "..",
        ".",
        "../x",
        "a/../../x",
        "a/..",
        "./a",
        "/abs",
        "/",
        "a//b",
        "a/",
        "a\\b",
        "..\\x",
        "a\x00b",
        "\x00",
    ],
)
def test_check_relative_key_rejects_unsafe_keys(key):
    with pytest.raises(InvalidKeyError):
        check_relative_key(key)


@pytest.mark.parametrize("key", ["a", "a/b/c", "a/.ATTRIBUTES/x/c/0/0", "_COMMIT", "..a", "a.."])
def test_check_relative_key_accepts_relative_keys(key):
    assert check_relative_key(key) == key


def test_local_storage_refuses_to_write_outside_its_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    storage = LocalStorage(str(root), fsync=False)
    for key in ("../escape", "a/../../escape", str(tmp_path / "escape"), "a\\..\\escape"):
        with pytest.raises(InvalidKeyError):
            storage.write(key, [b"x"])
        with pytest.raises(InvalidKeyError):
            storage.read(key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert list(root.iterdir()) == []
    storage.write("a/b", [b"xy", b"z"])
    assert (root / "a" / "b").read_bytes() == b"xyz"
