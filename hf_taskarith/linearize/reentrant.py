"""Calling a torch function from a ``TorchFunctionMode`` with the mode still active for what it calls.

Both of this package's modes (the dual engine's tangent rules, the ``"jvp"`` engine's math
attention) must also see the torch calls made *inside* Python-level ``torch.nn.functional``
composites such as ``F.multi_head_attention_forward``, which call SDPA and ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def call_reentrant(mode: TorchFunctionMode, func: Any, types: Any, args: Any, kwargs: dict) -> Any:
    """Call ``func`` from ``mode.__torch_function__``, with ``mode`` active for the calls it makes.

    Inside ``__torch_function__`` a mode is switched off, so a ``torch.nn.functional``
    composite written in Python (``F.multi_head_attention_forward``) would run its inner torch
    calls -- an SDPA call, say -- past the mode. Those functions are re-dispatched with the mode
    pushed again (``torch.overrides.redispatch_function``, PyTorch >= 2.13). Everything else is
    called directly: built-in operators make no nested calls, and Python-level ``Tensor``
    methods dispatch to themselves again (re-entering them would recurse). On older PyTorch, and
    while ``torch.compile`` traces (dynamo cannot re-enter a mode), nested calls bypass the mode.
    """
    redispatch = getattr(torch.overrides, "redispatch_function", None)
    if (redispatch is None or getattr(func, "__module__", None) != "torch.nn.functional"
            or torch.compiler.is_compiling()):
        return func(*args, **kwargs)
    with mode:
        return redispatch(func, types, args, kwargs)
