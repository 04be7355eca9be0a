"""Confidence intervals for the study's comparisons: a t interval over seeds and a bootstrap over test images.

Runs with and without a change share their seed, data order and protocol draw, so a comparison is made on the
per-seed differences (a paired design): :func:`paired_difference` gives their mean with a Student t interval. A
single run per side (one seed, as in the paper profile) has no seed spread; :func:`bootstrap_map_difference`
resamples the test images instead (the same resample for both runs, which were scored on the same images), so
its interval covers test-set sampling only, not training noise.

Every function returns an :class:`Interval`: the estimate, its bounds and what they rest on. An interval that
cannot be computed (fewer than two seeds) has NaN bounds, never a made-up width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from clml_core.metrics import rank_by_class, ranked_average_precision


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval.

    Attributes:
        estimate: the mean (or the full-sample statistic for a bootstrap).
        low: lower bound; NaN when undefined.
        high: upper bound; NaN when undefined.
        n: seeds (t interval) or test images (bootstrap) the interval rests on.
        method: ``"t"`` or ``"bootstrap"``.
        confidence: coverage of the interval, e.g. 0.95.
    """

    estimate: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def excludes_zero(self) -> bool | None:
        """Whether 0 lies outside the interval; None when the interval is undefined."""
        return bool(self.low > 0 or self.high < 0) if self.defined else None


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with the Student t interval ``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)``.

    Args:
        values: (n,) finite numbers, e.g. one per seed.
        confidence: coverage in (0, 1).

    Returns:
        Interval with method ``"t"``; bounds NaN when n < 2. Identical values give a zero-width interval.

    Raises:
        ValueError: on an empty or non-finite input, or a confidence outside (0, 1).
    """
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("t_interval: no values")
    if not np.isfinite(x).all():
        raise ValueError(f"t_interval: values must be finite, got {x.tolist()}")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1, "t", confidence)
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size), "t", confidence)


def paired_difference(
    treated: Sequence[float] | np.ndarray, control: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> Interval:
    """Mean of the per-seed differences ``treated[i] - control[i]`` with its t interval.

    Args:
        treated: (n,) values of the changed configuration, one per seed.
        control: (n,) values of the reference, the same seeds in the same order.
        confidence: coverage in (0, 1).

    Raises:
        ValueError: when the two have different lengths (an unpaired seed).
    """
    a = np.asarray(treated, dtype=np.float64).ravel()
    b = np.asarray(control, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} treated values for {b.size} control values; pair them by seed")
    return t_interval(a - b, confidence)


def bootstrap_map_difference(
    labels: np.ndarray,
    scores_treated: np.ndarray,
    scores_control: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """mAP(treated) - mAP(control) on one test set, with a percentile bootstrap interval over test images.

    Each resample draws N images with replacement and scores both runs on the same draw (a paired bootstrap).
    mAP follows :func:`clml_core.metrics.mean_average_precision`: a class with no positive in a resample is left
    out of both means.

    Args:
        labels: (N, C) full test labels in {0, 1}.
        scores_treated: (N, C) scores of the changed configuration on those images.
        scores_control: (N, C) scores of the reference on the same images, same order.
        n_resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling.
        confidence: coverage in (0, 1).

    Returns:
        Interval with method ``"bootstrap"``, the full-sample difference as estimate and ``n = N``.
    """
    _check_confidence(confidence)
    if n_resamples < 100:
        raise ValueError(f"bootstrap_map_difference: n_resamples must be >= 100, got {n_resamples}")
    labels = np.asarray(labels)
    if not (labels.shape == np.shape(scores_treated) == np.shape(scores_control)) or labels.ndim != 2:
        raise ValueError(
            "bootstrap_map_difference: labels and both scores must have the same (N, C) shape, got "
            f"{labels.shape}, {np.shape(scores_treated)} and {np.shape(scores_control)}"
        )

    treated, control = rank_by_class(labels, scores_treated), rank_by_class(labels, scores_control)  # sorted once

    def difference(weights: np.ndarray | None) -> float:
        ap_t, ap_c = ranked_average_precision(treated, weights), ranked_average_precision(control, weights)
        return float(np.nanmean(ap_t - ap_c))  # the same classes are defined on both sides

    n = len(labels)
    estimate = difference(None)
    rng = np.random.default_rng(seed)
    # A resample of N images with replacement, as how often each image is drawn.
    draws = np.array([difference(np.bincount(rng.integers(0, n, n), minlength=n)) for _ in range(n_resamples)])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high), n, "bootstrap", confidence)
