"""The ObjectGraph record: encoding, determinism and validation of hostile bytes."""

from __future__ import annotations

import copy
import random
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import zarrckpt as zc
from tests.conftest import Adam, Model, model_variables, reseal_manifest
from zarrckpt._commit import RECORD_KEY
from zarrckpt._dtypes import SUPPORTED_DTYPE_NAMES
from zarrckpt._keys import attribute_key, escape_name
from zarrckpt.errors import (
    CorruptCheckpointError,
    FormatVersionError,
    RecordError,
    ZarrckptError,
)
from zarrckpt.record import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ChildReference,
    ObjectGraph,
    ObjectNode,
    SavedAttribute,
    SlotVariableReference,
)

KERNEL_KEY = "model/kernel/.ATTRIBUTES/VARIABLE_VALUE"
SLOT_KEY = "model/kernel/.OPTIMIZER_SLOT/opt/m/.ATTRIBUTES/VARIABLE_VALUE"


def _graph() -> ObjectGraph:
    """A small record with children, attributes of several dtypes and a slot variable."""
    return ObjectGraph(
        nodes=(
            ObjectNode(
                "zarrckpt.checkpoint.Checkpoint",
                children=(
                    ChildReference("model", 1),
                    ChildReference("opt", 3),
                    ChildReference("save_counter", 4),
                ),
            ),
            ObjectNode("tests.Model", children=(ChildReference("kernel", 2),)),
            ObjectNode(
                "zarrckpt.variable.Variable",
                attributes=(SavedAttribute("VARIABLE_VALUE", KERNEL_KEY, (3, 4), "float32"),),
            ),
            ObjectNode(
                "tests.Adam",
                slot_variables=(SlotVariableReference(2, "m", 5),),
            ),
            ObjectNode(
                "zarrckpt.variable.Variable",
                attributes=(
                    SavedAttribute(
                        "VARIABLE_VALUE", "save_counter/.ATTRIBUTES/VARIABLE_VALUE", (), "int64"
                    ),
                ),
            ),
            ObjectNode(
                "zarrckpt.variable.Variable",
                attributes=(SavedAttribute("VARIABLE_VALUE", SLOT_KEY, (3, 0), "bfloat16"),),
            ),
        )
    )


def _doc() -> dict:
    """The decoded msgpack document of ``_graph()`` (a fresh, mutable copy)."""
    return msgpack.unpackb(_graph().encode(), raw=False)


def _pack(document: object) -> bytes:
    return msgpack.packb(document, use_bin_type=True)


# Round trip and determinism ------------------------------------------------


def test_round_trip_equal():
    graph = _graph()
    data = graph.encode()
    decoded = ObjectGraph.decode(data)
    assert decoded == graph
    assert decoded.nodes[5].attributes[0].shape == (3, 0)
    assert decoded.nodes[4].attributes[0].shape == ()
    assert decoded.nodes[3].slot_variables == (SlotVariableReference(2, "m", 5),)
    assert decoded.paths() == {0: "", 1: "model", 2: "model/kernel", 3: "opt", 4: "save_counter"}


def test_encoded_document_has_the_documented_schema():
    doc = _doc()
    assert list(doc) == ["format", "version", "nodes"]
    assert doc["format"] == FORMAT_NAME == "zarrckpt.object_graph"
    assert doc["version"] == FORMAT_VERSION == 1
    assert list(doc["nodes"][0]) == ["type", "children", "attributes", "slot_variables"]
    assert doc["nodes"][0]["children"] == [["model", 1], ["opt", 3], ["save_counter", 4]]
    assert doc["nodes"][2]["attributes"] == [["VARIABLE_VALUE", KERNEL_KEY, [3, 4], "float32"]]
    assert doc["nodes"][3]["slot_variables"] == [[2, "m", 5]]


def test_encoding_is_deterministic():
    first = _graph().encode()
    assert _graph().encode() == first  # an equal graph built separately
    assert _graph().encode() == _graph().encode()
    assert ObjectGraph.decode(first).encode() == first  # decode/encode is the identity
    assert _graph().digest() == _graph().digest()
    other = ObjectGraph(nodes=(*_graph().nodes[:5], ObjectNode("x")))
    assert other.encode() != first


def test_checkpoints_of_the_same_objects_have_identical_records(tmp_path):
    model = Model(seed=0)
    opt = Adam()
    opt.step(model_variables(model))
    ckpt = zc.Checkpoint(model=model, opt=opt)
    ckpt.write(tmp_path / "a")
    ckpt.write(tmp_path / "b")
    twin = Model(seed=7)
    twin_opt = Adam()
    twin_opt.step(model_variables(twin))
    zc.Checkpoint(model=twin, opt=twin_opt).write(tmp_path / "c")
    records = [(tmp_path / n / RECORD_KEY).read_bytes() for n in "abc"]
    assert records[0] == records[1] == records[2]
    graph = ObjectGraph.decode(records[0])
    assert graph.encode() == records[0]
    assert sum(len(n.slot_variables) for n in graph.nodes) == 2 * len(model_variables(model))


