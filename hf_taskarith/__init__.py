"""hf_taskarith: task arithmetic for the Hugging Face ecosystem.

Public API (re-exports only): :class:`TaskVector`, :func:`merge`, :func:`merge_from_config`,
the merge-method registry, compression, Hub push/pull, and the error types.
"""

from .apply import ApplyReport, check_compatibility
from .compression import compress
from .errors import (
    CheckpointNotFoundError, ConcurrentPushError, HubError, NotATaskVectorRepoError, CorruptCheckpointError, IncompatibleBaseError, KeyMismatchError,
    MergeConfigError, NonFiniteError, ShapeMismatchError, TaskArithError, UnknownMethodError,
)
from .merging import get_merge_method, list_merge_methods, merge, register_merge_method
from .merging.config import MergeConfig, merge_from_config
from .hub.pull import list_task_vector_versions, pull_task_vector
from .hub.push import push_task_vector
from .metadata import TaskVectorMetadata
from .task_vector import TaskVector
from .version import __version__

_LAZY = {  # imported on first use: they pull in transformers' Trainer, which the merge CLI never needs
    "LinearizedModel": ("hf_taskarith.linearize", "LinearizedModel"),
    "LinearizedTrainer": ("hf_taskarith.training", "LinearizedTrainer"),
    # peft adapters: importing them registers the methods with peft
    "LinearizedLoraConfig": ("hf_taskarith.adapters", "LinearizedLoraConfig"),
    "TangentConfig": ("hf_taskarith.adapters", "TangentConfig"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hf_taskarith' has no attribute {name!r}")


__all__ = [
    "LinearizedModel", "LinearizedTrainer", "LinearizedLoraConfig", "TangentConfig",
    "TaskVector", "TaskVectorMetadata", "check_compatibility", "ApplyReport", "merge", "merge_from_config", "MergeConfig",
    "get_merge_method", "list_merge_methods", "register_merge_method", "compress",
    "push_task_vector", "pull_task_vector", "list_task_vector_versions",
    "TaskArithError", "CheckpointNotFoundError", "CorruptCheckpointError", "IncompatibleBaseError",
    "KeyMismatchError", "MergeConfigError", "HubError", "ConcurrentPushError", "NotATaskVectorRepoError", "NonFiniteError", "ShapeMismatchError", "UnknownMethodError",
    "__version__",
]
