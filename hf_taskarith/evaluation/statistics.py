"""Intervals for the studies' claims: over seeds, and paired over test examples.

Two questions come back in every comparison of editing methods:

* *How much does a figure move between seeds?* :func:`mean_interval` gives the mean of
  per-seed values and its Student-t interval.
* *Does A beat B on these test examples?* :func:`paired_bootstrap` resamples the test
  examples (the same resample for both, since both were scored on the same examples; within
  each task when there are several, so a task keeps its size) and gives the percentile
  interval of the difference in (mean per-task) accuracy. :meth:`Interval.verdict` reads it:
  a claim "A beats B" needs the whole interval above 0.

Per-task standard errors of an accuracy come from :func:`accuracy_standard_error`.

Example:
    >>> import numpy as np
    >>> a = {"trec": np.array([1, 1, 1, 0] * 50)}   # 75% right
    >>> b = {"trec": np.array([1, 0, 1, 0] * 50)}   # 50% right, on the same examples
    >>> paired_bootstrap(a, b).verdict("A", "B")
    'A beats B'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided interval.

    Attributes:
        estimate: the point estimate (a mean, or a difference of accuracies).
        low, high: the interval's ends.
        confidence: its nominal coverage (0.95: a 95% interval).
        n: how many values (seeds) or examples it rests on.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n: int

    def excludes(self, value: float = 0.0) -> bool:
        """Whether ``value`` lies outside the interval."""
        return value < self.low or value > self.high

    def verdict(self, a: str = "A", b: str = "B") -> str:
        """For an interval of ``a - b``: ``"a beats b"``, ``"b beats a"``, or that the data
        cannot tell them apart at this confidence."""
        if self.low > 0:
            return f"{a} beats {b}"
        if self.high < 0:
            return f"{b} beats {a}"
        return f"no difference resolved between {a} and {b}"

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}] ({100 * self.confidence:g}%, n={self.n})"


def mean_interval(values: Sequence[float], *, confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (e.g. one per seed) and its Student-t interval.

    Raises:
        ValueError: no values, or ``confidence`` outside (0, 1).

    Example:
        >>> str(mean_interval([1.0, 2.0, 3.0]))   # t(0.975, 2) = 4.303; 4.303 / sqrt(3) = 2.484
        '2 [-0.4841, 4.484] (95%, n=3)'
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval needs at least one value.")
    mean = float(x.mean())
    if x.size == 1:  # one seed: no spread to measure
        return Interval(mean, mean, mean, confidence, 1)
    from scipy.stats import t

    half = float(t.ppf(0.5 + confidence / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, confidence, int(x.size))


def accuracy_standard_error(correct: Sequence[float] | np.ndarray) -> float:
    """The binomial standard error ``sqrt(p (1 - p) / n)`` of the accuracy of 0/1 ``correct``."""
    c = _as_correct(correct, "correct")
    p = float(c.mean())
    return math.sqrt(p * (1 - p) / c.size)


def paired_bootstrap(a: Mapping[str, Sequence[float] | np.ndarray], b: Mapping[str, Sequence[float] | np.ndarray], *,
                     resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """The interval of ``mean_task acc_a - mean_task acc_b``, resampling test examples in pairs.

    Args:
        a, b: per task, 0/1 correctness of each test example (the same examples in the same
            order for ``a`` and ``b``: paired).
        resamples: bootstrap resamples.
        confidence: the interval's coverage (percentile interval).
        seed: the resampling seed (the interval is reproducible).

    Returns:
        :class:`Interval` of the difference (``estimate`` is the observed difference; ``n`` the
        number of examples over all tasks).

    Raises:
        ValueError: different tasks in ``a`` and ``b``, a task with a different number of
            examples on each side, an empty task, values other than 0/1.
    """
    _check_confidence(confidence)
    if set(a) != set(b) or not a:
        raise ValueError(f"paired_bootstrap needs the same non-empty set of tasks on both sides; got {sorted(a)} and "
                         f"{sorted(b)}.")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}.")
    rng = np.random.default_rng(seed)
    observed = 0.0
    samples = np.zeros(resamples)
    for task in sorted(a):
        ca, cb = _as_correct(a[task], f"a[{task!r}]"), _as_correct(b[task], f"b[{task!r}]")
        if ca.size != cb.size:
            raise ValueError(f"task {task!r}: {ca.size} examples for A but {cb.size} for B; a paired comparison "
                             "scores both on the same examples.")
        diff = ca - cb  # per example: +1, 0 or -1
        observed += float(diff.mean())
        for start in range(0, resamples, 1000):  # bounds the index array to 1000 x n
            stop = min(start + 1000, resamples)
            idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
            samples[start:stop] += diff[idx].mean(axis=1)
    k = len(a)
    lo, hi = np.quantile(samples / k, [0.5 - confidence / 2, 0.5 + confidence / 2])
    return Interval(observed / k, float(lo), float(hi), confidence, int(sum(len(v) for v in a.values())))


def _as_correct(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    c = np.asarray(values, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise ValueError(f"{what} is empty.")
    if not np.isin(c, (0.0, 1.0)).all():
        raise ValueError(f"{what} must hold 0/1 correctness per example; got values {np.unique(c)[:5].tolist()}.")
    return c


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
