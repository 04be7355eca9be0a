"""Confidence intervals against references: scipy.stats for the t interval, a slow scikit-learn loop for the
paired bootstrap over test images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import average_precision_score

from clml_core.stats import Interval, bootstrap_map_difference, paired_difference, t_interval


@pytest.mark.parametrize("n", [2, 3, 5, 12])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_matches_scipy(n, confidence):
    values = np.random.default_rng(n).normal(40.0, 2.0, n)
    got = t_interval(values, confidence)
    low, high = scipy_stats.t.interval(confidence, n - 1, loc=values.mean(), scale=scipy_stats.sem(values))
    assert np.isclose(got.estimate, values.mean()) and np.isclose(got.low, low) and np.isclose(got.high, high)
    assert (got.n, got.method, got.confidence) == (n, "t", confidence)


def test_t_interval_one_value_is_undefined_and_constant_values_have_zero_width():
    one = t_interval([3.0])
    assert one.estimate == 3.0 and math.isnan(one.low) and math.isnan(one.high)
    assert not one.defined and one.excludes_zero is None
    flat = t_interval([2.0, 2.0, 2.0])
    assert (flat.low, flat.high, flat.excludes_zero) == (2.0, 2.0, True)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, float("inf")]])
def test_t_interval_rejects_empty_and_non_finite(bad):
    with pytest.raises(ValueError, match="t_interval"):
        t_interval(bad)


def test_t_interval_rejects_bad_confidence():
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)


def test_paired_difference_is_the_one_sample_t_interval_of_the_differences():
    rng = np.random.default_rng(0)
    control = rng.normal(40, 3, 5)  # a large seed effect shared by both sides
    treated = control + 0.5 + rng.normal(0, 0.1, 5)
    got = paired_difference(treated, control)
    diffs = treated - control
    low, high = scipy_stats.t.interval(0.95, 4, loc=diffs.mean(), scale=scipy_stats.sem(diffs))
    assert np.allclose([got.estimate, got.low, got.high], [diffs.mean(), low, high])
    assert got.excludes_zero  # pairing removes the seed effect: a clear difference
    unpaired = scipy_stats.ttest_ind(treated, control)
    assert unpaired.pvalue > 0.05  # which an unpaired comparison misses
    assert scipy_stats.ttest_rel(treated, control).pvalue < 0.05  # scipy's paired test agrees


def test_paired_difference_rejects_unpaired_lengths():
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_difference([1.0, 2.0], [1.0])


def _slow_bootstrap(labels, a, b, n_resamples, seed, confidence):
    """Loop reference: the same resamples, scikit-learn's AP per class, classes without a positive left out."""
    rng = np.random.default_rng(seed)
    n = len(labels)

    def diff(rows):
        values = []
        for c in range(labels.shape[1]):
            if labels[rows, c].any():
                values.append(
                    average_precision_score(labels[rows, c], a[rows, c])
                    - average_precision_score(labels[rows, c], b[rows, c])
                )
        return 100 * float(np.mean(values))

    draws = [diff(rng.integers(0, n, n)) for _ in range(n_resamples)]
    alpha = (1 - confidence) / 2
    return diff(np.arange(n)), *np.quantile(draws, [alpha, 1 - alpha])


def test_bootstrap_map_difference_matches_slow_loop():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 4)) < 0.2).astype(int)
    labels[:, 3] = 0
    labels[0, 3] = 1  # a rare class: absent from many resamples
    a = labels + rng.normal(0, 0.8, labels.shape)
    b = labels + rng.normal(0, 1.2, labels.shape)
    got = bootstrap_map_difference(labels, a, b, n_resamples=200, seed=3)
    expected = _slow_bootstrap(labels, a, b, 200, 3, 0.95)
    assert np.allclose([got.estimate, got.low, got.high], expected)
    assert (got.n, got.method) == (60, "bootstrap") and isinstance(got, Interval)


def test_bootstrap_map_difference_detects_a_better_model_and_not_an_equal_one():
    rng = np.random.default_rng(2)
    labels = (rng.random((400, 5)) < 0.3).astype(int)
    good = labels + rng.normal(0, 0.5, labels.shape)
    poor = labels + rng.normal(0, 2.0, labels.shape)
    assert bootstrap_map_difference(labels, good, poor, n_resamples=200).excludes_zero
    same = bootstrap_map_difference(labels, good, good, n_resamples=200)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_bootstrap_map_difference_bad_input():
    labels = np.zeros((10, 2), dtype=int)
    with pytest.raises(ValueError, match="same"):
        bootstrap_map_difference(labels, np.zeros((10, 3)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_map_difference(labels, np.zeros((10, 2)), np.zeros((10, 2)), n_resamples=10)
