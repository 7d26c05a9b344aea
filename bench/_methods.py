"""The benchmarked save/restore methods, one small class each, in a registry.

A method's life in a child process:

* save side: ``setup`` (imports) -> ``wrap`` each generated array -> ``assemble``
  the program state -> timed ``save`` (the harness then fsyncs the tree, timed too);
* restore side: ``setup`` -> ``allocate`` the live state (untimed; methods that
  restore into preallocated memory touch it here) -> timed ``restore`` ->
  ``arrays`` (untimed view of the restored state, for verification);
* partial reads (methods with ``partial = True``): ``locate`` (untimed) ->
  timed ``read_part`` -> ``files_touched``.

Library imports happen in ``setup`` only, so each child's RSS holds only its
own method's libraries.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from _fs import pread_into, pwrite_all
from _model import ArraySpec, MiB, byte_view, resolve_dtype

Rows = tuple[int, int] | None


class MethodUnavailable(Exception):
    """The method cannot run here (library missing); reported as skipped."""


class Method:
    name: ClassVar[str]
    partial: ClassVar[bool] = False

    def setup(self) -> None:
        """Import the method's libraries; raise MethodUnavailable if impossible."""

    def wrap(self, array: np.ndarray) -> Any:
        return array

    def assemble(self, items: dict[str, Any]) -> Any:
        return items

    def save(self, state: Any, path: Path) -> None:
        raise NotImplementedError

    def allocate(self, specs: list[ArraySpec]) -> Any:
        return None

    def restore(self, path: Path, specs: list[ArraySpec], live: Any) -> Any:
        raise NotImplementedError

    def array(self, state: Any, name: str) -> np.ndarray:
        """The restored value of ``name`` as an ndarray (untimed, for verification)."""
        return np.asarray(state[name])

    def locate(self, path: Path, spec: ArraySpec) -> Any:
        raise NotImplementedError

    def read_part(self, where: Any, spec: ArraySpec, rows: Rows) -> np.ndarray:
        raise NotImplementedError

    def files_touched(self, where: Any, spec: ArraySpec, rows: Rows) -> int:
        raise NotImplementedError


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def touched_empty(spec: ArraySpec) -> np.ndarray:
    """A preallocated live buffer whose pages are already faulted in, like a real model's."""
    array = np.empty(spec.shape, resolve_dtype(spec.dtype))
    array.reshape(-1).view(np.uint8).fill(0)
    return array


def _import(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MethodUnavailable(f"{module} is not importable: {exc}") from exc


def chunks_touched(shape: tuple[int, ...], chunk: tuple[int, ...], rows: Rows) -> int:
    """Chunk files a row range (or the whole array) covers in a regular chunk grid."""
    start, stop = rows if rows is not None else (0, shape[0])
    along_rows = (stop - 1) // chunk[0] - start // chunk[0] + 1
    return along_rows * math.prod(math.ceil(s / c) for s, c in zip(shape[1:], chunk[1:],
                                                                    strict=True))


def _row_bytes(spec: ArraySpec) -> int:
    return spec.nbytes // spec.shape[0]


def _write_file(file: Path, array: np.ndarray) -> None:
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, byte_view(array))
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(file: Path, out: np.ndarray, offset: int = 0) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        pread_into(fd, byte_view(out), offset)
    finally:
        os.close(fd)


@register
class Raw1(Method):
    """One thread, one file per array: pwrite the buffer + fsync, pread into preallocated."""

    name = "raw1"
    partial = True

    def save(self, state: dict[str, np.ndarray], path: Path) -> None:
        for name, array in state.items():
            _write_file(path / f"{name}.bin", array)

    def allocate(self, specs: list[ArraySpec]) -> dict[str, np.ndarray]:
        return {spec.name: touched_empty(spec) for spec in specs}

    def restore(self, path: Path, specs: list[ArraySpec], live: dict[str, np.ndarray]) -> Any:
        for spec in specs:
            _read_file(path / f"{spec.name}.bin", live[spec.name])
        return live

    def locate(self, path: Path, spec: ArraySpec) -> Path:
        return path / f"{spec.name}.bin"

    def read_part(self, where: Path, spec: ArraySpec, rows: Rows) -> np.ndarray:
        start, stop = rows if rows is not None else (0, spec.shape[0])
        out = np.empty((stop - start, *spec.shape[1:]), resolve_dtype(spec.dtype))
        _read_file(where, out, start * _row_bytes(spec))
        return out

    def files_touched(self, where: Path, spec: ArraySpec, rows: Rows) -> int:
        return 1


