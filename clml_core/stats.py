"""Confidence intervals, p-values and multiplicity corrections for the study's comparisons.

What an interval covers
-----------------------
A comparison scores a changed configuration (treated) and its reference (control) trained with the same seeds
(same head initialisation, data order and protocol draw) on one fixed test set. The quantity reported is the mean
over seeds of the per-seed difference ``d_s = mAP(treated_s) - mAP(control_s)``. Two sources of error move it:

* training noise (the seed): :func:`paired_difference` gives the Student t interval of the ``d_s``, which covers
  that source only ("seeds only");
* test-set sampling: the test images are one draw of the images the study could have been scored on, and every
  ``d_s`` is measured on the same draw. An image on which the treated arm happens to do better shifts every seed's
  difference alike; seeds cannot average that error away and a seeds-only interval does not see it.

:func:`two_level_interval` covers both ("seeds + test images"), from the ``d_s`` and a bootstrap over test images
that draws one resample for all runs (:func:`image_resamples`, :func:`resampled_average_precision`). Its variance is
a decomposition of the crossed seeds x images design::

    Var(mean_s d_s) = sigma2_seed / S + sigma2_image

* ``sigma2_seed / S`` is the sample variance of the ``d_s`` over S (the error shared by all seeds cancels in it;
  the part of the test-set error that differs by seed, a seed x image interaction, is inside it);
* ``sigma2_image``, the test-set error shared by the seeds, is the mean bootstrap covariance ``cov`` of ``d_s`` and
  ``d_t`` over pairs of different seeds (clipped at 0). The full bootstrap variance of the seed mean, the simpler
  choice, is ``cov + (mean_s Var*(d_s) - cov) / S``: its second term is the seed x image interaction over S, already
  inside the seed variance, so it would be counted twice. In the simulations of ``tests/test_stats.py`` (a null
  effect hidden by a fixed test set) the covariance form's variance is within a few percent of the true one from 200
  test images on (about 8% low at 100 images with some 30 positives a class, where the bootstrap of AP is itself
  short), while the full bootstrap variance overstates it by 50-60% when the seed noise is large.

The interval is ``mean ± t_{(1+c)/2, nu} * sqrt(V)`` with Satterthwaite's degrees of freedom
``nu = V^2 / (v_seed^2 / (S - 1) + v_image^2 / (N - 1))``: close to S - 1 where the seeds dominate (five seeds are
too few for a normal or a percentile bootstrap over seeds, which undercover), close to normal where the test set
does. The p-value is the two-sided t test of 0 at the same ``nu``, so the interval excludes 0 exactly when
``p < 1 - c``. One seed leaves only the bootstrap variance of its difference ("1 seed: test images only"), which
says nothing about training noise: such a comparison is not an effect.

:func:`pooled_interval` applies the same scheme to the equal-weight mean over the cells of a table, with the same
seeds and the same resamples for every cell, which carries the correlation that shared seeds and the shared test
set give the cells.

What a resample scores
----------------------
A bootstrap resample that loses every positive of a class cannot score it; leaving the class out of that
resample's mean (as a plain bootstrap does) would change the estimand from resample to resample (a class with one
positive is missing from about 37% of them). :func:`image_resamples` instead conditions on the class set: it keeps
only the resamples in which every scored class (``>= min_positives`` test positives) keeps a positive, so every
resample scores the same classes as the full test set. ``min_positives`` also restricts the mAP to the
well-populated classes (``test_map_frequent``).

Multiplicity
------------
:func:`holm` (family-wise error) and :func:`benjamini_hochberg` (false discovery rate) adjust the p-values of the
comparisons of one table. scipy has Benjamini-Hochberg only from 1.11 (``false_discovery_control``, the tests'
reference) and no Holm; both are a sort and a running maximum or minimum.

Every function returns an :class:`Interval` (or plain arrays); an interval that cannot be computed has NaN bounds,
never a made-up width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from scipy import sparse
from scipy import stats as scipy_stats

from clml_core.metrics import Ranking, rank_by_class, ranked_average_precision

#: What an interval covers, as the tables write it.
COVERS_BOTH = "seeds + test images"
COVERS_SEEDS = "seeds only"
COVERS_IMAGES_ONE_SEED = "1 seed: test images only"
COVERS_IMAGES = "test images only"


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval.

    Attributes:
        estimate: the mean (or the full-sample statistic for a bootstrap).
        low: lower bound; NaN when undefined.
        high: upper bound; NaN when undefined.
        n: seeds (t and two-level intervals) or test images (percentile bootstrap) the interval rests on.
        method: ``"t"``, ``"bootstrap"``, ``"two-level"`` or ``"pooled two-level"``.
        confidence: coverage of the interval, e.g. 0.95.
        covers: the sources of error the interval covers (``COVERS_*``); empty for a plain t interval of values.
        p_value: two-sided p-value of ``estimate = 0``, consistent with the interval; NaN when undefined (or for a
            percentile bootstrap).
        se: standard error of the estimate; NaN when undefined.
        df: degrees of freedom of the t quantile (``inf`` for a normal one); NaN when undefined.
    """

    estimate: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = 0.95
    covers: str = ""
    p_value: float = math.nan
    se: float = math.nan
    df: float = math.nan

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


