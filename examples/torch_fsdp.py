"""torch_training.py's loop, sharded with FSDP2 under torchrun, resumable on any number of ranks.

Run it with two ranks, then go on with three, then check the result in one
plain process (no torchrun, no process group, no FSDP):

    torchrun --nproc-per-node 2 examples/torch_fsdp.py --dir /tmp/zc-fsdp --steps 4 --every 2
    torchrun --nproc-per-node 3 examples/torch_fsdp.py --dir /tmp/zc-fsdp --steps 4 --every 2
    python examples/torch_fsdp.py --dir /tmp/zc-fsdp --check

``fully_shard`` makes every parameter a DTensor sharded by rows, and the
AdamW state with it; each rank saves its rows (``TorchCoordinator``), and a
restore reads, on each rank, the rows it holds, whatever number of ranks
wrote them. ``--check`` (alone, or under torchrun) restores the latest
checkpoint and compares it with the single-process loop of torch_training.py
run as many steps without interruption: the values and the loss every kept
checkpoint recorded. They agree up to rounding, not bit for bit: the ranks
average their gradients in a reduce-scatter.

Every rank trains on the whole batch of each step, so that any number of
ranks computes what one process computes and the check can compare. (A real
job gives each rank its part of the batch. BatchNorm's running statistics
then differ between ranks: they are buffers, not DTensors, so they are
saved as replicated values, one rank's copy. Use SyncBatchNorm, or average
them across ranks before saving.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.distributed as dist
from torch_training import (  # beside this file
    count_tensors,
    make_model,
    make_optimizer,
    parse_args,
    reference,
    train_step,
)

import zarrckpt as zc
import zarrckpt.torch as zt
from zarrckpt.distributed import TorchCoordinator


def full(state):
    """A state dict with every DTensor gathered into a whole tensor (for the check)."""
    if isinstance(state, torch.distributed.tensor.DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(full(v) for v in state)
    return state


def largest_difference(a, b, where: str = "") -> tuple[float, str]:
    """The largest absolute difference between two state dicts, and where (shapes must match)."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, (where, a.shape, b.shape)
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0, where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, a.keys(), b.keys())
        found = [largest_difference(a[k], b[k], f"{where}/{k}") for k in a]
    elif isinstance(a, list | tuple):
        found = [
            largest_difference(x, y, f"{where}[{i}]")
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        ]
    else:
        assert a == b, (where, a, b)
        found = []
    return max(found, default=(0.0, where))


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    coordinator = None
    model = make_model()
    if launched:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        coordinator = TorchCoordinator(timeout=60)  # every rank, at the same point
        fully_shard(model.fc1)
        fully_shard(model.fc2)
        fully_shard(model)  # the root: bn's parameters; buffers stay plain tensors
    elif not args.check:
        raise SystemExit("train under torchrun (one process can only --check)")
    optimizer = make_optimizer(model)  # after fully_shard: over the sharded parameters
    step = zc.Variable(np.int64(0))
    ckpt = zc.Checkpoint(
        model=zt.ModuleState(model),
        optim=zt.OptimizerState(optimizer, model),
        step=step,
    )
    manager = zc.CheckpointManager(
        ckpt, args.dir, max_to_keep=3, step_counter=step, coordinator=coordinator
    )
    if args.check:
        check(args, ckpt, manager, model, optimizer, step, coordinator)
    else:
        train(args, manager, model, optimizer, step, coordinator)
    if launched:  # (after an error, torchrun ends the other ranks)
        dist.barrier()  # gloo: leave no rank behind in the last collective
        dist.destroy_process_group()


def train(args, manager, model, optimizer, step, coordinator) -> None:
    rank, world_size = coordinator.rank, coordinator.world_size
    restored = manager.restore_or_initialize()  # every rank: its rows of the latest checkpoint
    rows = coordinator.all_gather_object(
        {
            name: f"{p.to_local().shape[0]}/{p.shape[0]}"
            for name, p in model.named_parameters()
            if name in ("fc1.weight", "fc2.weight")
        }
    )
    if rank == 0:
        print(f"restored {restored} at step {int(step)}" if restored else "starting afresh")
        for r, held in enumerate(rows):
            print(f"rank {r}/{world_size} holds rows {held}")
    for _ in range(args.steps):
        step.assign_add(1)
        loss = train_step(model, optimizer, int(step))
        if int(step) % args.every == 0:
            metrics = {"step": int(step), "loss": loss, "world_size": world_size}
            path = manager.save(metrics=metrics)  # every rank, together: one checkpoint
            if rank == 0:
                print(f"step {int(step)}: loss {loss:.4f}, saved {path}")
    manager.wait()
    if rank == 0:
        result = {
            "world_size": world_size,
            "restored": restored,
            "step": int(step),
            "checkpoints": manager.checkpoints,
        }
        print("RESULT " + json.dumps(result), flush=True)


def check(args, ckpt, manager, model, optimizer, step, coordinator) -> None:
    """The latest checkpoint against the single-process loop run as many steps."""
    latest = manager.latest_checkpoint
    if latest is None:
        raise SystemExit(f"{args.dir}: no checkpoint to check")
    ckpt.restore(latest, coordinator=coordinator).assert_consumed()
    steps = int(step)
    ref_model, ref_optimizer, losses = reference(steps)
    model_diff = largest_difference(full(model.state_dict()), ref_model.state_dict(), "model")
    optim_diff = largest_difference(
        full(optimizer.state_dict()), ref_optimizer.state_dict(), "optim"
    )
    loss_diff, writers = 0.0, {}
    for info in zc.list_checkpoints(args.dir):
        saved_step = int(info.metadata["step"])
        writers[saved_step] = int(info.metadata["world_size"])
        loss_diff = max(loss_diff, abs(info.metadata["loss"] - losses[saved_step]))
    worst = max(model_diff, optim_diff)
    if coordinator is None or coordinator.rank == 0:
        world_size = coordinator.world_size if coordinator else 1
        print(
            f"check on {world_size} rank(s): {latest} (step {steps}, written by "
            f"{writers[steps]} ranks) matches an uninterrupted single-process run: "
            f"{count_tensors(model.state_dict())} model tensors, "
            f"{count_tensors(optimizer.state_dict()['state'])} optimizer tensors, largest "
            f"difference {worst[0]:.1e} ({worst[1]}); losses at steps {sorted(writers)} "
            f"within {loss_diff:.1e}"
        )
        if worst[0] > 1e-4 or loss_diff > 1e-5:
            raise SystemExit(f"check FAILED: {latest} is not the single-process result")
        result = {
            "world_size": world_size,
            "checked": latest,
            "step": steps,
            "writers": writers,
            "largest_difference": worst[0],
            "loss_difference": loss_diff,
        }
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
