"""gc: --dry-run removes nothing; what is kept is said, with the reason."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import fsspec
import pytest

import zarrckpt as zc
from tests.conftest import Model, run_cli
from zarrckpt.directory import format_size, gc_report, remove_leftovers

pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")

OLD = 1_000_000_000  # 2001


def _age(path: Path, seconds_ago: float | None = None, at: float | None = None) -> None:
    """Set the modification time of ``path`` and everything under it."""
    stamp = at if at is not None else time.time() - (seconds_ago or 0)
    for item in [*path.rglob("*"), path]:
        os.utime(item, (stamp, stamp))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    manager = zc.CheckpointManager(zc.Checkpoint(model=Model(seed=0)), tmp_path / "run")
    manager.save()
    manager.save()
    manager.wait()
    return tmp_path / "run"


@pytest.fixture
def leftovers(run_dir) -> tuple[Path, Path]:
    """An old leftover of a save (2000 bytes) and one changed 10 minutes ago (100 bytes)."""
    old = run_dir / ".ckpt-3.zarrckpt-tmp-0a0a"
    (old / "model").mkdir(parents=True)
    (old / "model" / "c").write_bytes(b"o" * 2000)
    _age(old, at=OLD)
    young = run_dir / ".ckpt-4.zarrckpt-tmp-0b0b"
    young.mkdir()
    (young / "zarr.json").write_bytes(b"y" * 100)
    _age(young, seconds_ago=600)
    return old, young


def test_dry_run_lists_what_would_go_and_removes_nothing(run_dir, leftovers, capsys):
    old, young = leftovers
    before = sorted(str(p) for p in run_dir.rglob("*"))
    code, out, err = run_cli(capsys, "gc", "--dry-run", str(run_dir))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"would remove {old} (2.0 KiB, last changed ")
    assert lines[0].endswith(" days ago)")
    assert lines[1] == (
        f"kept {young} (100 B): too young: last changed 10.0 min ago, under the threshold of "
        "1.0 h (a writer may still be using it)"
    )
    committed = sum(info.nbytes for info in zc.list_checkpoints(run_dir))
    assert lines[2] == (
        f"kept 2 committed checkpoints ({format_size(committed)}): gc never removes a "
        "committed checkpoint"
    )
    assert lines[3] == (
        "1 leftovers would be removed (2.0 KiB), 1 kept; nothing was removed (--dry-run)"
    )
    assert sorted(str(p) for p in run_dir.rglob("*")) == before


def test_gc_removes_the_old_and_says_why_it_kept_the_young(run_dir, leftovers, capsys):
    old, young = leftovers
    code, out, _ = run_cli(capsys, "gc", str(run_dir), "--older-than", "7200")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"removed {old} (2.0 KiB, last changed ")
    assert lines[1] == (
        f"kept {young} (100 B): too young: last changed 10.0 min ago, under the threshold of "
        "2.0 h (a writer may still be using it)"
    )
    assert lines[3] == "1 leftovers removed (2.0 KiB), 1 kept"
    assert not old.exists() and young.exists()
    assert [i.name for i in zc.list_checkpoints(run_dir)] == ["ckpt-1", "ckpt-2"]


def test_gc_says_it_keeps_uncommitted_and_damaged_directories(run_dir, capsys):
    (run_dir / "ckpt-9").mkdir()
    (run_dir / "ckpt-9" / "notes").write_bytes(b"n" * 10)
    commit = run_dir / "ckpt-2" / "_COMMIT"
    commit.write_bytes(commit.read_bytes()[:-1])
    code, out, _ = run_cli(capsys, "gc", "--older-than", "0", str(run_dir))
    assert code == 0
    lines = out.splitlines()
    assert (
        lines[0].startswith(f"kept {run_dir / 'ckpt-2'} (")
        and (
            "DAMAGED, its _COMMIT cannot be read; gc never removes a checkpoint with a _COMMIT "
            f"(zarrckpt verify {run_dir / 'ckpt-2'} tells more)"
        )
        in lines[0]
    )
    assert lines[1] == (
        f"kept {run_dir / 'ckpt-9'} (10 B): NOT COMMITTED, and not a leftover gc knows "
        "(zarrckpt saves into a hidden temporary directory or an attempt-<hex> prefix); "
        "remove it yourself if nothing writes to it"
    )
    assert lines[2].startswith("kept 1 committed checkpoints (")
    assert lines[3] == "0 leftovers removed (0 B), 0 kept"
    assert commit.exists() and (run_dir / "ckpt-9" / "notes").exists()


def test_library_dry_run_and_report(run_dir, leftovers):
    old, young = leftovers
    assert zc.gc(run_dir, dry_run=True) == [str(old)]
    assert remove_leftovers(run_dir, 3600.0, dry_run=True) == [(str(old), 2000)]
    assert old.exists()
    report = gc_report(run_dir, older_than=3600.0, dry_run=True)
    assert report.dry_run and report.removed_nbytes == 2000
    assert [(k.path, k.nbytes) for k in report.kept] == [(str(young), 100)]
    assert report.kept[0].age == pytest.approx(600, abs=120)
    assert report.kept[0].reason.startswith("too young: last changed 10.0 min ago")
    assert old.exists() and young.exists()
    # The real thing removes what the dry run listed, and returns it as before.
    assert zc.gc(run_dir) == [str(old)]
    assert not old.exists() and young.exists()


def test_s3_dry_run_and_kept_attempts(capsys, s3_url, s3_storage_options):
    so = s3_storage_options
    options = json.dumps(so)
    ckpt = zc.Checkpoint(model=Model(seed=0))
    ckpt.write(f"{s3_url}/run/ckpt-1", storage_options=so)
    fs, _ = fsspec.core.url_to_fs(s3_url, **so)
    dead = f"{s3_url}/run/ckpt-1/attempt-{'d' * 32}"
    fs.pipe_file(f"{dead}/zarr.json", b"d" * 300)
    # A checkpoint whose _COMMIT cannot be read, with an attempt inside.
    fs.pipe_file(f"{s3_url}/run/ckpt-2/_COMMIT", b"not a manifest")
    unknown = f"{s3_url}/run/ckpt-2/attempt-{'e' * 32}"
    fs.pipe_file(f"{unknown}/zarr.json", b"e" * 50)
    code, out, _ = run_cli(capsys, "gc", f"{s3_url}/run", "--storage-options", options)
    assert code == 0
    assert f"kept {dead} (300 B): too young: last changed " in out
    assert "under the threshold of 1.0 h (a writer may still be using it)" in out
    assert (
        f"kept {unknown} (50 B): its checkpoint's _COMMIT cannot be read (damaged, or a newer "
        "format), so gc cannot tell whether it is the committed data"
    ) in out
    code, out, _ = run_cli(
        capsys, "gc", f"{s3_url}/run", "--storage-options", options, "--older-than", "0",
        "--dry-run",
    )  # fmt: skip
    assert code == 0
    assert f"would remove {dead} (300 B, last changed " in out
    assert "1 leftovers would be removed (300 B), 1 kept; nothing was removed" in out
    fs.invalidate_cache()
    assert fs.exists(f"{dead}/zarr.json")
    code, out, _ = run_cli(
        capsys, "gc", f"{s3_url}/run", "--storage-options", options, "--older-than", "0"
    )
    assert code == 0 and f"removed {dead} (300 B" in out
    fs.invalidate_cache()
    assert not fs.exists(f"{dead}/zarr.json") and fs.exists(f"{unknown}/zarr.json")
    zc.verify(f"{s3_url}/run/ckpt-1", so)
