"""Chunked array I/O: chunk layout, bit-exact round trips and damaged chunk files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import crc32c
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import zarrckpt as zc
from tests.conftest import by_key, random_array
from zarrckpt import array_io
from zarrckpt._dtypes import SUPPORTED_DTYPE_NAMES, dtype_from_name
from zarrckpt._storage import LocalStorage
from zarrckpt.array_io import ArrayLayout
from zarrckpt.errors import ChecksumError, CorruptCheckpointError, MissingChunkError
from zarrckpt.options import CheckpointOptions

DEFAULT_CHUNK_BYTES = CheckpointOptions().chunk_bytes

KEY = "holder/value/.ATTRIBUTES/VARIABLE_VALUE"


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality of the values (NaN payloads included), whatever the byte order."""
    if a.shape != b.shape or a.dtype.newbyteorder("=") != b.dtype.newbyteorder("="):
        return False
    native = a.dtype.newbyteorder("=")
    a = np.ascontiguousarray(a, dtype=native)
    b = np.ascontiguousarray(b, dtype=native)
    return a.tobytes() == b.tobytes()


# ArrayLayout.plan -------------------------------------------------------------


def _split_axis(layout: ArrayLayout) -> int | None:
    """The axis along which chunks hold several rows, or the deepest axis cut into pieces."""
    cut = [
        axis
        for axis, (c, s) in enumerate(zip(layout.chunk_shape, layout.shape, strict=True))
        if c < s
    ]
    return cut[-1] if cut else None


def _check_plan_structure(shape: tuple[int, ...], dtype_name: str, chunk_bytes: int) -> None:
    """Leading-axes split, balanced rows, one chunk when the array fits, no tiny chunks."""
    dtype = dtype_from_name(dtype_name)
    layout = ArrayLayout.plan(shape, dtype, chunk_bytes)
    chunk = layout.chunk_shape
    assert layout.shape == shape and layout.dtype == dtype
    assert len(chunk) == len(shape)
    assert all(1 <= c <= max(1, s) for c, s in zip(chunk, shape, strict=True))
    # Leading axes only: (1, ..., 1, rows, full, ..., full), one C-order run each.
    assert layout.is_contiguous_runs()
    k = _split_axis(layout)
    if k is not None:
        assert all(c == 1 for c in chunk[:k])
        assert all(c == max(1, s) for c, s in zip(chunk[k + 1 :], shape[k + 1 :], strict=True))
        # Balanced: rows = ceil(n / chunks) along the split axis, so the edge
        # chunk's padding is fewer rows than there are chunks along that axis.
        n, rows, count = shape[k], chunk[k], layout.grid[k]
        assert rows == math.ceil(n / count)
        assert count * rows - n < count
        # Not needlessly small: twice the rows would not fit in the target.
        row_bytes = math.prod(chunk[k + 1 :]) * dtype.itemsize
        assert 2 * rows * row_bytes > chunk_bytes
    nbytes = math.prod(shape) * dtype.itemsize
    if 0 < nbytes <= chunk_bytes:
        assert chunk == shape, "an array that fits in one chunk is one chunk"


def _check_plan_size(shape: tuple[int, ...], dtype_name: str, chunk_bytes: int) -> None:
    """Every chunk fits in ``chunk_bytes`` whenever one element does."""
    dtype = dtype_from_name(dtype_name)
    layout = ArrayLayout.plan(shape, dtype, chunk_bytes)
    if math.prod(shape) and dtype.itemsize <= chunk_bytes:
        # Always possible: (1, ..., 1, r) chunks go down to single elements.
        assert layout.chunk_nbytes <= chunk_bytes, layout


nonempty_shapes = st.lists(st.integers(1, 40), max_size=4).map(tuple)
plan_dtypes = st.sampled_from(["uint8", "float16", "float32", "complex128"])


@given(nonempty_shapes, plan_dtypes, st.integers(1, 5000))
def test_plan_splits_leading_axes_into_balanced_rows(shape, dtype_name, chunk_bytes):
    _check_plan_structure(shape, dtype_name, chunk_bytes)


