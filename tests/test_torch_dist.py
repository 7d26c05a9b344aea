"""The PyTorch adapter (zarrckpt.torch) across real gloo process groups: DTensors and FSDP2.

Each rank is a process running tests/torch_worker.py, which defines the
values, models and training data, and the scenarios. Ranks write their
results to JSON files and tensors to .npz files (integer views of their
bits); the assertions are made here, bit for bit. Every launch has a hard
timeout: a hang fails the test, it never blocks.

Launches are few (every process imports torch): two ranks save (DTensors on a
1-D mesh, refused placements, FSDP2 training, a manager's first run and a
reference run), four ranks save on a (2, 2) mesh, three ranks restore, one
plain process (no torch.distributed) restores, and two fresh ranks resume the
manager's run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
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

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")
zarr = pytest.importorskip("zarr")

WORKER = Path(__file__).with_name("torch_worker.py")
_spec = importlib.util.spec_from_file_location("torch_worker", WORKER)
assert _spec is not None and _spec.loader is not None
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

TIMEOUT = 30.0  # seconds: the process group's and the coordinator's
LAUNCH_TIMEOUT = 90.0  # seconds: the hard limit of one launch, then every rank is killed
FINALIZE_FILES = ("_COMMIT", "object_graph.msgpack", "zarr.json")  # rank 0's, at commit
VALUE = ".ATTRIBUTES/VARIABLE_VALUE"


# Launching ranks ---------------------------------------------------------------------------


@dataclass
class Launch:
    out: Path
    world: int
    returncodes: list[int]
    results: list[dict[str, Any]]
    seconds: float

    def logs(self) -> str:
        parts = []
        for log in sorted(self.out.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def step(self, name: str) -> list[dict[str, Any]]:
        """Every rank's result of step ``name``."""
        found = []
        for rank in range(self.world):
            result = self.results[rank].get(name)
            if result is None:
                pytest.fail(f"rank {rank} has no result for step {name!r}\n{self.logs()}")
            if "unexpected" in result:
                pytest.fail(f"rank {rank}, step {name!r} failed:\n{result['unexpected']}")
            found.append(result)
        return found

    def tensors(self, name: str, rank: int) -> dict[str, np.ndarray]:
        with np.load(self.out / f"{name}.rank{rank}.npz") as data:
            return {k: data[k] for k in data.files}


def launch(out: Path, world: int, steps: list[dict[str, Any]], distributed: bool = True) -> Launch:
    """Run ``steps`` on ``world`` ranks (gloo), or in one plain process; fail on a hang or error."""
    assert distributed or world == 1
    out.mkdir(parents=True)
    config = {
        "distributed": distributed,
        "timeout": TIMEOUT,
        "out": str(out),
        "steps": [{k: str(v) if isinstance(v, Path) else v for k, v in s.items()} for s in steps],
    }
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for _attempt in range(3):  # a port taken between free_port() and the bind: try another
        for stale in [*out.glob("*.log"), *out.glob("rank*.json")]:
            stale.unlink()
        started = time.monotonic()
        env["TORCH_WORKER_EPOCH"] = repr(time.time())
        port = str(free_port())
        procs = []
        for rank in range(world):
            rank_env = dict(env)
            if distributed:
                rank_env.update(
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=port,
                    RANK=str(rank),
                    LOCAL_RANK=str(rank),
                    WORLD_SIZE=str(world),
                )
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
        codes = wait_all(procs, LAUNCH_TIMEOUT)
        seconds = time.monotonic() - started
        results = []
        for rank in range(world):
            path = out / f"rank{rank}.json"
            results.append(json.loads(path.read_text()) if path.exists() else {})
        run = Launch(out, world, codes or [], results, seconds)
        if codes is None:
            pytest.fail(f"the ranks were still running after {LAUNCH_TIMEOUT} s\n{run.logs()}")
        if "ddress already in use" in run.logs() and not any(results):
            continue
        break
    for rank, code in enumerate(codes):
        # A failed step ends its rank with status 1: the test of that step reports it.
        recorded = len(results[rank]) == len(steps)
        failed = any("unexpected" in r for r in results[rank].values())
        if not (code == 0 or (code == 1 and recorded and failed)):
            pytest.fail(f"rank {rank} ended with status {code}\n{run.logs()}")
    return run


