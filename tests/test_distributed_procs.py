"""Distributed saves and restores by real process groups: gloo (torch.distributed) and MPI.

Each rank is a process running tests/dist_worker.py, which defines the model
and its values (random bit patterns, deterministic) and the scenarios. Ranks
write their results to JSON files and the blocks they restored to .npy files;
the assertions are made here, bit for bit against the expected global values.
Every launch has a hard timeout: a hang fails the test, it never blocks CI.

Launches are few (importing torch costs over a second per process): the
four ranks of ``four_ranks`` run the mixed-layout save, the overlapping
blocks and the failing rank one after the other, the three of ``three_ranks``
the restores by rows, the save with replicated values and a manager's first
saves; each test using them looks at its own step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from launching import free_port, wait_all

import zarrckpt as zc

WORKER = Path(__file__).with_name("dist_worker.py")
_spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
assert _spec is not None and _spec.loader is not None
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

COORDINATOR_TIMEOUT = 20.0  # seconds; a rank out of step fails its collective after this
LAUNCH_TIMEOUT = 60.0  # seconds; the hard limit of one launch, then every rank is killed
FINALIZE_FILES = ("_COMMIT", "object_graph.msgpack", "zarr.json")  # rank 0's, at commit


# Launching ranks ---------------------------------------------------------------------------


@dataclass
class Launch:
    """The outcome of one launch: every rank's results and exit status."""

    out: Path
    world: int
    returncodes: list[int]
    results: list[dict[str, Any]]
    seconds: float

    def logs(self) -> str:
        parts = []
        for log in sorted(self.out.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-4000:]}")
        for rank, result in enumerate(self.results):
            parts.append(f"--- rank {rank} results ---\n{json.dumps(result, indent=1)[-4000:]}")
        return "\n".join(parts)

    def step(self, name: str, ranks: list[int] | None = None) -> list[dict[str, Any]]:
        """Each rank's result of step ``name`` (ranks given: those ranks only)."""
        found = []
        for rank in range(self.world) if ranks is None else ranks:
            result = self.results[rank].get(name)
            if result is None:
                pytest.fail(f"rank {rank} has no result for step {name!r}\n{self.logs()}")
            if "unexpected" in result:
                pytest.fail(f"rank {rank}, step {name!r} failed:\n{result['unexpected']}")
            found.append(result)
        return found

    def block(self, step: str, rank: int, name: str) -> np.ndarray:
        return np.load(self.out / f"{step}.rank{rank}.{name}.npy")


def _mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")
    if found is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    return found


def launch(
    out: Path,
    world: int,
    steps: list[dict[str, Any]],
    *,
    backend: str = "gloo",
    timeout: float = COORDINATOR_TIMEOUT,
    storage_options: dict[str, Any] | None = None,
    broken_group: bool = False,
    expected_codes: list[int] | None = None,
) -> Launch:
    """Run ``steps`` on ``world`` ranks (gloo processes, or under mpiexec); their results.

    Fails the test if the launch outlives LAUNCH_TIMEOUT or a rank's exit
    status is not the expected one (0 unless given).
    """
    out.mkdir(parents=True)
    config = {
        "backend": backend,
        "timeout": timeout,
        "out": str(out),
        "steps": [{k: str(v) if isinstance(v, Path) else v for k, v in s.items()} for s in steps],
        "storage_options": storage_options,
        "broken_group": broken_group,
    }
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for _attempt in range(3):  # a port taken between free_port() and the bind: try another
        for stale in out.glob("*.log"):
            stale.unlink()
        started = time.monotonic()
        env["DIST_WORKER_EPOCH"] = repr(time.time())
        procs = []
        if backend == "gloo":
            port = str(free_port())
            for rank in range(world):
                rank_env = {
                    **env,
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port,
                    "RANK": str(rank),
                    "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world),
                }
                with open(out / f"rank{rank}.log", "wb") as log:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, str(WORKER), str(config_path)],
                            env=rank_env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
        else:
            with open(out / "mpiexec.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            _mpiexec(),
                            "-n",
                            str(world),
                            sys.executable,
                            str(WORKER),
                            str(config_path),
                        ],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        codes = wait_all(procs, LAUNCH_TIMEOUT)
        seconds = time.monotonic() - started
        results = []
        for rank in range(world):
            path = out / f"rank{rank}.json"
            results.append(json.loads(path.read_text()) if path.exists() else {})
        result = Launch(out, world, codes or [], results, seconds)
        logs = result.logs()
        if codes is None:
            pytest.fail(f"the ranks were still running after {LAUNCH_TIMEOUT} s\n{logs}")
        if backend == "gloo" and "ddress already in use" in logs and not any(results):
            continue
        break
    if backend == "mpi":
        expected = [0]
    else:
        expected = expected_codes if expected_codes is not None else [0] * world
    if codes != expected:
        pytest.fail(f"exit statuses {codes}, expected {expected}\n{logs}")
    return result


