"""The distributed examples run for real, and docs/distributed.md and docs/scaling.md say true.

examples/distributed_torch.py runs under torchrun and examples/distributed_mpi.py
under mpiexec, three ranks twice in one directory (the second run goes on
from the first one's latest checkpoint), then with another number of ranks;
this process restores their checkpoints into plain Variables of the global
shape and checks every value. Every launch has a hard timeout after which its
whole process tree is killed. The error messages, the chunk layout table and
the output of the scaling script quoted in the docs are produced again here
and compared.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from launching import free_port, run_launcher
from threaded_ranks import run_ranks

import zarrckpt as zc
from zarrckpt.distributed import even_split, shard_layout
from zarrckpt.distributed._plan import ValuePlan, intersect
from zarrckpt.errors import DistributedRestoreError, DistributedSaveError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DISTRIBUTED_MD = ROOT / "docs" / "distributed.md"
SCALING_MD = ROOT / "docs" / "scaling.md"
LAUNCH_TIMEOUT = 60.0  # seconds; then every process of the launch is killed


# Launching -----------------------------------------------------------------------------------


def launch(command: list[str]) -> str:
    """Run a launcher; its stdout. Fails the test on a non-zero exit or after LAUNCH_TIMEOUT."""
    return run_launcher(command, cwd=ROOT, timeout=LAUNCH_TIMEOUT)


def torchrun(ranks: int, *args: str) -> str:
    pytest.importorskip("torch.distributed")
    script = EXAMPLES / "distributed_torch.py"
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    return launch([*runner, "--master-port", str(free_port()), str(script), *args])


def mpiexec(ranks: int | None, *args: str) -> str:
    """Under mpiexec with ``ranks`` ranks, or (None) one process started alone."""
    pytest.importorskip("mpi4py")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.access(mpiexec, os.X_OK):
        pytest.skip(f"{mpiexec} not found (pip install mpich)")
    program = [sys.executable, str(EXAMPLES / "distributed_mpi.py"), *args]
    return launch(program if ranks is None else [mpiexec, "-n", str(ranks), *program])


def result(out: str) -> dict[str, Any]:
    """The ``RESULT {json}`` line rank 0 prints."""
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, out
    found: dict[str, Any] = json.loads(lines[0].removeprefix("RESULT "))
    return found


# The values: a function of the step (as the examples define them) -----------------------------


def expected(step: int) -> dict[str, np.ndarray]:
    embedding = np.arange(60, dtype=np.float32).reshape(10, 6)
    embedding += step * np.arange(1, 11, dtype=np.float32)[:, None]
    kernel = np.subtract.outer(np.arange(12), np.arange(8)).astype(np.float32) / 4 + 0.5 * step
    return {"embedding": embedding, "kernel": kernel, "bias": np.full(8, step, np.float32)}


def check_plain(path: str, step: int) -> dict[str, zc.Variable]:
    """Restore ``path`` into plain Variables of the global shapes here; check every value."""
    model = zc.AutoTrackable()
    model.embedding = zc.Variable(np.zeros((10, 6), np.float32))
    model.kernel = zc.Variable(np.zeros((12, 8), np.float32))
    model.bias = zc.Variable(np.zeros(8, np.float32))
    saved_step = zc.Variable(np.int64(-1))
    zc.Checkpoint(model=model, step=saved_step).restore(path).assert_consumed()
    assert int(saved_step) == step
    for name, value in expected(step).items():
        np.testing.assert_array_equal(getattr(model, name).numpy(), value, err_msg=name)
    zc.verify(path)  # every file against the manifest
    return {"embedding": model.embedding, "kernel": model.kernel}


def chunk_files(path: str, name: str) -> list[str]:
    """The chunk files of ``model/<name>`` in a local checkpoint: ``c.<i>.<j>``, by name."""
    array = Path(path) / "model" / name / ".ATTRIBUTES" / "VARIABLE_VALUE"
    return sorted(p.name for p in array.glob("c.*") if p.is_file())


def doc_quotes(text: str, out: str, directory: Path, shown: str) -> None:
    """Every line the example printed (but RESULT) is quoted so in the doc, path moved."""
    for line in out.replace(str(directory), shown).splitlines():
        if line and not line.startswith("RESULT "):
            assert line in text, f"{line!r} is not in docs/distributed.md"


# The examples ---------------------------------------------------------------------------------


def test_torch_example_continues_from_its_checkpoint_and_restores_on_two_ranks(tmp_path):
    directory = tmp_path / "zc-dist"
    start = time.monotonic()
    first = torchrun(3, "--dir", str(directory), "--steps", "3")
    assert result(first) == {
        "world_size": 3,
        "restored": None,
        "step": 3,
        "latest": str(directory / "ckpt-3"),
        "checkpoints": [str(directory / f"ckpt-{n}") for n in (1, 2, 3)],
    }
    second = torchrun(3, "--dir", str(directory), "--steps", "2")
    assert result(second) == {
        "world_size": 3,
        "restored": str(directory / "ckpt-3"),
        "step": 5,  # went on from step 3
        "latest": str(directory / "ckpt-5"),
        "checkpoints": [str(directory / f"ckpt-{n}") for n in (3, 4, 5)],  # max_to_keep=3
    }
    check = torchrun(2, "--dir", str(directory), "--check")
    assert result(check) == {
        "world_size": 2,
        "checked": str(directory / "ckpt-5"),
        "step": 5,
        "reads": [  # each rank: 2 of the kernel's 3 chunks, and 4 other values' one chunk
            [{"embedding": [0, 5], "kernel": [0, 6]}, 6, 568],
            [{"embedding": [5, 10], "kernel": [6, 12]}, 6, 568],
        ],
    }
    seconds = time.monotonic() - start

    assert sorted(p.name for p in directory.iterdir()) == [
        "ckpt-3",
        "ckpt-4",
        "ckpt-5",
        "zarrckpt_state.ckpt.json",
    ]
    for number in (3, 4, 5):
        check_plain(str(directory / f"ckpt-{number}"), number)
    # Three ranks wrote the kernel in one chunk a block; the embedding (4, 3, 3 rows)
    # in the single-process grid, with rows sent to rank 0.
    assert chunk_files(str(directory / "ckpt-5"), "kernel") == ["c.0.0", "c.1.0", "c.2.0"]
    assert chunk_files(str(directory / "ckpt-5"), "embedding") == ["c.0.0"]
    rows = zc.load_variable(directory / "ckpt-5", "model/embedding", index=slice(3, 8))
    np.testing.assert_array_equal(rows, expected(5)["embedding"][3:8])

    text = DISTRIBUTED_MD.read_text()
    for out in (first, second, check):
        doc_quotes(text, out, directory, "/tmp/zc-dist")
    print(f"torch example: 3 launches in {seconds:.1f} s")


def test_mpi_example_continues_restores_on_one_rank_and_trains_on_two(tmp_path):
    directory = tmp_path / "zc-mpi"
    first = mpiexec(3, "--dir", str(directory), "--steps", "3")
    assert result(first)["step"] == 3 and result(first)["restored"] is None
    second = mpiexec(3, "--dir", str(directory), "--steps", "2")
    assert result(second)["restored"] == str(directory / "ckpt-3")
    assert result(second)["step"] == 5
    check_plain(str(directory / "ckpt-5"), 5)

    alone = mpiexec(None, "--dir", str(directory), "--check")  # one rank, no mpiexec
    assert result(alone)["reads"] == [[{"embedding": [0, 10], "kernel": [0, 12]}, 7, 700]]
    doc_quotes(DISTRIBUTED_MD.read_text(), alone, directory, "/tmp/zc-mpi")

    # Two ranks restore what three wrote and go on: step 6, written in their own layout.
    two = mpiexec(2, "--dir", str(directory), "--steps", "1")
    assert result(two)["restored"] == str(directory / "ckpt-5")
    assert result(two)["step"] == 6
    assert result(two)["checkpoints"] == [str(directory / f"ckpt-{n}") for n in (4, 5, 6)]
    check_plain(str(directory / "ckpt-6"), 6)
    assert chunk_files(str(directory / "ckpt-6"), "kernel") == ["c.0.0", "c.1.0"]  # rows of 6
    assert chunk_files(str(directory / "ckpt-6"), "embedding") == ["c.0.0", "c.1.0"]  # rows of 5


# What docs/distributed.md quotes ---------------------------------------------------------------


def _one_block(text: str, marker: str) -> str:
    """The text of the fenced block that contains ``marker``."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, marker
    return found[0]


