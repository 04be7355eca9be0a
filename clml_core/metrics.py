"""Multi-label evaluation metrics: mean average precision and threshold-based precision/recall/F1.

Every function takes ``targets`` and ``scores`` of shape (N, C), as NumPy arrays or torch tensors (any device),
and returns numbers in percent (0-100), the unit used in the multi-label literature.

Policies (the same ones scikit-learn applies, which the tests use as the reference):

* Average precision of a class is scikit-learn's ``average_precision_score``: the sum over distinct score
  thresholds of (R_k - R_{k-1}) * P_k, tied scores forming one threshold. A class with no positive in ``targets``
  has no AP (NaN in :func:`average_precision_per_class`) and is left out of the mean in
  :func:`mean_average_precision`; if no class has a positive, that function raises ``ValueError``.
* :func:`threshold_metrics` predicts a label positive when its score is >= ``threshold`` (the ML-GCN evaluation
  code does ``scores >= 0`` on logits, i.e. ``p >= 0.5``). A ratio with a zero denominator (precision of a class
  that is never predicted, recall of a class with no positive) counts as 0 and every class stays in the average.
  That is ML-GCN's rule for precision and scikit-learn's ``zero_division=0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # NumPy has no bfloat16.
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _validate(targets: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked copies: targets (N, C) bool and scores (N, C) float64."""
    t = _to_numpy(targets, "targets")
    s = _to_numpy(scores, "scores")
    if t.ndim != 2 or s.ndim != 2:
        raise ValueError(f"targets and scores must be 2-D (N, C), got shapes {t.shape} and {s.shape}")
    if t.shape != s.shape:
        raise ValueError(f"targets and scores must have the same shape, got {t.shape} and {s.shape}")
    if t.shape[0] == 0:
        raise ValueError("targets and scores hold no sample (N = 0)")
    if t.dtype != np.bool_ and not np.isin(t, (0, 1)).all():
        raise ValueError(f"targets must be in {{0, 1}}, got values {np.unique(t)[:10].tolist()}")
    if s.dtype != np.bool_ and (not np.issubdtype(s.dtype, np.number) or np.iscomplexobj(s)):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return t.astype(bool), s


@dataclass(frozen=True)
class Ranking:
    """Every class's test items sorted by descending score, with the tie structure AP needs.

    Attributes:
        order: (C, N) item indices in descending score order per class (the order within ties does not matter).
        targets: (C, N) bool targets in that order.
        run_end: (C, N) position of the last item of each item's run of tied scores (one threshold).
    """

    order: np.ndarray
    targets: np.ndarray
    run_end: np.ndarray


def _ranking(t: np.ndarray, s: np.ndarray) -> Ranking:
    """The :class:`Ranking` of checked targets t (N, C) bool and scores s (N, C)."""
    n = s.shape[0]
    # Classes as rows (C, N), contiguous, so that every sort and scan runs along memory.
    s_c = np.ascontiguousarray(s.T)
    order = np.argsort(-s_c, axis=1)  # (C, N) descending scores
    s_sorted = np.take_along_axis(s_c, order, axis=1)
    t_sorted = np.take_along_axis(np.ascontiguousarray(t.T), order, axis=1)
    # A run of tied scores is one threshold: every position takes the precision at the end of its run.
    is_end = np.ones_like(t_sorted)
    is_end[:, :-1] = s_sorted[:, :-1] != s_sorted[:, 1:]
    run_end = np.where(is_end, np.arange(n), n)  # (C, N) own index at a run end, n elsewhere
    run_end = np.minimum.accumulate(run_end[:, ::-1], axis=1)[:, ::-1]  # (C, N) index of the end of each run
    return Ranking(order, t_sorted, run_end)


def _ranked_average_precision(ranking: Ranking, weights: np.ndarray | None = None) -> np.ndarray:
    """AP in [0, 1] per class of a ranking, each item counted ``weights[i]`` times (default once); NaN without a
    (weighted) positive. Integer weights give the AP of the items repeated that often (a bootstrap resample)."""
    t_sorted = ranking.targets.astype(np.float64)
    if weights is None:
        counted = np.broadcast_to(np.arange(1, t_sorted.shape[1] + 1, dtype=np.float64), t_sorted.shape)
    else:
        w_sorted = np.asarray(weights, dtype=np.float64)[ranking.order]  # (C, N)
        t_sorted = t_sorted * w_sorted
        counted = np.cumsum(w_sorted, axis=1)  # (C, N) items among the top i + 1
    tp = np.cumsum(t_sorted, axis=1)  # (C, N) true positives among the top i + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_at_run_end = np.take_along_axis(tp, ranking.run_end, axis=1) / np.take_along_axis(
            counted, ranking.run_end, axis=1
        )  # (C, N); 0 / 0 only in runs of weight 0, which add nothing below
        n_pos = tp[:, -1]  # (C,)
        hits = np.nansum(precision_at_run_end * t_sorted, axis=1)  # (C,) sum over positives of P at their threshold
        return np.where(n_pos > 0, hits / n_pos, np.nan)


