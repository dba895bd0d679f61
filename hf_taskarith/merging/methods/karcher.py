"""Karcher mean: the Riemannian centre of mass of the models on the unit sphere, rescaled to
their mean norm (mergekit's ``karcher``; see https://arxiv.org/abs/2603.04972).

Each tensor is one vector per model ``x_i`` (its weights: the method is defined on whole
models, not task vectors), with norm ``n_i`` and direction ``u_i = x_i / n_i``. Every model
counts ``1 / N``. Starting from the normalized mean of the directions, each step moves the
mean ``m`` along the weighted sum of the logarithms of the directions at ``m``::

    tau = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),    cos(theta_i) = u_i . m
    m <- cos(|tau|) m + sin(|tau|) tau / |tau|,    renormalized

for at most ``max_iter`` steps, stopping once ``|tau| < tol``; directions within ``tol``
radians of ``m`` add nothing to a step. The result is ``(sum_i n_i / N) m``. Models whose
tensor has a norm of at most ``tol`` give no direction (their ``a_i`` are spread over the
others) but still count in the mean norm; if every norm is at most ``tol`` the result is 0.

The base model is not a reference point here (mergekit ignores that role): a ``base_model``
given apart from ``models`` is one more model to average, as in mergekit; listed among
``models`` too, it counts once. Without ``base_model`` the models alone are averaged.

The arithmetic is mergekit 0.1.5's, step by step in float32 (each step waits on its norms,
as there), so float32 inputs give mergekit's result bit for bit.

Note:
    Cost: ``max_iter`` passes over the ``N`` directions (one dot product and one update each),
    memory about ``N + 3`` float32 tensors of the tensor's size.

Example:
    >>> import torch
    >>> karcher([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])  # 45 degrees, mean norm 3
    tensor([2.1213, 2.1213])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..registry import MergeMethod, ParamSpec, register_merge_method


def karcher(points: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equally weighted Karcher mean of ``points`` on the unit sphere, times their mean norm.

    Args:
        points: float32 tensors of the same shape.
        max_iter: the most steps of the fixed-point iteration.
        tol: norms, angles and step lengths below this count as zero.

    Returns:
        A tensor of ``points[0]``'s shape (one point: that point itself).
    """
    n = len(points)
    if n == 1:
        return points[0]
    share = 1.0 / n
    norms = [torch.linalg.vector_norm(x) for x in points]
    kept = [(x / r, share) for x, r in zip(points, norms) if r.item() > tol]  # (direction, a_i) of each usable point
    if not kept:
        return torch.zeros_like(points[0])
    total = sum(a for _, a in kept)
    kept = [(u, a / total) for u, a in kept]
    mean = torch.zeros_like(kept[0][0])
    for u, a in kept:
        mean += a * u
    length = torch.linalg.vector_norm(mean)
    mean = kept[0][0].clone() if length.item() < tol else mean / length
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for u, a in kept:
            cos = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += a * (theta / torch.sin(theta)) * (u - cos * mean)
        length = torch.linalg.vector_norm(step)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        length = torch.linalg.vector_norm(mean)
        if length.item() > tol:
            mean = mean / length
    scale = sum(share * r for r in norms)
    return scale * mean


def karcher_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                  base: torch.Tensor | None) -> torch.Tensor:
    """The registered function: the models' weights (and a separate base's, counted as one more
    model; ``None`` without one) -> the Karcher mean.

    Raises:
        MergeConfigError: no model for this tensor.
    """
    points = list(weights)
    if base is not None and not any(w is base for w in points):  # a separate base_model is one more point
        points.append(base)
    if not points:
        raise MergeConfigError("karcher needs at least one model; list the models under models.")
    return karcher(points, max_iter=p["max_iter"], tol=p["tol"])


register_merge_method(MergeMethod(
    name="karcher", fn=karcher_merge,
    params=(ParamSpec("max_iter", 10, kind=int, low=0, help="the most steps of the fixed-point iteration"),
            ParamSpec("tol", 1e-5, low=0.0, help="norms, angles and step lengths below this count as zero")),
    description="Karcher (Riemannian) mean of the models' directions on the unit sphere, rescaled to their mean "
                "norm.",
    reference="https://arxiv.org/abs/2603.04972", needs_base=False, on_weights=True, min_models=1,
))