@st.composite
def graphs(draw: st.DrawFn) -> ObjectGraph:
    """Valid records: any ids in range, unique names per node and unique safe keys."""
    count = draw(st.integers(1, 6))
    names = st.text(max_size=6)
    nodes = []
    key_number = 0
    for node_id in range(count):
        child_names = draw(st.lists(names, unique=True, max_size=3))
        children = tuple(ChildReference(n, draw(st.integers(0, count - 1))) for n in child_names)
        attributes = []
        for attribute_name in draw(st.lists(names, unique=True, max_size=2)):
            key = attribute_key(f"n{node_id}/k{key_number}", attribute_name)
            key_number += 1
            shape = tuple(draw(st.lists(st.integers(0, 2**40), max_size=4)))
            dtype = draw(st.sampled_from(SUPPORTED_DTYPE_NAMES))
            attributes.append(SavedAttribute(attribute_name, key, shape, dtype))
        slots = tuple(
            SlotVariableReference(
                draw(st.integers(0, count - 1)), draw(names), draw(st.integers(0, count - 1))
            )
            for _ in range(draw(st.integers(0, 2)))
        )
        nodes.append(ObjectNode(draw(st.text(max_size=20)), children, tuple(attributes), slots))
    return ObjectGraph(nodes=tuple(nodes))


@given(graphs())
def test_round_trip_and_determinism_of_any_valid_graph(graph):
    data = graph.encode()
    decoded = ObjectGraph.decode(data)
    assert decoded == graph
    assert decoded.encode() == data
    assert ObjectGraph(nodes=tuple(copy.deepcopy(list(graph.nodes)))).encode() == data


# Truncation, corruption and arbitrary bytes --------------------------------


def test_every_truncation_raises_record_error():
    data = _graph().encode()
    assert len(data) > 300
    for length in range(len(data)):
        with pytest.raises(RecordError):
            ObjectGraph.decode(data[:length])


def test_trailing_bytes_raise_record_error():
    data = _graph().encode()
    for extra in (b"\x00", b"\xc0", data):
        with pytest.raises(RecordError):
            ObjectGraph.decode(data + extra)


def _check_decodes_or_raises_zarrckpt_error(data: bytes) -> None:
    try:
        graph = ObjectGraph.decode(data)
    except ZarrckptError:
        return
    # Anything accepted must be a valid record that survives its own round trip.
    graph.validate()
    assert ObjectGraph.decode(graph.encode()) == graph


def test_random_byte_flips_raise_zarrckpt_errors_or_decode_valid_records():
    data = _graph().encode()
    rng = random.Random(20261125)
    accepted = 0
    for _ in range(4000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(mutated))
            if rng.random() < 0.5:
                mutated[position] ^= 1 << rng.randrange(8)
            else:
                mutated[position] = rng.randrange(256)
        try:
            ObjectGraph.decode(bytes(mutated))
            accepted += 1
        except ZarrckptError:
            pass
        _check_decodes_or_raises_zarrckpt_error(bytes(mutated))
    # Flips inside names or type hints leave valid records; most flips must not.
    assert 0 < accepted < 4000


def test_every_single_byte_value_at_every_position():
    data = _graph().encode()
    for position in range(len(data)):
        for value in (0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC4, 0xC7, 0xCF, 0xD4, 0xDB, 0xDD, 0xDF, 0xFF):
            mutated = bytearray(data)
            mutated[position] = value
            _check_decodes_or_raises_zarrckpt_error(bytes(mutated))


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_other_exceptions(data):
    _check_decodes_or_raises_zarrckpt_error(data)


@given(st.data())
def test_mutated_records_never_raise_other_exceptions(data):
    record = bytearray(_graph().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(record) - 1))
        record[position] = data.draw(st.integers(0, 255))
    _check_decodes_or_raises_zarrckpt_error(bytes(record))


# Schema violations -----------------------------------------------------------


@pytest.mark.parametrize("name", ["zarrckpt.object_graphX", "", "ObjectGraph", 1, None, ["x"]])
def test_wrong_format_name(name):
    doc = _doc()
    doc["format"] = name
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize("version", [2, 0, 1000, 2**63])
def test_other_versions_raise_format_version_error(version):
    doc = _doc()
    doc["version"] = version
    with pytest.raises(FormatVersionError, match=str(version)):
        ObjectGraph.decode(_pack(doc))


