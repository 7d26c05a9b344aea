"""The PyTorch adapter in one process: ModuleState and OptimizerState (zarrckpt/torch.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
import zarr

import zarrckpt as zc
from zarrckpt.errors import (
    DTypeMismatchError,
    InvalidArgumentError,
    MatchError,
    ShapeMismatchError,
    UnsupportedValueError,
)

torch = pytest.importorskip("torch")
zt = pytest.importorskip("zarrckpt.torch")


class Net(torch.nn.Module):
    """Linear, BatchNorm (buffers, num_batches_tracked) and a bfloat16 Linear."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden)
        self.fc2 = torch.nn.Linear(hidden, 4).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.fc1(x)))
        return self.fc2(h.to(torch.bfloat16)).float()


def make(seed: int = 0, hidden: int = 16) -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Net(hidden)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model: Net, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def bits(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as unsigned integers: comparisons are bit for bit."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().copy()


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(bits(a[k]), bits(b[k])) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        for k in a
    )


def checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> zc.Checkpoint:
    return zc.Checkpoint(model=zt.ModuleState(model), optim=zt.OptimizerState(optimizer, model))


@pytest.fixture
def trained(tmp_path):
    """A model and AdamW after 3 steps, saved; and what 3 more steps give."""
    model, optimizer = make()
    train(model, optimizer, range(3))
    path = checkpoint(model, optimizer).write(tmp_path / "ckpt")
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optim = optimizer.state_dict()
    saved_optim = {i: {k: v.clone() for k, v in s.items()} for i, s in saved_optim["state"].items()}
    later = train(model, optimizer, range(3, 6))
    final = {k: v.clone() for k, v in model.state_dict().items()}
    return path, saved_model, saved_optim, later, final


def test_round_trip_in_place_and_training_resumes_bit_identically(trained):
    path, saved_model, saved_optim, later, final = trained
    model, optimizer = make(seed=1)  # other values; no optimizer state yet
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}

    checkpoint(model, optimizer).read(path).assert_consumed()

    assert same_state(model.state_dict(), saved_model)
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(buffers[n] is b for n, b in model.named_buffers())
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == pointers
    assert int(model.bn.num_batches_tracked) == 3
    state = optimizer.state_dict()["state"]
    assert state.keys() == saved_optim.keys()
    for index, entries in saved_optim.items():
        assert same_state(state[index], entries)
    assert float(state[0]["step"]) == 3.0
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)  # a tuple again
    assert optimizer.param_groups[0]["weight_decay"] == 0.1

    assert train(model, optimizer, range(3, 6)) == later
    assert same_state(model.state_dict(), final)


def test_restore_into_existing_optimizer_state_keeps_its_tensors(trained):
    path, _, saved_optim, later, _ = trained
    model, optimizer = make(seed=2)
    train(model, optimizer, range(7, 9))  # state exists, with other values
    exp_avg = optimizer.state[model.fc1.weight]["exp_avg"]
    pointer = exp_avg.data_ptr()
    checkpoint(model, optimizer).read(path).assert_consumed()
    assert optimizer.state[model.fc1.weight]["exp_avg"].data_ptr() == pointer
    assert same_state(optimizer.state_dict()["state"][0], saved_optim[0])
    assert train(model, optimizer, range(3, 6)) == later


def test_plain_zarr_reads_the_arrays_with_their_dtypes(trained):
    path, saved_model, saved_optim, *_ = trained
    group = zarr.open_group(str(path), mode="r")
    weight = group["model/fc2.weight/.ATTRIBUTES/VARIABLE_VALUE"]
    assert str(weight.dtype) == "bfloat16"
    assert np.array_equal(
        weight[...].view(np.uint16), saved_model["fc2.weight"].view(torch.int16).numpy().view("u2")
    )
    count = group["model/bn.num_batches_tracked/.ATTRIBUTES/VARIABLE_VALUE"]
    assert count.dtype == np.int64 and int(count[()]) == 3
    exp_avg = group["optim/state/fc1.weight/exp_avg/.ATTRIBUTES/VARIABLE_VALUE"]
    assert np.array_equal(exp_avg[...], saved_optim[0]["exp_avg"].numpy())
    keys = {key for key, _, _ in zc.list_variables(path)}
    assert "optim/param_groups/.ATTRIBUTES/py_state" in keys
    assert "optim/state/fc2.bias/step/.ATTRIBUTES/VARIABLE_VALUE" in keys
    assert zc.load_variable(path, "optim/state/fc2.bias/step") == 3.0


