"""One rank of tests/test_torch_dist.py: zarrckpt.torch (DTensors, FSDP2) in real process groups.

Usage::

    python tests/torch_worker.py CONFIG.json   # distributed: env RANK, WORLD_SIZE,
                                               # MASTER_ADDR, MASTER_PORT (gloo)
    python tests/torch_worker.py CONFIG.json   # "distributed": false: one plain
                                               # process, torch.distributed never set up

CONFIG holds ``distributed`` (bool), ``timeout`` (seconds: the process group's
and the coordinator's), ``out`` (a directory) and ``steps``: a list of
``{"name", "scenario", ...arguments}`` run in order by every rank. After each
step the rank rewrites ``out/rank<r>.json`` (``{step name: result}``); tensors
go to ``out/<step>.rank<r>.npz`` as integer views of their bits (``bits``), so
the parent compares them bit for bit. An unexpected error in a step is
recorded as ``{"unexpected": traceback}``; the later steps still run, and the
rank ends with exit status 1.

The values, models and data are defined here and imported by the parent, so
both sides agree on every byte. Importing this module imports torch but never
initializes torch.distributed.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import zarrckpt as zc
import zarrckpt.torch as zt

CHUNK_BYTES = 64  # tiny: every sharded value below is stored in several chunks

# Scenario 1 (a 1-D mesh): name -> (global shape, dtype, kind, placement when saved by 2 ranks).
# Restored by 3 ranks with every non-replicated value Shard(1) ("cols") or Shard(0) ("rows").
DVALUES: dict[str, tuple[tuple[int, ...], torch.dtype, str, str]] = {
    "w": ((10, 6), torch.float32, "param", "shard"),  # 3 ranks by rows: 4, 4, 2
    "u": ((9, 5), torch.float32, "param", "shard"),  # 2 ranks: 5, 4 rows; 3 ranks: 2, 2, 1 cols
    "h": ((16, 12), torch.bfloat16, "param", "shard"),
    "counts": ((7, 3), torch.int64, "buffer", "shard"),  # 2 ranks: 4, 3 rows
    "r": ((4, 5), torch.float32, "param", "replicate"),  # a plain value, written once
}

# Scenario 2 (a (2, 2) mesh on 4 ranks): name -> (global shape, dtype, placements).
MVALUES: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[str, str]]] = {
    "a": ((10, 6), torch.float32, ("S0", "R")),
    "b": ((16, 8), torch.bfloat16, ("S0", "R")),
    "c": ((9, 4), torch.int64, ("R", "S0")),  # replicated over the first mesh dim
    "d": ((8, 6), torch.float32, ("S0", "S1")),  # every rank a block of its own
    "e": ((3, 5), torch.float32, ("R", "R")),  # fully replicated
}

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as an integer array of the same shape: equality is bit for bit."""
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    return tensor.view(_BITS[tensor.element_size()]).numpy().copy()


