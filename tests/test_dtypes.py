"""Tests of zarrckpt._dtypes against real zarr and tensorstore arrays on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import crc32c
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.dtype import Float16, data_type_registry, parse_dtype

from zarrckpt import _dtypes
from zarrckpt.errors import UnsupportedDTypeError, ZarrckptError

_dtypes.register_ml_dtypes()

EXPECTED_NATIVE: dict[str, Any] = {
    "bool": np.bool_,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
    "complex64": np.complex64,
    "complex128": np.complex128,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}
ML_NAMES = (
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e4m3b11fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
)
FLOAT8_NAMES = ML_NAMES[1:]
# The NaN each zarr-extensions spec names as "NaN", and which types have infinities.
SPEC_NAN_BITS = {
    "bfloat16": 0x7FC0,
    "float8_e4m3fn": 0x7F,
    "float8_e4m3fnuz": 0x80,
    "float8_e4m3b11fnuz": 0x80,
    "float8_e5m2": 0x7E,
    "float8_e5m2fnuz": 0x80,
}
HAS_INFINITY = {name: name in ("bfloat16", "float8_e5m2") for name in ML_NAMES}
UNSUPPORTED_DTYPES = [
    np.dtype(object),
    np.dtype("U3"),
    np.dtype("S3"),
    np.dtype("V2"),
    np.dtype("M8[ns]"),
    np.dtype("m8[s]"),
    np.dtype(np.longdouble),
    np.dtype(np.clongdouble),
    np.dtype([("a", "<f4"), ("b", "<i4")]),
    np.dtype([("a", "<f4")]),
    np.dtype(("<f4", (2,))),
    np.dtypes.StringDType(),
    np.dtype(ml_dtypes.int4),
    np.dtype(ml_dtypes.float8_e4m3),
    np.dtype(ml_dtypes.float8_e3m4),
    np.dtype(ml_dtypes.float4_e2m1fn),
]


def _uint_for(itemsize: int) -> np.dtype[Any]:
    return np.dtype(f"<u{itemsize}")


def _bits(array: Any) -> bytes:
    """The array's bytes, little-endian, for bit-exact comparison."""
    contiguous = np.ascontiguousarray(array)
    return contiguous.astype(contiguous.dtype.newbyteorder("<")).view(np.uint8).tobytes()


