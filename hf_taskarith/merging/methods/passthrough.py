"""Passthrough: one model's weights, unchanged or multiplied by ``scale`` (mergekit's ``passthrough``).

mergekit uses it with ``slices`` to stack layers of several models (frankenmerges; see
:mod:`hf_taskarith.merging.slices`); with ``models:`` it copies (and optionally rescales) one
whole model: re-sharding, converting the dtype (``dtype: bfloat16``) or scaling a model in the
same YAML format.

It takes exactly one model and needs no base; ``base_model``, when given, is only the
reference for tensor names, shapes, the default output dtype and the tokenizer (mergekit
counts it as a second input and refuses the config).

Note:
    Cost: one read and one multiply per tensor.

Example:
    >>> import torch
    >>> passthrough_merge([torch.ones(2)], {"scale": [0.5]}, None, base=torch.zeros(2))
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..registry import MergeMethod, ParamSpec, register_merge_method


def passthrough_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                      base: torch.Tensor) -> torch.Tensor:
    """The one model's weights (consumed), times ``scale`` when it is set."""
    if len(weights) != 1:
        raise MergeConfigError(f"passthrough copies exactly one model; got {len(weights)} for this tensor.")
    scale = p["scale"][0]
    return weights[0] if scale is None else weights[0].mul_(scale)


register_merge_method(MergeMethod(
    name="passthrough", fn=passthrough_merge,
    params=(ParamSpec("scale", None, per_model=True,
                      help="multiply the model's weights by this (default: unchanged)"),),
    description="One model's weights, unchanged or scaled.",
    reference="https://github.com/arcee-ai/mergekit", needs_base=False, on_weights=True, min_models=1, max_models=1,
))
