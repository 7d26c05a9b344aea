"""diff --values reads every common value on both sides through the manifests' checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")

W = "model/w/.ATTRIBUTES/VARIABLE_VALUE"  # equal on both sides: same bytes, same CRCs
V = "model/v/.ATTRIBUTES/VARIABLE_VALUE"  # differs by 0.5 in one place


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    model = zc.AutoTrackable()
    model.w = zc.Variable(np.arange(4096, dtype=np.float32).reshape(64, 64))
    model.v = zc.Variable(np.zeros(8, np.float64))
    ckpt = zc.Checkpoint(model=model)
    options = zc.CheckpointOptions(chunk_bytes=4096)  # w in 4 chunks of 16 rows
    a = Path(ckpt.write(tmp_path / "a", options=options))
    model.v.assign(np.array([0, 0, 0, 0.5, 0, 0, 0, 0]))
    b = Path(ckpt.write(tmp_path / "b", options=options))
    return a, b


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


CORRUPTIONS = {
    "truncated chunk": (f"{W}/c.2.0", _truncate),
    "flipped chunk": (f"{W}/c.1.0", _flip),
    "missing chunk": (f"{W}/c.3.0", os.remove),
    "broken zarr.json": (f"{W}/zarr.json", _flip),
}


def test_the_undamaged_pair_differs_in_v_only(pair, capsys):
    a, b = pair
    code, out, err = run_cli(capsys, "diff", "--values", str(a), str(b))
    assert (code, err) == (1, "")
    assert out.splitlines() == [f"~ {V}: max abs difference 0.5"]
    code, out, _ = run_cli(capsys, "diff", "--values", str(a), str(a))
    assert (code, out) == (0, "no differences\n")


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_damaged_value_on_either_side_is_an_error(pair, capsys, side, corruption):
    a, b = pair
    damaged = a if side == "a" else b
    relative, damage = CORRUPTIONS[corruption]
    damage(damaged / relative)
    code, out, err = run_cli(capsys, "diff", "--values", str(a), str(b))
    assert code == 4, (out, err)
    assert "no differences" not in out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("zarrckpt: error: "), err
    assert "Traceback" not in err
    assert f"{damaged}/{W}" in lines[0]
    # Without --values only the manifests are compared: the same keys differ.
    code, out, _ = run_cli(capsys, "diff", str(a), str(b))
    assert (code, out.splitlines()) == (1, [f"~ {V}"])


def test_values_compared_in_blocks_across_other_chunkings(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("zarrckpt.cli._DIFF_BLOCK_BYTES", 1000)  # many blocks per array
    rng = np.random.default_rng(5)
    values = rng.standard_normal((100, 30)).astype(np.float32)
    model = zc.AutoTrackable()
    model.x = zc.Variable(values.copy())
    ckpt = zc.Checkpoint(model=model)
    a = ckpt.write(tmp_path / "a", options=zc.CheckpointOptions(chunk_bytes=7 * 30 * 4))
    b = ckpt.write(tmp_path / "b", options=zc.CheckpointOptions(chunk_bytes=3 * 30 * 4))
    code, out, _ = run_cli(capsys, "diff", "--values", a, b)
    assert (code, out) == (0, "no differences\n")  # other chunks, the same values
    changed = values.copy()
    changed[0, 0] += 0.25
    changed[97, 29] -= 2.0  # in the last block
    changed[50, 3] = np.nan
    changed[51, 3] = np.nan
    model.x.assign(changed)
    c = ckpt.write(tmp_path / "c", options=zc.CheckpointOptions(chunk_bytes=3 * 30 * 4))
    code, out, _ = run_cli(capsys, "diff", "--values", a, c)
    assert code == 1
    assert out.splitlines() == [
        "~ model/x/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 2, 2 values NaN in one only"
    ]


def test_large_integers_that_float64_rounds_alike_still_differ(tmp_path, capsys):
    model = zc.AutoTrackable()
    model.n = zc.Variable(np.array([2**53, 7], np.int64))
    ckpt = zc.Checkpoint(model=model)
    a = ckpt.write(tmp_path / "a")
    model.n.assign(np.array([2**53 + 1, 7], np.int64))
    b = ckpt.write(tmp_path / "b")
    code, out, _ = run_cli(capsys, "diff", "--values", a, b)
    assert code == 1
    assert out.splitlines() == ["~ model/n/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 1"]


def test_scalars_are_compared(tmp_path, capsys):
    model = zc.AutoTrackable()
    model.s = zc.Variable(np.float32(1.0))
    ckpt = zc.Checkpoint(model=model)
    a = ckpt.write(tmp_path / "a")
    model.s.assign(np.float32(3.5))
    b = ckpt.write(tmp_path / "b")
    code, out, _ = run_cli(capsys, "diff", "--values", a, b)
    assert code == 1
    assert out.splitlines() == ["~ model/s/.ATTRIBUTES/VARIABLE_VALUE: max abs difference 2.5"]
