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

:func:`karcher` is mergekit 0.1.5's arithmetic, step by step in float32 (each step waits on
its norms, as there), so on float32 inputs it gives mergekit's result bit for bit. The mean
stays in the span of the directions, so the merge engine runs the whole iteration on the
tensor's Gram matrix in float64 (:func:`karcher_coefficients`, :mod:`..span`) and writes the
result in one more pass: equal to :func:`karcher` to float32 rounding (mergekit iterates bf16
inputs in bf16, so on bf16 checkpoints ours is the more accurate).

Note:
    Cost in the engine: two passes over the inputs as stored, whatever ``max_iter``; memory a
    few blocks per thread. :func:`karcher` on whole tensors: ``max_iter`` passes over the ``N``
    directions, memory about ``N + 3`` float32 tensors of the tensor's size.

Example:
    >>> import torch
    >>> karcher([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])  # 45 degrees, mean norm 3
    tensor([2.1213, 2.1213])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import MergeConfigError
from ..blockwise import KernelContext
from ..registry import MergeMethod, ParamSpec, register_merge_method
from ..span import SpanKernel, input_vectors, on_basis, vectors_gram


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


def karcher_coefficients(gram: torch.Tensor, *, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """:func:`karcher`'s result as ``sum_i c_i x_i``, from the points' Gram matrix: the same
    iteration with every vector held as coefficients on the points (float64).

    Args:
        gram: ``(1, N, N)`` float64 Gram matrix of the points ``x_i``.
        max_iter, tol: as :func:`karcher`.

    Returns:
        ``(1, N)`` float64 coefficients.
    """
    n = gram.shape[-1]
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g = gram[0]
    norms = g.diagonal().clamp(min=0).sqrt()
    kept = [i for i in range(n) if float(norms[i]) > tol]
    out = torch.zeros(1, n, dtype=torch.float64)
    if not kept:
        return out
    r = norms[kept]
    gu = g[kept][:, kept] / (r[:, None] * r[None, :])  # Gram matrix of the directions
    a = torch.full((len(kept),), 1.0 / len(kept), dtype=torch.float64)

    def norm(v: torch.Tensor) -> float:
        return max(float(v @ gu @ v), 0.0) ** 0.5

    mean = a.clone()
    length = norm(mean)
    if length < tol:
        mean = torch.zeros_like(a)
        mean[0] = 1
    else:
        mean = mean / length
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        cosines = (gu @ mean).clamp(-1, 1)
        for i in range(len(kept)):
            theta = math.acos(float(cosines[i]))
            if theta < tol:
                continue
            e = torch.zeros_like(mean)
            e[i] = 1
            step += a[i] * (theta / math.sin(theta)) * (e - cosines[i] * mean)
        length = norm(step)
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * (step / length)
        length = norm(mean)
        if length > tol:
            mean = mean / length
    scale = float(norms.sum()) / n
    out[0, kept] = scale * mean / r
    return out


def karcher_kernel(p: dict[str, Any], context: KernelContext) -> SpanKernel | None:
    """The engine's block kernel: :func:`karcher_merge` on the span of the inputs."""
    n = len(context.is_base)
    separate_base = context.base_given and not any(context.is_base)  # one more point
    points = input_vectors(n, list(range(n)), weights=True, base=separate_base)

    def solve(gram: torch.Tensor) -> torch.Tensor:
        coef = karcher_coefficients(vectors_gram(gram, points), max_iter=p["max_iter"], tol=p["tol"])
        return on_basis(coef, points, plus_base=False)

    return SpanKernel(solve, shape=context.shape)


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
    name="karcher", fn=karcher_merge, block_kernel=karcher_kernel,
    params=(ParamSpec("max_iter", 10, kind=int, low=0, help="the most steps of the fixed-point iteration"),
            ParamSpec("tol", 1e-5, low=0.0, help="norms, angles and step lengths below this count as zero")),
    description="Karcher (Riemannian) mean of the models' directions on the unit sphere, rescaled to their mean "
                "norm.",
    reference="https://arxiv.org/abs/2603.04972", needs_base=False, on_weights=True, min_models=1,
))
