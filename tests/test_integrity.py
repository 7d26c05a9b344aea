"""A restore returns exactly what was committed, or fails with a zarrckpt error.

Each test here is a hole a hostile tester found: chunks swapped or copied in
from elsewhere, a `_COMMIT` whose bytes nothing protected, hostile `zarr.json`
and record values, files that are not regular files. See docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import deadline, reseal_manifest, traced_peak
from zarrckpt._commit import COMMIT_KEY, RECORD_KEY, Manifest
from zarrckpt.cli import main
from zarrckpt.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    CorruptCheckpointError,
    DependencyNameError,
    InvalidKeyError,
    ZarrckptError,
)

KEY = "model/w/.ATTRIBUTES/VARIABLE_VALUE"
MiB = 1 << 20


def _model(seed: int = 0) -> zc.AutoTrackable:
    rng = np.random.default_rng(seed)
    model = zc.AutoTrackable()
    model.w = zc.Variable(rng.standard_normal((64, 16)).astype(np.float32))
    model.b = zc.Variable(rng.integers(0, 100, 7).astype(np.int16))
    return model


def _saved(tmp_path: Path, name: str = "c", seed: int = 0, **options) -> Path:
    options.setdefault("chunk_bytes", 1024)  # w: 4 chunks of 16 rows
    path = zc.Checkpoint(model=_model(seed)).write(
        tmp_path / name, options=zc.CheckpointOptions(**options)
    )
    return Path(path)


def _restore_fails(
    path: Path,
    error: type[Exception] = CorruptCheckpointError,
    match: str | None = None,
    *,
    before_reading: bool = True,
) -> None:
    """Restore into a fresh model must raise ``error``.

    ``before_reading``: the problem is found before any value is read, so the
    model keeps its values (a chunk found bad part-way may leave the chunks
    read before it in place: values are read straight into live memory).
    """
    fresh = _model(seed=99)
    before = [fresh.w.numpy().copy(), fresh.b.numpy().copy()]
    with pytest.raises(error, match=match):
        zc.Checkpoint(model=fresh).restore(path)
    if before_reading:
        assert np.array_equal(fresh.w.numpy(), before[0])
        assert np.array_equal(fresh.b.numpy(), before[1])


# Wrong values with no error ----------------------------------------------------------


def test_two_swapped_chunks_of_one_checkpoint_are_an_error(tmp_path):
    # Each chunk carries a correct CRC of its own; only the manifest tells them apart.
    path = _saved(tmp_path)
    first, second = path / KEY / "c.0.0", path / KEY / "c.2.0"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    _restore_fails(
        path, ChecksumError, match="not the chunk the commit manifest lists", before_reading=False
    )
    with pytest.raises(ChecksumError, match=r"c\.0\.0: chunk \(0, 0\)"):
        zc.load_variable(path, KEY, index=slice(0, 4))
    with pytest.raises(ChecksumError):
        zc.verify(path)


def test_a_chunk_copied_in_from_another_checkpoint_is_an_error(tmp_path):
    path, other = _saved(tmp_path, "c", seed=0), _saved(tmp_path, "d", seed=1)
    chunk = Path(KEY) / "c.1.0"
    (path / chunk).write_bytes((other / chunk).read_bytes())
    _restore_fails(
        path, ChecksumError, match="another place, checkpoint or time", before_reading=False
    )
    with pytest.raises(ChecksumError):
        zc.load_variable(path, KEY)
    # Rows of the untouched chunks still read (nothing but the bad chunk is refused).
    assert np.array_equal(zc.load_variable(path, KEY, index=slice(0, 16)), _model(0).w.numpy()[:16])


def test_restore_while_the_path_is_deleted_and_written_again_never_mixes(tmp_path):
    seeds = itertools.count()
    path = _saved(tmp_path)
    replaced: list[int] = []

    def replace_once(_: int) -> None:
        if not replaced:  # after the first chunk: another checkpoint at the same path
            replaced.append(1)
            zc.delete_checkpoint(path)
            _saved(tmp_path, "c", seed=7 + next(seeds))  # other values each time

    fresh = _model(seed=99)
    options = zc.CheckpointOptions(threads=1, progress=replace_once)
    with pytest.raises(CheckpointNotFoundError, match="deleted or replaced while it was being"):
        zc.Checkpoint(model=fresh).restore(path, options=options)
    assert replaced
    replaced.clear()  # load_variable of the new one, replaced again while it reads
    with pytest.raises(CheckpointNotFoundError, match="deleted or replaced"):
        zc.load_variable(path, KEY, options=options)


def _flip_created(path: Path, transform: Callable[[float], float]) -> None:
    """Give the manifest another time, re-sealed (a forger, or a clock gone wrong)."""
    manifest = Manifest.decode((path / COMMIT_KEY).read_bytes(), where="test")
    changed = dataclasses.replace(manifest, created=transform(manifest.created))
    (path / COMMIT_KEY).write_bytes(changed.encode())


def test_a_flipped_bit_in_the_commit_time_is_detected(tmp_path):
    path = _saved(tmp_path)
    data = bytearray((path / COMMIT_KEY).read_bytes())
    at = data.index(b"created") + len(b"created") + 1 + 7  # last byte of the float64
    data[at] ^= 0x01  # before: the time moved by a few nanoseconds, and verify said OK
    (path / COMMIT_KEY).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC32C does not match its bytes"):
        zc.verify(path)
    [info] = zc.list_checkpoints(tmp_path)
    assert not info.committed and "CRC32C" in info.damage and info.state == "DAMAGED"
    _restore_fails(path, CorruptCheckpointError)


@pytest.mark.parametrize("created", [math.nan, math.inf, -math.inf, 1e300, -1.0])
def test_impossible_commit_times_are_corruption_and_ls_lists_them(tmp_path, capsys, created):
    path = _saved(tmp_path, "ckpt-1")
    _flip_created(path, lambda _: created)
    with pytest.raises(CorruptCheckpointError, match="is not a time between 1970 and 9999"):
        zc.verify(path)
    assert zc.latest_checkpoint(tmp_path) is None
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "DAMAGED" in out.out and "ckpt-1" in out.out and "1970 and 9999" in out.err


def _rewrite_zarr_json(path: Path, key: str, change: Callable[[dict], object]) -> None:
    """Change an array's zarr.json and re-seal the manifest; the string "1e400" becomes 1e400."""
    meta = path / key / "zarr.json"
    doc = json.loads(meta.read_text())
    change(doc)
    meta.write_text(json.dumps(doc).replace('"1e400"', "1e400"))
    reseal_manifest(path)