def _float_values(dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """Edge cases of a core float type plus deterministic pseudo-random values."""
    info = np.finfo(dtype)
    uint = _uint_for(dtype.itemsize)
    sign = 1 << (8 * dtype.itemsize - 1)
    inf_bits = int(np.array([np.inf], dtype).view(uint)[0])
    nan_bits = int(np.array([np.nan], dtype).view(uint)[0])
    # NaNs with a payload, a sign or the quiet bit clear must survive bit-exactly.
    odd_nans = np.array([nan_bits | sign, nan_bits | 1, inf_bits | 1], uint).view(dtype)
    specials = np.array(
        [
            0.0,
            -0.0,
            1.0,
            -1.0,
            info.max,
            info.min,
            info.tiny,
            -info.tiny,
            info.smallest_subnormal,
            info.eps,
            np.inf,
            -np.inf,
            np.nan,
        ],
        dtype,
    )
    rng = np.random.default_rng(1234)
    noise = (rng.standard_normal(61) * 1000).astype(dtype)
    return np.concatenate([specials, odd_nans, noise])


def _values(name: str) -> np.ndarray[Any, Any]:
    """Deterministic values of every kind of edge case the dtype has."""
    dtype = _dtypes.dtype_from_name(name)
    if name == "bool":
        return np.array([False, True, True, False, True, False, False], dtype)
    if name in ML_NAMES or dtype.itemsize == 1:
        # Every bit pattern: all NaN encodings, infinities, -0, min, max, subnormals.
        return np.arange(1 << (8 * dtype.itemsize), dtype=_uint_for(dtype.itemsize)).view(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype.name)
        edges = [info.min, info.min + 1, 0, 1, 2, info.max - 1, info.max]
        if dtype.kind == "i":
            edges.append(-1)
        rng = np.random.default_rng(99)
        noise = rng.integers(info.min, info.max, 57, dtype=dtype, endpoint=True)
        return np.concatenate([np.array(edges, dtype), noise])
    if dtype.kind == "f":
        return _float_values(dtype)
    assert dtype.kind == "c"
    parts = _float_values(np.dtype(f"<f{dtype.itemsize // 2}"))
    return np.stack([parts, parts[::-1]], axis=-1).reshape(-1).view(dtype)


def _create_zarr(path: Path, dtype: Any, shape: tuple[int, ...], chunks: tuple[int, ...]) -> Any:
    return zarr.create_array(
        store=str(path),
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        serializer=BytesCodec(endian="little"),
        compressors=[Crc32cCodec()],
        fill_value=0,
        config={"write_empty_chunks": True},
    )


def _read_tensorstore(path: Path) -> np.ndarray[Any, Any]:
    store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
    result: np.ndarray[Any, Any] = store.read().result()
    return result


def _zarr_json(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((path / "zarr.json").read_text())
    return result


# -- names ----------------------------------------------------------------------------------


def test_supported_names_are_exactly_the_documented_set() -> None:
    assert tuple(EXPECTED_NATIVE) == _dtypes.SUPPORTED_DTYPE_NAMES


@pytest.mark.parametrize("name", list(EXPECTED_NATIVE))
def test_name_round_trip(name: str) -> None:
    dtype = _dtypes.dtype_from_name(name)
    assert dtype == np.dtype(EXPECTED_NATIVE[name])
    assert dtype.type is EXPECTED_NATIVE[name]
    assert dtype.byteorder in ("=", "|")
    assert dtype.newbyteorder("<") == dtype  # native is little-endian on this machine
    assert _dtypes.dtype_name(dtype) == name
    assert _dtypes.dtype_name(dtype.newbyteorder(">")) == name
    assert _dtypes.dtype_name(dtype.newbyteorder("<")) == name
    zdtype = _dtypes.zarr_dtype(dtype.newbyteorder(">"))
    assert zdtype == _dtypes.zarr_dtype(dtype)
    assert zdtype.to_json(zarr_format=3) == name
    assert zdtype.to_native_dtype() == dtype.newbyteorder("<")
    assert getattr(zdtype, "endianness", "little") == "little"


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("q", "int64"),
        ("Q", "uint64"),
        ("l", "int64"),
        ("L", "uint64"),
        ("i", "int32"),
        ("I", "uint32"),
        ("p", "int64"),
        ("h", "int16"),
        ("b", "int8"),
        ("B", "uint8"),
        ("?", "bool"),
        ("e", "float16"),
        ("d", "float64"),
        ("F", "complex64"),
        (">c16", "complex128"),
    ],
)
def test_numpy_aliases_map_to_one_name(alias: str, name: str) -> None:
    assert _dtypes.dtype_name(np.dtype(alias)) == name
    assert _dtypes.zarr_dtype(np.dtype(alias)).to_json(zarr_format=3) == name


@pytest.mark.parametrize("dtype", UNSUPPORTED_DTYPES, ids=str)
def test_unsupported_dtypes_raise(dtype: np.dtype[Any]) -> None:
    for function in (_dtypes.dtype_name, _dtypes.zarr_dtype):
        with pytest.raises(UnsupportedDTypeError) as info:
            function(dtype)
        message = str(info.value)
        assert repr(dtype) in message
        assert "float32" in message and "bfloat16" in message  # lists what is supported
        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, ZarrckptError)


@pytest.mark.parametrize("dtype", [np.dtype(object).newbyteorder(">"), np.dtype(">M8[ns]")])
def test_unsupported_big_endian_dtype_raises(dtype: np.dtype[Any]) -> None:
    with pytest.raises(UnsupportedDTypeError, match="cannot be stored"):
        _dtypes.dtype_name(dtype)


@pytest.mark.parametrize("not_a_dtype", ["float32", np.float32, None, 4])
def test_non_dtype_argument_raises(not_a_dtype: Any) -> None:
    with pytest.raises(UnsupportedDTypeError, match=r"not a numpy\.dtype"):
        _dtypes.dtype_name(not_a_dtype)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "float128",
        "object",
        "Float32",
        "float32 ",
        "<f4",
        "f4",
        "bfloat16\x00",
        "float8_e4m3",
        "int4",
        "__import__('os').system('true')",
        "numpy.float32",
        "ml_dtypes.bfloat16",
    ],
)
def test_unknown_names_raise(name: str) -> None:
    with pytest.raises(UnsupportedDTypeError) as info:
        _dtypes.dtype_from_name(name)
    assert repr(name) in str(info.value)
    assert "bfloat16" in str(info.value)


