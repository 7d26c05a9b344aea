"""The deterministic benchmark model: a transformer-shaped list of arrays.

Every array is generated from ``(seed, index)`` alone, block by block, so the
parent can compute expected digests one array at a time and a child can build
the whole model without a temporary second copy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

MiB = 1 << 20
GiB = 1 << 30

LAYERS = 12
CONTEXT = 2048
LAYER_SHARE = 0.9  # fraction of the budget spent in the per-layer matrices
GEN_BLOCK = 1 << 20  # elements generated per step
WEIGHT_RANGE = 0.05  # values are uniform in [-WEIGHT_RANGE, WEIGHT_RANGE)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6,
          "mib": MiB, "g": 10**9, "gb": 10**9, "gib": GiB}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_size(text: str) -> int:
    """Parse ``256MiB``, ``2GiB``, ``1.5GB`` or a plain byte count."""
    match = _SIZE.fullmatch(text.lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 256MiB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def resolve_dtype(name: str) -> np.dtype[Any]:
    """``float32`` or ``bfloat16`` (via ml_dtypes) as a numpy dtype."""
    if name == "bfloat16":
        import ml_dtypes

        bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
        return bf16
    if name == "float32":
        return np.dtype(np.float32)
    raise ValueError(f"unsupported dtype {name!r}: use float32 or bfloat16")


@dataclass(frozen=True)
class ArraySpec:
    """One saved value: its name, shape, dtype name and generator index."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * resolve_dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "shape": list(self.shape),
                "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArraySpec:
        return cls(data["index"], data["name"], tuple(data["shape"]), data["dtype"])


def _layer_shapes(layer: int, d: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"layers.{layer}."
    return [
        (p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
        (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
        (p + "attn.out.weight", (d, d)), (p + "attn.out.bias", (d,)),
        (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
        (p + "mlp.fc.weight", (4 * d, d)), (p + "mlp.fc.bias", (4 * d,)),
        (p + "mlp.proj.weight", (d, 4 * d)), (p + "mlp.proj.bias", (d,)),
    ]


def transformer_specs(total_bytes: int, dtype: str, layers: int = LAYERS) -> list[ArraySpec]:
    """About ``total_bytes`` of arrays shaped like a GPT-style transformer.

    The width is the multiple of 64 that puts ~90% of the budget in the layers;
    the token embedding's vocabulary fills the rest.
    """
    elements = total_bytes // resolve_dtype(dtype).itemsize
    d = max(64, int(math.sqrt(LAYER_SHARE * elements / (12 * layers))) // 64 * 64)
    shapes = [shape for i in range(layers) for shape in _layer_shapes(i, d)]
    tail = [("embed.positions.weight", (CONTEXT, d)),
            ("final_norm.weight", (d,)), ("final_norm.bias", (d,))]
    used = sum(math.prod(s) for _, s in shapes + tail)
    vocab = max(64, (elements - used) // d)
    named = [("embed.tokens.weight", (vocab, d)), *tail[:1], *shapes, *tail[1:]]
    return [ArraySpec(i, name, shape, dtype) for i, (name, shape) in enumerate(named)]


def fill(out: np.ndarray, seed: int, index: int) -> None:
    """Fill ``out`` with the deterministic values of array ``index``."""
    flat = out.reshape(-1)
    rng = np.random.default_rng([seed, index])
    for start in range(0, flat.size, GEN_BLOCK):
        block = rng.random(min(GEN_BLOCK, flat.size - start), dtype=np.float32)
        block -= 0.5
        block *= 2 * WEIGHT_RANGE
        flat[start : start + block.size] = block


def generate(spec: ArraySpec, seed: int) -> np.ndarray:
    out = np.empty(spec.shape, resolve_dtype(spec.dtype))
    fill(out, seed, spec.index)
    return out


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy (works for bfloat16 too)."""
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    return memoryview(array.reshape(-1).view(np.uint8).data)


def digest(array: np.ndarray) -> str:
    """Cheap content digest: CRC32C of the bytes plus shape and dtype."""
    import crc32c

    data = byte_view(np.ascontiguousarray(array))
    return f"{crc32c.crc32c(data):08x}:{array.dtype.name}:{'x'.join(map(str, array.shape))}"


def row_slice(spec: ArraySpec) -> tuple[int, int]:
    """The 1/16 of the rows (starting mid-array) used for the partial-read test."""
    rows = spec.shape[0]
    start = rows // 2
    return start, min(rows, start + max(1, rows // 16))
