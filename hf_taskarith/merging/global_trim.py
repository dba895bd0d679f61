"""Trimming each task vector as one flattened vector (TIES ``trim_scope: global``).

The TIES paper (Yadav et al., 2023) keeps the top ``density`` fraction of each task vector by
magnitude, the vector flattened whole; mergekit, and our default ``trim_scope: tensor``, keep
that fraction of every tensor separately. Trimming globally needs, for each input, the k-th
largest magnitude over all its tensors before any tensor is merged. :class:`GlobalMagnitudeCut`
finds it exactly while the engine streams the deltas (a :class:`~.prepass.ModelPrepass`), then
hands each tensor its share of the cut (:class:`~.sparsify.MagnitudeCut`).

How: radix selection on the float32 bit patterns of ``|delta|`` (for non-negative floats the
bits, read as integers, are ordered like the values):

1. a histogram of the upper 16 bits of every magnitude gives the bin holding the k-th
   largest, and how many magnitudes lie above that bin;
2. a histogram of the lower 16 bits of the magnitudes in that bin gives the k-th largest
   magnitude ``t`` exactly, how many exceed it and how many equal it;
3. only when some but not all magnitudes equal to ``t`` can be kept (frequent with bfloat16
   checkpoints, whose deltas take few distinct values): how many equal ``t`` in each tensor,
   so that the kept ties are the first in (tensor order, flat index) order, as the per-tensor
   trim breaks ties by lowest index.

Over all tensors of each input exactly ``max(1, int(density * N))`` entries are kept, ``N``
being the entries of that task vector the merge reads (vocabulary-aligned tensors count
their common rows).

Note:
    Cost: two extra reads of every input, three when ties straddle the cut; each is like a
    merge pass that writes nothing. Memory: 32768 + 65536 64-bit counters per input (768 KB)
    and one counter per tensor and input, whatever the model's size; blocks are streamed as
    in the merge itself. Nothing of the magnitudes themselves is kept.
"""

from __future__ import annotations

from typing import Any

import torch

from .prepass import ModelPrepass
from .sparsify import MagnitudeCut, kept_count

#: bins of the upper 16 bits of a non-negative float32 (the sign bit is 0)
HIGH_BINS = 1 << 15
#: bins of the lower 16 bits
LOW_BINS = 1 << 16

_HISTOGRAM, _REFINE, _TIES, _DONE = range(4)


def magnitude_bits(deltas: torch.Tensor) -> torch.Tensor:
    """``|deltas|`` as int32 bit patterns, ordered as the magnitudes are (finite float32 input)."""
    return deltas.abs().view(torch.int32)


def _row_bincount(index: torch.Tensor, bins: int) -> torch.Tensor:
    """Per row of a ``(rows, m)`` integer tensor with values in ``[0, bins)``: counts ``(rows, bins)``."""
    rows = index.shape[0]
    offset = torch.arange(rows, dtype=index.dtype).unsqueeze(1) * bins
    return torch.bincount((index + offset).reshape(-1), minlength=rows * bins).reshape(rows, bins)


