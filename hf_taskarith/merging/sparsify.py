"""Sparsification of one delta tensor: pure functions, float32 in, same shape out.

Every function returns ``delta * mask`` (optionally rescaled so the L1 norm is preserved,
as DARE and DELLA prescribe). Randomized ones take an explicit ``torch.Generator``.

Differences from mergekit 0.1.5, on purpose:
- ``magnitude`` keeps *exactly* ``k = max(1, int(density * n))`` entries, breaking ties
  between equal magnitudes by position (lowest index first), so results do not depend on
  the sort algorithm. Selection is linear-time (:func:`top_k_rules`: a sampled bracket, one
  counting pass, ``kthvalue`` on the few scores inside the bracket), never a full sort.
- ``magnitude`` trims each tensor on its own by default (mergekit's scope). The TIES paper
  trims the whole flattened task vector; with a :class:`MagnitudeCut` (computed over every
  tensor of a task vector by :mod:`hf_taskarith.merging.global_trim`) it does that instead.
- ``magnitude_outliers`` (breadcrumbs) keeps at least one entry for any positive density,
  so tensors with fewer than ``1 / gamma`` (100 at the default) elements are never wiped
  out; mergekit versions before 0.1.5 zeroed such tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def kept_count(n: int, density: float) -> int:
    """How many of ``n`` entries a ``density`` keeps: ``max(1, int(density * n))`` (0 if ``n`` is 0)."""
    return max(1, int(density * n)) if n else 0


def _top_k_small(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k mask of a 1-D tensor via one ``kthvalue`` (ties: lowest index first)."""
    n = flat.numel()
    thr = torch.kthvalue(flat, n - k + 1).values  # the k-th largest is the (n-k+1)-th smallest
    mask = flat > thr
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        eq = (flat == thr).nonzero().reshape(-1)[:missing]
        mask[eq] = True
    return mask