@given(nonempty_shapes, plan_dtypes, st.integers(1, 5000))
def test_plan_chunks_fit_target_bytes(shape, dtype_name, chunk_bytes):
    _check_plan_size(shape, dtype_name, chunk_bytes)


@pytest.mark.parametrize(
    ("shape", "dtype_name", "chunk_bytes", "expected"),
    [
        ((100, 10), "float32", 200, (5, 10)),
        ((100, 10), "float32", 4000, (100, 10)),
        ((10, 10), "float32", 4000, (10, 10)),
        ((3, 5, 7), "float64", 56, (1, 1, 7)),
        ((3, 5, 7), "float64", 112, (1, 2, 7)),
        ((3, 5, 7), "float64", 280, (1, 5, 7)),
        ((3, 5, 7), "float64", 560, (2, 5, 7)),
        ((), "float32", 1, ()),
        ((), "complex128", DEFAULT_CHUNK_BYTES, ()),
        ((0, 3), "float32", DEFAULT_CHUNK_BYTES, (1, 3)),
    ],
)
def test_plan_examples(shape, dtype_name, chunk_bytes, expected):
    layout = ArrayLayout.plan(shape, dtype_from_name(dtype_name), chunk_bytes)
    assert layout.chunk_shape == expected
    if math.prod(shape):
        _check_plan_structure(shape, dtype_name, chunk_bytes)
        _check_plan_size(shape, dtype_name, chunk_bytes)


def test_plan_zero_d_and_empty_arrays():
    scalar = ArrayLayout.plan((), np.dtype(np.float32))
    assert scalar.grid == () and [c for c, _ in scalar.chunks()] == [()]
    assert scalar.chunk_nbytes == 4
    empty = ArrayLayout.plan((0, 3), np.dtype(np.float32))
    assert empty.grid == (0, 1)
    assert list(empty.chunks()) == []


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 5), (4, 3, 0)], ids=str)
def test_zero_size_arrays_write_and_read_back(tmp_path, shape):
    # Every layout plan() makes must be one read_layout() accepts.
    storage = _storage(tmp_path)
    value = np.zeros(shape, np.float32)
    files = array_io.write_arrays(storage, [("e", value)])
    assert [f.key for f in files] == ["e/zarr.json"]  # no chunks to write
    layout = array_io.read_layout(storage, "e")
    assert layout.shape == shape and math.prod(layout.grid) == 0
    out = np.zeros(shape, np.float32)
    array_io.read_arrays(storage, [("e", layout, out)], by_key(files))


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 5)], ids=str)
def test_zero_size_variables_round_trip(tmp_path, shape):
    values = {"v": np.zeros(shape, np.int16)}
    _round_trip(tmp_path, values, {"v": np.zeros(shape, np.int16)})


def test_plan_big_matrix_balances_rows():
    layout = ArrayLayout.plan((10_001, 4096), np.dtype(np.float32))
    rows = layout.chunk_shape[0]
    assert layout.chunk_shape[1] == 4096
    assert layout.chunk_nbytes <= DEFAULT_CHUNK_BYTES
    assert layout.grid == (math.ceil(10_001 / rows), 1)
    assert layout.grid[0] * rows - 10_001 < layout.grid[0]


@pytest.mark.parametrize(
    ("shape", "dtype_name", "chunk_bytes"),
    [
        ((1, 4096, 4096), "float32", DEFAULT_CHUNK_BYTES),  # leading axis of size 1
        ((1, 1000), "float32", 400),
        ((7, 3), "uint8", 8),  # balanced rows overshoot the target by a row
    ],
    ids=["1x4096x4096-f32", "1x1000-f32", "7x3-u8"],
)
def test_plan_chunks_stay_within_target_bytes(shape, dtype_name, chunk_bytes):
    layout = ArrayLayout.plan(shape, dtype_from_name(dtype_name), chunk_bytes)
    assert layout.chunk_nbytes <= chunk_bytes, layout


# Round trips through Checkpoint ------------------------------------------------


