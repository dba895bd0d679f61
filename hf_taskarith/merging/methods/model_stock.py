"""Model Stock (Jang et al., "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024; mergekit's ``model_stock``).

The fine-tuned weights ``w_1 .. w_N`` (N >= 2) are averaged, and the average is pulled
towards the base ``w_0`` by a ratio set by the angle between the task vectors
``tau_i = w_i - w_0``: with ``cos theta`` the mean cosine over all pairs ``(tau_i, tau_j)``,

    t = N cos(theta) / (1 + (N - 1) cos(theta)),    result = t * mean_i(w_i) + (1 - t) * w_0.

Nearly orthogonal task vectors (``cos theta ~ 0``) give ``t ~ 0`` (stay at the base), aligned
ones ``t ~ 1`` (the plain average). Where ``|1 + (N - 1) cos theta| < 1e-6`` there is no
finite ratio and the base is kept. A cosine's norm product is clamped to at least ``1e-6``
(a tensor no model changed has ``cos theta = 0`` and stays the base).

``filter_wise: true`` computes one angle, and one ``t``, per row (per slice along the last
dimension, as mergekit does; a 1-D tensor is one row) instead of one per tensor.

:func:`model_stock_merge` is mergekit 0.1.5's arithmetic, step by step in float32, so on
float32 inputs it gives mergekit's result bit for bit. The merge engine computes the same
ratio from each tensor's (or row's) Gram matrix and writes ``w_0 + t mean_i(tau_i)`` block by
block (:func:`model_stock_ratio`, :mod:`..span`): equal to it to float32 rounding.

Note:
    Cost in the engine: two passes over the inputs as stored, memory a few blocks per thread.
    :func:`model_stock_merge` on whole tensors: ``N (N - 1) / 2`` dot products, memory about
    ``N + 3`` float32 tensors of its size (mergekit's kernel about ``2N + 2``). Needs the base model.

Example:
    >>> import torch
    >>> w0 = torch.zeros(2)
    >>> model_stock_merge([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], {"filter_wise": False}, None,
    ...                   base=w0)  # orthogonal task vectors: t = 0, the base
    tensor([0., 0.])
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MergeConfigError
from ..blockwise import KernelContext
from ..registry import MergeMethod, ParamSpec, register_merge_method
from ..span import SpanKernel, input_vectors, on_basis, vectors_gram


def model_stock_merge(weights: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None, *,
                      base: torch.Tensor) -> torch.Tensor:
    """The fine-tuned ``weights`` (consumed) and the ``base`` -> the Model Stock weights.

    Raises:
        MergeConfigError: fewer than 2 models for this tensor.
    """
    n = len(weights)
    if n < 2:
        raise MergeConfigError(f"model_stock needs at least 2 fine-tuned models per tensor (it measures the angle "
                               f"between their task vectors); got {n}.")
    if p["filter_wise"]:  # one row per output filter; a vector is one row
        w0 = base.reshape(1, -1) if base.dim() <= 1 else base
    else:
        w0 = base.reshape(-1)
    ws = [w.reshape(w0.shape) for w in weights]
    average = ws[0] + ws[1]  # the plain sum in model order (then divided), before the weights become offsets
    for w in ws[2:]:
        average.add_(w)
    average.div_(n)
    offsets = [w.sub_(w0) for w in ws]  # tau_i = w_i - w_0, in place
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = [((offsets[i] * offsets[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(n) for j in range(i + 1, n)]
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite ratio: keep the base
    t = torch.where(singular, 0, (n * cos) / torch.where(singular, 1, denominator))
    merged = average.mul_(t).add_(w0 * (1 - t))  # round(t * mean) + round((1 - t) * w0)
    return merged.reshape(base.shape)


def model_stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """The interpolation ratio ``t`` of each group, from the task vectors' Gram matrices
    ``(groups, N, N)`` (float64): as :func:`model_stock_merge` computes it. ``(groups,)``."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack([(gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1, 1)
                       for i, j in pairs]).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0, (n * cos) / torch.where(singular, 1, denominator))


def model_stock_kernel(p: dict[str, Any], context: KernelContext) -> SpanKernel | None:
    """The engine's block kernel: ``base + t mean_i(tau_i)`` with :func:`model_stock_ratio`."""
    n = len(context.is_base)
    if n < 2:
        return None  # the whole-tensor path refuses
    deltas = input_vectors(n, list(range(n)), weights=False)

    def solve(gram: torch.Tensor) -> torch.Tensor:
        t = model_stock_ratio(vectors_gram(gram, deltas))
        return on_basis((t / n)[:, None].expand(-1, n), deltas, plus_base=True)

    return SpanKernel(solve, shape=context.shape, grouping="rows" if p["filter_wise"] else "tensor")


register_merge_method(MergeMethod(
    name="model_stock", fn=model_stock_merge, block_kernel=model_stock_kernel,
    params=(ParamSpec("filter_wise", False, kind=bool,
                      help="one interpolation ratio per row (last dimension) instead of one per tensor"),),
    description="Average of fine-tuned models, pulled towards the base by the angle between their task vectors.",
    reference="https://arxiv.org/abs/2403.19522", on_weights=True, min_models=2,
))
