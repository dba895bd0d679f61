"""Sign election and disjoint merging (TIES): pure functions over stacked deltas.

``deltas`` is a float32 tensor of shape ``(n_models, *param_shape)``. Masks may be bool or
float (1.0 / 0.0); the float forms are much faster on CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

ConsensusMethod = Literal["sum", "count"]


def elect_sign(deltas: torch.Tensor, method: ConsensusMethod = "sum") -> torch.Tensor:
    """The elected sign (+1 or -1) per entry.

    ``"sum"`` (TIES paper): the sign of the summed deltas (mass-weighted vote);
    ``"count"``: the sign held by more models. Zero totals elect +1 (as mergekit does).
    """
    if method == "sum":
        total = deltas.sum(dim=0)
    elif method == "count":
        total = deltas.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}; expected 'sum' or 'count'.")
    return torch.where(total >= 0, 1.0, -1.0).to(deltas.dtype)


def agreement_mask(deltas: torch.Tensor, method: ConsensusMethod = "sum") -> torch.Tensor:
    """Boolean mask of the entries whose sign agrees with the elected sign (zeros never agree)."""
    return deltas.sign() == elect_sign(deltas, method).unsqueeze(0)


def agreement(deltas: torch.Tensor, method: ConsensusMethod = "sum") -> torch.Tensor:
    """:func:`agreement_mask` as floats (1.0 agrees, 0.0 not), computed without bool tensors.

    Note:
        Same values as ``agreement_mask(deltas, method).float()``, several times faster on CPU
        (torch's float comparisons are vectorized, its bool ones are not). The elected sign is
        ``copysign(1, total)``, which differs from :func:`elect_sign` only at a total of -0.0;
        there every delta is zero, and zeros agree with no sign.
    """
    if method == "sum":
        total = deltas.sum(dim=0)
    elif method == "count":
        total = deltas.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}; expected 'sum' or 'count'.")
    elected = torch.copysign(torch.ones((), dtype=deltas.dtype), total)
    product = deltas * elected  # > 0 exactly where the signs agree (finite, nonzero deltas)
    return torch.gt(product, 0, out=product)


def disjoint_sum(weighted: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, *,
                 normalize: bool) -> torch.Tensor:
    """Sum the agreeing weighted deltas; with ``normalize``, divide each entry by the total
    weight of the models that agree there (entries nobody agrees on stay 0)."""
    merged = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (weights * mask).sum(dim=0)
        divisor += torch.eq(divisor, 0, out=torch.empty_like(divisor))  # 0 -> 1 (float mask: fast)
        merged = merged / divisor
    return merged
