"""Optimizer slot variables: creation, keys, restore across paths and deferred restore."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import zarrckpt as zc
from tests.conftest import Adam, Model, model_variables
from zarrckpt.errors import DependencyNameError, MatchError, ShapeMismatchError


def read_record(path: str | os.PathLike[str]) -> zc.ObjectGraph:
    return zc.ObjectGraph.decode((Path(path) / "object_graph.msgpack").read_bytes())


def saved_keys(path: str | os.PathLike[str]) -> list[str]:
    return [attribute.key for _, attribute in read_record(path).attributes()]


class Net(zc.AutoTrackable):
    def __init__(self, w: object, b: object) -> None:
        self.w = zc.Variable(np.asarray(w, np.float32))
        self.b = zc.Variable(np.asarray(b, np.float32))


def slot_key(opt_path: str, slot: str, var: str = "model/w") -> str:
    return f"{var}/.OPTIMIZER_SLOT/{opt_path}/{slot}/.ATTRIBUTES/VARIABLE_VALUE"


def trained() -> tuple[Net, zc.Optimizer]:
    """A net and an optimizer whose m / v slots hold distinct known values."""
    net = Net([[1.0, 2.0], [3.0, 4.0]], [5.0, 6.0])
    opt = zc.Optimizer()
    opt.add_slot(net.w, "m", np.array([[0.1, 0.2], [0.3, 0.4]], np.float32))
    opt.add_slot(net.w, "v", np.array([[1.1, 1.2], [1.3, 1.4]], np.float32))
    opt.add_slot(net.b, "m", np.array([0.5, 0.6], np.float32))
    opt.add_slot(net.b, "v", np.array([1.5, 1.6], np.float32))
    return net, opt


W_M = np.array([[0.1, 0.2], [0.3, 0.4]], np.float32)
W_V = np.array([[1.1, 1.2], [1.3, 1.4]], np.float32)
B_M = np.array([0.5, 0.6], np.float32)
B_V = np.array([1.5, 1.6], np.float32)


def fresh_net() -> Net:
    return Net(np.zeros((2, 2)), np.zeros(2))


# Creating slots -----------------------------------------------------------------------------


def test_add_slot_defaults_to_zeros_like_the_variable() -> None:
    var = zc.Variable(np.arange(6, dtype=np.float16).reshape(2, 3))
    opt = zc.Optimizer()
    slot = opt.add_slot(var, "m")
    assert isinstance(slot, zc.Variable)
    assert slot.shape == (2, 3)
    assert slot.dtype == np.float16
    np.testing.assert_array_equal(slot.numpy(), np.zeros((2, 3), np.float16))
    assert not np.shares_memory(slot.numpy(), var.numpy())


def test_add_slot_initial_value_array_and_callable() -> None:
    var = zc.Variable(np.zeros(3, np.float32))
    opt = zc.Optimizer()
    a = opt.add_slot(var, "a", np.array([1.0, 2.0, 3.0], np.float32))
    b = opt.add_slot(var, "b", lambda: np.full(3, 7.0, np.float32))
    np.testing.assert_array_equal(a.numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(b.numpy(), [7.0, 7.0, 7.0])


def test_add_slot_is_idempotent_and_get_slot_returns_it() -> None:
    var = zc.Variable(np.zeros(2, np.float32))
    opt = zc.Optimizer()
    slot = opt.add_slot(var, "m", np.array([1.0, 2.0], np.float32))
    again = opt.add_slot(var, "m", np.array([9.0, 9.0], np.float32))
    assert again is slot
    np.testing.assert_array_equal(slot.numpy(), [1.0, 2.0])
    assert opt.get_slot(var, "m") is slot


def test_slots_are_per_variable() -> None:
    a = zc.Variable(np.zeros(2, np.float32))
    b = zc.Variable(np.zeros(2, np.float32))
    opt = zc.Optimizer()
    slot_a = opt.add_slot(a, "m")
    slot_b = opt.add_slot(b, "m")
    assert slot_a is not slot_b
    assert opt.get_slot(a, "m") is slot_a
    assert opt.get_slot(b, "m") is slot_b


def test_get_slot_missing_raises_key_error() -> None:
    var = zc.Variable(np.zeros(2, np.float32))
    other = zc.Variable(np.zeros(2, np.float32))
    opt = zc.Optimizer()
    opt.add_slot(var, "m")
    with pytest.raises(KeyError):
        opt.get_slot(var, "v")
    with pytest.raises(KeyError):
        opt.get_slot(other, "m")


def test_get_slot_names_sorted() -> None:
    var = zc.Variable(np.zeros(2, np.float32))
    opt = zc.Optimizer()
    assert opt.get_slot_names() == []
    opt.add_slot(var, "v")
    opt.add_slot(var, "m")
    opt.add_slot(var, "accumulator")
    assert opt.get_slot_names() == ["accumulator", "m", "v"]


def test_add_slot_argument_validation() -> None:
    opt = zc.Optimizer()
    var = zc.Variable(np.zeros(2, np.float32))
    with pytest.raises(DependencyNameError):
        opt.add_slot(var, "")
    with pytest.raises(DependencyNameError):
        opt.add_slot(var, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        opt.add_slot(zc.AutoTrackable(), "m")
    assert opt.get_slot_names() == []


def test_slots_are_not_named_dependencies_of_the_optimizer() -> None:
    _net, opt = trained()
    assert opt._checkpoint_dependencies() == []


# Saving slots -------------------------------------------------------------------------------


def test_slot_keys_follow_optimizer_slot_layout(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    assert sorted(saved_keys(path)) == sorted(
        [
            "model/w/.ATTRIBUTES/VARIABLE_VALUE",
            "model/b/.ATTRIBUTES/VARIABLE_VALUE",
            slot_key("optimizer", "m"),
            slot_key("optimizer", "v"),
            slot_key("optimizer", "m", "model/b"),
            slot_key("optimizer", "v", "model/b"),
        ]
    )


def test_slot_record_references_variable_and_optimizer(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    graph = read_record(path)
    paths = graph.paths()
    node_of = {p: n for n, p in paths.items()}
    optimizer_node = graph.nodes[node_of["optimizer"]]
    refs = {
        (paths[r.original_variable_node_id], r.slot_name): r.slot_variable_node_id
        for r in optimizer_node.slot_variables
    }
    assert sorted(refs) == [("model/b", "m"), ("model/b", "v"), ("model/w", "m"), ("model/w", "v")]
    slot_node = graph.nodes[refs[("model/w", "m")]]
    assert [a.key for a in slot_node.attributes] == [slot_key("optimizer", "m")]
    assert slot_node.attributes[0].shape == (2, 2)
    assert slot_node.attributes[0].dtype == "float32"


def test_slot_key_uses_shortest_optimizer_and_variable_paths(tmp_path: Path) -> None:
    net, opt = trained()
    holder = zc.AutoTrackable()
    holder.deep = zc.AutoTrackable()
    holder.deep.opt = opt
    net.opt = opt  # also reachable as model/opt: both longer than "optimizer"
    path = zc.Checkpoint(model=net, optimizer=opt, holder=holder).write(tmp_path / "c")
    keys = saved_keys(path)
    assert slot_key("optimizer", "m") in keys
    assert sum(".OPTIMIZER_SLOT" in key for key in keys) == 4


def test_slot_of_variable_reached_twice_is_saved_once(tmp_path: Path) -> None:
    net, opt = trained()
    alias = zc.AutoTrackable()
    alias.same_w = net.w
    path = zc.Checkpoint(model=net, alias=alias, optimizer=opt).write(tmp_path / "c")
    keys = saved_keys(path)
    assert (
        sum(
            ".OPTIMIZER_SLOT" in key and key.endswith("/m/.ATTRIBUTES/VARIABLE_VALUE")
            for key in keys
        )
        == 2
    )
    assert slot_key("optimizer", "m") in keys
    assert len(keys) == len(set(keys))


def test_two_optimizers_save_distinct_slots(tmp_path: Path) -> None:
    net = Net([1.0, 2.0], [3.0])
    first, second = zc.Optimizer(), zc.Optimizer()
    first.add_slot(net.w, "m", np.array([1.0, 1.0], np.float32))
    second.add_slot(net.w, "m", np.array([2.0, 2.0], np.float32))
    path = zc.Checkpoint(model=net, a=first, b=second).write(tmp_path / "c")
    keys = saved_keys(path)
    assert slot_key("a", "m") in keys
    assert slot_key("b", "m") in keys
    net2 = Net([0.0, 0.0], [0.0])
    first2, second2 = zc.Optimizer(), zc.Optimizer()
    m1 = first2.add_slot(net2.w, "m")
    m2 = second2.add_slot(net2.w, "m")
    zc.Checkpoint(model=net2, a=first2, b=second2).read(path).assert_consumed()
    np.testing.assert_array_equal(m1.numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(m2.numpy(), [2.0, 2.0])


def test_slots_of_unreachable_variables_are_not_saved(tmp_path: Path) -> None:
    net, opt = trained()
    orphan = zc.Variable(np.ones(4, np.float32))
    orphan_slot = opt.add_slot(orphan, "m")
    objects = zc.list_objects(zc.Checkpoint(model=net, optimizer=opt))
    assert all(obj is not orphan_slot and obj is not orphan for obj in objects)
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    keys = saved_keys(path)
    assert sum(".OPTIMIZER_SLOT" in key for key in keys) == 4
    graph = read_record(path)
    assert all(a.shape != (4,) for _, a in graph.attributes())
    # With the optimizer alone, no variable is reachable, so no slot is saved.
    only_opt = zc.Checkpoint(optimizer=opt).write(tmp_path / "only")
    assert saved_keys(only_opt) == []


def test_list_objects_includes_slots_of_reachable_variables() -> None:
    net, opt = trained()
    root = zc.Checkpoint(model=net, optimizer=opt)
    objects = zc.list_objects(root)
    slots = [opt.get_slot(v, s) for v in (net.w, net.b) for s in ("m", "v")]
    for slot in slots:
        assert sum(obj is slot for obj in objects) == 1
    # Slots come after every object of the breadth-first pass.
    first_slot = min(i for i, obj in enumerate(objects) if any(obj is s for s in slots))
    assert first_slot == len(objects) - 4


# Restoring slots ----------------------------------------------------------------------------


def test_slots_round_trip(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2, opt2 = fresh_net(), zc.Optimizer()
    w_m = opt2.add_slot(net2.w, "m")
    w_v = opt2.add_slot(net2.w, "v")
    b_m = opt2.add_slot(net2.b, "m")
    b_v = opt2.add_slot(net2.b, "v")
    buffers = [s.numpy() for s in (w_m, w_v, b_m, b_v)]
    zc.Checkpoint(model=net2, optimizer=opt2).read(path).assert_consumed()
    for buffer, slot, expected in zip(
        buffers, (w_m, w_v, b_m, b_v), (W_M, W_V, B_M, B_V), strict=True
    ):
        assert slot.numpy() is buffer
        np.testing.assert_array_equal(buffer, expected)


def test_slots_restore_when_optimizer_is_reached_by_two_paths(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2, opt2 = fresh_net(), zc.Optimizer()
    net2.opt = opt2  # reachable as model/opt and as optimizer
    w_m = opt2.add_slot(net2.w, "m")
    b_v = opt2.add_slot(net2.b, "v")
    status = zc.Checkpoint(model=net2, optimizer=opt2).read(path)
    np.testing.assert_array_equal(w_m.numpy(), W_M)
    np.testing.assert_array_equal(b_v.numpy(), B_V)
    np.testing.assert_array_equal(net2.w.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    # The slots not created yet arrive when created.
    w_v = opt2.add_slot(net2.w, "v")
    b_m = opt2.add_slot(net2.b, "m")
    np.testing.assert_array_equal(w_v.numpy(), W_V)
    np.testing.assert_array_equal(b_m.numpy(), B_M)
    status.assert_consumed()


def test_slots_restore_when_saved_optimizer_was_reached_by_two_paths(tmp_path: Path) -> None:
    net, opt = trained()
    net.opt = opt
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    assert slot_key("optimizer", "m") in saved_keys(path)
    net2, opt2 = fresh_net(), zc.Optimizer()
    net2.opt = opt2
    zc.Checkpoint(model=net2, optimizer=opt2).read(path).expect_partial()
    np.testing.assert_array_equal(opt2.add_slot(net2.w, "m").numpy(), W_M)
    np.testing.assert_array_equal(opt2.add_slot(net2.b, "v").numpy(), B_V)


def test_slots_restore_when_optimizer_only_reachable_through_model(tmp_path: Path) -> None:
    net, opt = trained()
    net.opt = opt
    path = zc.Checkpoint(model=net).write(tmp_path / "c")
    assert slot_key("model/opt", "m") in saved_keys(path)
    net2, opt2 = fresh_net(), zc.Optimizer()
    w_m = opt2.add_slot(net2.w, "m")
    net2.opt = opt2
    zc.Checkpoint(model=net2).read(path).expect_partial()
    np.testing.assert_array_equal(w_m.numpy(), W_M)
    np.testing.assert_array_equal(opt2.add_slot(net2.b, "v").numpy(), B_V)


def test_slot_created_after_restore_gets_saved_value(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2, opt2 = fresh_net(), zc.Optimizer()
    zc.Checkpoint(model=net2, optimizer=opt2).read(path).expect_partial()
    slot = opt2.add_slot(net2.w, "m", np.full((2, 2), 99.0, np.float32))
    np.testing.assert_array_equal(slot.numpy(), W_M)
    assert opt2.get_slot(net2.w, "m") is slot


def test_optimizer_attached_after_restore_then_add_slot(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2 = fresh_net()
    ckpt = zc.Checkpoint(model=net2)
    status = ckpt.read(path)
    opt2 = zc.Optimizer()
    ckpt.optimizer = opt2
    w_m = opt2.add_slot(net2.w, "m")
    np.testing.assert_array_equal(w_m.numpy(), W_M)
    for var, name, expected in ((net2.w, "v", W_V), (net2.b, "m", B_M), (net2.b, "v", B_V)):
        np.testing.assert_array_equal(opt2.add_slot(var, name).numpy(), expected)
    status.assert_consumed()


def test_optimizer_attached_after_restore_with_existing_slots(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2 = fresh_net()
    ckpt = zc.Checkpoint(model=net2)
    ckpt.read(path).expect_partial()
    opt2 = zc.Optimizer()
    w_m = opt2.add_slot(net2.w, "m")
    np.testing.assert_array_equal(w_m.numpy(), np.zeros((2, 2), np.float32))
    ckpt.optimizer = opt2
    np.testing.assert_array_equal(w_m.numpy(), W_M)


def test_variable_attached_after_restore_restores_its_slots(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2 = zc.AutoTrackable()
    opt2 = zc.Optimizer()
    status = zc.Checkpoint(model=net2, optimizer=opt2).read(path)
    w = zc.Variable(np.zeros((2, 2), np.float32))
    w_m = opt2.add_slot(w, "m")  # slot exists before its variable is attached
    net2.w = w
    np.testing.assert_array_equal(w.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(w_m.numpy(), W_M)
    np.testing.assert_array_equal(opt2.add_slot(w, "v").numpy(), W_V)
    net2.b = zc.Variable(np.zeros(2, np.float32))
    np.testing.assert_array_equal(opt2.add_slot(net2.b, "m").numpy(), B_M)
    np.testing.assert_array_equal(opt2.add_slot(net2.b, "v").numpy(), B_V)
    status.assert_consumed()


def test_assert_consumed_fails_until_every_slot_is_created(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2, opt2 = fresh_net(), zc.Optimizer()
    status = zc.Checkpoint(model=net2, optimizer=opt2).read(path)
    pending = [(net2.w, "m"), (net2.w, "v"), (net2.b, "m"), (net2.b, "v")]
    for var, name in pending:
        with pytest.raises(MatchError):
            status.assert_consumed()
        opt2.add_slot(var, name)
    assert status.assert_consumed() is status
    assert status.assert_existing_objects_matched() is status


def test_deferred_slot_shape_mismatch_raises_at_add_slot(tmp_path: Path) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2, opt2 = fresh_net(), zc.Optimizer()
    zc.Checkpoint(model=net2, optimizer=opt2).read(path).expect_partial()
    with pytest.raises(ShapeMismatchError):
        opt2.add_slot(net2.w, "m", np.zeros(3, np.float32))
    with pytest.raises(KeyError):
        opt2.get_slot(net2.w, "m")
    assert opt2.get_slot_names() == []
    slot = opt2.add_slot(net2.w, "m")
    np.testing.assert_array_equal(slot.numpy(), W_M)


def test_awkward_slot_names_round_trip(tmp_path: Path) -> None:
    net = Net([1.0], [2.0])
    opt = zc.Optimizer()
    names = ["a/b", "..", "x y", "__m", ".ATTRIBUTES"]
    for i, name in enumerate(names):
        opt.add_slot(net.w, name, np.array([float(i)], np.float32))
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    for key in saved_keys(path):
        parts = key.split("/")
        assert all(p not in ("", ".", "..") for p in parts)
        assert parts.count(".ATTRIBUTES") == 1
    net2, opt2 = Net([0.0], [0.0]), zc.Optimizer()
    zc.Checkpoint(model=net2, optimizer=opt2).read(path)
    for i, name in reversed(list(enumerate(names))):
        np.testing.assert_array_equal(opt2.add_slot(net2.w, name).numpy(), [float(i)])


def test_adam_training_resumes_bit_exactly(tmp_path: Path) -> None:
    model, adam = Model(seed=0), Adam()
    for step in range(3):
        adam.step(model_variables(model), seed=step)
    path = zc.Checkpoint(model=model, optimizer=adam).write(tmp_path / "c")
    restored_model, restored_adam = Model(seed=5), Adam()
    status = zc.Checkpoint(model=restored_model, optimizer=restored_adam).read(path)
    # Slots are created by the first step after the restore (deferred).
    adam.step(model_variables(model), seed=3)
    restored_adam.step(model_variables(restored_model), seed=3)
    status.assert_consumed()
    for a, b in zip(model_variables(model), model_variables(restored_model), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        for slot in ("m", "v"):
            np.testing.assert_array_equal(
                adam.get_slot(a, slot).numpy(), restored_adam.get_slot(b, slot).numpy()
            )


@pytest.mark.parametrize("optimizer_first", [True, False])
def test_slots_restore_whatever_the_dependency_order(tmp_path: Path, optimizer_first: bool) -> None:
    net, opt = trained()
    path = zc.Checkpoint(model=net, optimizer=opt).write(tmp_path / "c")
    net2, opt2 = fresh_net(), zc.Optimizer()
    w_m = opt2.add_slot(net2.w, "m")
    ckpt = (
        zc.Checkpoint(optimizer=opt2, model=net2)
        if optimizer_first
        else zc.Checkpoint(model=net2, optimizer=opt2)
    )
    status = ckpt.read(path)
    np.testing.assert_array_equal(w_m.numpy(), W_M)
    np.testing.assert_array_equal(opt2.add_slot(net2.b, "v").numpy(), B_V)
    np.testing.assert_array_equal(opt2.add_slot(net2.b, "m").numpy(), B_M)
    np.testing.assert_array_equal(opt2.add_slot(net2.w, "v").numpy(), W_V)
    status.assert_consumed()
