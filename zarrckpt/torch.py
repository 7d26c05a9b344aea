"""The PyTorch adapter: ``nn.Module`` and optimizer state as trackables.

Install with ``pip install 'zarrckpt[torch]'``; ``import zarrckpt`` never
imports torch, ``zarrckpt.torch`` (or ``zc.torch``) does. ::

    import zarrckpt as zc
    ckpt = zc.Checkpoint(model=zc.torch.ModuleState(model),
                         optim=zc.torch.OptimizerState(optimizer, model),
                         data=loader_state)
    manager = zc.CheckpointManager(ckpt, "runs/exp1", max_to_keep=3)
    manager.restore_or_initialize()
    ...
    manager.save()

Both trackables are views over ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict`` / ``get_optimizer_state_dict`` and their ``set_``
counterparts), which map parameter names and know FSDP and DTensor. Every
tensor of a state dict is one saved value, keyed by its state-dict name:
``model/fc1.weight/.ATTRIBUTES/VARIABLE_VALUE``,
``optim/state/fc1.weight/exp_avg/.ATTRIBUTES/VARIABLE_VALUE``. Plain values
(``param_groups``, a ``None`` momentum buffer, a module's extra state) are
msgpack data in a PythonState (``.../.ATTRIBUTES/py_state``), never pickle.

Memory. A CPU tensor is written from its own memory and restored into it: a
restore reads the saved bytes straight into the parameters, buffers and
optimizer state, so every parameter stays the same tensor object at the same
``data_ptr()``, then hands the state dict to ``set_*_state_dict`` (whose copy of
a tensor onto itself costs nothing) so the module's and optimizer's own load
logic runs. A tensor on another device goes through host memory.

Distributed. A DTensor (``torch.distributed.tensor``, FSDP2's ``fully_shard``)
with ``Shard`` and ``Replicate`` placements is a sharded value: each rank
saves its block (global shape and offset from the placements), a block held
by several ranks (``Replicate`` on a mesh dimension) is written by one of
them, and a fully replicated DTensor is written once. Save with
``coordinator=zc.distributed.TorchCoordinator()``. A restore reads, on each
rank, only the chunks overlapping its block, whatever mesh, placements or
number of ranks wrote them, or plain tensors. Placements the adapter cannot
express as one block per rank (``_StridedShard``, ``Partial``) are refused,
naming the tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import ml_dtypes
import msgpack
import numpy as np

from zarrckpt.errors import (
    DTypeMismatchError,
    InvalidArgumentError,
    MissingDependencyError,
    UnsupportedDTypeError,
    UnsupportedValueError,
)
from zarrckpt.python_state import PythonState
from zarrckpt.trackable import (
    ArrayWindow,
    SaveableValue,
    SaveContext,
    ShardInfo,
    Trackable,
    check_compatible,
)
from zarrckpt.variable import VARIABLE_VALUE

try:
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
except ImportError as _exc:  # pragma: no cover - the extra is not installed
    raise MissingDependencyError(
        f"zarrckpt.torch needs PyTorch ({_exc}); install it with: pip install 'zarrckpt[torch]'"
    ) from _exc

__all__ = [
    "ModuleState",
    "OptimizerState",
    "TensorWindow",
    "numpy_dtype",
    "torch_dtype",
]

STATE = "state"
PARAM_GROUPS = "param_groups"

# Largest plain value (msgpack) read back: a restore refuses bigger ones before decoding.
MAX_PLAIN_BYTES = 64 << 20
_MAX_DEPTH = 32

# torch dtypes numpy lacks: viewed as same-width integers, then as the ml_dtypes type.
_VIEWED: dict[Any, tuple[Any, Any]] = {
    torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
    torch.float8_e4m3fnuz: (torch.uint8, ml_dtypes.float8_e4m3fnuz),
    torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    torch.float8_e5m2fnuz: (torch.uint8, ml_dtypes.float8_e5m2fnuz),
}
_NATIVE: dict[Any, Any] = {
    torch.bool: np.bool_,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
    torch.int16: np.int16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint16: np.uint16,
    torch.uint32: np.uint32,
    torch.uint64: np.uint64,
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}
_TORCH_OF: dict[np.dtype[Any], Any] = {
    **{np.dtype(n): t for t, n in _NATIVE.items()},
    **{np.dtype(n): t for t, (_, n) in _VIEWED.items()},
}


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype a torch dtype is saved as (ml_dtypes for bfloat16 and float8).

    Example:
        >>> numpy_dtype(torch.bfloat16)
        dtype(bfloat16)
    """
    viewed = _VIEWED.get(dtype)
    native = viewed[1] if viewed is not None else _NATIVE.get(dtype)
    if native is None:
        raise UnsupportedDTypeError(f"torch dtype {dtype} has no zarrckpt counterpart")
    result: np.dtype[Any] = np.dtype(native)
    return result