def test_newer_version_with_new_fields_raises_format_version_error():
    doc = _doc()
    doc["version"] = 2
    doc["shards"] = []  # a field a later version may add
    with pytest.raises(FormatVersionError, match="version 2"):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize("version", [True, "1", 1.0, None, -1, [1]])
def test_malformed_version_raises_record_error(version):
    doc = _doc()
    doc["version"] = version
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize("field", ["format", "version", "nodes"])
def test_missing_top_level_field(field):
    doc = _doc()
    del doc[field]
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize("field", ["type", "children", "attributes", "slot_variables"])
@pytest.mark.parametrize("node", [0, 2, 5])
def test_missing_node_field(field, node):
    doc = _doc()
    del doc["nodes"][node][field]
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


def test_extra_fields():
    doc = _doc()
    doc["extra"] = 1
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))
    doc = _doc()
    doc["nodes"][1]["extra"] = []
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


def _set(doc: dict, path: tuple, value: object) -> None:
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


WRONG_TYPES = [
    # bool where an int belongs
    (("nodes", 0, "children", 0, 1), True),
    (("nodes", 0, "children", 0, 1), False),
    (("nodes", 3, "slot_variables", 0, 0), True),
    (("nodes", 3, "slot_variables", 0, 2), True),
    (("nodes", 2, "attributes", 0, 2, 0), True),
    # other non-ints where an int belongs
    (("nodes", 0, "children", 0, 1), 1.0),
    (("nodes", 0, "children", 0, 1), "1"),
    (("nodes", 0, "children", 0, 1), None),
    (("nodes", 2, "attributes", 0, 2, 1), 4.0),
    (("nodes", 2, "attributes", 0, 2, 1), "4"),
    # str where a list belongs
    (("nodes",), "nodes"),
    (("nodes", 0, "children"), "model"),
    (("nodes", 0, "children", 0), "model"),
    (("nodes", 2, "attributes"), "VARIABLE_VALUE"),
    (("nodes", 2, "attributes", 0), "VARIABLE_VALUE"),
    (("nodes", 2, "attributes", 0, 2), "34"),
    (("nodes", 3, "slot_variables"), "m"),
    (("nodes", 3, "slot_variables", 0), "m"),
    # map where a list belongs, list where a map belongs
    (("nodes",), {"0": {}}),
    (("nodes", 1), ["zarrckpt.Variable", [], [], []]),
    # non-str where a str belongs
    (("nodes", 0, "type"), 1),
    (("nodes", 0, "type"), None),
    (("nodes", 0, "children", 0, 0), 1),
    (("nodes", 0, "children", 0, 0), ["model"]),
    (("nodes", 2, "attributes", 0, 0), 1),
    (("nodes", 2, "attributes", 0, 1), 1),
    (("nodes", 2, "attributes", 0, 1), ["model", "kernel"]),
    (("nodes", 2, "attributes", 0, 3), 1),
    (("nodes", 2, "attributes", 0, 3), None),
    (("nodes", 3, "slot_variables", 0, 1), 1),
    # tuples of the wrong length
    (("nodes", 0, "children", 0), ["model"]),
    (("nodes", 0, "children", 0), ["model", 1, 2]),
    (("nodes", 2, "attributes", 0), ["VARIABLE_VALUE", KERNEL_KEY, [3, 4]]),
    (("nodes", 2, "attributes", 0), ["VARIABLE_VALUE", KERNEL_KEY, [3, 4], "float32", 0]),
    (("nodes", 3, "slot_variables", 0), [2, "m"]),
    (("nodes", 3, "slot_variables", 0), [2, "m", 5, 5]),
]


@pytest.mark.parametrize(("path", "value"), WRONG_TYPES, ids=lambda x: repr(x)[:40])
def test_wrong_field_types(path, value):
    doc = _doc()
    _set(doc, path, value)
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


def test_not_a_map_at_top_level():
    for document in ([], [FORMAT_NAME, 1, []], 1, "zarrckpt.object_graph", None, b""):
        with pytest.raises(RecordError):
            ObjectGraph.decode(_pack(document))


def test_empty_node_list():
    doc = _doc()
    doc["nodes"] = []
    with pytest.raises(RecordError, match="root"):
        ObjectGraph.decode(_pack(doc))