# Helpers of the checks ------------------------------------------------------------------------


def expected(name: str, values: dict[str, tuple], seed: int) -> np.ndarray:
    shape, dtype = values[name][:2]
    return W.bits(W.global_value(name, shape, dtype, seed))


def region(where: dict[str, Any]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(where["offset"], where["shape"], strict=True))


def files_of(checkpoint: Path) -> dict[str, int]:
    """Every file of a local checkpoint: relative key -> size."""
    return {
        str(p.relative_to(checkpoint)): p.stat().st_size
        for p in checkpoint.rglob("*")
        if p.is_file()
    }


def chunks_of(checkpoint: Path, key: str) -> list[tuple[tuple[tuple[int, int], ...], int]]:
    """Each chunk file of value ``key``: its box ((start, stop) per axis) and its size."""
    array = zarr.open_array(str(checkpoint / key), mode="r")
    found = []
    for path in (checkpoint / key).glob("c.*"):  # c.<i>.<j>, beside the value's zarr.json
        if path.is_file():
            coords = [int(part) for part in path.name.split(".")[1:]]
            box = tuple(
                (c * n, min(size, (c + 1) * n))
                for c, n, size in zip(coords, array.chunks, array.shape, strict=True)
            )
            found.append((box, path.stat().st_size))
    return found


def overlaps(box: tuple[tuple[int, int], ...], where: dict[str, Any]) -> bool:
    return all(
        a < o + n and o < b
        for (a, b), o, n in zip(box, where["offset"], where["shape"], strict=True)
    )


def bytes_to_read(checkpoint: Path, prefix: str, blocks: dict[str, dict[str, Any] | None]) -> int:
    """The chunk bytes a rank holding ``blocks`` (None: the whole value) must read, no more."""
    total = 0
    for name, where in blocks.items():
        for box, size in chunks_of(checkpoint, f"{prefix}/{name}/{VALUE}"):
            if where is None or where["replicated"] or overlaps(box, where):
                total += size
    return total


# The launches -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("torch_dist")


@pytest.fixture(scope="module")
def two(base) -> Launch:
    """Two ranks: DTensor save, refused placements, FSDP2 training, a manager's first run."""
    steps = [
        {"name": "dsave", "scenario": "dtensor_save", "path": base / "dtensor"},
        {"name": "refused", "scenario": "refused", "directory": base / "refused"},
        {"name": "fsdp", "scenario": "fsdp_train", "path": base / "fsdp"},
        {"name": "managed", "scenario": "managed", "directory": base / "managed", "stop": 6},
        {"name": "reference", "scenario": "managed", "stop": 10},  # no manager: 0..9 at once
        {
            "name": "managed_async",
            "scenario": "managed",
            "directory": base / "managed-async",
            "stop": 6,
            "async": True,
        },
    ]
    return launch(base / "two", 2, steps)


@pytest.fixture(scope="module")
def four(base) -> Launch:
    """Four ranks on a (2, 2) mesh."""
    steps = [{"name": "msave", "scenario": "mesh2d_save", "path": base / "mesh2d"}]
    return launch(base / "four", 4, steps)


@pytest.fixture(scope="module")
def three(base, two) -> Launch:
    """Three ranks restore what two saved: DTensors by columns and by rows, FSDP2."""
    steps = [
        {"name": "cols", "scenario": "dtensor_restore", "layout": "cols", "path": base / "dtensor"},
        {"name": "rows", "scenario": "dtensor_restore", "layout": "rows", "path": base / "dtensor"},
        {
            "name": "fsdp3",
            "scenario": "fsdp_restore",
            "path": base / "fsdp",
            "save": base / "fsdp-by-3",
        },
    ]
    return launch(base / "three", 3, steps)


