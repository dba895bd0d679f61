"""hf_taskarith: task arithmetic for the Hugging Face ecosystem.

Public API (re-exports only): :class:`TaskVector`, :func:`merge`, :func:`merge_from_config`,
the merge-method registry, and the error types.
"""

from .errors import (
    CheckpointNotFoundError, CorruptCheckpointError, IncompatibleBaseError, KeyMismatchError,
    MergeConfigError, NonFiniteError, ShapeMismatchError, TaskArithError, UnknownMethodError,
)
from .merging import get_merge_method, list_merge_methods, merge, register_merge_method
from .merging.config import MergeConfig, merge_from_config
from .metadata import TaskVectorMetadata
from .task_vector import TaskVector
from .version import __version__

__all__ = [
    "TaskVector", "TaskVectorMetadata", "merge", "merge_from_config", "MergeConfig",
    "get_merge_method", "list_merge_methods", "register_merge_method",
    "TaskArithError", "CheckpointNotFoundError", "CorruptCheckpointError", "IncompatibleBaseError",
    "KeyMismatchError", "MergeConfigError", "NonFiniteError", "ShapeMismatchError", "UnknownMethodError",
    "__version__",
]
