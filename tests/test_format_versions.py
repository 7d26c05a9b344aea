"""On-disk formats 1 and 2: zarrckpt writes 2, restores both; zarr and tensorstore read both.

``tests/data/format1`` was written by zarrckpt at commit 035825b (format 1,
chunk keys ``c/0/1``); see tests/make_format1_fixture.py for how.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore as ts
import zarr

import zarrckpt as zc
from tests.make_format1_fixture import fixture_values
from zarrckpt._commit import COMMIT_KEY, FORMAT, Manifest
from zarrckpt.errors import ChecksumError, CorruptCheckpointError, MissingChunkError

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")

FORMAT1 = Path(__file__).parent / "data" / "format1"
OPTIONS = zc.CheckpointOptions(
    chunk_bytes=64, compression={"model/packed/.ATTRIBUTES/VARIABLE_VALUE": zc.Zstd()}
)


def key(name: str) -> str:
    return f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE"


def format2(tmp_path: Path) -> Path:
    """The fixture's values saved by this zarrckpt, with the same options."""
    model = zc.Dict({name: zc.Variable(v) for name, v in fixture_values().items()})
    return Path(zc.Checkpoint(model=model).write(tmp_path / "f2", options=OPTIONS))


def manifest(path: Path) -> Manifest:
    return Manifest.decode((path / COMMIT_KEY).read_bytes(), where=str(path))


def restore(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    live = zc.Dict({name: zc.Variable(np.zeros_like(v)) for name, v in fixture_values().items()})
    zc.Checkpoint(model=live).read(path).assert_consumed()
    return {name: live[name].numpy() for name in fixture_values()}


def assert_values(got: dict[str, np.ndarray[Any, Any]]) -> None:
    for name, want in fixture_values().items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A writable copy of the format 1 fixture (tests may damage it)."""
    return Path(shutil.copytree(FORMAT1, tmp_path / "f1"))


def test_the_fixture_is_format_1_with_nested_chunk_keys() -> None:
    assert manifest(FORMAT1).format == 1
    root = json.loads((FORMAT1 / "zarr.json").read_text())
    assert root["attributes"]["zarrckpt"]["format"] == 1
    assert (FORMAT1 / key("weight") / "c" / "0" / "0").is_file()
    meta = json.loads((FORMAT1 / key("weight") / "zarr.json").read_text())
    assert meta["chunk_key_encoding"]["configuration"]["separator"] == "/"


def test_format_1_restores_value_for_value(old: Path) -> None:
    assert_values(restore(old))
    (info,) = [i for i in zc.list_checkpoints(str(old.parent)) if i.path.endswith("f1")]
    assert info.metadata["step"] == 1234
    report = zc.verify(str(old))
    assert report.arrays == len(fixture_values()) and not report.unlisted


def test_new_checkpoints_are_format_2_with_flat_chunk_keys(tmp_path: Path) -> None:
    path = format2(tmp_path)
    assert FORMAT == 2 and manifest(path).format == 2
    assert json.loads((path / "zarr.json").read_text())["attributes"]["zarrckpt"]["format"] == 2
    weight = path / key("weight")
    meta = json.loads((weight / "zarr.json").read_text())
    assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "."}}
    # 37 rows of 5 float32 in 64-byte chunks: 3 rows per chunk, 13 chunks, all beside zarr.json
    assert sorted(p.name for p in weight.iterdir()) == sorted(
        ["zarr.json", *(f"c.{i}.0" for i in range(13))]
    )
    assert not any(p.is_dir() for p in weight.iterdir())
    scalar = path / key("step")
    assert sorted(p.name for p in scalar.iterdir()) == ["c", "zarr.json"]  # 0-d: key "c"
    assert_values(restore(path))
    assert zc.verify(str(path)).arrays == len(fixture_values())


def test_format_2_has_fewer_directories_than_format_1(tmp_path: Path) -> None:
    path = format2(tmp_path)
    dirs1 = sum(p.is_dir() for p in FORMAT1.rglob("*"))
    dirs2 = sum(p.is_dir() for p in path.rglob("*"))
    # per array: its object, .ATTRIBUTES and VARIABLE_VALUE (+ model/); format 1 added c/ and c/i/
    assert dirs2 == 1 + 3 * len(fixture_values())
    assert dirs1 > dirs2 + 20
    files1 = {p.relative_to(FORMAT1) for p in FORMAT1.rglob("*") if p.is_file()}
    files2 = {p.relative_to(path) for p in path.rglob("*") if p.is_file()}
    assert len(files1) == len(files2)  # the same files, only the chunks renamed


@pytest.mark.parametrize("which", ["format1", "format2"])
def test_plain_zarr_and_tensorstore_read_both(tmp_path: Path, which: str) -> None:
    path = FORMAT1 if which == "format1" else format2(tmp_path)
    group = zarr.open_group(str(path), mode="r")
    for name, want in fixture_values().items():
        got = group[key(name)][...]
        np.testing.assert_array_equal(np.asarray(got).view(want.dtype), want, err_msg=name)
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{path / key(name)}/"}}
        read = ts.open(spec, open=True).result().read().result()
        np.testing.assert_array_equal(np.asarray(read).view(want.dtype), want, err_msg=name)


def test_partial_reads_of_format_1(old: Path) -> None:
    want = fixture_values()["weight"]
    got = zc.load_variable(str(old), "model/weight", index=slice(4, 11))
    np.testing.assert_array_equal(got, want[4:11])
    packed = zc.open_variable(str(old), "model/packed")
    np.testing.assert_array_equal(packed[3:9], fixture_values()["packed"][3:9])


def test_copying_format_1_keeps_format_1(old: Path, tmp_path: Path) -> None:
    copy = Path(zc.copy_checkpoint(str(old), str(tmp_path / "copy")))
    assert manifest(copy).format == 1
    assert (copy / key("weight") / "c" / "0" / "0").is_file()
    assert_values(restore(copy))


def test_damage_in_format_1_is_still_found(old: Path) -> None:
    chunk = old / key("weight") / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"c/2/0: chunk \(2, 0\)"):
        restore(old)
    chunk.unlink()
    with pytest.raises(MissingChunkError, match=r"c/2/0"):
        restore(old)


def test_a_zarr_json_changing_the_chunk_keys_is_corruption(old: Path) -> None:
    """Renaming the separator in a format 1 zarr.json no longer matches the manifest."""
    meta = old / key("weight") / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["chunk_key_encoding"]["configuration"]["separator"] = "."
    meta.write_text(json.dumps(doc, indent=2))
    with pytest.raises(CorruptCheckpointError, match=r"VARIABLE_VALUE/zarr\.json"):
        restore(old)


def test_an_unknown_separator_is_refused(tmp_path: Path) -> None:
    from zarrckpt.array_io import parse_layout

    doc = json.loads((FORMAT1 / key("weight") / "zarr.json").read_text())
    doc["chunk_key_encoding"]["configuration"]["separator"] = "-"
    with pytest.raises(CorruptCheckpointError, match="default chunk keys"):
        parse_layout(json.dumps(doc).encode(), "x/zarr.json")