@pytest.fixture(scope="module")
def plain(base, two, request) -> Launch:
    """One process, torch.distributed never initialized: ordinary modules of the global shapes."""
    steps = [
        {"name": "dplain", "scenario": "dtensor_restore", "path": base / "dtensor"},
        {"name": "fsdp1", "scenario": "fsdp_restore", "path": base / "fsdp"},
    ]
    later = {
        "four": {"name": "mplain", "scenario": "mesh2d_restore", "path": base / "mesh2d"},
        "three": {"name": "fsdp3to1", "scenario": "fsdp_load", "path": base / "fsdp-by-3"},
    }
    for fixture, step in later.items():
        try:
            request.getfixturevalue(fixture)
        except pytest.fail.Exception:
            pass  # that launch's tests report it; the other restores go on
        else:
            steps.append(step)
    return launch(base / "plain", 1, steps, distributed=False)


# Scenario 1: DTensor Shard(0) on 2 ranks, restored by 3 ranks and by one process -------------


def test_dtensors_saved_by_two_ranks_have_several_chunks_and_read_alike_with_zarr(two, base):
    results = two.step("dsave")
    for rank, result in enumerate(results):
        for name, (shape, _, _, saved) in W.DVALUES.items():
            where = result["where"][name]
            if saved == "replicate":
                assert where == {"offset": [0, 0], "shape": list(shape), "replicated": True}
            else:  # Shard(0): torch.chunk's rows
                start, stop = W.chunk_range(shape[0], 2, rank)
                assert where["offset"] == [start, 0] and where["shape"] == [stop - start, shape[1]]
    for name, (shape, _, _, saved) in W.DVALUES.items():
        key = f"model/{name}/{VALUE}"
        stored = zarr.open_array(str(base / "dtensor" / key), mode="r")
        assert tuple(stored.shape) == shape
        want = expected(name, W.DVALUES, 1)
        assert np.array_equal(stored[...].view(want.dtype), want), name
        if saved == "shard":  # several chunks: the restores' reads below mean something
            assert len(chunks_of(base / "dtensor", key)) >= 2, name
    assert sum(r["nbytes"] for r in results) == sum(
        size for key, size in files_of(base / "dtensor").items() if key not in FINALIZE_FILES
    )


def check_dtensor_restore(
    run: Launch, step: str, layout: str, base: Path
) -> list[dict[str, dict[str, tuple[int, int, int]]]]:
    """Bit-exact blocks where torch puts them, restored in place, and exactly the chunk files
    overlapping them read. Per rank and value: (bytes of its block, bytes it had to read,
    bytes of the whole value)."""
    checkpoint = base / "dtensor"
    accounts = []
    for rank, result in enumerate(run.step(step)):
        got = run.tensors(step, rank)
        account = {}
        for name, (shape, dtype, _, saved) in W.DVALUES.items():
            where = result["where"][name]
            assert result["types"][name] == "DTensor"
            if saved == "replicate":
                assert where["replicated"] and where["shape"] == list(shape)
            else:
                axis = 1 if layout == "cols" else 0
                start, stop = W.chunk_range(shape[axis], 3, rank)
                assert where["offset"][axis] == start and where["shape"][axis] == stop - start
                other = 1 - axis
                assert where["offset"][other] == 0 and where["shape"][other] == shape[other]
            want = expected(name, W.DVALUES, 1)[region(where)]
            assert got[name].shape == want.shape and np.array_equal(got[name], want), (rank, name)
            assert result["same_memory"][name], (rank, name)  # read into the live local tensor

            chunks = chunks_of(checkpoint, f"model/{name}/{VALUE}")
            whole = sum(size for _, size in chunks)
            itemsize = torch.empty((), dtype=dtype).element_size()
            block = int(np.prod(where["shape"])) * itemsize
            if where["replicated"]:
                account[name] = (block, whole, whole)
            else:
                need = sum(size for box, size in chunks if overlaps(box, where))
                assert block <= need <= whole, (rank, name, block, need, whole)
                account[name] = (block, need, whole)
        # It read exactly the chunk files overlapping its blocks (all of a replicated value).
        assert result["nbytes"] == sum(need for _, need, _ in account.values()), (rank, account)
        accounts.append(account)
    return accounts


