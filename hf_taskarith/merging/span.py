"""Merges whose result lies in the span of the inputs, evaluated block by block.

The spherical methods (nuslerp, multislerp, karcher) and Model Stock look at each whole
tensor only through inner products: norms, angles, a mean direction. Their result is a linear
combination of the vectors they start from, with coefficients set by those inner products.
Every vector involved is itself a combination of the base ``b`` and the input deltas ``d_i``
(a model's weights are ``b + d_i``, its task vector ``d_i``), so one pass over the tensor's
blocks gathering the Gram matrix of ``[b, d_1, .., d_N]`` is all a method needs to find its
coefficients; a second pass writes ``sum_j c_j [b, d_1, .., d_N]_j`` block by block, as
task_arithmetic does. No whole float32 tensor exists, and the inputs are read twice as stored
(bf16: half the bytes of float32).

The Gram matrix of a whole tensor is accumulated in float64 from float32 products over runs of
:data:`RUN` entries (relative error about 1e-8, against about 1e-7 for a float32 reduction over
the whole tensor; per row or column, in float64 throughout), and the coefficients are found in
float64 by each method's pure function of it. The result equals the whole-tensor function
(:mod:`.methods`) to float32 rounding, not bit for bit: the reductions sum in another order.

Grouping: one Gram matrix per tensor (``"tensor"``), per row along the last dimension
(``"rows"``: nuslerp without flattening, model_stock ``filter_wise``), or per slice along the
first dimension (``"columns"``: nuslerp ``row_wise``).

Note:
    Written by hand because no library evaluates a reduction-then-combination over
    memory-mapped blocks; the block engine (:mod:`.blockwise`) supplies the threads, reads and
    writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ..errors import NonFiniteError
from .blockwise import BlockKernel, BlockRunner, DeltaBlocks

Grouping = Literal["tensor", "rows", "columns"]
#: entries per float32 partial product before it is summed in float64
RUN = 256
#: solve(gram) -> coefficients: ``(groups, k, k)`` float64 Gram matrices of ``[b, d_1, .., d_N]``
#: -> ``(groups, k)`` float64 coefficients on the same basis (the base's first)
Solver = Callable[[torch.Tensor], torch.Tensor]


def group_size(shape: tuple[int, ...], grouping: Grouping) -> int:
    """Entries per row of the flattened tensor that one group's blocks must not split: the
    whole tensor's size is not needed (``"tensor"``: 1), a row's length (``"rows"``), the size
    of one slice along the first dimension (``"columns"``)."""
    numel = math.prod(shape)
    if grouping == "tensor" or numel == 0:
        return 1
    if grouping == "rows":
        return shape[-1] if shape else 1
    return numel // shape[0] if shape else 1


def n_groups(shape: tuple[int, ...], grouping: Grouping) -> int:
    """How many Gram matrices a tensor of ``shape`` has."""
    numel = math.prod(shape)
    if grouping == "tensor" or numel == 0:
        return 1
    return numel // group_size(shape, grouping) if grouping == "rows" else group_size(shape, grouping)


def block_gram(stack: torch.Tensor, grouping: Grouping, row: int) -> torch.Tensor:
    """The Gram matrices of one block's ``(k, m)`` float32 stack: ``(1, k, k)`` for
    ``"tensor"``, ``(m // row, k, k)`` for ``"rows"`` (rows of ``row`` entries), ``(row, k, k)``
    for ``"columns"`` (summed over the block's rows); float64."""
    k, m = stack.shape
    if grouping == "tensor":
        whole = m // RUN * RUN
        runs = stack[:, :whole].reshape(k, -1, RUN).transpose(0, 1)  # (m / RUN, k, RUN)
        gram = torch.bmm(runs, runs.transpose(1, 2)).sum(0, dtype=torch.float64)
        if whole < m:
            rest = stack[:, whole:]
            gram += (rest @ rest.T).double()
        return gram.unsqueeze(0)
    rows = stack.reshape(k, m // row, row).double()  # the rarer groupings: plain float64
    if grouping == "rows":
        by_row = rows.transpose(0, 1)  # (r, k, row)
        return torch.bmm(by_row, by_row.transpose(1, 2))
    out = torch.empty(row, k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            out[:, i, j] = out[:, j, i] = (rows[i] * rows[j]).sum(0)
    return out


def gram(deltas: DeltaBlocks, runner: BlockRunner, grouping: Grouping, shape: tuple[int, ...]) -> torch.Tensor:
    """The float64 Gram matrices of ``[base, delta_1, .., delta_N]`` of one tensor:
    ``(groups, N + 1, N + 1)``.

    Raises:
        NonFiniteError: an input (or the base) holds NaN or inf, naming the input.
    """
    row = group_size(shape, grouping)
    k = len(deltas) + 1

    def one(block: tuple[int, int]) -> tuple[int, torch.Tensor]:
        start, stop = block
        stack = runner.scratch("span", (k, stop - start), torch.float32)
        base = deltas.base(start, stop)
        stack[0].copy_(base)
        stack[1:].copy_(deltas.deltas(start, stop, base, check=False))
        return start, block_gram(stack, grouping, row)

    parts = runner.map(one, deltas.ranges(row))
    if grouping == "rows":
        total = torch.cat([g for _, g in parts]) if parts else torch.zeros(0, k, k, dtype=torch.float64)
    else:
        total = torch.zeros(n_groups(shape, grouping), k, k, dtype=torch.float64)
        for _, g in parts:
            total += g
    if not bool(torch.isfinite(total).all()):
        raise deltas.first_bad_input() or NonFiniteError(
            f"tensor {deltas.name!r}: the base model's weights contain NaN or inf.")
    return total


class SpanKernel(BlockKernel):
    """A merge whose result is ``sum_j c_j [base, delta_1, .., delta_N]_j`` with coefficients
    from the tensor's Gram matrices (see the module docstring).

    Args:
        solve: the method's coefficients from the Gram matrices (:data:`Solver`); may raise
            :class:`~hf_taskarith.errors.MergeConfigError` for inputs the method refuses.
        shape: the tensor's shape.
        grouping: one Gram matrix per tensor, per row, or per column.
    """

    catches_nonfinite_inputs = True  # prepare checks the Gram matrix, which sees every entry

    def __init__(self, solve: Solver, *, shape: tuple[int, ...], grouping: Grouping = "tensor"):
        self.solve, self.shape, self.grouping = solve, tuple(shape), grouping
        self.align = group_size(self.shape, grouping)
        self.coef: torch.Tensor | None = None  # (groups, k) float32
        self.base_coef: torch.Tensor | None = None  # (groups,) float32: c_0 - 1, or None if all 0

    def prepare(self, deltas: DeltaBlocks, runner: BlockRunner) -> None:
        coef = self.solve(gram(deltas, runner, self.grouping, self.shape))
        if not bool(torch.isfinite(coef).all()):
            raise NonFiniteError(f"tensor {deltas.name!r}: the merge's coefficients are not finite (extreme weights "
                                 "or inputs).")
        self.coef = coef[:, 1:].to(torch.float32)
        shift = coef[:, 0] - 1
        self.base_coef = shift.to(torch.float32) if bool((shift != 0).any()) else None

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        if self.coef is None:
            raise RuntimeError(f"{type(self).__name__}.merge() was called before prepare(): prepare() computes the "
                               "tensor's coefficients from its Gram matrix; call it once per tensor first.")
        if self.grouping == "tensor":
            out = self.coef[0] @ deltas
            if self.base_coef is not None:
                out.add_(base, alpha=float(self.base_coef[0]))
            return out
        n, m = deltas.shape
        row = self.align
        if self.grouping == "rows":
            first = start // row
            coef = self.coef[first:first + m // row].T.unsqueeze(-1)  # (n, r, 1)
            shift = None if self.base_coef is None else self.base_coef[first:first + m // row].unsqueeze(-1)
        else:
            coef = self.coef.T.unsqueeze(1)  # (n, 1, row)
            shift = None if self.base_coef is None else self.base_coef.unsqueeze(0)
        rows = deltas.view(n, m // row, row)
        out = (rows[0] * coef[0]) if n else torch.zeros(m // row, row)
        for i in range(1, n):
            out.add_(rows[i] * coef[i])
        if shift is not None:
            out.add_(base.view(m // row, row) * shift)
        return out.view(m)


def input_vectors(n_inputs: int, picks: list[int], *, weights: bool, base: bool = False) -> torch.Tensor:
    """The vectors a method works on, as rows of coefficients on ``[base, delta_1, .., delta_N]``:
    input ``i``'s weights ``base + delta_i`` (``weights``) or its delta, for each ``i`` in
    ``picks``; with ``base``, one more row for the base's weights. ``(len(picks) [+ 1], N + 1)``
    float64."""
    rows = torch.zeros(len(picks) + int(base), n_inputs + 1, dtype=torch.float64)
    for r, i in enumerate(picks):
        rows[r, i + 1] = 1
        if weights:
            rows[r, 0] = 1
    if base:
        rows[-1, 0] = 1
    return rows


def vectors_gram(gram: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """The Gram matrices of ``vectors`` (rows of basis coefficients, :func:`input_vectors`) from
    those of the basis: ``V G V^T`` for each group."""
    return vectors @ gram @ vectors.T


def on_basis(coef: torch.Tensor, vectors: torch.Tensor, *, plus_base: bool) -> torch.Tensor:
    """Coefficients on ``vectors`` -> coefficients on the basis, plus the base itself when
    ``plus_base`` (a result that is ``base + combination``)."""
    out = coef @ vectors
    if plus_base:
        out[:, 0] += 1
    return out