def test_the_save_error_the_doc_shows_is_the_one_every_rank_raises(tmp_path):
    shown = "/shared/run"

    def work(coordinator: Any) -> str:
        start, stop = even_split(12, coordinator.world_size, coordinator.rank)
        w = zc.Variable.sharded(np.ones((stop - start, 8), np.float32), (12, 8), (start, 0))

        def progress(nbytes: int) -> None:  # called for every file written
            if coordinator.rank == 1:
                raise OSError(28, "No space left on device")

        ckpt = zc.Checkpoint(w=w)
        return ckpt.save(
            tmp_path / "ckpt",
            coordinator=coordinator,
            options=zc.CheckpointOptions(progress=progress),
        )

    errors = run_ranks(3, work)
    assert all(isinstance(e, DistributedSaveError) for e in errors), errors
    assert len({str(e) for e in errors}) == 1
    assert errors[0].failures == {1: "OSError: [Errno 28] No space left on device"}
    assert isinstance(errors[1].__cause__, OSError)
    assert list(tmp_path.iterdir()) == []  # nothing committed, the attempt removed
    message = f"{type(errors[0]).__module__}.{type(errors[0]).__name__}: {errors[0]}"
    block = _one_block(DISTRIBUTED_MD.read_text(), "zarrckpt.errors.DistributedSaveError")
    assert block.strip() == message.replace(str(tmp_path), shown)