def test_saving_a_fresh_optimizer_leaves_it_fresh_and_restores_as_fresh(tmp_path):
    model, optimizer = make()
    path = checkpoint(model, optimizer).write(tmp_path / "fresh")
    assert len(optimizer.state) == 0
    keys = {key for key, _, _ in zc.list_variables(path)}
    assert not any(key.startswith("optim/state/") for key in keys)
    # Restoring it into a trained optimizer keeps that state (reported), and
    # into a fresh one creates none: training then matches a fresh start.
    other, fresh = make()
    checkpoint(other, fresh).read(path).assert_consumed()
    assert len(fresh.state) == 0
    reference_model, reference_optim = make()
    assert train(other, fresh, range(2)) == train(reference_model, reference_optim, range(2))


def test_dtypes_keep_their_names(tmp_path):
    class Dtypes(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, dtype in DTYPES.items():
                values = torch.arange(-6, 6).reshape(3, 4)
                if dtype is torch.bool:
                    tensor = values > 0
                elif dtype.is_floating_point:
                    tensor = (values.to(torch.float32) / 4).to(dtype)
                else:
                    tensor = values.abs().to(dtype)
                self.register_buffer(name, tensor)

    DTYPES = {
        "bf16": torch.bfloat16,
        "f16": torch.float16,
        "f64": torch.float64,
        "e4m3": torch.float8_e4m3fn,
        "e5m2": torch.float8_e5m2,
        "i64": torch.int64,
        "i8": torch.int8,
        "u8": torch.uint8,
        "flag": torch.bool,
        "c64": torch.complex64,
    }
    source = Dtypes()
    path = zc.Checkpoint(model=zt.ModuleState(source)).write(tmp_path / "dtypes")
    stored = {key.split("/")[1]: dtype for key, _, dtype in zc.list_variables(path)}
    assert stored == {
        "bf16": "bfloat16",
        "f16": "float16",
        "f64": "float64",
        "e4m3": "float8_e4m3fn",
        "e5m2": "float8_e5m2",
        "i64": "int64",
        "i8": "int8",
        "u8": "uint8",
        "flag": "bool",
        "c64": "complex64",
    }
    e4m3 = zarr.open_array(f"{path}/model/e4m3/.ATTRIBUTES/VARIABLE_VALUE", mode="r")[...]
    assert e4m3.dtype == ml_dtypes.float8_e4m3fn
    assert e4m3.astype(np.float32).tolist() == (np.arange(-6, 6).reshape(3, 4) / 4).tolist()
    target = Dtypes()
    for buffer in target.buffers():
        buffer.zero_()
    zc.Checkpoint(model=zt.ModuleState(target)).read(path).assert_consumed()
    for name, dtype in DTYPES.items():
        restored, original = getattr(target, name), getattr(source, name)
        assert restored.dtype is dtype
        assert np.array_equal(bits(restored), bits(original)), name


def test_a_shape_mismatch_names_the_parameter_and_changes_nothing(trained):
    path, *_ = trained
    model, optimizer = make(seed=3, hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeMismatchError) as info:
        checkpoint(model, optimizer).read(path)
    message = str(info.value)
    assert "model/fc1.weight/.ATTRIBUTES/VARIABLE_VALUE" in message
    assert "(16, 8)" in message and "(32, 8)" in message
    assert same_state(model.state_dict(), before)
    assert len(optimizer.state) == 0  # the state created for the restore is gone again


def test_a_dtype_mismatch_names_the_parameter(trained):
    path, *_ = trained
    model, optimizer = make()
    model.fc2.to(torch.float32)
    with pytest.raises(DTypeMismatchError, match=r"model/fc2\.weight.*bfloat16.*float32"):
        checkpoint(model, optimizer).read(path)


def test_missing_and_unexpected_keys_follow_the_status_api(trained):
    path, saved_model, *_ = trained

    class Wider(Net):
        def __init__(self) -> None:
            super().__init__()
            self.extra = torch.nn.Linear(2, 2)

    torch.manual_seed(0)
    wider = Wider()
    status = zc.Checkpoint(model=zt.ModuleState(wider)).read(path)
    with pytest.raises(MatchError, match="optim"):
        status.assert_consumed()  # the checkpoint's optimizer is unused
    with pytest.raises(MatchError, match="found no value"):
        status.assert_existing_objects_matched()  # extra.weight, extra.bias
    status.expect_partial()
    assert np.array_equal(bits(wider.fc1.weight), bits(saved_model["fc1.weight"]))

    narrower = torch.nn.Module()
    narrower.fc1 = torch.nn.Linear(8, 16)
    status = zc.Checkpoint(model=zt.ModuleState(narrower)).read(path).expect_partial()
    status.assert_existing_objects_matched()
    with pytest.raises(MatchError, match="fc2"):
        status.assert_consumed()
    assert np.array_equal(bits(narrower.fc1.bias), bits(saved_model["fc1.bias"]))


def test_interop_torch_checkpoint_into_numpy_variables_and_back(tmp_path, trained):
    path, saved_model, *_ = trained
    arrays = {
        name: zc.Variable(np.zeros(tuple(t.shape), zt.numpy_dtype(t.dtype)))
        for name, t in saved_model.items()
    }
    numpy_model = zc.Dict(arrays)
    zc.Checkpoint(model=numpy_model).read(path).expect_partial().assert_existing_objects_matched()
    for name, tensor in saved_model.items():
        assert np.array_equal(arrays[name].numpy().reshape(-1).view(np.uint8), bits(tensor)), name
    assert arrays["fc2.weight"].dtype == ml_dtypes.bfloat16

    # The other way: numpy Variables saved, restored into a torch module.
    for variable in arrays.values():
        variable.assign(np.ones(variable.shape, variable.dtype))
    numpy_path = zc.Checkpoint(model=numpy_model).write(tmp_path / "numpy")
    model, _ = make(seed=4)
    zc.Checkpoint(model=zt.ModuleState(model)).read(numpy_path).assert_consumed()
    for name, tensor in model.state_dict().items():
        assert (tensor.float() == 1).all(), name


def test_plain_values_are_msgpack_and_unsupported_ones_are_named(tmp_path):
    class WithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.config: object = {"vocab": ["a", "b"], "scale": 0.5, "nested": (1, None)}

        def get_extra_state(self) -> object:
            return self.config

        def set_extra_state(self, state: object) -> None:
            self.config = state

    source = WithExtra()
    path = zc.Checkpoint(model=zt.ModuleState(source)).write(tmp_path / "extra")
    stored = dict((k, d) for k, _, d in zc.list_variables(path))
    assert stored["model/_extra_state/.ATTRIBUTES/py_state"] == "uint8"
    target = WithExtra()
    target.config = None
    zc.Checkpoint(model=zt.ModuleState(target)).read(path).assert_consumed()
    assert target.config == {"vocab": ["a", "b"], "scale": 0.5, "nested": [1, None]}

    source.config = {"fn": print}
    with pytest.raises(UnsupportedValueError, match=r"_extra_state\['fn'\]: a builtin_function"):
        zc.Checkpoint(model=zt.ModuleState(source)).write(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_sgd_state_without_tensors_and_with_momentum(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        sgd.zero_grad()
        model(torch.ones(2, 4) * step).sum().backward()
        sgd.step()
    path = zc.Checkpoint(model=zt.ModuleState(model), optim=zt.OptimizerState(sgd, model)).write(
        tmp_path / "sgd"
    )
    torch.manual_seed(1)
    other = torch.nn.Linear(4, 3)
    other_sgd = torch.optim.SGD(other.parameters(), lr=0.5, momentum=0.9)
    zc.Checkpoint(model=zt.ModuleState(other), optim=zt.OptimizerState(other_sgd, other)).read(
        path
    ).assert_consumed()
    assert other_sgd.param_groups[0]["lr"] == 0.1
    assert torch.equal(
        other_sgd.state[other.weight]["momentum_buffer"], sgd.state[model.weight]["momentum_buffer"]
    )


def test_restore_creates_state_for_an_optimizer_whose_parameters_already_have_grads(trained):
    path, _, saved_optim, later, _ = trained
    model, optimizer = make(seed=5)
    model(torch.ones(2, 8)).sum().backward()  # grads exist: torch does not create state then
    checkpoint(model, optimizer).read(path).assert_consumed()
    assert same_state(optimizer.state_dict()["state"][0], saved_optim[0])
    optimizer.zero_grad()
    assert train(model, optimizer, range(3, 6)) == later


def test_a_module_attached_after_the_restore_gets_its_values(trained):
    path, saved_model, *_ = trained
    ckpt = zc.Checkpoint()
    status = ckpt.read(path)
    model, _ = make(seed=6)
    ckpt.model = zt.ModuleState(model)  # deferred restoration
    assert same_state(model.state_dict(), saved_model)
    status.expect_partial()


def test_manager_resumes_training(tmp_path):
    def run(steps: range) -> tuple[list[float], Net]:
        model, optimizer = make()
        step = zc.Variable(np.int64(0))
        ckpt = zc.Checkpoint(
            model=zt.ModuleState(model), optim=zt.OptimizerState(optimizer, model), step=step
        )
        manager = zc.CheckpointManager(ckpt, tmp_path / "run", max_to_keep=2)
        manager.restore_or_initialize()
        losses = []
        for i in steps:
            if i < int(step.numpy()):
                continue
            losses += train(model, optimizer, range(i, i + 1))
            step.assign(i + 1)
            if (i + 1) % 2 == 0:
                manager.save()
        return losses, model

    first, _ = run(range(5))  # saves after steps 2 and 4
    resumed, model = run(range(8))  # resumes at step 4
    reference_model, reference_optim = make()
    reference = train(reference_model, reference_optim, range(8))
    assert first == reference[:5]
    assert resumed == reference[4:]  # step 4 ran again from the checkpoint, the same
    assert same_state(model.state_dict(), reference_model.state_dict())


def test_wrong_arguments_are_refused_clearly():
    model, optimizer = make()
    with pytest.raises(InvalidArgumentError, match=r"ModuleState wraps a torch\.nn\.Module"):
        zt.ModuleState(optimizer)
    with pytest.raises(InvalidArgumentError, match="needs the module"):
        zt.OptimizerState(optimizer, optimizer)
    with pytest.raises(InvalidArgumentError, match=r"wraps a torch\.optim\.Optimizer"):
        zt.OptimizerState(model, model)


def test_reprs_say_what_they_hold():
    model, optimizer = make()
    expected = "<zarrckpt.torch.ModuleState of Net: 6 parameters, 3 buffers>"
    assert repr(zt.ModuleState(model)) == expected
    assert "AdamW: 0 parameters with state" in repr(zt.OptimizerState(optimizer, model))


def test_zc_torch_is_the_adapter_and_import_zarrckpt_alone_does_not_import_torch():
    assert zc.torch is zt
    code = "import sys, zarrckpt; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_non_contiguous_tensors_restore_through_a_staging_buffer(tmp_path):
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(4, 3).t())
    assert not module.w.is_contiguous()
    path = zc.Checkpoint(model=zt.ModuleState(module)).write(tmp_path / "strided")
    assert zc.load_variable(path, "model/w").tolist() == module.w.tolist()
    target = torch.nn.Module()
    target.w = torch.nn.Parameter(torch.zeros(4, 3).t())
    parameter = target.w
    zc.Checkpoint(model=zt.ModuleState(target)).read(path).assert_consumed()
    assert target.w is parameter
    assert torch.equal(target.w, module.w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_module_round_trip(tmp_path, trained):
    path, saved_model, *_ = trained
    model, _ = make(seed=7)
    model = model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    checkpoint(model, optimizer).read(path).assert_consumed()
    for name, tensor in model.state_dict().items():
        assert tensor.is_cuda
        assert np.array_equal(bits(tensor.cpu()), bits(saved_model[name])), name
    again = checkpoint(model, optimizer).write(tmp_path / "from-cuda")
    assert np.array_equal(
        zc.load_variable(again, "model/fc1.weight"), saved_model["fc1.weight"].numpy()
    )


def test_a_grown_model_restores_the_old_layers_and_starts_the_new_ones_fresh(trained):
    path, _, saved_optim, *_ = trained

    class Grown(Net):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 2)

    torch.manual_seed(8)
    grown = Grown()
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-2, weight_decay=0.1)
    status = checkpoint(grown, optimizer).read(path)
    with pytest.raises(MatchError, match="found no value"):
        status.assert_existing_objects_matched()  # head.weight, head.bias
    status.expect_partial()
    assert same_state(optimizer.state[grown.fc1.weight], saved_optim[0])
    assert grown.head.weight not in optimizer.state  # never stepped: no state, as if fresh
    assert len(optimizer.state) == 6


def test_optimizer_state_under_other_parameter_names_is_left_unused(tmp_path):
    torch.manual_seed(0)
    sequential = torch.nn.Sequential(torch.nn.Linear(4, 4))
    optimizer = torch.optim.AdamW(sequential.parameters(), lr=0.25)
    sequential(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    path = zc.Checkpoint(optim=zt.OptimizerState(optimizer, sequential)).write(tmp_path / "seq")

    renamed = torch.nn.Module()
    renamed.a = torch.nn.Linear(4, 4)
    fresh = torch.optim.AdamW(renamed.parameters(), lr=0.5)
    status = zc.Checkpoint(optim=zt.OptimizerState(fresh, renamed)).read(path)
    with pytest.raises(MatchError, match=r"optim/state/0\.weight"):
        status.assert_consumed()
    status.expect_partial()
    assert len(fresh.state) == 0  # nothing matched: no state made up
    assert fresh.param_groups[0]["lr"] == 0.25  # the hyperparameters are restored
    assert fresh.param_groups[0]["params"] == list(renamed.parameters())


def test_sparse_and_meta_tensors_are_refused_by_name(tmp_path):
    module = torch.nn.Module()
    module.register_buffer("table", torch.eye(3).to_sparse())
    with pytest.raises(UnsupportedValueError, match=r"table: a torch\.sparse_coo tensor"):
        zc.Checkpoint(model=zt.ModuleState(module)).write(tmp_path / "sparse")
    meta = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(UnsupportedValueError, match="weight: a tensor on the meta device"):
        zc.Checkpoint(model=zt.ModuleState(meta)).write(tmp_path / "meta")
    assert not any(tmp_path.iterdir())


def test_tensors_the_engine_cannot_address_go_through_chunks_within_the_budget(tmp_path):
    """A GPU tensor's path, taken here by strided CPU tensors: one chunk at a time."""
    rows, cols = 1024, 512  # 2 MiB, transposed: not contiguous
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(cols, rows).t())
    module.h = torch.nn.Parameter(torch.randn(cols, rows).t().to(torch.bfloat16))
    options = zc.CheckpointOptions(chunk_bytes=64 << 10, inflight_bytes=256 << 10, threads=4)

    in_flight = {"now": 0, "peak": 0, "calls": 0}
    lock = threading.Lock()
    original_get, original_set = zt.TensorWindow.__getitem__, zt.TensorWindow.__setitem__

    def track(nbytes: int) -> None:
        with lock:
            in_flight["now"] += nbytes
            in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
            in_flight["calls"] += 1

    def get(self, region):
        part = original_get(self, region)
        track(part.nbytes)  # released when the chunk is written: counted until then
        time.sleep(0.001)  # let the writers overlap
        track(-part.nbytes)
        return part

    def put(self, region, values):
        track(values.nbytes)
        original_set(self, region, values)
        track(-values.nbytes)

    zt.TensorWindow.__getitem__, zt.TensorWindow.__setitem__ = get, put
    try:
        path = zc.Checkpoint(model=zt.ModuleState(module)).write(tmp_path / "w", options=options)
        saves = in_flight["calls"] // 2
        target = torch.nn.Module()
        target.w = torch.nn.Parameter(torch.zeros(cols, rows).t())
        target.h = torch.nn.Parameter(torch.zeros(cols, rows).t().to(torch.bfloat16))
        zc.Checkpoint(model=zt.ModuleState(target)).read(path, options=options).assert_consumed()
    finally:
        zt.TensorWindow.__getitem__, zt.TensorWindow.__setitem__ = original_get, original_set
    assert saves == 32 + 16  # one copy per 64 KiB chunk: w is 2 MiB, h 1 MiB
    assert 0 < in_flight["peak"] <= options.inflight_bytes
    assert torch.equal(target.w, module.w)
    assert np.array_equal(bits(target.h), bits(module.h))
    assert np.array_equal(zc.load_variable(path, "model/w"), module.w.detach().numpy())


def test_restoring_twice_into_state_the_first_restore_created(tmp_path, trained):
    path, _, saved_optim, *_ = trained
    model, optimizer = make(seed=9)
    model(torch.ones(2, 8)).sum().backward()  # grads: the first restore makes placeholders
    ckpt = checkpoint(model, optimizer)
    ckpt.read(path).assert_consumed()
    optimizer.zero_grad()
    train(model, optimizer, range(3, 5))  # the state moves on
    later = ckpt.write(tmp_path / "later")
    train(model, optimizer, range(5, 7))
    ckpt.read(path).assert_consumed()  # back to the first checkpoint, in place
    assert same_state(optimizer.state_dict()["state"][0], saved_optim[0])
    ckpt.read(later).assert_consumed()
    assert float(optimizer.state[model.fc1.weight]["step"]) == 5.0


def test_state_entries_the_live_optimizer_lacks_are_restored_too(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    amsgrad = torch.optim.Adam(model.parameters(), amsgrad=True)
    model(torch.ones(1, 3)).sum().backward()
    amsgrad.step()
    path = zc.Checkpoint(optim=zt.OptimizerState(amsgrad, model)).write(tmp_path / "ams")
    plain = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    plain.step()  # state without max_exp_avg_sq
    zc.Checkpoint(optim=zt.OptimizerState(plain, model)).read(path).assert_consumed()
    restored = plain.state[model.weight]
    assert torch.equal(restored["max_exp_avg_sq"], amsgrad.state[model.weight]["max_exp_avg_sq"])
    assert plain.param_groups[0]["amsgrad"] is True  # the saved hyperparameters, as torch loads
