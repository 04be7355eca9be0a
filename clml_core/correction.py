"""Label correction for missing labels, and how well it recovers the missing positives.

With missing labels an unobserved positive looks like a negative. Correction (SPLC, Zhang et al. 2021; CLML)
counts an unobserved label as positive once the model is confident: ``sigmoid(logit) > tau``. Observed positives
always stay positive. :func:`correct_labels` is pure: the training loop decides from which epoch it is used and
which losses see the corrected labels.

A fixed ``tau`` assumes calibrated scores. A loss that shifts scores up (ASL's shifted negatives) pushes most
unobserved entries over it. The ``quantile`` option of :func:`correct_labels` makes the rule rank-based per class:
an unobserved entry must also exceed the ``quantile`` of its class's unobserved scores in the batch
(:func:`class_quantile_thresholds`), so at most about ``1 - quantile`` of a class's unobserved entries are recovered
in a batch, whatever the scale of the scores.

:func:`correction_quality` measures the correction against the full (clean) labels, counting only entries that
were unobserved: ``missing = full & ~observed`` and ``recovered = corrected & ~observed``. Precision is the share
of recovered labels that were truly missing positives, recall the share of missing positives that were recovered.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor


def _check_binary(x: Tensor, name: str) -> None:
    if x.dtype != torch.bool and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must be in {{0, 1}}, got values {torch.unique(x)[:10].tolist()}")


def class_quantile_thresholds(observed: Tensor, probs: Tensor, quantile: float) -> Tensor:
    """Per class, the ``quantile`` of the scores of its unobserved entries in the batch.

    Args:
        observed: (B, C) observed labels in {0, 1}.
        probs: (B, C) scores (sigmoid probabilities), float32 or wider.
        quantile: in (0, 1); linear interpolation between order statistics (NumPy's default).

    Returns:
        (C,) thresholds; +inf for a class with no unobserved entry in the batch (nothing to recover).
    """
    unobserved = probs.masked_fill(observed.bool(), float("nan"))  # (B, C) NaN where observed
    thresholds = torch.nanquantile(unobserved, quantile, dim=0)  # (C,) NaN where a column is all observed
    return thresholds.nan_to_num(nan=math.inf)


def correct_labels(
    observed: Tensor, logits: Tensor, tau: float, *, quantile: float | None = None, check_values: bool = True
) -> Tensor:
    """Observed labels with confident unobserved labels switched to positive.

    ``corrected = observed | (sigmoid(logits) > tau)``, computed on detached logits in float32 or wider, so no
    gradient flows through the correction. With ``quantile``, an unobserved entry of class k must also exceed
    the class threshold ``t_k`` of :func:`class_quantile_thresholds`: ``sigmoid(logits) > max(tau, t_k)``.

    Args:
        observed: (B, C) observed labels in {0, 1}; bool, integer or floating point.
        logits: (B, C) floating-point logits.
        tau: confidence threshold in (0, 1); Zhang et al. (SPLC) use 0.6.
        quantile: None for the fixed threshold alone, else a per-class quantile in (0, 1) of the batch's
            unobserved scores that an entry must exceed as well.
        check_values: check that observed is in {0, 1} and logits hold no NaN. This reads tensor values (one
            device synchronisation on an accelerator); a caller that has already checked them passes False.

    Returns:
        (B, C) corrected labels, same dtype and device as ``observed``.

    Raises:
        ValueError: on shapes that are not the same 2-D shape, non-floating logits, tau or quantile outside
            (0, 1), observed outside {0, 1} or NaN logits.

    Example:
        >>> correct_labels(torch.tensor([[1, 0, 0]]), torch.tensor([[-5.0, 0.0, 3.0]]), tau=0.6)
        tensor([[1, 0, 1]])
    """
    if not isinstance(observed, Tensor) or not isinstance(logits, Tensor):
        raise TypeError("correct_labels: observed and logits must be torch tensors")
    if observed.dim() != 2 or observed.shape != logits.shape:
        raise ValueError(
            "correct_labels: observed and logits must have the same 2-D shape (B, C), got "
            f"{tuple(observed.shape)} and {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"correct_labels: logits must be floating point, got {logits.dtype}")
    if isinstance(tau, bool) or not (isinstance(tau, numbers.Real) and 0.0 < tau < 1.0):
        raise ValueError(f"correct_labels: tau must be a number in (0, 1), got {tau!r}")
    if quantile is not None and (
        isinstance(quantile, bool) or not (isinstance(quantile, numbers.Real) and 0.0 < quantile < 1.0)
    ):
        raise ValueError(f"correct_labels: quantile must be None or a number in (0, 1), got {quantile!r}")
    if check_values:
        _check_binary(observed, "correct_labels: observed")
        if bool(torch.isnan(logits).any()):
            raise ValueError("correct_labels: logits contain NaN")
    probs = torch.sigmoid(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)))
    confident = probs > tau
    if quantile is not None:
        confident &= probs > class_quantile_thresholds(observed, probs, quantile)
    return (observed.bool() | confident).to(observed.dtype)


@dataclass(frozen=True)
class CorrectionQuality:
    """Counts of a label correction against the full labels; add instances to accumulate over batches.

    Attributes:
        n_missing: missing positives, ``full & ~observed``.
        n_recovered: labels turned positive by the correction, ``corrected & ~observed``.
        n_true_recovered: recovered labels that are missing positives.

    ``CorrectionQuality()`` is the zero to start a sum from: ``sum(per_batch, CorrectionQuality())``.
    """

    n_missing: int = 0
    n_recovered: int = 0
    n_true_recovered: int = 0

    @property
    def precision(self) -> float:
        """n_true_recovered / n_recovered in [0, 1]; NaN when nothing was recovered."""
        return self.n_true_recovered / self.n_recovered if self.n_recovered else math.nan

    @property
    def recall(self) -> float:
        """n_true_recovered / n_missing in [0, 1]; NaN when no positive is missing."""
        return self.n_true_recovered / self.n_missing if self.n_missing else math.nan

    def __add__(self, other: CorrectionQuality) -> CorrectionQuality:
        if not isinstance(other, CorrectionQuality):
            return NotImplemented
        return CorrectionQuality(
            self.n_missing + other.n_missing,
            self.n_recovered + other.n_recovered,
            self.n_true_recovered + other.n_true_recovered,
        )

    def as_dict(self) -> dict[str, float]:
        """Counts, precision and recall, for logging."""
        return {
            "n_missing": self.n_missing,
            "n_recovered": self.n_recovered,
            "n_true_recovered": self.n_true_recovered,
            "precision": self.precision,
            "recall": self.recall,
        }


def _as_bool(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"correction_quality: {name} must be a numpy array or a torch tensor, got {type(x)}")
    if x.dtype != np.bool_ and not np.isin(x, (0, 1)).all():
        raise ValueError(f"correction_quality: {name} must be in {{0, 1}}, got values {np.unique(x)[:10].tolist()}")
    return x.astype(bool)


def correction_quality(observed: ArrayLike, corrected: ArrayLike, full: ArrayLike) -> CorrectionQuality:
    """Counts of recovered missing positives for one batch (or a whole set).

    Args:
        observed: (B, C) observed labels in {0, 1}, a subset of ``full``.
        corrected: (B, C) labels after correction, in {0, 1}.
        full: (B, C) full (clean) labels in {0, 1}.

    Each may be a NumPy array or a torch tensor of any dtype.

    Returns:
        CorrectionQuality with the counts; its ``precision`` and ``recall`` are NaN when undefined.

    Raises:
        ValueError: on shapes that differ, values outside {0, 1}, or an observed positive that is negative in
            ``full`` (the arguments are probably in the wrong order).
    """
    obs = _as_bool(observed, "observed")
    cor = _as_bool(corrected, "corrected")
    ful = _as_bool(full, "full")
    if not obs.shape == cor.shape == ful.shape:
        raise ValueError(
            "correction_quality: observed, corrected and full must have the same shape, got "
            f"{obs.shape}, {cor.shape} and {ful.shape}"
        )
    if (obs & ~ful).any():
        raise ValueError(
            f"correction_quality: {int((obs & ~ful).sum())} observed positives are negative in full; observed "
            "labels must be a subset of the full labels (check the argument order: observed, corrected, full)"
        )
    missing = ful & ~obs
    recovered = cor & ~obs
    return CorrectionQuality(
        n_missing=int(missing.sum()),
        n_recovered=int(recovered.sum()),
        n_true_recovered=int((missing & recovered).sum()),
    )


def correction_counts(observed: Tensor, corrected: Tensor, full: Tensor) -> Tensor:
    """The counts of :func:`correction_quality` as a (3,) tensor on the device (missing, recovered, truly
    recovered), without a host read: what a training step logs. Inputs are (B, C) tensors in {0, 1} of any dtype,
    unchecked (the training step's labels were validated when the datasets were built)."""
    seen, full = observed.bool(), full.bool()
    missing, recovered = full & ~seen, corrected.bool() & ~seen
    return torch.stack([missing.sum(), recovered.sum(), (missing & recovered).sum()])


def score_reliability(scores: ArrayLike, observed: ArrayLike, full: ArrayLike, bins: int = 10) -> dict[str, np.ndarray]:
    """How the scores of unobserved entries separate missing positives from true negatives, in equal-width bins.

    Correction can only act on unobserved entries; among them, the missing positives (``full & ~observed``) are what
    it should recover and the rest are true negatives. A calibrated score puts a bin's share of missing positives
    near the bin's score.

    Args:
        scores: (N, C) sigmoid scores in [0, 1], e.g. of the training images at the end of training.
        observed: (N, C) observed labels in {0, 1}, a subset of ``full``.
        full: (N, C) full labels in {0, 1}.
        bins: equal-width bins on [0, 1]; the last bin includes 1.

    Returns:
        ``low``, ``high`` (bins,) bin edges, ``missing`` and ``negative`` (bins,) counts of unobserved entries whose
        score falls in the bin, and ``share`` (bins,) = missing / (missing + negative), NaN for an empty bin.
    """
    obs, ful = _as_bool(observed, "observed"), _as_bool(full, "full")
    s = scores.detach().cpu().double().numpy() if isinstance(scores, Tensor) else np.asarray(scores, np.float64)
    if not s.shape == obs.shape == ful.shape:
        raise ValueError(f"score_reliability: scores {s.shape}, observed {obs.shape}, full {ful.shape} must match")
    if not (np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()):
        raise ValueError("score_reliability: scores must be probabilities in [0, 1]")
    if (obs & ~ful).any():
        raise ValueError("score_reliability: observed positives must be positive in full (argument order?)")
    if bins < 1:
        raise ValueError(f"score_reliability: bins must be >= 1, got {bins}")
    unobserved = ~obs
    which = np.minimum((s[unobserved] * bins).astype(np.int64), bins - 1)  # bin of every unobserved entry
    positive = ful[unobserved]
    missing = np.bincount(which[positive], minlength=bins)
    negative = np.bincount(which[~positive], minlength=bins)
    total = missing + negative
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, missing / total, np.nan)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {"low": edges[:-1], "high": edges[1:], "missing": missing, "negative": negative, "share": share}