def test_verify_decodes_compressed_chunks_so_a_codec_change_is_caught(tmp_path):
    path = _saved(tmp_path, compression={"*": zc.Zstd(level=3)})
    zc.verify(path)

    def to_blosc(doc: dict) -> None:
        doc["codecs"][1] = {
            "name": "blosc",
            "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle", "typesize": 4},
        }

    _rewrite_zarr_json(path, KEY, to_blosc)  # every CRC agrees; the chunks are zstd frames
    with pytest.raises(CorruptCheckpointError, match="decoded bytes"):
        zc.verify(path)
    assert main(["verify", str(path)]) == 4


def test_bool_chunks_holding_other_bytes_are_corruption(tmp_path):
    model = zc.AutoTrackable()
    model.mask = zc.Variable(np.array([True, False, True, True]))
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c"))
    chunk = path / "model/mask/.ATTRIBUTES/VARIABLE_VALUE/c.0"
    body = bytes([1, 0, 2, 1])  # a 2 is no bool: numpy would read garbage truth values
    chunk.write_bytes(body + crc32c.crc32c(body).to_bytes(4, "little"))
    reseal_manifest(path)
    with pytest.raises(CorruptCheckpointError, match="bytes other than 0 and 1"):
        zc.verify(path)
    fresh = zc.AutoTrackable()
    fresh.mask = zc.Variable(np.zeros(4, bool))
    with pytest.raises(CorruptCheckpointError, match="bytes other than 0 and 1"):
        zc.Checkpoint(model=fresh).restore(path)
    with pytest.raises(CorruptCheckpointError):
        zc.load_variable(path, "model/mask")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shape", ["64", "16"]),
        ("shape", [64.0, 16.0]),
        ("shape", [64, True]),
        ("chunk_shape", ["16", 16]),
        ("chunk_shape", [16.0, 16]),
        ("shape", ["1e400", 16]),  # json reads inf: an OverflowError before
        ("chunk_shape", ["1e400", 16]),
    ],
)
def test_shapes_that_are_not_json_ints_are_corruption(tmp_path, field, value):
    path = _saved(tmp_path)

    def change(doc: dict) -> None:
        if field == "chunk_shape":
            doc["chunk_grid"]["configuration"]["chunk_shape"] = value
        else:
            doc[field] = value

    _rewrite_zarr_json(path, KEY, change)
    _restore_fails(path, CorruptCheckpointError, match="malformed array metadata")
    with pytest.raises(CorruptCheckpointError, match="must hold ints"):
        zc.verify(path)