def _average_precision(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AP in [0, 1] of every column of checked targets t (N, C) bool and scores s (N, C); NaN without positive."""
    return _ranked_average_precision(_ranking(t, s))


def rank_by_class(targets: ArrayLike, scores: ArrayLike) -> Ranking:
    """Sort every class's items by score once, for many weighted AP evaluations (a bootstrap over items).

    Args:
        targets: (N, C) in {0, 1}.
        scores: (N, C) finite real scores.

    Raises:
        ValueError: as :func:`average_precision_per_class`.
    """
    return _ranking(*_validate(targets, scores))


def ranked_average_precision(ranking: Ranking, weights: np.ndarray | None = None) -> np.ndarray:
    """Average precision of every class, in percent, with item i counted ``weights[i]`` times.

    With integer weights this equals :func:`average_precision_per_class` of the items repeated that often (ties,
    repeats included, form one threshold), without sorting again.

    Args:
        ranking: from :func:`rank_by_class`.
        weights: (N,) non-negative item weights; None counts every item once.

    Returns:
        (C,) float64 in [0, 100]; NaN for a class without a positive of positive weight.
    """
    return 100.0 * _ranked_average_precision(ranking, weights)


def average_precision_per_class(targets: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Average precision of every class, in percent.

    Args:
        targets: (N, C) in {0, 1} (bool, integer or floating point).
        scores: (N, C) finite real scores, any monotone scale (logits or probabilities). Ties form one threshold.

    Returns:
        (C,) float64 in [0, 100]; NaN for a class with no positive in ``targets``.

    Raises:
        ValueError: on shapes that are not the same (N, C) with N >= 1, targets outside {0, 1} or scores that
            are not finite.
    """
    t, s = _validate(targets, scores)
    return 100.0 * _average_precision(t, s)


def mean_average_precision(targets: ArrayLike, scores: ArrayLike) -> float:
    """Mean over classes of the average precision, in percent; classes with no positive are left out.

    Args:
        targets: (N, C) in {0, 1} (bool, integer or floating point).
        scores: (N, C) finite real scores (logits or probabilities).

    Returns:
        mAP in [0, 100], the mean of :func:`average_precision_per_class` over the classes with a positive.

    Raises:
        ValueError: as :func:`average_precision_per_class`, and when no class has a positive.
    """
    ap = average_precision_per_class(targets, scores)
    if np.isnan(ap).all():
        raise ValueError("mean_average_precision: no class has a positive in targets, mAP is undefined")
    return float(np.nanmean(ap))


def cole_mean_average_precision(targets: ArrayLike, scores: ArrayLike) -> float:
    """Cole et al.'s mAP, in percent: the mean over all C classes, a class with no positive counting as AP 0 (their
    harness's ``compute_mAP``); equal to :func:`mean_average_precision` when every class has a positive.

    Args and Raises as :func:`average_precision_per_class`.
    """
    return float(np.nan_to_num(average_precision_per_class(targets, scores), nan=0.0).mean())


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (the zero_division=0 rule)."""
    return np.divide(num, den, out=np.zeros(np.shape(num), dtype=np.float64), where=den > 0)


def _f1(precision: float, recall: float) -> float:
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def threshold_metrics(targets: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Per-class and overall precision, recall and F1 at a fixed threshold, in percent (ML-GCN / ASL papers).

    A label is predicted positive when ``scores >= threshold``. With per-class counts of correct positive
    predictions Nc, predicted positives Np and true positives Ng (zero denominators give 0, see the module)::

        CP = mean_c Nc/Np    CR = mean_c Nc/Ng    CF1 = 2 CP CR / (CP + CR)
        OP = sum Nc / sum Np  OR = sum Nc / sum Ng  OF1 = 2 OP OR / (OP + OR)

    CF1 is the F1 of the averaged CP and CR, not the mean of per-class F1 scores.

    Args:
        targets: (N, C) in {0, 1}.
        scores: (N, C) probabilities in [0, 1].
        threshold: decision threshold in [0, 1].

    Returns:
        dict with keys "CP", "CR", "CF1", "OP", "OR", "OF1", floats in [0, 100].

    Raises:
        ValueError: on bad shapes, targets outside {0, 1}, scores outside [0, 1] (logits were passed?) or a
            threshold outside [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    t, s = _validate(targets, scores)
    if s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(
            f"scores must be probabilities in [0, 1], got range [{s.min():.4g}, {s.max():.4g}] "
            "(apply a sigmoid to logits first)"
        )
    predicted = s >= threshold
    n_correct = (predicted & t).sum(axis=0)  # (C,)
    n_predicted = predicted.sum(axis=0)  # (C,)
    n_true = t.sum(axis=0)  # (C,)
    cp = float(_ratio(n_correct, n_predicted).mean())
    cr = float(_ratio(n_correct, n_true).mean())
    op = float(_ratio(n_correct.sum(), n_predicted.sum()))
    or_ = float(_ratio(n_correct.sum(), n_true.sum()))
    return {
        "CP": 100.0 * cp,
        "CR": 100.0 * cr,
        "CF1": 100.0 * _f1(cp, cr),
        "OP": 100.0 * op,
        "OR": 100.0 * or_,
        "OF1": 100.0 * _f1(op, or_),
    }
