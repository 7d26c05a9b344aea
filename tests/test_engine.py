"""The storage engine: in-flight byte budget, I/O stats, compression and its guards."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import threading
import time
from pathlib import Path

import crc32c
import numcodecs
import numpy as np
import pytest
import tensorstore
import zarr

import zarrckpt as zc
from tests.conftest import manifest_entries, reseal_manifest, traced_peak
from zarrckpt import _storage, array_io
from zarrckpt._storage import LocalStorage
from zarrckpt.array_io import ByteBudget
from zarrckpt.errors import ChecksumError, CorruptCheckpointError

KiB, MiB = 1 << 10, 1 << 20

# zarr warns that _COMMIT and object_graph.msgpack are not Zarr nodes; they are not meant to be.
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


def _chunk_files(path: Path, key: str) -> list[Path]:
    """The chunk files of the array at ``key``: ``c.<i>.<j>`` beside its zarr.json."""
    return sorted(p for p in (path / key).glob("c.*") if p.is_file())


# ByteBudget ----------------------------------------------------------------------


def test_budget_blocks_until_bytes_are_released():
    budget = ByteBudget(100)
    first = budget.acquire(60)
    admitted = threading.Event()

    def second() -> None:
        budget.release(budget.acquire(60))
        admitted.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not admitted.wait(0.2)  # 60 + 60 > 100: must wait
    budget.release(first)
    assert admitted.wait(5)
    thread.join()
    assert budget.peak == 60 and budget.in_flight == 0


def test_budget_admits_an_oversized_request_alone():
    budget = ByteBudget(100)
    amount = budget.acquire(10_000)
    assert amount == 100 and budget.in_flight == 100
    budget.release(amount)
    assert budget.in_flight == 0


# Budget during real saves and restores ------------------------------------------


def _big_model(rows: int = 512) -> zc.AutoTrackable:
    model = zc.AutoTrackable()
    rng = np.random.default_rng(0)
    model.a = zc.Variable(rng.standard_normal((rows, 1024)).astype(np.float32))  # 2 MiB
    model.b = zc.Variable(rng.standard_normal((rows // 2, 1024)).astype(np.float32))
    model.c = zc.Variable(rng.integers(0, 9, (3, 5)).astype(np.int8))
    return model


@pytest.mark.parametrize("budget", [64 * KiB, 256 * KiB, 1 * MiB])
def test_save_and_restore_stay_within_the_inflight_budget(tmp_path, budget):
    options = zc.CheckpointOptions(chunk_bytes=64 * KiB, threads=8, inflight_bytes=budget)
    model = _big_model()
    ckpt = zc.Checkpoint(model=model)
    path = ckpt.write(tmp_path / "c", options=options)
    stats = ckpt.last_write_stats
    assert stats is not None
    assert 64 * KiB <= stats.peak_inflight_bytes <= budget
    on_disk = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
    assert stats.nbytes == on_disk - sum(
        (Path(path) / name).stat().st_size
        for name in ("_COMMIT", "object_graph.msgpack", "zarr.json")
    )
    assert len(_chunk_files(Path(path), "model/a/.ATTRIBUTES/VARIABLE_VALUE")) == 32

    fresh = _big_model()
    for var in (fresh.a, fresh.b):
        var.assign(np.zeros(var.shape))
    status = zc.Checkpoint(model=fresh).read(path, options=options)
    status.assert_consumed()
    assert 64 * KiB <= status.io_stats.peak_inflight_bytes <= budget
    assert status.io_stats.files == 32 + 16 + 1
    np.testing.assert_array_equal(fresh.a.numpy(), model.a.numpy())
    np.testing.assert_array_equal(fresh.b.numpy(), model.b.numpy())


def test_restore_into_non_contiguous_memory_is_bounded_by_the_budget(tmp_path):
    # A Fortran-ordered destination cannot take chunks in place: every chunk goes
    # through a temporary buffer, so the budget is what bounds the extra memory.
    state = zc.NumpyState()
    state.table = np.asfortranarray(np.random.default_rng(1).standard_normal((4096, 1024)))
    path = zc.Checkpoint(state=state).write(
        tmp_path / "c", options=zc.CheckpointOptions(chunk_bytes=1 * MiB)
    )
    expected = np.array(state.table)
    state.table[...] = 0
    bounded = zc.CheckpointOptions(threads=8, inflight_bytes=2 * MiB)

    peak = traced_peak(lambda: zc.Checkpoint(state=state).read(path, options=bounded))
    np.testing.assert_array_equal(state.table, expected)
    assert peak < 4 * MiB, peak  # the model is 32 MiB; chunks are 1 MiB; budget 2 MiB

    unbounded = zc.CheckpointOptions(threads=8, inflight_bytes=1 << 40)
    state.table[...] = 0
    loose_peak = traced_peak(lambda: zc.Checkpoint(state=state).read(path, options=unbounded))
    assert loose_peak > peak  # without the budget, 8 threads hold 8 chunks


class _FailingStorage(LocalStorage):
    """A real local storage whose Nth write fails with ENOSPC."""

    def __init__(self, root: str, fail_at: int) -> None:
        super().__init__(root, fsync=False)
        self.fail_at = fail_at
        self.writes = 0
        self._count_lock = threading.Lock()

    def write(self, key, parts):
        with self._count_lock:
            self.writes += 1
            number = self.writes
        if number == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device", key)
        time.sleep(0.001)
        super().write(key, parts)


def test_a_failed_chunk_write_stops_further_work_and_raises(tmp_path):
    storage = _FailingStorage(str(tmp_path / "s"), fail_at=3)
    os.makedirs(storage.root)
    arrays = [(f"v{i}/.ATTRIBUTES/x", np.full((64, 64), i, np.float32)) for i in range(50)]
    options = zc.CheckpointOptions(chunk_bytes=1 * KiB, threads=2, inflight_bytes=2 * KiB)
    with pytest.raises(OSError, match="No space left"):
        array_io.write_arrays(storage, arrays, options)
    assert storage.writes < 20  # of 50 * 17 files: admission stopped soon after the error


def test_options_validate_their_values():
    invalid = zc.errors.InvalidArgumentError  # a ValueError and a TypeError too
    with pytest.raises(invalid, match="inflight_bytes"):
        zc.CheckpointOptions(inflight_bytes=0)
    with pytest.raises(ValueError, match="threads"):
        zc.CheckpointOptions(threads=True)
    with pytest.raises(TypeError, match="Compression objects"):
        zc.CheckpointOptions(compression={"*": "zstd"})  # type: ignore[dict-item]
    with pytest.raises(invalid, match="maps key patterns"):
        zc.CheckpointOptions(compression=[zc.Zstd()])  # type: ignore[arg-type]
    with pytest.raises(invalid, match="fsync"):
        zc.CheckpointOptions(fsync="yes")  # type: ignore[arg-type]
    with pytest.raises(invalid, match="progress"):
        zc.CheckpointOptions(progress=3)  # type: ignore[arg-type]
    options = zc.CheckpointOptions(compression={"a/*": zc.Zstd(), "*": zc.BloscLZ4()})
    assert options.compression_for("a/x") == zc.Zstd()
    assert options.compression_for("b/x") == zc.BloscLZ4()
    assert zc.CheckpointOptions().compression_for("a/x") is None


def test_progress_is_called_with_every_file_of_a_save_and_a_restore(tmp_path):
    calls: list[int] = []
    lock = threading.Lock()

    def progress(nbytes: int) -> None:
        with lock:
            calls.append(nbytes)

    options = zc.CheckpointOptions(chunk_bytes=64 * KiB, threads=4, progress=progress)
    model = _big_model()
    ckpt = zc.Checkpoint(model=model)
    path = ckpt.write(tmp_path / "c", options=options)
    stats = ckpt.last_write_stats
    assert stats is not None
    # 32 + 16 + 1 chunks, then every array's and every group's zarr.json.
    assert len(calls) == stats.files > 49 and sum(calls) == stats.nbytes
    assert max(calls) == 64 * KiB + 4  # one full chunk and its CRC

    calls.clear()
    fresh = _big_model(rows=512)
    fresh.a.assign(np.zeros(fresh.a.shape))
    status = zc.Checkpoint(model=fresh).read(path, options=options)
    assert len(calls) == status.io_stats.files == 49
    assert sum(calls) == status.io_stats.nbytes == (32 + 16) * (64 * KiB + 4) + 15 + 4
    np.testing.assert_array_equal(fresh.a.numpy(), model.a.numpy())


# Compression ----------------------------------------------------------------------


def _compressible_model() -> zc.AutoTrackable:
    import ml_dtypes

    model = zc.AutoTrackable()
    model.embedding = zc.Variable(
        (np.arange(300 * 64) % 97).reshape(300, 64).astype(ml_dtypes.bfloat16)
    )
    model.dense = zc.Variable(np.tile(np.linspace(0, 1, 50, dtype=np.float32), (123, 1)))
    model.raw = zc.Variable(np.arange(40, dtype=np.int32))
    return model


COMPRESSED = zc.CheckpointOptions(
    chunk_bytes=8 * KiB,
    compression={"*embedding*": zc.BloscLZ4(), "*dense*": zc.Zstd(level=5)},
)
KEYS = {name: f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE" for name in ("embedding", "dense", "raw")}


def test_compressed_arrays_round_trip_and_shrink(tmp_path):
    model = _compressible_model()
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c", options=COMPRESSED))
    codecs = {
        name: [c["name"] for c in json.loads((path / key / "zarr.json").read_text())["codecs"]]
        for name, key in KEYS.items()
    }
    assert codecs == {
        "embedding": ["bytes", "blosc", "crc32c"],
        "dense": ["bytes", "zstd", "crc32c"],
        "raw": ["bytes", "crc32c"],
    }
    for name in ("embedding", "dense"):
        stored = sum(p.stat().st_size for p in _chunk_files(path, KEYS[name]))
        assert stored < getattr(model, name).nbytes / 4
    fresh = _compressible_model()
    for name in KEYS:
        getattr(fresh, name).numpy()[...] = 0
    zc.Checkpoint(model=fresh).read(path).assert_consumed()
    for name in KEYS:
        np.testing.assert_array_equal(getattr(fresh, name).numpy(), getattr(model, name).numpy())


def test_plain_zarr_and_tensorstore_read_compressed_arrays(tmp_path):
    model = _compressible_model()
    path = zc.Checkpoint(model=model).write(tmp_path / "c", options=COMPRESSED)
    group = zarr.open_group(path, mode="r")
    for name, key in KEYS.items():
        expected = getattr(model, name).numpy()
        np.testing.assert_array_equal(group[key][...], expected)
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path}/{key}"}}
        values = tensorstore.open(spec).result().read().result()
        assert values.tobytes() == expected.tobytes()


def test_zarr_written_compressed_array_is_read_by_zarrckpt(tmp_path):
    # Byte compatibility the other way round: zarr encodes, zarrckpt decodes.
    value = np.tile(np.arange(37, dtype=np.float32), (21, 1))
    layout = array_io.ArrayLayout.plan(value.shape, value.dtype, 1 * KiB, zc.Zstd(level=2))
    zarr.create_array(
        store=str(tmp_path / "v"),
        shape=value.shape,
        dtype=value.dtype,
        chunks=layout.chunk_shape,
        serializer=zarr.codecs.BytesCodec(endian="little"),
        compressors=[zarr.codecs.ZstdCodec(level=2), zarr.codecs.Crc32cCodec()],
        fill_value=0,
        config={"write_empty_chunks": True},
    )[...] = value
    storage = LocalStorage(str(tmp_path), fsync=False)
    read_layout = array_io.read_layout(storage, "v")
    assert read_layout.compression == zc.Zstd(level=2)
    out = np.zeros_like(value)
    array_io.read_arrays(storage, [("v", read_layout, out)], manifest_entries(storage))
    np.testing.assert_array_equal(out, value)


def _rewrite_chunk(path: Path, chunk: Path, body: bytes) -> None:
    """Replace a chunk and the manifest with it, as a forger would: CRCs all agree."""
    chunk.write_bytes(body + crc32c.crc32c(body).to_bytes(4, "little"))
    reseal_manifest(path)


def test_flipped_byte_in_compressed_chunk_is_a_checksum_error(tmp_path):
    model = _compressible_model()
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c", options=COMPRESSED))
    chunk = _chunk_files(path, KEYS["dense"])[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"chunk \(0, 0\) of 'model/dense"):
        zc.Checkpoint(model=_compressible_model()).read(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    model = _compressible_model()
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c", options=COMPRESSED))
    chunk = _chunk_files(path, KEYS["dense"])[0]
    bomb = numcodecs.Zstd(level=19).encode(np.zeros(256 * MiB, np.uint8))
    assert len(bomb) < 64 * KiB
    _rewrite_chunk(path, chunk, bomb)  # a valid CRC: only the size guard can stop it

    def restore() -> None:
        with pytest.raises(CorruptCheckpointError, match="declares 268435456 decoded bytes"):
            zc.Checkpoint(model=_compressible_model()).read(path)

    assert traced_peak(restore) < 16 * MiB


def test_zstd_frame_without_declared_size_is_refused(tmp_path):
    model = _compressible_model()
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c", options=COMPRESSED))
    chunk = _chunk_files(path, KEYS["dense"])[0]
    # A zstd frame header with no content size field (streaming frame).
    frame = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x58]) + b"\x01\x00\x00"
    _rewrite_chunk(path, chunk, frame)
    with pytest.raises(CorruptCheckpointError, match="declares None decoded bytes"):
        zc.Checkpoint(model=_compressible_model()).read(path)


def test_blosc_header_lying_about_its_size_is_refused(tmp_path):
    model = _compressible_model()
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "c", options=COMPRESSED))
    chunk = _chunk_files(path, KEYS["embedding"])[0]
    body = bytearray(chunk.read_bytes()[:-4])
    body[4:8] = (1 << 30).to_bytes(4, "little")  # nbytes: claims 1 GiB
    _rewrite_chunk(path, chunk, bytes(body))
    with pytest.raises(CorruptCheckpointError, match="declares 1073741824 decoded bytes"):
        zc.Checkpoint(model=_compressible_model()).read(path)


# Durability -------------------------------------------------------------------------


def _record_fsyncs(monkeypatch) -> list[str]:
    """Make os.fsync append the path of each descriptor it syncs to the list returned."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