# What the parent checks ----------------------------------------------------------------------


def bits(array: np.ndarray) -> np.ndarray:
    return array.view(W.bits_dtype(array.dtype))


def expected_block(name: str, version: int, layout: str, rank: int, world: int) -> np.ndarray:
    """The bits rank ``rank`` of ``world`` must hold for ``name`` in ``layout``."""
    whole = bits(W.global_value(name, version))
    block = W.block_of(name, layout, rank, world)
    return whole if block is None else whole[W.region(block)]


def check_restored(run: Launch, step: str, version: int, layout: str) -> list[dict[str, Any]]:
    """Every rank's restored blocks are bit-exact, and lie where ``block_of`` says."""
    results = run.step(step)
    for rank, result in enumerate(results):
        for name in W.VALUES:
            block = W.block_of(name, layout, rank, run.world)
            shape, _ = W.VALUES[name]
            offset, block_shape = block if block is not None else ((0,) * len(shape), shape)
            assert result["blocks"][name] == {"offset": list(offset), "shape": list(block_shape)}
            got = run.block(step, rank, name)
            want = expected_block(name, version, layout, rank, run.world)
            assert got.dtype == want.dtype and got.shape == want.shape, (rank, name)
            assert np.array_equal(got, want), f"rank {rank}: {name} differs from version {version}"
    return results


def restore_in_one_process(
    path: str, version: int, storage_options: dict[str, Any] | None = None
) -> None:
    """Restore ``path`` into plain Variables of the global shapes; bit-exact, all consumed."""
    ckpt, variables = W.build("plain", 0, 1, version=None)
    ckpt.restore(path, storage_options=storage_options).assert_consumed()
    for name, variable in variables.items():
        assert variable.shape == W.VALUES[name][0]
        assert np.array_equal(bits(variable.numpy()), bits(W.global_value(name, version))), name


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "zarrckpt-tmp" in p.name)


def files_of(checkpoint: Path) -> dict[str, int]:
    """Every file of a local checkpoint: relative key -> size."""
    return {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in checkpoint.rglob("*")
        if p.is_file()
    }


# Scenario 1: mixed layouts saved by 4 ranks, restored by 1, 2 and 3 --------------------------


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> tuple[Launch, Path]:
    """Four gloo ranks: a mixed-layout save, then the overlap and failing-rank scenarios."""
    base = tmp_path_factory.mktemp("four")
    (base / "overlap").mkdir()
    steps = [
        {"name": "save", "scenario": "save", "layout": "mixed", "path": base / "mixed"},
        {"name": "overlap", "scenario": "overlap", "path": base / "overlap" / "new" / "ckpt"},
        {"name": "failing", "scenario": "failing_rank", "prefix": base / "failing" / "ckpt"},
    ]
    return launch(base / "run", 4, steps), base


def test_four_ranks_save_mixed_layouts_restored_by_one_process(four_ranks):
    run, base = four_ranks
    results = run.step("save")
    assert [r["path"] for r in results] == [str(base / "mixed")] * 4
    assert all(r["nbytes"] > 0 for r in results)  # every rank wrote chunks of its own
    restore_in_one_process(str(base / "mixed"), version=0)
    assert leftovers(base) == []


