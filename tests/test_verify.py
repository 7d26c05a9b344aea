"""verify(): a checkpoint is checked byte for byte against its manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import reseal_manifest
from zarrckpt.errors import ChecksumError, CorruptCheckpointError, MissingChunkError

KEY = "model/w/.ATTRIBUTES/VARIABLE_VALUE"


def _saved(tmp_path: Path) -> Path:
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.arange(4096, dtype=np.float32).reshape(64, 64))
    model.b = zc.Variable(np.zeros(7, np.int16))
    options = zc.CheckpointOptions(chunk_bytes=4096)
    return Path(zc.Checkpoint(model=model).write(tmp_path / "c", options=options))


def _chunk(path: Path, row: int) -> Path:
    """Chunk (row, 0) of w, of 4 chunks of 16 rows: ``<key>/c.<row>.0`` beside its zarr.json."""
    return path / KEY / f"c.{row}.0"


def test_verify_passes_and_reports(tmp_path):
    path = _saved(tmp_path)
    seen: list[int] = []
    report = zc.verify(path, progress=seen.append)
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "_COMMIT"]
    assert report.files == len(files) == len(seen)
    assert report.nbytes == sum(p.stat().st_size for p in files) == sum(seen)
    assert report.arrays == 2
    assert "OK" in str(report)


def test_flipped_byte_is_named(tmp_path):
    path = _saved(tmp_path)
    chunk = _chunk(path, 3)
    data = bytearray(chunk.read_bytes())
    data[10] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model/w/\.ATTRIBUTES/VARIABLE_VALUE/c\.3\.0"):
        zc.verify(path)


def test_missing_chunk_is_named(tmp_path):
    path = _saved(tmp_path)
    os.remove(_chunk(path, 1))
    with pytest.raises(MissingChunkError, match=r"c\.1\.0.*missing"):
        zc.verify(path)


def test_truncated_file_is_named(tmp_path):
    path = _saved(tmp_path)
    record = path / "object_graph.msgpack"
    with pytest.raises(CorruptCheckpointError):
        record.write_bytes(record.read_bytes()[:-1])
        zc.verify(path)


def test_chunk_missing_from_manifest_and_disk_is_found_by_the_chunk_count(tmp_path):
    path = _saved(tmp_path)
    # Rewrite the manifest without one chunk and delete that chunk: the
    # manifest is self-consistent, but zarr.json's grid needs one chunk more.
    gone = f"{KEY}/c.2.0"
    reseal_manifest(path, drop={gone})
    os.remove(path / gone)
    with pytest.raises(
        CorruptCheckpointError, match=r"makes 4 chunks \(grid \[4, 1\]\), _COMMIT lists 3"
    ):
        zc.verify(path)


def test_verify_refuses_uncommitted(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(zc.errors.CheckpointNotFoundError):
        zc.verify(tmp_path / "half")


def test_a_valid_chunk_swapped_in_from_elsewhere_is_caught(tmp_path):
    # Both chunks carry correct CRCs of their own; only the manifest can tell
    # that chunk 1 now holds chunk 0's values.
    path = _saved(tmp_path)
    _chunk(path, 1).write_bytes(_chunk(path, 0).read_bytes())
    with pytest.raises(ChecksumError, match=r"c\.1\.0: chunk \(1, 0\) .* not the chunk the commit"):
        zc.verify(path)


def _rewrite_metadata(path: Path, key: str, **changes) -> None:
    """Change fields of an array's zarr.json (and its manifest CRC, as a forger would)."""
    import json

    meta_path = path / key / "zarr.json"
    doc = json.loads(meta_path.read_text())
    for field, value in changes.items():
        if field == "chunk_shape":
            doc["chunk_grid"]["configuration"]["chunk_shape"] = value
        else:
            doc[field] = value
    meta_path.write_bytes(json.dumps(doc).encode())
    reseal_manifest(path)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"chunk_shape": [2**40, 64]}, "does not fit the array"),
        ({"chunk_shape": [2**62, 64]}, "does not fit the array"),
        ({"shape": [2**40, 64]}, "record says"),
        ({"data_type": "float99"}, "float99"),
        ({"data_type": "int32"}, "record says float32"),
    ],
)
def test_damaged_array_metadata_is_corruption_never_a_huge_buffer(tmp_path, changes, match):
    path = _saved(tmp_path)
    _rewrite_metadata(path, KEY, **changes)
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.zeros((64, 64), np.float32))
    model.b = zc.Variable(np.ones(7, np.int16))
    with pytest.raises(CorruptCheckpointError, match=match):
        zc.Checkpoint(model=model).restore(path)
    assert not model.w.numpy().any() and model.b.numpy().all()  # nothing was read
    with pytest.raises(CorruptCheckpointError, match=match):
        zc.load_variable(path, KEY, index=slice(0, 2))
    with pytest.raises(CorruptCheckpointError, match=match):
        zc.verify(path)
    from zarrckpt.cli import main

    assert main(["verify", str(path)]) == 4