def test_every_file_and_directory_of_a_local_save_is_fsynced(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    model = zc.AutoTrackable()
    model.cube = zc.Variable(np.ones((4, 3, 2), np.float32))  # chunk files c.0.0.0 to c.3.0.0
    model.flat = zc.Variable(np.arange(5, dtype=np.int64))
    path = zc.Checkpoint(model=model).write(
        tmp_path / "new" / "parents" / "ckpt-1", options=zc.CheckpointOptions(chunk_bytes=24)
    )
    final = Path(path)
    temp_prefix = str(final.parent / f".{final.name}.zarrckpt-tmp-")

    def as_final(name: str) -> str:  # synced under the temporary name, before the rename
        if name.startswith(temp_prefix):
            return str(final) + name[len(temp_prefix) + 32 :]
        return name

    durable = {as_final(name) for name in synced}
    everything = {str(p) for p in final.rglob("*")} | {str(final)}
    assert everything - durable == set()
    # The new parents' entries too: each parent directory was fsynced after the rename.
    assert {str(final.parent), str(tmp_path / "new"), str(tmp_path)} <= durable
    # The cube's chunk files were among the files checked: there are 4 of them.
    cube = _chunk_files(final, "model/cube/.ATTRIBUTES/VARIABLE_VALUE")
    assert [p.name for p in cube] == [f"c.{i}.0.0" for i in range(4)]


def _many_values(count: int) -> zc.AutoTrackable:
    model = zc.AutoTrackable()
    model.values = zc.Dict(
        {f"v{i}": zc.Variable(np.full((3, 2), i, np.float32)) for i in range(count)}
    )
    model.big = zc.Variable(np.arange(1 << 19, dtype=np.float32))  # 2 MiB: fsynced eagerly
    return model


def _record_durability(monkeypatch) -> list[tuple[str, str]]:
    """Record every fsync, syncfs and started writeback as (kind, path), in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_syncfs, real_range = os.fsync, _storage._syncfs, _storage._sync_file_range
    assert real_syncfs is not None and real_range is not None  # Linux

    def path_of(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", path_of(fd)))
        real_fsync(fd)

    def recording_syncfs(fd: int) -> int:
        events.append(("syncfs", path_of(fd)))
        return int(real_syncfs(fd))

    def recording_range(fd: int, offset: int, nbytes: int, flags: int) -> int:
        events.append(("start", path_of(fd)))
        return int(real_range(fd, offset, nbytes, flags))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(_storage, "_syncfs", recording_syncfs)
    monkeypatch.setattr(_storage, "_sync_file_range", recording_range)
    return events


def _resident(path: Path) -> bool:
    """Whether the first page of ``path`` is in the page cache (a read that must not wait)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_save_writes_chunks_past_the_page_cache_and_makes_all_durable_with_one_syncfs(
    tmp_path, monkeypatch
):
    """Chunks of 1 MiB or more: written with O_DIRECT; then one syncfs on the root."""
    events = _record_durability(monkeypatch)
    path = Path(zc.Checkpoint(model=_many_values(20)).write(tmp_path / "ckpt-1"))
    # no writeback to start: the chunk went to the disk as it was written; then one
    # syncfs of the temporary directory, then (after the rename) an fsync of the parent
    assert [kind for kind, _ in events] == ["syncfs", "fsync"], events
    assert ".ckpt-1.zarrckpt-tmp-" in events[0][1]
    assert events[1][1] == str(tmp_path)
    chunk = path / "model/big/.ATTRIBUTES/VARIABLE_VALUE/c.0"
    # 2 MiB and the 4-byte CRC32C: the last block was padded and the file cut back
    assert chunk.stat().st_size == (1 << 21) + 4
    assert not _resident(chunk)  # never in the page cache
    assert _resident(path / "model/big/.ATTRIBUTES/VARIABLE_VALUE/zarr.json")  # small: buffered
    restored = _many_values(20)
    restored.big.assign(np.zeros(1 << 19, np.float32))
    zc.Checkpoint(model=restored).read(str(path)).assert_consumed()
    np.testing.assert_array_equal(restored.big.numpy(), np.arange(1 << 19, dtype=np.float32))
    assert zc.verify(str(path)).arrays == 21


@pytest.mark.parametrize(
    "elements", [1 << 18, (1 << 18) + 1, 300_001, (1 << 18) + 1023], ids=str
)
def test_direct_writes_fill_the_buffer_many_times_and_keep_every_byte(
    tmp_path, monkeypatch, elements
):
    """A chunk of many buffers' worth, ending anywhere in a block, is stored byte for byte."""
    monkeypatch.setattr(LocalStorage, "DIRECT_BUFFER", 64 * KiB)
    monkeypatch.setattr(LocalStorage, "EAGER_FSYNC_BYTES", 64 * KiB)
    values = np.random.default_rng(elements).standard_normal(elements).astype(np.float32)
    path = Path(zc.Checkpoint(v=zc.Variable(values)).write(tmp_path / "ckpt-1"))
    chunk = path / "v/.ATTRIBUTES/VARIABLE_VALUE/c.0"
    assert chunk.stat().st_size == values.nbytes + 4
    assert not _resident(chunk)
    stored = np.fromfile(chunk, np.uint8)
    np.testing.assert_array_equal(stored[:-4], values.view(np.uint8))  # no padding left
    assert int.from_bytes(stored[-4:].tobytes(), "little") == crc32c.crc32c(values.tobytes())
    out = zc.Variable(np.zeros(elements, np.float32))
    zc.Checkpoint(v=out).read(str(path)).assert_consumed()
    np.testing.assert_array_equal(out.numpy(), values)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_parts_of_any_item_size_are_written_and_counted_in_bytes(tmp_path, monkeypatch, direct):
    """A float32 part of 300,001 items is 1,200,004 bytes: a chunk, written whole."""
    if not direct:
        monkeypatch.setattr(LocalStorage, "CHUNK_WRITEBACK", "start")
    values = np.arange(300_001, dtype=np.float32)
    storage = LocalStorage(str(tmp_path))
    storage.write("a/c.0", [memoryview(values), b"tail"])
    storage.sync()
    assert _resident(tmp_path / "a/c.0") is not direct  # 1 MiB or more: a chunk
    assert (tmp_path / "a/c.0").read_bytes() == values.tobytes() + b"tail"


@pytest.mark.parametrize("where", ["open", "write"])
def test_a_filesystem_without_o_direct_gets_buffered_writes(tmp_path, monkeypatch, where):
    """EINVAL for O_DIRECT (at open, or at the first write) falls back to buffered writes."""
    real_open, real_pwrite = os.open, os.pwrite
    refused: list[str] = []

    def refusing_open(path, flags, *args, **kwargs):
        if where == "open" and flags & os.O_DIRECT:
            refused.append(str(path))
            raise OSError(errno.EINVAL, "Invalid argument", str(path))
        return real_open(path, flags, *args, **kwargs)

    def refusing_pwrite(fd, data, offset):
        if where == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(os.readlink(f"/proc/self/fd/{fd}"))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    events = _record_durability(monkeypatch)
    model = _many_values(20)
    model.other = zc.Variable(np.full(1 << 19, 7, np.float32))
    path = Path(zc.Checkpoint(model=model).write(tmp_path / "ckpt-1"))
    # tried once per writing thread at most (two chunks may be written at once), then
    # every chunk buffered
    assert 1 <= len(refused) == len(set(refused)) <= 2, refused
    # both chunks' writeback started as written instead, then the same syncfs
    kinds = [kind for kind, _ in events]
    assert kinds == ["start", "start", "syncfs", "fsync"], events
    for name, value in (("big", np.arange(1 << 19, dtype=np.float32)),
                        ("other", np.full(1 << 19, 7, np.float32))):
        chunk = path / f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE/c.0"
        assert chunk.stat().st_size == (1 << 21) + 4
        np.testing.assert_array_equal(np.fromfile(chunk, np.float32)[:-1], value)
    assert zc.verify(str(path)).arrays == 22


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EOPNOTSUPP], ids=errno.errorcode.get)
def test_reserving_a_chunks_blocks_fails_on_a_full_disk_only(tmp_path, monkeypatch, code):
    """fallocate's ENOSPC fails the save (nothing committed); EOPNOTSUPP just writes."""
    reserved: list[int] = []

    def failing_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
        reserved.append(length)
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(_storage, "_fallocate", failing_fallocate)
    model = _many_values(20)
    if code == errno.ENOSPC:
        with pytest.raises(OSError, match="cannot reserve 2101248 bytes") as info:
            zc.Checkpoint(model=model).write(tmp_path / "ckpt-1")
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename.endswith("model/big/.ATTRIBUTES/VARIABLE_VALUE/c.0")
        assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary directory
    else:
        path = zc.Checkpoint(model=model).write(tmp_path / "ckpt-1")
        assert zc.verify(path).arrays == 21
    assert reserved == [(1 << 21) + 4096]  # the 2 MiB chunk and its CRC, in whole blocks


