"""A distributed training loop that checkpoints with zarrckpt over MPI (mpi4py).

Run it with any number of ranks, as often as you like, on one directory:

    mpiexec -n 3 python examples/distributed_mpi.py --dir /tmp/zc-mpi --steps 3
    mpiexec -n 3 python examples/distributed_mpi.py --dir /tmp/zc-mpi --steps 2
    mpiexec -n 2 python examples/distributed_mpi.py --dir /tmp/zc-mpi --check
    python examples/distributed_mpi.py --dir /tmp/zc-mpi --check     # one rank

The second run goes on from step 3 to step 5; the third restores the latest
checkpoint with two ranks where three wrote it, and checks every value. The
program (model, training, checkpointing) is examples/distributed_training.py;
this file only makes the coordinator. The same over torch: distributed_torch.py.
"""

from __future__ import annotations

from distributed_training import parse_args, run  # beside this file

from zarrckpt.distributed import MPICoordinator


def main() -> None:
    args = parse_args(__doc__.split("\n")[0])
    run(MPICoordinator(timeout=args.timeout), args)  # COMM_WORLD; imports mpi4py


if __name__ == "__main__":
    main()
