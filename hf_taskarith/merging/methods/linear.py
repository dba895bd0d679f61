"""Linear merging (model soups, Wortsman et al., 2022): a weighted sum of whole models,
divided by the sum of weights when ``normalize`` (the default).

Computed in delta space against a reference ``ref`` (the base model when given, otherwise
the first model): ``sum_i w_i theta_i = ref * sum_i w_i + sum_i w_i (theta_i - ref)``.
A model listed as both ``base_model`` and among the models is averaged with its weight,
as in mergekit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import MergeConfigError
from ..registry import MergeMethod, ParamSpec, register_merge_method, weight_param

if TYPE_CHECKING:  # the maths below needs only tensor methods: importing this module costs no torch
    import torch


def linear_merge(deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                 base: torch.Tensor) -> torch.Tensor:
    """The merged delta ``result - base`` of the weighted (normalized) sum of models.

    Every product is rounded before it is added (no fused multiply-add), so the torch-free
    path (:mod:`hf_taskarith.merging.lite`) gets the same bits.
    """
    weights = p["weight"]
    total = float(sum(weights))
    merged = deltas[0].mul_(weights[0])
    for d, w in zip(deltas[1:], weights[1:]):
        merged.add_(d.mul_(w))
    if p["normalize"]:
        return merged.div_(total if abs(total) >= 1e-8 else 1.0)
    return merged.add_(base * (total - 1.0))


def check_linear(p: dict[str, Any]) -> None:
    """A normalized average needs weights that do not sum to zero.

    Raises:
        MergeConfigError: ``normalize`` and ``|sum(weights)| < 1e-8`` (dividing by it is undefined;
            mergekit would divide by 1 instead and silently write ``sum_i w_i theta_i``).
    """
    total = float(sum(p["weight"]))
    if p["normalize"] and abs(total) < 1e-8:
        raise MergeConfigError(f"linear: the weights {p['weight']} sum to {total:g}, so the normalized average is "
                               "undefined; give weights that do not cancel, or set normalize: false for the plain "
                               "weighted sum.")


def _block_kernel(p: dict[str, Any], context: Any = None):
    from ..blockwise import ElementwiseKernel

    return ElementwiseKernel(linear_merge, p, takes_base=True, linear=True)


register_merge_method(MergeMethod(
    name="linear", fn=linear_merge,
    params=(weight_param(), ParamSpec("normalize", True, kind=bool, help="divide by the sum of weights")),
    description="Weighted average of the models' weights (normalized by the sum of weights).",
    reference="https://arxiv.org/abs/2203.05482", needs_base=False, elementwise=True, takes_base=True,
    block_kernel=_block_kernel, check=check_linear,
))