def all_chunk_bytes(checkpoint: Path) -> int:
    """Bytes of every chunk file (``<key>/c.<i>.<j>``) of a local checkpoint."""
    return sum(size for key, size in files_of(checkpoint).items() if re.search(r"/c(\.\d+)+$", key))


def test_three_ranks_restore_shard0_checkpoint_into_shard1_dtensors(two, three, base):
    check_dtensor_restore(three, "cols", "cols", base)
    assert three.step("cols")[2]["where"]["u"]["shape"] == [9, 1]  # 5 columns: 2, 2, 1
    # (Chunks of a value saved by rows hold whole rows, unless a row is over the chunk size:
    # a column block overlaps most of them; the exact accounting above still holds.)


def test_three_ranks_restore_by_rows_read_only_the_chunks_overlapping_their_blocks(
    two, three, base
):
    for rank, account in enumerate(check_dtensor_restore(three, "rows", "rows", base)):
        for name, (block, need, whole) in account.items():
            if W.DVALUES[name][3] == "shard":  # each a fraction of the value
                assert block <= need < whole, (rank, name, block, need, whole)


def test_one_plain_process_restores_the_dtensor_checkpoint_into_an_ordinary_module(
    two, plain, base
):
    (result,) = plain.step("dplain")
    assert result["nbytes"] == all_chunk_bytes(base / "dtensor")
    got = plain.tensors("dplain", 0)
    for name in W.DVALUES:
        assert result["types"][name] in ("Parameter", "Tensor")
        assert np.array_equal(got[name], expected(name, W.DVALUES, 1)), name
        assert result["same_memory"][name], name


# Scenario 2: a (2, 2) mesh, [Shard(0), Replicate()] -----------------------------------------


def test_two_dimensional_mesh_writes_every_element_once_and_one_process_restores_it(
    four, plain, base
):
    results = four.step("msave")
    checkpoint = base / "mesh2d"
    files = files_of(checkpoint)
    assert [r["coordinate"] for r in results] == [[0, 0], [0, 1], [1, 0], [1, 1]]

    # Every file once, by one rank; the stats are those bytes; nothing else was written.
    written = [set(r["written"]) for r in results]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not written[a] & written[b], (a, b, written[a] & written[b])
    assert set().union(*written) == set(files)
    total = sum(size for key, size in files.items() if key not in FINALIZE_FILES)
    assert sum(r["nbytes"] for r in results) == total
    for rank, (result, keys) in enumerate(zip(results, written, strict=True)):
        assert result["nbytes"] == sum(files[k] for k in keys if k not in FINALIZE_FILES), rank

    for name, (_, _, placements) in W.MVALUES.items():
        key = f"model/{name}/{VALUE}"
        want = expected(name, W.MVALUES, 2)
        stored = zarr.open_array(str(checkpoint / key), mode="r")[...]
        assert np.array_equal(stored.view(want.dtype), want), name
        chunk_files = {k for k in files if k.startswith(f"{key}/c.")}
        writers = {r for r, keys in enumerate(written) if chunk_files & keys}
        if placements == ("S0", "R"):  # the replicas (mesh column 1: ranks 1 and 3) wrote nothing
            assert writers == {0, 2}, (name, writers)
            assert len(chunk_files) >= 2, name
        elif placements == ("R", "S0"):  # replicas over mesh row 1: ranks 2 and 3
            assert writers == {0, 1}, (name, writers)
        elif placements == ("S0", "S1"):
            assert writers == {0, 1, 2, 3}, (name, writers)
        else:  # fully replicated: a plain value, written by one rank
            assert len(writers) == 1, (name, writers)

    plain.step("mplain")
    got = plain.tensors("mplain", 0)
    for name in W.MVALUES:
        assert np.array_equal(got[name], expected(name, W.MVALUES, 2)), name


