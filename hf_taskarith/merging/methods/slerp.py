"""SLERP: spherical linear interpolation between the base model and one other model
(Shoemake, "Animating rotation with quaternion curves", 1985; mergekit's ``slerp``).

Each tensor is one vector. With ``theta`` the angle between the base's and the model's
weights, the merge at ``t`` is::

    sin((1 - t) theta) / sin(theta) * base  +  sin(t theta) / sin(theta) * model

so ``t = 0`` gives the base (the first endpoint, as in mergekit) and ``t = 1`` the model;
values outside ``[0, 1]`` extrapolate along the same arc. Where the two vectors are nearly
colinear or opposite (``|cos theta| > 0.9995``) the ratio of sines is ill-conditioned and
plain linear interpolation ``(1 - t) base + t model`` is used instead. A norm below ``1e-8``
counts as 1, so a zero tensor gives a finite result.

The arithmetic is mergekit 0.1.5's, step by step in float32 (norms taken over chunks of 2^20
entries and combined as the norm of the chunk norms; the dot product of the normalized
vectors summed chunk by chunk), so float32 inputs give mergekit's result bit for bit.

The merge engine runs the same formula block by block (:func:`slerp_coefficients` on the
tensor's Gram matrix, :mod:`..span`): equal to :func:`slerp` to float32 rounding (on the rare
tensor whose ``|cos theta|`` lies within float32 rounding of ``0.9995`` the two may pick
different branches, which differ by ``O(theta^2)``).

Note:
    Cost in the engine: two passes over the two inputs as stored, memory a few blocks per
    thread. :func:`slerp` on whole tensors: three passes over the two tensors (norms, dot
    product, result), the result written into the model's tensor; extra memory a few chunks
    (4 MB each). ``t`` may vary by tensor as in mergekit (``t: [0, 0.5, 1]`` over the layers,
    ``filter`` lists; :mod:`..schedule`): this function receives each tensor's own ``t``.

Example:
    >>> import torch
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> slerp(0.5, a, b)  # the midpoint of the quarter circle, not of the chord
    tensor([0.7071, 0.7071])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..blockwise import KernelContext
from ..registry import REQUIRED, MergeMethod, ParamSpec, register_merge_method
from ..span import SpanKernel, input_vectors, on_basis, vectors_gram

#: entries per chunk of the norm and dot-product reductions (mergekit's, so sums round alike)
CHUNK = 1 << 20
#: above this ``|cos theta|`` the vectors count as colinear and are interpolated linearly
DOT_THRESHOLD = 0.9995
#: norms at or below this count as 1
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = DOT_THRESHOLD,
          eps: float = EPS, inplace: bool = False) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (``t = 0``) to ``v1`` (``t = 1``), each tensor one vector.

    Args:
        t: the interpolation factor.
        v0, v1: float32 tensors of the same shape.
        dot_threshold: above this ``|cos theta|``, interpolate linearly.
        eps: norms at or below this count as 1.
        inplace: write the result into ``v1`` (if contiguous) instead of a new tensor.

    Returns:
        The interpolated tensor, ``v0``'s shape.
    """
    out = v1 if inplace and v1.is_contiguous() else v1.clone(memory_format=torch.contiguous_format)
    # one row per tensor: the reductions run in the layout mergekit uses, so they round alike
    a, b = v0.reshape(1, -1), out.view(1, -1)
    n = a.shape[1]
    tt = torch.tensor([[t]], dtype=torch.float32)
    if n == 0:
        return out
    starts = range(0, n, CHUNK)

    def norm(x: torch.Tensor) -> torch.Tensor:  # the norm of the chunk norms; tiny norms count as 1
        parts = torch.stack([torch.linalg.vector_norm(x[:, s:s + CHUNK], dim=1, keepdim=True) for s in starts])
        total = torch.linalg.vector_norm(parts, dim=0)
        return torch.where(total > eps, total, 1)

    norm_a, norm_b = norm(a), norm(b)
    dot = torch.stack([((a[:, s:s + CHUNK] / norm_a) * (b[:, s:s + CHUNK] / norm_b)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))  # theta = pi / 2 on the linear branch: no 0 / 0
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    for s in starts:  # round(coef_b * b) + round(coef_a * a), chunk by chunk, into b
        b[:, s:s + CHUNK].mul_(coef_b).add_(a[:, s:s + CHUNK] * coef_a)
    return out


def slerp_coefficients(gram: torch.Tensor, t: float, *, dot_threshold: float = DOT_THRESHOLD,
                       eps: float = EPS) -> torch.Tensor:
    """:func:`slerp`'s result as ``c_0 v_0 + c_1 v_1``, from the Gram matrices ``(groups, 2, 2)``
    (float64) of ``(v_0, v_1)``: ``(groups, 2)`` float64 coefficients.

    Example:
        >>> slerp_coefficients(torch.eye(2, dtype=torch.float64)[None], 0.5)  # 90 degrees
        tensor([[0.7071, 0.7071]], dtype=torch.float64)
    """
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    norms = torch.where(norms > eps, norms, 1)
    dot = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin = torch.sin(theta)
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin)
    return torch.stack([c0, c1], dim=1)


def slerp_kernel(p: dict[str, Any], context: KernelContext) -> SpanKernel | None:
    """The engine's block kernel: :func:`slerp` of the base's and the model's weights on their span."""
    models = [i for i, is_base in enumerate(context.is_base) if not is_base]
    if len(models) != 1 or not context.base_given:
        return None  # the whole-tensor path refuses
    n = len(context.is_base)
    ends = torch.cat([input_vectors(n, [], weights=True, base=True), input_vectors(n, models, weights=True)])

    def solve(gram: torch.Tensor) -> torch.Tensor:
        return on_basis(slerp_coefficients(vectors_gram(gram, ends), p["t"]), ends, plus_base=False)

    return SpanKernel(solve, shape=context.shape)


def slerp_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                base: torch.Tensor) -> torch.Tensor:
    """The registered function: the base's and one model's weights -> the interpolated weights."""
    if len(weights) != 1:
        raise MergeConfigError(f"slerp interpolates between the base and one model; got {len(weights)} models for "
                               "this tensor. List exactly one model besides base_model.")
    return slerp(p["t"], base, weights[0], inplace=True)


register_merge_method(MergeMethod(
    name="slerp", fn=slerp_merge, block_kernel=slerp_kernel,
    params=(ParamSpec("t", REQUIRED, help="interpolation factor: 0 gives the base model, 1 the other model "
                                          "(a gradient over the layers and filters accepted)"),),
    description="Spherical linear interpolation between the base model and one other model.",
    reference="https://en.wikipedia.org/wiki/Slerp", on_weights=True, min_models=1, max_models=1,
))