def read_with_zarr(checkpoint: Path, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Value ``name`` of a local checkpoint as zarr reads it, and its chunk shape."""
    import zarr

    array = zarr.open_array(
        str(checkpoint / "model" / name / ".ATTRIBUTES/VARIABLE_VALUE"), mode="r"
    )
    return array[...], tuple(array.chunks)


def test_four_ranks_checkpoint_reads_alike_with_zarr(four_ranks):
    _, base = four_ranks
    for name in ("small", "ints", "big", "bf16", "table", "grid"):
        stored, _ = read_with_zarr(base / "mixed", name)
        assert np.array_equal(bits(stored), bits(W.global_value(name, 0))), name


def test_four_ranks_checkpoint_restored_by_two_ranks_column_sharded(four_ranks, tmp_path):
    _, base = four_ranks
    steps = [{"name": "cols", "scenario": "restore", "layout": "cols", "path": base / "mixed"}]
    run = launch(tmp_path / "run", 2, steps)
    check_restored(run, "cols", version=0, layout="cols")


@pytest.fixture(scope="module")
def three_ranks(four_ranks, tmp_path_factory) -> tuple[Launch, Path]:
    """Three gloo ranks: restores by rows, a save with replicated values, a manager's saves."""
    _, four = four_ranks
    base = tmp_path_factory.mktemp("three")
    single, _ = W.build("plain", 0, 1, version=3)  # written by one process, no coordinator
    single.write(base / "single", options=zc.CheckpointOptions(chunk_bytes=W.CHUNK_BYTES))
    steps = [
        {"name": "from4", "scenario": "restore", "layout": "rows", "path": four / "mixed"},
        {"name": "from1", "scenario": "restore", "layout": "rows", "path": base / "single"},
        {
            "name": "stats",
            "scenario": "save",
            "layout": "mostly_plain",
            "path": base / "stats",
            "record_writes": True,
        },
        {
            "name": "manager",
            "scenario": "manager",
            "directory": base / "managed",
            "saves": 4,
            "first_version": 1,
        },
    ]
    return launch(base / "run", 3, steps), base


def test_three_ranks_restore_row_sharded_from_four_ranks_and_from_one_process(
    four_ranks, three_ranks
):
    _, four = four_ranks
    run, _ = three_ranks
    check_restored(run, "from1", version=3, layout="rows")
    results = check_restored(run, "from4", version=0, layout="rows")

    # Each rank reads the chunks overlapping its rows only: well under all of them.
    chunks = sum(size for key, size in files_of(four / "mixed").items() if "/c." in key)
    read = [r["nbytes"] for r in results]
    assert sum(read) >= chunks
    assert max(read) < 0.6 * chunks, (read, chunks)


# Scenarios 2 and 3: refused and failed saves ---------------------------------------------------


def test_overlapping_blocks_raise_the_same_error_on_every_rank_and_write_nothing(four_ranks):
    run, base = four_ranks
    results = run.step("overlap")
    assert [r["type"] for r in results] == ["DistributedSaveError"] * 4
    messages = {r["message"] for r in results}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "overlap" in message and "rank 0 [0:250, 0:64]" in message
    assert "rank 1 [245:495, 0:64]" in message and "model/big" in message
    assert sorted(os.listdir(base / "overlap")) == []  # no checkpoint, no temp, no parents


def test_a_failing_rank_fails_the_save_on_every_rank_and_keeps_the_previous(four_ranks):
    run, base = four_ranks
    results = run.step("failing")
    prefix = base / "failing" / "ckpt"
    assert [r["type"] for r in results] == ["DistributedSaveError"] * 4
    for result in results:
        assert "1" in result["failures"], result
        assert "injected failure on rank 1" in result["failures"]["1"]
        assert "injected failure on rank 1" in result["message"]
        assert result["seconds"] < 30
        assert result["good"] == f"{prefix}-1"
        assert result["save_counter"] == 1  # the failed save gave its number back
    assert len({json.dumps(r["failures"], sort_keys=True) for r in results}) == 1
    assert sorted(os.listdir(base / "failing")) == ["ckpt-1"]
    restore_in_one_process(f"{prefix}-1", version=1)


# Scenario 4: a rank killed during a save ----------------------------------------------------


@pytest.mark.parametrize("victim", [2, 0], ids=["rank2", "rank0"])
def test_a_killed_rank_makes_the_survivors_raise_within_the_timeout(tmp_path, victim):
    """Rank 2 dies: rank 0 removes the attempt. Rank 0 dies: its attempt is gc's to remove."""
    directory = tmp_path / "ckpts"
    timeout = 5.0
    steps = [
        {
            "name": "killed",
            "scenario": "killed_rank",
            "prefix": directory / "ckpt",
            "victim": victim,
        }
    ]
    codes = [0, 0, 0]
    codes[victim] = -signal.SIGKILL
    run = launch(
        tmp_path / "run", 3, steps, timeout=timeout, broken_group=True, expected_codes=codes
    )
    good = str(directory / "ckpt-1")
    assert run.results[victim]["killed"] == {"good": good}  # it died in the second save
    survivors = [r for r in range(3) if r != victim]
    for result in run.step("killed", ranks=survivors):
        assert result["type"] in ("DistributedSaveError", "DistributedError"), result
        assert result["seconds"] < timeout + 10, result
        assert result["good"] == good
        assert "unusable since an earlier collective" in result["after"], result
        assert result["after_seconds"] < 1, result
    assert not (directory / "ckpt-2").exists()
    restore_in_one_process(good, version=1)

    left = leftovers(directory)
    if victim == 0:  # nobody was left to remove its attempt
        assert len(left) == 1 and left[0].startswith(".ckpt-2.zarrckpt-tmp-"), left
    else:
        assert left == []
    removed = zc.gc(directory, older_than=0)
    assert sorted(os.path.basename(p) for p in removed) == left
    assert sorted(os.listdir(directory)) == ["ckpt-1"]
    restore_in_one_process(good, version=1)


# Scenario 5: replicated values are written once --------------------------------------------


def test_replicated_values_are_written_by_one_rank_and_stats_add_up(three_ranks):
    run, base = three_ranks
    path = base / "stats"
    results = run.step("stats")
    restore_in_one_process(str(path), version=0)
    files = files_of(path)

    # What the ranks wrote: every file once, by one rank; the stats are those bytes.
    written = [set(r["written"]) for r in results]
    assert all(len(r["written"]) == len(w) for r, w in zip(results, written, strict=True))
    for a in range(3):
        for b in range(a + 1, 3):
            assert not written[a] & written[b], (a, b, written[a] & written[b])
    assert set().union(*written) == set(files)
    assert set(FINALIZE_FILES) <= written[0]
    for rank, (result, keys) in enumerate(zip(results, written, strict=True)):
        own = sum(files[k] for k in keys if k not in FINALIZE_FILES)
        assert result["nbytes"] == own, rank
    total = sum(size for key, size in files.items() if key not in FINALIZE_FILES)
    assert sum(r["nbytes"] for r in results) == total

    # Each replicated value: all its chunks by one rank; the values spread over ranks.
    writers = {}
    for name in ("big", "ints", "small", "table"):
        prefix = f"model/{name}/.ATTRIBUTES/VARIABLE_VALUE/c."
        chunks = [k for k in files if k.startswith(prefix)]
        assert chunks, name
        by = {rank for rank, keys in enumerate(written) for k in chunks if k in keys}
        for chunk in chunks:
            assert sum(chunk in keys for keys in written) == 1, chunk
        assert len(by) == 1, (name, by)
        writers[name] = by.pop()
    assert len(set(writers.values())) > 1, writers


# Scenario 6: CheckpointManager on 3 ranks ---------------------------------------------------


def test_manager_on_three_ranks_keeps_two_and_resumes(three_ranks, tmp_path):
    run, base = three_ranks
    directory = base / "managed"
    ckpt = [str(directory / f"ckpt-{n}") for n in range(1, 6)]
    results = run.step("manager")
    views = [
        {"checkpoints": ckpt[:1], "latest": ckpt[0]},
        {"checkpoints": ckpt[:2], "latest": ckpt[1]},
        {"checkpoints": ckpt[1:3], "latest": ckpt[2]},
        {"checkpoints": ckpt[2:4], "latest": ckpt[3]},
    ]
    for result in results:
        assert result["found"] == [] and result["restored"] is None
        assert result["paths"] == ckpt[:4]
        assert result["views"] == views
    numbered = sorted(n for n in os.listdir(directory) if n.startswith("ckpt"))
    assert numbered == ["ckpt-3", "ckpt-4"]
    assert leftovers(directory) == []
    restore_in_one_process(ckpt[3], version=4)

    steps = [
        {"name": "m", "scenario": "manager", "directory": directory, "saves": 1, "first_version": 5}
    ]
    run = launch(tmp_path / "run", 3, steps)
    results = run.step("m")
    for rank, result in enumerate(results):
        assert result["found"] == ckpt[2:4]
        assert result["restored"] == ckpt[3]
        assert result["save_counter"] == 4
        for name in W.VALUES:
            got = run.block("m", rank, name)
            assert np.array_equal(got, expected_block(name, 4, "mixed", rank, 3)), (rank, name)
        assert result["paths"] == [ckpt[4]]
        assert result["views"] == [{"checkpoints": ckpt[3:5], "latest": ckpt[4]}]
    numbered = sorted(n for n in os.listdir(directory) if n.startswith("ckpt"))
    assert numbered == ["ckpt-4", "ckpt-5"]
    restore_in_one_process(ckpt[4], version=5)


# Scenario 7: S3 ------------------------------------------------------------------------------


def test_s3_two_ranks_save_three_ranks_restore(tmp_path, s3_url, s3_storage_options):
    path = f"{s3_url}/run/ckpt"
    steps = [{"name": "save", "scenario": "save", "layout": "mixed", "path": path, "version": 6}]
    run = launch(tmp_path / "save", 2, steps, storage_options=s3_storage_options)
    assert [r["path"] for r in run.step("save")] == [path] * 2
    steps = [{"name": "rows", "scenario": "restore", "layout": "rows", "path": path}]
    run = launch(tmp_path / "restore", 3, steps, storage_options=s3_storage_options)
    check_restored(run, "rows", version=6, layout="rows")
    restore_in_one_process(path, version=6, storage_options=s3_storage_options)

    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **s3_storage_options)
    fs.invalidate_cache()
    top = sorted(p.rsplit("/", 1)[1] for p in fs.ls(root))
    assert len(top) == 2 and top[0] == "_COMMIT" and top[1].startswith("attempt-"), top