# Hostile metadata: bounded memory, no hangs, only zarrckpt errors ------------------------


def test_a_tiny_chunk_grid_is_refused_before_any_per_chunk_structure(tmp_path):
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.ones(1 << 20, np.float32))  # 4 MiB, one chunk
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c"))
    key = "model/w/.ATTRIBUTES/VARIABLE_VALUE"

    def one_element_chunks(doc: dict) -> None:
        doc["chunk_grid"]["configuration"]["chunk_shape"] = [1]

    _rewrite_zarr_json(path, key, one_element_chunks)
    fresh = zc.AutoTrackable()
    fresh.w = zc.Variable(np.zeros(1 << 20, np.float32))
    match = r"makes 1048576 chunks \(grid \[1048576\]\), _COMMIT lists 1"

    def attempts() -> None:
        with pytest.raises(CorruptCheckpointError, match=match):
            zc.Checkpoint(model=fresh).restore(path)
        with pytest.raises(CorruptCheckpointError, match=match):
            zc.verify(path)
        with pytest.raises(CorruptCheckpointError, match=match):
            zc.load_variable(path, key)

    assert traced_peak(attempts) < 2 * MiB  # before: 1.6 GB and 10 s of chunk tasks
    assert not fresh.w.numpy().any()


def test_a_huge_sparse_commit_file_is_refused_before_it_is_read(tmp_path):
    path = _saved(tmp_path, "ckpt-1")
    with open(path / COMMIT_KEY, "r+b") as file:
        file.truncate(3 << 29)  # 1.5 GiB, sparse: costs no disk
    manager_dir = tmp_path

    def attempts() -> None:
        [info] = zc.list_checkpoints(manager_dir)
        assert not info.committed and "over the limit" in info.damage
        with pytest.warns(RuntimeWarning, match="cannot be read"):
            zc.CheckpointManager(zc.Checkpoint(model=_model()), manager_dir)
        with pytest.raises(CorruptCheckpointError, match="over the limit"):
            zc.Checkpoint(model=_model()).restore(path)

    assert traced_peak(attempts) < 8 * MiB  # before: the whole 1.5 GiB was read


def test_a_chunk_that_is_a_symlink_is_never_followed(tmp_path):
    path = _saved(tmp_path)
    chunk = path / KEY / "c.1.0"
    chunk.unlink()
    chunk.symlink_to("/dev/zero")  # before: a read that grows without bound
    _restore_fails(path, CorruptCheckpointError, match="is a symbolic link", before_reading=False)
    with pytest.raises(CorruptCheckpointError, match="symbolic link"):
        zc.verify(path)


