"""NuSLERP: spherical interpolation between two models set by their weights, optionally of
their task vectors (mergekit's ``nuslerp``).

With weights ``w_0, w_1`` the interpolation factor is ``t = w_1 / (w_0 + w_1)`` (``0.5`` when
``|w_0 + w_1| < 1e-6``), and with ``theta`` the angle between the two vectors ``v_0, v_1``::

    slerp(t; v_0, v_1) = (sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)

Without a base model the vectors are the two models' weights; with one they are the task
vectors ``v_i = model_i - base`` and the result is ``base + slerp(t; v_0, v_1)``. What one
vector is: the whole tensor (``nuslerp_flatten: true``, the default); else each row along the
last dimension, or with ``nuslerp_row_wise: true`` each slice along the first dimension (a
column of a matrix), each interpolated with its own angle. Where the two vectors are colinear
(``1 - cos^2 theta <= 1e-16``, opposite ones included) plain linear interpolation
``(1 - t) v_0 + t v_1`` is used. Norms are clamped to at least ``1e-7``, so a zero vector gives
a finite result (at ``theta = pi / 2``).

A ``base_model`` also listed under ``models`` is the base, not one of the two models (as in
mergekit), so such a config needs two more models; with them it is three entries under
``models``, which ours refuses (``exactly 2 models``): list the base only as ``base_model``.

:func:`nuslerp` is mergekit 0.1.5's arithmetic, step by step in float32, so on float32 inputs
it gives mergekit's result bit for bit. The merge engine runs the same formula block by block
(:func:`nuslerp_coefficients` on the tensor's Gram matrices, :mod:`..span`): equal to
:func:`nuslerp` to float32 rounding, with no float32 copy of the tensor.

Note:
    Cost in the engine: two passes over the inputs as stored (inner products, then the
    result), memory a few blocks per thread. :func:`nuslerp` on whole tensors: a few float32
    temporaries of the tensor's size. Exactly two models.

Example:
    >>> import torch
    >>> nuslerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    tensor([0.7071, 0.7071])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..blockwise import KernelContext
from ..registry import MergeMethod, ParamSpec, register_merge_method
from ..span import SpanKernel, input_vectors, on_basis, vectors_gram

#: norms are clamped to at least this before normalizing
NORM_FLOOR = 1e-7
#: vectors count as colinear where ``1 - cos^2 theta <= COLINEAR_EPS ** 2``
COLINEAR_EPS = 1e-8


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True,
            row_wise: bool = False) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (``t = 0``) to ``v1`` (``t = 1``).

    Args:
        t: the interpolation factor; values outside ``[0, 1]`` extrapolate along the arc.
        v0, v1: float32 tensors of the same shape.
        flatten: the whole tensor is one vector.
        row_wise: without ``flatten``, the vectors are the slices along the first dimension
            (columns of a matrix) instead of the rows along the last one.

    Returns:
        A new tensor, ``v0``'s shape.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))  # pi / 2 on the linear branch: no 0 / 0
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_coefficients(gram: torch.Tensor, t: float) -> torch.Tensor:
    """:func:`nuslerp`'s result as ``c_0 v_0 + c_1 v_1``, from the vectors' Gram matrices.

    Args:
        gram: ``(groups, 2, 2)`` float64 Gram matrices of ``(v_0, v_1)``, one per vector pair.
        t: the interpolation factor.

    Returns:
        ``(groups, 2)`` float64 coefficients.

    Example:
        >>> nuslerp_coefficients(torch.eye(2, dtype=torch.float64)[None], 0.5)  # 90 degrees
        tensor([[0.7071, 0.7071]], dtype=torch.float64)
    """
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cos = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.sin(theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return torch.stack([c0, c1], dim=1)


def interpolation_factor(weights: list[float]) -> float:
    """``t = w_1 / (w_0 + w_1)``, or ``0.5`` where the weights (nearly) cancel."""
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                  base: torch.Tensor | None) -> torch.Tensor:
    """The registered function: two models' weights (and the base's, or ``None``) -> the NuSLERP weights.

    Raises:
        MergeConfigError: not exactly two models besides the base for this tensor.
    """
    models = [(w, k) for w, k in zip(weights, p["weight"]) if w is not base]  # a listed base is the base
    if len(models) != 2:
        raise MergeConfigError(f"nuslerp interpolates between two models; got {len(models)} besides the base for "
                               "this tensor. List exactly two models (base_model, when given, not among them).")
    (a, wa), (b, wb) = models
    t = interpolation_factor([wa, wb])
    how = {"flatten": p["nuslerp_flatten"], "row_wise": p["nuslerp_row_wise"]}
    if base is None:
        return nuslerp(t, a, b, **how)
    return base + nuslerp(t, a - base, b - base, **how)


def nuslerp_kernel(p: dict[str, Any], context: KernelContext) -> SpanKernel | None:
    """The engine's block kernel: :func:`nuslerp_merge` on the span of the inputs (``None``
    unless there are exactly two models besides the base: the whole-tensor path then refuses)."""
    models = [i for i, is_base in enumerate(context.is_base) if not is_base]
    if len(models) != 2:
        return None
    t = interpolation_factor([p["weight"][i] for i in models])
    vectors = input_vectors(len(context.is_base), models, weights=not context.base_given)

    def solve(gram: torch.Tensor) -> torch.Tensor:
        return on_basis(nuslerp_coefficients(vectors_gram(gram, vectors), t), vectors, plus_base=context.base_given)

    grouping = "tensor" if p["nuslerp_flatten"] else "columns" if p["nuslerp_row_wise"] else "rows"
    return SpanKernel(solve, shape=context.shape, grouping=grouping)


register_merge_method(MergeMethod(
    name="nuslerp", fn=nuslerp_merge, block_kernel=nuslerp_kernel,
    params=(ParamSpec("weight", 1.0, per_model=True,
                      help="relative weight of each of the two models: t = w_1 / (w_0 + w_1)"),
            ParamSpec("nuslerp_flatten", True, kind=bool, help="each tensor is one vector (else one per row)"),
            ParamSpec("nuslerp_row_wise", False, kind=bool,
                      help="without nuslerp_flatten, interpolate the slices along the first dimension (columns) "
                           "instead of the rows")),
    description="Spherical interpolation between two models, at t = w_1 / (w_0 + w_1); of their task vectors "
                "when a base model is given.",
    reference="https://github.com/arcee-ai/mergekit", needs_base=False, on_weights=True, min_models=2, max_models=2,
))
