"""The studies' intervals on cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_taskarith.evaluation.statistics import (
    Interval,
    accuracy_standard_error,
    mean_interval,
    paired_bootstrap,
)


def test_mean_interval_is_the_student_t_interval():
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.estimate == 2.0 and iv.n == 3
    assert iv.high - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) * sd / sqrt(n)
    assert mean_interval([5.0]) == Interval(5.0, 5.0, 5.0, 0.95, 1)  # one seed: no spread
    assert mean_interval([2.0, 2.0, 2.0]).high == 2.0
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=95)


def test_identical_predictions_give_a_zero_interval_and_no_verdict():
    a = {"t": np.array([1, 0, 1, 1, 0] * 40)}
    iv = paired_bootstrap(a, {"t": a["t"].copy()})
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert iv.verdict("linear", "nonlinear") == "no difference resolved between linear and nonlinear"


def test_a_clear_difference_is_resolved_in_the_right_direction():
    a = {"t": np.array([1, 1, 1, 0] * 50)}
    b = {"t": np.array([1, 0, 1, 0] * 50)}
    iv = paired_bootstrap(a, b)
    assert iv.estimate == pytest.approx(0.25) and iv.low > 0.15 and iv.high < 0.35
    assert iv.verdict("A", "B") == "A beats B"
    assert paired_bootstrap(b, a).verdict("A", "B") == "B beats A"


def test_tasks_count_equally_not_by_size():
    """Mean over tasks of the per-task difference: a big task does not outweigh a small one."""
    a = {"big": np.ones(1000), "small": np.zeros(10)}
    b = {"big": np.zeros(1000), "small": np.ones(10)}
    assert paired_bootstrap(a, b).estimate == pytest.approx(0.0)  # (+1 - 1) / 2, not (1000 - 10) / 1010


def test_coverage_is_near_nominal_on_simulated_paired_data():
    """Draw many test sets from a known model (B right with p 0.7; A flips 10% of B's errors to right
    and 4% of its rights to wrong: true difference 0.3 * 0.1 - 0.7 * 0.04 = 0.002), and count how
    often the 95% interval covers the truth."""
    rng = np.random.default_rng(1)
    truth, covered, trials = 0.3 * 0.1 - 0.7 * 0.04, 0, 150
    for i in range(trials):
        b = (rng.random(400) < 0.7).astype(float)
        flip = rng.random(400)
        a = np.where(b == 1, (flip >= 0.04).astype(float), (flip < 0.1).astype(float))
        iv = paired_bootstrap({"t": a}, {"t": b}, resamples=800, seed=i)
        covered += iv.low <= truth <= iv.high
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="same non-empty set of tasks"):
        paired_bootstrap({"a": [1]}, {"b": [1]})
    with pytest.raises(ValueError, match="3 examples for A but 2 for B"):
        paired_bootstrap({"a": [1, 0, 1]}, {"a": [1, 0]})
    with pytest.raises(ValueError, match="0/1 correctness"):
        paired_bootstrap({"a": [0.5, 1]}, {"a": [1, 0]})
    with pytest.raises(ValueError, match="empty"):
        accuracy_standard_error([])


def test_accuracy_standard_error_is_binomial():
    assert accuracy_standard_error([1, 0] * 50) == pytest.approx(math.sqrt(0.25 / 100))
    assert accuracy_standard_error([1] * 10) == 0.0
