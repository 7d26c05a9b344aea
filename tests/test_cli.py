"""The zarrckpt command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import zarr

import zarrckpt as zc
from zarrckpt.cli import main, parse_size


def test_demo_saves_restores_and_reports(tmp_path, capsys):
    assert main(["demo", "--size", "2MiB", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("bit-exact") == 2
    assert "assert_consumed() passed" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-1", "ckpt-2"]
    graph = zc.ObjectGraph.decode((tmp_path / "ckpt-2" / "object_graph.msgpack").read_bytes())
    keys = [a.key for _, a in graph.attributes()]
    assert "model/embedding/.ATTRIBUTES/VARIABLE_VALUE" in keys
    assert any(".OPTIMIZER_SLOT/optimizer/momentum" in key for key in keys)
    counter = zarr.open_group(str(tmp_path / "ckpt-2"), mode="r")[
        "save_counter/.ATTRIBUTES/VARIABLE_VALUE"
    ]
    assert counter[...] == np.int64(2)


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


def test_demo_refuses_to_overwrite_and_exits_2(tmp_path, capsys):
    (tmp_path / "ckpt-1").mkdir()
    assert main(["demo", "--size", "1MiB", "--dir", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [("64MiB", 64 << 20), ("1GiB", 1 << 30), ("512", 512), ("1.5k", 1536)]
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_garbage():
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
