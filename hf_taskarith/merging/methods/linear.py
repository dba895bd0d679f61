"""Linear merging (model soups, Wortsman et al., 2022): a weighted sum of whole models,
divided by the sum of weights when ``normalize`` (the default).

Computed in delta space against a reference ``ref`` (the base model when given, otherwise
the first model): ``sum_i w_i theta_i = ref * sum_i w_i + sum_i w_i (theta_i - ref)``.
A model listed as both ``base_model`` and among the models is averaged with its weight,
as in mergekit.
"""

from __future__ import annotations

from typing import Any

import torch

from ..blockwise import ElementwiseKernel
from ..registry import MergeMethod, ParamSpec, register_merge_method, weight_param


def linear_merge(deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                 base: torch.Tensor) -> torch.Tensor:
    """The merged delta ``result - base`` of the weighted (normalized) sum of models."""
    weights = p["weight"]
    total = float(sum(weights))
    merged = deltas[0].mul_(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        merged.add_(d, alpha=w)
    if p["normalize"]:
        return merged.div_(total if abs(total) >= 1e-8 else 1.0)
    return merged.add_(base, alpha=total - 1.0)


register_merge_method(MergeMethod(
    name="linear", fn=linear_merge,
    params=(weight_param(), ParamSpec("normalize", True, kind=bool, help="divide by the sum of weights")),
    description="Weighted average of the models' weights (normalized by the sum of weights).",
    reference="https://arxiv.org/abs/2203.05482", needs_base=False, elementwise=True, takes_base=True,
    block_kernel=lambda p: ElementwiseKernel(linear_merge, p, takes_base=True, linear=True),
))
