"""Built-in merge methods, one module each; :func:`load` imports (and so registers) them.

They load on first lookup (:func:`hf_taskarith.merging.registry.get_merge_method`), not
when this package is imported, so code that needs one method's declaration does not pay
for importing every method's tensor code.
"""

from __future__ import annotations

import importlib

#: the built-in method modules, by module name
BUILTIN = ("breadcrumbs", "dare", "della", "iso", "linear", "magnitude_prune", "task_arithmetic", "ties", "tsv",
           "slerp", "model_stock", "passthrough", "hierarchical", "sce", "arcee_fusion",
           "nuslerp", "multislerp", "karcher", "nearswap")


def load(*names: str) -> None:
    """Import the named built-in method modules (default: all)."""
    for name in names or BUILTIN:
        importlib.import_module(f"{__name__}.{name}")