def test_unknown_name_message_is_truncated() -> None:
    name = "x" * 100_000
    with pytest.raises(UnsupportedDTypeError) as info:
        _dtypes.dtype_from_name(name)
    assert len(str(info.value)) < 600
    assert "xxxxxxxx" in str(info.value)


@pytest.mark.parametrize("name", [None, 3, 2.5, ["float32"], {"name": "float32"}, b"float32"])
def test_non_string_names_raise(name: Any) -> None:
    with pytest.raises(UnsupportedDTypeError) as info:
        _dtypes.dtype_from_name(name)
    assert type(name).__name__ in str(info.value)


# -- registration ---------------------------------------------------------------------------


def test_register_ml_dtypes_twice_is_harmless(tmp_path: Path) -> None:
    _dtypes.register_ml_dtypes()
    before = dict(data_type_registry.contents)
    _dtypes.register_ml_dtypes()
    _dtypes.register_ml_dtypes()
    assert data_type_registry.contents == before
    for name in ML_NAMES:
        registered = data_type_registry.get(name)
        assert registered is type(_dtypes.zarr_dtype(_dtypes.dtype_from_name(name)))
        # Exactly one class matches each native dtype, or zarr's inference would fail.
        parsed = parse_dtype(_dtypes.dtype_from_name(name), zarr_format=3)
        assert type(parsed) is registered
        assert type(parse_dtype(name, zarr_format=3)) is registered
    # Arrays still round-trip after the repeated registration.
    values = _values("bfloat16")
    array = _create_zarr(tmp_path / "a", values.dtype, values.shape, (10_000,))
    array[...] = values
    assert _bits(zarr.open_array(str(tmp_path / "a"))[...]) == _bits(values)


def test_zarr_format_2_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Zarr format 3"):
        zarr.create_array(
            store=str(tmp_path / "v2"),
            shape=(4,),
            dtype=np.dtype(ml_dtypes.bfloat16),
            zarr_format=2,
        )


