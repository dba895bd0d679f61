"""SCE: Select, Calculate, Erase (Wan et al., "FuseChat: Knowledge Fusion of Chat Models",
2024, section on SCE; mergekit's ``sce``).

For one tensor, with task vectors ``tau_1 .. tau_N`` (``tau_i = theta_i - theta_0``):

1. **Select** (``select_topk < 1``): keep the entries where the task vectors vary most across
   models: the top ``k = int(nnz(var) * select_topk)`` entries of ``var_i(tau_i)`` (population
   variance over the models; ``nnz`` counts the entries with nonzero variance). The same
   entries are kept in every task vector; ``k = 0`` keeps none.
2. **Calculate** a weight per model from the selected task vectors: ``w_i = mean(tau_i^2) /
   sum_j mean(tau_j^2)``, or ``1 / N`` each when ``sum_j mean(tau_j^2) < 1e-6`` (mergekit's
   guard; it also catches task vectors that are merely small: when every task vector's root
   mean square is below ``1e-3 / sqrt(N)``, not rare for fine-tunes, the weights are equal).
3. **Erase** the entries whose sign disagrees with the elected sign (TIES election on the sum
   of the selected, unweighted task vectors; zeros never agree), and take the weighted mean of
   what is left::

       merged = sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)        (m_i: agreement mask)

There are no per-model weights, no ``lambda`` and no ``normalize``: the weights come from the
task vectors themselves. ``int8_mask`` is accepted for mergekit compatibility and has no effect.

It does not fit the generalized pipeline (:mod:`.pipeline`) as a configuration: selection is
one mask shared by all models (the pipeline sparsifies each model on its own), the weights are
computed per tensor from the data (the pipeline's are the user's), and the sign election runs on
the *unweighted* task vectors (the pipeline elects on weighted ones). mergekit 0.1.5 also gives
it its own module; like it, we reuse the sign election (:func:`..consensus.agreement`) and,
for the selection, our exact top-k (:func:`..sparsify.top_k_mask`).

The arithmetic is mergekit 0.1.5's, step by step in float32 on the same stacked layout
(variance, mean squares, sums over the model axis), so float32 inputs give mergekit's result
bit for bit, except where variances tie at the selection cut-off: we keep the tied entries
lowest index first, mergekit whichever ``torch.topk`` returns.

The merge engine runs it block by block (:class:`SceKernel`): with ``select_topk < 1`` a pass
counting the nonzero variances and one finding the exact top-k cut (sampled bracket, then
``kthvalue`` on the few inside it), a pass for the mean squares (summed in float64), then the
merge. It equals :func:`sce` bit for bit except through the weights, whose means are summed in
another order (float32 rounding).

Note:
    Cost in the engine: two to four passes over the inputs as stored, memory a few blocks per
    thread. :func:`sce` on whole tensors: about ``2N + 2`` float32 tensors of the tensor's size
    at the peak (the stacked task vectors plus a same-sized working buffer), and one linear-time
    top-k selection when ``select_topk < 1``. Needs the base model.

Example:
    >>> import torch
    >>> # weights 5/18 and 13/18 (mean squares 2.5 and 6.5); the second entry's votes sum to 0,
    >>> # which elects +, so -2.0 is erased
    >>> sce([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])], select_topk=1.0)
    tensor([2.4444, 2.0000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..blockwise import BlockKernel, BlockRunner, DeltaBlocks, KernelContext
from ..consensus import agreement
from ..registry import MergeMethod, ParamSpec, register_merge_method
from ..sparsify import TopKRule, top_k_mask, top_k_rules

#: below this total of mean squares, every model gets weight ``1 / N`` (mergekit's guard)
WEIGHT_EPS = 1e-6
#: the smallest divisor of the weighted mean (entries where no model agrees stay 0)
DIVISOR_MIN = 1e-6


#: entries per chunk of :func:`population_variance` (bounds its float64 temporaries)
_VAR_CHUNK = 1 << 20


def population_variance(stacked: torch.Tensor) -> torch.Tensor:
    """``torch.var(stacked, dim=0, unbiased=False)``, bit for bit, about 12x faster on CPU.

    torch reduces a short leading axis one output entry at a time; this runs the same Welford
    recurrence in float64 (``delta = x - mean; mean += delta / n; m2 += delta (x - mean)``, then
    ``m2 / n`` rounded to float32), vectorized over the entries, chunk by chunk. Written by hand
    because it is the Select step's cost (``tests/test_sce_fusion_blocks.py`` checks the bits).

    Args:
        stacked: finite float32 ``(n_models, *shape)``.

    Returns:
        float32 ``shape``.
    """
    n = stacked.shape[0]
    flat = stacked.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=torch.float32)
    for start in range(0, flat.shape[1], _VAR_CHUNK):
        chunk = flat[:, start:start + _VAR_CHUNK]
        mean = torch.zeros(chunk.shape[1], dtype=torch.float64)
        m2 = torch.zeros_like(mean)
        for count, row in enumerate(chunk, start=1):
            x = row.double()
            delta = x - mean
            mean += delta / count
            m2 += delta * x.sub_(mean)
        out[start:start + chunk.shape[1]] = m2.div_(n)
    return out.reshape(stacked.shape[1:])


def selected_count(nonzero: torch.Tensor | int, select_topk: float) -> int:
    """``k = int(nnz * select_topk)``: the product taken in float32 and truncated, as mergekit
    counts (``nonzero``: the count of nonzero variances)."""
    return int(torch.as_tensor(nonzero, dtype=torch.int64) * select_topk)


def sce_select_mask(stacked: torch.Tensor, select_topk: float) -> torch.Tensor | None:
    """The Select step: which entries to keep in every task vector.

    Args:
        stacked: float32 task vectors, ``(n_models, *shape)``.
        select_topk: fraction of the entries with nonzero variance to keep.

    Returns:
        A boolean mask of ``shape``, or ``None`` when ``select_topk >= 1`` (keep all).

    Example:
        >>> # variances [0, 1, 0, 4]: 2 nonzero, so k = int(2 * 0.5) = 1
        >>> sce_select_mask(torch.tensor([[0.0, 1.0, 5.0, 2.0], [0.0, -1.0, 5.0, -2.0]]), 0.5).tolist()
        [False, False, False, True]
    """
    if select_topk >= 1:
        return None
    shape = stacked.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.bool)
    var = population_variance(stacked)
    k = selected_count(torch.count_nonzero(var), select_topk)
    if k == 0:
        return torch.zeros(shape, dtype=torch.bool)
    return top_k_mask(var, k)  # variances are >= 0: the largest, ties lowest index first


def sce_weights(stacked: torch.Tensor) -> torch.Tensor:
    """The Calculate step: one weight per model, its mean square over the total (or ``1 / N``
    each when the total is below :data:`WEIGHT_EPS`).

    Args:
        stacked: float32 (selected) task vectors, ``(n_models, *shape)``.

    Returns:
        A float32 tensor of ``n_models`` weights summing to 1 (to rounding).
    """
    n = stacked.shape[0]
    squares = stacked.square()
    weights = squares.reshape(n, -1).mean(dim=1)  # mergekit's layout: one row per model
    del squares
    return normalized_weights(weights)


def normalized_weights(mean_squares: torch.Tensor) -> torch.Tensor:
    """The models' mean squares (float32) over their total, or ``1 / N`` each when the total is
    below :data:`WEIGHT_EPS`."""
    n = mean_squares.numel()
    total = mean_squares.sum()
    if abs(float(total)) < WEIGHT_EPS:
        return torch.ones(n, dtype=torch.float32) / n
    return mean_squares / total


def sce(deltas: list[torch.Tensor] | torch.Tensor, *, select_topk: float = 1.0) -> torch.Tensor:
    """SCE-merge one tensor's task vectors into one merged task vector.

    Args:
        deltas: float32 task vectors of the same shape, a list (consumed: its entries become
            views of one stacked copy) or a stacked ``(n_models, *shape)`` tensor (modified in place).
        select_topk: fraction of the varying entries kept by the Select step, in ``[0, 1]``.

    Returns:
        The merged task vector (add it to the base).
    """
    stacked = _stack_consumed(deltas) if isinstance(deltas, list) else deltas
    n = stacked.shape[0]
    keep = sce_select_mask(stacked, select_topk)
    if keep is not None:
        stacked.mul_(keep)
        del keep
    weights = sce_weights(stacked).reshape((n,) + (1,) * (stacked.dim() - 1))
    erased = agreement(stacked, "sum").mul_(weights)  # w_i where model i agrees with the elected sign, else 0
    divisor = erased.sum(dim=0).clamp_(min=DIVISOR_MIN)
    merged = stacked.mul_(erased).sum(dim=0)
    return merged.div_(divisor)


def _stack_consumed(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Copy the deltas into one ``(n, *shape)`` tensor, each list entry replaced by its row, so
    the originals are freed as they are copied (peak one delta more than the stack)."""
    stacked = torch.empty((len(deltas),) + tuple(deltas[0].shape), dtype=torch.float32)
    for i, d in enumerate(deltas):
        stacked[i].copy_(d)
        deltas[i] = stacked[i]
    return stacked


