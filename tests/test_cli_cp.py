"""cp into a directory: a destination ending in '/' or an existing directory, as cp does."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Model, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


@pytest.fixture
def source(tmp_path) -> Path:
    return Path(zc.Checkpoint(model=Model(seed=3)).write(tmp_path / "run" / "ckpt-5"))


def _same(a, b, so=None) -> None:
    np.testing.assert_array_equal(
        zc.load_variable(a, "model/embedding"),
        zc.load_variable(b, "model/embedding", storage_options=so),
    )


def test_destination_ending_in_a_slash_is_a_directory_to_copy_into(source, tmp_path, capsys):
    code, out, err = run_cli(capsys, "cp", str(source), f"{tmp_path / 'backup'}/")
    assert (code, err) == (0, "")
    copy = tmp_path / "backup" / "ckpt-5"
    assert out.startswith(f"copied {source} -> {copy} (")
    assert out.rstrip().endswith(", verified)")
    zc.verify(copy)
    _same(source, copy)


def test_existing_directory_that_is_not_a_checkpoint(source, tmp_path, capsys):
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "other-file").write_text("kept")
    code, _, _ = run_cli(capsys, "cp", str(source), str(tmp_path / "backup"))
    assert code == 0
    zc.verify(tmp_path / "backup" / "ckpt-5")
    assert (tmp_path / "backup" / "other-file").read_text() == "kept"
    # The source given with a trailing slash is named the same.
    code, _, err = run_cli(capsys, "cp", f"{source}/", str(tmp_path / "backup"))
    assert code == 5 and "already exists" in err  # backup/ckpt-5 is there now


def test_an_existing_checkpoint_is_not_a_directory_to_copy_into(source, tmp_path, capsys):
    other = zc.Checkpoint(model=Model(seed=4)).write(tmp_path / "other")
    code, out, err = run_cli(capsys, "cp", str(source), other)
    assert (code, out) == (5, "")
    assert len(err.splitlines()) == 1 and "already exists" in err
    assert not (Path(other) / "ckpt-5").exists()


def test_a_new_name_is_the_copy_itself(source, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "cp", str(source), str(tmp_path / "renamed"))
    assert code == 0
    zc.verify(tmp_path / "renamed")
    assert not (tmp_path / "renamed" / "ckpt-5").exists()


def test_into_an_s3_prefix_and_back(source, tmp_path, capsys, s3_url, s3_storage_options):
    so = s3_storage_options
    options = json.dumps(so)
    code, out, err = run_cli(
        capsys, "cp", str(source), f"{s3_url}/backups/", "--storage-options", options
    )
    assert (code, err) == (0, ""), err
    remote = f"{s3_url}/backups/ckpt-5"
    assert f"-> {remote} (" in out
    zc.verify(remote, so)
    _same(source, remote, so)
    # An existing prefix (it holds ckpt-5) without the slash: into it as well.
    fs, _ = fsspec.core.url_to_fs(s3_url, **so)
    fs.invalidate_cache()
    other = zc.Checkpoint(model=Model(seed=3)).write(tmp_path / "ckpt-6")
    code, _, err = run_cli(capsys, "cp", other, f"{s3_url}/backups", "--storage-options", options)
    assert (code, err) == (0, "")
    zc.verify(f"{s3_url}/backups/ckpt-6", so)
    # Back down into a local directory.
    (tmp_path / "down").mkdir()
    code, _, err = run_cli(
        capsys, "--storage-options", options, "cp", remote, str(tmp_path / "down")
    )
    assert (code, err) == (0, "")
    zc.verify(tmp_path / "down" / "ckpt-5")
