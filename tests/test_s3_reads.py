"""Reads from an object store are bounded by what the manifest lists."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

import zarrckpt as zc
from zarrckpt._commit import open_committed
from zarrckpt.errors import CorruptCheckpointError


def test_a_grown_chunk_object_is_refused_without_reading_it_all(
    s3_url, s3_storage_options, monkeypatch
):
    """A chunk replaced by a much larger object costs one ranged GET, not its size."""
    so = s3_storage_options
    weights = np.arange(1 << 16, dtype=np.float32)  # 256 KiB, one chunk
    path = zc.Checkpoint(w=zc.Variable(weights)).write(f"{s3_url}/grown", storage_options=so)
    data = open_committed(path, so).storage
    chunk = next(key for key in data.sizes() if key.startswith("w/") and "/c" in key)
    fs, _ = fsspec.core.url_to_fs(s3_url, **so)
    grown = 32 << 20
    fs.pipe_file(f"{data.url}/{chunk}", b"\0" * grown)

    received: list[int] = []
    real_cat_file = fs.cat_file  # fsspec shares one instance per set of options

    def counting_cat_file(path, *args, **kwargs):  # the real GET, its size noted
        data = real_cat_file(path, *args, **kwargs)
        received.append(len(data))
        return data

    monkeypatch.setattr(fs, "cat_file", counting_cat_file)
    target = zc.Variable(np.zeros_like(weights))
    with pytest.raises(CorruptCheckpointError) as raised:
        zc.Checkpoint(w=target).restore(path, storage_options=so)
    expected = weights.nbytes + 4  # the chunk and its CRC32C trailer
    assert f"{chunk}: file has more than {expected} bytes" in str(raised.value)
    assert received and max(received) <= expected + 1  # never the 32 MiB object


@pytest.mark.parametrize("cut", [1, 1000])
def test_a_shortened_chunk_object_is_refused(s3_url, s3_storage_options, cut):
    so = s3_storage_options
    weights = np.arange(1 << 12, dtype=np.float32)
    path = zc.Checkpoint(w=zc.Variable(weights)).write(f"{s3_url}/short{cut}", storage_options=so)
    data = open_committed(path, so).storage
    sizes = data.sizes()
    chunk = next(key for key in sizes if key.startswith("w/") and "/c" in key)
    fs, _ = fsspec.core.url_to_fs(s3_url, **so)
    fs.pipe_file(f"{data.url}/{chunk}", b"\0" * (sizes[chunk] - cut))
    with pytest.raises(CorruptCheckpointError, match=f"{sizes[chunk] - cut} bytes, expected"):
        zc.Checkpoint(w=zc.Variable(np.zeros_like(weights))).restore(path, storage_options=so)