# -- zarr round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXPECTED_NATIVE))
def test_zarr_round_trip_bit_exact(tmp_path: Path, name: str) -> None:
    values = _values(name)
    chunk = -(-values.size // 3)  # three chunks, the last one partial
    path = tmp_path / name
    array = _create_zarr(path, values.dtype, values.shape, (chunk,))
    array[...] = values

    read = np.asarray(zarr.open_array(str(path))[...])
    assert read.dtype == values.dtype
    assert read.shape == values.shape
    assert _bits(read) == _bits(values)

    meta = _zarr_json(path)
    assert meta["data_type"] == name
    bytes_codec = meta["codecs"][0]
    assert bytes_codec["name"] == "bytes"
    if values.dtype.itemsize > 1:
        assert bytes_codec["configuration"] == {"endian": "little"}
    else:
        assert "configuration" not in bytes_codec
    assert meta["codecs"][1]["name"] == "crc32c"
    assert meta["fill_value"] in (0, 0.0, False, [0.0, 0.0])

    # The tensorstore interoperability claim, for every supported type.
    assert _bits(_read_tensorstore(path)) == _bits(values)


@pytest.mark.parametrize("name", list(EXPECTED_NATIVE))
def test_big_endian_input_is_stored_little_endian(tmp_path: Path, name: str) -> None:
    values = _values(name)
    big = values.astype(values.dtype.newbyteorder(">"))
    path = tmp_path / name
    array = _create_zarr(path, _dtypes.zarr_dtype(big.dtype), big.shape, (big.size,))
    array[...] = big

    chunk = (path / "c" / "0").read_bytes()
    payload, stored_crc = chunk[:-4], chunk[-4:]
    assert payload == values.astype(values.dtype.newbyteorder("<")).tobytes()
    assert int.from_bytes(stored_crc, "little") == crc32c.crc32c(payload)
    read = zarr.open_array(str(path))[...]
    assert _bits(read) == _bits(values)


@pytest.mark.parametrize("name", ML_NAMES)
def test_tensorstore_reads_zarr_written_ml_dtypes(tmp_path: Path, name: str) -> None:
    values = _values(name).reshape(-1, 16)  # 2-D, with a partial edge chunk
    path = tmp_path / name
    array = _create_zarr(path, values.dtype, values.shape, (5, 16))
    array[...] = values
    read = _read_tensorstore(path)
    assert read.shape == values.shape
    assert _dtypes.dtype_name(read.dtype) == name
    assert _bits(read) == _bits(values)


@pytest.mark.parametrize(
    ("name", "fill_json", "fill_bits"),
    [
        ("bfloat16", "0x7fc1", 0x7FC1),
        ("float8_e4m3fn", "0xff", 0xFF),
        ("float8_e4m3fnuz", "NaN", 0x80),
        ("float8_e4m3b11fnuz", 1.5, 0x5C),
        ("float8_e5m2", "-Infinity", 0xFC),
        ("float8_e5m2fnuz", -0.0, 0x00),
    ],
)
def test_zarr_reads_tensorstore_written(
    tmp_path: Path, name: str, fill_json: Any, fill_bits: int
) -> None:
    values = _values(name)
    itemsize = values.dtype.itemsize
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    chunk = 4096
    path = tmp_path / name
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            # One more chunk than the data fills: zarr must read it as the fill value.
            "shape": [values.size + chunk],
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk]}},
            "data_type": name,
            "codecs": [bytes_codec, {"name": "crc32c"}],
            "fill_value": fill_json,
        },
    }
    store = ts.open(spec, create=True).result()
    store[: values.size].write(values).result()

    read = np.asarray(zarr.open_array(str(path))[...])
    assert _dtypes.dtype_name(read.dtype) == name
    assert _bits(read[: values.size]) == _bits(values)
    fill = np.full(chunk, fill_bits, _uint_for(itemsize)).view(values.dtype)
    assert _bits(read[values.size :]) == _bits(fill)


# -- fill values ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ML_NAMES)
def test_fill_value_json_round_trips_every_bit_pattern(name: str) -> None:
    zdtype = _dtypes.zarr_dtype(_dtypes.dtype_from_name(name))
    uint = _uint_for(zdtype.to_native_dtype().itemsize)
    patterns = np.arange(1 << (8 * uint.itemsize), dtype=uint)
    for bits, value in zip(patterns, patterns.view(zdtype.to_native_dtype()), strict=True):
        encoded = json.loads(json.dumps(zdtype.to_json_scalar(value, zarr_format=3)))
        decoded = zdtype.from_json_scalar(encoded, zarr_format=3)
        assert int(np.array([decoded]).view(uint)[0]) == bits, (name, hex(bits), encoded)


@pytest.mark.parametrize("name", ML_NAMES)
def test_canonical_nan_matches_spec_and_ml_dtypes(name: str) -> None:
    dtype = _dtypes.dtype_from_name(name)
    zdtype = _dtypes.zarr_dtype(dtype)
    uint = _uint_for(dtype.itemsize)
    cast_nan_bits = int(np.array([np.nan]).astype(dtype).view(uint)[0])
    assert cast_nan_bits == SPEC_NAN_BITS[name]
    assert zdtype.to_json_scalar(float("nan"), zarr_format=3) == "NaN"
    decoded = zdtype.from_json_scalar("NaN", zarr_format=3)
    assert int(np.array([decoded]).view(uint)[0]) == SPEC_NAN_BITS[name]
    # Negative NaN is a different bit pattern, so it is written as hex.
    negative_nan = np.array([SPEC_NAN_BITS[name] ^ (1 << (8 * dtype.itemsize - 1))], uint)
    if not math.isnan(float(negative_nan.view(dtype)[0])):
        return  # the fnuz types: 0x00 is zero, there is only one NaN
    encoded = zdtype.to_json_scalar(negative_nan.view(dtype)[0], zarr_format=3)
    assert encoded == f"0x{int(negative_nan[0]):0{2 * dtype.itemsize}x}"


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, -2.0, float("nan"), float("inf"), -math.inf])
def test_bfloat16_fill_json_matches_zarr_float16(value: float) -> None:
    ours = _dtypes.zarr_dtype(np.dtype(ml_dtypes.bfloat16))
    theirs = Float16()
    encoded = ours.to_json_scalar(value, zarr_format=3)
    assert encoded == theirs.to_json_scalar(value, zarr_format=3)
    assert json.dumps(encoded) == json.dumps(theirs.to_json_scalar(value, zarr_format=3))
    back = float(ours.from_json_scalar(encoded, zarr_format=3))
    assert back == value or (math.isnan(back) and math.isnan(value))
    assert math.copysign(1.0, back) == math.copysign(1.0, value) or math.isnan(value)


