"""Fixtures shared by the test modules."""

from __future__ import annotations

import math

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


def random_array(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values of any supported dtype; float types get random bit patterns (NaNs too)."""
    dtype = dtype_from_name(dtype_name)
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)
