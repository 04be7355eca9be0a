"""Confidence intervals against references: scipy.stats for the t interval, a slow scikit-learn loop for the
paired bootstrap over test images."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import average_precision_score

from clml_core.metrics import mean_average_precision
from clml_core.stats import (
    Interval,
    benjamini_hochberg,
    bootstrap_map_difference,
    holm,
    image_resamples,
    paired_difference,
    pooled_interval,
    resampled_average_precision,
    resampled_map,
    t_interval,
    two_level_interval,
    two_level_map_difference,
)


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
    """Loop reference: the same candidate resamples (batches of ``rng.integers(0, n, (n_resamples, n))``), kept when
    every class with a test positive keeps one, scikit-learn's AP per class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    classes = [c for c in range(labels.shape[1]) if labels[:, c].any()]

    def diff(rows):
        values = [
            average_precision_score(labels[rows, c], a[rows, c]) - average_precision_score(labels[rows, c], b[rows, c])
            for c in classes
        ]
        return 100 * float(np.mean(values))

    kept = []
    while len(kept) < n_resamples:
        for rows in rng.integers(0, n, (n_resamples, n)):
            if all(labels[rows, c].any() for c in classes) and len(kept) < n_resamples:
                kept.append(rows)
    draws = [diff(rows) for rows in kept]
    alpha = (1 - confidence) / 2
    return diff(np.arange(n)), *np.quantile(draws, [alpha, 1 - alpha])


def test_bootstrap_map_difference_matches_slow_loop():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 4)) < 0.2).astype(int)
    labels[:, 3] = 0
    labels[0, 3] = 1  # a rare class: it would be absent from about 37% of unconditioned resamples
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


# ------------------------------------------------------------------------------------ image resamples and AP


def test_image_resamples_keep_a_positive_of_every_scored_class():
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 3)) < 0.3).astype(int)
    labels[:, 2] = 0
    labels[7, 2] = 1  # one positive: kept by about 1 - (1 - 1/50)^50 = 64% of the candidates
    resamples = image_resamples(labels, 400, seed=1)
    assert resamples.counts.shape == (400, 50) and (resamples.counts.sum(axis=1) == 50).all()
    assert resamples.scored.tolist() == [True, True, True]
    assert ((resamples.counts @ labels) > 0).all()  # every resample scores every class
    assert (resamples.counts[:, 7] > 0).all()
    assert abs(resamples.acceptance - (1 - (1 - 1 / 50) ** 50)) < 0.06
    # The draws are the first accepted rows of the candidate batches, in order.
    candidates = np.random.default_rng(1).integers(0, 50, (400, 50))
    first = candidates[(candidates == 7).any(axis=1)][0]
    assert (resamples.counts[0] == np.bincount(first, minlength=50)).all()


def test_image_resamples_min_positives_and_errors():
    labels = np.zeros((40, 3), dtype=int)
    labels[:20, 0], labels[:3, 1], labels[0, 2] = 1, 1, 1
    assert image_resamples(labels, 100, min_positives=3).scored.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="min_positives"):
        image_resamples(labels, 100, min_positives=0)
    with pytest.raises(ValueError, match="no class has >= 30"):
        image_resamples(labels, 100, min_positives=30)
    with pytest.raises(ValueError, match="n_resamples"):
        image_resamples(labels, 10)
    with pytest.raises(ValueError, match="raise min_positives"):
        image_resamples(labels, 100, max_tries=1)  # the singleton class survives 64% of the first batch only
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        image_resamples(labels * 2, 100)


def test_resampled_average_precision_matches_the_repeated_items_with_ties():
    rng = np.random.default_rng(3)
    labels = (rng.random((40, 4)) < 0.3).astype(int)
    labels[:2, :] = 1
    scores = np.round(labels + rng.normal(0, 0.7, labels.shape), 1)  # many ties
    resamples = image_resamples(labels, 100, seed=4, min_positives=3)
    full, draws = resampled_average_precision(resamples, scores)
    scored = resamples.scored
    assert np.allclose(full[scored], 100 * np.array([average_precision_score(labels[:, c], scores[:, c])
                                                     for c in np.flatnonzero(scored)]))  # fmt: skip
    assert np.isnan(full[~scored]).all() and np.isnan(draws[:, ~scored]).all()
    for b in range(0, 100, 7):  # the AP of the images repeated as often as drawn (zero counts included)
        rows = np.repeat(np.arange(40), resamples.counts[b])
        expected = [100 * average_precision_score(labels[rows, c], scores[rows, c]) for c in np.flatnonzero(scored)]
        assert np.allclose(draws[b, scored], expected)
    full_map, map_draws = resampled_map(resamples, scores)
    assert np.isclose(full_map, full[scored].mean()) and np.allclose(map_draws, draws[:, scored].mean(axis=1))