@register
class Raw8(Raw1):
    """The reference: raw1's files, written and read by 8 threads, one task per array.

    Partial reads are raw1's (one pread). ``list(pool.map(...))`` waits for every
    task and re-raises the first error.
    """

    name = "raw8"
    threads: ClassVar[int] = 8

    def save(self, state: dict[str, np.ndarray], path: Path) -> None:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(_write_file, [path / f"{n}.bin" for n in state], state.values()))

    def restore(self, path: Path, specs: list[ArraySpec], live: dict[str, np.ndarray]) -> Any:
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(_read_file, [path / f"{s.name}.bin" for s in specs],
                          [live[s.name] for s in specs]))
        return live


@register
class Npy(Method):
    """np.save / np.load, one .npy file per array."""

    name = "npy"

    def save(self, state: dict[str, np.ndarray], path: Path) -> None:
        for name, array in state.items():
            np.save(path / f"{name}.npy", array)

    def restore(self, path: Path, specs: list[ArraySpec], live: None) -> Any:
        # .npy has no bfloat16: it stores |V2, so view the result as the program's dtype.
        return {s.name: np.load(path / f"{s.name}.npy").view(resolve_dtype(s.dtype))
                for s in specs}


@register
class Safetensors(Method):
    """safetensors.numpy save_file / load_file, one file."""

    name = "safetensors"

    def setup(self) -> None:
        self.st = _import("safetensors.numpy")

    def save(self, state: dict[str, np.ndarray], path: Path) -> None:
        self.st.save_file(state, path / "model.safetensors")

    def restore(self, path: Path, specs: list[ArraySpec], live: None) -> Any:
        return self.st.load_file(path / "model.safetensors")


@register
class Torch(Method):
    """torch.save / torch.load of a dict of tensors made with torch.from_numpy."""

    name = "torch"

    def setup(self) -> None:
        self.torch = _import("torch")

    def wrap(self, array: np.ndarray) -> Any:
        if array.dtype.name == "bfloat16":  # torch.from_numpy does not know ml_dtypes
            return self.torch.from_numpy(array.view(np.int16)).view(self.torch.bfloat16)
        return self.torch.from_numpy(array)

    def save(self, state: dict[str, Any], path: Path) -> None:
        self.torch.save(state, path / "model.pt")

    def restore(self, path: Path, specs: list[ArraySpec], live: None) -> Any:
        return self.torch.load(path / "model.pt", weights_only=True)

    def array(self, state: dict[str, Any], name: str) -> np.ndarray:
        tensor = state[name]
        if tensor.dtype == self.torch.bfloat16:
            return np.asarray(tensor.view(self.torch.int16).numpy()).view(resolve_dtype("bfloat16"))
        return np.asarray(tensor.numpy())


TS_CHUNK_TARGET = 64 * MiB


def ts_chunk_shape(shape: tuple[int, ...], nbytes: int) -> tuple[int, ...]:
    """One chunk, or ~64 MiB chunks along axis 0 (rows split evenly to limit padding)."""
    count = max(1, math.ceil(nbytes / TS_CHUNK_TARGET))
    return (max(1, math.ceil(shape[0] / count)), *shape[1:])