class Holder(zc.AutoTrackable):
    def __init__(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            setattr(self, name, zc.Variable(value))


def _round_trip(tmp_path, values: dict[str, np.ndarray], fresh: dict[str, np.ndarray]) -> Holder:
    path = zc.Checkpoint(h=Holder(values)).write(tmp_path / "ckpt")
    restored = Holder(fresh)
    buffers = {name: getattr(restored, name).numpy() for name in values}
    zc.Checkpoint(h=restored).restore(path).assert_consumed()
    for name, value in values.items():
        live = getattr(restored, name).numpy()
        assert live is buffers[name]  # restored in place
        assert same_bits(live, value), name
    return restored


@pytest.mark.parametrize("dtype_name", SUPPORTED_DTYPE_NAMES)
def test_every_dtype_round_trips_bit_exactly(tmp_path, dtype_name):
    shapes = {"matrix": (5, 7), "scalar": (), "empty": (0, 3), "cube": (2, 3, 4)}
    values = {name: random_array(dtype_name, shape, seed=1) for name, shape in shapes.items()}
    fresh = {name: random_array(dtype_name, shape, seed=2) for name, shape in shapes.items()}
    assert not same_bits(values["matrix"], fresh["matrix"])
    _round_trip(tmp_path, values, fresh)


def test_bfloat16_and_float8_every_bit_pattern(tmp_path):
    ml_names = [n for n in SUPPORTED_DTYPE_NAMES if n.startswith(("bfloat16", "float8"))]
    assert len(ml_names) == 6
    values = {}
    for name in ml_names:
        dtype = dtype_from_name(name)
        bits = np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}")
        values[name] = bits.view(dtype)  # every NaN payload, infinities, -0
    fresh = {n: np.zeros_like(v) for n, v in values.items()}
    _round_trip(tmp_path, values, fresh)


def test_big_endian_variable_sources(tmp_path):
    values = {
        "i4": np.arange(-6, 6, dtype=">i4").reshape(3, 4),
        "f8": np.linspace(-1, 1, 9, dtype=">f8"),
        "c8": (np.arange(4) + 1j * np.arange(4)).astype(">c8"),
        "u2": np.arange(65530, 65536, dtype=">u2"),
        "f2": np.array([1.5, -np.inf, np.nan], dtype=">f2"),
    }
    fresh = {n: np.zeros(v.shape, v.dtype.newbyteorder("=")) for n, v in values.items()}
    _round_trip(tmp_path, values, fresh)


def _numpy_sources() -> dict[str, np.ndarray]:
    base = np.arange(40, dtype=np.float64) * 1.5
    return {
        "strided": base[::2],
        "reversed": np.arange(9, dtype=np.int16)[::-1],
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
        "transposed": np.arange(24, dtype=np.uint16).reshape(2, 3, 4).transpose(2, 0, 1),
        "column": np.arange(30, dtype=np.float32).reshape(6, 5)[:, 3],
        "big_endian": np.arange(6, dtype=">i8").reshape(2, 3),
        "big_endian_strided": np.arange(20, dtype=">f4")[1::3],
        "scalar_array": np.array(7.25, dtype=np.float32),
        "empty": np.zeros((0, 3), np.float64),
        "bool_view": np.array([True, False, True, True, False, False])[::-1],
    }


def test_non_contiguous_and_big_endian_sources_via_numpy_state(tmp_path):
    source = zc.NumpyState()
    originals = _numpy_sources()
    for name, value in originals.items():
        assert not value.flags.c_contiguous or name in ("big_endian", "scalar_array", "empty")
        setattr(source, name, value)
    source.counter = np.int64(41)
    path = zc.Checkpoint(s=source).write(tmp_path / "ckpt")

    # Restore into live arrays of the same (non-contiguous, byte-swapped) layouts.
    target = zc.NumpyState()
    backing = {}
    for name, value in originals.items():
        big = np.full((value.size * 3 + 3,), 99, dtype=value.dtype).view(value.dtype)
        live = (
            np.lib.stride_tricks.as_strided(
                big[1:], shape=value.shape, strides=tuple(3 * s for s in _c_strides(value))
            )
            if value.ndim
            else np.full((), 99, value.dtype)
        )
        backing[name] = (big, live)
        setattr(target, name, live)
    target.counter = np.int64(0)
    zc.Checkpoint(s=target).restore(path).assert_consumed()
    for name, value in originals.items():
        big, live = backing[name]
        assert getattr(target, name) is live  # restored in place
        assert same_bits(live, value), name
        if value.ndim:
            # Only the elements the strided view covers changed.
            outside = big[_outside_mask(big, live)]
            assert outside.size == big.size - value.size
            assert np.all(outside == np.array(99, big.dtype)), name
    assert target.counter == np.int64(41) and isinstance(target.counter, np.int64)

    # Restore into an empty NumpyState: the attributes are created.
    created = zc.NumpyState()
    zc.Checkpoint(s=created).restore(path).assert_consumed()
    for name, value in originals.items():
        assert same_bits(getattr(created, name), value), name