# Scenario 8: MPI -----------------------------------------------------------------------------


def test_mpi_save_on_three_ranks_restore_on_two_and_a_failing_rank(tmp_path):
    base = tmp_path / "ckpts"
    steps = [
        {
            "name": "save",
            "scenario": "save",
            "layout": "mixed",
            "path": base / "mixed",
            "version": 7,
        },
        {"name": "failing", "scenario": "failing_rank", "prefix": base / "failing" / "ckpt"},
        {
            "name": "async",
            "scenario": "save",
            "layout": "mixed",
            "path": base / "async",
            "version": 8,
            "async": True,
        },
    ]
    run = launch(tmp_path / "save", 3, steps, backend="mpi")
    # An async save: collectives on each rank's background thread, values of the call.
    assert [r["path"] for r in run.step("async")] == [str(base / "async")] * 3
    restore_in_one_process(str(base / "async"), version=8)
    assert [r["path"] for r in run.step("save")] == [str(base / "mixed")] * 3
    results = run.step("failing")
    assert [r["type"] for r in results] == ["DistributedSaveError"] * 3
    for result in results:
        assert "1" in result["failures"], result
        assert "injected failure on rank 1" in result["failures"]["1"]
        assert result["seconds"] < 30
    assert sorted(os.listdir(base / "failing")) == ["ckpt-1"]
    restore_in_one_process(str(base / "failing" / "ckpt-1"), version=1)

    steps = [{"name": "cols", "scenario": "restore", "layout": "cols", "path": base / "mixed"}]
    run = launch(tmp_path / "restore", 2, steps, backend="mpi")
    check_restored(run, "cols", version=7, layout="cols")


