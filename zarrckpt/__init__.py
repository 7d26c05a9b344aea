"""zarrckpt: object-based checkpoints of large numerical state as open Zarr v3 hierarchies.

Example:
    >>> import numpy as np, zarrckpt as zc
    >>> class Model(zc.AutoTrackable):
    ...     def __init__(self):
    ...         self.w = zc.Variable(np.zeros((4, 4), np.float32))
    >>> model = Model()
    >>> path = zc.Checkpoint(model=model).save("/tmp/ckpts/run")
    >>> zc.Checkpoint(model=Model()).restore(path).assert_consumed()

Importing zarrckpt registers ``bfloat16`` and the float8 types with zarr, so
plain ``zarr.open_array`` reads them.
"""

from zarrckpt import distributed as distributed  # zc.distributed.TorchCoordinator, ...
from zarrckpt._dtypes import register_ml_dtypes as _register_ml_dtypes
from zarrckpt._graph import list_objects
from zarrckpt.checkpoint import Checkpoint, CheckpointLoadStatus, InitializationOnlyStatus
from zarrckpt.codecs import BloscLZ4, Compression, Zstd
from zarrckpt.containers import Dict, List
from zarrckpt.copy import copy_checkpoint
from zarrckpt.directory import (
    CheckpointInfo,
    delete_checkpoint,
    gc,
    latest_checkpoint,
    list_checkpoints,
)
from zarrckpt.inspection import (
    LazyVariable,
    dot_graph_from_checkpoint,
    list_variables,
    load_variable,
    object_metadata,
    open_variable,
    zarr_group_url,
)
from zarrckpt.manager import CheckpointManager
from zarrckpt.optimizer import Optimizer
from zarrckpt.options import CheckpointOptions
from zarrckpt.python_state import NumpyState, PythonState
from zarrckpt.record import ObjectGraph
from zarrckpt.trackable import AutoTrackable, NoDependency, Trackable
from zarrckpt.tracking import UniqueNameTracker, split_dependency
from zarrckpt.variable import Variable, capture_dependencies
from zarrckpt.verify import VerifyReport, verify

_register_ml_dtypes()


def __getattr__(name: str) -> object:
    # zc.torch (the PyTorch adapter) imports torch, so only when first used.
    if name == "torch":
        import importlib

        return importlib.import_module("zarrckpt.torch")
    raise AttributeError(f"module 'zarrckpt' has no attribute {name!r}")


__version__ = "0.2.0"

# Names of TensorFlow's tf.contrib.checkpoint module, kept as aliases.
CheckpointableBase = Trackable
Checkpointable = AutoTrackable
Mapping = Dict
PythonStateWrapper = PythonState
CheckpointableObjectGraph = ObjectGraph

__all__ = [
    "AutoTrackable",
    "BloscLZ4",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointLoadStatus",
    "CheckpointManager",
    "CheckpointOptions",
    "Checkpointable",
    "CheckpointableBase",
    "CheckpointableObjectGraph",
    "Compression",
    "Dict",
    "InitializationOnlyStatus",
    "LazyVariable",
    "List",
    "Mapping",
    "NoDependency",
    "NumpyState",
    "ObjectGraph",
    "Optimizer",
    "PythonState",
    "PythonStateWrapper",
    "Trackable",
    "UniqueNameTracker",
    "Variable",
    "VerifyReport",
    "Zstd",
    "__version__",
    "capture_dependencies",
    "copy_checkpoint",
    "delete_checkpoint",
    "dot_graph_from_checkpoint",
    "gc",
    "latest_checkpoint",
    "list_checkpoints",
    "list_objects",
    "list_variables",
    "load_variable",
    "object_metadata",
    "open_variable",
    "split_dependency",
    "verify",
    "zarr_group_url",
]