def _c_strides(value: np.ndarray) -> tuple[int, ...]:
    strides = []
    step = value.dtype.itemsize
    for size in reversed(value.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _outside_mask(big: np.ndarray, live: np.ndarray) -> np.ndarray:
    """True for the elements of ``big`` that ``live`` (a view of it) does not cover."""
    covered = np.zeros(big.shape, bool)
    start = live.__array_interface__["data"][0] - big.__array_interface__["data"][0]
    item = big.dtype.itemsize
    offsets = np.zeros(live.shape, np.int64) + start
    for axis, (size, stride) in enumerate(zip(live.shape, live.strides, strict=True)):
        index = np.arange(size).reshape([-1 if a == axis else 1 for a in range(live.ndim)])
        offsets = offsets + index * stride
    covered[(offsets // item).ravel()] = True
    return ~covered


# Many chunks through array_io directly --------------------------------------------


def _storage(tmp_path, name: str = "store") -> LocalStorage:
    root = tmp_path / name
    root.mkdir()
    return LocalStorage(str(root), fsync=False)


def _chunk_files(root, key: str) -> list[str]:
    """The chunk files of array ``key`` (format 2: ``c.<i>.<j>`` beside its zarr.json)."""
    return sorted(name[2:] for name in os.listdir(os.path.join(root, key)) if name.startswith("c."))


MANY_CHUNKS = {
    "a/.ATTRIBUTES/f32": ("float32", (37, 5, 3)),
    "a/.ATTRIBUTES/bf16": ("bfloat16", (50, 7)),
    "b/.ATTRIBUTES/c128": ("complex128", (11, 3)),
    "b/.ATTRIBUTES/i8": ("int8", (3, 4, 29)),
    "c/.ATTRIBUTES/bool": ("bool", (101,)),
    "c/.ATTRIBUTES/f8": ("float8_e5m2", (64, 2)),
    "c/.ATTRIBUTES/u64": ("uint64", (2, 2, 2, 9)),
}


@pytest.mark.parametrize("threads", [1, 8])
def test_many_chunks_round_trip(tmp_path, threads):
    storage = _storage(tmp_path)
    arrays = {
        key: random_array(d, s, seed=i) for i, (key, (d, s)) in enumerate(MANY_CHUNKS.items())
    }
    files = array_io.write_arrays(
        storage, list(arrays.items()), options=CheckpointOptions(chunk_bytes=48, threads=threads)
    )
    by_key = {f.key: f for f in files}
    for key, value in arrays.items():
        layout = array_io.read_layout(storage, key)
        assert layout.shape == value.shape and layout.dtype == value.dtype
        assert math.prod(layout.grid) > 2
        names = _chunk_files(storage.root, key)
        assert len(names) == math.prod(layout.grid)
        for coords, _ in layout.chunks():
            rel = ".".join(map(str, coords))
            assert rel in names
            path = os.path.join(storage.root, key, f"c.{rel}")
            data = Path(path).read_bytes()
            assert len(data) == layout.chunk_nbytes + 4
            assert int.from_bytes(data[-4:], "little") == crc32c.crc32c(data[:-4])
            record = by_key[f"{key}/c.{rel}"]
            # The manifest holds the chunk's own CRC: a whole chunk file's CRC32C
            # is the same constant for every chunk (the residue).
            assert (record.size, record.crc32c) == (len(data), crc32c.crc32c(data[:-4]))
        out = random_array(MANY_CHUNKS[key][0], value.shape, seed=99)
        array_io.read_arrays(
            storage, [(key, layout, out)], by_key, CheckpointOptions(threads=threads)
        )
        assert same_bits(out, value), key
    # Metadata of every array and of every group above one is listed too.
    assert {"a/zarr.json", "a/.ATTRIBUTES/zarr.json", "c/.ATTRIBUTES/bool/zarr.json"} <= set(by_key)
    for record in files:
        data = Path(os.path.join(storage.root, record.key)).read_bytes()
        payload = data if record.key.endswith("zarr.json") else data[:-4]
        assert (record.size, record.crc32c) == (len(data), crc32c.crc32c(payload))
        assert array_io.file_checksum(record.key, data) == record.crc32c


def test_chunk_file_holds_little_endian_rows_zero_padding_and_crc(tmp_path):
    storage = _storage(tmp_path)
    value = np.arange(10 * 3, dtype=">i4").reshape(10, 3)  # big-endian source
    array_io.write_arrays(
        storage, [("x", value)], CheckpointOptions(chunk_bytes=48)
    )  # 4 rows per chunk
    layout = array_io.read_layout(storage, "x")
    assert layout.chunk_shape == (4, 3) and layout.grid == (3, 1)
    edge = Path(os.path.join(storage.root, "x", "c.2.0")).read_bytes()
    expected = value[8:10].astype("<i4").tobytes() + bytes(2 * 3 * 4)
    assert edge[:-4] == expected
    assert edge[-4:] == crc32c.crc32c(expected).to_bytes(4, "little")


def test_all_zero_array_has_every_chunk_file(tmp_path):
    storage = _storage(tmp_path)
    zeros = np.zeros((50, 4), np.float32)
    array_io.write_arrays(
        storage, [("z", zeros), ("s", np.zeros((), np.int64))], CheckpointOptions(chunk_bytes=32)
    )
    layout = array_io.read_layout(storage, "z")
    assert layout.grid == (25, 1)
    names = _chunk_files(storage.root, "z")
    assert names == sorted(f"{i}.0" for i in range(25))
    empty_chunk = bytes(32)
    for name in names:
        data = Path(os.path.join(storage.root, "z", f"c.{name}")).read_bytes()
        assert data == empty_chunk + crc32c.crc32c(empty_chunk).to_bytes(4, "little")
    scalar_chunk = os.path.join(storage.root, "s", "c")  # a 0-d array's one chunk key
    assert Path(scalar_chunk).read_bytes() == bytes(8) + crc32c.crc32c(bytes(8)).to_bytes(
        4, "little"
    )


def test_all_zero_variable_chunk_is_written_by_checkpoint(tmp_path):
    holder = Holder({"zeros": np.zeros((64, 8), np.float32), "scalar": np.zeros((), np.int8)})
    path = zc.Checkpoint(h=holder).write(tmp_path / "ckpt")
    key = "h/zeros/.ATTRIBUTES/VARIABLE_VALUE"
    chunk = os.path.join(path, key, "c.0.0")
    assert os.path.getsize(chunk) == 64 * 8 * 4 + 4
    scalar_chunk = os.path.join(path, "h/scalar/.ATTRIBUTES/VARIABLE_VALUE", "c")
    assert os.path.isfile(scalar_chunk) and os.path.getsize(scalar_chunk) == 1 + 4
    fresh = Holder({"zeros": np.ones((64, 8), np.float32), "scalar": np.ones((), np.int8)})
    zc.Checkpoint(h=fresh).restore(path).assert_consumed()
    assert not fresh.zeros.numpy().any() and fresh.scalar.numpy() == 0


# Damaged chunk files -------------------------------------------------------------


def _saved_model(tmp_path):
    values = {
        "matrix": random_array("float32", (16, 4), seed=3),
        "vector": random_array("int64", (5,), seed=4),
    }
    path = zc.Checkpoint(h=Holder(values)).write(tmp_path / "ckpt")
    return path, values


MATRIX_KEY = "h/matrix/.ATTRIBUTES/VARIABLE_VALUE"


def test_missing_chunk_raises_missing_chunk_error_naming_key_and_chunk(tmp_path):
    path, values = _saved_model(tmp_path)
    os.remove(os.path.join(path, MATRIX_KEY, "c.0.0"))
    fresh = Holder({n: np.zeros_like(v) for n, v in values.items()})
    with pytest.raises(MissingChunkError) as info:
        zc.Checkpoint(h=fresh).restore(path)
    message = str(info.value)
    assert MATRIX_KEY in message
    assert "(0, 0)" in message and "c.0.0" in message


def test_missing_chunk_among_many(tmp_path):
    storage = _storage(tmp_path)
    value = random_array("float64", (40, 3), seed=5)
    files = array_io.write_arrays(
        storage, [("k/.ATTRIBUTES/v", value)], CheckpointOptions(chunk_bytes=48)
    )
    os.remove(os.path.join(storage.root, "k/.ATTRIBUTES/v", "c.7.0"))
    layout = array_io.read_layout(storage, "k/.ATTRIBUTES/v")
    with pytest.raises(MissingChunkError) as info:
        array_io.read_arrays(
            storage, [("k/.ATTRIBUTES/v", layout, np.empty((40, 3)))], by_key(files)
        )
    assert "'k/.ATTRIBUTES/v'" in str(info.value) and "(7, 0)" in str(info.value)


def test_missing_array_metadata_raises_missing_chunk_error(tmp_path):
    path, values = _saved_model(tmp_path)
    os.remove(os.path.join(path, MATRIX_KEY, "zarr.json"))
    fresh = Holder({n: np.zeros_like(v) for n, v in values.items()})
    with pytest.raises(MissingChunkError, match="h/matrix"):
        zc.Checkpoint(h=fresh).restore(path)


@pytest.mark.parametrize("position", [0, 100, 16 * 4 * 4 - 1, -4, -1])
def test_flipped_byte_raises_checksum_error_naming_key_and_chunk(tmp_path, position):
    path, values = _saved_model(tmp_path)
    chunk = os.path.join(path, MATRIX_KEY, "c.0.0")
    data = bytearray(Path(chunk).read_bytes())
    data[position] ^= 0x10
    Path(chunk).write_bytes(bytes(data))
    fresh = Holder({n: np.zeros_like(v) for n, v in values.items()})
    with pytest.raises(ChecksumError) as info:
        zc.Checkpoint(h=fresh).restore(path)
    message = str(info.value)
    assert MATRIX_KEY in message and "(0, 0)" in message and "c.0.0" in message


def test_flipped_byte_in_edge_chunk_padding_raises_checksum_error(tmp_path):
    storage = _storage(tmp_path)
    value = random_array("int32", (10, 3), seed=6)
    files = array_io.write_arrays(storage, [("p", value)], CheckpointOptions(chunk_bytes=48))
    chunk = os.path.join(storage.root, "p", "c.2.0")
    data = bytearray(Path(chunk).read_bytes())
    data[-5] ^= 0x01  # last padding byte: rows 10 and 11 do not exist
    Path(chunk).write_bytes(bytes(data))
    layout = array_io.read_layout(storage, "p")
    with pytest.raises(ChecksumError, match=r"\(2, 0\)"):
        array_io.read_arrays(storage, [("p", layout, np.empty((10, 3), np.int32))], by_key(files))


@pytest.mark.parametrize("change", ["empty", "minus-1", "minus-crc", "plus-1", "plus-1000"])
def test_truncated_or_extended_chunk_raises_corrupt_checkpoint_error(tmp_path, change):
    path, values = _saved_model(tmp_path)
    chunk = os.path.join(path, MATRIX_KEY, "c.0.0")
    data = Path(chunk).read_bytes()
    changed = {
        "empty": b"",
        "minus-1": data[:-1],
        "minus-crc": data[:-4],
        "plus-1": data + b"\x00",
        "plus-1000": data + bytes(1000),
    }[change]
    Path(chunk).write_bytes(changed)
    fresh = Holder({n: np.zeros_like(v) for n, v in values.items()})
    with pytest.raises(CorruptCheckpointError) as info:
        zc.Checkpoint(h=fresh).restore(path)
    assert MATRIX_KEY in str(info.value) and "(0, 0)" in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["codecs"].append({"name": "gzip", "configuration": {"level": 1}}),
        lambda d: d["codecs"].pop(),
        lambda d: d["codecs"][0].update(configuration={"endian": "big"}),
        lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[16, 2]),
        lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[0, 4]),
        lambda d: d.update(data_type="float64"),
        lambda d: d.update(data_type={"name": "float32"}),
        lambda d: d.update(data_type="object"),
        lambda d: d.update(shape=[16, 4, 1]),
        lambda d: d.pop("chunk_grid"),
    ],
    ids=[
        "gzip",
        "no-crc",
        "big-endian",
        "split-inner",
        "zero-chunk",
        "dtype",
        "dtype-dict",
        "object",
        "ndim",
        "no-grid",
    ],
)
def test_array_metadata_zarrckpt_did_not_write_is_rejected(tmp_path, edit):
    import json

    from zarrckpt.errors import ZarrckptError

    path, values = _saved_model(tmp_path)
    meta_path = os.path.join(path, MATRIX_KEY, "zarr.json")
    doc = json.loads(Path(meta_path).read_text())
    edit(doc)
    Path(meta_path).write_text(json.dumps(doc))
    fresh = Holder({n: np.zeros_like(v) for n, v in values.items()})
    with pytest.raises(ZarrckptError):
        zc.Checkpoint(h=fresh).restore(path)