def global_value(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A deterministic tensor of random bit patterns (NaN payloads and infinities too)."""
    size = torch.empty((), dtype=dtype).element_size()
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    raw = rng.integers(0, 256, size=math.prod(shape) * size, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).reshape(shape).clone()


def filled(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """0x5A in every byte: what a restore must overwrite."""
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.full((math.prod(shape) * size,), 0x5A, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """torch.chunk's split (what Shard uses): ceil(size / parts) each, the last ones fewer."""
    step = -(-size // parts)
    return min(size, index * step), min(size, (index + 1) * step)


# Models ------------------------------------------------------------------------------


class Holder(torch.nn.Module):
    """Parameters and buffers given by name (ordinary tensors or DTensors)."""

    def __init__(self, tensors: dict[str, tuple[torch.Tensor, str]]) -> None:
        super().__init__()
        for name, (tensor, kind) in tensors.items():
            if kind == "buffer":
                self.register_buffer(name, tensor)
            else:
                self.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))

    def tensor(self, name: str) -> torch.Tensor:
        found: torch.Tensor = getattr(self, name)
        return found


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def make_mlp(seed: int) -> torch.nn.Sequential:
    """A small MLP: odd widths (uneven FSDP shards, an empty one on 3 ranks) and a BatchNorm."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 33),  # bias of 33: 17 + 16 on 2 ranks, 11 x 3 on 3
        torch.nn.BatchNorm1d(33),  # buffers running_mean/var, num_batches_tracked
        torch.nn.ReLU(),
        torch.nn.Linear(33, 7),  # 7 rows: 4 + 3 on 2 ranks, 3 + 3 + 1 on 3
        torch.nn.ReLU(),
        torch.nn.Linear(7, 2),  # 2 rows: 1 + 1 + 0 on 3 ranks (an empty shard)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=generator), torch.randn(16, 2, generator=generator)


class Trainer:
    """An MLP (under FSDP2 when distributed) and AdamW; deterministic training steps.

    Every rank runs the same batch. To make the update independent of the
    number of ranks bit for bit, only rank 0's loss carries weight (the others'
    gradients are exact zeros) and FSDP sums gradients without dividing (an
    average over 3 ranks, (g + g + g) / 3, is not always g in floating point).
    So 1, 2 and 3 ranks compute the same steps, and any difference after a
    restore is the checkpoint's.
    """

    def __init__(
        self,
        seed: int,
        rank: int,
        distributed: bool,
        lr: float = 1e-2,
        weight_decay: float = 0.1,
    ) -> None:
        self.rank = rank
        self.model = make_mlp(seed)
        if distributed:
            from torch.distributed.fsdp import fully_shard

            for layer in self.model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(self.model)
            for module in self.model.modules():
                if hasattr(module, "set_gradient_divide_factor"):
                    module.set_force_sum_reduction_for_comms(True)
                    module.set_gradient_divide_factor(1.0)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, weight_decay=weight_decay, foreach=False
        )

    def step(self, step: int) -> str:
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        weight = 1.0 if self.rank == 0 else 0.0
        (loss * weight).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.item()).hex()

    def checkpoint(self, **extra: Any) -> zc.Checkpoint:
        return zc.Checkpoint(
            model=zt.ModuleState(self.model),
            optim=zt.OptimizerState(self.optimizer, self.model),
            **extra,
        )

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of the model and optimizer, whole (a collective when distributed)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        found = {
            f"model/{k}": v for k, v in get_model_state_dict(self.model, options=options).items()
        }
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        for fqn, entries in optim["state"].items():
            for name, value in entries.items():
                found[f"optim/{fqn}/{name}"] = value
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in found.items()}

    def hyperparameters(self) -> list[dict[str, Any]]:
        return [
            {k: float(g[k]) for k in ("lr", "weight_decay", "eps")}
            for g in self.optimizer.param_groups
        ]

    def local_pointers(self) -> dict[str, int]:
        return {n: local_of(p).data_ptr() for n, p in self.model.named_parameters()}


# The rank's side ---------------------------------------------------------------------


class Rank:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.out = Path(config["out"])
        self.distributed = bool(config["distributed"])
        self.timeout = float(config["timeout"])
        self.coordinator: Any = None
        if self.distributed:
            dist.init_process_group(
                "gloo",
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=datetime.timedelta(seconds=self.timeout),
            )
            self.coordinator = zc.distributed.TorchCoordinator(timeout=self.timeout)
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.results: dict[str, Any] = {}
        log(f"rank {self.rank} of {self.world} ready")

    def record(self, step: str, result: Any) -> None:
        self.results[step] = result
        path = self.out / f"rank{self.rank}.json"
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.results, indent=1))
        os.replace(temp, path)

    def dump(self, step: str, tensors: dict[str, torch.Tensor]) -> None:
        np.savez(
            self.out / f"{step}.rank{self.rank}.npz", **{k: bits(v) for k, v in tensors.items()}
        )

    def mesh(self, shape: tuple[int, ...]) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh("cpu", shape)

    # Scenario 1: DTensors on a 1-D mesh -----------------------------------------------

    def dmodel(self, layout: str | None, fill: bool) -> tuple[Holder, dict[str, Any]]:
        """The scenario-1 module: layout "saved" (Shard(0) on 2 ranks), "cols", "rows" or None
        (plain tensors); ``fill``: 0x5A bytes instead of the values. Also where each block lies."""
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = None if layout is None else self.mesh((self.world,))
        tensors: dict[str, tuple[torch.Tensor, str]] = {}
        where: dict[str, Any] = {}
        for name, (shape, dtype, kind, saved) in DVALUES.items():
            value = filled(shape, dtype) if fill else global_value(name, shape, dtype, 1)
            if mesh is None:
                tensors[name] = (value, kind)
                continue
            if saved == "replicate":
                placement: Any = Replicate()
            else:
                placement = Shard(1 if layout == "cols" else 0)
            tensor = distribute_tensor(value, mesh, [placement], src_data_rank=None)
            tensors[name] = (tensor, kind)
            where[name] = block_where(tensor)
        return Holder(tensors), where

    def dtensor_save(self, step: dict[str, Any]) -> dict[str, Any]:
        model, where = self.dmodel("saved", fill=False)
        ckpt = zc.Checkpoint(model=zt.ModuleState(model))
        ckpt.write(
            step["path"],
            coordinator=self.coordinator,
            options=zc.CheckpointOptions(chunk_bytes=CHUNK_BYTES),
        )
        return {"where": where, "nbytes": ckpt.last_write_stats.nbytes}

    def dtensor_restore(self, step: dict[str, Any]) -> dict[str, Any]:
        """Restore into DTensors of layout "cols"/"rows" (or plain tensors when not distributed)."""
        layout = step["layout"] if self.distributed else None
        model, where = self.dmodel(layout, fill=True)
        before = {n: local_of(model.tensor(n)).data_ptr() for n in DVALUES}
        objects = {n: model.tensor(n) for n in DVALUES}
        status = zc.Checkpoint(model=zt.ModuleState(model)).read(
            step["path"], coordinator=self.coordinator
        )
        status.assert_consumed()
        self.dump(step["name"], {n: local_of(model.tensor(n)) for n in DVALUES})
        return {
            "where": where,
            "nbytes": status.io_stats.nbytes,
            "same_memory": {
                n: local_of(model.tensor(n)).data_ptr() == before[n]
                and model.tensor(n) is objects[n]
                for n in DVALUES
            },
            "types": {n: type(model.tensor(n)).__name__ for n in DVALUES},
        }

    # Scenario 2: a 2-D mesh -------------------------------------------------------------

    def mesh2d_save(self, step: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh = self.mesh((2, 2))
        make = {"S0": lambda: Shard(0), "S1": lambda: Shard(1), "R": Replicate}
        tensors = {}
        where = {}
        for name, (shape, dtype, placements) in MVALUES.items():
            value = global_value(name, shape, dtype, 2)
            tensor = distribute_tensor(
                value, mesh, [make[p]() for p in placements], src_data_rank=None
            )
            tensors[name] = (tensor, "param")
            where[name] = block_where(tensor)
        ckpt = zc.Checkpoint(model=zt.ModuleState(Holder(tensors)))
        written: list[str] = []
        with recording_writes(written):
            ckpt.write(
                step["path"],
                coordinator=self.coordinator,
                options=zc.CheckpointOptions(chunk_bytes=CHUNK_BYTES),
            )
        return {
            "where": where,
            "coordinate": list(mesh.get_coordinate()),
            "nbytes": ckpt.last_write_stats.nbytes,
            "written": written,
        }

    def mesh2d_restore(self, step: dict[str, Any]) -> dict[str, Any]:
        """One plain process: an ordinary module of the global shapes."""
        model = Holder(
            {n: (filled(shape, dtype), "param") for n, (shape, dtype, _) in MVALUES.items()}
        )
        status = zc.Checkpoint(model=zt.ModuleState(model)).read(step["path"])
        status.assert_consumed()
        self.dump(step["name"], {n: model.tensor(n) for n in MVALUES})
        return {"nbytes": status.io_stats.nbytes}

    # Scenario 3: placements the adapter refuses -----------------------------------------

    def refused(self, step: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor, Partial
        from torch.distributed.tensor.placement_types import _StridedShard

        mesh = self.mesh((self.world,))
        rows = 8 // self.world
        cases = {
            "strided": DTensor.from_local(
                torch.arange(rows * 4, dtype=torch.float32).reshape(rows, 4) + 100 * self.rank,
                mesh,
                [_StridedShard(0, split_factor=2)],
                shape=torch.Size((8, 4)),
                stride=(4, 1),
            ),
            "partial": DTensor.from_local(
                torch.full((3, 2), float(self.rank + 1)), mesh, [Partial()]
            ),
        }
        results = {}
        for name, tensor in cases.items():
            model = Holder(
                {
                    "fine": (torch.ones(5, 3), "param"),  # a plain parameter saved alongside
                    f"{name}_weight": (tensor, "param"),
                }
            )
            ckpt = zc.Checkpoint(model=zt.ModuleState(model))
            path = Path(step["directory"]) / name / "ckpt"
            try:
                ckpt.write(path, coordinator=self.coordinator)
            except Exception as exc:
                cause = exc.__cause__
                results[name] = {
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "failures": {str(k): v for k, v in getattr(exc, "failures", {}).items()},
                    "cause": None if cause is None else type(cause).__name__,
                    "cause_message": None if cause is None else str(cause),
                }
            else:
                results[name] = {"type": None}
            # Restoring into such a DTensor is refused too, before any byte is read.
            shape = tuple(tensor.shape)
            saved = Holder({f"{name}_weight": (torch.full(shape, 7.0), "param")})
            plain_path = Path(step["directory"]) / name / f"plain-{self.rank}"
            zc.Checkpoint(model=zt.ModuleState(saved)).write(plain_path)
            before = tensor.to_local().clone()
            try:
                zc.Checkpoint(model=zt.ModuleState(model)).read(plain_path).expect_partial()
            except Exception as exc:
                results[name]["restore_type"] = type(exc).__name__
                results[name]["restore_message"] = str(exc)
            results[name]["restore_unchanged"] = bool(torch.equal(tensor.to_local(), before))
            self.coordinator.barrier()  # the parent looks at the directory afterwards
        return results

    # Scenario 4: FSDP2 training, saved by 2 ranks, continued by 1, 2 and 3 -------------

    def fsdp_train(self, step: dict[str, Any]) -> dict[str, Any]:
        trainer = Trainer(seed=0, rank=self.rank, distributed=self.distributed)
        losses = [trainer.step(s) for s in range(3)]
        ckpt = trainer.checkpoint()
        ckpt.write(step["path"], coordinator=self.coordinator)
        self.dump(f"{step['name']}.saved", trainer.full_state())
        after = [trainer.step(s) for s in range(3, 6)]
        self.dump(f"{step['name']}.final", trainer.full_state())
        return {
            "local_shapes": {
                n: list(local_of(p).shape) for n, p in trainer.model.named_parameters()
            },
            "losses": losses,
            "after": after,
            "nbytes": ckpt.last_write_stats.nbytes,
            "hyper": trainer.hyperparameters(),
        }

    def fsdp_restore(self, step: dict[str, Any]) -> dict[str, Any]:
        """A fresh model (another seed) and an optimizer without state (another lr): restore."""
        trainer = Trainer(7, self.rank, self.distributed, lr=0.5, weight_decay=0.0)
        pointers = trainer.local_pointers()
        ckpt = trainer.checkpoint()
        status = ckpt.read(step["path"], coordinator=self.coordinator)
        status.assert_consumed()
        same = trainer.local_pointers() == pointers
        hyper = trainer.hyperparameters()
        self.dump(f"{step['name']}.restored", trainer.full_state())
        after = [trainer.step(s) for s in range(3, 6)]
        self.dump(f"{step['name']}.final", trainer.full_state())
        if step.get("save"):  # on 3 ranks the last Linear's shards are 1, 1 and 0 rows
            ckpt.write(step["save"], coordinator=self.coordinator)
        shapes = {n: list(local_of(p).shape) for n, p in trainer.model.named_parameters()}
        return {"after": after, "same_memory": same, "hyper": hyper, "local_shapes": shapes}

    def fsdp_load(self, step: dict[str, Any]) -> dict[str, Any]:
        """Restore into a fresh model and optimizer; dump what they hold."""
        trainer = Trainer(9, self.rank, self.distributed, lr=0.5, weight_decay=0.0)
        trainer.checkpoint().read(step["path"], coordinator=self.coordinator).assert_consumed()
        self.dump(step["name"], trainer.full_state())
        return {"hyper": trainer.hyperparameters()}

    # Scenario 5: a CheckpointManager resuming training -----------------------------------

    def managed(self, step: dict[str, Any]) -> dict[str, Any]:
        """restore_or_initialize, train to ``stop`` saving every 2 steps; or a reference run."""
        trainer = Trainer(seed=3, rank=self.rank, distributed=self.distributed)
        counter = zc.Variable(np.int64(0))
        result: dict[str, Any] = {}
        manager = None
        if step.get("directory"):
            ckpt = trainer.checkpoint(step=counter)
            manager = zc.CheckpointManager(
                ckpt,
                step["directory"],
                max_to_keep=2,
                step_counter=counter,
                coordinator=self.coordinator,
                enable_async=bool(step.get("async")),
            )
            result["found"] = manager.checkpoints
            result["restored"] = manager.restore_or_initialize()
        start = int(counter.numpy())
        result["start"] = start
        losses, saves = {}, []
        for s in range(start, step["stop"]):
            losses[s] = trainer.step(s)
            counter.assign(s + 1)
            if manager is not None and (s + 1) % 2 == 0:
                path = manager.save()
                saves.append(
                    {
                        "path": path,
                        "checkpoints": manager.checkpoints,
                        "latest": manager.latest_checkpoint,
                    }
                )
        if manager is not None and step.get("async"):
            # The state saved last; then a step changes every tensor while it is written.
            self.dump(step["name"], trainer.full_state())
            result["after_save"] = trainer.step(step["stop"])
        if manager is not None:
            manager.wait()
            self.coordinator.barrier()  # every rank's deletions done before the parent looks
        if not step.get("async"):
            self.dump(step["name"], trainer.full_state())
        result.update(losses=losses, saves=saves, step=int(counter.numpy()))
        if manager is not None:
            result["checkpoints"] = manager.checkpoints
        return result

    def run(self) -> int:
        """Every step, in order; 1 if any failed (the later steps still run: each test
        reports its own step; after a failure on some ranks only, the others' collectives
        fail within the timeout)."""
        status = 0
        for step in self.config["steps"]:
            try:
                result = getattr(self, step["scenario"])(step)
            except Exception:
                self.record(step["name"], {"unexpected": traceback.format_exc()})
                log(f"step {step['name']!r} failed:\n{traceback.format_exc()}")
                status = 1
                continue
            self.record(step["name"], result)
            log(f"step {step['name']!r} done")
        return status


def block_where(tensor: Any) -> dict[str, Any]:
    """Where this rank's local tensor of a DTensor lies, and whether it is replicated."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        tuple(tensor.shape), tensor.device_mesh, tensor.placements
    )
    assert tuple(shape) == tuple(tensor.to_local().shape)
    return {
        "offset": [int(o) for o in offset],
        "shape": [int(n) for n in shape],
        "replicated": all(isinstance(p, Replicate) for p in tensor.placements),
    }


class recording_writes:
    """Append to ``keys`` every key this process writes through LocalStorage meanwhile."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __enter__(self) -> None:
        from zarrckpt._storage import LocalStorage

        self.original = original = LocalStorage.write
        keys = self.keys

        def write(storage: Any, key: str, parts: Any) -> None:
            keys.append(key)
            original(storage, key, parts)

        LocalStorage.write = write  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        from zarrckpt._storage import LocalStorage

        LocalStorage.write = self.original  # type: ignore[method-assign]


EPOCH = float(os.environ.get("TORCH_WORKER_EPOCH", time.time()))


def log(message: str) -> None:
    print(f"[{time.time() - EPOCH:7.2f} s] {message}", flush=True)


def main() -> int:
    log("imported")
    config = json.loads(Path(sys.argv[1]).read_text())
    rank = Rank(config)
    status = rank.run()
    if rank.distributed and status == 0:
        # gloo: destroying the group right after a collective can abort a rank; agree first.
        dist.barrier()
        dist.destroy_process_group()
    log("exiting")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # a group a failed rank left may block at exit: leave at once


if __name__ == "__main__":
    sys.exit(main())