# ----------------------------------------------------------------------------------- two-level interval


def _slow_two_level(d, draws, n_images, confidence=0.95):
    """Loop reference of the variance decomposition: seed variance / S plus the mean cross-seed covariance."""
    s, b = len(d), len(draws)
    mean = sum(d) / s
    v_seed = sum((x - mean) ** 2 for x in d) / (s - 1) / s
    col_means = [sum(draws[r][i] for r in range(b)) / b for i in range(s)]
    covs = [
        sum((draws[r][i] - col_means[i]) * (draws[r][j] - col_means[j]) for r in range(b)) / (b - 1)
        for i in range(s)
        for j in range(s)
        if i != j
    ]
    v_image = max(0.0, sum(covs) / len(covs))
    variance = v_seed + v_image
    df = variance**2 / (v_seed**2 / (s - 1) + v_image**2 / (n_images - 1))
    half = scipy_stats.t.ppf((1 + confidence) / 2, df) * math.sqrt(variance)
    p = 2 * scipy_stats.t.sf(abs(mean) / math.sqrt(variance), df)
    return mean, mean - half, mean + half, p, df


def test_two_level_interval_matches_the_slow_decomposition():
    rng = np.random.default_rng(5)
    d = rng.normal(0.5, 1.0, 4)
    common = rng.normal(0, 0.8, (300, 1))
    draws = d + common + rng.normal(0, 0.5, (300, 4))  # a shared test-set error and a per-seed one
    got = two_level_interval(d, draws, n_images=250)
    expected = _slow_two_level(d.tolist(), draws.tolist(), 250)
    assert np.allclose([got.estimate, got.low, got.high, got.p_value, got.df], expected)
    assert (got.n, got.method, got.covers) == (4, "two-level", "seeds + test images")
    assert got.defined and isinstance(got, Interval)


def test_two_level_interval_without_image_error_is_the_paired_t_interval():
    d = np.array([1.5, 2.0, 2.5, 1.0])
    # The per-seed image errors are orthogonal (zero bootstrap covariance): nothing is shared by the seeds, so the
    # seed spread, which already holds each seed's own test-set error, is the whole variance.
    x = np.array([1.0, -1.0, 1.0, -1.0] * 25)
    y = np.array([1.0, 1.0, -1.0, -1.0] * 25)
    z = x * y
    draws = d + 0.3 * np.column_stack([x, y, z, np.zeros_like(x)])
    got = two_level_interval(d, draws, n_images=100)
    t = paired_difference(d + 3.0, np.full(4, 3.0))
    assert np.allclose([got.estimate, got.low, got.high, got.p_value], [t.estimate, t.low, t.high, t.p_value])
    assert np.isclose(got.df, 3.0)
    assert np.isclose(scipy_stats.ttest_1samp(d, 0.0).pvalue, got.p_value)


def test_two_level_interval_shared_image_error_only():
    d = np.full(5, 0.7)  # no seed spread
    common = np.random.default_rng(6).normal(0, 0.4, (500, 1))
    got = two_level_interval(d, d + common * np.ones((1, 5)), n_images=300)
    sd = common.std(ddof=1)
    assert np.isclose(got.se, sd) and np.isclose(got.df, 299.0)
    assert np.isclose(got.high - got.estimate, scipy_stats.t.ppf(0.975, 299) * sd)


def test_two_level_interval_one_seed_is_the_image_bootstrap_only():
    draws = np.random.default_rng(7).normal(0.2, 0.5, (400, 1))
    got = two_level_interval([0.3], draws, n_images=80)
    half = scipy_stats.t.ppf(0.975, 79) * draws.std(ddof=1)
    assert np.allclose([got.low, got.high], [0.3 - half, 0.3 + half])
    assert got.covers == "1 seed: test images only" and got.n == 1 and got.df == 79


def test_two_level_p_value_agrees_with_the_interval():
    rng = np.random.default_rng(8)
    for _ in range(200):
        s = int(rng.integers(1, 6))
        d = rng.normal(rng.normal(0, 1), 1, s)
        draws = d + rng.normal(0, rng.uniform(0.1, 2), (150, 1)) + rng.normal(0, 0.5, (150, s))
        for confidence in (0.9, 0.95):
            got = two_level_interval(d, draws, n_images=100, confidence=confidence)
            assert got.excludes_zero == (got.p_value < 1 - confidence)