# Imports ------------------------------------------------------------------------------------


def test_import_zarrckpt_imports_neither_torch_nor_mpi4py():
    code = (
        "import json, sys, zarrckpt, zarrckpt.distributed\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'mpi4py'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(done.stdout) == []


LATE_RANK = """
import json, sys, time
from zarrckpt.distributed import MPICoordinator
from zarrckpt.errors import DistributedError

c = MPICoordinator(timeout=1.0)
if c.rank == 2:
    time.sleep(2.5)  # arrives after the others gave up
out = {}
for step in ("first", "second"):
    start = time.monotonic()
    try:
        out[step] = repr(c.all_gather_object(c.rank))
    except DistributedError as exc:
        out[step] = str(exc)
    out[step + "_seconds"] = time.monotonic() - start
with open(f"{sys.argv[1]}/rank{c.rank}.json", "w") as f:
    json.dump(out, f)
"""


def test_mpi_ranks_that_time_out_raise_and_a_late_rank_never_hangs(tmp_path):
    script = tmp_path / "late.py"
    script.write_text(LATE_RANK)
    start = time.monotonic()
    done = subprocess.run(
        [_mpiexec(), "-n", "3", sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 30
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert "rank 2 did not arrive within 1 s" in results[0]["first"]
    assert "rank 0 did not arrive within 1 s" in results[1]["first"]
    assert "rank 0 did not arrive within 1 s" in results[2]["first"]  # late: rank 0 gave up
    for result in results:
        assert result["first_seconds"] < 5
        assert "unusable since all_gather_object timed out" in result["second"]
        assert result["second_seconds"] < 0.5
