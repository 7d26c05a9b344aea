"""verify reports files inside a checkpoint that its manifest does not list."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest

import zarrckpt as zc
from tests.conftest import Model, run_cli
from zarrckpt.errors import CorruptCheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return Path(zc.Checkpoint(model=Model(seed=0)).write(tmp_path / "ckpt"))


def test_a_whole_checkpoint_has_no_unlisted_files(checkpoint, tmp_path):
    assert zc.verify(checkpoint).unlisted == ()
    manager = zc.CheckpointManager(zc.Checkpoint(model=Model(seed=1)), tmp_path / "run")
    path = manager.save()
    manager.wait()
    assert zc.verify(path).unlisted == ()
    copy = zc.copy_checkpoint(checkpoint, tmp_path / "copy")
    assert zc.verify(copy).unlisted == ()
    assert "not listed" not in str(zc.verify(copy))


def test_unlisted_files_are_reported_by_name(checkpoint):
    (checkpoint / "notes.txt").write_text("a stray file")
    (checkpoint / "model" / "embedding" / "extra.bin").write_bytes(b"\0" * 10)
    os.symlink("/etc/hostname", checkpoint / "link")
    os.mkfifo(checkpoint / "fifo")
    report = zc.verify(checkpoint)
    assert report.unlisted == ("fifo", "link", "model/embedding/extra.bin", "notes.txt")
    assert str(report).endswith(
        "; 4 files not listed in the manifest (never read by zarrckpt): fifo, link, "
        "model/embedding/extra.bin, notes.txt"
    )
    with pytest.raises(CorruptCheckpointError, match=r"4 files not listed .*: fifo, link, "):
        zc.verify(checkpoint, strict=True)


def test_cli_warns_and_strict_fails(checkpoint, capsys):
    (checkpoint / "notes.txt").write_text("a stray file")
    code, out, err = run_cli(capsys, "verify", str(checkpoint))
    assert code == 0
    assert out.startswith(f"{checkpoint}: OK, ") and out.rstrip().endswith(
        "1 file not listed in the manifest (never read by zarrckpt): notes.txt"
    )
    assert err == (
        f"zarrckpt: warning: {checkpoint}: 1 file not listed in the manifest (never read by "
        "zarrckpt): notes.txt; --strict makes this an error\n"
    )
    code, out, err = run_cli(capsys, "verify", "--strict", str(checkpoint))
    assert (code, out) == (4, "")
    assert err == (
        f"zarrckpt: error: {checkpoint}: 1 file not listed in the manifest (never read by "
        "zarrckpt): notes.txt\n"
    )
    code, out, _ = run_cli(capsys, "verify", "--json", str(checkpoint))
    assert code == 0 and json.loads(out)["unlisted"] == ["notes.txt"]


def test_many_unlisted_files_are_counted_past_ten(checkpoint):
    for number in range(12):
        (checkpoint / f"stray-{number:02}").write_text("x")
    report = zc.verify(checkpoint)
    assert len(report.unlisted) == 12
    assert str(report).endswith("stray-09 and 2 more")


def test_s3_unlisted_objects_but_not_other_attempts(capsys, s3_url, s3_storage_options):
    so = s3_storage_options
    path = zc.Checkpoint(model=Model(seed=0)).write(f"{s3_url}/run/ckpt-1", storage_options=so)
    assert zc.verify(path, so).unlisted == ()
    fs, _ = fsspec.core.url_to_fs(s3_url, **so)
    live = next(name for name in fs.ls(f"{s3_url}/run/ckpt-1") if "attempt-" in name)
    live_name = live.rstrip("/").rsplit("/", 1)[-1]
    fs.pipe_file(f"{s3_url}/run/ckpt-1/README", b"hello")
    fs.pipe_file(f"{s3_url}/run/ckpt-1/{live_name}/model/stray", b"x")
    fs.pipe_file(f"{s3_url}/run/ckpt-1/attempt-{'f' * 32}/zarr.json", b"{}")  # gc's business
    fs.invalidate_cache()
    report = zc.verify(path, so)
    assert report.unlisted == ("README", f"{live_name}/model/stray")
    code, _, err = run_cli(capsys, "verify", "--strict", path, "--storage-options", json.dumps(so))
    assert code == 4 and "2 files not listed in the manifest" in err
