"""A PyTorch training loop that checkpoints with zarrckpt and resumes where it stopped.

Run it as often as you like on one directory:

    python examples/torch_training.py --dir /tmp/zc-torch --steps 6 --every 2
    python examples/torch_training.py --dir /tmp/zc-torch --steps 4 --every 2
    python examples/torch_training.py --dir /tmp/zc-torch --check

The first run trains steps 1-6 and saves a checkpoint every 2 steps; the
second restores the latest one (step 6) and trains steps 7-10. ``--check``
restores the latest checkpoint, trains a fresh model for as many steps
without interruption, and checks that the two are equal bit for bit: model
parameters and buffers, optimizer state, every loss a checkpoint recorded,
and one more step of training from each. It saves nothing.

The model (Linear, BatchNorm1d, Linear), the data (a function of the step
number) and the training step are used by examples/torch_fsdp.py as well.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import zarrckpt as zc
import zarrckpt.torch as zt

FEATURES, HIDDEN, CLASSES, BATCH = 10, 32, 3, 12


class MLP(nn.Module):
    """Linear, BatchNorm1d, ReLU, Linear: parameters, buffers and an int64 counter to save."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, HIDDEN, bias=False)  # BatchNorm follows: no bias
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def make_model() -> MLP:
    torch.manual_seed(0)  # the same initial values in every run (a restore overwrites them)
    return MLP()


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and labels of training step ``step`` (1, 2, ...): a function of the step."""
    teacher = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(BATCH, FEATURES, generator=torch.Generator().manual_seed(step))
    return x, (x @ teacher).argmax(dim=1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
    """One step of training on ``batch(step)``; the loss."""
    x, y = batch(step)
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dir", required=True, help="the checkpoint directory")
    parser.add_argument("--steps", type=int, default=6, help="training steps to run")
    parser.add_argument("--every", type=int, default=2, help="save a checkpoint every N steps")
    parser.add_argument("--check", action="store_true", help="check the latest checkpoint")
    return parser.parse_args()


def reference(steps: int) -> tuple[MLP, torch.optim.Optimizer, dict[int, float]]:
    """A fresh model and optimizer trained ``steps`` steps without interruption; the losses."""
    model = make_model()
    optimizer = make_optimizer(model)
    losses = {step: train_step(model, optimizer, step) for step in range(1, steps + 1)}
    return model, optimizer, losses


def differences(a: dict, b: dict, where: str = "") -> list[str]:
    """Where two state dicts (nested dicts, lists, tensors) differ, bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)))
        )
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}[{i}]")
        ]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def count_tensors(state: dict) -> int:
    if isinstance(state, torch.Tensor):
        return 1
    if isinstance(state, dict):
        return sum(count_tensors(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(count_tensors(v) for v in state)
    return 0


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    model = make_model()
    optimizer = make_optimizer(model)
    step = zc.Variable(np.int64(0))  # the number of steps trained, saved with the model
    ckpt = zc.Checkpoint(
        model=zt.ModuleState(model),
        optim=zt.OptimizerState(optimizer, model),
        step=step,
    )
    manager = zc.CheckpointManager(ckpt, args.dir, max_to_keep=3, step_counter=step)

    if args.check:
        check(args, ckpt, manager, model, optimizer, step)
        return

    restored = manager.restore_or_initialize()  # the latest checkpoint, or None the first time
    print(f"restored {restored} at step {int(step)}" if restored else "starting afresh")
    for _ in range(args.steps):
        step.assign_add(1)
        loss = train_step(model, optimizer, int(step))
        if int(step) % args.every == 0:
            path = manager.save(metrics={"step": int(step), "loss": loss})
            print(f"step {int(step)}: loss {loss:.4f}, saved {path}")
    manager.wait()  # old checkpoints are deleted in the background
    result = {"restored": restored, "step": int(step), "checkpoints": manager.checkpoints}
    print("RESULT " + json.dumps(result), flush=True)


def check(args, ckpt, manager, model, optimizer, step) -> None:
    """The latest checkpoint equals an uninterrupted run of as many steps, bit for bit."""
    latest = manager.latest_checkpoint
    if latest is None:
        raise SystemExit(f"{args.dir}: no checkpoint to check")
    ckpt.restore(latest).assert_consumed()  # every saved value matched, every object restored
    steps = int(step)
    ref_model, ref_optimizer, losses = reference(steps)

    problems = differences(model.state_dict(), ref_model.state_dict(), "model")
    problems += differences(optimizer.state_dict(), ref_optimizer.state_dict(), "optim")
    recorded = {}  # the loss each kept checkpoint recorded, by step
    for info in zc.list_checkpoints(args.dir):
        recorded[int(info.metadata["step"])] = info.metadata["loss"]
        if info.metadata["loss"] != losses[int(info.metadata["step"])]:
            problems.append(f"{info.path}: loss {info.metadata['loss']!r}")
    # The restored optimizer goes on exactly as the uninterrupted one does.
    next_loss = train_step(model, optimizer, steps + 1)
    if next_loss != train_step(ref_model, ref_optimizer, steps + 1):
        problems.append(f"step {steps + 1}: loss")
    problems += differences(model.state_dict(), ref_model.state_dict(), "model after one step")

    if problems:
        raise SystemExit(f"check FAILED: {latest} differs from an uninterrupted run: {problems}")
    model_tensors = count_tensors(model.state_dict())
    optim_tensors = count_tensors(optimizer.state_dict()["state"])
    print(
        f"check: {latest} (step {steps}) equals an uninterrupted run of {steps} steps bit "
        f"for bit: {model_tensors} model tensors, {optim_tensors} optimizer tensors, "
        f"{len(recorded)} recorded losses, and step {steps + 1} after it"
    )
    result = {"checked": latest, "step": steps, "equal": True, "losses": recorded}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