class SceKernel(BlockKernel):
    """:func:`sce` block by block (see the module docstring)."""

    catches_nonfinite_inputs = True  # the first pass over the deltas checks each block

    def __init__(self, select_topk: float):
        self.select_topk = select_topk
        self.rule: TopKRule | None = None  # the Select step's cut, if some entries are dropped
        self.keep_none = select_topk <= 0
        self.weights = torch.empty(0)

    def prepare(self, deltas: DeltaBlocks, runner: BlockRunner) -> None:
        def stack(block: tuple[int, int]) -> torch.Tensor:
            return deltas.deltas(block[0], block[1], deltas.base(block[0], block[1]))

        ranges = list(deltas.ranges())
        if 0 < self.select_topk < 1:
            nonzero = sum(runner.map(lambda b: int(torch.count_nonzero(population_variance(stack(b)))), ranges))
            k = selected_count(nonzero, self.select_topk)
            self.keep_none = k == 0
            if k:
                sample = deltas.sample()
                if sample is not None:
                    sample = population_variance(sample).unsqueeze(0)

                def scan(fn: Callable[[int, torch.Tensor, torch.Tensor], Any]) -> list[Any]:
                    def one(block: tuple[int, int]) -> Any:
                        var = population_variance(stack(block)).unsqueeze(0)
                        return fn(block[0], var, runner.scratch("scan", (2,) + tuple(var.shape), torch.float32))
                    return runner.map(one, ranges)

                (self.rule,) = top_k_rules(deltas.n, [k], sample=sample, scan=scan)

        def squares(block: tuple[int, int]) -> torch.Tensor:
            return self._select(stack(block), block[0]).square().sum(dim=1, dtype=torch.float64)

        sums = torch.stack(runner.map(squares, ranges)).sum(dim=0) if ranges else torch.zeros(len(deltas))
        self.weights = normalized_weights((sums / max(deltas.n, 1)).to(torch.float32))

    def _select(self, stacked: torch.Tensor, start: int) -> torch.Tensor:
        if self.keep_none:
            return stacked.zero_()
        if self.rule is not None:
            var = population_variance(stacked)
            stacked.mul_(self.rule.keep(var, start, torch.empty_like(var)))
        return stacked

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        stacked = self._select(deltas, start)
        erased = agreement(stacked, "sum").mul_(self.weights[:, None])
        divisor = erased.sum(dim=0).clamp_(min=DIVISOR_MIN)
        return stacked.mul_(erased).sum(dim=0).div_(divisor)


def sce_kernel(p: dict[str, Any], context: KernelContext) -> SceKernel:
    """The engine's block kernel."""
    return SceKernel(p["select_topk"])


def sce_merge(deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
    """The registered function: one tensor's deltas (consumed) -> the SCE-merged delta."""
    return sce(deltas, select_topk=p["select_topk"])


register_merge_method(MergeMethod(
    name="sce", fn=sce_merge, block_kernel=sce_kernel,
    params=(
        ParamSpec("int8_mask", False, kind=bool, help="accepted for mergekit compatibility; no effect"),
        ParamSpec("select_topk", 1.0, low=0.0, high=1.0,
                  help="fraction of the entries with nonzero variance across models kept, in [0, 1] "
                       "(1: keep all; 0: keep none, giving the base)"),
    ),
    description="Keeps the entries that vary most across models, weights each model by its task vector's "
                "mean square, erases minority signs and averages.",
    reference="https://arxiv.org/abs/2408.07990",
))