def test_two_level_interval_bad_input():
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        two_level_interval([1.0, 2.0], np.zeros((10, 3)), n_images=10)
    with pytest.raises(ValueError, match="finite"):
        two_level_interval([1.0, np.nan], np.zeros((10, 2)), n_images=10)
    with pytest.raises(ValueError, match="n_images"):
        two_level_interval([1.0, 2.0], np.zeros((10, 2)), n_images=1)
    with pytest.raises(ValueError, match="confidence"):
        two_level_interval([1.0, 2.0], np.zeros((10, 2)), n_images=10, confidence=0.0)


def test_two_level_map_difference_is_the_interval_of_the_map_differences():
    rng = np.random.default_rng(9)
    labels = (rng.random((60, 3)) < 0.3).astype(int)
    labels[:2] = 1
    treated = labels + rng.normal(0, 0.8, (3, 60, 3))
    control = labels + rng.normal(0, 1.0, (3, 60, 3))
    got = two_level_map_difference(labels, treated, control, n_resamples=200, seed=2)
    resamples = image_resamples(labels, 200, seed=2)
    d = [mean_average_precision(labels, t) - mean_average_precision(labels, c) for t, c in zip(treated, control)]
    draws = np.column_stack([resampled_map(resamples, t)[1] - resampled_map(resamples, c)[1]
                             for t, c in zip(treated, control)])  # fmt: skip
    expected = two_level_interval(d, draws, n_images=60)
    assert np.allclose([got.estimate, got.low, got.high, got.p_value], [expected.estimate, expected.low,
                                                                         expected.high, expected.p_value])  # fmt: skip
    with pytest.raises(ValueError, match="treated runs"):
        two_level_map_difference(labels, treated, control[:2], n_resamples=100)


# ------------------------------------------------------------------------ coverage when the true effect is 0


def _simulate(reps=240, seeds=5, cells=3, n=100, classes=6, resamples=100, chunk=8, seed=0):
    """Coverage of 0 by each interval when the population effect is exactly 0.

    Every repetition draws a new test set. The treated and control arms are exchangeable (the effect is 0 by
    symmetry), but each arm has its own image x class perturbation, fixed across seeds: on one test set the treated
    arm does better on some images and worse on others, and every seed sees the same spurious difference. Seeds add
    run noise. The cells of a table share the seeds (correlated run noise) and the test set (correlated
    perturbations). Each chunk of repetitions is scored as one wide run (its classes side by side), so one call
    ranks them all; the repetitions of a chunk share the resample indices, not their data.

    Returns:
        dict of coverage rates: ``two-level`` and ``seeds only`` (cell 0), ``pooled`` (joint, over the cells) and
        ``pooled independent`` (the cells' two-level variances summed as if independent).
    """
    rng = np.random.default_rng(seed)
    runs = 2 * seeds * cells
    hits = {"two-level": [], "seeds only": [], "pooled": [], "pooled independent": []}
    for start in range(0, reps, chunk):
        k = min(chunk, reps - start)
        labels = rng.random((k, n, classes)) < 0.3
        labels[:, :3] = True
        base = 1.5 * labels + rng.normal(0, 1, (k, n, classes))  # (k, N, C)
        arm_shape = (k, 2, cells, n, classes)  # the fixed image x class perturbation of each arm and cell
        perturbation = 0.6 * (0.7 * rng.normal(0, 1, (k, 2, 1, n, classes)) + 0.71 * rng.normal(0, 1, arm_shape))
        noise_shape = (k, 2, cells, seeds, n, classes)  # run noise: a part shared by the cells of a seed
        noise = 0.5 * (0.6 * rng.normal(0, 1, (k, 2, 1, seeds, n, classes)) + 0.8 * rng.normal(0, 1, noise_shape))
        scores = base[:, None, None, None] + perturbation[:, :, :, None] + noise  # (k, 2, K, S, N, C)
        wide_scores = np.moveaxis(scores, 4, 0).reshape(n, -1)
        wide_labels = np.broadcast_to(np.moveaxis(labels, 1, 0)[:, :, None, :], (n, k, runs, classes)).reshape(n, -1)
        draw = image_resamples(wide_labels, resamples, seed=start)
        full, draws = resampled_average_precision(draw, wide_scores)
        full = full.reshape(k, 2, cells, seeds, classes).mean(-1)
        draws = draws.reshape(resamples, k, 2, cells, seeds, classes).mean(-1)
        d, d_draws = full[:, 0] - full[:, 1], draws[:, :, 0] - draws[:, :, 1]  # (k, K, S), (B, k, K, S)
        for j in range(k):
            cell = two_level_interval(d[j, 0], d_draws[:, j, 0], n_images=n)
            hits["two-level"].append(not cell.excludes_zero)
            hits["seeds only"].append(not t_interval(d[j, 0]).excludes_zero)
            hits["pooled"].append(not pooled_interval(d[j], d_draws[:, j], n_images=n).excludes_zero)
            per_cell = [two_level_interval(d[j, c], d_draws[:, j, c], n_images=n) for c in range(cells)]
            se = math.sqrt(sum(i.se**2 for i in per_cell)) / cells
            hits["pooled independent"].append(abs(d[j].mean()) <= 1.96 * se)
    return {name: float(np.mean(values)) for name, values in hits.items()}