def test_the_restore_error_the_doc_shows_is_the_one_every_rank_raises(tmp_path):
    def save(coordinator: Any) -> str:
        start, stop = even_split(12, coordinator.world_size, coordinator.rank)
        w = zc.Variable.sharded(np.ones((stop - start, 8), np.float32), (12, 8), (start, 0))
        return zc.Checkpoint(w=w).write(tmp_path / "ckpt", coordinator=coordinator)

    def restore(coordinator: Any) -> Any:
        rows = 16 if coordinator.rank == 1 else 12  # rank 1 built its model for 16 rows
        start, stop = even_split(rows, coordinator.world_size, coordinator.rank)
        w = zc.Variable.sharded(np.zeros((stop - start, 8), np.float32), (rows, 8), (start, 0))
        return zc.Checkpoint(w=w).restore(tmp_path / "ckpt", coordinator=coordinator)

    assert run_ranks(3, save) == [str(tmp_path / "ckpt")] * 3
    errors = run_ranks(2, restore)
    assert all(isinstance(e, DistributedRestoreError) for e in errors), errors
    block = _one_block(DISTRIBUTED_MD.read_text(), "restore failed on ranks")
    assert block.strip() == str(errors[0]).replace(str(tmp_path), "/shared/run")


def _exchanged(value: ValuePlan, boxes: list[Any]) -> float:
    """The share of a value's bytes sent to chunk owners of other ranks."""
    sent = 0
    for coords in np.ndindex(*value.layout.grid):
        box, owner = value.chunk_box(coords), value.owner(coords)
        for rank, block in enumerate(boxes):
            part = intersect(box, block)
            if part is not None and rank != owner:
                sent += math.prod(b - a for a, b in part)
    return sent / math.prod(value.layout.shape)


def test_the_chunk_layout_table_is_what_shard_layout_chooses():
    text = DISTRIBUTED_MD.read_text()
    table = text[text.index("| value | split | chunks | written |") :].split("\n\n")[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) >= 8
    chunk_bytes = zc.CheckpointOptions().chunk_bytes
    for row in rows:
        value, split, chunks, written = (cell.strip() for cell in row.strip("|").split("|"))
        dims, count = re.match(r"\((\d+), (\d+)\)", value), re.search(r"over ([\d,]+)", split)
        assert dims is not None and count is not None, row
        shape = (int(dims[1]), int(dims[2]))
        ranks = int(count[1].replace(",", ""))
        axis = 1 if split.startswith("columns") else 0
        boxes = []
        for rank in range(ranks):
            box = [(0, n) for n in shape]
            box[axis] = even_split(shape[axis], ranks, rank)
            boxes.append(tuple(box))
        layout, exchange = shard_layout(shape, np.dtype("float32"), boxes, chunk_bytes, None)
        found = re.match(r"\((\d+), (\d+)\) x ([\d,]+)", chunks)
        assert found is not None, row
        assert layout.chunk_shape == (int(found[1]), int(found[2])), row
        assert math.prod(layout.grid) == int(found[3].replace(",", "")), row
        assert exchange == written.startswith("exchange"), row
        if exchange:
            value_plan = ValuePlan("v", layout, blocks=dict(enumerate(boxes)), exchange=True)
            share = re.search(r"(\d+)%", written)
            assert share is not None, row
            assert round(100 * _exchanged(value_plan, boxes)) == int(share[1]), row


# What docs/scaling.md computes ----------------------------------------------------------------


def test_the_scaling_script_prints_what_the_doc_shows(tmp_path, capsys):
    """The script runs as written and prints the doc's numbers (times and memory aside)."""
    text = SCALING_MD.read_text()
    script = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    shown = re.findall(r"```text\n(.*?)```", text, flags=re.S)
    assert len(script) == 1 and len(shown) == 1
    exec(compile(script[0], f"{SCALING_MD}:script", "exec"), {"__name__": "scaling"})  # our doc
    printed = capsys.readouterr().out

    def numbers(output: str) -> list[str]:
        return [line for line in output.splitlines() if not line.lstrip().startswith("~")]

    assert numbers(printed) == numbers(shown[0])
    for constant in ("over 67,108,864", "_MAX_FILES 1,048,576", "3,500/s", "5,500/s"):
        assert constant in shown[0]


def test_the_docs_name_the_constants_the_code_has():
    from zarrckpt._commit import _MAX_FILES, MAX_MANIFEST_BYTES
    from zarrckpt.distributed import DEFAULT_TIMEOUT

    assert MAX_MANIFEST_BYTES == 64 << 20 and _MAX_FILES == 1 << 20
    assert DEFAULT_TIMEOUT == 600.0
    options = zc.CheckpointOptions()
    assert (options.chunk_bytes, options.threads) == (32 << 20, 8)
    assert "`DEFAULT_TIMEOUT`, 600 s" in DISTRIBUTED_MD.read_text()
    assert "timeout 600 s (`DEFAULT_TIMEOUT`)" in SCALING_MD.read_text()


def test_the_docs_link_only_files_that_exist():
    for doc in (DISTRIBUTED_MD, SCALING_MD):
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), (doc.name, target)
