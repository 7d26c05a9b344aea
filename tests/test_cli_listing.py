"""ls and show: sizes in human units, leftovers with their size, a checkpoint's own listing,
and --json output for ls, show and verify."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Model, run_cli
from zarrckpt.directory import format_size

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")

EMBEDDING = "model/embedding/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    manager = zc.CheckpointManager(zc.Checkpoint(model=Model(seed=0)), tmp_path / "run")
    manager.save(metrics={"loss": 0.5})
    manager.save(metrics={"loss": 0.25})
    manager.wait()
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024 * 1024 - 1, "1.0 MiB"),  # never "1024.0 KiB"
        (64 << 20, "64.0 MiB"),
        (int(1.5 * (1 << 30)), "1.5 GiB"),
        (3 << 40, "3.0 TiB"),
        (5000 << 40, "5,000.0 TiB"),
    ],
)
def test_format_size_picks_the_unit_by_magnitude(nbytes, text):
    assert format_size(nbytes) == text


def test_ls_shows_a_leftover_with_its_size_on_disk(run_dir, capsys):
    leftover = run_dir / "ckpt-7"
    (leftover / "model").mkdir(parents=True)
    (leftover / "model" / "chunk").write_bytes(b"x" * 3000)
    (leftover / "zarr.json").write_bytes(b"{}")
    code, out, _ = run_cli(capsys, "ls", str(run_dir))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["7"].split()[3:7] == ["2.9", "KiB", "NOT", "COMMITTED"]  # 3002 bytes
    committed = zc.list_checkpoints(run_dir)[0]
    assert rows["1"].split()[3:6] == [*format_size(committed.nbytes).split(), "committed"]
    assert "MiB" not in out  # a few KiB are not shown as 0.0 MiB
    info = zc.list_checkpoints(run_dir)[-1]
    assert (info.name, info.nbytes, info.stored_nbytes, info.size) == ("ckpt-7", 0, 3002, 3002)


def test_ls_of_an_uncommitted_s3_prefix_shows_its_size(capsys, s3_url, s3_storage_options):
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3_url, **s3_storage_options)
    attempt = f"attempt-{'a' * 32}"
    fs.pipe_file(f"{s3_url}/run/ckpt-3/{attempt}/model/c.0", b"y" * 5000)
    options = json.dumps(s3_storage_options)
    code, out, _ = run_cli(capsys, "ls", f"{s3_url}/run", "--storage-options", options)
    assert code == 0
    row = out.splitlines()[1]
    assert row.split()[0] == "3" and row.split()[3:7] == ["4.9", "KiB", "NOT", "COMMITTED"]


def test_ls_of_a_checkpoint_lists_its_variables(run_dir, capsys):
    code, out, _ = run_cli(capsys, "ls", str(run_dir / "ckpt-2"))
    assert code == 0
    assert "no checkpoints" not in out
    _, shown, _ = run_cli(capsys, "show", str(run_dir / "ckpt-2"))
    assert out == shown
    row = next(line for line in out.splitlines() if line.startswith(EMBEDDING))
    assert row.split()[1:6] == ["[10,", "6]", "float32", "240", "B"]


def test_show_sizes_are_human(capsys, tmp_path):
    model = zc.AutoTrackable()
    model.big = zc.Variable(np.zeros((1024, 768), np.float32))  # 3 MiB
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    code, out, _ = run_cli(capsys, "show", path)
    assert code == 0
    assert "3.0 MiB" in next(line for line in out.splitlines() if line.startswith("model/big"))
    assert out.splitlines()[2].endswith(format_size(zc.verify(path).nbytes))


def test_ls_json(run_dir, capsys):
    (run_dir / "ckpt-5").mkdir()
    (run_dir / "ckpt-5" / "x").write_bytes(b"z" * 10)
    code, out, err = run_cli(capsys, "ls", str(run_dir), "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert document["directory"] == str(run_dir)
    entries = document["checkpoints"]
    assert [e["name"] for e in entries] == ["ckpt-1", "ckpt-2", "ckpt-5"]
    first = entries[0]
    assert set(first) == {
        "name", "path", "number", "state", "committed", "created", "nbytes", "metadata", "damage",
    }  # fmt: skip
    info = zc.list_checkpoints(run_dir)[0]
    assert first == {
        "name": "ckpt-1",
        "path": str(run_dir / "ckpt-1"),
        "number": 1,
        "state": "committed",
        "committed": True,
        "created": info.created,
        "nbytes": info.nbytes,
        "metadata": {"loss": 0.5},
        "damage": "",
    }
    assert entries[1]["metadata"] == {"loss": 0.25}
    assert entries[2]["state"] == "NOT COMMITTED" and entries[2]["nbytes"] == 10


def test_ls_json_of_an_empty_directory(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "ls", "--json", str(tmp_path))
    assert code == 0 and json.loads(out) == {"directory": str(tmp_path), "checkpoints": []}


def test_show_json(run_dir, capsys):
    path = run_dir / "ckpt-2"
    code, out, err = run_cli(capsys, "show", str(path), "--json")
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert set(document) == {
        "checkpoint", "zarr_group", "created", "files", "nbytes", "metadata", "variables",
    }  # fmt: skip
    assert document["checkpoint"] == document["zarr_group"] == str(path)
    assert document["nbytes"] == zc.verify(path).nbytes
    keys = [v["key"] for v in document["variables"]]
    assert keys == sorted(key for key, _, _ in zc.list_variables(path))
    embedding = next(v for v in document["variables"] if v["key"] == EMBEDDING)
    assert embedding == {
        "key": EMBEDDING,
        "shape": [10, 6],
        "dtype": "float32",
        "nbytes": 240,
        "chunks": [10, 6],
        "codecs": ["bytes", "crc32c"],
    }
    # ls of the checkpoint gives the same document.
    code, listed, _ = run_cli(capsys, "ls", "--json", str(path))
    assert code == 0 and json.loads(listed) == document


def test_show_tree_json(run_dir, capsys):
    code, out, _ = run_cli(capsys, "show", "--tree", "--json", str(run_dir / "ckpt-1"))
    assert code == 0
    nodes = json.loads(out)["nodes"]
    graph = zc.object_metadata(run_dir / "ckpt-1")
    assert len(nodes) == len(graph.nodes)
    assert nodes[0]["id"] == 0 and nodes[0]["path"] == ""
    assert {c["name"] for c in nodes[0]["children"]} == {"model", "save_counter"}
    embedding = next(n for n in nodes if n["path"] == "model/embedding")
    assert embedding["attributes"] == [
        {"name": "VARIABLE_VALUE", "key": EMBEDDING, "shape": [10, 6], "dtype": "float32"}
    ]
    model = next(n for n in nodes if n["path"] == "model")
    assert {c["name"] for c in model["children"]} == {"layers", "embedding"}


def test_verify_json(run_dir, capsys):
    path = run_dir / "ckpt-1"
    code, out, err = run_cli(capsys, "verify", "--json", str(path))
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert set(document) == {
        "checkpoint", "ok", "arrays", "files", "nbytes", "seconds", "unlisted",
    }  # fmt: skip
    report = zc.verify(path)
    assert (document["checkpoint"], document["ok"], document["unlisted"]) == (str(path), True, [])
    assert (document["arrays"], document["files"], document["nbytes"]) == (
        report.arrays,
        report.files,
        report.nbytes,
    )


def test_json_errors_are_one_line_on_stderr_and_nothing_on_stdout(run_dir, capsys):
    chunk = run_dir / "ckpt-1" / EMBEDDING / "c.0.0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x10
    chunk.write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "verify", "--json", str(run_dir / "ckpt-1"))
    assert (code, out) == (4, "")
    assert len(err.splitlines()) == 1 and err.startswith("zarrckpt: error: ")
    assert f"{EMBEDDING}/c.0.0" in err
    for command in ("show", "ls"):
        code, out, err = run_cli(capsys, command, "--json", str(run_dir / "nowhere"))
        assert (code, out) == (3, ""), command
        assert len(err.splitlines()) == 1 and err.startswith("zarrckpt: error: ")


def test_ls_of_a_damaged_commit_lists_its_damage_in_json(run_dir, capsys):
    commit = run_dir / "ckpt-2" / "_COMMIT"
    commit.write_bytes(commit.read_bytes()[:-3])
    code, out, _ = run_cli(capsys, "ls", "--json", str(run_dir))
    assert code == 0
    damaged = json.loads(out)["checkpoints"][1]
    assert damaged["state"] == "DAMAGED" and damaged["committed"] is False
    assert damaged["damage"] and damaged["nbytes"] == sum(
        f.stat().st_size for f in (run_dir / "ckpt-2").rglob("*") if f.is_file()
    )
    # ls of the damaged checkpoint itself: it holds a _COMMIT, which cannot be read.
    code, out, err = run_cli(capsys, "ls", str(run_dir / "ckpt-2"))
    assert (code, out) == (4, "") and len(err.splitlines()) == 1
    assert os.path.exists(commit)
