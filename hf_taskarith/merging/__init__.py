"""The merge engine: registry of methods, streaming engine, ``merge()`` and YAML configs."""

from .api import merge
from .registry import MergeMethod, ParamSpec, get_merge_method, list_merge_methods, register_merge_method

__all__ = ["merge", "MergeMethod", "ParamSpec", "get_merge_method", "list_merge_methods",
           "register_merge_method"]
