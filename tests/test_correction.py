"""Label correction and its quality, against hand-built examples and element-by-element Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clml_core.correction import CorrectionQuality, correct_labels, correction_quality


def _correct_reference(observed: torch.Tensor, logits: torch.Tensor, tau: float) -> list[list[int]]:
    return [
        [int(o == 1 or 1.0 / (1.0 + math.exp(-float(x))) > tau) for o, x in zip(row_o, row_x)]
        for row_o, row_x in zip(observed.tolist(), logits.tolist())
    ]


def test_correct_labels_hand_example() -> None:
    observed = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]])
    # sigmoid: (0.0067, 0.622, 0.5, 0.953) and (0.5, 0.0067, 0.4, 0.731)
    logits = torch.tensor([[-5.0, 0.5, 0.0, 3.0], [0.0, -5.0, -0.4, 1.0]])
    out = correct_labels(observed, logits, tau=0.6)
    assert out.tolist() == [[1, 1, 0, 1], [0, 1, 0, 1]]
    # The comparison is strict: p = 0.5 is not > 0.5.
    assert correct_labels(observed, logits, tau=0.5).tolist() == [[1, 1, 0, 1], [0, 1, 0, 1]]
    assert correct_labels(observed, logits, tau=0.49).tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]


@pytest.mark.parametrize("seed", range(10))
def test_correct_labels_matches_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    observed = (torch.rand(7, 11, generator=gen) < 0.3).long()
    logits = 3 * torch.randn(7, 11, generator=gen, dtype=torch.float64)
    tau = float(torch.empty(()).uniform_(0.05, 0.95, generator=gen))
    assert correct_labels(observed, logits, tau).tolist() == _correct_reference(observed, logits, tau)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.uint8, torch.float32, torch.float16])
def test_correct_labels_keeps_dtype_and_stops_gradient(dtype: torch.dtype) -> None:
    observed = torch.tensor([[1, 0, 0], [0, 0, 1]]).to(dtype)
    logits = torch.tensor([[-3.0, 2.0, -2.0], [0.1, 4.0, -9.0]], requires_grad=True)
    out = correct_labels(observed, logits, tau=0.6)
    assert out.dtype == dtype
    assert not out.requires_grad
    assert out.tolist() == torch.tensor([[1, 1, 0], [0, 1, 1]]).to(dtype).tolist()
    # bfloat16 logits are compared in float32.
    half = correct_labels(observed, logits.detach().bfloat16(), tau=0.6)
    assert half.tolist() == out.tolist()


@pytest.mark.parametrize(
    ("observed", "logits", "tau", "match"),
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), 0.6, "same 2-D shape"),
        (torch.zeros(3), torch.zeros(3), 0.6, "same 2-D shape"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), 0.6, "floating point"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 0.0, "tau"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 1.0, "tau"),
        (torch.zeros(2, 3), torch.zeros(2, 3), True, "tau"),
        (torch.zeros(2, 3), torch.zeros(2, 3), "0.6", "tau"),
        (torch.full((2, 3), 2.0), torch.zeros(2, 3), 0.6, "observed must be in"),
        (torch.zeros(2, 3), torch.full((2, 3), math.nan), 0.6, "NaN"),
    ],
)
def test_correct_labels_bad_input(observed: torch.Tensor, logits: torch.Tensor, tau: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        correct_labels(observed, logits, tau)  # type: ignore[arg-type]


def test_correct_labels_check_values_off_skips_value_checks() -> None:
    out = correct_labels(torch.full((1, 2), 2.0), torch.tensor([[5.0, -5.0]]), 0.6, check_values=False)
    assert out.tolist() == [[1.0, 1.0]]
    with pytest.raises(TypeError):
        correct_labels(np.zeros((1, 2)), torch.zeros(1, 2), 0.6)  # type: ignore[arg-type]


def test_correction_quality_hand_example() -> None:
    full = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    observed = np.array([[1, 0, 0, 0, 0], [0, 0, 1, 0, 0]])
    # Missing: (0,1), (0,2), (1,0), (1,3). Recovered: (0,1), (0,3), (1,0). True recovered: (0,1), (1,0).
    corrected = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 0, 0]])
    q = correction_quality(observed, corrected, full)
    assert q == CorrectionQuality(n_missing=4, n_recovered=3, n_true_recovered=2)
    assert q.precision == pytest.approx(2 / 3)
    assert q.recall == pytest.approx(2 / 4)
    assert q.as_dict() == {
        "n_missing": 4,
        "n_recovered": 3,
        "n_true_recovered": 2,
        "precision": q.precision,
        "recall": q.recall,
    }


def test_correction_quality_undefined_ratios_are_nan() -> None:
    full = np.array([[1, 0, 1]])
    q = correction_quality(full, full, full)  # nothing missing, nothing recovered
    assert (q.n_missing, q.n_recovered, q.n_true_recovered) == (0, 0, 0)
    assert math.isnan(q.precision) and math.isnan(q.recall)
    q = correction_quality(np.zeros((1, 3)), np.zeros((1, 3)), full)  # missing, nothing recovered
    assert math.isnan(q.precision) and q.recall == 0.0


def _quality_reference(observed: np.ndarray, corrected: np.ndarray, full: np.ndarray) -> tuple[int, int, int]:
    n_missing = n_recovered = n_true = 0
    for o, c, f in zip(observed.ravel().tolist(), corrected.ravel().tolist(), full.ravel().tolist()):
        if o == 0 and f == 1:
            n_missing += 1
        if o == 0 and c == 1:
            n_recovered += 1
            n_true += f == 1
    return n_missing, n_recovered, n_true


def test_correction_quality_random_batches_accumulate() -> None:
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(12):
        full = rng.random((9, 6)) < 0.4
        observed = full & (rng.random((9, 6)) < 0.5)
        logits = torch.from_numpy(rng.normal(size=(9, 6)) * 2)
        corrected = correct_labels(torch.from_numpy(observed), logits, tau=0.6)
        batches.append((observed, corrected, full))
    total = CorrectionQuality()
    for observed, corrected, full in batches:
        q = correction_quality(torch.from_numpy(observed).float(), corrected, full.astype(np.int64))
        assert (q.n_missing, q.n_recovered, q.n_true_recovered) == _quality_reference(observed, corrected.numpy(), full)
        total = total + q
    stacked = [np.concatenate(parts) for parts in zip(*[(o, c.numpy(), f) for o, c, f in batches])]
    assert total == correction_quality(*stacked)
    assert sum((correction_quality(*b) for b in batches), CorrectionQuality()) == total
    assert 0.0 < total.precision < 1.0 and 0.0 < total.recall < 1.0


def test_correction_quality_bad_input() -> None:
    full = np.array([[1, 0]])
    with pytest.raises(ValueError, match="same shape"):
        correction_quality(full, full, np.array([[1, 0, 0]]))
    with pytest.raises(ValueError, match="corrected must be in"):
        correction_quality(full, np.array([[1, 3]]), full)
    with pytest.raises(ValueError, match="subset of the full labels"):
        correction_quality(np.array([[1, 1]]), full, full)
    with pytest.raises(TypeError, match="full"):
        correction_quality(full, full, [[1, 0]])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CorrectionQuality() + 1  # type: ignore[operator]


# ------------------------------------------------------------------------------ per-class quantile rule


def _quantile_reference(observed: torch.Tensor, logits: torch.Tensor, tau: float, q: float) -> list[list[int]]:
    """Float64 loop: per class, the q-quantile (NumPy's linear rule) of the unobserved entries' scores."""
    obs, x = observed.numpy(), logits.double().numpy()
    probs = 1.0 / (1.0 + np.exp(-x))
    out = obs.astype(int).copy()
    for c in range(obs.shape[1]):
        unobserved = [probs[i, c] for i in range(obs.shape[0]) if obs[i, c] == 0]
        if not unobserved:
            continue
        threshold = max(tau, float(np.quantile(unobserved, q)))
        for i in range(obs.shape[0]):
            if obs[i, c] == 0 and probs[i, c] > threshold:
                out[i, c] = 1
    return out.tolist()


@pytest.mark.parametrize("seed", range(8))
def test_correct_labels_quantile_matches_slow_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    observed = (torch.rand(16, 9, generator=gen) < 0.3).long()
    observed[:, 0] = 1  # a class with no unobserved entry: nothing to recover
    logits = 3 * torch.randn(16, 9, generator=gen, dtype=torch.float64)
    tau = float(torch.empty(()).uniform_(0.05, 0.6, generator=gen))
    q = float(torch.empty(()).uniform_(0.5, 0.95, generator=gen))
    got = correct_labels(observed, logits, tau, quantile=q)
    assert got.tolist() == _quantile_reference(observed, logits, tau, q)


def test_quantile_rule_bounds_recovery_when_scores_are_uncalibrated() -> None:
    # Every score is high (as with ASL): tau alone recovers everything, the quantile rule the top share per class.
    gen = torch.Generator().manual_seed(0)
    observed = torch.zeros(100, 3, dtype=torch.long)
    logits = 3.0 + torch.rand(100, 3, generator=gen)  # sigmoid > 0.95 everywhere
    assert int(correct_labels(observed, logits, 0.6).sum()) == 300
    recovered = correct_labels(observed, logits, 0.6, quantile=0.9).sum(dim=0)
    assert recovered.tolist() == [10, 10, 10]  # distinct scores: 10 of 100 lie above the 0.9 quantile


def test_class_quantile_thresholds_all_observed_class_is_inf() -> None:
    from clml_core.correction import class_quantile_thresholds

    observed = torch.tensor([[1, 0], [1, 1], [1, 0]])
    probs = torch.tensor([[0.9, 0.2], [0.8, 0.9], [0.7, 0.6]])
    thresholds = class_quantile_thresholds(observed, probs, 0.5)
    assert thresholds[0] == math.inf and torch.isclose(thresholds[1], torch.tensor(0.4))


@pytest.mark.parametrize("quantile", [0.0, 1.0, -0.1, True])
def test_correct_labels_rejects_bad_quantile(quantile: object) -> None:
    with pytest.raises(ValueError, match="quantile"):
        correct_labels(torch.zeros(2, 2), torch.zeros(2, 2), 0.6, quantile=quantile)


# --------------------------------------------------------------------------------- score reliability


def test_score_reliability_matches_loop_and_hand_example() -> None:
    from clml_core.correction import score_reliability

    scores = np.array([[0.05, 0.95, 0.5], [1.0, 0.12, 0.55]])
    observed = np.array([[0, 1, 0], [0, 0, 0]])
    full = np.array([[0, 1, 1], [1, 0, 0]])
    bins = score_reliability(scores, observed, full, bins=4)
    # unobserved: 0.05 neg, 0.5 missing, 1.0 missing (last bin includes 1), 0.12 neg, 0.55 neg
    assert bins["missing"].tolist() == [0, 0, 1, 1] and bins["negative"].tolist() == [2, 0, 1, 0]
    assert np.allclose(bins["low"], [0, 0.25, 0.5, 0.75]) and np.allclose(bins["high"], [0.25, 0.5, 0.75, 1.0])
    assert bins["share"][0] == 0 and np.isnan(bins["share"][1]) and bins["share"][2] == 0.5

    rng = np.random.default_rng(0)
    full = (rng.random((50, 6)) < 0.3).astype(int)
    observed = full * (rng.random((50, 6)) < 0.5)
    scores = rng.random((50, 6))
    got = score_reliability(scores, observed, full, bins=10)
    missing, negative = np.zeros(10, int), np.zeros(10, int)
    for i in range(50):
        for c in range(6):
            if not observed[i, c]:
                b = min(int(scores[i, c] * 10), 9)
                if full[i, c]:
                    missing[b] += 1
                else:
                    negative[b] += 1
    assert got["missing"].tolist() == missing.tolist() and got["negative"].tolist() == negative.tolist()
    with pytest.raises(ValueError, match="probabilities"):
        score_reliability(scores + 1, observed, full)
    with pytest.raises(ValueError, match="subset|positive in full"):
        score_reliability(scores, full, observed * 0)
