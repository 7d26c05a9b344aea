"""One process of bench/torch_adapter.py: an ``nn.Module`` saved and loaded over and over.

Started by bench/torch_adapter.py through bench/distributed.py's ``World`` (the
same protocol as bench/_dist_worker.py: ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` in the environment, the JSON job file as
``argv[1]``, the answer file descriptor as ``argv[2]``, one JSON command per
line on stdin, one JSON answer per line back).

With ``WORLD_SIZE`` > 1 the process joins a gloo world and its model is FSDP2:
built on the meta device, ``fully_shard`` on every block and then on the root
(a 1-D CPU mesh), ``to_empty(device="cpu")``, then filled. With ``WORLD_SIZE``
1 it is a plain CPU module. Either way every value is generated from
``(seed, parameter index, global rows)`` (bench/_dist_worker.py's
``generate_rows``), so the values do not depend on the world size, and a
reference copy of this process's part is kept to verify every load.

Commands (``path`` is a directory locally, an ``s3://`` URL on S3):

* ``{"op": "warmup", "local": DIR, "s3": URL | null}``: every method once on
  a small model of the same shape (imports, first-use costs, thread pools);
* ``{"op": "save" | "load", "lib": ..., "storage": "local" | "s3", "path": ...}``
  with ``lib`` one of ``zarrckpt``, ``dcp`` (distributed) or ``zarrckpt``,
  ``torch``, ``torch-mmap`` (single process; ``torch-mmap`` loads only);
* ``{"op": "quit"}``.

Every answer of ``save``/``load`` holds ``seconds`` (barrier to barrier when
distributed: the slowest rank; the operation itself in one process),
``own_seconds``, ``peak_extra`` (VmHWM after the operation minus VmRSS before,
the high-water mark reset through ``/proc/self/clear_refs``), ``model_bytes``
(this process's parameter bytes), ``rss_anon`` / ``rss_file`` (at the end of
the operation, while what it allocated is still referenced), ``rchar`` and
``http_body`` (bytes read), and for loads ``verified`` and ``same_data_ptr``
(every parameter still at the address it had before the load). A torch save
also reports ``save_seconds`` (``torch.save`` alone) and ``fsync_seconds``.
"""

from __future__ import annotations

import cProfile
import datetime
import math
import os
import sys
import time
from typing import Any

import _dist_worker as dw
from _dist_worker import _status_kib, generate_rows, rchar, reset_peak
from _model import CONTEXT, transformer_specs


def _status_bytes(field: str) -> int:
    return _status_kib(field)


# Model -----------------------------------------------------------------------


def build_module(total_bytes: int) -> tuple[Any, dict[str, tuple[int, list[int]]]]:
    """A transformer of ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding`` on the meta device.

    Shapes and parameter names are bench/_model.py's ``transformer_specs``
    (``layers.3.mlp.fc.weight``...). Returns the module and, per parameter
    name, (generator index, global shape).
    """
    import torch
    from torch import nn

    specs = transformer_specs(total_bytes, "float32")
    d = specs[1].shape[1]  # embed.positions.weight: (CONTEXT, d)
    vocab = specs[0].shape[0]
    layers = sum(1 for s in specs if s.name.endswith("ln_1.weight"))

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(d, 4 * d)
            self.proj = nn.Linear(4 * d, d)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1 = nn.LayerNorm(d)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(d)
            self.mlp = MLP()

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(vocab, d)
            self.positions = nn.Embedding(CONTEXT, d)

    class Transformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = Embed()
            self.layers = nn.ModuleList(Block() for _ in range(layers))
            self.final_norm = nn.LayerNorm(d)

    with torch.device("meta"):
        module = Transformer()
    by_name = {s.name: (s.index, list(s.shape)) for s in specs}
    names = {name for name, _ in module.named_parameters()}
    if names != set(by_name):
        raise AssertionError(f"module and specs differ: {sorted(names ^ set(by_name))[:5]}")
    return module, by_name


def local_part(param: Any) -> tuple[Any, int, int]:
    """(local tensor, first global row, stop row) of a parameter (DTensor or plain)."""
    from torch.distributed.tensor import DTensor

    if isinstance(param, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = param.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            tuple(param.shape), param.device_mesh, param.placements
        )
        assert tuple(shape) == tuple(local.shape), (shape, local.shape)
        return local, int(offset[0]), int(offset[0]) + int(shape[0])
    return param.detach(), 0, int(param.shape[0])