@pytest.mark.parametrize(
    ("name", "fill"),
    [
        (name, fill)
        for name in ML_NAMES
        for fill in (0.0, -0.0, 1.5, -3.0, "NaN", "Infinity", "-Infinity")
        if HAS_INFINITY[name] or fill not in ("Infinity", "-Infinity")
    ],
)
def test_fill_value_json_matches_tensorstore(tmp_path: Path, name: str, fill: Any) -> None:
    ts_path = tmp_path / "ts"
    ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(ts_path)},
            "metadata": {"shape": [4], "data_type": name, "fill_value": fill},
        },
        create=True,
    ).result()
    ts_json = _zarr_json(ts_path)["fill_value"]

    zarr_path = tmp_path / "zarr"
    zdtype = _dtypes.zarr_dtype(_dtypes.dtype_from_name(name))
    zarr.create_array(
        store=str(zarr_path),
        shape=(4,),
        dtype=zdtype,
        serializer=BytesCodec(endian="little"),
        compressors=[Crc32cCodec()],
        fill_value=zdtype.from_json_scalar(fill, zarr_format=3),
    )
    assert _zarr_json(zarr_path)["fill_value"] == ts_json
    read_back = zarr.open_array(str(zarr_path))
    assert _bits(read_back[...]) == _bits(_read_tensorstore(ts_path))


@pytest.mark.parametrize("name", ML_NAMES)
@pytest.mark.parametrize(
    "bad", [True, None, [1.0], {"x": 1}, "abc", "0x", "0x1", "0xzz", "0x00000", "nan", "-inf"]
)
def test_invalid_fill_json_raises(name: str, bad: Any) -> None:
    zdtype = _dtypes.zarr_dtype(_dtypes.dtype_from_name(name))
    if bad == "0x1" and zdtype.to_native_dtype().itemsize == 1:
        bad = "0x123"  # keep the hex width wrong for one-byte types too
    with pytest.raises(TypeError):
        zdtype.from_json_scalar(bad, zarr_format=3)


@pytest.mark.parametrize("name", [n for n in ML_NAMES if not HAS_INFINITY[n]])
@pytest.mark.parametrize("infinity", ["Infinity", "-Infinity"])
def test_infinity_fill_refused_without_infinities(name: str, infinity: str) -> None:
    zdtype = _dtypes.zarr_dtype(_dtypes.dtype_from_name(name))
    with pytest.raises(TypeError, match="no infinities"):
        zdtype.from_json_scalar(infinity, zarr_format=3)


@pytest.mark.parametrize("name", ML_NAMES)
def test_cast_scalar(name: str) -> None:
    dtype = _dtypes.dtype_from_name(name)
    zdtype = _dtypes.zarr_dtype(dtype)
    assert float(zdtype.cast_scalar(1.5)) == 1.5
    assert float(zdtype.cast_scalar("1.5")) == 1.5
    assert float(zdtype.cast_scalar(np.float32(-2.0))) == -2.0
    assert float(zdtype.cast_scalar(3)) == 3.0
    assert float(zdtype.default_scalar()) == 0.0
    same = np.array([SPEC_NAN_BITS[name] | 1], _uint_for(dtype.itemsize)).view(dtype)[0]
    assert zdtype.cast_scalar(same) is same  # a scalar of the type is kept as is
    with pytest.raises(TypeError):
        zdtype.cast_scalar("not a number")
    with pytest.raises(TypeError):
        zdtype.cast_scalar(object())
