"""hf_taskarith: task arithmetic for the Hugging Face ecosystem.

Public API (re-exports only): :class:`TaskVector`, :func:`merge`, :func:`merge_from_config`,
the merge-method registry, compression, Hub push/pull, and the error types.
"""

import importlib

# Every export loads on first use (PEP 562): ``import hf_taskarith`` is cheap, and the
# torch-free merge path (``hf-taskarith merge`` of a task_arithmetic or linear config) never imports
# torch. transformers' Trainer and peft load only with the linearization exports.
_LAZY: dict[str, tuple[str, str]] = {
    **{name: ("hf_taskarith.errors", name) for name in (
        "TaskArithError", "CheckpointNotFoundError", "CorruptCheckpointError", "IncompatibleBaseError",
        "KeyMismatchError", "MergeConfigError", "HubError", "ConcurrentPushError", "NotATaskVectorRepoError",
        "NonFiniteError", "ShapeMismatchError", "UnknownMethodError")},
    "ApplyReport": ("hf_taskarith.apply", "ApplyReport"),
    "check_compatibility": ("hf_taskarith.apply", "check_compatibility"),
    "compress": ("hf_taskarith.compression", "compress"),
    "merge": ("hf_taskarith.merging.api", "merge"),
    "get_merge_method": ("hf_taskarith.merging.registry", "get_merge_method"),
    "list_merge_methods": ("hf_taskarith.merging.registry", "list_merge_methods"),
    "register_merge_method": ("hf_taskarith.merging.registry", "register_merge_method"),
    "MergeConfig": ("hf_taskarith.merging.config", "MergeConfig"),
    "merge_from_config": ("hf_taskarith.merging.config", "merge_from_config"),
    "list_task_vector_versions": ("hf_taskarith.hub.pull", "list_task_vector_versions"),
    "pull_task_vector": ("hf_taskarith.hub.pull", "pull_task_vector"),
    "push_task_vector": ("hf_taskarith.hub.push", "push_task_vector"),
    "TaskVectorMetadata": ("hf_taskarith.metadata", "TaskVectorMetadata"),
    "TaskVector": ("hf_taskarith.task_vector", "TaskVector"),
    "__version__": ("hf_taskarith.version", "__version__"),
    "LinearizedModel": ("hf_taskarith.linearize", "LinearizedModel"),
    "LinearizedTrainer": ("hf_taskarith.training", "LinearizedTrainer"),
    # peft adapters: importing them registers the methods with peft
    "LinearizedLoraConfig": ("hf_taskarith.adapters", "LinearizedLoraConfig"),
    "TangentConfig": ("hf_taskarith.adapters", "TangentConfig"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hf_taskarith' has no attribute {name!r}")


__all__ = [
    "LinearizedModel", "LinearizedTrainer", "LinearizedLoraConfig", "TangentConfig",
    "TaskVector", "TaskVectorMetadata", "check_compatibility", "ApplyReport",
    "merge", "merge_from_config", "MergeConfig",
    "get_merge_method", "list_merge_methods", "register_merge_method", "compress",
    "push_task_vector", "pull_task_vector", "list_task_vector_versions",
    "TaskArithError", "CheckpointNotFoundError", "CorruptCheckpointError", "IncompatibleBaseError",
    "KeyMismatchError", "MergeConfigError", "HubError", "ConcurrentPushError", "NotATaskVectorRepoError",
    "NonFiniteError", "ShapeMismatchError", "UnknownMethodError",
    "__version__",
]