@register
class Tensorstore(Method):
    """tensorstore zarr3 driver, no compression, all arrays written/read concurrently."""

    name = "tensorstore"
    partial = True

    def setup(self) -> None:
        self.ts = _import("tensorstore")

    def _open(self, path: Path, name: str) -> Any:
        kvstore = {"driver": "file", "path": f"{path / name}/"}
        return self.ts.open({"driver": "zarr3", "kvstore": kvstore}, open=True)

    def _create(self, path: Path, name: str, array: np.ndarray) -> Any:
        chunks = list(ts_chunk_shape(array.shape, array.nbytes))
        metadata = {
            "shape": list(array.shape),
            "data_type": array.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
        kvstore = {"driver": "file", "path": f"{path / name}/"}
        return self.ts.open({"driver": "zarr3", "kvstore": kvstore, "metadata": metadata},
                            create=True)

    def save(self, state: dict[str, np.ndarray], path: Path) -> None:
        opened = {name: self._create(path, name, array) for name, array in state.items()}
        writes = [future.result().write(state[name]) for name, future in opened.items()]
        for write in writes:
            write.result()

    def restore(self, path: Path, specs: list[ArraySpec], live: None) -> Any:
        opened = {s.name: self._open(path, s.name) for s in specs}
        reads = {name: future.result().read() for name, future in opened.items()}
        return {name: future.result() for name, future in reads.items()}

    def locate(self, path: Path, spec: ArraySpec) -> Path:
        return path

    def read_part(self, where: Path, spec: ArraySpec, rows: Rows) -> np.ndarray:
        store = self._open(where, spec.name).result()
        if rows is not None:
            store = store[rows[0] : rows[1]]
        return np.asarray(store.read().result())

    def files_touched(self, where: Path, spec: ArraySpec, rows: Rows) -> int:
        chunk = self._open(where, spec.name).result().chunk_layout.read_chunk.shape
        return chunks_touched(spec.shape, tuple(chunk), rows)


class ZarrPartial(Method):
    """Partial reads with plain zarr-python: ``zarr.open_array(url)[rows]``."""

    partial = True

    def setup(self) -> None:
        self.zarr = _import("zarr")

    def read_part(self, where: str, spec: ArraySpec, rows: Rows) -> np.ndarray:
        array = self.zarr.open_array(where, mode="r")
        return np.asarray(array[...] if rows is None else array[rows[0] : rows[1]])

    def files_touched(self, where: str, spec: ArraySpec, rows: Rows) -> int:
        array = self.zarr.open_array(where, mode="r")
        return chunks_touched(array.shape, tuple(array.shards or array.chunks), rows)


@register
class ZarrDefault(ZarrPartial):
    """zarr-python 3 create_array with default settings, ``a[...] = x`` / ``a[...]``."""

    name = "zarr-default"

    def save(self, state: dict[str, np.ndarray], path: Path) -> None:
        for name, array in state.items():
            target = self.zarr.create_array(str(path / name), shape=array.shape,
                                            dtype=array.dtype)
            target[...] = array

    def restore(self, path: Path, specs: list[ArraySpec], live: None) -> Any:
        return {s.name: self.zarr.open_array(str(path / s.name), mode="r")[...] for s in specs}

    def locate(self, path: Path, spec: ArraySpec) -> str:
        return str(path / spec.name)


def _unescape(component: str) -> str:
    """Undo ``~XX`` byte escapes (zarrckpt escapes names that are not [A-Za-z0-9_-])."""
    if component == "~":
        return ""
    parts = re.split(r"(~[0-9A-F]{2})", component)
    raw = b"".join(bytes([int(p[1:], 16)]) if re.fullmatch(r"~[0-9A-F]{2}", p) else p.encode()
                   for p in parts)
    return raw.decode("utf-8", errors="replace")


def zarr_array_keys(root: Path) -> list[str]:
    """Paths of every Zarr v3 array below ``root``, found by listing zarr.json files."""
    keys = []
    for meta in root.rglob("zarr.json"):
        if json.loads(meta.read_text()).get("node_type") == "array":
            keys.append(meta.parent.relative_to(root).as_posix())
    return sorted(keys)


def key_for(keys: list[str], name: str) -> str:
    """The array key one of whose path components (unescaped) is ``name``."""
    hits = [k for k in keys if name in (_unescape(c) for c in k.split("/"))]
    if not hits:
        raise KeyError(f"no array key names {name!r}; first keys: {keys[:5]}")
    return min(hits, key=len)


CKPT_DIR = "ckpt"


@register
class Zarrckpt(ZarrPartial):
    """zarrckpt public API: Checkpoint(model=Dict of Variables).write / .read; load_variable."""

    name = "zarrckpt"

    def setup(self) -> None:
        super().setup()
        self.zc = _import("zarrckpt")
        missing = [n for n in ("Checkpoint", "Dict", "Variable") if not hasattr(self.zc, n)]
        if missing:
            raise MethodUnavailable(f"zarrckpt has no public {', '.join(missing)} yet")

    def wrap(self, array: np.ndarray) -> Any:
        # The program's own arrays, saved in place (a Variable copies its initial value
        # by default, which would add the largest array to the peak RSS measured).
        return self.zc.Variable(array, copy=False)

    def assemble(self, items: dict[str, Any]) -> Any:
        return self.zc.Dict(items)

    def save(self, state: Any, path: Path) -> None:
        self.zc.Checkpoint(model=state).write(str(path / CKPT_DIR))

    def allocate(self, specs: list[ArraySpec]) -> Any:
        return self.zc.Dict(
            {s.name: self.zc.Variable(touched_empty(s), copy=False) for s in specs}
        )

    def restore(self, path: Path, specs: list[ArraySpec], live: Any) -> Any:
        self.zc.Checkpoint(model=live).read(str(path / CKPT_DIR)).assert_consumed()
        return live

    def array(self, state: Any, name: str) -> np.ndarray:
        return np.asarray(state[name].numpy())

    def locate(self, path: Path, spec: ArraySpec) -> tuple[str, str]:
        root = path / CKPT_DIR
        return str(root), key_for(zarr_array_keys(root), spec.name)

    def read_part(self, where: tuple[str, str], spec: ArraySpec, rows: Rows) -> np.ndarray:
        """``zc.load_variable``: only the chunks the rows touch, every one CRC-checked."""
        root, key = where
        self._files_read = 0

        def count(nbytes: int) -> None:
            self._files_read += 1  # one call per chunk file read

        options = self.zc.CheckpointOptions(progress=count)
        index = ... if rows is None else slice(rows[0], rows[1])
        return self.zc.load_variable(root, key, index=index, options=options)

    def files_touched(self, where: tuple[str, str], spec: ArraySpec, rows: Rows) -> int:
        return self._files_read  # counted by the read itself, not computed


@register
class ZarrckptBase(Zarrckpt):
    """zarrckpt as another checkout has it, for before/after runs of one harness.

    ``ZARRCKPT_BASE=/tmp/zc-old python3 bench/run.py --methods raw8,zarrckpt-base,zarrckpt``
    with ``git archive <commit> --prefix=zc-old/ | tar -x -C /tmp``. Skipped without it.
    """

    name = "zarrckpt-base"

    def setup(self) -> None:
        import sys

        base = os.environ.get("ZARRCKPT_BASE")
        if not base or not Path(base, "zarrckpt").is_dir():
            raise MethodUnavailable("set ZARRCKPT_BASE to a checkout of another zarrckpt")
        sys.path.insert(0, base)
        super().setup()
        if not self.zc.__file__.startswith(str(Path(base).resolve())):
            raise MethodUnavailable(f"zarrckpt was imported from {self.zc.__file__}, not {base}")


def create(name: str) -> Method:
    return REGISTRY[name]()


class _ZarrckptFsyncPolicy(Zarrckpt):
    """zarrckpt with another local write policy (LocalStorage class attributes), to compare."""

    policy: ClassVar[tuple[tuple[str, object], ...]]  # (LocalStorage attribute, value)

    def setup(self) -> None:
        super().setup()
        from zarrckpt._storage import LocalStorage

        for attribute, value in self.policy:
            if not hasattr(LocalStorage, attribute):
                raise MethodUnavailable(f"this zarrckpt's LocalStorage has no {attribute}")
            setattr(LocalStorage, attribute, value)


@register
class ZarrckptSyncfsOnly(_ZarrckptFsyncPolicy):
    """Every file written first, then one syncfs for all of them (no fsync per file)."""

    name = "zarrckpt-syncfs"
    policy = (("EAGER_FSYNC_BYTES", 1 << 62), ("SYNCFS_FROM", 1))


@register
class ZarrckptDeferred(_ZarrckptFsyncPolicy):
    """Every file written first, then an fsync each, 8 at once (the engine before issue 14)."""

    name = "zarrckpt-deferred"
    policy = (("EAGER_FSYNC_BYTES", 1 << 62), ("SYNCFS_FROM", 1 << 62))


@register
class ZarrckptStartWriteback(_ZarrckptFsyncPolicy):
    """Chunks through the page cache, each one's writeback started as written, then one syncfs."""

    name = "zarrckpt-start"
    policy = (("CHUNK_WRITEBACK", "start"), ("SYNCFS_FROM", 1))


@register
class ZarrckptDirectNoFallocate(_ZarrckptFsyncPolicy):
    """O_DIRECT chunk writes without reserving each file's blocks first (no fallocate)."""

    name = "zarrckpt-nofalloc"
    policy = (("FALLOCATE", False),)