class Model:
    """The module of this process (FSDP2 when distributed), its values and a reference copy."""

    def __init__(self, total_bytes: int, seed: int, mesh: Any) -> None:
        import torch

        module, by_name = build_module(total_bytes)
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            for block in module.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(module, mesh=mesh)
        module.to_empty(device="cpu")
        self.module = module
        self.reference: dict[str, Any] = {}
        self.locals: dict[str, Any] = {}
        with torch.no_grad():
            for name, param in module.named_parameters():
                index, shape = by_name[name]
                local, start, stop = local_part(param)
                values = generate_rows(index, shape, seed, start, stop) if stop > start else None
                if values is not None:
                    local.copy_(torch.from_numpy(values))
                self.locals[name] = local
                self.reference[name] = local.clone()
        self.nbytes = sum(t.numel() * t.element_size() for t in self.locals.values())
        self.global_bytes = sum(math.prod(s) * 4 for _, s in by_name.values())
        self.parameters = len(self.locals)

    def data_ptrs(self) -> dict[str, int]:
        return {name: t.data_ptr() for name, t in self.locals.items()}

    def reset(self) -> None:
        """Overwrite every local value (touching it: a live model's memory)."""
        import torch

        with torch.no_grad():
            for local in self.locals.values():
                local.fill_(float("nan"))

    def matches(self) -> bool:
        import torch

        return all(torch.equal(self.locals[n], self.reference[n]) for n in self.reference)


# Operations ------------------------------------------------------------------


