"""Write tests/data/format1: a small checkpoint in zarrckpt's on-disk format 1.

It was made once with zarrckpt at commit 035825b (the last commit writing format 1):

    git archive 035825b --prefix=zc-v1/ | tar -x -C /tmp
    PYTHONPATH=/tmp/zc-v1 python3 tests/make_format1_fixture.py tests/data/format1

tests/test_format_versions.py restores it with the current code, value for value
(the values are rebuilt by :func:`fixture_values` below), and reads it with zarr
and tensorstore. Never regenerate it with a newer zarrckpt: its point is to be
the files an old version wrote.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_dtypes
import numpy as np


def fixture_values() -> dict[str, np.ndarray[Any, Any]]:
    """The saved values, by name (deterministic)."""
    return {
        "weight": (np.arange(37 * 5, dtype=np.float32).reshape(37, 5) / 7).astype(np.float32),
        "bias": (np.arange(7, dtype=np.float32) - 3).astype(ml_dtypes.bfloat16),
        "step": np.array(1234, np.int64),
        "mask": np.arange(12).reshape(3, 4) % 3 == 0,
        "cube": np.arange(4 * 3 * 2, dtype=np.float16).reshape(4, 3, 2),
        "packed": np.tile(np.arange(8, dtype=np.float32), (16, 1)),
        "empty": np.zeros((0, 3), np.float32),
    }


def main(target: str) -> None:
    import zarrckpt as zc

    values = fixture_values()
    model = zc.Dict({name: zc.Variable(value) for name, value in values.items()})
    options = zc.CheckpointOptions(
        chunk_bytes=64,  # several chunks per array, edge chunks padded
        compression={"model/packed/.ATTRIBUTES/VARIABLE_VALUE": zc.Zstd()},
    )
    zc.Checkpoint(model=model).write(target, options=options, metadata={"step": 1234})


if __name__ == "__main__":
    main(sys.argv[1])