def test_a_directory_on_the_way_that_is_a_symlink_is_never_followed(tmp_path):
    path = _saved(tmp_path)
    outside = tmp_path / "outside"
    os.rename(path / "model" / "w", outside)
    os.symlink(outside, path / "model" / "w")  # the same bytes, reached outside the checkpoint
    _restore_fails(
        path, CorruptCheckpointError, match="model/w: is a symbolic link", before_reading=False
    )


@pytest.mark.parametrize("target", [COMMIT_KEY, RECORD_KEY, f"{KEY}/c.0.0", f"{KEY}/zarr.json"])
def test_fifos_and_directories_in_place_of_files_never_hang_or_escape(tmp_path, capsys, target):
    for kind in ("fifo", "directory"):
        path = _saved(tmp_path, f"ckpt-{kind}")
        (path / target).unlink()
        if kind == "fifo":
            os.mkfifo(path / target)
        else:
            (path / target).mkdir()
        with deadline(20):
            _restore_fails(
                path,
                CorruptCheckpointError,
                match="a checkpoint holds only regular",
                before_reading=not target.startswith(KEY),  # other values may be read first
            )
            with pytest.raises(ZarrckptError):
                zc.verify(path)
            assert main(["ls", str(tmp_path)]) == 0
            assert main(["verify", str(path)]) in (3, 4)
    capsys.readouterr()


def _forge_record_shape(path: Path, key: str, shape: list[int]) -> None:
    import msgpack

    doc = msgpack.unpackb((path / RECORD_KEY).read_bytes(), raw=False)
    for node in doc["nodes"]:
        for attribute in node["attributes"]:
            if attribute[1] == key:
                attribute[2] = shape
    (path / RECORD_KEY).write_bytes(msgpack.packb(doc, use_bin_type=True))
    reseal_manifest(path)


class _Blob(zc.PythonState):
    def __init__(self) -> None:
        self.data = b""

    def serialize(self) -> bytes:
        return self.data

    def deserialize(self, data: bytes) -> None:
        self.data = data


@pytest.mark.parametrize("kind", ["numpy", "python"])
def test_a_huge_shape_in_the_record_never_sizes_a_buffer(tmp_path, kind):
    holder = zc.NumpyState()
    if kind == "numpy":
        holder.table = np.arange(8, dtype=np.float64)
        key = "holder/table/.ATTRIBUTES/VARIABLE_VALUE"
    else:
        holder.blob = _Blob()
        holder.blob.data = b"12345678"
        key = "holder/blob/.ATTRIBUTES/py_state"
    path = Path(zc.Checkpoint(holder=holder).write(tmp_path / "c"))
    _forge_record_shape(path, key, [1 << 37])  # 1 TiB of float64; 128 GiB of bytes
    fresh = zc.NumpyState()
    if kind == "python":
        fresh.blob = _Blob()

    def restore() -> None:
        with pytest.raises(CorruptCheckpointError, match="the record says"):
            zc.Checkpoint(holder=fresh).restore(path)

    assert traced_peak(restore) < 2 * MiB  # before: a raw MemoryError
    assert "table" not in dir(fresh) or kind == "python"


@pytest.mark.parametrize("name", ["total", "count", "_zc_tracking_state", "__class__", "_private"])
def test_restore_never_creates_numpystate_attributes_that_shadow(tmp_path, name):
    class Stats(zc.NumpyState):
        def total(self) -> float:
            return float(np.sum(self.mean))

        @property
        def count(self) -> int:
            return 3

    saved = zc.NumpyState()
    saved.mean = np.arange(3, dtype=np.float32)
    saved.forged = np.ones(2, np.float32)
    path = Path(zc.Checkpoint(stats=saved).write(tmp_path / "c"))
    # Rename the child 'forged' to the hostile name, as a forger would.
    import msgpack

    doc = msgpack.unpackb((path / RECORD_KEY).read_bytes(), raw=False)
    for node in doc["nodes"]:
        for child in node["children"]:
            if child[0] == "forged":
                child[0] = name
    (path / RECORD_KEY).write_bytes(msgpack.packb(doc, use_bin_type=True))
    reseal_manifest(path)

    live = Stats()
    live.mean = np.zeros(3, np.float32)
    with pytest.raises(DependencyNameError, match=repr(name)):
        zc.Checkpoint(stats=live).restore(path)
    assert live.total() == 0.0 and live.count == 3  # the method and property are still there
    assert type(live) is Stats
    zc.Checkpoint(stats=live).write(tmp_path / "after")  # the next save still works