@dataclass(frozen=True)
class TopKRule:
    """The entries an exact top-k selection keeps: every score above ``threshold``, and the
    scores equal to it whose flat index is below ``tie_end`` (ties go lowest index first).

    Found by :func:`top_k_rules`; applied to any block of the scores with :meth:`mask`.
    """

    threshold: float
    tie_end: int

    def mask(self, scores: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Boolean mask of the kept entries of ``scores``, a block starting at flat index ``start``."""
        flat = scores.reshape(-1)
        stop = start + flat.numel()
        if self.tie_end >= stop:
            return (flat >= self.threshold).reshape(scores.shape)
        mask = flat > self.threshold
        if self.tie_end > start:
            head = self.tie_end - start
            mask[:head] |= flat[:head] == self.threshold
        return mask.reshape(scores.shape)

    def keep(self, scores: torch.Tensor, start: int, out: torch.Tensor) -> torch.Tensor:
        """:meth:`mask` of a 1-D block as floats (1.0 kept, 0.0 dropped), written to ``out``."""
        stop = start + scores.numel()
        if self.tie_end >= stop:  # ties in this block are kept
            return torch.ge(scores, self.threshold, out=out)
        if self.tie_end <= start:
            return torch.gt(scores, self.threshold, out=out)
        head = self.tie_end - start
        torch.ge(scores[:head], self.threshold, out=out[:head])
        torch.gt(scores[head:], self.threshold, out=out[head:])
        return out


def _brackets(n: int, ks: list[int], sample: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per row, scores ``lo <= hi`` that very likely enclose the k-th largest, from a sample
    of each row's scores ``(rows, m)``."""
    m = sample.shape[1]
    values = sample.sort(dim=1).values
    lo, hi = [], []
    for r, k in enumerate(ks):
        below = (n - k) / n  # fraction of scores under the k-th largest
        # 12 standard errors of a sample quantile: samples may come in correlated runs
        spread = 12.0 * math.sqrt(below * (1.0 - below) / m) + 2.0 / m
        lo_rank, hi_rank = math.floor((below - spread) * m), math.ceil((below + spread) * m)
        lo.append(float(values[r, lo_rank]) if lo_rank >= 0 else -math.inf)
        hi.append(float(values[r, hi_rank]) if hi_rank < m else math.inf)
    return lo, hi


def _scan_block(start: int, block: torch.Tensor, work: torch.Tensor | None, lo: torch.Tensor, hi: torch.Tensor
                ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per row of a block of scores: how many exceed ``hi``, and the (values, flat indices)
    of those in ``[lo, hi]``. Comparisons write float masks (much faster than bool ones)."""
    if work is None:
        work = torch.empty((2,) + tuple(block.shape), dtype=block.dtype)
    above = torch.gt(block, hi, out=work[0])
    counts = above.sum(dim=1).to(torch.int64)  # exact per block (< 2**24); summed as integers
    inside = torch.ge(block, lo, out=work[1]).sub_(above)  # lo <= x <= hi
    found = []
    for row, mask in zip(block, inside):
        where = mask.nonzero().reshape(-1)
        found.append((row.index_select(0, where), where.add_(start)))
    return counts, found


def top_k_rules(n: int, ks: list[int], *, sample: torch.Tensor | None,
                scan: Callable[[Callable[[int, torch.Tensor, torch.Tensor | None], Any]], list[Any]]
                ) -> list[TopKRule]:
    """Exact top-k selections over rows of ``n`` finite scores seen only block by block.

    Args:
        n: scores per row.
        ks: per row, how many to keep (``0 < k < n``).
        sample: some of each row's scores, ``(rows, m)``, to bracket the k-th largest; ``None``
            to scan without a bracket (fine for small ``n``).
        scan: ``scan(fn)`` calls ``fn(start, scores[:, start:stop], work)`` on blocks covering
            all scores (in any order, on any thread) and returns the results in block order;
            ``work`` is ``None`` or a float32 scratch buffer of shape ``(2, *scores.shape)``.
            It is called once, or again when the sample misleads.

    Returns:
        Per row, the rule selecting exactly ``k`` scores: the largest, ties broken lowest
        index first.

    Note:
        The sample brackets each k-th largest score; one pass counts the scores above the
        bracket and collects the few (several %) inside it, and ``kthvalue`` on those
        finishes exactly. Linear time, a small fraction of a sort. The sample only steers the
        speed: a row whose bracket misses is redone with an open bracket. NaN scores are not
        supported (:func:`top_k_mask` handles them).
    """
    rows = len(ks)
    lo, hi = _brackets(n, ks, sample) if sample is not None else ([-math.inf] * rows, [math.inf] * rows)
    while True:
        lo_t, hi_t = torch.tensor(lo).unsqueeze(1), torch.tensor(hi).unsqueeze(1)
        results = scan(lambda start, block, work, lo_t=lo_t, hi_t=hi_t: _scan_block(start, block, work, lo_t, hi_t))
        above = torch.stack([counts for counts, _ in results]).sum(dim=0).tolist() if results else [0] * rows
        values = [torch.cat([found[r][0] for _, found in results]) for r in range(rows)]
        index = [torch.cat([found[r][1] for _, found in results]) for r in range(rows)]
        del results
        needs = [k - a for k, a in zip(ks, above)]
        retry = False
        for r in range(rows):
            if needs[r] <= 0:  # more than k above the bracket: the k-th largest is above hi
                lo[r], hi[r], retry = hi[r], math.inf, True
            elif needs[r] > values[r].numel():  # fewer than k at or above lo: it is below lo
                lo[r], hi[r], retry = -math.inf, lo[r], True
        if not retry:
            break
    rules = []
    for r in range(rows):
        vals, idx = values[r], index[r]  # in flat-index order
        threshold = torch.kthvalue(vals, vals.numel() - needs[r] + 1).values
        ties_needed = needs[r] - int(torch.count_nonzero(vals > threshold))
        tie_end = int(idx[vals == threshold][ties_needed - 1]) + 1
        rules.append(TopKRule(float(threshold), tie_end))
    return rules


def order_statistics(n: int, ranks: list[int], *, sample: torch.Tensor | None,
                     scan: Callable[[Callable[[int, torch.Tensor, torch.Tensor | None], Any]], list[Any]]
                     ) -> list[float]:
    """The ``rank``-th smallest (0-based) of ``n`` finite scores seen only block by block, for
    each of ``ranks`` (``torch.kthvalue(scores, rank + 1)``, without the whole tensor).

    Args:
        n: how many scores.
        ranks: 0-based ranks, each in ``[1, n - 1]`` (the minimum is not supported).
        sample: ``(len(ranks), m)``: some scores, repeated once per rank, or ``None``.
        scan: as :func:`top_k_rules`, its blocks ``(len(ranks), m)``: the scores repeated per rank.

    Returns:
        The scores of those ranks, as Python floats (exactly the float32 scores).
    """
    if any(not 0 < r < n for r in ranks):
        raise ValueError(f"ranks must lie in [1, {n - 1}], got {ranks}.")
    return [rule.threshold for rule in top_k_rules(n, [n - r for r in ranks], sample=sample, scan=scan)]


#: a sample this large brackets the k-th largest of a big tensor; smaller tensors use ``kthvalue``
_SAMPLE = 1 << 14


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of ``scores`` (ties: lowest index first)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    finite = bool(torch.isfinite(flat.sum())) or bool(torch.isfinite(flat).all())
    if n <= 8 * _SAMPLE or not finite:
        return _top_k_small(flat, k).reshape(scores.shape)  # small, or NaN/inf (kthvalue orders those)
    block = 1 << 16
    stride = n // _SAMPLE
    gen = torch.Generator().manual_seed(0)  # fixed: the sample only steers the speed
    index = torch.arange(_SAMPLE) * stride + torch.randint(stride, (_SAMPLE,), generator=gen)
    (rule,) = top_k_rules(n, [k], sample=flat.index_select(0, index).unsqueeze(0),
                          scan=lambda fn: [fn(s, flat[s:s + block].unsqueeze(0), None) for s in range(0, n, block)])
    return rule.mask(flat).reshape(scores.shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals ``delta``'s (unchanged if either is ~0)."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


@dataclass(frozen=True)
class MagnitudeCut:
    """One tensor's share of a trim decided over a whole task vector (``trim_scope: global``).

    Keeps every entry with ``|delta| > threshold``, and of the entries with ``|delta| ==
    threshold`` the first ``ties`` in flat-index order (``None``: all of them). The threshold
    is the task vector's k-th largest magnitude, so over all tensors exactly k entries are
    kept; :mod:`hf_taskarith.merging.global_trim` computes the cuts.

    Example:
        >>> MagnitudeCut(0.5, ties=1).mask(torch.tensor([0.5, -0.7, 0.5, 0.1])).tolist()
        [True, True, False, False]
    """

    threshold: float
    ties: int | None = None

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the kept entries of ``delta`` (any shape)."""
        scores = delta.abs()
        if self.ties is None:
            return scores >= self.threshold
        mask = scores > self.threshold
        if self.ties > 0:
            flat = mask.reshape(-1)
            flat[(scores.reshape(-1) == self.threshold).nonzero().reshape(-1)[:self.ties]] = True
        return mask


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False,
              generator: torch.Generator | None = None, inplace: bool = False,
              cut: MagnitudeCut | None = None) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES trimming).

    With ``inplace=True`` (and no rescale) ``delta`` itself is multiplied by the mask and
    returned, saving a full-size copy; the merge pipeline does this with deltas it owns.
    With ``cut`` (``trim_scope: global``), the entries kept are those of the cut, decided
    over the whole task vector; ``density`` is then only checked for being < 1.
    """
    if density >= 1:
        return delta
    mask = cut.mask(delta) if cut is not None else top_k_mask(delta.abs(), kept_count(delta.numel(), density))
    if not rescale:
        return delta.mul_(mask) if inplace else delta * mask
    return rescale_l1(delta, delta * mask)


def random(delta: torch.Tensor, density: float, *, rescale: bool = True,
           generator: torch.Generator | None = None, inplace: bool = False) -> torch.Tensor:
    """Drop each entry with probability ``1 - density`` (DARE), then rescale (L1) if asked."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    kept = delta * mask
    return rescale_l1(delta, kept) if rescale else kept