def test_non_string_map_keys_and_binary_and_ext_values():
    doc = _doc()
    doc["nodes"][0] = {1: "x", "children": [], "attributes": [], "slot_variables": []}
    with pytest.raises(RecordError):
        ObjectGraph.decode(msgpack.packb(doc, use_bin_type=True, strict_types=False))
    doc = _doc()
    doc["nodes"][0]["type"] = b"zarrckpt.Checkpoint"
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))
    doc = _doc()
    doc["nodes"][0]["type"] = msgpack.ExtType(5, b"payload")
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("nodes", 0, "children", 0, 1), 6),  # one past the last node
        (("nodes", 0, "children", 0, 1), 2**40),
        (("nodes", 0, "children", 0, 1), 2**64 - 1),
        (("nodes", 0, "children", 0, 1), -1),
        (("nodes", 1, "children", 0, 1), -(2**63)),
        (("nodes", 3, "slot_variables", 0, 0), 6),
        (("nodes", 3, "slot_variables", 0, 0), -1),
        (("nodes", 3, "slot_variables", 0, 2), 6),
        (("nodes", 3, "slot_variables", 0, 2), 2**32),
        (("nodes", 3, "slot_variables", 0, 2), -5),
    ],
    ids=lambda x: repr(x)[:40],
)
def test_node_ids_out_of_range(path, value):
    doc = _doc()
    _set(doc, path, value)
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


def test_duplicate_keys_across_nodes():
    doc = _doc()
    doc["nodes"][5]["attributes"][0][1] = KERNEL_KEY
    with pytest.raises(RecordError, match="twice"):
        ObjectGraph.decode(_pack(doc))


def test_duplicate_child_names():
    doc = _doc()
    doc["nodes"][0]["children"].append(["model", 2])
    with pytest.raises(RecordError, match="duplicate"):
        ObjectGraph.decode(_pack(doc))


def test_duplicate_attribute_names():
    doc = _doc()
    doc["nodes"][2]["attributes"].append(["VARIABLE_VALUE", "other/.ATTRIBUTES/x", [1], "int8"])
    with pytest.raises(RecordError, match="duplicate"):
        ObjectGraph.decode(_pack(doc))


UNSAFE_KEYS = [
    "../x",
    "../../etc/passwd",
    "model/../../x",
    "/abs",
    "/tmp/x/.ATTRIBUTES/VARIABLE_VALUE",
    "a//b",
    "a/./b",
    "./a",
    "a/",
    "..",
    ".",
    "",
    "__x",
    "model/__zarr/.ATTRIBUTES/VARIABLE_VALUE",
    "a\\..\\b",
    "a\x00b",
    "a b",
    "zarr.json",
    "x" * 201,
]


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=lambda k: repr(k)[:30])
def test_unsafe_keys_raise_record_error(key):
    doc = _doc()
    doc["nodes"][2]["attributes"][0][1] = key
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize(
    "dtype",
    [
        "float128",
        "object",
        "O",
        "<f4",
        "f4",
        "float32 ",
        "FLOAT32",
        "",
        "int4",
        "float8_e4m3",
        "str",
        "V8",
        "datetime64[ns]",
        "bfloat16\x00",
    ],
)
def test_unknown_dtype_names(dtype):
    doc = _doc()
    doc["nodes"][2]["attributes"][0][3] = dtype
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


@pytest.mark.parametrize("shape", [[-1], [3, -2], [-(2**63)], [0, -1, 0], [1] * 65])
def test_invalid_dims(shape):
    doc = _doc()
    doc["nodes"][2]["attributes"][0][2] = shape
    with pytest.raises(RecordError):
        ObjectGraph.decode(_pack(doc))


def test_all_supported_dtypes_are_accepted():
    doc = _doc()
    doc["nodes"][2]["attributes"] = [
        [f"a{i}", f"k{i}/.ATTRIBUTES/VARIABLE_VALUE", [2], name]
        for i, name in enumerate(SUPPORTED_DTYPE_NAMES)
    ]
    graph = ObjectGraph.decode(_pack(doc))
    assert [a.dtype for a in graph.nodes[2].attributes] == list(SUPPORTED_DTYPE_NAMES)


# Length headers that claim more than the input holds -------------------------


def _prefix_to_nodes() -> bytes:
    """A valid record's opening, up to the ``nodes`` value."""
    return (
        b"\x83"
        + _pack("format")
        + _pack(FORMAT_NAME)
        + _pack("version")
        + _pack(1)
        + _pack("nodes")
    )


HUGE = 2**31
HUGE_HEADERS = {
    "array32": b"\xdd" + HUGE.to_bytes(4, "big"),
    "map32": b"\xdf" + HUGE.to_bytes(4, "big"),
    "str32": b"\xdb" + HUGE.to_bytes(4, "big"),
    "bin32": b"\xc6" + HUGE.to_bytes(4, "big"),
    "ext32": b"\xc9" + HUGE.to_bytes(4, "big") + b"\x01",
    "array32-max": b"\xdd\xff\xff\xff\xff",
}