def _t_bounds(estimate: float, variance: float, df: float, confidence: float) -> tuple[float, float, float]:
    """``(low, high, p)`` of ``estimate ± t_{(1+c)/2, df} sqrt(variance)`` and its two-sided p-value of 0.

    A zero variance gives a zero-width interval and p = 0 (estimate != 0) or 1 (estimate = 0).
    """
    se = math.sqrt(variance)
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, df)) * se
    if se == 0.0:
        p = 1.0 if estimate == 0.0 else 0.0
    else:
        p = float(2.0 * scipy_stats.t.sf(abs(estimate) / se, df))
    return estimate - half, estimate + half, p


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with the Student t interval ``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)``.

    Args:
        values: (n,) finite numbers, e.g. one per seed.
        confidence: coverage in (0, 1).

    Returns:
        Interval with method ``"t"`` and the one-sample t test's p-value of mean 0; bounds NaN when n < 2.
        Identical values give a zero-width interval.

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
    variance = float(x.var(ddof=1)) / x.size
    low, high, p = _t_bounds(mean, variance, x.size - 1, confidence)
    return Interval(mean, low, high, int(x.size), "t", confidence, "", p, math.sqrt(variance), float(x.size - 1))


def paired_difference(
    treated: Sequence[float] | np.ndarray, control: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> Interval:
    """Mean of the per-seed differences ``treated[i] - control[i]`` with its t interval (seeds only).

    Args:
        treated: (n,) values of the changed configuration, one per seed.
        control: (n,) values of the reference, the same seeds in the same order.
        confidence: coverage in (0, 1).

    Returns:
        :func:`t_interval` of the differences, ``covers`` = ``"seeds only"``; its p-value is scipy's ``ttest_rel``.

    Raises:
        ValueError: when the two have different lengths (an unpaired seed).
    """
    a = np.asarray(treated, dtype=np.float64).ravel()
    b = np.asarray(control, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} treated values for {b.size} control values; pair them by seed")
    return replace(t_interval(a - b, confidence), covers=COVERS_SEEDS)


# ------------------------------------------------------------------------------------------ test-image resamples


@dataclass(frozen=True)
class ImageResamples:
    """Bootstrap resamples of one test set, shared by every run scored on it.

    Attributes:
        labels: (N, C) bool full test labels.
        counts: (B, N) int32, how often each image is drawn in each resample (each row sums to N).
        scored: (C,) bool, the classes scored: ``>= min_positives`` positives; every resample keeps a positive of
            each of them.
        min_positives: the threshold ``scored`` was built with.
        seed: seed of the resampling.
        acceptance: share of the candidate resamples that kept every scored class.
    """

    labels: np.ndarray
    counts: np.ndarray
    scored: np.ndarray
    min_positives: int
    seed: int
    acceptance: float

    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_resamples(self) -> int:
        return int(self.counts.shape[0])

    @cached_property
    def by_image(self) -> np.ndarray:
        """(N, B) float32 copy of ``counts``, image-major, the layout the AP kernel gathers rows from."""
        return np.ascontiguousarray(self.counts.T, dtype=np.float32)


def image_resamples(
    labels: np.ndarray, n_resamples: int = 1000, *, seed: int = 0, min_positives: int = 1, max_tries: int = 100
) -> ImageResamples:
    """Draw ``n_resamples`` bootstrap resamples of the test images in which every scored class keeps a positive.

    Candidates are drawn in batches of ``n_resamples`` (``rng.integers(0, N, (n_resamples, N))``, one row a
    resample of N images with replacement) and those that lose every positive of a scored class are rejected; the
    first ``n_resamples`` accepted, in draw order, are kept. The bootstrap is thereby conditioned on the class set
    of the full test set (see the module docstring).

    Args:
        labels: (N, C) full test labels in {0, 1}.
        n_resamples: resamples to keep (>= 100).
        seed: seed of the resampling.
        min_positives: a class is scored when it has at least this many test positives (>= 1).
        max_tries: at most ``max_tries * n_resamples`` candidates are drawn.

    Raises:
        ValueError: on bad labels or arguments, no scored class, or an acceptance so low that ``max_tries`` batches
            do not give ``n_resamples`` resamples (raise ``min_positives``).
    """
    if n_resamples < 100:
        raise ValueError(f"image_resamples: n_resamples must be >= 100, got {n_resamples}")
    if min_positives < 1:
        raise ValueError(f"image_resamples: min_positives must be >= 1, got {min_positives}")
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"image_resamples: labels must be (N, C) with N >= 1, got shape {labels.shape}")
    if labels.dtype != np.bool_ and not np.isin(labels, (0, 1)).all():
        raise ValueError("image_resamples: labels must be in {0, 1}")
    labels = labels.astype(bool)
    n = labels.shape[0]
    positives = labels.sum(axis=0)
    scored = positives >= min_positives
    if not scored.any():
        raise ValueError(f"image_resamples: no class has >= {min_positives} test positives")
    scored_labels = labels[:, scored].astype(np.float32)  # (N, C')
    rng = np.random.default_rng(seed)
    kept, drawn, accepted = [], 0, 0
    offsets = (np.arange(n_resamples) * n)[:, None]
    for _ in range(max_tries):
        draws = rng.integers(0, n, (n_resamples, n))
        counts = np.bincount((draws + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n)
        drawn += n_resamples
        ok = ((counts.astype(np.float32) @ scored_labels) > 0).all(axis=1)  # (B,) every scored class kept
        kept.append(counts[ok].astype(np.int32))
        accepted += int(ok.sum())
        if accepted >= n_resamples:
            break
    counts = np.concatenate(kept)
    if len(counts) < n_resamples:
        rarest = np.argsort(np.where(scored, positives, np.iinfo(np.int64).max))[:5]
        raise ValueError(
            f"image_resamples: only {len(counts)} of {drawn} resamples kept a positive of every scored class "
            f"(classes {rarest.tolist()} have {positives[rarest].tolist()} positives); raise min_positives"
        )
    return ImageResamples(labels, counts[:n_resamples], scored, int(min_positives), int(seed), accepted / drawn)


def _cumsum_by_group(x: np.ndarray, totals: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cumulative sums down the rows of x (R, B), restarting at each group of consecutive rows.

    Args:
        x: (R, B) float64 integer-valued (the sums stay exact).
        totals: (G, B) each group's column sums.
        sizes: (G,) rows per group.
    """
    shifted = x.copy()
    shifted[np.cumsum(sizes)[:-1]] -= totals[:-1]  # each group starts by taking back the previous group's total
    return np.cumsum(shifted, axis=0, out=shifted)


def _resampled_ap(ranking: Ranking, by_image: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """AP in [0, 1] of ``classes`` under every resample: (B, C), NaN for the other classes.

    :func:`clml_core.metrics.ranked_average_precision` with many weight vectors at once. A class's positives share
    the precision of their run of tied scores, so the sum runs over segments: segment u of class c holds the items
    ranked after the previous positive run's end down to the end ``e_u`` of a run holding a positive. With K(u) and
    TP(u) the weighted items and positives ranked down to ``e_u`` (cumulative sums over the class's segments) and
    w(u) the weight of the positives in that run::

        AP_c = sum_u w(u) TP(u) / K(u) / sum_u w(u)

    Both segment sums are one sparse product with the (N, B) weights, so the cost is O(C N B) without sorting.

    Args:
        ranking: :func:`clml_core.metrics.rank_by_class` of the run.
        by_image: (N, B) how often each image is drawn in each resample.
        classes: (C,) bool, the classes to score (each with a positive in the full ranking).
    """
    n_classes, n = ranking.order.shape
    segment_rows, segment_items, positive_rows, positive_items, sizes = [], [], [], [], []
    n_segments = 0
    for c in np.flatnonzero(classes):
        positions = np.flatnonzero(ranking.targets[c])  # (P,) sorted positions of the positives
        ends, which = np.unique(ranking.run_end[c, positions], return_inverse=True)  # (U,) segment ends
        # The item at sorted position l belongs to the first segment that ends at or after l.
        segment_rows.append(n_segments + np.searchsorted(ends, np.arange(ends[-1] + 1)))
        segment_items.append(ranking.order[c, : ends[-1] + 1])
        positive_rows.append(n_segments + which.ravel())
        positive_items.append(ranking.order[c, positions])
        sizes.append(len(ends))
        n_segments += len(ends)

    def segment_sums(rows: list[np.ndarray], items: list[np.ndarray]) -> np.ndarray:
        r, i = np.concatenate(rows), np.concatenate(items)
        member = sparse.csr_matrix((np.ones(r.size), (r, i)), shape=(n_segments, n))  # (U, N) one-hot rows
        return np.asarray(member @ by_image, dtype=np.float64)  # (U, B)

    sizes = np.array(sizes)
    group = np.repeat(np.arange(sizes.size), sizes)
    per_class = sparse.csr_matrix((np.ones(n_segments), (group, np.arange(n_segments))), shape=(sizes.size, n_segments))
    items, positives = segment_sums(segment_rows, segment_items), segment_sums(positive_rows, positive_items)
    n_items, n_pos = per_class @ items, per_class @ positives  # (C', B)
    counted, tp = _cumsum_by_group(items, n_items, sizes), _cumsum_by_group(positives, n_pos, sizes)  # K(u), TP(u)
    hits = per_class @ (positives * np.divide(tp, counted, out=np.zeros_like(tp), where=counted > 0))  # (C', B)
    out = np.full((by_image.shape[1], n_classes), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, classes] = np.where(n_pos > 0, hits / n_pos, np.nan).T
    return out


def resampled_average_precision(resamples: ImageResamples, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP of one run on the full test set and under every resample of ``resamples``, in percent.

    Args:
        resamples: from :func:`image_resamples` on the labels the run was scored on.
        scores: (N, C) the run's test scores.

    Returns:
        ``full`` (C,) and ``draws`` (B, C); NaN for the classes that are not scored.
    """
    ranking = rank_by_class(resamples.labels, scores)
    full = np.where(resamples.scored, ranked_average_precision(ranking), np.nan)
    return full, 100.0 * _resampled_ap(ranking, resamples.by_image, resamples.scored)


def resampled_map(resamples: ImageResamples, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """mAP over the scored classes of one run on the full test set, and under every resample: ``(full, (B,))``."""
    full, draws = resampled_average_precision(resamples, scores)
    return float(full[resamples.scored].mean()), draws[:, resamples.scored].mean(axis=1)


# ---------------------------------------------------------------------------------------- two-level intervals


def two_level_interval(
    differences: Sequence[float] | np.ndarray,
    resampled: np.ndarray,
    *,
    n_images: int,
    confidence: float = 0.95,
    method: str = "two-level",
) -> Interval:
    """Mean of per-seed differences with an interval over seeds and test images (see the module docstring).

    Args:
        differences: (S,) per-seed differences on the full test set.
        resampled: (B, S) the same differences under B bootstrap resamples of the test images, one resample shared
            by every seed (row b of every column scores the same images).
        n_images: N, the test images (degrees of freedom N - 1 of the image variance).
        confidence: coverage in (0, 1).
        method: the name written into the interval.

    Returns:
        Interval with ``n`` = S, ``covers`` ``"seeds + test images"`` (S >= 2) or ``"1 seed: test images only"``
        (S = 1: the bootstrap variance of the one difference, a t quantile at N - 1 degrees of freedom), the
        p-value, the standard error and the degrees of freedom.

    Raises:
        ValueError: on shapes that do not match, non-finite values, fewer than 2 resamples or 2 images.
    """
    _check_confidence(confidence)
    d = np.asarray(differences, dtype=np.float64).ravel()
    draws = np.asarray(resampled, dtype=np.float64)
    if d.size == 0 or draws.ndim != 2 or draws.shape[1] != d.size or draws.shape[0] < 2:
        raise ValueError(
            f"two_level_interval: differences (S,) with S >= 1 and resampled (B, S) with B >= 2 expected, got "
            f"{d.shape} and {draws.shape}"
        )
    if not (np.isfinite(d).all() and np.isfinite(draws).all()):
        raise ValueError("two_level_interval: differences and resampled must be finite")
    if n_images < 2:
        raise ValueError(f"two_level_interval: n_images must be >= 2, got {n_images}")
    s = d.size
    estimate = float(d.mean())
    cov = np.atleast_2d(np.cov(draws, rowvar=False, ddof=1))  # (S, S) bootstrap covariance of the d_s
    if s == 1:
        v_seed, v_image, df, covers = 0.0, float(cov[0, 0]), float(n_images - 1), COVERS_IMAGES_ONE_SEED
    else:
        v_seed = float(d.var(ddof=1)) / s
        v_image = max(0.0, float((cov.sum() - np.trace(cov)) / (s * (s - 1))))  # mean over pairs s != t
        denominator = v_seed**2 / (s - 1) + v_image**2 / (n_images - 1)
        df = (v_seed + v_image) ** 2 / denominator if denominator > 0 else float(s - 1)
        covers = COVERS_BOTH
    variance = v_seed + v_image
    low, high, p = _t_bounds(estimate, variance, df, confidence)
    return Interval(estimate, low, high, s, method, confidence, covers, p, math.sqrt(variance), df)


def pooled_interval(
    differences: np.ndarray, resampled: np.ndarray, *, n_images: int, confidence: float = 0.95
) -> Interval:
    """Equal-weight mean over K cells of their seed-mean differences, with the two-level interval applied jointly.

    Every cell is scored with the same seeds and the same image resamples; averaging the cells within each seed and
    each resample first and applying :func:`two_level_interval` to those averages keeps every correlation between
    cells (a shared seed, the shared test set) in the variance. Equal weights answer "the effect over these cells
    of the design", each cell counting once whatever its noise; inverse-variance weights would let five-seed
    variance estimates choose the weights, and a random-effects meta-analysis would treat the cells as independent,
    which they are not.

    Args:
        differences: (K, S) per-cell, per-seed differences on the full test set.
        resampled: (B, K, S) the same under each resample.
        n_images: N, the test images.
        confidence: coverage in (0, 1).

    Returns:
        Interval with method ``"pooled two-level"``; ``estimate`` is the mean of the K cells' seed means.
    """
    d = np.asarray(differences, dtype=np.float64)
    draws = np.asarray(resampled, dtype=np.float64)
    if d.ndim != 2 or draws.ndim != 3 or draws.shape[1:] != d.shape:
        raise ValueError(
            f"pooled_interval: differences (K, S) and resampled (B, K, S) expected, got {d.shape} and {draws.shape}"
        )
    return two_level_interval(
        d.mean(axis=0), draws.mean(axis=1), n_images=n_images, confidence=confidence, method="pooled two-level"
    )


def _stack_scores(scores: np.ndarray | Sequence[np.ndarray], shape: tuple[int, ...], name: str) -> np.ndarray:
    stacked = np.asarray(scores)
    if stacked.ndim == 2:
        stacked = stacked[None]
    if stacked.ndim != 3 or stacked.shape[1:] != shape:
        raise ValueError(f"{name}: (S, N, C) scores on the labels' (N, C) = {shape} expected, got {stacked.shape}")
    return stacked


def map_differences(
    resamples: ImageResamples, scores_treated: np.ndarray, scores_control: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed mAP differences on the full test set (S,) and under every resample (B, S).

    Args:
        resamples: from :func:`image_resamples` on the shared test labels.
        scores_treated: (S, N, C) the treated runs' test scores, one per seed.
        scores_control: (S, N, C) the control runs' scores, the same seeds in the same order.
    """
    shape = resamples.labels.shape
    treated = _stack_scores(scores_treated, shape, "map_differences")
    control = _stack_scores(scores_control, shape, "map_differences")
    if len(treated) != len(control):
        raise ValueError(f"map_differences: {len(treated)} treated runs for {len(control)} control runs")
    full, draws = [], []
    for t, c in zip(treated, control):
        (full_t, draws_t), (full_c, draws_c) = resampled_map(resamples, t), resampled_map(resamples, c)
        full.append(full_t - full_c)
        draws.append(draws_t - draws_c)
    return np.array(full), np.stack(draws, axis=1)


def two_level_map_difference(
    labels: np.ndarray,
    scores_treated: np.ndarray,
    scores_control: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    min_positives: int = 1,
) -> Interval:
    """mean_s [mAP(treated_s) - mAP(control_s)] with its interval over seeds and test images.

    Args:
        labels: (N, C) full test labels in {0, 1}, shared by every run.
        scores_treated: (S, N, C) (or (N, C) for one seed) scores of the changed configuration, one per seed.
        scores_control: (S, N, C) scores of the reference, the same seeds in the same order.
        n_resamples: bootstrap resamples of the test images (>= 100).
        seed: seed of the resampling.
        confidence: coverage in (0, 1).
        min_positives: classes with fewer test positives are not scored (1: every class with a positive, the
            study's ``test_map``).

    Returns:
        :func:`two_level_interval` of the per-seed differences.
    """
    resamples = image_resamples(labels, n_resamples, seed=seed, min_positives=min_positives)
    full, draws = map_differences(resamples, scores_treated, scores_control)
    return two_level_interval(full, draws, n_images=resamples.n_images, confidence=confidence)


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

    Both runs are scored on the same resamples (a paired bootstrap) of :func:`image_resamples`: every class with a
    test positive keeps one in every resample, so each resample scores the same classes.

    Args:
        labels: (N, C) full test labels in {0, 1}.
        scores_treated: (N, C) scores of the changed configuration on those images.
        scores_control: (N, C) scores of the reference on the same images, same order.
        n_resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling.
        confidence: coverage in (0, 1).

    Returns:
        Interval with method ``"bootstrap"``, the full-sample difference as estimate, ``n = N``, ``covers`` ``"test
        images only"`` and the bootstrap standard error (no p-value).
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
    resamples = image_resamples(labels, n_resamples, seed=seed)
    full, draws = map_differences(resamples, scores_treated, scores_control)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws[:, 0], [alpha, 1.0 - alpha])
    return Interval(
        float(full[0]), float(low), float(high), len(labels), "bootstrap", confidence, COVERS_IMAGES,
        se=float(draws[:, 0].std(ddof=1)),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------- multiplicity


def _family(p_values: Sequence[float] | np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p_values, dtype=np.float64).ravel()
    finite = np.isfinite(p)
    if ((p[finite] < 0) | (p[finite] > 1)).any():
        raise ValueError(f"{name}: p-values must be in [0, 1], got {p.tolist()}")
    return p, finite


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control).

    With the m finite p-values sorted, ``p_(1) <= ... <= p_(m)``: ``adj_(i) = min(1, max_{j <= i} (m - j + 1)
    p_(j))``. Rejecting where ``adj < alpha`` is Holm's procedure at level alpha.

    Args:
        p_values: (m,) p-values in [0, 1]; NaN entries are not part of the family and stay NaN.

    Returns:
        (m,) adjusted p-values in the input order.
    """
    return _adjusted(p_values, "holm", lambda p, m: np.maximum.accumulate((m - np.arange(m)) * p))


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate control, independent or positively dependent
    tests).

    With the m finite p-values sorted: ``adj_(i) = min(1, min_{j >= i} m p_(j) / j)``.

    Args:
        p_values: (m,) p-values in [0, 1]; NaN entries are not part of the family and stay NaN.

    Returns:
        (m,) adjusted p-values in the input order.
    """
    return _adjusted(
        p_values, "benjamini_hochberg", lambda p, m: np.minimum.accumulate((p * m / np.arange(1, m + 1))[::-1])[::-1]
    )


def _adjusted(
    p_values: Sequence[float] | np.ndarray, where: str, step: Callable[[np.ndarray, int], np.ndarray]
) -> np.ndarray:
    """``step(sorted finite p-values, m)`` capped at 1, in the input order; NaN entries stay NaN."""
    p, finite = _family(p_values, where)
    out = np.full(p.shape, np.nan)
    values = p[finite]
    order = np.argsort(values, kind="stable")
    ranked = np.empty(values.size)
    ranked[order] = np.minimum(1.0, step(values[order], values.size))
    out[finite] = ranked
    return out