@pytest.mark.parametrize("name", ["_private", "total", "__dict__"])
def test_numpystate_refuses_array_names_that_shadow_at_assignment(name):
    class Stats(zc.NumpyState):
        def total(self) -> float:
            return 0.0

    stats = Stats()
    with pytest.raises(DependencyNameError, match="NoDependency"):
        setattr(stats, name, np.zeros(2))
    stats._private_copy = zc.NoDependency(np.zeros(2))  # the way to keep one out of checkpoints
    assert stats._private_copy.shape == (2,)


@pytest.mark.parametrize(
    ("codec", "match"),
    [
        ({"name": "zstd", "configuration": {"level": "high"}}, "level 'high' is not an int"),
        ({"name": "zstd", "configuration": {"level": "1e400"}}, "level inf is not an int"),
        ({"name": "zstd", "configuration": [["level", 3]]}, "is not a map"),
        ({"name": "blosc", "configuration": {"cname": "lz4", "clevel": 99, "shuffle": "shuffle"}},
         "clevel 99"),
        (["zstd"], "is not a map with a name"),
    ],
)  # fmt: skip
def test_hostile_codec_entries_are_corruption(tmp_path, codec, match):
    path = _saved(tmp_path, compression={"*": zc.Zstd(level=3)})

    def change(doc: dict) -> None:
        doc["codecs"][1] = codec

    _rewrite_zarr_json(path, KEY, change)
    _restore_fails(path, CorruptCheckpointError, match=match)
    with pytest.raises(CorruptCheckpointError):
        zc.load_variable(path, KEY)


def test_deeply_nested_zarr_json_is_corruption_not_a_recursion_error(tmp_path):
    path = _saved(tmp_path)
    (path / KEY / "zarr.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    reseal_manifest(path)
    _restore_fails(path, CorruptCheckpointError, match="malformed array metadata")


def test_unsafe_paths_in_the_commit_manifest_are_corruption_exit_4(tmp_path, capsys):
    path = _saved(tmp_path)
    manifest = Manifest.decode((path / COMMIT_KEY).read_bytes(), where="test")
    entry = manifest.files[0]
    files = (dataclasses.replace(entry, key="../../etc/passwd"), *manifest.files[1:])
    (path / COMMIT_KEY).write_bytes(dataclasses.replace(manifest, files=files).encode())
    with pytest.raises(CorruptCheckpointError, match="unsafe storage key"):
        zc.verify(path)
    assert main(["verify", str(path)]) == 4
    assert main(["show", str(path)]) == 4
    capsys.readouterr()


def _long_directory(root: Path, length: int) -> Path:
    parent = root
    while len(str(parent)) + 201 < length:
        parent = parent / ("d" * 200)
    return parent / ("e" * (length - len(str(parent)) - 1))


@pytest.mark.parametrize("length", [4010, 4090])
def test_a_key_too_long_below_a_long_parent_is_a_clear_error(tmp_path, length):
    # 4010: the temporary directory fits, a key below it does not; 4090: nothing fits.
    parent = _long_directory(tmp_path, length)
    model = zc.AutoTrackable()
    model.layer_with_a_long_name = zc.Variable(np.zeros(2, np.float32))
    ckpt = zc.Checkpoint(model=model)
    with pytest.raises(InvalidKeyError, match="shorter"):  # before: a raw ENAMETOOLONG OSError
        ckpt.write(parent / "c")
    assert not (parent / "c").exists()
    assert [p for p in parent.iterdir()] == [] if parent.exists() else True


def test_show_tree_and_dot_escape_control_characters(tmp_path, capsys):
    model = zc.AutoTrackable()
    hostile = "evil\x1b[2J\u202e"
    model._track_trackable(zc.Variable(np.zeros(2, np.float32)), hostile)
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    assert main(["show", "--tree", path]) == 0
    tree = capsys.readouterr().out
    assert "\x1b" not in tree and "\u202e" not in tree and "evil\\x1b[2J\\u202e" in tree
    assert main(["dot", path]) == 0
    dot = capsys.readouterr().out
    assert "\x1b" not in dot and "\u202e" not in dot and "evil\\\\x1b" in dot


# The matrix: every swap, every foreign chunk ------------------------------------------


def _chunk_paths(path: Path) -> list[Path]:
    other = {"zarr.json", RECORD_KEY, COMMIT_KEY}
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in other)