def test_a_save_in_start_mode_starts_each_chunks_writeback_then_one_syncfs(
    tmp_path, monkeypatch
):
    """CHUNK_WRITEBACK="start": chunks buffered, writeback started as written, one syncfs."""
    events = _record_durability(monkeypatch)
    monkeypatch.setattr(LocalStorage, "CHUNK_WRITEBACK", "start")
    path = Path(zc.Checkpoint(model=_many_values(20)).write(tmp_path / "ckpt-1"))
    kinds = [kind for kind, _ in events]
    # the 2 MiB chunk's writeback started, then one syncfs of the temporary directory,
    # then (after the rename) an fsync of the parent
    assert kinds == ["start", "syncfs", "fsync"], events
    assert events[0][1].endswith("model/big/.ATTRIBUTES/VARIABLE_VALUE/c.0")
    assert ".ckpt-1.zarrckpt-tmp-" in events[1][1]
    assert events[2][1] == str(tmp_path)
    assert (path / "model/big/.ATTRIBUTES/VARIABLE_VALUE/c.0").stat().st_size == (1 << 21) + 4
    assert zc.verify(str(path)).arrays == 21


@pytest.mark.parametrize("mode", ["fsync", "defer"])
def test_the_other_chunk_writeback_modes_fsync_every_chunk(tmp_path, monkeypatch, mode):
    synced = _record_fsyncs(monkeypatch)
    monkeypatch.setattr(_storage.LocalStorage, "CHUNK_WRITEBACK", mode)
    monkeypatch.setattr(_storage.LocalStorage, "SYNCFS_FROM", 1 << 30)  # one fsync each
    path = Path(zc.Checkpoint(model=_many_values(20)).write(tmp_path / "ckpt-1"))
    chunk = [n for n in synced if n.endswith("model/big/.ATTRIBUTES/VARIABLE_VALUE/c.0")]
    assert len(chunk) == 1  # by its writer ("fsync") or by sync() ("defer"), once
    everything = {p.name for p in path.rglob("*")}
    assert {Path(n).name for n in synced} >= everything - {"ckpt-1"}
    assert zc.verify(str(path)).arrays == 21


