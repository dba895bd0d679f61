"""NearSwap: take the other model's value where it is near the base's (mergekit's ``nearswap``;
alchemonaut, "QuartetAnemoi-70B-t0.0001").

Entry by entry, with ``a`` the base's weight and ``b`` the model's::

    w = clamp(t / max(|a - b|, 1e-6), 0, 1),    result = w * b + (1 - w) * a

so where the two differ by at most ``t`` the model's value is taken (``w = 1``), and the
further apart they are the closer the result stays to the base (``w = t / |a - b|``). ``t = 0``
gives the base; a large ``t`` gives the model.

The arithmetic is mergekit 0.1.5's, step by step in float32 (``t / x`` computed as
``t * (1 / x)``, as torch evaluates a number divided by a tensor), so float32 inputs give
mergekit's result bit for bit.

Note:
    Cost: elementwise, so the merge engine runs it on blocks of the weights (a few blocks per
    thread in memory, bit-identical to whole tensors). It needs the base model and exactly one
    other model.

Example:
    >>> import torch
    >>> nearswap(0.1, torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.2, 1.0]))
    tensor([0.0500, 0.1000, 0.1000])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..registry import REQUIRED, MergeMethod, ParamSpec, register_merge_method

#: distances below this count as this (no division by zero where the two are equal)
MIN_DISTANCE = 1e-6


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Entry by entry, ``other`` where it is within ``t`` of ``base``, else pulled towards ``base``.

    Args:
        t: the distance up to which ``other``'s value is taken whole; ``t >= 0``.
        base, other: float32 tensors of the same shape.

    Returns:
        A new tensor, ``base``'s shape.
    """
    return _nearswap_into(t, base, other.clone())


def _nearswap_into(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """:func:`nearswap`, written into ``other``: the same float32 operations as
    ``w = clamp(t / clamp(|base - other|)); w * other + (1 - w) * base``, in place on one temporary."""
    x = torch.sub(base, other)
    x.abs_().clamp_(min=MIN_DISTANCE).reciprocal_().mul_(t).clamp_(min=0, max=1)  # t / x is t * (1 / x) in torch
    other.mul_(x)
    x.neg_().add_(1).mul_(base)  # (1 - w) * base
    return other.add_(x)


def nearswap_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                   base: torch.Tensor) -> torch.Tensor:
    """The registered function: the base's and one model's weights -> the NearSwap weights.

    Raises:
        MergeConfigError: not exactly one model for this tensor.
    """
    if len(weights) != 1:
        raise MergeConfigError(f"nearswap compares the base with one model; got {len(weights)} models for this "
                               "tensor. List exactly one model besides base_model.")
    other = weights[0] if weights[0] is not base else base.clone()  # the engine's float32 weights are ours to consume
    return _nearswap_into(p["t"], base, other)


register_merge_method(MergeMethod(
    name="nearswap", fn=nearswap_merge,
    params=(ParamSpec("t", REQUIRED, low=0.0,
                      help="distance up to which the model's value replaces the base's; further apart, "
                           "the fraction t / |base - model| of the way"),),
    description="Entry by entry, the other model's weight where it is within t of the base's, else pulled "
                "towards the base.",
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", on_weights=True, elementwise=True,
    min_models=1,
    max_models=1,
))