class Worker:
    def __init__(self, job: dict[str, Any]) -> None:
        import zarrckpt as zc
        import zarrckpt.torch

        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.zc = zc
        self.dist = None
        self.coordinator = None
        mesh = None
        if self.world > 1:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            from zarrckpt.distributed import TorchCoordinator

            timeout = datetime.timedelta(seconds=job["timeout"])
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=timeout)
            self.dist = dist
            self.coordinator = TorchCoordinator(timeout=job["timeout"])
            mesh = init_device_mesh("cpu", (self.world,))
        self.s3 = job["s3"]
        if self.s3 is not None:
            dw.count_http_body_bytes()
        self.profile = bool(job.get("profile")) and self.rank == 0
        self.profile_dir = job.get("profile_dir", ".")
        started = time.perf_counter()
        self.model = Model(job["bytes"], job["seed"], mesh)
        self.build_seconds = time.perf_counter() - started
        self.small = Model(job["warmup_bytes"], job["seed"] + 1, mesh)

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def storage_options(self, storage: str) -> dict[str, Any] | None:
        return self.s3 if storage == "s3" else None

    # zarrckpt -------------------------------------------------------------

    def zc_save(self, model: Model, storage: str, path: str) -> dict[str, Any]:
        from zarrckpt.torch import ModuleState

        ckpt = self.zc.Checkpoint(model=ModuleState(model.module))
        ckpt.write(
            path, coordinator=self.coordinator, storage_options=self.storage_options(storage)
        )
        stats = ckpt.last_write_stats
        return {"written": stats.nbytes if stats is not None else None,
                "files_written": stats.files if stats is not None else None}

    def zc_load(self, model: Model, storage: str, path: str) -> dict[str, Any]:
        from zarrckpt.torch import ModuleState

        status = self.zc.Checkpoint(model=ModuleState(model.module)).read(
            path, storage_options=self.storage_options(storage), coordinator=self.coordinator
        )
        return {"status": status, "io_nbytes": status.io_stats.nbytes}

    # DCP (distributed) ----------------------------------------------------

    def dcp_save(self, model: Model, storage: str, path: str) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if storage == "s3":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            # As bench/_dist_worker.py: sync_files=True would os.sync() per stream.
            writer = FsspecWriter(path, sync_files=False, **self.s3)
        else:
            writer = dcp.FileSystemWriter(path)  # defaults: fsync per file, one thread
        dcp.save(get_model_state_dict(model.module), storage_writer=writer)
        return {}

    def dcp_load(self, model: Model, storage: str, path: str) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        if storage == "s3":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            reader = FsspecReader(path, **self.s3)
        else:
            reader = dcp.FileSystemReader(path)
        state = get_model_state_dict(model.module)
        dcp.load(state, storage_reader=reader)
        set_model_state_dict(model.module, state)
        return {}

    # torch.save / torch.load (one process, local) -------------------------

    def torch_save(self, model: Model, storage: str, path: str) -> dict[str, Any]:
        import torch

        assert storage == "local"
        os.makedirs(path)
        file = os.path.join(path, "model.pt")
        start = time.perf_counter()
        torch.save(model.module.state_dict(), file)
        saved = time.perf_counter()
        for target in (file, path, os.path.dirname(path)):
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return {"save_seconds": saved - start, "fsync_seconds": time.perf_counter() - saved}

    def _torch_load(self, model: Model, path: str, mmap: bool) -> dict[str, Any]:
        import torch

        state = torch.load(os.path.join(path, "model.pt"), weights_only=True, mmap=mmap)
        model.module.load_state_dict(state)
        return {"rss_anon": _status_bytes("RssAnon"), "rss_file": _status_bytes("RssFile")}

    def run(self, op: str, lib: str, model: Model, storage: str, path: str) -> dict[str, Any]:
        if lib == "zarrckpt":
            return (self.zc_save if op == "save" else self.zc_load)(model, storage, path)
        if lib == "dcp":
            return (self.dcp_save if op == "save" else self.dcp_load)(model, storage, path)
        if lib == "torch":
            if op == "save":
                return self.torch_save(model, storage, path)
            return self._torch_load(model, path, mmap=False)
        if lib == "torch-mmap" and op == "load":
            return self._torch_load(model, path, mmap=True)
        raise ValueError(f"no {op} for {lib!r}")

    def measured(self, op: str, lib: str, model: Model, storage: str, path: str) -> dict[str, Any]:
        ptrs = None
        if op == "load":
            model.reset()
            ptrs = model.data_ptrs()
        self.barrier()
        rss_before = _status_bytes("VmRSS")
        reset_peak()
        read_before, http_before = rchar(), dw._http_body[0]
        profile = None
        if self.profile and model is self.model and lib == "zarrckpt":
            profile = cProfile.Profile()
            profile.enable()
        start = time.perf_counter()
        info = self.run(op, lib, model, storage, path)
        own = time.perf_counter() - start
        if profile is not None:
            profile.disable()
            name = f"{op}-{lib}-{storage}-world{self.world}-{os.path.basename(path)}.pstats"
            profile.dump_stats(os.path.join(self.profile_dir, name))
        read = rchar() - read_before
        http = dw._http_body[0] - http_before
        peak = _status_bytes("VmHWM")
        info.setdefault("rss_anon", _status_bytes("RssAnon"))
        info.setdefault("rss_file", _status_bytes("RssFile"))
        self.barrier()
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {
            "seconds": seconds,
            "own_seconds": own,
            "rchar": read,
            "http_body": http,
            "model_bytes": model.nbytes,
            "peak_extra": peak - rss_before,
            "rss_before": rss_before,
        }
        status = info.pop("status", None)
        if status is not None:
            status.assert_consumed()
        result.update(info)
        if op == "load":
            result["verified"] = model.matches()
            result["same_data_ptr"] = model.data_ptrs() == ptrs
            if not result["verified"]:
                raise AssertionError(
                    f"rank {self.rank}: {lib} loaded values differ from the source"
                )
        return result

    def warmup(self, local: str, s3: str | None) -> dict[str, Any]:
        started = time.perf_counter()
        libs = ["zarrckpt", "dcp"] if self.world > 1 else ["zarrckpt", "torch"]
        for storage, root in (("local", local), ("s3", s3)):
            if root is None:
                continue
            for lib in libs:
                if lib == "torch" and storage != "local":
                    continue
                path = f"{root}/warmup-{lib}-w{self.world}"
                self.measured("save", lib, self.small, storage, path)
                self.measured("load", lib, self.small, storage, path)
                if lib == "torch":
                    self.measured("load", "torch-mmap", self.small, storage, path)
        return {
            "seconds": time.perf_counter() - started,
            "build_seconds": self.build_seconds,
            "rss": _status_bytes("VmRSS"),
            "model_bytes": self.model.nbytes,
            "global_bytes": self.model.global_bytes,
            "parameters": self.model.parameters,
        }

    def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "warmup":
            return self.warmup(command["local"], command.get("s3"))
        if op in ("save", "load"):
            return self.measured(op, command["lib"], self.model, command["storage"],
                                 command["path"])
        raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    return dw.serve(Worker, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
