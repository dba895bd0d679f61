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
give mergekit's result bit for bit on tensors of at most a million entries. The merge engine
runs it block by block (:class:`FusionKernel`: a pass for the rows' KL divergences, one to find
the three order statistics exactly, one to fuse), bit-identical to :func:`arcee_fusion`. Above that,
mergekit estimates the quartiles from 10^6 entries drawn at random (with replacement, from
torch's global RNG, so its result changes from run to run); we always take the exact order
statistics of all entries, so our result is reproducible and is what mergekit's estimates.

Note:
    Cost in the engine: three passes over the two inputs as stored, memory a few blocks per
    thread plus one float per row. :func:`arcee_fusion` on whole tensors: about 4 float32
    tensors of its size besides the inputs, and three linear-time selections
    (``torch.kthvalue``, each on a copy of the importances). Needs the base model and exactly
    one other model.

Example:
    >>> import torch
    >>> base = torch.zeros(1, 8)
    >>> model = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 3.0]])
    >>> arcee_fusion(model, base)  # one row: importance ~ |change|; only 3.0 is above the fence
    tensor([[0., 0., 0., 0., 0., 0., 0., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import MergeConfigError
from ..blockwise import BlockKernel, BlockRunner, DeltaBlocks, KernelContext
from ..registry import MergeMethod, register_merge_method
from ..sparsify import order_statistics

#: added to both softmaxes, so the KL divergence is finite
EPS = 1e-8
#: the quartiles of the fence, and the fence's multiple of the interquartile range
QUARTILES = (0.25, 0.5, 0.75)
FENCE = 1.5


def fusion_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per row (along the last dimension), the KL divergence between the softmaxes of ``model``
    and ``base`` (each plus :data:`EPS`): float32, their shape with the last dimension 1."""
    p = F.softmax(model, dim=-1).add_(EPS)
    q = F.softmax(base, dim=-1).add_(EPS)
    return torch.sum(p * torch.log_(p / q), dim=-1, keepdim=True)


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per entry, ``|model - base|`` times its row's KL divergence between the softmaxes.

    Args:
        model, base: float32 tensors of the same shape; rows are along the last dimension.

    Returns:
        A float32 tensor of their shape, ``>= 0`` up to rounding of the KL divergence.
    """
    return (model - base).abs_().mul_(fusion_kl(model, base))


def quartile_ranks(n: int) -> list[int]:
    """The 0-based ranks ``floor(q (n - 1))`` of the fence's quartiles among ``n`` importances,
    the product rounded in float32 as mergekit computes it."""
    return (torch.tensor(QUARTILES, dtype=torch.float32) * (n - 1)).long().tolist()


def fence(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """``median + 1.5 (q3 - q1)`` in float32."""
    return median + FENCE * (q3 - q1)


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
    q1, median, q3 = (torch.kthvalue(flat, r + 1).values for r in quartile_ranks(flat.numel()))
    return fence(q1, median, q3)


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


#: tensors smaller than this run on the whole-tensor path (three passes would not pay)
MIN_BLOCKWISE = 1 << 16


class FusionKernel(BlockKernel):
    """:func:`arcee_fusion` block by block, bit-identical: :meth:`prepare` computes every row's
    KL divergence (one pass, blocks aligned to rows) and the three quartiles exactly
    (:func:`~..sparsify.order_statistics`: a sampled bracket, one counting pass, ``kthvalue`` on
    the few importances inside it); :meth:`merge` then fuses each block."""

    on_weights = True
    catches_nonfinite_inputs = True

    def __init__(self, shape: tuple[int, ...]):
        self.row = shape[-1] if shape else 1
        self.align = self.row
        self.kl = torch.empty(0)
        self.threshold = torch.tensor(0.0)

    def _importance(self, model: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        first = start // self.row
        rows = (model - base).abs_().view(-1, self.row)
        return rows.mul_(self.kl[first:first + rows.shape[0]]).view(-1)

    def prepare(self, deltas: DeltaBlocks, runner: BlockRunner) -> None:
        def kl(block: tuple[int, int]) -> torch.Tensor:
            start, stop = block
            base = deltas.base(start, stop)
            model = deltas.weights(start, stop, base)[0]
            return fusion_kl(model.view(-1, self.row), base.view(-1, self.row))

        self.kl = torch.cat(runner.map(kl, deltas.ranges(self.row)))
        ranks = quartile_ranks(deltas.n)
        sample = deltas.sample()
        starts = deltas.sample_starts()
        if sample is not None and starts is not None:  # |delta| times its row's KL at the sampled runs
            at = (torch.tensor(starts)[:, None] + torch.arange(sample.shape[1] // len(starts))).reshape(-1)
            sample = (sample[0].abs() * self.kl[at // self.row, 0]).expand(len(ranks), -1)

        def scan(fn: Callable[[int, torch.Tensor, torch.Tensor], Any]) -> list[Any]:
            def one(block: tuple[int, int]) -> Any:
                start, stop = block
                base = deltas.base(start, stop)
                scores = self._importance(deltas.weights(start, stop, base)[0], base, start)
                work = runner.scratch("scan", (2, len(ranks), stop - start), torch.float32)
                return fn(start, scores.expand(len(ranks), -1), work)
            return runner.map(one, deltas.ranges(self.row))

        q1, median, q3 = (torch.tensor(v, dtype=torch.float32)
                          for v in order_statistics(deltas.n, ranks, sample=sample, scan=scan))
        self.threshold = fence(q1, median, q3)

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        model = deltas[0]
        keep = self._importance(model, base, start) >= self.threshold
        return model.sub_(base).mul_(keep).add_(base)


def fusion_kernel(p: dict[str, Any], context: KernelContext) -> FusionKernel | None:
    """The engine's block kernel for tensors of at least :data:`MIN_BLOCKWISE` entries with one model."""
    if len(context.is_base) != 1 or math.prod(context.shape) < MIN_BLOCKWISE:
        return None
    return FusionKernel(context.shape)


register_merge_method(MergeMethod(
    name="arcee_fusion", fn=arcee_fusion_merge, params=(), block_kernel=fusion_kernel,
    description="The base, with the other model's values where their importance (change times the row's KL "
                "divergence) is at or above median + 1.5 IQR.",
    reference="https://arcee.ai", on_weights=True, min_models=1, max_models=1,
))
