"""Base multi-label losses for learning with missing labels: BCE, Focal, ASL, Hill, SPLC, AN and LL-R.

Every loss is an ``nn.Module`` whose ``forward(logits (B, C), targets (B, C), *, correction_active=False)``
returns a 0-dim tensor. ``targets`` are the observed labels in {0, 1} (bool, integer or floating point); an
unobserved label is 0. :meth:`MultiLabelLoss.loss_matrix` returns the (B, C) per-entry loss before reduction.
Choose a loss by name with :func:`make_base_loss`; :data:`BASE_LOSSES` maps names to classes.

Reduction. ``reduction="sum"`` (the default) sums the per-entry losses over batch and classes, as the official
code of ASL (Ridnik et al.), Hill and SPLC (Zhang et al.) and CLML does. CLML divides its own term by B, so
``lam = 1`` in :class:`~clml_core.losses.clml.CLMLLoss` means what it meant in the paper only with "sum".
``reduction="mean"`` divides the sum by B * C.

Correction. ``correction_active`` tells SPLC whether its label correction is on; the training loop owns the
schedule (SPLC switches it on from epoch :data:`SPLC_CHANGE_EPOCH`). The other losses ignore it. LL-R takes its
rejection rate as the keyword ``reject_rate`` for the same reason: a loss knows nothing about epochs.

Precision. Losses are computed in float32, or float64 for float64 logits, also for float16 / bfloat16 logits under
autocast; none of the operations used here is one that autocast runs in reduced precision. Log-probabilities
come from ``logsigmoid``, so no loss overflows for large logits.

Bad input (shapes, targets outside {0, 1}, hyperparameters, unknown names) raises ``ValueError``.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clml_core.correction import correct_labels

REDUCTIONS = ("sum", "mean")

#: First epoch (counted from 0) with SPLC correction in Zhang et al.'s code (``change_epoch=1``); the training
#: loop passes ``correction_active = epoch >= SPLC_CHANGE_EPOCH``.
SPLC_CHANGE_EPOCH = 1


def positive_focal_term(logits: Tensor, gamma: float, detach_weight: bool = False) -> Tensor:
    """Focal loss of a positive label, ``-(1 - p)^gamma * log(p)`` with ``p = sigmoid(logits)``, per entry.

    Args:
        logits: (B, C) floating point.
        gamma: focusing parameter >= 0; 0 gives binary cross-entropy.
        detach_weight: take no gradient through the weight ``(1 - p)^gamma``.

    Returns:
        (B, C), same dtype as ``logits``.
    """
    nll = -F.logsigmoid(logits)
    if gamma == 0:
        return nll
    weight = torch.sigmoid(-logits) ** gamma  # (1 - p)^gamma without cancellation for p near 1
    return (weight.detach() if detach_weight else weight) * nll


def negative_focal_term(logits: Tensor, gamma: float, detach_weight: bool = False) -> Tensor:
    """Focal loss of a negative label, ``-p^gamma * log(1 - p)`` with ``p = sigmoid(logits)``, per entry.

    Args and Returns as :func:`positive_focal_term`.
    """
    return positive_focal_term(-logits, gamma, detach_weight)


def check_number(
    owner: str,
    name: str,
    value: float,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """Raise ValueError unless value is a finite real number in the interval from low to high."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}"
        if high < math.inf:
            bound += f" and {'<' if open_high else '<='} {high}"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")


