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

The arithmetic is mergekit 0.1.5's, step by step in float32, so float32 inputs give
mergekit's result bit for bit.

Note:
    Cost: about ``4 N`` float32 tensors of the tensor's size for ``N`` models (the stacked
    vectors, the unit vectors, the tangent vectors, their weighted products); two reductions
    per model.

Example:
    >>> import torch
    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> multislerp([a, b], [0.5, 0.5])
    tensor([0.7071, 0.7071])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..registry import MergeMethod, ParamSpec, register_merge_method


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
            raise MergeConfigError(f"multislerp: the weights {weights} sum to 0, so they cannot be normalized; give "
                                   "weights that do not cancel, or set normalize_weights: false.")
        w = w / total
    w_col = w.view(-1, 1)
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w_col).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:  # the weighted directions cancel: no mean direction
        if len(vectors) != 2:
            raise MergeConfigError(
                f"multislerp: the weighted directions of the {len(vectors)} models cancel out for a tensor (opposite "
                f"task vectors or weights that balance exactly, weights {weights}), so they have no spherical mean; "
                "use other weights, or drop one of the opposite models.")
        out = (stacked[0] * w[0] + stacked[1] * w[1]).view(shape)  # two models: linear interpolation
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w_col).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    out = (out * (norms.squeeze(-1) * w).sum()).view(shape)  # scaled to the weighted mean norm
    return out if base is None else out + base


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
    name="multislerp", fn=multislerp_merge,
    params=(ParamSpec("weight", 1.0, per_model=True, help="weight of each model in the spherical mean"),
            ParamSpec("normalize_weights", True, kind=bool, help="divide the weights by their sum"),
            ParamSpec("eps", 1e-8, low=0.0, help="added to norms before dividing by them")),
    description="Weighted spherical mean of any number of models (of their task vectors when a base model is "
                "given).",
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", needs_base=False, on_weights=True,
    min_models=1,
))
