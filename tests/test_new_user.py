"""The traps a new user fell into: each now works or ends in an error that says what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Model, model_variables
from zarrckpt.cli import main
from zarrckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    InvalidArgumentError,
    MissingDependencyError,
    VariableNotFoundError,
    ZarrckptError,
)

ROOT = Path(zc.__file__).resolve().parents[1]


# Variable(copy=False) -----------------------------------------------------


def test_variable_copy_false_adopts_the_array_through_save_and_restore(tmp_path):
    weights = np.arange(24, dtype=np.float32).reshape(4, 6)
    variable = zc.Variable(weights, name="w", copy=False)
    assert variable.numpy() is weights  # no second copy
    variable.assign_add(1)
    assert weights[0, 0] == 1  # one buffer: the variable's writes land in the array
    path = zc.Checkpoint(w=variable).write(tmp_path / "c")
    weights[:] = -5
    zc.Checkpoint(w=variable).restore(path).assert_consumed()
    assert variable.numpy() is weights
    np.testing.assert_array_equal(weights, np.arange(24, dtype=np.float32).reshape(4, 6) + 1)
    # The default still copies.
    copied = zc.Variable(weights)
    assert copied.numpy() is not weights and not np.shares_memory(copied.numpy(), weights)


def test_variable_copy_false_adopts_a_contiguous_view(tmp_path):
    block = np.zeros((3, 5), np.int64)
    row = zc.Variable(block[1], copy=False)  # a row of a C array is contiguous
    row.assign(np.arange(5))
    np.testing.assert_array_equal(block, [[0] * 5, [0, 1, 2, 3, 4], [0] * 5])


def _read_only() -> np.ndarray:
    array = np.zeros(4, np.float32)
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("value", "kwargs", "reason"),
    [
        (np.zeros((4, 3), np.float32).T, {}, "is not C-contiguous"),
        (np.zeros(10, np.float32)[::2], {}, "is not C-contiguous"),
        (np.zeros(4, ">f4"), {}, r"is not in native byte order \(dtype >f4\)"),
        (_read_only(), {}, "is read-only"),
        (np.zeros(4, np.float32), {"dtype": np.float64}, "has dtype float32, not the requested"),
        ([1.0, 2.0], {}, "adopts a numpy.ndarray as its buffer, got list"),
        (np.float32(1.0), {}, "got float32"),
        (np.ma.masked_array([1.0, 2.0]), {}, "got MaskedArray"),
    ],
)
def test_variable_copy_false_refuses_what_it_cannot_adopt(value, kwargs, reason):
    with pytest.raises(InvalidArgumentError, match=reason) as raised:
        zc.Variable(value, name="emb", copy=False, **kwargs)
    assert "Variable(name='emb', copy=False)" in str(raised.value)
    assert "copy=True" in str(raised.value)  # and how to get a variable anyway


# save_counter -------------------------------------------------------------


def test_save_counter_is_readable_on_a_fresh_checkpoint(tmp_path, model):
    ckpt = zc.Checkpoint(model=model)
    assert int(ckpt.save_counter) == 0
    assert float(ckpt.save_counter) == 0.0
    ckpt.save(tmp_path / "run")
    assert int(ckpt.save_counter) == 1
    assert zc.load_variable(tmp_path / "run-1", "save_counter") == 1


# save() over an existing prefix -----------------------------------------------


def test_save_over_an_earlier_run_says_what_to_do_and_keeps_it(tmp_path):
    first = Model(seed=1)
    zc.Checkpoint(model=first).save(tmp_path / "run")
    before = zc.load_variable(tmp_path / "run-1", "model/embedding")

    again = zc.Checkpoint(model=Model(seed=2))  # a new process: its counter starts at 0
    with pytest.raises(CheckpointExistsError) as raised:
        again.save(tmp_path / "run")
    message = str(raised.value)
    assert f"{tmp_path}/run-1 already exists" in message
    assert "restore its latest checkpoint first" in message
    assert "CheckpointManager" in message and "write() to a new path" in message
    assert int(again.save_counter) == 0  # nothing counted
    np.testing.assert_array_equal(zc.load_variable(tmp_path / "run-1", "model/embedding"), before)

    # Doing what it says works: restore the latest, and numbering continues.
    again.restore(zc.latest_checkpoint(tmp_path, checkpoint_name="run")).assert_consumed()
    assert again.save(tmp_path / "run") == f"{tmp_path}/run-2"


# restore(dir) and show DIR on a directory of checkpoints ----------------------


def test_restoring_a_manager_directory_names_its_latest_checkpoint(tmp_path, model):
    manager = zc.CheckpointManager(zc.Checkpoint(model=model), tmp_path / "run", max_to_keep=5)
    manager.save()
    manager.save()
    manager.wait()
    with pytest.raises(CheckpointNotFoundError) as raised:
        zc.Checkpoint(model=Model(seed=4)).restore(tmp_path / "run")
    message = str(raised.value)
    assert "is a directory of checkpoints, not a checkpoint" in message
    assert f"its latest is {tmp_path}/run/ckpt-2" in message
    assert "did not finish" not in message


def test_a_directory_of_unfinished_saves_says_so(tmp_path):
    (tmp_path / "run" / "ckpt-1").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match=r"none of them committed \(ckpt-1\)"):
        zc.Checkpoint().restore(tmp_path / "run")
    # A single unfinished checkpoint keeps the old explanation.
    with pytest.raises(CheckpointNotFoundError, match="may be a save that did not finish"):
        zc.Checkpoint().restore(tmp_path / "run" / "ckpt-1")


def test_show_on_a_manager_directory_names_its_latest(tmp_path, model, capsys):
    manager = zc.CheckpointManager(zc.Checkpoint(model=model), tmp_path / "run")
    manager.save()
    manager.wait()
    code = main(["show", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 3
    assert err.strip() == (
        f"zarrckpt: error: {tmp_path}/run is a directory of checkpoints, not a checkpoint; "
        f"its latest is {tmp_path}/run/ckpt-1 "
        f"(zarrckpt.latest_checkpoint('{tmp_path}/run') finds it)"
    )


# Missing bucket (S3) --------------------------------------------------------


def test_a_missing_bucket_is_named_when_listing_and_saving(s3_storage_options, s3_url):
    bucket = "zc-no-such-bucket-for-new-users"
    url = f"s3://{bucket}/run"
    ckpt = zc.Checkpoint(model=Model(seed=1))
    expected = (
        f"{url}: the bucket '{bucket}' does not exist. zarrckpt never creates buckets: "
        f"create it first (for example `aws s3 mb s3://{bucket}`)"
    )
    for attempt in (
        lambda: zc.CheckpointManager(ckpt, url, storage_options=s3_storage_options),
        lambda: zc.latest_checkpoint(url, storage_options=s3_storage_options),
        lambda: ckpt.save(url, storage_options=s3_storage_options),
    ):
        with pytest.raises(CheckpointNotFoundError) as raised:
            attempt()
        assert str(raised.value).replace(f"{url}-1", url) == expected
    assert int(ckpt.save_counter) == 0
    # A missing prefix in a bucket that exists is just a directory with no checkpoints.
    assert zc.list_checkpoints(f"{s3_url}/nothing-here", storage_options=s3_storage_options) == []


def test_cli_ls_of_a_missing_bucket_exits_3(s3_storage_options, capsys):
    import json

    code = main(
        [
            "ls",
            "s3://zc-no-such-bucket-either/run",
            "--storage-options",
            json.dumps(s3_storage_options),
        ]
    )
    assert code == 3
    assert "the bucket 'zc-no-such-bucket-either' does not exist" in capsys.readouterr().err


# Storage URLs ----------------------------------------------------------------


def test_unknown_protocol_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"unknown protocol 'nosuch'") as raised:
        zc.Checkpoint(model=Model()).write("nosuch://bucket/run")
    assert "s3://bucket/run" in str(raised.value)
    with pytest.raises(InvalidArgumentError, match="unknown protocol"):
        zc.latest_checkpoint("nosuch://bucket/run")


def test_missing_s3fs_names_the_extra():
    script = (
        "import sys; sys.modules['s3fs'] = None\n"
        "import zarrckpt as zc\n"
        "from zarrckpt.errors import MissingDependencyError\n"
        "try:\n"
        "    zc.latest_checkpoint('s3://bucket/run')\n"
        "except MissingDependencyError as exc:\n"
        "    assert isinstance(exc, ImportError) and exc.__cause__ is not None\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "s3://bucket/run: the s3:// protocol needs a package that is not installed: "
        "pip install 'zarrckpt[s3]' (it installs s3fs)"
    )


def test_other_missing_protocol_packages_are_named():
    pytest.importorskip("fsspec")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(MissingDependencyError, match="gcsfs") as raised:
        zc.list_checkpoints("gs://bucket/run")
    assert isinstance(raised.value, ZarrckptError) and isinstance(raised.value, ImportError)


# Key suggestions ----------------------------------------------------------------


def test_a_misspelled_key_suggests_the_closest_keys(tmp_path, model):
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    with pytest.raises(VariableNotFoundError) as raised:
        zc.load_variable(path, "model/embeding")
    assert str(raised.value) == (
        f"{path}: no saved value 'model/embeding'; did you mean "
        "['model/embedding/.ATTRIBUTES/VARIABLE_VALUE']?"
    )
    with pytest.raises(VariableNotFoundError) as raised:
        zc.open_variable(path, "model/layers/1/kernal")
    suggested = str(raised.value).split("did you mean ")[1]
    assert suggested.startswith("['model/layers/1/kernel/.ATTRIBUTES/VARIABLE_VALUE'")
    with pytest.raises(VariableNotFoundError, match=r"; 5 keys in all$"):
        zc.load_variable(path, "optimizer")  # nothing close: no unrelated suggestions
    assert len(model_variables(model)) == 5


# Where plain zarr reads a checkpoint ------------------------------------------------


def test_zarr_group_url_local_and_s3(tmp_path, model, s3_url, s3_storage_options):
    import zarr

    local = zc.Checkpoint(model=model).write(tmp_path / "c")
    assert zc.zarr_group_url(local) == local
    so = s3_storage_options
    remote = zc.Checkpoint(model=model).write(f"{s3_url}/c", storage_options=so)
    url = zc.zarr_group_url(remote, so)
    assert url.startswith(f"{remote}/attempt-") and len(url) == len(remote) + 1 + 8 + 32
    group = zarr.open_group(url, mode="r", storage_options=so)
    np.testing.assert_array_equal(
        group["model/embedding/.ATTRIBUTES/VARIABLE_VALUE"][...], model.embedding.numpy()
    )
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
        zc.zarr_group_url(tmp_path / "unfinished")
