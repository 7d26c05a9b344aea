"""Property: any tree of trackables saves and restores bit-exactly into a fresh twin."""

from __future__ import annotations

import math
import tempfile
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import zarrckpt as zc
from zarrckpt._dtypes import SUPPORTED_DTYPE_NAMES, dtype_from_name

# A tree spec is one of:
#   ("var", dtype_name, shape)
#   ("auto", [(attribute_name, spec), ...])
#   ("list", [spec, ...])
#   ("dict", [(key, spec), ...])

# Short enough that any name escapes within the 200-byte component limit.
names = st.text(max_size=12)
# AutoTrackable attribute names: anything but Python's and zarrckpt's reserved ones.
attribute_names = names.filter(lambda n: not n.startswith(("__", "_zc_")))
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)
variables = st.tuples(st.just("var"), st.sampled_from(SUPPORTED_DTYPE_NAMES), shapes)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.tuples(
            st.just("auto"),
            st.lists(st.tuples(attribute_names, children), max_size=4, unique_by=lambda c: c[0]),
        ),
        st.tuples(st.just("list"), st.lists(children, max_size=4)),
        st.tuples(
            st.just("dict"),
            st.lists(st.tuples(names, children), max_size=4, unique_by=lambda c: c[0]),
        ),
    )


trees = st.recursive(variables, _containers, max_leaves=12)


def _values(dtype_name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = dtype_from_name(dtype_name)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    raw = rng.integers(0, 256, size=math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)  # random bit patterns: NaNs, infinities, -0


def build(spec: Any, rng: np.random.Generator, variables_out: list[zc.Variable]) -> Any:
    """Build the objects ``spec`` describes; collect its Variables in a fixed order."""
    kind = spec[0]
    if kind == "var":
        variable = zc.Variable(_values(spec[1], spec[2], rng))
        variables_out.append(variable)
        return variable
    if kind == "auto":
        obj = zc.AutoTrackable()
        for name, child in spec[1]:
            setattr(obj, name, build(child, rng, variables_out))
        return obj
    if kind == "list":
        return zc.List([build(child, rng, variables_out) for child in spec[1]])
    assert kind == "dict"
    return zc.Dict({key: build(child, rng, variables_out) for key, child in spec[1]})


def _bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()


@settings(max_examples=40)
@given(tree=trees, seed=st.integers(0, 2**32 - 1))
def test_any_tree_round_trips_bit_exactly(tree, seed):
    saved_variables: list[zc.Variable] = []
    saved = build(tree, np.random.default_rng(seed), saved_variables)
    expected = [_bytes(v.numpy()) for v in saved_variables]

    fresh_variables: list[zc.Variable] = []
    fresh = build(tree, np.random.default_rng(seed + 1), fresh_variables)
    buffers = [v.numpy() for v in fresh_variables]

    with tempfile.TemporaryDirectory() as directory:
        path = zc.Checkpoint(root=saved).write(f"{directory}/ckpt")
        # Saving does not change the saved values.
        assert [_bytes(v.numpy()) for v in saved_variables] == expected
        status = zc.Checkpoint(root=fresh).restore(path)
        status.assert_consumed()
        status.assert_existing_objects_matched()

    assert len(fresh_variables) == len(saved_variables)
    for restored, original, buffer, value in zip(
        fresh_variables, saved_variables, buffers, expected, strict=True
    ):
        assert restored.numpy() is buffer  # restored into the live memory
        assert restored.shape == original.shape and restored.dtype == original.dtype
        assert _bytes(restored.numpy()) == value
