"""The zarrckpt command line: every command, its output and its exit code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Model, model_variables, run_cli
from zarrckpt.cli import main, parse_size

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


@pytest.fixture
def saved(tmp_path) -> tuple[Path, Model]:
    model = Model(seed=0)
    manager = zc.CheckpointManager(zc.Checkpoint(model=model), tmp_path / "run")
    manager.save()
    model.embedding.assign(model.embedding.numpy() + 1.5)
    manager.save()
    return tmp_path / "run", model


def test_demo_trains_saves_restores_and_inspects(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "demo", "--size", "2MiB", "--dir", str(tmp_path))
    assert code == 0
    assert out.count("bit-exact") == 3 and "DIFFERENT" not in out
    assert "slots created after the restore got their saved values (deferred): bit-exact" in out
    assert "$ zarrckpt ls" in out and "$ zarrckpt show" in out
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ckpt-2", "ckpt-3"]
    graph = zc.object_metadata(tmp_path / "ckpt-3")
    keys = [a.key for _, a in graph.attributes()]
    assert any(".OPTIMIZER_SLOT/optimizer/momentum" in key for key in keys)
    assert zc.load_variable(tmp_path / "ckpt-3", "save_counter") == np.int64(3)


def test_python_dash_m_runs_the_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "demo", "--size", "1MiB", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "restored" in result.stdout and "DIFFERENT" not in result.stdout


def test_ls_lists_committed_and_leftovers(saved, capsys):
    directory, _ = saved
    (directory / "ckpt-7").mkdir()
    code, out, _ = run_cli(capsys, "ls", str(directory))
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["number", "created"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "7"]
    assert "committed" in lines[1] and "NOT COMMITTED" in lines[3]


def test_show_lists_variables_and_tree(saved, capsys):
    directory, _ = saved
    code, out, _ = run_cli(capsys, "show", str(directory / "ckpt-2"))
    assert code == 0
    assert f"zarr group: {directory / 'ckpt-2'}" in out
    row = next(line for line in out.splitlines() if line.startswith("model/embedding"))
    assert row.split()[1:4] == ["[10,", "6]", "float32"]
    assert "bytes+crc32c" in row
    code, out, _ = run_cli(capsys, "show", "--tree", str(directory / "ckpt-2"))
    assert code == 0 and "[0] <root>" in out and "model/layers/0" in out


def test_dot_prints_graphviz_text(saved, capsys, tmp_path):
    directory, _ = saved
    code, out, _ = run_cli(capsys, "dot", str(directory / "ckpt-1"))
    assert code == 0
    assert out.startswith("digraph {") and '[label="embedding"]' in out
    if shutil.which("dot"):
        png = tmp_path / "g.png"
        assert main(["dot", str(directory / "ckpt-1"), "--png", str(png)]) == 0
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:
        assert main(["dot", str(directory / "ckpt-1"), "--png", str(tmp_path / "g.png")]) == 5


def test_verify_ok_and_corrupt(saved, capsys):
    directory, _ = saved
    code, out, _ = run_cli(capsys, "verify", str(directory / "ckpt-2"))
    assert code == 0 and "OK" in out
    chunk = directory / "ckpt-2" / "model/embedding/.ATTRIBUTES/VARIABLE_VALUE/c.0.0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "verify", str(directory / "ckpt-2"))
    assert code == 4
    assert "model/embedding/.ATTRIBUTES/VARIABLE_VALUE/c.0.0" in err


def test_missing_and_uncommitted_paths_exit_3(saved, capsys, tmp_path):
    directory, _ = saved
    code, _, err = run_cli(capsys, "show", str(tmp_path / "nothing"))
    assert code == 3 and "no checkpoint" in err
    (directory / "ckpt-9").mkdir()
    code, _, err = run_cli(capsys, "verify", str(directory / "ckpt-9"))
    assert code == 3 and "not a committed checkpoint" in err


def test_diff_keys_and_values(saved, capsys, tmp_path):
    directory, _ = saved
    code, out, _ = run_cli(capsys, "diff", str(directory / "ckpt-1"), str(directory / "ckpt-1"))
    assert code == 0 and "no differences" in out
    code, out, _ = run_cli(capsys, "diff", str(directory / "ckpt-1"), str(directory / "ckpt-2"))
    assert code == 1
    assert out.splitlines() == [
        "~ model/embedding/.ATTRIBUTES/VARIABLE_VALUE",
        "~ save_counter/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    code, out, _ = run_cli(
        capsys, "diff", "--values", str(directory / "ckpt-1"), str(directory / "ckpt-2")
    )
    assert "~ model/embedding/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 1.5" in out
    other = Model(seed=0)
    other.extra = zc.Variable(np.zeros(2))
    del other.embedding
    path = zc.Checkpoint(model=other).write(tmp_path / "other")
    code, out, _ = run_cli(capsys, "diff", str(directory / "ckpt-1"), path)
    assert "- model/embedding/.ATTRIBUTES/VARIABLE_VALUE" in out
    assert "+ model/extra/.ATTRIBUTES/VARIABLE_VALUE" in out
    assert "- save_counter/.ATTRIBUTES/VARIABLE_VALUE" in out


def test_diff_sees_changes_under_an_object_named_c(capsys, tmp_path):
    model = zc.AutoTrackable()
    model.lstm = zc.AutoTrackable()
    model.lstm.c = zc.Variable(np.zeros((3, 2)))  # LSTM cell state: a component named "c"
    model.lstm.h = zc.Variable(np.zeros(2))
    ckpt = zc.Checkpoint(model=model)
    a = ckpt.write(tmp_path / "a", options=zc.CheckpointOptions(chunk_bytes=16))
    model.lstm.c.assign(np.ones((3, 2)))
    b = ckpt.write(tmp_path / "b", options=zc.CheckpointOptions(chunk_bytes=16))
    code, out, _ = run_cli(capsys, "diff", "--values", a, b)
    assert code == 1
    assert out.splitlines() == ["~ model/lstm/c/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 1"]


def test_diff_values_of_complex_numbers_and_nans(capsys, tmp_path):
    model = zc.AutoTrackable()
    model.z = zc.Variable(np.array([1 + 2j, 3 - 1j], np.complex64))
    model.f = zc.Variable(np.array([1.0, 2.0, np.inf], np.float32))
    ckpt = zc.Checkpoint(model=model)
    a = ckpt.write(tmp_path / "a")
    model.z.assign(np.array([1 + 9j, 3 - 1j]))
    model.f.assign(np.array([1.5, np.nan, np.inf]))
    b = ckpt.write(tmp_path / "b")
    code, out, _ = run_cli(capsys, "diff", "--values", a, b)
    assert code == 1
    assert out.splitlines() == [
        "~ model/f/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 0.5, 1 values NaN in one only",
        "~ model/z/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 7",
    ]


def test_ls_and_gc_of_a_missing_directory_exit_3(capsys, tmp_path):
    for command in ("ls", "gc"):
        code, _, err = run_cli(capsys, command, str(tmp_path / "nowhere"))
        assert code == 3 and "does not exist" in err, command
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "ls", str(tmp_path / "file"))
    assert code == 3 and "is not a directory" in err
    code, out, _ = run_cli(capsys, "ls", str(tmp_path))
    assert code == 0 and "no checkpoints in" in out


def test_cp_local_to_local_is_verified_and_committed(saved, capsys, tmp_path):
    directory, model = saved
    code, out, _ = run_cli(capsys, "cp", str(directory / "ckpt-2"), str(tmp_path / "copy"))
    assert code == 0 and "verified" in out
    fresh = Model(seed=4)
    zc.Checkpoint(model=fresh).restore(tmp_path / "copy").assert_consumed()
    for a, b in zip(model_variables(fresh), model_variables(model), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert re.search(
        r"checked in [\d.]+ s \([\d.,]+ (B|KiB|MiB|GiB|TiB)/s\)$", str(zc.verify(tmp_path / "copy"))
    )
    code, _, err = run_cli(capsys, "cp", str(directory / "ckpt-2"), str(tmp_path / "copy"))
    assert code == 5 and "already exists" in err


def test_cp_refuses_a_damaged_source(saved, capsys, tmp_path):
    directory, _ = saved
    chunk = directory / "ckpt-1" / "model/embedding/.ATTRIBUTES/VARIABLE_VALUE/c.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\x00")
    code, _, err = run_cli(capsys, "cp", str(directory / "ckpt-1"), str(tmp_path / "copy"))
    assert (
        code == 4
        and "chunk (0, 0) of 'model/embedding/.ATTRIBUTES/VARIABLE_VALUE' is corrupt" in err
    )
    assert not (tmp_path / "copy").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")] == []


def test_gc_removes_old_leftovers_only(saved, capsys):
    directory, _ = saved
    leftover = directory / ".ckpt-3.zarrckpt-tmp-00ff"
    leftover.mkdir()
    code, out, _ = run_cli(capsys, "gc", str(directory))
    assert code == 0 and "0 leftovers removed" in out and leftover.exists()
    old = 1_000_000_000
    os.utime(leftover, (old, old))
    code, out, _ = run_cli(capsys, "gc", str(directory))
    assert f"removed {leftover}" in out and not leftover.exists()
    assert [i.name for i in zc.list_checkpoints(directory)] == ["ckpt-1", "ckpt-2"]


def test_s3_commands_and_copy_both_ways(saved, capsys, tmp_path, s3_url, s3_storage_options):
    directory, model = saved
    options = json.dumps(s3_storage_options)
    remote = f"{s3_url}/run/ckpt-2"
    code, out, _ = run_cli(
        capsys, "--storage-options", options, "cp", "--destination-storage-options", options,
        str(directory / "ckpt-2"), remote,
    )  # fmt: skip
    assert code == 0, out
    code, out, _ = run_cli(capsys, "--storage-options", options, "ls", f"{s3_url}/run")
    assert code == 0 and "committed" in out and "ckpt-2" in out
    code, out, _ = run_cli(capsys, "--storage-options", options, "show", remote)
    assert code == 0 and "/attempt-" in out.splitlines()[1]
    code, out, _ = run_cli(capsys, "--storage-options", options, "verify", remote)
    assert code == 0 and "OK" in out
    code, _, _ = run_cli(capsys, "--storage-options", options, "cp", remote, str(tmp_path / "back"))
    assert code == 0
    other = f"{s3_url}/run/ckpt-1"
    code, _, _ = run_cli(
        capsys, "--storage-options", options, "cp", "--destination-storage-options", options,
        str(directory / "ckpt-1"), other,
    )  # fmt: skip
    assert code == 0
    code, out, _ = run_cli(capsys, "--storage-options", options, "diff", "--values", other, remote)
    assert code == 1
    assert "~ model/embedding/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 1.5" in out
    code, out, _ = run_cli(capsys, "--storage-options", options, "dot", remote)
    assert code == 0 and out.startswith("digraph")
    code, out, _ = run_cli(capsys, "--storage-options", options, "gc", f"{s3_url}/run")
    assert code == 0 and "0 leftovers removed" in out
    code, _, err = run_cli(capsys, "--storage-options", options, "ls", f"{s3_url}/nowhere")
    assert code == 3 and "does not exist" in err
    np.testing.assert_array_equal(
        zc.load_variable(tmp_path / "back", "model/embedding"), model.embedding.numpy()
    )


@pytest.mark.parametrize(
    ("text", "expected"), [("64MiB", 64 << 20), ("1GiB", 1 << 30), ("512", 512), ("1.5k", 1536)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--storage-options", "[1]", "ls", "x"])
    assert info.value.code == 2
    assert "JSON object" in capsys.readouterr().err