def _decode_peak_bytes(data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(RecordError):
            ObjectGraph.decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("header", list(HUGE_HEADERS), ids=str)
@pytest.mark.parametrize("where", ["top", "nodes", "node-field"])
def test_huge_length_headers_raise_without_allocating(header, where):
    claim = HUGE_HEADERS[header]
    if where == "top":
        data = claim
    elif where == "nodes":
        data = _prefix_to_nodes() + claim
    else:
        data = _prefix_to_nodes() + b"\x91\x84" + _pack("type") + claim
    assert len(data) < 100
    peak = _decode_peak_bytes(data + b"\x00" * 16)
    assert peak < 1 << 20, f"decoding {len(data)} bytes allocated {peak} bytes"


def test_many_nested_length_headers_do_not_allocate_what_they_claim():
    # Each header claims 2**24 - 1 items, within the item limit; 200 nested claims
    # add up to billions of items that the 1 KB input cannot hold.
    claim = b"\xdd" + (2**24 - 1).to_bytes(4, "big")
    data = _prefix_to_nodes() + claim * 200
    peak = _decode_peak_bytes(data)
    assert peak < 64 << 20, f"decoding {len(data)} bytes allocated {peak} bytes"


# A tampered record in a committed checkpoint ----------------------------------


def _committed(tmp_path):
    model = Model(seed=0)
    zc.Checkpoint(model=model).write(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _assert_unchanged(model: Model, before: list[np.ndarray]) -> None:
    for var, value in zip(model_variables(model), before, strict=True):
        assert var.numpy().tobytes() == value.tobytes()


@pytest.mark.parametrize("position", [0, 1, 40, -1])
def test_tampered_record_fails_restore_and_changes_nothing(tmp_path, position):
    _, path = _committed(tmp_path)
    record_file = path / RECORD_KEY
    data = bytearray(record_file.read_bytes())
    data[position] ^= 0x01
    record_file.write_bytes(bytes(data))
    fresh = Model(seed=9)
    before = [v.numpy().copy() for v in model_variables(fresh)]
    with pytest.raises(CorruptCheckpointError, match="msgpack: CRC32C does not match the commit"):
        zc.Checkpoint(model=fresh).restore(path)
    _assert_unchanged(fresh, before)


def test_record_with_valid_but_changed_content_fails_restore(tmp_path):
    # A tampered record that is itself well formed (a renamed dependency) is
    # caught by the manifest's hash, not by validation.
    _, path = _committed(tmp_path)
    record_file = path / RECORD_KEY
    data = record_file.read_bytes()
    assert data.count(b"embedding") >= 1
    tampered = data.replace(b"embedding", b"embeddinh")
    ObjectGraph.decode(tampered)  # still a valid record
    record_file.write_bytes(tampered)
    fresh = Model(seed=9)
    before = [v.numpy().copy() for v in model_variables(fresh)]
    with pytest.raises(CorruptCheckpointError, match="msgpack: CRC32C does not match the commit"):
        zc.Checkpoint(model=fresh).restore(path)
    _assert_unchanged(fresh, before)


def _replace_record(path, document: dict) -> None:
    """Write a new record and a manifest whose hash matches it (a forger's checkpoint)."""
    (path / RECORD_KEY).write_bytes(_pack(document))
    reseal_manifest(path)


def test_forged_record_with_escaping_key_is_rejected(tmp_path):
    _, path = _committed(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = msgpack.unpackb((path / RECORD_KEY).read_bytes(), raw=False)
    for node in doc["nodes"]:
        for attribute in node["attributes"]:
            attribute[1] = "../outside/" + escape_name(attribute[1])
    _replace_record(path, doc)
    fresh = Model(seed=9)
    before = [v.numpy().copy() for v in model_variables(fresh)]
    with pytest.raises(RecordError):
        zc.Checkpoint(model=fresh).restore(path)
    _assert_unchanged(fresh, before)
    assert list(outside.iterdir()) == []


def test_forged_record_of_another_version_raises_format_version_error(tmp_path):
    _, path = _committed(tmp_path)
    doc = msgpack.unpackb((path / RECORD_KEY).read_bytes(), raw=False)
    doc["version"] = 2
    _replace_record(path, doc)
    fresh = Model(seed=9)
    before = [v.numpy().copy() for v in model_variables(fresh)]
    with pytest.raises(FormatVersionError):
        zc.Checkpoint(model=fresh).restore(path)
    _assert_unchanged(fresh, before)