def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a saved numpy dtype (the inverse of :func:`numpy_dtype`)."""
    found: torch.dtype | None = _TORCH_OF.get(np.dtype(dtype).newbyteorder("="))
    if found is None:
        raise UnsupportedDTypeError(f"dtype {dtype} has no torch counterpart")
    return found


def _as_numpy(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A numpy view of a CPU tensor's memory (no copy), in the tensor's dtype."""
    tensor = tensor.detach()
    viewed = _VIEWED.get(tensor.dtype)
    if viewed is None:
        array: np.ndarray[Any, Any] = tensor.numpy()
        return array
    if tensor.dim() == 0:  # torch cannot view a 0-d tensor as another dtype
        tensor = tensor.reshape(1)
    array = tensor.view(viewed[0]).numpy().view(viewed[1])
    return array.reshape(()) if tensor.dim() == 0 else array


def _from_numpy(array: np.ndarray[Any, Any], dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``array``'s memory, in the torch ``dtype`` it was saved from."""
    viewed = _VIEWED.get(dtype)
    if viewed is None:
        return torch.from_numpy(array)
    carrier = np.int16 if viewed[0] == torch.int16 else np.uint8
    flat = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(carrier))
    return flat.view(dtype).reshape(array.shape)


# DTensors --------------------------------------------------------------------------


def _dtensor_type() -> Any:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _check_plain_tensor(tensor: torch.Tensor, name: str) -> None:
    """Refuse tensors that are not dense arrays in memory (sparse, meta, subclasses)."""
    if tensor.layout != torch.strided:
        raise UnsupportedValueError(
            f"{name}: a {tensor.layout} tensor; zarrckpt.torch saves dense (strided) tensors "
            "(convert it with .to_dense())"
        )
    if tensor.device.type == "meta":
        raise UnsupportedValueError(f"{name}: a tensor on the meta device has no values to save")
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedValueError(
            f"{name}: a {type(tensor).__name__} (a tensor subclass); zarrckpt.torch saves plain "
            "tensors and DTensors with Shard/Replicate placements"
        )