class MultiLabelLoss(nn.Module, abc.ABC):
    """Common interface: input checks, float32 computation and the reduction; subclasses give the loss matrix.

    Args:
        reduction: "sum" over batch and classes (the authors' convention, the default) or "mean" over B * C.
        check_values: check that targets are in {0, 1}. This reads tensor values (one device synchronisation per
            call on an accelerator); pass False where the data pipeline guarantees it.
    """

    def __init__(self, reduction: str = "sum", check_values: bool = True) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.check_values = check_values

    def _prepare(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Checked logits in float32 or wider (B, C) and targets as bool (B, C)."""
        name = type(self).__name__
        if not isinstance(logits, Tensor) or not isinstance(targets, Tensor):
            raise TypeError(f"{name}: logits and targets must be torch tensors")
        if logits.dim() != 2 or logits.shape != targets.shape:
            raise ValueError(
                f"{name}: logits and targets must have the same 2-D shape (B, C), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if logits.numel() == 0:
            raise ValueError(f"{name}: empty input of shape {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"{name}: logits must be floating point, got {logits.dtype}")
        if self.check_values and targets.dtype != torch.bool and not bool(((targets == 0) | (targets == 1)).all()):
            raise ValueError(f"{name}: targets must be in {{0, 1}}, got values {torch.unique(targets)[:10].tolist()}")
        return logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.bool()

    @abc.abstractmethod
    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        """Per-entry loss (B, C) for checked float logits (B, C) and bool targets (B, C)."""

    def loss_matrix(self, logits: Tensor, targets: Tensor, *, correction_active: bool = False) -> Tensor:
        """Per-entry loss before reduction.

        Args:
            logits: (B, C) floating point.
            targets: (B, C) observed labels in {0, 1}.
            correction_active: whether the loss's own label correction is on (SPLC only).

        Returns:
            (B, C) in float32 (float64 for float64 logits).
        """
        logits, targets = self._prepare(logits, targets)
        return self._matrix(logits, targets, correction_active)

    def _reduce(self, matrix: Tensor) -> Tensor:
        return matrix.sum() if self.reduction == "sum" else matrix.mean()

    def forward(self, logits: Tensor, targets: Tensor, *, correction_active: bool = False) -> Tensor:
        """Loss (0-dim) of logits (B, C) against targets (B, C), summed or averaged (see ``reduction``)."""
        return self._reduce(self.loss_matrix(logits, targets, correction_active=correction_active))

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class BCELoss(MultiLabelLoss):
    """Binary cross-entropy on the observed labels, ``-y log p - (1 - y) log(1 - p)`` per entry.

    With missing labels this is the "assume negative" (AN) baseline: unobserved labels are trained as negatives.
    Zhang et al.'s code computes it as ``AsymmetricLoss(0, 0, clip=0)``, which clamps p and 1 - p at 1e-8; here
    it is computed from the logits without clamping (``binary_cross_entropy_with_logits``), the same wherever
    |logit| < 18.4.

    Args:
        reduction: "sum" (default, the authors' convention) or "mean" over B * C.
        check_values: check that targets are in {0, 1}.
    """

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")


class FocalLoss(MultiLabelLoss):
    """Focal loss (Lin et al., ICCV 2017), ``-alpha_t (1 - p_t)^gamma log(p_t)`` per entry.

    ``p_t = p`` for a positive and ``1 - p`` for a negative; ``alpha_t = alpha`` for a positive and ``1 - alpha``
    for a negative, or 1 when ``alpha`` is None (the multi-label default). Gradients flow through the focusing
    weight as in Lin et al.; Zhang et al.'s Focal baseline (``AsymmetricLoss(2, 2, clip=0)``) detaches it, which
    ``detach_focal_weight=True`` reproduces.

    Args:
        gamma: focusing parameter >= 0 (default 2, Lin et al.).
        alpha: weight of positives in [0, 1], or None for no weighting (default).
        detach_focal_weight: take no gradient through ``(1 - p_t)^gamma``.
        reduction: "sum" (default, the authors' convention) or "mean" over B * C.
        check_values: check that targets are in {0, 1}.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | None = None,
        detach_focal_weight: bool = False,
        reduction: str = "sum",
        check_values: bool = True,
    ) -> None:
        super().__init__(reduction, check_values)
        check_number("FocalLoss", "gamma", gamma, 0.0)
        if alpha is not None:
            check_number("FocalLoss", "alpha", alpha, 0.0, 1.0)
        self.gamma = gamma
        self.alpha = alpha
        self.detach_focal_weight = detach_focal_weight

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        pos = positive_focal_term(logits, self.gamma, self.detach_focal_weight)
        neg = negative_focal_term(logits, self.gamma, self.detach_focal_weight)
        if self.alpha is not None:
            pos, neg = self.alpha * pos, (1.0 - self.alpha) * neg
        return torch.where(targets, pos, neg)

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, alpha={self.alpha}, detach_focal_weight={self.detach_focal_weight}, "
            + super().extra_repr()
        )


class AsymmetricLoss(MultiLabelLoss):
    """Asymmetric loss, ASL (Ridnik et al., ICCV 2021), as in their official ``AsymmetricLoss``.

    Per entry, with ``p = sigmoid(logit)`` and the shifted probability ``p_m = max(p - clip, 0)``::

        positive: -(1 - p)^gamma_pos * log(max(p, eps))
        negative: -p_m^gamma_neg * log(max(1 - p_m, eps))

    Defaults are the paper's and their training script's: gamma_neg=4, gamma_pos=0, clip=0.05, eps=1e-8, with
    the focusing weight detached (``disable_torch_grad_focal_loss=True`` in Ridnik et al.'s and Zhang et al.'s
    ``train.py``), so gradients flow only through the log terms.

    Args:
        gamma_neg: focusing parameter of negatives, >= 0.
        gamma_pos: focusing parameter of positives, >= 0.
        clip: probability margin of negatives, in [0, 1).
        eps: floor of the probabilities inside the logs, in (0, 1).
        detach_focal_weight: take no gradient through the focusing weights (default True, see above).
        reduction: "sum" (default, the authors' convention) or "mean" over B * C.
        check_values: check that targets are in {0, 1}.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        detach_focal_weight: bool = True,
        reduction: str = "sum",
        check_values: bool = True,
    ) -> None:
        super().__init__(reduction, check_values)
        check_number("AsymmetricLoss", "gamma_neg", gamma_neg, 0.0)
        check_number("AsymmetricLoss", "gamma_pos", gamma_pos, 0.0)
        check_number("AsymmetricLoss", "clip", clip, 0.0, 1.0, open_high=True)
        check_number("AsymmetricLoss", "eps", eps, 0.0, 1.0, open_low=True, open_high=True)
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.detach_focal_weight = detach_focal_weight

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        log_eps = math.log(self.eps)
        pos = -F.logsigmoid(logits).clamp(min=log_eps)  # -log(max(p, eps))
        if self.clip > 0:
            # 1 - p_m = min(1 - p + clip, 1), from sigmoid(-logits) to keep precision where p is near 1.
            neg = -torch.log((torch.sigmoid(-logits) + self.clip).clamp(max=1.0).clamp(min=self.eps))
        else:
            neg = -F.logsigmoid(-logits).clamp(min=log_eps)
        w_pos = torch.sigmoid(-logits) ** self.gamma_pos  # (1 - p)^gamma_pos
        w_neg = (torch.sigmoid(logits) - self.clip).clamp(min=0.0) ** self.gamma_neg  # p_m^gamma_neg
        if self.detach_focal_weight:
            w_pos, w_neg = w_pos.detach(), w_neg.detach()
        return torch.where(targets, w_pos * pos, w_neg * neg)

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
            f"detach_focal_weight={self.detach_focal_weight}, " + super().extra_repr()
        )


class HillLoss(MultiLabelLoss):
    """Hill loss (Zhang et al., "Simple and Robust Loss Design for Multi-Label Learning with Missing Labels", 2021).

    Per entry, with ``p = sigmoid(logit)`` and ``p_m = sigmoid(logit - margin)``::

        positive: -(1 - p_m)^gamma * log(p_m)       (focal margin)
        negative: (lamb - p) * p^2                  (Hill: a weighted MSE that spares confident negatives)

    The negative term uses p without margin, as in the paper and the official ``Hill`` class
    (github.com/xinyu1205/robust-loss-mlml). Defaults are theirs: lamb=1.5, margin=1.0, gamma=2. With lamb >= 1.5
    the negative term increases with p on all of [0, 1].

    Args:
        lamb: weight of the negative term, > 0.
        margin: logit margin of positives, >= 0.
        gamma: focusing parameter of positives, >= 0.
        reduction: "sum" (default, the authors' convention) or "mean" over B * C.
        check_values: check that targets are in {0, 1}.
    """

    def __init__(
        self,
        lamb: float = 1.5,
        margin: float = 1.0,
        gamma: float = 2.0,
        reduction: str = "sum",
        check_values: bool = True,
    ) -> None:
        super().__init__(reduction, check_values)
        check_number("HillLoss", "lamb", lamb, 0.0, open_low=True)
        check_number("HillLoss", "margin", margin, 0.0)
        check_number("HillLoss", "gamma", gamma, 0.0)
        self.lamb = lamb
        self.margin = margin
        self.gamma = gamma

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        pos = positive_focal_term(logits - self.margin, self.gamma)
        p = torch.sigmoid(logits)
        neg = (self.lamb - p) * p**2
        return torch.where(targets, pos, neg)

    def extra_repr(self) -> str:
        return f"lamb={self.lamb}, margin={self.margin}, gamma={self.gamma}, " + super().extra_repr()


class SPLCLoss(MultiLabelLoss):
    """SPLC, self-paced loss correction with focal margin (Zhang et al. 2021), as in their official ``SPLC``.

    Per entry, with ``p = sigmoid(logit)`` and ``p_m = sigmoid(logit - margin)``::

        observed positive:                        -(1 - p_m)^gamma * log(p_m)
        unobserved, corrected (p > tau):          -(1 - p)^gamma * log(p)      (no margin)
        unobserved otherwise:                     -p^gamma * log(1 - p)

    Correction (:func:`~clml_core.correction.correct_labels`, detached) applies only when ``correction_active``;
    without it the loss is the focal margin loss. Zhang et al. switch it on from epoch ``change_epoch=1`` (see
    :data:`SPLC_CHANGE_EPOCH`); the training loop decides. Defaults are theirs: tau=0.6, margin=1.0, gamma=2.

    Args:
        tau: correction threshold on p, in (0, 1).
        margin: logit margin of observed positives, >= 0.
        gamma: focusing parameter, >= 0.
        reduction: "sum" (default, the authors' convention) or "mean" over B * C.
        check_values: check that targets are in {0, 1}.
    """

    def __init__(
        self,
        tau: float = 0.6,
        margin: float = 1.0,
        gamma: float = 2.0,
        reduction: str = "sum",
        check_values: bool = True,
    ) -> None:
        super().__init__(reduction, check_values)
        check_number("SPLCLoss", "tau", tau, 0.0, 1.0, open_low=True, open_high=True)
        check_number("SPLCLoss", "margin", margin, 0.0)
        check_number("SPLCLoss", "gamma", gamma, 0.0)
        self.tau = tau
        self.margin = margin
        self.gamma = gamma

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        labels = correct_labels(targets, logits, self.tau, check_values=False) if correction_active else targets
        shifted = logits - self.margin * targets.to(logits.dtype)  # margin on observed positives only
        pos = positive_focal_term(shifted, self.gamma)
        neg = negative_focal_term(shifted, self.gamma)
        return torch.where(labels, pos, neg)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, margin={self.margin}, gamma={self.gamma}, " + super().extra_repr()


class LargeLossRejection(BCELoss):
    """LL-R, large-loss rejection (Kim et al., "Large Loss Matters in Weakly Supervised Multi-Label
    Classification", CVPR 2022): BCE (assume negative) that ignores the unobserved labels with the largest loss.

    Of the B * C entries, ``k = ceil(reject_rate * B * C)`` unobserved labels with the largest BCE loss are
    rejected (their loss is set to 0; at most all unobserved labels). ``reject_rate`` comes from the training loop;
    Kim et al. grow it linearly, ``reject_rate = delta_rel * epoch``, from 0 in the first epoch. "mean" divides by
    B * C, rejected entries included, as their code does.

    Differences from the official code (github.com/snucml/LargeLossMatters): exactly k entries are rejected when
    losses tie (theirs rejects every entry tied with the k-th largest), k is capped at the number of unobserved
    labels (theirs then also zeroes observed positives), and ``reject_rate * B * C`` is rounded to 6 decimals
    before the ceiling so that 0.07 * 100 gives 7, not 8.

    Args:
        reduction: "sum" (default, the authors' convention) or "mean" over B * C.
        check_values: check that targets are in {0, 1}.
    """

    def rejection_mask(self, logits: Tensor, targets: Tensor, reject_rate: float) -> Tensor:
        """Which entries are rejected.

        Args:
            logits: (B, C) floating point.
            targets: (B, C) observed labels in {0, 1}.
            reject_rate: share of the B * C entries to reject, in [0, 1].

        Returns:
            (B, C) bool, True at the rejected (unobserved, largest-loss) entries.
        """
        logits, targets = self._prepare(logits, targets)
        return self._rejection_mask(logits, targets, reject_rate)

    def _rejection_mask(self, logits: Tensor, targets: Tensor, reject_rate: float) -> Tensor:
        check_number("LargeLossRejection", "reject_rate", reject_rate, 0.0, 1.0)
        k = math.ceil(round(reject_rate * targets.numel(), 6))
        flat = torch.zeros(targets.numel(), dtype=torch.bool, device=targets.device)  # (B * C,)
        if k > 0:
            # BCE of an unobserved label (target 0) is softplus(logit); observed positives never compete.
            loss = torch.where(targets, -math.inf, F.softplus(logits.detach()))  # (B, C)
            flat[torch.topk(loss.flatten(), k).indices] = True
        return flat.view(targets.shape) & ~targets

    def loss_matrix(
        self, logits: Tensor, targets: Tensor, *, correction_active: bool = False, reject_rate: float = 0.0
    ) -> Tensor:
        """Per-entry BCE (B, C) with the rejected entries set to 0; see :meth:`rejection_mask`."""
        logits, targets = self._prepare(logits, targets)
        matrix = self._matrix(logits, targets, correction_active)
        return matrix.masked_fill(self._rejection_mask(logits, targets, reject_rate), 0.0)

    def forward(
        self, logits: Tensor, targets: Tensor, *, correction_active: bool = False, reject_rate: float = 0.0
    ) -> Tensor:
        """Loss (0-dim) with the ``reject_rate`` share of entries rejected; ``correction_active`` is ignored."""
        return self._reduce(self.loss_matrix(logits, targets, reject_rate=reject_rate))


# The single-positive losses subclass MultiLabelLoss, so their module is imported once the classes above exist.
from clml_core.losses.single_positive import (  # noqa: E402
    ANLabelSmoothingLoss,
    EntropyMaximizationLoss,
    EPRLoss,
    GRLoss,
    WeightedANLoss,
)

#: Loss classes by name. "an" (assume negative) is plain BCE on the observed labels; "an-ls", "wan", "epr", "em"
#: and "gr" are the single-positive losses of :mod:`clml_core.losses.single_positive`.
BASE_LOSSES: dict[str, type[MultiLabelLoss]] = {
    "bce": BCELoss,
    "an": BCELoss,
    "focal": FocalLoss,
    "asl": AsymmetricLoss,
    "hill": HillLoss,
    "splc": SPLCLoss,
    "ll-r": LargeLossRejection,
    "an-ls": ANLabelSmoothingLoss,
    "wan": WeightedANLoss,
    "epr": EPRLoss,
    "em": EntropyMaximizationLoss,
    "gr": GRLoss,
}


def make_base_loss(name: str, **kwargs: object) -> MultiLabelLoss:
    """Build a base loss by name with its published defaults, overridden by ``kwargs``.

    Args:
        name: one of :data:`BASE_LOSSES` ("bce", "an", "focal", "asl", "hill", "splc", "ll-r", "an-ls", "wan",
            "epr", "em", "gr").
        **kwargs: hyperparameters of that loss class, e.g. ``reduction="mean"`` or ``gamma=1.0``. A hyperparameter
            without a default (EPR's ``expected_positives``) must be given.

    Returns:
        The loss module.

    Raises:
        ValueError: for an unknown name or argument (the message lists the valid ones), a missing required
            argument, or a bad value.
    """
    if name not in BASE_LOSSES:
        raise ValueError(f"unknown base loss {name!r}; valid names: {', '.join(BASE_LOSSES)}")
    cls = BASE_LOSSES[name]
    parameters = {p: v for p, v in inspect.signature(cls.__init__).parameters.items() if p != "self"}
    accepted = list(parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"make_base_loss({name!r}): unknown argument(s) {unknown}; {cls.__name__} accepts {accepted}")
    missing = [p for p, v in parameters.items() if v.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"make_base_loss({name!r}): missing required argument(s) {missing} of {cls.__name__}")
    return cls(**kwargs)