def magnitude_outliers(delta: torch.Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False,
                       generator: torch.Generator | None = None, inplace: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude entries (outliers),
    then keep the next ``density`` fraction by magnitude; the smallest are dropped."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = kept_count(n, density)
    n_top = min(int(gamma * n), n - keep)  # shrink outlier removal to keep the target density
    scores = delta.abs().reshape(-1)
    outliers = top_k_mask(scores, n_top).reshape(-1)
    # rank the rest: push outliers to -1 so they are never chosen
    mask = top_k_mask(torch.where(outliers, torch.full_like(scores, -1.0), scores), keep)
    kept = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, kept) if rescale else kept


def della_magprune(delta: torch.Tensor, density: float, *, epsilon: float = 0.15, rescale: bool = True,
                   generator: torch.Generator | None = None, inplace: bool = False,
                   rescale_mode: str = "l1") -> torch.Tensor:
    """DELLA MagPrune: drop entries at random with keep-probabilities that grow linearly with
    magnitude rank along dimension 1 (within each row of a matrix), from ``density - epsilon``
    to ``density + epsilon``.

    ``rescale_mode``: ``"l1"`` (mergekit's: the kept entries are scaled so the delta keeps its
    L1 norm) or ``"inverse_probability"`` (the paper's: each kept entry is divided by its own
    keep-probability ``1 - p_i``, so every entry is unbiased in expectation)."""
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        from ..errors import MergeConfigError

        raise MergeConfigError(
            f"della needs 0 < density - epsilon and density + epsilon < 1; got density={density}, "
            f"epsilon={epsilon}. Lower epsilon or move density away from 0 and 1."
        )
    # ranks along dimension 1, as mergekit: within each row of a matrix, and for >= 3-D tensors
    # (convolutions) along the input channels at each (output channel, position)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 = smallest
    norm = ranks / max(n - 1, 1)
    probs = (density - epsilon) + norm * (2 * epsilon)
    mask = torch.bernoulli(probs, generator=generator).reshape(delta.shape)
    kept = delta * mask
    if not rescale:
        return kept
    if rescale_mode == "inverse_probability":
        return kept / probs.reshape(delta.shape)
    return rescale_l1(delta, kept)


#: name -> sparsifier, as used by the generalized task-arithmetic pipeline.
SPARSIFIERS = {
    "magnitude": magnitude,
    "random": random,
    "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune,
}