# Scenario 3: _StridedShard and Partial are refused on every rank ------------------------------


@pytest.mark.parametrize("case", ["strided", "partial"])
def test_unsupported_placements_fail_the_save_on_every_rank_and_leave_nothing(two, base, case):
    results = [r[case] for r in two.step("refused")]
    placement = {"strided": "_StridedShard", "partial": "Partial"}[case]
    for rank, result in enumerate(results):
        assert result["type"] == "DistributedSaveError", result
        assert f"{case}_weight" in result["message"] and placement in result["message"], result
        assert set(result["failures"]) == {"0", "1"}, result
        assert all(f"{case}_weight" in f for f in result["failures"].values()), result
        assert result["cause"] == "UnsupportedValueError", (rank, result)
        assert f"{case}_weight" in result["cause_message"], result
        assert result["restore_type"] == "UnsupportedValueError", result
        assert f"{case}_weight: DTensor placement" in result["restore_message"], result
        assert result["restore_unchanged"] is True
    assert len({r["message"] for r in results}) == 1
    directory = base / "refused" / case / "ckpt"  # no checkpoint, no attempt, no directory
    assert not directory.exists() or list(directory.rglob("*")) == [], list(directory.rglob("*"))
    leftovers = [p.name for p in (base / "refused" / case).iterdir()]
    assert sorted(leftovers) == ["plain-0", "plain-1"]  # the restore tests' own checkpoints


# Scenario 4: FSDP2 training saved by 2 ranks, continued by 2, 1 and 3 ------------------------


def test_fsdp2_checkpoint_continues_bit_identically_in_one_process_and_on_three_ranks(
    two, three, plain
):
    saved = two.step("fsdp")
    assert [r["local_shapes"]["0.bias"] for r in saved] == [[17], [16]]  # uneven shards
    assert [r["local_shapes"]["3.weight"] for r in saved] == [[4, 33], [3, 33]]
    assert saved[0]["losses"] == saved[1]["losses"] and saved[0]["after"] == saved[1]["after"]
    at_save = two.tensors("fsdp.saved", 0)
    final = two.tensors("fsdp.final", 0)
    for rank in range(2):  # every rank gathered the same full state
        for name, want in (("fsdp.saved", at_save), ("fsdp.final", final)):
            got = two.tensors(name, rank)
            assert got.keys() == want.keys()
            assert all(np.array_equal(got[k], want[k]) for k in want), (rank, name)
    assert any(k.endswith("exp_avg_sq") for k in at_save)
    assert "model/1.running_mean" in at_save and "model/1.num_batches_tracked" in at_save
    assert not np.array_equal(at_save["model/0.weight"], final["model/0.weight"])

    for run, step in ((plain, "fsdp1"), (three, "fsdp3")):
        for rank, result in enumerate(run.step(step)):
            assert result["same_memory"], (step, rank)  # parameters restored in place
            assert result["hyper"] == saved[0]["hyper"], (step, rank)  # lr 0.5 -> 0.01
            restored = run.tensors(f"{step}.restored", rank)
            assert restored.keys() == at_save.keys(), (step, rank)
            for key, want in at_save.items():
                assert np.array_equal(restored[key], want), (step, rank, key)
            assert result["after"] == saved[0]["after"], (step, rank)  # the losses, bit for bit
            got = run.tensors(f"{step}.final", rank)
            assert got.keys() == final.keys()
            for key, want in final.items():
                assert np.array_equal(got[key], want), (step, rank, key)


