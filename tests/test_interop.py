"""Checkpoints as open Zarr v3 hierarchies (zarr, tensorstore) and the commit protocol."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

import zarrckpt as zc
from tests.conftest import Adam, Model, manifest_entries, model_variables, random_array
from zarrckpt import array_io
from zarrckpt._commit import COMMIT_KEY, RECORD_KEY, TEMP_MARKER, LocalCommit
from zarrckpt._dtypes import SUPPORTED_DTYPE_NAMES
from zarrckpt._graph import build_save_plan
from zarrckpt._storage import LocalStorage
from zarrckpt.errors import CheckpointExistsError, CheckpointNotFoundError
from zarrckpt.options import CheckpointOptions
from zarrckpt.record import ObjectGraph
from zarrckpt.trackable import SaveableValue, SaveContext

# zarr warns that _COMMIT and object_graph.msgpack are not Zarr nodes; they are not meant to be.
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


def bits(a: np.ndarray) -> bytes:
    """The values' bytes in little-endian order (NaN payloads compare too)."""
    return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()


class Bag(zc.AutoTrackable):
    """Variables of every dtype and shape worth reading back."""

    def __init__(self, seed: int) -> None:
        for i, name in enumerate(SUPPORTED_DTYPE_NAMES):
            setattr(self, name, zc.Variable(random_array(name, (3, 5), seed + i)))
        self.scalar_bf16 = zc.Variable(random_array("bfloat16", (), seed))
        self.scalar_bool = zc.Variable(np.bool_(True))
        self.scalar_f64 = zc.Variable(np.float64(seed + 0.5))
        self.empty = zc.Variable(np.zeros((0, 3), np.float32))
        self.cube = zc.Variable(random_array("float32", (2, 3, 4), seed))
        self.named = zc.Dict(
            {
                "a/b é": zc.Variable(random_array("int32", (4,), seed)),
                "..": zc.Variable(random_array("uint8", (2, 2), seed)),
            }
        )


def _live_values(root: zc.Trackable) -> dict[str, np.ndarray]:
    """Every saved key and the live array it comes from."""
    plan = build_save_plan(root)
    return dict(plan.arrays)


def _write_everything(tmp_path):
    model = Model(seed=0)
    opt = Adam()
    opt.step(model_variables(model))
    ckpt = zc.Checkpoint(model=model, opt=opt, bag=Bag(seed=1))
    path = ckpt.save(tmp_path / "ckpt")
    return ckpt, path


def _zarr_arrays(path) -> dict[str, zarr.Array]:
    group = zarr.open_group(str(path), mode="r")
    return {
        name: node for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)
    }


def test_plain_zarr_reads_every_array_of_a_checkpoint(tmp_path):
    ckpt, path = _write_everything(tmp_path)
    live = _live_values(ckpt)
    arrays = _zarr_arrays(path)
    record = ObjectGraph.decode((tmp_path / "ckpt-1" / RECORD_KEY).read_bytes())
    record_keys = {a.key: a for _, a in record.attributes()}
    assert set(arrays) == set(record_keys) == set(live)
    assert "save_counter/.ATTRIBUTES/VARIABLE_VALUE" in arrays
    assert any(".OPTIMIZER_SLOT" in k for k in arrays)
    dtype_names = set()
    for key, array in arrays.items():
        value = live[key]
        stored = array[...] if array.ndim else array[()]
        stored = np.asarray(stored)
        assert stored.shape == value.shape == record_keys[key].shape, key
        assert stored.dtype == value.dtype.newbyteorder("="), key
        assert bits(stored) == bits(value), key
        dtype_names.add(record_keys[key].dtype)
    assert dtype_names == set(SUPPORTED_DTYPE_NAMES)
    assert bool(arrays["bag/scalar_bool/.ATTRIBUTES/VARIABLE_VALUE"][()]) is True
    assert arrays["bag/scalar_f64/.ATTRIBUTES/VARIABLE_VALUE"][()] == 1.5
    assert arrays["bag/scalar_bf16/.ATTRIBUTES/VARIABLE_VALUE"].dtype.name == "bfloat16"
    assert arrays["save_counter/.ATTRIBUTES/VARIABLE_VALUE"][()] == 1
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["zarrckpt"]["format"] == 2


