"""Sparsification of one delta tensor: pure functions, float32 in, same shape out.

Every function returns ``delta * mask`` (optionally rescaled so the L1 norm is preserved,
as DARE and DELLA prescribe). Randomized ones take an explicit ``torch.Generator``.

Differences from mergekit 0.1.5, on purpose:
- ``magnitude`` keeps *exactly* ``k = max(1, int(density * n))`` entries, breaking ties
  between equal magnitudes by position (lowest index first), so results do not depend on
  the sort algorithm. Selection is linear-time (a radix select on the float bits for large
  tensors, ``kthvalue`` for small ones), never a full sort.
- ``magnitude_outliers`` (breadcrumbs) keeps at least one entry for any positive density,
  so tensors with fewer than ``1 / gamma`` (100 at the default) elements are never wiped
  out; mergekit versions before 0.1.5 zeroed such tensors.
"""

from __future__ import annotations

import torch


def _count(n: int, density: float) -> int:
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


_RADIX_MIN = 1 << 20


def _top_k_radix(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k mask of non-negative float32 values by a radix select on their bit patterns.

    For non-negative IEEE floats the int32 bit pattern orders like the value, so a histogram
    of the top 16 bits finds the bucket holding the k-th largest in one pass; only that
    bucket is resolved exactly (with :func:`_top_k_small`). About 4 passes over the data
    instead of a quickselect, and the same result, ties included.
    """
    bits = flat.view(torch.int32)
    hi = bits >> 16
    counts = torch.bincount(hi, minlength=1 << 15)
    at_least = counts.flip(0).cumsum(0).flip(0)  # at_least[b] = #entries with hi >= b
    bucket = int((at_least >= k).nonzero().max())
    mask = hi > bucket
    need = k - int(torch.count_nonzero(mask))
    if need > 0:
        candidates = (hi == bucket).nonzero().reshape(-1)
        low = (bits[candidates] & 0xFFFF).to(torch.float32)  # exact: < 2**16
        mask[candidates[_top_k_small(low, need)]] = True
    return mask


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries of ``scores`` (ties: lowest index first)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    use_radix = (n >= _RADIX_MIN and flat.dtype == torch.float32 and flat.is_contiguous()
                 and bool(flat.min() >= 0) and bool(torch.isfinite(flat.max())))
    mask = _top_k_radix(flat, k) if use_radix else _top_k_small(flat, k)
    return mask.reshape(scores.shape)


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm equals ``delta``'s (unchanged if either is ~0)."""
    before, after = delta.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(delta: torch.Tensor, density: float, *, rescale: bool = False,
              generator: torch.Generator | None = None, inplace: bool = False) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES trimming).

    With ``inplace=True`` (and no rescale) ``delta`` itself is zeroed where dropped and
    returned, saving a full-size copy; the merge pipeline does this with deltas it owns.
    """
    if density >= 1:
        return delta
    mask = top_k_mask(delta.abs(), _count(delta.numel(), density))
    if not rescale:
        return delta.masked_fill_(~mask, 0.0) if inplace else delta * mask
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
    keep = _count(n, density)
    n_top = min(int(gamma * n), n - keep)  # shrink outlier removal to keep the target density
    scores = delta.abs().reshape(-1)
    outliers = top_k_mask(scores, n_top).reshape(-1)
    # rank the rest: push outliers to -1 so they are never chosen
    mask = top_k_mask(torch.where(outliers, torch.full_like(scores, -1.0), scores), keep)
    kept = delta * mask.reshape(delta.shape)
    return rescale_l1(delta, kept) if rescale else kept


def della_magprune(delta: torch.Tensor, density: float, *, epsilon: float = 0.15, rescale: bool = True,
                   generator: torch.Generator | None = None, inplace: bool = False) -> torch.Tensor:
    """DELLA MagPrune: drop entries at random with keep-probabilities that grow linearly with
    magnitude rank within each row, from ``density - epsilon`` to ``density + epsilon``."""
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        from ..errors import MergeConfigError

        raise MergeConfigError(
            f"della needs 0 < density - epsilon and density + epsilon < 1; got density={density}, "
            f"epsilon={epsilon}. Lower epsilon or move density away from 0 and 1."
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 = smallest
    norm = ranks / max(n - 1, 1)
    probs = (density - epsilon) + norm * (2 * epsilon)
    mask = torch.bernoulli(probs, generator=generator).reshape(delta.shape)
    kept = delta * mask
    return rescale_l1(delta, kept) if rescale else kept


#: name -> sparsifier, as used by the generalized task-arithmetic pipeline.
SPARSIFIERS = {
    "magnitude": magnitude,
    "random": random,
    "magnitude_outliers": magnitude_outliers,
    "della_magprune": della_magprune,
}
