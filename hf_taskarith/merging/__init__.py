"""The merge engine: registry of methods, streaming engine, ``merge()`` and YAML configs.

Exports load on first use (PEP 562), so importing a light submodule (the registry, the
YAML config, the torch-free :mod:`.lite` path) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "merge": ".api",
    "MergeMethod": ".registry", "ParamSpec": ".registry", "get_merge_method": ".registry",
    "list_merge_methods": ".registry", "register_merge_method": ".registry",
    "Gradient": ".schedule", "Conditional": ".schedule", "Case": ".schedule",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