# Reading into destinations of any layout -----------------------------------------


def test_read_into_non_contiguous_destinations(tmp_path):
    storage = _storage(tmp_path)
    value = random_array("float32", (30, 4), seed=7)
    files = array_io.write_arrays(storage, [("v", value)], CheckpointOptions(chunk_bytes=40))
    layout = array_io.read_layout(storage, "v")
    assert math.prod(layout.grid) >= 10

    wide = np.full((30, 8), -1.0, np.float32)
    strided = wide[:, ::2]
    fortran = np.asfortranarray(np.full((30, 4), -1.0, np.float32))
    transposed = np.full((4, 30), -1.0, np.float32).T
    swapped = np.full((30, 4), -1.0, ">f4")
    backing = np.full(200, -1.0, np.float32)
    offset_view = backing[37 : 37 + 120].reshape(30, 4)  # contiguous, not at offset 0
    for out in (strided, fortran, transposed, swapped, offset_view):
        array_io.read_arrays(storage, [("v", layout, out)], by_key(files))
        assert same_bits(out, value)
    assert np.all(wide[:, 1::2] == -1.0)
    assert np.all(backing[:37] == -1.0) and np.all(backing[157:] == -1.0)


def test_read_rejects_destination_of_another_shape_or_dtype(tmp_path):
    storage = _storage(tmp_path)
    files = array_io.write_arrays(storage, [("v", np.arange(12, dtype=np.int32).reshape(3, 4))])
    layout = array_io.read_layout(storage, "v")
    for out in (np.zeros((4, 3), np.int32), np.zeros((3, 4), np.int64), np.zeros(12, np.int32)):
        before = out.copy()
        with pytest.raises(CorruptCheckpointError):
            array_io.read_arrays(storage, [("v", layout, out)], by_key(files))
        assert np.array_equal(out, before)


def test_ctrl_c_waits_for_running_chunk_tasks_and_skips_the_rest() -> None:
    """An interrupt must not return while a worker still writes (an abort would race it)."""
    import _thread
    import threading
    import time

    started = threading.Event()
    finished: list[int] = []

    def slow(index: int) -> None:
        started.set()
        if index == 0:
            _thread.interrupt_main()  # Ctrl-C arrives while this task runs
        time.sleep(0.3)
        finished.append(index)

    tasks = [(1, (lambda i=i: slow(i))) for i in range(50)]
    options = CheckpointOptions(threads=2, inflight_bytes=1 << 20)
    with pytest.raises(KeyboardInterrupt):
        array_io.run_tasks(tasks, options, array_io.IOStats())
    done = list(finished)
    time.sleep(0.5)
    assert started.is_set() and 0 in done  # the running task ended before the raise
    assert finished == done  # and nothing ran after it
    assert len(done) < 10  # the rest were cancelled, not run
