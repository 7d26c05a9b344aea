"""Fixtures shared by the test modules."""

from __future__ import annotations

import contextlib
import math
import signal
import tracemalloc

import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt._dtypes import dtype_from_name


class Dense(zc.AutoTrackable):
    """A small layer used across tests."""

    def __init__(self, n_in: int, n_out: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.kernel = zc.Variable(rng.standard_normal((n_in, n_out)).astype(np.float32))
        self.bias = zc.Variable(rng.standard_normal(n_out).astype(np.float32))


class Model(zc.AutoTrackable):
    """Two dense layers in a list plus an embedding."""

    def __init__(self, seed: int = 0) -> None:
        self.layers = [Dense(6, 4, seed), Dense(4, 2, seed + 1)]
        self.embedding = zc.Variable(
            np.random.default_rng(seed + 2).standard_normal((10, 6)).astype(np.float32)
        )


class Adam(zc.Optimizer):
    """An optimizer-like object with m and v slots."""

    def step(self, variables: list[zc.Variable], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        for var in variables:
            grad = rng.standard_normal(var.shape).astype(var.dtype)
            m = self.add_slot(var, "m")
            v = self.add_slot(var, "v")
            m.assign(0.9 * m.numpy() + 0.1 * grad)
            v.assign(0.999 * v.numpy() + 0.001 * grad * grad)
            var.assign(var.numpy() - 0.01 * m.numpy() / (np.sqrt(v.numpy()) + 1e-8))


def model_variables(model: Model) -> list[zc.Variable]:
    """Every variable of a Model in a fixed order."""
    return [
        model.embedding,
        *(v for layer in model.layers for v in (layer.kernel, layer.bias)),
    ]


@pytest.fixture
def model() -> Model:
    return Model(seed=0)


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail with TimeoutError instead of hanging (a blocking open of a FIFO, say)."""

    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``zarrckpt ARGV...`` in this process: exit code, stdout, stderr."""
    from zarrckpt.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def traced_peak(action) -> int:
    """Peak bytes Python and numpy allocated while ``action()`` ran (tracemalloc)."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def manifest_entries(storage) -> dict:
    """What a manifest would list for the files under ``storage`` now (key -> ChunkFile).

    For tests that read files written outside a checkpoint (by zarr, say).
    """
    from zarrckpt.array_io import ChunkFile, file_checksum

    entries = {}
    for key, size in storage.sizes().items():
        checksum = file_checksum(key, storage.read(key))
        assert checksum is not None, key
        entries[key] = ChunkFile(key, size, checksum)
    return entries


def reseal_manifest(path, drop=(), **changes) -> None:
    """Rewrite a local checkpoint's ``_COMMIT`` to match its files now, as a forger would.

    Every listed file gets its current size and CRC (a chunk whose own CRC is
    wrong gets its stored trailer, so that only the chunk's own check can
    catch it); keys in ``drop`` are left out; the record hash is recomputed;
    ``changes`` replace Manifest fields. The manifest's own CRC is then right.
    """
    import dataclasses
    import hashlib
    from pathlib import Path

    from zarrckpt._commit import COMMIT_KEY, RECORD_KEY, Manifest
    from zarrckpt.array_io import ChunkFile, file_checksum

    path = Path(path)
    manifest = Manifest.decode((path / COMMIT_KEY).read_bytes(), where=str(path))
    files = []
    for entry in manifest.files:
        if entry.key in drop:
            continue
        data = (path / entry.key).read_bytes()
        checksum = file_checksum(entry.key, data)
        if checksum is None:
            checksum = int.from_bytes(data[-4:], "little")
        files.append(ChunkFile(entry.key, len(data), checksum))
    record = hashlib.sha256((path / RECORD_KEY).read_bytes()).hexdigest()
    resealed = dataclasses.replace(manifest, files=tuple(files), record_sha256=record, **changes)
    (path / COMMIT_KEY).write_bytes(resealed.encode())


def by_key(files) -> dict:
    """write_arrays' result as the ``files`` mapping read_arrays checks against."""
    return {f.key: f for f in files}


def random_array(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values of any supported dtype; float types get random bit patterns (NaNs too)."""
    dtype = dtype_from_name(dtype_name)
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


# Storage backends: local disk, fsspec memory, S3 (moto server) ----------------

S3_KEY = "testing"
S3_SECRET = "testing"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port), for the whole session; yields its URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - the test extra installs moto[server]
        pytest.skip(f"moto.server cannot be imported ({exc}); pip install 'moto[server]'")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    import s3fs

    server.start()
    host, port = server.get_host_and_port()
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield f"http://{host}:{port}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture
def s3_storage_options(s3_server):
    """storage_options reaching the moto server (s3fs takes endpoint_url at top level).

    s3fs keeps one cached instance per options for the session (making its
    client costs ~0.5 s); each test gets a fresh bucket and an empty listing cache.
    """
    import fsspec

    options = {"key": S3_KEY, "secret": S3_SECRET, "endpoint_url": s3_server}
    fs, _ = fsspec.core.url_to_fs("s3://", **options)
    fs.invalidate_cache()
    yield options
    fs.invalidate_cache()


@pytest.fixture
def s3_url(s3_storage_options):
    """``s3://<fresh bucket>`` created for this test and removed after it."""
    import contextlib
    import uuid

    import fsspec

    bucket = f"zc-test-{uuid.uuid4().hex[:20]}"
    fs, _ = fsspec.core.url_to_fs(f"s3://{bucket}", **s3_storage_options)
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    fs.invalidate_cache()
    with contextlib.suppress(FileNotFoundError):  # the test may have emptied it
        fs.rm(bucket, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path):
    """(base URL, storage_options) of an empty namespace on each backend, fresh per test."""
    import uuid

    import fsspec

    if request.param == "local":
        yield str(tmp_path / "ckpts"), None
    elif request.param == "memory":
        prefix = f"/zc-test-{uuid.uuid4().hex}"
        yield f"memory://{prefix}", None
        memory = fsspec.filesystem("memory")
        if memory.exists(prefix):
            memory.rm(prefix, recursive=True)
    else:
        yield request.getfixturevalue("s3_url"), request.getfixturevalue("s3_storage_options")