def test_fsdp2_checkpoint_saved_by_three_ranks_with_an_empty_shard_restores_in_one_process(
    two, three, plain
):
    """The 3 ranks above saved their final state: rank 2 holds none of the last weight."""
    shapes = [r["local_shapes"] for r in three.step("fsdp3")]
    assert [s["5.weight"] for s in shapes] == [[1, 7], [1, 7], [0, 7]]
    assert [s["0.bias"] for s in shapes] == [[11], [11], [11]]
    assert [s["3.bias"] for s in shapes] == [[3], [3], [1]]
    final = two.tensors("fsdp.final", 0)
    (result,) = plain.step("fsdp3to1")
    assert result["hyper"] == two.step("fsdp")[0]["hyper"]
    got = plain.tensors("fsdp3to1", 0)
    assert got.keys() == final.keys()
    for key, want in final.items():
        assert np.array_equal(got[key], want), key


# Scenario 5: a CheckpointManager on 2 ranks resumes training ----------------------------------


def test_manager_on_two_ranks_resumes_training_bit_identically(two, base):
    directory = base / "managed"
    ckpt = [str(directory / f"ckpt-{n}") for n in range(1, 6)]
    first = two.step("managed")
    for result in first:
        assert result["found"] == [] and result["restored"] is None and result["start"] == 0
        assert [s["path"] for s in result["saves"]] == ckpt[:3]
        assert result["saves"][-1]["checkpoints"] == ckpt[1:3]
        assert result["checkpoints"] == ckpt[1:3]
    assert sorted(n for n in os.listdir(directory) if n.startswith("ckpt")) == ["ckpt-2", "ckpt-3"]
    reference = two.step("reference")
    assert reference[0]["losses"] == reference[1]["losses"]
    assert first[0]["losses"] == {k: v for k, v in reference[0]["losses"].items() if int(k) < 6}

    steps = [{"name": "resumed", "scenario": "managed", "directory": directory, "stop": 10}]
    run = launch(base / "resume", 2, steps)
    want = two.tensors("reference", 0)
    for rank, result in enumerate(run.step("resumed")):
        assert result["found"] == ckpt[1:3], rank
        assert result["restored"] == ckpt[2] and result["start"] == 6, rank
        assert [s["path"] for s in result["saves"]] == ckpt[3:5]
        assert result["checkpoints"] == ckpt[3:5], rank  # 2 entries on every rank
        assert result["step"] == 10
        assert result["losses"] == {k: v for k, v in reference[0]["losses"].items() if int(k) >= 6}
        got = run.tensors("resumed", rank)
        assert got.keys() == want.keys()
        for key in want:
            assert np.array_equal(got[key], want[key]), (rank, key)
    assert sorted(n for n in os.listdir(directory) if n.startswith("ckpt")) == ["ckpt-4", "ckpt-5"]


def test_async_manager_on_two_ranks_saves_the_state_of_the_call(two, base):
    """Each rank stages its FSDP2 shards; a training step right after save() changes them all."""
    directory = base / "managed-async"
    ckpt = [str(directory / f"ckpt-{n}") for n in range(1, 4)]
    reference = two.step("reference")[0]["losses"]
    for result in two.step("managed_async"):
        assert [s["path"] for s in result["saves"]] == ckpt
        # Listed once committed: right after save() the one in flight may not be.
        for n, save in enumerate(result["saves"]):
            assert set(save["checkpoints"]) <= set(ckpt[: n + 1])
        assert result["checkpoints"] == ckpt[1:3]
        assert result["losses"] == {k: v for k, v in reference.items() if int(k) < 6}
        assert result["after_save"] == reference["6"]
    assert sorted(n for n in os.listdir(directory) if n.startswith("ckpt")) == ["ckpt-2", "ckpt-3"]
    saved = two.tensors("managed_async", 0)
    assert saved.keys() == two.tensors("managed", 0).keys()
    keys = {key for key, _, _ in zc.list_variables(ckpt[2])}
    for name, want in saved.items():
        kind, _, rest = name.partition("/")
        key = f"model/{rest}/{VALUE}" if kind == "model" else f"optim/state/{rest}/{VALUE}"
        assert key in keys, key
        stored = np.array(zc.load_variable(ckpt[2], key))
        if stored.dtype == np.bool_:
            stored = stored.astype(np.uint8)
        assert np.array_equal(stored.view(want.dtype), want), key
