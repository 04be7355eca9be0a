"""Metrics against scikit-learn, on random data with ties, empty and all-positive classes, arrays and tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from clml_core.metrics import (
    average_precision_per_class,
    cole_mean_average_precision,
    mean_average_precision,
    threshold_metrics,
)


def _random_case(seed: int, n: int = 60, c: int = 9, decimals: int | None = 1) -> tuple[np.ndarray, np.ndarray]:
    """Targets (n, c) with one empty and one all-positive class, scores (n, c) rounded to create ties."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < rng.uniform(0.05, 0.6, size=c)).astype(np.int64)
    targets[:, 0] = 0
    targets[:, 1] = 1
    scores = rng.random((n, c))
    if decimals is not None:
        scores = np.round(scores, decimals)
    return targets, scores


def _sklearn_ap(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class AP in percent from scikit-learn, NaN for classes with no positive."""
    return np.array(
        [
            100.0 * average_precision_score(targets[:, k], scores[:, k]) if targets[:, k].any() else np.nan
            for k in range(targets.shape[1])
        ]
    )


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_average_precision_matches_sklearn(seed: int, decimals: int | None) -> None:
    targets, scores = _random_case(seed, decimals=decimals)
    ours = average_precision_per_class(targets, scores)
    ref = _sklearn_ap(targets, scores)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12, atol=1e-12)
    assert mean_average_precision(targets, scores) == pytest.approx(np.nanmean(ref), rel=1e-12)


def test_mean_average_precision_equals_sklearn_macro_over_classes_with_positives() -> None:
    targets, scores = _random_case(3, n=200, c=15)
    keep = targets.any(0)
    ref = 100.0 * average_precision_score(targets[:, keep], scores[:, keep], average="macro")
    assert mean_average_precision(targets, scores) == pytest.approx(ref, rel=1e-12)


def test_average_precision_hand_examples() -> None:
    # Ranks of the positives 1 and 3: AP = (1/1 + 2/3) / 2.
    targets = np.array([[1], [0], [1], [0]])
    assert average_precision_per_class(targets, np.array([[0.9], [0.8], [0.7], [0.1]]))[0] == pytest.approx(
        100 * (1 + 2 / 3) / 2
    )
    # All scores tied: one threshold, AP = precision at it = prevalence.
    assert average_precision_per_class(targets, np.full((4, 1), 0.3))[0] == pytest.approx(50.0)
    # A positive tied with a negative at the top: P = 1/2 there, then 2/3.
    scores = np.array([[0.9], [0.9], [0.5], [0.1]])
    assert average_precision_per_class(targets, scores)[0] == pytest.approx(100 * (0.5 + 2 / 3) / 2)


def test_policy_empty_and_all_positive_classes() -> None:
    targets, scores = _random_case(0)
    ap = average_precision_per_class(targets, scores)
    assert np.isnan(ap[0])  # no positive
    assert ap[1] == pytest.approx(100.0)  # every sample positive
    assert not np.isnan(ap[1:]).any()
    assert mean_average_precision(targets, scores) == pytest.approx(ap[1:].mean())
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.zeros((5, 3)), np.random.default_rng(0).random((5, 3)))


def test_tensors_and_arrays_agree_and_scale_is_irrelevant() -> None:
    targets, _ = _random_case(5, decimals=None)
    logits = np.random.default_rng(5).normal(size=targets.shape)  # float64, no ties
    ref = mean_average_precision(targets, logits)
    assert mean_average_precision(torch.from_numpy(targets).bool(), torch.from_numpy(logits)) == ref
    # The sigmoid is monotone, so AP on probabilities equals AP on logits.
    probs = torch.sigmoid(torch.from_numpy(logits))
    assert mean_average_precision(targets.astype(np.float32), probs) == pytest.approx(ref, rel=1e-12)
    # float32 and bfloat16 tensors, possibly with new ties, still match sklearn on the same values.
    for dtype in (torch.float32, torch.bfloat16):
        scores = torch.from_numpy(logits).to(dtype)
        ref_low = np.nanmean(_sklearn_ap(targets, scores.float().numpy().astype(np.float64)))
        assert mean_average_precision(torch.from_numpy(targets), scores) == pytest.approx(ref_low, rel=1e-12)


@pytest.mark.parametrize(
    ("targets", "scores", "match"),
    [
        (np.zeros((4, 3)), np.zeros((4, 2)), "same shape"),
        (np.zeros(4), np.zeros(4), "2-D"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "no sample"),
        (np.array([[0, 2]]), np.zeros((1, 2)), "in \\{0, 1\\}"),
        (np.array([[0, 1]]), np.array([[0.1, np.nan]]), "NaN or infinite"),
        (np.array([[0, 1]]), np.array([[0.1, -np.inf]]), "NaN or infinite"),
        (np.array([[0, 1]]), np.array([["a", "b"]]), "real numbers"),
    ],
)
def test_average_precision_bad_input(targets: np.ndarray, scores: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        average_precision_per_class(targets, scores)


def test_bad_input_type() -> None:
    with pytest.raises(TypeError, match="targets"):
        mean_average_precision([[0, 1]], np.zeros((1, 2)))


def _sklearn_threshold_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = (scores >= threshold).astype(int)
    cp = precision_score(targets, predicted, average="macro", zero_division=0)
    cr = recall_score(targets, predicted, average="macro", zero_division=0)
    cf1 = 2 * cp * cr / (cp + cr) if cp + cr else 0.0
    return {
        "CP": 100 * cp,
        "CR": 100 * cr,
        "CF1": 100 * cf1,
        "OP": 100 * precision_score(targets, predicted, average="micro", zero_division=0),
        "OR": 100 * recall_score(targets, predicted, average="micro", zero_division=0),
        "OF1": 100 * f1_score(targets, predicted, average="micro", zero_division=0),
    }


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_threshold_metrics_match_sklearn(seed: int, threshold: float) -> None:
    targets, scores = _random_case(seed)  # scores rounded to 0.1: some equal the threshold exactly
    scores[:, 2] = 0.0  # a class that is never predicted positive: precision 0, kept in CP
    ours = threshold_metrics(targets, scores, threshold)
    ref = _sklearn_threshold_metrics(targets, scores, threshold)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    tensor_out = threshold_metrics(torch.from_numpy(targets), torch.from_numpy(scores), threshold)
    assert tensor_out == ours


def test_threshold_metrics_hand_example() -> None:
    # Class 0: predicted {0, 1}, true {0}: P = 1/2, R = 1. Class 1: never predicted, true {1}: P = 0, R = 0.
    targets = np.array([[1, 0], [0, 1], [0, 0]])
    scores = np.array([[0.5, 0.1], [0.9, 0.4], [0.2, 0.0]])  # 0.5 >= threshold counts as predicted
    out = threshold_metrics(targets, scores)
    assert out["CP"] == pytest.approx(25.0)
    assert out["CR"] == pytest.approx(50.0)
    assert out["CF1"] == pytest.approx(100 * 2 * 0.25 * 0.5 / 0.75)
    assert out["OP"] == pytest.approx(50.0)
    assert out["OR"] == pytest.approx(50.0)
    assert out["OF1"] == pytest.approx(50.0)
    nothing = threshold_metrics(targets, np.zeros((3, 2)))
    assert all(v == 0.0 for v in nothing.values())


def test_threshold_metrics_bad_input() -> None:
    targets = np.array([[1, 0]])
    with pytest.raises(ValueError, match="probabilities"):
        threshold_metrics(targets, np.array([[2.0, -1.0]]))
    with pytest.raises(ValueError, match="threshold"):
        threshold_metrics(targets, np.array([[0.2, 0.1]]), threshold=1.5)
    with pytest.raises(ValueError, match="same shape"):
        threshold_metrics(targets, np.array([[0.2]]))


@pytest.mark.parametrize("seed", range(4))
def test_ranked_average_precision_with_weights_equals_ap_of_repeated_items(seed):
    from clml_core.metrics import rank_by_class, ranked_average_precision

    rng = np.random.default_rng(seed)
    targets = (rng.random((40, 5)) < 0.3).astype(int)
    scores = np.round(rng.random((40, 5)), 1)  # one decimal: many ties
    weights = rng.integers(0, 3, 40)  # zeros drop an item, twos repeat it
    ranking = rank_by_class(targets, scores)
    repeated = np.repeat(np.arange(40), weights)
    expected = average_precision_per_class(targets[repeated], scores[repeated])
    np.testing.assert_allclose(ranked_average_precision(ranking, weights), expected, equal_nan=True)
    np.testing.assert_allclose(ranked_average_precision(ranking), average_precision_per_class(targets, scores))


def test_coles_map_counts_a_class_without_a_positive_as_zero() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((40, 5)) < 0.3).astype(int)
    targets[:, 2] = 0  # no positive: left out of ours, AP 0 in Cole et al.'s
    scores = rng.random((40, 5))
    per_class = [100 * average_precision_score(targets[:, k], scores[:, k]) for k in (0, 1, 3, 4)]
    assert np.isclose(cole_mean_average_precision(targets, scores), sum(per_class) / 5)
    assert np.isclose(mean_average_precision(targets, scores), sum(per_class) / 4)
    targets[0, 2] = 1  # every class with a positive: the two agree
    assert np.isclose(cole_mean_average_precision(targets, scores), mean_average_precision(targets, scores))
