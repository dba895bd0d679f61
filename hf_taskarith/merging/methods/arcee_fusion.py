"""Arcee Fusion: take the model's changes only where they matter most (mergekit's ``arcee_fusion``).

Between the base ``theta_0`` and exactly one other model ``theta_1``, per tensor:

1. **Importance** of each entry: its change times the KL divergence of its row (the last
   dimension; a 1-D tensor is one row) between the two models' softmaxes::

       importance = |theta_1 - theta_0| * KL(softmax(theta_1) + 1e-8 || softmax(theta_0) + 1e-8)

2. **Threshold**: the upper Tukey fence of the importances, ``median + 1.5 (q3 - q1)``, with the
   quartiles taken as order statistics: ``q`` is the ``floor(q (n - 1))``-th smallest of the
   ``n`` importances (0-based; no interpolation), as mergekit does.
3. **Fuse**: ``theta_0 + (theta_1 - theta_0) * [importance >= threshold]``: the model's value
   where the importance is an outlier (at or above the fence), the base's elsewhere.

No parameters. The arithmetic is mergekit 0.1.5's, step by step in float32, so float32 inputs
give mergekit's result bit for bit on tensors of at most a million entries. Above that,
mergekit estimates the quartiles from 10^6 entries drawn at random (with replacement, from
torch's global RNG, so its result changes from run to run); we always take the exact order
statistics of all entries, so our result is reproducible and is what mergekit's estimates.

Note:
    Cost: not elementwise (row softmaxes, quartiles of the whole tensor), so it runs on whole
    tensors: about 4 float32 tensors of its size besides the inputs, and three linear-time
    selections (``torch.kthvalue``, each on a copy of the importances). Needs the base model
    and exactly one other model.

Example:
    >>> import torch
    >>> base = torch.zeros(1, 8)
    >>> model = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3.0]])
    >>> arcee_fusion(model, base)  # one row: importance ~ |change|; only 3.0 is above the fence
    tensor([[0., 0., 0., 0., 0., 0., 0., 3.]])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...errors import MergeConfigError
from ..registry import MergeMethod, register_merge_method

#: added to both softmaxes, so the KL divergence is finite
EPS = 1e-8
#: the quartiles of the fence, and the fence's multiple of the interquartile range
QUARTILES = (0.25, 0.5, 0.75)
FENCE = 1.5


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per entry, ``|model - base|`` times its row's KL divergence between the softmaxes.

    Args:
        model, base: float32 tensors of the same shape; rows are along the last dimension.

    Returns:
        A float32 tensor of their shape, ``>= 0`` up to rounding of the KL divergence.
    """
    p = F.softmax(model, dim=-1).add_(EPS)
    q = F.softmax(base, dim=-1).add_(EPS)
    kl = torch.sum(p * torch.log_(p / q), dim=-1, keepdim=True)
    del p, q
    return (model - base).abs_().mul_(kl)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """The upper fence ``median + 1.5 (q3 - q1)`` of the importances, quartiles as order statistics.

    Args:
        importance: a float32 tensor (any shape, at least one entry).

    Returns:
        A 0-dim float32 tensor.

    Example:
        >>> fusion_threshold(torch.arange(9.0))  # q1 = 2, median = 4, q3 = 6
        tensor(10.)
    """
    flat = importance.reshape(-1)
    # 0-based ranks floor(q (n - 1)), the product rounded in float32 as mergekit computes it
    ranks = (torch.tensor(QUARTILES, dtype=torch.float32) * (flat.numel() - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat, r + 1).values for r in ranks)
    return median + FENCE * (q3 - q1)


def arcee_fusion(model: torch.Tensor, base: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Fuse one model into the base: its weights where their importance is an outlier.

    Args:
        model, base: float32 weights of the same shape.
        inplace: write the result into ``model``.

    Returns:
        ``base + (model - base) * [importance >= threshold]``.
    """
    if model.shape != base.shape:
        raise ValueError(f"arcee_fusion: model shape {list(model.shape)} differs from base shape {list(base.shape)}.")
    if model.numel() == 0:
        return model if inplace else model.clone()
    importance = fusion_importance(model, base)
    keep = importance >= fusion_threshold(importance)
    del importance
    out = model if inplace else model.clone()
    return out.sub_(base).mul_(keep).add_(base)  # round(model - base), masked, plus the base


def arcee_fusion_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                       base: torch.Tensor) -> torch.Tensor:
    """The registered function: the base's and one model's weights -> the fused weights.

    Raises:
        MergeConfigError: other than one model for this tensor.
    """
    if len(weights) != 1:
        raise MergeConfigError(f"arcee_fusion fuses one model into the base; got {len(weights)} models for this "
                               "tensor. List exactly one model besides base_model.")
    return arcee_fusion(weights[0], base, inplace=True)


register_merge_method(MergeMethod(
    name="arcee_fusion", fn=arcee_fusion_merge, params=(),
    description="The base, with the other model's values where their importance (change times the row's KL "
                "divergence) is at or above median + 1.5 IQR.",
    reference="https://arcee.ai", on_weights=True, min_models=1, max_models=1,
))