def test_array_metadata_and_chunks_are_what_zarr_writes(tmp_path):
    ckpt, path = _write_everything(tmp_path)
    live = _live_values(ckpt)
    reference_root = tmp_path / "reference"
    for index, (key, value) in enumerate(live.items()):
        array_dir = os.path.join(path, key)
        meta = json.loads(Path(os.path.join(array_dir, "zarr.json")).read_text())
        codecs = meta["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "crc32c"], key
        if value.dtype.itemsize > 1:
            assert codecs[0]["configuration"] == {"endian": "little"}, key
        assert codecs[1] == {"name": "crc32c"}
        chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        reference = zarr.create_array(
            store=str(reference_root / str(index)),
            shape=value.shape,
            dtype=value.dtype.newbyteorder("="),
            chunks=chunks,
            serializer=BytesCodec(endian="little"),
            compressors=[Crc32cCodec()],
            fill_value=0,
            chunk_key_encoding=DOT_SEPARATED,
            config={"write_empty_chunks": True},
        )
        reference[...] = value
        assert json.loads((reference_root / str(index) / "zarr.json").read_text()) == meta, key
        theirs = _chunk_files(str(reference_root / str(index)))
        assert _chunk_files(array_dir) == theirs, key
        grid = [math.ceil(s / c) for s, c in zip(value.shape, chunks, strict=True)]
        assert len(theirs) == math.prod(grid), key


# Format 2 chunk keys: zarr's default encoding with the "." separator (c.0.1).
DOT_SEPARATED = {"name": "default", "separator": "."}


def _chunk_files(array_dir: str) -> dict[str, bytes]:
    """The chunk files of an array (``c`` or ``c.<i>.<j>``, beside its zarr.json), by name."""
    found = {}
    for name in os.listdir(array_dir):
        full = os.path.join(array_dir, name)
        if name == "c" or name.startswith("c."):
            found[name] = Path(full).read_bytes()
        else:
            assert name == "zarr.json", full  # nothing else: no c/ directories
    return found


@pytest.mark.parametrize(
    ("dtype_name", "shape"),
    [
        ("float32", (37, 5)),
        ("bfloat16", (50, 3)),
        ("bool", (101,)),
        ("complex64", (7, 5, 2)),
        ("float8_e4m3fn", (10, 9)),
        ("int16", (3, 5, 7)),
    ],
)
def test_multi_chunk_files_match_zarr_byte_for_byte(tmp_path, dtype_name, shape):
    # Small chunks force edge chunks with padding, the case most likely to differ.
    storage = LocalStorage(str(tmp_path / "ours"), fsync=False)
    os.makedirs(storage.root)
    value = random_array(dtype_name, shape, seed=11)
    array_io.write_arrays(storage, [("v", value)], CheckpointOptions(chunk_bytes=40))
    layout = array_io.read_layout(storage, "v")
    assert math.prod(layout.grid) > 2
    assert any(s % c for s, c in zip(shape, layout.chunk_shape, strict=True))  # padded edge
    reference = zarr.create_array(
        store=str(tmp_path / "zarr"),
        shape=shape,
        dtype=value.dtype,
        chunks=layout.chunk_shape,
        serializer=BytesCodec(endian="little"),
        compressors=[Crc32cCodec()],
        fill_value=0,
        chunk_key_encoding=DOT_SEPARATED,
        config={"write_empty_chunks": True},
    )
    reference[...] = value
    ours = _chunk_files(os.path.join(storage.root, "v"))
    theirs = _chunk_files(str(tmp_path / "zarr"))
    assert len(ours) == math.prod(layout.grid)
    assert ours == theirs
    # zarr reads ours, and we read theirs.
    assert bits(zarr.open_array(os.path.join(storage.root, "v"), mode="r")[...]) == bits(value)
    theirs_storage = LocalStorage(str(tmp_path), fsync=False)
    out = np.zeros(shape, value.dtype)
    array_io.read_arrays(
        theirs_storage,
        [("zarr", array_io.read_layout(theirs_storage, "zarr"), out)],
        manifest_entries(theirs_storage),
    )
    assert bits(out) == bits(value)


def _tensorstore_read(path: str) -> np.ndarray:
    tensorstore = pytest.importorskip("tensorstore")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
    return np.asarray(tensorstore.open(spec).result().read().result())


def test_tensorstore_reads_float32_and_bfloat16_arrays(tmp_path):
    ckpt, path = _write_everything(tmp_path)
    live = _live_values(ckpt)
    checked = 0
    for key, value in live.items():
        if value.dtype.name not in ("float32", "bfloat16"):
            continue
        stored = _tensorstore_read(os.path.join(path, key))
        assert stored.dtype == value.dtype and stored.shape == value.shape, key
        assert bits(stored) == bits(value), key
        checked += 1
    assert checked >= 12  # model, slots, bag


@pytest.mark.parametrize("dtype_name", SUPPORTED_DTYPE_NAMES)
def test_tensorstore_reads_every_dtype(tmp_path, dtype_name):
    storage = LocalStorage(str(tmp_path / "s"), fsync=False)
    os.makedirs(storage.root)
    value = random_array(dtype_name, (23, 3), seed=5)
    array_io.write_arrays(storage, [("v", value)], CheckpointOptions(chunk_bytes=64))
    stored = _tensorstore_read(os.path.join(storage.root, "v"))
    assert stored.shape == value.shape
    assert bits(stored) == bits(value)


# Commit protocol --------------------------------------------------------------


def _temporaries(parent) -> list[str]:
    return [n for n in os.listdir(parent) if TEMP_MARKER in n]


def test_checkpoint_being_written_is_not_restorable(tmp_path):
    model = Model(seed=0)
    final = tmp_path / "ckpt"
    commit = LocalCommit(str(final))
    storage = commit.create()
    plan = build_save_plan(zc.Checkpoint(model=model))
    files = array_io.write_arrays(storage, plan.arrays)

    (temporary,) = _temporaries(tmp_path)
    assert temporary.startswith(".ckpt" + TEMP_MARKER)
    assert os.path.join(tmp_path, temporary) == storage.root
    assert not final.exists()
    fresh = Model(seed=5)
    before = [v.numpy().copy() for v in model_variables(fresh)]
    for path in (final, tmp_path / temporary):
        with pytest.raises(CheckpointNotFoundError):
            zc.Checkpoint(model=fresh).restore(path)
    assert all(
        np.array_equal(v.numpy(), b) for v, b in zip(model_variables(fresh), before, strict=True)
    )

    commit.finalize(plan.graph.encode(), files)
    assert final.is_dir() and _temporaries(tmp_path) == []
    zc.Checkpoint(model=fresh).restore(final).assert_consumed()
    for v, w in zip(model_variables(fresh), model_variables(model), strict=True):
        assert np.array_equal(v.numpy(), w.numpy())


class _Observed(SaveableValue):
    """A saved value whose chunk reads, done while the save writes, look at the disk."""

    def __init__(self, value: np.ndarray, look) -> None:
        self._value = value
        self._look = look

    def value(self, context: SaveContext) -> np.ndarray:
        array = self._value.view(_Spy)
        array.look = self._look
        return array

    def destination(self, shape, dtype, key):
        return np.empty(shape, dtype)


class _Spy(np.ndarray):
    look = None

    def __getitem__(self, index):
        look = getattr(self, "look", None)
        if look is not None:
            look()
        return np.asarray(self).__getitem__(index)


class _Probe(zc.Trackable):
    def __init__(self, look) -> None:
        self._zc_look = look

    def _saveable_values(self):
        return {"VARIABLE_VALUE": _Observed(np.arange(64, dtype=np.float64), self._zc_look)}


def test_final_path_does_not_exist_while_chunks_are_written(tmp_path):
    model = Model(seed=0)
    final = tmp_path / "ckpt"
    seen = []
    lock = threading.Lock()

    def look() -> None:
        # Runs inside the save, while chunk files are being written.
        with lock:
            entry = {"final": final.exists(), "temporaries": _temporaries(tmp_path)}
            try:
                zc.Checkpoint(model=Model(seed=3)).restore(final)
                entry["restore"] = "restored"
            except CheckpointNotFoundError:
                entry["restore"] = "not found"
            seen.append(entry)

    zc.Checkpoint(model=model, probe=_Probe(look)).write(final)
    assert seen, "the probe never ran during the save"
    for entry in seen:
        assert entry == {
            "final": False,
            "temporaries": entry["temporaries"],
            "restore": "not found",
        }
        assert len(entry["temporaries"]) == 1
    assert final.is_dir() and (final / COMMIT_KEY).is_file()
    assert _temporaries(tmp_path) == []
    fresh = Model(seed=4)
    zc.Checkpoint(model=fresh).restore(final).expect_partial().assert_existing_objects_matched()
    assert np.array_equal(fresh.embedding.numpy(), model.embedding.numpy())


def _snapshot(root) -> dict[str, str]:
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            full = os.path.join(directory, name)
            out[os.path.relpath(full, root)] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
    return out


def test_writing_to_an_existing_checkpoint_raises_and_keeps_it(tmp_path):
    model = Model(seed=0)
    ckpt = zc.Checkpoint(model=model)
    path = ckpt.write(tmp_path / "ckpt")
    before = _snapshot(path)
    assert COMMIT_KEY in before and len(before) > 10
    for var in model_variables(model):
        var.assign(np.full(var.shape, 7.0))
    with pytest.raises(CheckpointExistsError):
        ckpt.write(path)
    with pytest.raises(CheckpointExistsError):
        zc.Checkpoint(model=Model(seed=1)).write(path)
    assert _snapshot(path) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    fresh = Model(seed=2)
    zc.Checkpoint(model=fresh).restore(path).assert_consumed()
    assert np.array_equal(fresh.embedding.numpy(), Model(seed=0).embedding.numpy())


@pytest.mark.parametrize("kind", ["empty-dir", "file", "zarr-group"])
def test_writing_over_anything_existing_raises(tmp_path, kind):
    target = tmp_path / "ckpt"
    if kind == "empty-dir":
        target.mkdir()
    elif kind == "file":
        target.write_bytes(b"precious")
    else:
        zarr.create_group(str(target))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointExistsError):
        zc.Checkpoint(model=Model(seed=0)).write(target)
    assert _snapshot(tmp_path) == before
    assert _temporaries(tmp_path) == []


def test_restore_without_commit_marker_raises_not_found(tmp_path):
    path = zc.Checkpoint(model=Model(seed=0)).write(tmp_path / "ckpt")
    os.remove(os.path.join(path, COMMIT_KEY))
    fresh = Model(seed=5)
    before = [v.numpy().copy() for v in model_variables(fresh)]
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=fresh).restore(path)
    for var, value in zip(model_variables(fresh), before, strict=True):
        assert np.array_equal(var.numpy(), value)


def test_restore_of_missing_path_or_plain_zarr_group_raises_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=Model(seed=0)).restore(tmp_path / "nothing-here")
    group = zarr.create_group(str(tmp_path / "plain"))
    group.create_array("x", shape=(3,), dtype="float32")
    with pytest.raises(CheckpointNotFoundError):
        zc.Checkpoint(model=Model(seed=0)).restore(tmp_path / "plain")