def _local_block(tensor: torch.Tensor, name: str) -> tuple[torch.Tensor, ShardInfo | None, bool]:
    """(local tensor, where its block lies or None if replicated, whether this rank writes it).

    For a plain tensor: itself, None, True.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(tensor, dtensor):
        _check_plain_tensor(tensor, name)
        return tensor, None, True
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(tensor.placements)
    for placement in placements:
        if type(placement) is not Shard and not isinstance(placement, Replicate):
            raise UnsupportedValueError(
                f"{name}: DTensor placement {placement!r} (placements {list(placements)}) "
                "cannot be saved as one block per rank; zarrckpt.torch saves Shard and "
                "Replicate placements. Redistribute the tensor (DTensor.redistribute) or "
                "save a full state dict for it"
            )
    local = tensor.to_local()
    _check_plain_tensor(local, name)
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise UnsupportedValueError(f"{name}: this rank is not in the DTensor's device mesh")
    # One of the ranks holding the same block writes it: coordinate 0 on every Replicate dim.
    writes = all(
        coordinate[dim] == 0 for dim, p in enumerate(placements) if isinstance(p, Replicate)
    )
    if all(isinstance(p, Replicate) for p in placements):
        return local, None, True  # fully replicated: a plain value, written once
    global_shape = tuple(int(n) for n in tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    if tuple(shape) != tuple(local.shape):
        raise UnsupportedValueError(
            f"{name}: the DTensor's local tensor has shape {tuple(local.shape)}, its placements "
            f"{list(placements)} give {tuple(shape)}"
        )
    return local, ShardInfo(global_shape, tuple(int(o) for o in offset)), writes


# Tensor values ---------------------------------------------------------------------


class TensorState(Trackable):
    """One tensor of a state dict: a node whose ``VARIABLE_VALUE`` is the tensor.

    ``tensor`` is None for a placeholder a restore created for a tensor the
    live object does not have yet; ``allocate(shape, dtype)`` then makes it
    and ``attach(tensor)`` hands it over once it holds the saved value.
    """

    def __init__(
        self,
        tensor: torch.Tensor | None,
        name: str,
        *,
        allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
        attach: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self.tensor = tensor
        self.name = name
        self._allocate = allocate
        self._attach = attach

    def _saveable_values(self) -> dict[str, SaveableValue]:
        return {VARIABLE_VALUE: _TensorValue(self)}

    def _zc_type_name(self) -> str:
        return "zarrckpt.torch.TensorState"

    def __repr__(self) -> str:
        tensor = self.tensor
        if tensor is None:
            return f"<zarrckpt.torch.TensorState {self.name!r}: not restored yet>"
        return (
            f"<zarrckpt.torch.TensorState {self.name!r} {str(tensor.dtype).removeprefix('torch.')}"
            f"{list(tensor.shape)} on {tensor.device}>"
        )


class TensorWindow(ArrayWindow):
    """A tensor the engine reaches one chunk region at a time (a GPU tensor, a strided one).

    A save copies each chunk's region to host as it writes it, a restore
    copies each chunk into the tensor as it reads it: the host memory used is
    the chunks in flight (``CheckpointOptions.inflight_bytes``), whatever the
    tensor's size.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()
        self._shape = tuple(int(n) for n in tensor.shape)
        self._dtype = numpy_dtype(tensor.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    def __getitem__(self, region: tuple[slice, ...]) -> np.ndarray[Any, Any]:
        part = self.tensor[region]
        if part.device.type != "cpu":
            part = part.to("cpu")
        return _as_numpy(part)

    def __setitem__(self, region: tuple[slice, ...], values: np.ndarray[Any, Any]) -> None:
        values = np.ascontiguousarray(values)
        if not values.flags.writeable:  # torch warns about read-only numpy memory
            values = values.copy()
        source = _from_numpy(values, self.tensor.dtype)
        with torch.no_grad():
            self.tensor[region].copy_(source)

    def __repr__(self) -> str:
        where = self.tensor.device
        return f"<zarrckpt.torch.TensorWindow {self._dtype.name}{list(self._shape)} on {where}>"


def _addressable(tensor: torch.Tensor) -> bool:
    """Whether the engine can write from and read into the tensor's memory directly."""
    return tensor.device.type == "cpu" and tensor.is_contiguous()


class _TensorValue(SaveableValue):
    def __init__(self, leaf: TensorState) -> None:
        self._leaf = leaf
        self._block: tuple[torch.Tensor, ShardInfo | None, bool] | None = None

    def _local(self) -> tuple[torch.Tensor, ShardInfo | None, bool]:
        if self._block is None:
            assert self._leaf.tensor is not None
            self._block = _local_block(self._leaf.tensor, self._leaf.name)
        return self._block

    def shard(self) -> ShardInfo | None:
        if self._leaf.tensor is None:
            return None
        return self._local()[1]

    def value(self, context: SaveContext) -> np.ndarray[Any, Any]:
        if self._leaf.tensor is None:
            raise UnsupportedValueError(f"{self._leaf.name}: a placeholder has no value to save")
        local, shard, writes = self._local()
        numpy_dtype(local.dtype)  # an unsupported dtype is named here
        if shard is not None and not writes:
            local = local[:0]  # a replica: another rank writes this block
        if _addressable(local):
            return _as_numpy(local)
        # The engine accepts an ArrayWindow wherever it takes an array to save.
        return cast(np.ndarray, TensorWindow(local))

    def destination(
        self, shape: tuple[int, ...], dtype: np.dtype[Any], key: str
    ) -> np.ndarray[Any, Any]:
        leaf = self._leaf
        if leaf.tensor is None:
            assert leaf._allocate is not None
            leaf.tensor = leaf._allocate(shape, torch_dtype(dtype))
        local, shard, _ = self._local()
        try:
            live_dtype = numpy_dtype(local.dtype)
        except UnsupportedDTypeError:
            raise DTypeMismatchError(
                f"{key}: checkpoint has dtype {dtype}, live tensor has dtype {local.dtype}"
            ) from None
        live_shape = tuple(leaf.tensor.shape) if shard is None else shard.global_shape
        check_compatible(key, shape, dtype, live_shape, live_dtype)
        if _addressable(local):
            return _as_numpy(local)
        return cast(np.ndarray, TensorWindow(local))  # read into chunk by chunk

    def commit(self, array: np.ndarray[Any, Any]) -> None:
        leaf = self._leaf
        if leaf._attach is not None and leaf.tensor is not None:
            attach, leaf._attach, leaf._allocate = leaf._attach, None, None
            attach(leaf.tensor)


# Plain values ------------------------------------------------------------------------


def _check_plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` as msgpack-safe data (tuples become lists); raise naming ``where`` if not."""
    if depth > _MAX_DEPTH:
        raise UnsupportedValueError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise UnsupportedValueError(f"{where}: the int {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return _check_plain(value.item(), where, depth)
    if isinstance(value, list | tuple):
        return [_check_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsupportedValueError(
                    f"{where}: dict key {k!r} is a {type(k).__name__}; plain values are saved "
                    "as msgpack with str keys"
                )
            out[k] = _check_plain(v, f"{where}[{k!r}]", depth + 1)
        return out
    raise UnsupportedValueError(
        f"{where}: a {type(value).__name__} is not plain data; zarrckpt.torch saves tensors "
        "and None, bool, int, float, str, lists and str-keyed dicts of them (as msgpack, "
        "never pickle)"
    )


def _validate_decoded(value: Any, where: str, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise UnsupportedValueError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
    if isinstance(value, list):
        for item in value:
            _validate_decoded(item, where, depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsupportedValueError(f"{where}: a dict key is not a str")
            _validate_decoded(v, where, depth + 1)
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise UnsupportedValueError(f"{where}: unexpected {type(value).__name__} in plain data")


def encode_plain(value: Any, where: str) -> bytes:
    """msgpack bytes of plain data; UnsupportedValueError naming ``where`` otherwise."""
    data: bytes = msgpack.packb(_check_plain(value, where), use_bin_type=True)
    return data


def decode_plain(data: bytes, where: str) -> Any:
    """The plain data :func:`encode_plain` wrote, checked: only plain types, bounded size."""
    if len(data) > MAX_PLAIN_BYTES:
        raise UnsupportedValueError(
            f"{where}: {len(data)} bytes of plain data, more than the {MAX_PLAIN_BYTES} read back"
        )
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=0,
            max_ext_len=0,
            max_str_len=len(data),
            max_array_len=len(data),
            max_map_len=len(data),
            use_list=True,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise UnsupportedValueError(
            f"{where}: plain data that is not valid msgpack ({exc})"
        ) from None
    _validate_decoded(value, where)
    return value


class PlainState(PythonState):
    """One plain (non-tensor) value of a state dict, saved as msgpack bytes."""

    def __init__(self, value: Any, name: str, attach: Callable[[Any], None] | None = None) -> None:
        self.value = value
        self.name = name
        self.restored = False
        self._attach = attach

    def serialize(self) -> bytes:
        return encode_plain(self.value, self.name)

    def deserialize(self, data: bytes) -> None:
        self.value = decode_plain(data, self.name)
        self.restored = True
        if self._attach is not None:
            attach, self._attach = self._attach, None
            attach(self.value)

    def _zc_type_name(self) -> str:
        return "zarrckpt.torch.PlainState"

    def __repr__(self) -> str:
        return f"<zarrckpt.torch.PlainState {self.name!r}: {self.value!r:.60}>"


def _leaf_for(existing: Trackable | None, value: Any, name: str) -> Trackable:
    """The node for ``value``, reusing ``existing`` (so a node keeps its identity)."""
    if isinstance(existing, _EitherLeaf):
        existing.hold(value)
        return existing
    if isinstance(value, torch.Tensor):
        if isinstance(existing, TensorState):
            existing.tensor = value
            return existing
        return TensorState(value, name)
    if isinstance(existing, PlainState):
        existing.value = value
        existing.restored = False
        return existing
    return PlainState(value, name)


# ModuleState -----------------------------------------------------------------------


class ModuleState(Trackable):
    """An ``nn.Module``'s state dict as a trackable: one saved value per tensor.

    The values are ``get_model_state_dict(module)``'s, keyed by their names
    (``fc1.weight``, ``bn.num_batches_tracked``). A restore reads them into the
    module's own memory (parameters stay the same objects, at the same
    ``data_ptr()``), then runs ``set_model_state_dict``. A key the checkpoint
    lacks keeps its value and a saved key the module lacks is left unused:
    the restore status reports both (``assert_consumed``, ``expect_partial``).
    Shape and dtype mismatches raise before anything is read, naming the key.

    Example:
        >>> ckpt = zc.Checkpoint(model=ModuleState(model))     # doctest: +SKIP
        >>> ckpt.restore(path).assert_consumed()                # doctest: +SKIP
    """

    def __init__(self, module: torch.nn.Module, *, options: StateDictOptions | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise InvalidArgumentError(
                f"ModuleState wraps a torch.nn.Module, got {type(module).__name__}"
            )
        self.module = module
        self.options = options
        self._leaves: dict[str, Trackable] = {}
        self._snapshot: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """``get_model_state_dict(module)``: what a save writes (the module's own tensors)."""
        state: dict[str, Any] = get_model_state_dict(self.module, options=self.options)
        return state

    def _refresh(self, state: dict[str, Any]) -> None:
        self._leaves = {
            name: _leaf_for(self._leaves.get(name), value, name) for name, value in state.items()
        }

    def _checkpoint_dependencies(self) -> list[tuple[str, Trackable]]:
        if self._snapshot is None:
            self._refresh(self.state_dict())
        return [*super()._checkpoint_dependencies(), *self._leaves.items()]

    def _lookup_dependency(self, name: str) -> Trackable | None:
        return self._leaves.get(name) or super()._lookup_dependency(name)

    def _restore_begin(self) -> None:
        self._snapshot = self.state_dict()
        self._refresh(self._snapshot)

    def _restore_end(self, completed: bool) -> None:
        state, self._snapshot = self._snapshot, None
        if not completed or state is None:
            return
        for name, leaf in self._leaves.items():
            if isinstance(leaf, PlainState) and leaf.restored:
                state[name] = leaf.value
        set_model_state_dict(self.module, state, options=_load_options(self.options))

    def __repr__(self) -> str:
        return (
            f"<zarrckpt.torch.ModuleState of {type(self.module).__name__}: "
            f"{sum(1 for _ in self.module.parameters())} parameters, "
            f"{sum(1 for _ in self.module.buffers())} buffers>"
        )


def _load_options(options: StateDictOptions | None) -> StateDictOptions:
    """``options`` for ``set_*_state_dict``, not strict: what a checkpoint lacks is the
    status API's to report (``assert_existing_objects_matched``)."""
    if options is None:
        return StateDictOptions(strict=False)
    return dataclasses.replace(options, strict=False)


# OptimizerState --------------------------------------------------------------------


class _Node(Trackable):
    """A node whose dependencies are held in a dict (built by the owning adapter)."""

    def __init__(self, name: str, create: Callable[[str], Trackable | None] | None = None) -> None:
        self.name = name
        self.children: dict[str, Trackable] = {}
        self._create = create

    def _checkpoint_dependencies(self) -> list[tuple[str, Trackable]]:
        return list(self.children.items())

    def _lookup_dependency(self, name: str) -> Trackable | None:
        return self.children.get(name)

    def _dependency_for_restore(self, name: str) -> Trackable | None:
        if self._create is not None:
            return self._create(name)
        return self.children.get(name)

    def _zc_type_name(self) -> str:
        return "zarrckpt.torch.StateNode"

    def __repr__(self) -> str:
        return f"<zarrckpt.torch.StateNode {self.name!r}: {len(self.children)} entries>"


class _ParamGroups(PlainState):
    def _zc_type_name(self) -> str:
        return "zarrckpt.torch.ParamGroups"


class OptimizerState(Trackable):
    """An optimizer's state dict as a trackable, with parameters named as ``module`` names them.

    From ``get_optimizer_state_dict(module, optimizer)``: every state tensor
    (``exp_avg``, ``exp_avg_sq``, ``step``, ...) is one saved value at
    ``state/<parameter name>/<state name>``; ``param_groups`` (hyperparameters
    and the parameter names) is plain data. A restore reads into the
    optimizer's existing state tensors; an optimizer that has no state yet
    gets it created (torch's zero-gradient step with ``lr`` 0) and filled;
    then ``set_optimizer_state_dict`` loads the result. Saving an optimizer
    that has no state yet saves its ``param_groups`` and leaves it without
    state.

    Example:
        >>> ckpt = zc.Checkpoint(
        ...     model=ModuleState(m), optim=OptimizerState(opt, m))  # doctest: +SKIP
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        module: torch.nn.Module,
        *,
        options: StateDictOptions | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(
                f"OptimizerState wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not isinstance(module, torch.nn.Module):
            raise InvalidArgumentError(
                "OptimizerState(optimizer, module) needs the module whose parameters the "
                f"optimizer updates (to name them), got {type(module).__name__}"
            )
        self.optimizer = optimizer
        self.module = module
        self.options = options
        self._state = _Node(STATE, create=self._create_param_state)
        self._groups = _ParamGroups([], PARAM_GROUPS)
        self._snapshot: dict[str, Any] | None = None  # during a restore, once state is needed
        self._restoring = False
        self._created_state = False  # this restore created the optimizer's state
        self._matched: set[str] = set()  # parameters whose saved state this restore matched

    def state_dict(self) -> dict[str, Any]:
        """``get_optimizer_state_dict(module, optimizer)``, without creating missing state.

        (torch's function creates an empty optimizer's state; this one clears
        it again, so saving a fresh optimizer leaves it fresh.)
        """
        fresh = not self.optimizer.state
        state: dict[str, Any] = get_optimizer_state_dict(
            self.module, self.optimizer, options=self.options
        )
        if fresh and self.optimizer.state:
            self.optimizer.state.clear()
            state = {STATE: {}, PARAM_GROUPS: state[PARAM_GROUPS]}
        return state

    def _refresh(self, state: dict[str, Any]) -> None:
        nodes: dict[str, Trackable] = {}
        for fqn, entries in state[STATE].items():
            node = self._state.children.get(fqn)
            if not isinstance(node, _Node):
                node = self._param_node(fqn)
            node.children = {
                name: _leaf_for(node.children.get(name), value, f"{fqn}.{name}")
                for name, value in entries.items()
            }
            nodes[fqn] = node
        self._state.children = nodes
        self._groups.value = [
            {key: _plain_group_value(value) for key, value in group.items()}
            for group in state[PARAM_GROUPS]
        ]
        self._groups.restored = False

    def _checkpoint_dependencies(self) -> list[tuple[str, Trackable]]:
        if not self._restoring:
            self._refresh(self.state_dict())
        return [
            *super()._checkpoint_dependencies(),
            (STATE, self._state),
            (PARAM_GROUPS, self._groups),
        ]

    def _lookup_dependency(self, name: str) -> Trackable | None:
        found = {STATE: self._state, PARAM_GROUPS: self._groups}.get(name)
        return found or super()._lookup_dependency(name)

    def _restore_begin(self) -> None:
        # The state dict is taken when the checkpoint's state is first matched
        # (_ensure_state): a checkpoint without optimizer state creates none.
        self._restoring = True
        self._snapshot = None
        self._created_state = False
        self._matched = set()

    def _ensure_state(self) -> dict[str, Any]:
        """The optimizer's state dict for this restore, its state created if it had none."""
        if self._snapshot is None:
            if not self.optimizer.state:
                from torch.distributed.checkpoint.state_dict import _init_optim_state

                _init_optim_state(self.optimizer)
                self._created_state = bool(self.optimizer.state)
            self._snapshot = get_optimizer_state_dict(
                self.module, self.optimizer, options=self.options
            )
            self._refresh(self._snapshot)
        return self._snapshot

    def _params_by_name(self, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        names = [n for group in state[PARAM_GROUPS] for n in group["params"]]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return dict(zip(names, params, strict=False))

    def _param_node(self, fqn: str) -> _Node:
        return _Node(fqn, create=partial(self._create_entry, fqn))

    def _create_param_state(self, fqn: str) -> Trackable | None:
        """The node for saved state of parameter ``fqn`` (made if it has none); None if unknown."""
        state = self._ensure_state()
        node = self._state.children.get(fqn)
        if node is None:
            if fqn not in self._params_by_name(state):
                return None
            node = self._state.children[fqn] = self._param_node(fqn)
        self._matched.add(fqn)
        return node

    def _create_entry(self, fqn: str, name: str) -> Trackable:
        """The node for saved state entry ``name`` of ``fqn``: the live one, or a placeholder."""
        state = self._ensure_state()
        node = self._state.children[fqn]
        assert isinstance(node, _Node)
        found = node.children.get(name)
        if found is not None:
            return found
        param = self._params_by_name(state)[fqn]
        dtensor = _dtensor_type()

        def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            if dtensor is not None and isinstance(param, dtensor):
                if shape == tuple(param.shape):  # sharded like its parameter
                    return torch.empty_like(param, dtype=dtype)
                return torch.empty(shape, dtype=dtype, device=param.to_local().device)
            return torch.empty(shape, dtype=dtype, device=param.device)

        def attach(value: Any) -> None:
            state[STATE].setdefault(fqn, {})[name] = value

        # The saved value's kind decides: a tensor placeholder's destination()
        # allocates; a plain one's deserialize() attaches.
        leaf = node.children[name] = _EitherLeaf(f"{fqn}.{name}", allocate, attach)
        return leaf

    def _restore_end(self, completed: bool) -> None:
        snapshot, self._snapshot = self._snapshot, None
        created, self._created_state = self._created_state, False
        self._restoring = False
        if not completed:
            if created:
                self.optimizer.state.clear()  # as it was: no state
            return
        if snapshot is None:
            snapshot = self.state_dict()
        elif created:
            # State torch created for parameters the checkpoint has none for is
            # dropped: they start afresh, as if never stepped (step 0, not 1).
            snapshot[STATE] = {k: v for k, v in snapshot[STATE].items() if k in self._matched}
        for fqn, node in self._state.children.items():
            if isinstance(node, _Node) and fqn in snapshot[STATE]:
                for name, leaf in node.children.items():
                    if isinstance(leaf, PlainState) and leaf.restored:
                        snapshot[STATE][fqn][name] = leaf.value
        if self._groups.restored:
            snapshot[PARAM_GROUPS] = _merge_groups(self._groups.value, snapshot[PARAM_GROUPS])
        set_optimizer_state_dict(
            self.module, self.optimizer, snapshot, options=_load_options(self.options)
        )
        self._refresh(self.state_dict())

    def __repr__(self) -> str:
        return (
            f"<zarrckpt.torch.OptimizerState of {type(self.optimizer).__name__}: "
            f"{len(self.optimizer.state)} parameters with state>"
        )


class _EitherLeaf(Trackable):
    """A restore's placeholder for a state entry the optimizer lacks: a tensor or plain value.

    Which one the checkpoint decides; the placeholder then holds that value
    for good (it stays the node the restore matched).
    """

    def __init__(
        self,
        name: str,
        allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor],
        attach: Callable[[Any], None],
    ) -> None:
        self.name = name
        self._tensor = TensorState(None, name, allocate=allocate, attach=attach)
        self._plain = PlainState(None, name, attach=attach)
        self._kind: str | None = None

    def hold(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self._tensor.tensor, self._kind = value, "tensor"
        else:
            self._plain.value, self._plain.restored, self._kind = value, False, "plain"

    def _saveable_values(self) -> dict[str, SaveableValue]:
        if self._kind == "tensor":
            return self._tensor._saveable_values()
        if self._kind == "plain":
            return self._plain._saveable_values()
        return {**self._tensor._saveable_values(), **self._plain._saveable_values()}

    def _zc_type_name(self) -> str:
        return (self._plain if self._kind == "plain" else self._tensor)._zc_type_name()

    def __repr__(self) -> str:
        if self._kind is None:
            return f"<zarrckpt.torch state entry {self.name!r}: not restored yet>"
        return repr(self._tensor if self._kind == "tensor" else self._plain)


def _merge_groups(saved: Any, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved param_groups in the live groups' types (tuples, tensors) for load_state_dict."""
    if not isinstance(saved, list) or not all(isinstance(g, dict) for g in saved):
        raise UnsupportedValueError(
            f"optimizer param_groups: the checkpoint has a {type(saved).__name__}, not a list "
            "of dicts"
        )
    if len(saved) != len(live):
        raise InvalidArgumentError(
            f"optimizer param_groups: the checkpoint has {len(saved)} groups, the optimizer "
            f"{len(live)}"
        )
    merged = []
    for saved_group, live_group in zip(saved, live, strict=True):
        # Hyperparameters from the checkpoint; which parameters a group holds
        # stays the live optimizer's (their state is matched by name).
        group = {**saved_group, "params": live_group["params"]}
        for key, value in group.items():
            current = live_group.get(key)
            if isinstance(current, tuple) and isinstance(value, list):
                group[key] = tuple(value)
            elif isinstance(current, torch.Tensor) and isinstance(value, int | float):
                group[key] = torch.tensor(value, dtype=current.dtype, device=current.device)
        merged.append(group)
    return merged


def _plain_group_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value
