"""A distributed training loop that checkpoints with zarrckpt over torch.distributed.

Run it with any number of ranks, as often as you like, on one directory:

    torchrun --nproc-per-node 3 examples/distributed_torch.py --dir /tmp/zc-dist --steps 3
    torchrun --nproc-per-node 3 examples/distributed_torch.py --dir /tmp/zc-dist --steps 2
    torchrun --nproc-per-node 2 examples/distributed_torch.py --dir /tmp/zc-dist --check

The second run goes on from step 3 to step 5; the third restores the latest
checkpoint with two ranks where three wrote it, and checks every value. The
program (model, training, checkpointing) is examples/distributed_training.py;
this file only makes the coordinator. The same over MPI: distributed_mpi.py.
"""

from __future__ import annotations

import torch.distributed as dist
from distributed_training import parse_args, run  # beside this file

from zarrckpt.distributed import TorchCoordinator


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    try:
        run(TorchCoordinator(timeout=args.timeout), args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