@pytest.mark.slow
def test_two_level_and_pooled_intervals_cover_a_null_effect_that_a_fixed_test_set_hides():
    coverage = _simulate()
    # 240 repetitions estimate a 95% rate within about +-2.8 points (2 standard errors); with 100 test images and
    # about 33 positives per class the bootstrap also understates the test-set variance by about 8% (larger test
    # sets remove that: within a few percent at 200 images), which costs about one point of coverage.
    assert 0.90 <= coverage["two-level"] <= 0.985, coverage
    assert coverage["seeds only"] < 0.8, coverage  # the spurious test-set difference looks like an effect
    assert 0.90 <= coverage["pooled"] <= 0.985, coverage
    assert coverage["pooled independent"] < coverage["pooled"] - 0.04, coverage  # ignoring the correlation


# ---------------------------------------------------------------------------------------------- multiplicity


def test_holm_and_benjamini_hochberg_hand_worked():
    p = [0.01, 0.04, 0.03, 0.005]
    # Sorted 0.005, 0.01, 0.03, 0.04. Holm: 4 x 0.005 = 0.02, 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04).
    assert np.allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    # BH: 0.005 x 4/1 = 0.02, 0.01 x 4/2 = 0.02, 0.03 x 4/3 = 0.04, 0.04 x 4/4 = 0.04 (running minimum from the top).
    assert np.allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    assert np.allclose(holm([0.6, 0.5]), [1.0, 1.0])  # capped at 1
    got = holm([0.01, np.nan, 0.02])  # NaN is not part of the family
    assert np.allclose(got[[0, 2]], [0.02, 0.02]) and np.isnan(got[1])
    assert np.isnan(benjamini_hochberg([np.nan])).all() and holm([]).size == 0


def _slow_holm(p):
    """Holm's step-down procedure, as written: the adjusted p-value of the i-th smallest is the largest of
    (m - j + 1) p_(j) over j <= i, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@pytest.mark.parametrize("seed", range(5))
def test_holm_and_benjamini_hochberg_against_references(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.05, 4), rng.uniform(0, 1, 8), [0.02, 0.02]])  # ties included
    assert np.allclose(holm(p), _slow_holm(p.tolist()))
    assert np.allclose(benjamini_hochberg(p), scipy_stats.false_discovery_control(p, method="bh"))
    # Rejecting where the adjusted p is below alpha is Holm's procedure: reject p_(i) <= alpha / (m - i + 1) in
    # order until the first failure.
    alpha, ranked = 0.05, np.sort(p)
    k = next((i for i, value in enumerate(ranked) if value > alpha / (len(p) - i)), len(p))
    assert (holm(p) <= alpha).sum() == k


def test_multiplicity_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])
    with pytest.raises(ValueError, match="benjamini_hochberg"):
        benjamini_hochberg([-0.1])


# ----------------------------------------------------------------------------------------- pooled interval


def test_pooled_interval_is_the_two_level_interval_of_the_cell_means():
    rng = np.random.default_rng(12)
    d = rng.normal(0, 1, (3, 4))
    draws = d + rng.normal(0, 0.5, (200, 1, 1)) + rng.normal(0, 0.3, (200, 3, 4))
    got = pooled_interval(d, draws, n_images=150)
    expected = _slow_two_level(d.mean(axis=0).tolist(), draws.mean(axis=1).tolist(), 150)
    assert np.allclose([got.estimate, got.low, got.high, got.p_value, got.df], expected)
    assert got.method == "pooled two-level" and got.covers == "seeds + test images"
    # Identical cells pool to the cell itself.
    same = pooled_interval(np.repeat(d[:1], 3, axis=0), np.repeat(draws[:, :1], 3, axis=1), n_images=150)
    one = two_level_interval(d[0], draws[:, 0], n_images=150)
    assert np.allclose([same.estimate, same.low, same.high], [one.estimate, one.low, one.high])
    # Two cells whose errors cancel exactly (perfectly anti-correlated) pool to their mean with no spread.
    flat = pooled_interval(np.array([[1.0, 2.0], [1.0, 0.0]]), np.array([[[1.0, 2.0], [1.0, 0.0]]] * 10),
                           n_images=50)  # fmt: skip
    assert (flat.estimate, flat.low, flat.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"\(K, S\)"):
        pooled_interval(d, draws[:, :2], n_images=150)