def test_a_failed_syncfs_commits_nothing(tmp_path, monkeypatch):
    def failing_syncfs(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(_storage, "_syncfs", failing_syncfs)
    with pytest.raises(OSError, match="syncfs") as info:
        zc.Checkpoint(model=_many_values(20)).write(tmp_path / "ckpt-1")
    assert info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory


def test_few_small_files_are_fsynced_one_by_one(tmp_path, monkeypatch):
    called: list[int] = []
    monkeypatch.setattr(_storage, "_syncfs", lambda fd: called.append(fd) or 0)
    zc.Checkpoint(v=zc.Variable(np.ones(3, np.float32))).write(tmp_path / "ckpt-1")
    assert called == []


# Reading every zarr.json ahead of a restore ------------------------------------------


def _count_metadata_reads(monkeypatch, storage_class) -> tuple[list[str], list[str]]:
    """Record the zarr.json keys ``storage_class`` is asked to read, and to read ahead."""
    reads: list[str] = []
    hinted: list[str] = []
    real_read, real_will_read = storage_class.read, storage_class.will_read

    def read(self, key, limit=None):
        if key.endswith("zarr.json"):
            reads.append(key)
        return real_read(self, key, limit)

    def will_read(self, keys):
        keys = list(keys)
        hinted.extend(keys)
        return real_will_read(self, keys)

    monkeypatch.setattr(storage_class, "read", read)
    monkeypatch.setattr(storage_class, "will_read", will_read)
    return reads, hinted


def test_a_local_restore_asks_for_every_zarr_json_at_once_then_reads_each_once(
    tmp_path, monkeypatch
):
    path = zc.Checkpoint(model=_many_values(12)).write(tmp_path / "ckpt-1")
    reads, hinted = _count_metadata_reads(monkeypatch, LocalStorage)
    restored = _many_values(12)
    for i in range(12):
        restored.values[f"v{i}"].assign(np.zeros((3, 2), np.float32))
    zc.Checkpoint(model=restored).read(path).assert_consumed()
    expected = sorted(
        [f"model/values/v{i}/.ATTRIBUTES/VARIABLE_VALUE/zarr.json" for i in range(12)]
        + ["model/big/.ATTRIBUTES/VARIABLE_VALUE/zarr.json"]
    )
    assert sorted(hinted) == expected  # one hint for all of them, before any is read
    assert sorted(reads) == expected  # and each read once (layout() takes what was read)
    assert restored.values["v7"].numpy().tolist() == [[7.0, 7.0]] * 3


def test_read_ahead_skips_what_it_cannot_open_and_the_read_reports_it(tmp_path):
    path = Path(zc.Checkpoint(model=_many_values(3)).write(tmp_path / "ckpt-1"))
    key = "model/values/v1/.ATTRIBUTES/VARIABLE_VALUE/zarr.json"
    (path / key).unlink()
    (path / key).symlink_to(path / "model/values/v0/.ATTRIBUTES/VARIABLE_VALUE/zarr.json")
    storage = LocalStorage(str(path), fsync=False)
    storage.will_read([key, "model/big/.ATTRIBUTES/VARIABLE_VALUE/zarr.json", "no/such"])
    with pytest.raises(CorruptCheckpointError, match="is a symbolic link"):
        zc.Checkpoint(model=_many_values(3)).read(str(path))


def test_an_object_store_restore_reads_every_zarr_json_from_threads(monkeypatch):
    url = f"memory://prefetch-{os.getpid()}-{time.monotonic_ns()}/ckpt-1"
    zc.Checkpoint(model=_many_values(12)).write(url)
    reads, hinted = _count_metadata_reads(monkeypatch, _storage.FsspecStorage)
    threads: set[str] = set()
    real_read = _storage.FsspecStorage.read

    def read(self, key, limit=None):
        if key.endswith("zarr.json"):
            threads.add(threading.current_thread().name)
        return real_read(self, key, limit)

    monkeypatch.setattr(_storage.FsspecStorage, "read", read)
    restored = _many_values(12)
    zc.Checkpoint(model=restored).read(url).assert_consumed()
    assert hinted == []  # no read-ahead hint: threads instead
    assert len(reads) == 13 and len(set(reads)) == 13
    assert threads and threading.current_thread().name not in threads  # all in the pool