def test_every_swap_of_two_chunk_files_is_detected(tmp_path):
    # 20 chunk files of 3 arrays (before: 190 of 198 swaps restored wrong values silently).
    model = zc.AutoTrackable()
    rng = np.random.default_rng(3)
    model.a = zc.Variable(rng.standard_normal((40, 8)).astype(np.float32))  # 10 chunks
    model.b = zc.Variable(rng.standard_normal((24, 8)).astype(np.float32))  # 6 chunks
    model.c = zc.Variable(rng.integers(0, 9, (16, 32)).astype(np.int8))  # 4 chunks
    path = Path(
        zc.Checkpoint(model=model).write(
            tmp_path / "c", options=zc.CheckpointOptions(chunk_bytes=128)
        )
    )
    chunks = _chunk_paths(path)
    assert len(chunks) == 20
    original = {p: p.read_bytes() for p in chunks}
    detected = 0
    for i, j in itertools.combinations(range(len(chunks)), 2):
        first, second = chunks[i], chunks[j]
        first.write_bytes(original[second])
        second.write_bytes(original[first])
        with pytest.raises(ChecksumError):
            zc.verify(path)
        with pytest.raises(ChecksumError):
            zc.Checkpoint(model=model).restore(path)
        detected += 1
        first.write_bytes(original[first])
        second.write_bytes(original[second])
    assert detected == 190
    zc.verify(path)  # put back: whole again


def test_every_chunk_copied_in_from_another_checkpoint_is_detected(tmp_path):
    paths = [_saved(tmp_path, name, seed=seed) for name, seed in (("c", 0), ("d", 1))]
    chunks = [p.relative_to(paths[1]) for p in _chunk_paths(paths[1])]
    assert len(chunks) == 5
    for chunk in chunks:
        saved = (paths[0] / chunk).read_bytes()
        (paths[0] / chunk).write_bytes((paths[1] / chunk).read_bytes())
        with pytest.raises(ChecksumError, match="another place, checkpoint or time"):
            zc.load_variable(paths[0], str(chunk.parent))  # <key>/c.<i>[.<j>]
        (paths[0] / chunk).write_bytes(saved)


@pytest.mark.parametrize("limit", ["_MAX_FILES", "MAX_MANIFEST_BYTES"])
def test_a_save_readers_would_refuse_is_never_committed(tmp_path, monkeypatch, limit) -> None:
    """Readers refuse a manifest over these limits, so a writer must refuse to commit it."""
    from zarrckpt import _commit

    monkeypatch.setattr(_commit, limit, 5 if limit == "_MAX_FILES" else 300)
    ckpt = zc.Checkpoint(a=zc.Variable(np.ones(3)), b=zc.Variable(np.ones(2)))
    with pytest.raises(zc.errors.InvalidArgumentError, match="Nothing was committed") as info:
        ckpt.write(str(tmp_path / "c"))
    assert "readers accept at most" in str(info.value)
    assert os.listdir(tmp_path) == []