def _highest_reaching(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The highest bin ``b`` whose count, plus the counts of all bins above it, reaches ``k``;
    and how many lie in bins above ``b``."""
    at_or_above = counts.flip(0).cumsum(0).flip(0)
    b = int((at_or_above >= k).nonzero().max())
    return b, int(at_or_above[b] - counts[b])


class GlobalMagnitudeCut(ModelPrepass):
    """The exact global magnitude cut of each input (see the module docstring).

    Args:
        densities: per input, the fraction of its task vector kept; inputs with density >= 1
            keep everything and get no cut.

    Example:
        >>> cut = GlobalMagnitudeCut([0.5])
        >>> while cut.needs_pass():
        ...     for name, d in [("a", torch.tensor([[3.0, -1.0]])), ("b", torch.tensor([[0.5, 2.0]]))]:
        ...         cut.collect(name, [0], [cut.scan(d, [0])])
        ...     cut.end_pass()
        >>> cut.tensor_params("b", [0])["magnitude_cut"][0].threshold
        2.0
    """

    description = "global trim"

    def __init__(self, densities: list[float]):
        self.densities = list(densities)
        n = len(self.densities)
        self._stage = _HISTOGRAM
        self._total = [0] * n
        self._high = torch.zeros(n, HIGH_BINS, dtype=torch.int64)
        self._low = torch.zeros(n, LOW_BINS, dtype=torch.int64)
        self._bin = [-1] * n             # selected upper-16-bit bin, -1 for inputs without a cut
        self._threshold = [-1] * n       # bits of the k-th largest magnitude
        self._ties_kept = [0] * n        # how many magnitudes equal to the threshold are kept
        self._ties_all = [0] * n         # how many there are
        self._tie_counts: list[tuple[str, list[int], list[int]]] = []  # (tensor, inputs, counts)
        self._quota: dict[str, dict[int, int]] = {}

    def needs_pass(self) -> bool:
        return self._stage != _DONE

    def scan(self, deltas: torch.Tensor, inputs: list[int]) -> torch.Tensor:
        bits = magnitude_bits(deltas)
        if self._stage == _HISTOGRAM:
            return _row_bincount(bits >> 16, HIGH_BINS)
        if self._stage == _REFINE:  # row by row: select the few in the bin first, then count
            return torch.stack([torch.bincount(row[(row >> 16) == self._bin[i]] & 0xFFFF, minlength=LOW_BINS)
                                for row, i in zip(bits, inputs)])
        wanted = torch.tensor([self._threshold[i] for i in inputs], dtype=torch.int32).unsqueeze(1)
        return (bits == wanted).sum(dim=1)

    def collect(self, name: str, inputs: list[int], partials: list[Any]) -> None:
        total = torch.stack(partials).sum(dim=0)
        if self._stage == _HISTOGRAM:
            for row, i in enumerate(inputs):
                self._high[i] += total[row]
                self._total[i] += int(total[row].sum())
        elif self._stage == _REFINE:
            for row, i in enumerate(inputs):
                self._low[i] += total[row]
        elif self._tie_counts and self._tie_counts[-1][0] == name:  # more blocks of the same tensor
            self._tie_counts[-1] = (name, inputs, [a + b for a, b in zip(self._tie_counts[-1][2], total.tolist())])
        else:
            self._tie_counts.append((name, list(inputs), total.tolist()))

    def end_pass(self) -> None:
        if self._stage == _HISTOGRAM:
            for i, density in enumerate(self.densities):
                k = kept_count(self._total[i], density)
                if density < 1 and k < self._total[i]:
                    self._bin[i], above = _highest_reaching(self._high[i], k)
                    self._ties_kept[i] = k - above  # still to find inside the bin
            self._high = None  # type: ignore[assignment]
            self._stage = _REFINE if any(b >= 0 for b in self._bin) else _DONE
        elif self._stage == _REFINE:
            for i, b in enumerate(self._bin):
                if b < 0:
                    continue
                low, above = _highest_reaching(self._low[i], self._ties_kept[i])
                self._threshold[i] = (b << 16) | low
                self._ties_all[i] = int(self._low[i][low])
                self._ties_kept[i] -= above
            self._low = None  # type: ignore[assignment]
            split = any(t >= 0 and self._ties_kept[i] < self._ties_all[i] for i, t in enumerate(self._threshold))
            self._stage = _TIES if split else _DONE
        elif self._stage == _TIES:
            remaining = list(self._ties_kept)
            for name, inputs, counts in self._tie_counts:
                for i, count in zip(inputs, counts):
                    if self._threshold[i] >= 0 and self._ties_kept[i] < self._ties_all[i]:
                        kept = min(remaining[i], count)
                        remaining[i] -= kept
                        if kept < count:
                            self._quota.setdefault(name, {})[i] = kept
            self._tie_counts = []
            self._stage = _DONE

    def threshold(self, i: int) -> float | None:
        """Input ``i``'s k-th largest magnitude over its whole task vector (``None``: no cut)."""
        if self._threshold[i] < 0:
            return None
        return float(torch.tensor(self._threshold[i], dtype=torch.int32).view(torch.float32))

    def tensor_params(self, name: str, inputs: list[int]) -> dict[str, Any]:
        quota = self._quota.get(name, {})
        cuts = [None if self._threshold[i] < 0 else MagnitudeCut(self.threshold(i), quota.get(i))
                for i in inputs]
        return {"magnitude_cut": cuts}
