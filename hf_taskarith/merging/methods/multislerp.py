"""Multi-SLERP: a weighted spherical mean of any number of models, optionally of their task
vectors (Goddard, "Multi-SLERP"; mergekit's ``multislerp``).

Each tensor is one vector per model: the models' weights, or with a base model their task
vectors ``v_i = model_i - base``. With weights ``w_i`` (divided by their sum when
``normalize_weights``, the default), the vectors' norms ``n_i`` and unit vectors
``u_i = v_i / (n_i + eps)``:

1. the weighted mean direction ``m = sum_i w_i u_i / |sum_i w_i u_i|``;
2. the tangent vectors at ``m``: ``tau_i = u_i - (u_i . m) m``, and their weighted sum
   ``tau = sum_i w_i tau_i``;
3. back onto the sphere: ``r = cos(|tau| + eps) m + sin(|tau| + eps) / (|tau| + eps) tau``,
   scaled to the weighted mean norm ``sum_i w_i n_i``.

The result is ``r`` (plus the base, when given). With two models this is close to, but not
exactly, SLERP. One model (besides the base) gives that model's weights unchanged. Where the
weighted directions cancel (``|sum_i w_i u_i| < eps``: opposite vectors of equal weights) two
models are averaged linearly, ``w_0 v_0 + w_1 v_1``; more models have no mean direction and
are refused (mergekit raises too).

A ``base_model`` also listed under ``models`` is the base, not one of the models averaged (as
in mergekit); its weight, if given, is not used.

:func:`multislerp` is mergekit 0.1.5's arithmetic, step by step in float32, so on float32
inputs it gives mergekit's result bit for bit. The merge engine runs the same formula block by
block (:func:`multislerp_coefficients` on the tensor's Gram matrix, :mod:`..span`): equal to
:func:`multislerp` to float32 rounding, with no float32 copy of the tensor.

Note:
    Cost in the engine: two passes over the inputs as stored, memory a few blocks per thread.
    :func:`multislerp` on whole tensors: about ``4 N`` float32 tensors of the tensor's size for
    ``N`` models (the stacked vectors, the unit vectors, the tangent vectors, their weighted
    products).

Example:
    >>> import torch
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> multislerp([a, b], [0.5, 0.5])
    tensor([0.7071, 0.7071])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...errors import MergeConfigError
from ..blockwise import KernelContext
from ..registry import MergeMethod, ParamSpec, register_merge_method
from ..span import SpanKernel, input_vectors, on_basis, vectors_gram


def multislerp(vectors: list[torch.Tensor], weights: list[float], *, base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """The weighted spherical mean of ``vectors`` (of their offsets from ``base`` when given).

    Args:
        vectors: float32 tensors of the same shape, one per model.
        weights: one per vector.
        base: the base's float32 tensor, or ``None`` to average the vectors themselves.
        normalize_weights: divide the weights by their sum.
        eps: added to the norms before dividing by them.

    Returns:
        A new tensor (one vector: that vector itself), ``vectors[0]``'s shape.

    Raises:
        MergeConfigError: ``normalize_weights`` with weights summing to 0; three or more
            vectors whose weighted directions cancel.
    """
    if len(vectors) == 1:
        return vectors[0]
    shape = vectors[0].shape
    stacked = torch.stack(vectors)
    if base is not None:
        stacked -= base
    flat = stacked.view(len(vectors), -1)
    w = torch.tensor(weights, dtype=flat.dtype)
    if normalize_weights:
        total = w.sum()
        if total == 0:
            raise _zero_sum(weights)
        w = w / total
    w_col = w.view(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w_col).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:  # the weighted directions cancel: no mean direction
        if len(vectors) != 2:
            raise _cancelling(weights)
        out = (stacked[0] * w[0] + stacked[1] * w[1]).view(shape)  # two models: linear interpolation
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w_col).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).view(shape)  # scaled to the weighted mean norm
    return out if base is None else out + base


def _zero_sum(weights: list[float]) -> MergeConfigError:
    return MergeConfigError(f"multislerp: the weights {weights} sum to 0, so they cannot be normalized; give "
                            "weights that do not cancel, or set normalize_weights: false.")


def _cancelling(weights: list[float]) -> MergeConfigError:
    return MergeConfigError(
        f"multislerp: the weighted directions of the {len(weights)} models cancel out for a tensor (opposite "
        f"task vectors or weights that balance exactly, weights {weights}), so they have no spherical mean; "
        "use other weights, or drop one of the opposite models.")


def multislerp_coefficients(gram: torch.Tensor, weights: list[float], *, normalize_weights: bool = True,
                            eps: float = 1e-8) -> torch.Tensor:
    """:func:`multislerp`'s result as ``sum_i c_i v_i`` (without the base), from the vectors' Gram matrix.

    Args:
        gram: ``(1, N, N)`` float64 Gram matrix of the vectors ``v_i``.
        weights, normalize_weights, eps: as :func:`multislerp`.

    Returns:
        ``(1, N)`` float64 coefficients.

    Raises:
        MergeConfigError: as :func:`multislerp`.
    """
    n = len(weights)
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g = gram[0]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize_weights:
        if float(w.sum()) == 0:
            raise _zero_sum(weights)
        w = w / w.sum()
    norms = g.diagonal().clamp(min=0).sqrt()
    a = w / (norms + eps)  # sum_i w_i u_i = sum_i a_i v_i
    mean_norm = float(a @ g @ a) ** 0.5 if float(a @ g @ a) > 0 else 0.0
    if mean_norm < eps:  # the weighted directions cancel
        if n != 2:
            raise _cancelling(weights)
        return w[None]  # two models: linear interpolation
    mean = a / mean_norm
    dots = (g @ mean) / (norms + eps)  # u_i . m
    tangent = a - (w * dots).sum() * mean
    length = max(float(tangent @ g @ tangent), 0.0) ** 0.5 + eps
    out = mean * math.cos(length) + tangent * (math.sin(length) / length)
    return (out * (norms * w).sum())[None]


def multislerp_kernel(p: dict[str, Any], context: KernelContext) -> SpanKernel | None:
    """The engine's block kernel: :func:`multislerp_merge` on the span of the inputs."""
    models = [i for i, is_base in enumerate(context.is_base) if not is_base]
    if not models:
        return None  # the whole-tensor path refuses
    weights = [p["weight"][i] for i in models]
    vectors = input_vectors(len(context.is_base), models, weights=not context.base_given)

    def solve(gram: torch.Tensor) -> torch.Tensor:
        if len(models) == 1:  # that model's weights, as they are
            return on_basis(torch.ones(1, 1, dtype=torch.float64), input_vectors(
                len(context.is_base), models, weights=True), plus_base=False)
        coef = multislerp_coefficients(vectors_gram(gram, vectors), weights,
                                       normalize_weights=p["normalize_weights"], eps=p["eps"])
        return on_basis(coef, vectors, plus_base=context.base_given)

    return SpanKernel(solve, shape=context.shape)


def multislerp_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                     base: torch.Tensor | None) -> torch.Tensor:
    """The registered function: the models' weights (and the base's, or ``None``) -> the Multi-SLERP weights.

    Raises:
        MergeConfigError: no model besides the base for this tensor; see :func:`multislerp`.
    """
    models = [(w, k) for w, k in zip(weights, p["weight"]) if w is not base]  # a listed base is the base
    if not models:
        raise MergeConfigError("multislerp needs at least one model besides base_model; list it under models.")
    return multislerp([w for w, _ in models], [k for _, k in models], base=base,
                      normalize_weights=p["normalize_weights"], eps=p["eps"])


register_merge_method(MergeMethod(
    name="multislerp", fn=multislerp_merge, block_kernel=multislerp_kernel,
    params=(ParamSpec("weight", 1.0, per_model=True, help="weight of each model in the spherical mean"),
            ParamSpec("normalize_weights", True, kind=bool, help="divide the weights by their sum"),
            ParamSpec("eps", 1e-8, low=0.0, help="added to norms before dividing by them")),
    description="Weighted spherical mean of any number of models (of their task vectors when a base model is "
                "given).",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", needs_base=False, on_weights=True,
    min_models=1,
))
