"""Where :class:`~hf_taskarith.TaskVector`'s convenience methods live.

``tv.push_to_hub(...)``, ``tv.compress(...)``, ``tv.apply_to(...)``, ``TaskVector.from_peft(...)``
and the like are thin methods over functions of the rooms that build *on* task vectors (hub,
compression, apply, merging, adapters). Those rooms import :mod:`hf_taskarith.task_vector`;
``task_vector`` must not import them back. Each method therefore looks its function up here, by
name, and the function's module is imported on first use. The table is the one place that
records these upward edges; the import graph of the rooms has no cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

#: convenience name -> "module:function"
DELEGATES: dict[str, str] = {
    "from_peft": "hf_taskarith.adapters.convert:task_vector_from_peft",
    "pull": "hf_taskarith.hub.pull:pull_task_vector",
    "push": "hf_taskarith.hub.push:push_task_vector",
    "compress": "hf_taskarith.compression:compress",
    "open_compressed": "hf_taskarith.compression.compressed:open_compressed",
    "apply_to_module": "hf_taskarith.apply:apply_to_module",
    "merge": "hf_taskarith.merging.api:merge",
}


def delegate(name: str) -> Callable[..., Any]:
    """The function registered as ``name`` (its module imported now if it was not).

    Raises:
        KeyError: ``name`` is not in :data:`DELEGATES`.
    """
    try:
        target = DELEGATES[name]
    except KeyError:
        raise KeyError(f"no delegate {name!r}; known: {sorted(DELEGATES)}") from None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)
