"""Inspection without live objects: metadata, variables, partial loads, DOT, partial restore."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Adam, Model, model_variables
from zarrckpt._commit import open_committed
from zarrckpt.errors import CheckpointNotFoundError, VariableNotFoundError

KEY = "model/embedding/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.fixture
def saved(backend):
    """A checkpoint of a model and its optimizer on each backend, small chunks."""
    base, storage_options = backend
    model, optimizer = Model(seed=0), Adam()
    optimizer.step(model_variables(model))
    model.table = zc.Variable(np.arange(300 * 7, dtype=np.float64).reshape(300, 7))
    path = zc.Checkpoint(model=model, optimizer=optimizer).write(
        f"{base}/c",
        options=zc.CheckpointOptions(chunk_bytes=7 * 8 * 16),  # 16 rows per chunk
        storage_options=storage_options,
    )
    return path, storage_options, model, optimizer


def test_object_metadata_describes_the_graph(saved):
    path, so, model, _ = saved
    graph = zc.object_metadata(path, so)
    assert isinstance(graph, zc.CheckpointableObjectGraph)
    root = graph.nodes[0]
    assert [c.name for c in root.children] == ["model", "optimizer"]
    paths = graph.paths()
    by_path = {p: graph.nodes[n] for n, p in paths.items()}
    table = by_path["model/table"].attributes[0]
    assert (table.key, table.shape, table.dtype, table.nbytes) == (
        "model/table/.ATTRIBUTES/VARIABLE_VALUE",
        (300, 7),
        "float64",
        300 * 7 * 8,
    )
    optimizer_node = by_path["optimizer"]
    assert sorted({s.slot_name for s in optimizer_node.slot_variables}) == ["m", "v"]
    assert len(optimizer_node.slot_variables) == 2 * len(model_variables(model))
    text = repr(graph)
    assert "model/table" in text and "float64[300, 7]" in text and "slot 'm'" in text


def test_list_variables_is_sorted_and_complete(saved):
    path, so, _, _ = saved
    variables = zc.list_variables(path, so)
    keys = [k for k, _, _ in variables]
    assert keys == sorted(keys)
    assert len(keys) == 3 * 5 + 1  # 5 variables + 2 slots each, + the table
    assert (KEY, (10, 6), "float32") in variables


@pytest.mark.parametrize(
    "index",
    [..., 0, -1, slice(3, 250, 9), (slice(None, None, -5), 2), (..., slice(6, 1, -2)),
     slice(17, 18), (slice(299, None), ...), slice(40, 40)],
)  # fmt: skip
def test_load_variable_matches_numpy_indexing(saved, index):
    path, so, model, _ = saved
    expected = model.table.numpy()[index]
    got = zc.load_variable(path, "model/table", index=index, storage_options=so)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_load_variable_reads_only_the_chunks_it_touches(saved):
    path, so, model, _ = saved
    checkpoint = open_committed(path, so)
    storage = checkpoint.storage
    key = "model/table/.ATTRIBUTES/VARIABLE_VALUE"
    # Remove every chunk but the one holding rows 32..47: a slice inside it
    # still loads, anything else is a missing-chunk error.
    fs, root = fsspec.core.url_to_fs(storage.url, **(so or {}))
    for row_chunk in range(19):
        if row_chunk != 2:
            fs.rm_file(f"{root}/{key}/c.{row_chunk}.0")
    np.testing.assert_array_equal(
        zc.load_variable(path, "model/table", index=slice(33, 47), storage_options=so),
        model.table.numpy()[33:47],
    )
    with pytest.raises(zc.errors.MissingChunkError, match=r"chunk \(3, 0\)"):
        zc.load_variable(path, "model/table", index=slice(33, 49), storage_options=so)


def test_open_variable_is_lazy_and_slices(saved):
    path, so, model, _ = saved
    table = zc.open_variable(path, "model/table/.ATTRIBUTES/VARIABLE_VALUE", storage_options=so)
    assert (table.shape, table.dtype, table.ndim, len(table)) == ((300, 7), np.float64, 2, 300)
    assert table.chunk_shape == (16, 7) and table.nbytes == 300 * 7 * 8
    np.testing.assert_array_equal(table[5:9, 1], model.table.numpy()[5:9, 1])
    np.testing.assert_array_equal(np.asarray(table), model.table.numpy())
    assert "model/table" in repr(table)


def test_slot_variables_load_by_key(saved):
    path, so, model, optimizer = saved
    key = "model/layers/0/kernel/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE"
    np.testing.assert_array_equal(
        zc.load_variable(path, key, storage_options=so),
        optimizer.get_slot(model.layers[0].kernel, "m").numpy(),
    )


def test_unknown_key_and_path_errors(saved, tmp_path):
    path, so, _, _ = saved
    with pytest.raises(VariableNotFoundError, match="no saved value 'model/nope'") as info:
        zc.load_variable(path, "model/nope", storage_options=so)
    assert isinstance(info.value, KeyError)
    with pytest.raises(CheckpointNotFoundError):
        zc.list_variables(tmp_path / "nothing")
    with pytest.raises(IndexError, match="out of bounds"):
        zc.load_variable(path, "model/table", index=300, storage_options=so)
    with pytest.raises(IndexError, match="too many indices"):
        zc.load_variable(path, "model/table", index=(1, 2, 3), storage_options=so)
    with pytest.raises(IndexError, match=r"type ndarray on axis 0.*no boolean"):
        zc.load_variable(path, "model/table", index=np.ones(3, bool), storage_options=so)
    with pytest.raises(zc.errors.InvalidArgumentError, match="a key is a string"):
        zc.load_variable(path, 3, storage_options=so)  # type: ignore[arg-type]


def test_load_variable_always_returns_an_array(tmp_path):
    model = zc.AutoTrackable()
    model.step = zc.Variable(np.int64(42))
    model.row = zc.Variable(np.arange(4.0))
    path = zc.Checkpoint(model=model).write(tmp_path / "c")
    step = zc.load_variable(path, "model/step")
    assert isinstance(step, np.ndarray) and step.shape == () and step == 42
    one = zc.load_variable(path, "model/row", index=2)
    assert isinstance(one, np.ndarray) and one.shape == () and one == 2.0


def test_dot_graph(saved):
    path, so, _, _ = saved
    text = zc.dot_graph_from_checkpoint(path, so)
    assert text.startswith("digraph {") and text.rstrip().endswith("}")
    assert '[label="model"]' in text and '[label="optimizer"]' in text
    assert text.count('style="dashed"') == 2 * 2 * 5  # variable->slot and optimizer->slot


def test_partial_restore_of_part_of_the_model(saved):
    path, so, model, _ = saved
    part = zc.AutoTrackable()
    part.layers = [Model(seed=5).layers[0]]  # only the first layer is built
    status = zc.Checkpoint(model=part).restore(path, storage_options=so).expect_partial()
    status.assert_existing_objects_matched().assert_nontrivial_match()
    np.testing.assert_array_equal(part.layers[0].kernel.numpy(), model.layers[0].kernel.numpy())
    with pytest.raises(zc.errors.MatchError):
        status.assert_consumed()


def test_rows_of_whole_chunks_are_read_straight_into_the_result(tmp_path):
    import tracemalloc

    values = np.random.default_rng(3).standard_normal((1024, 1024)).astype(np.float32)
    model = zc.AutoTrackable()
    model.table = zc.Variable(values)
    path = zc.Checkpoint(model=model).write(
        tmp_path / "c",
        options=zc.CheckpointOptions(chunk_bytes=256 << 10),  # 64-row chunks
    )
    key = "model/table"
    for index, chunk_sized_buffers in [(slice(64, 640), 0), (np.s_[...], 0), (slice(60, 644), 2)]:
        tracemalloc.start()
        try:
            got = zc.load_variable(path, key, index=index)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(got, values[index])
        # The result, plus one 256 KiB buffer per chunk only partly selected.
        assert peak < got.nbytes + chunk_sized_buffers * (256 << 10) + (96 << 10), (index, peak)
