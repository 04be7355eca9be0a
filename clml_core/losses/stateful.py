"""Single-positive methods with state of their own: Cole et al.'s ROLE, Kim et al.'s LL-Ct and LL-Cp, Zhou et al.'s
EM + APL.

Each is an ``nn.Module`` that the training objective (:class:`~clml_core.objective.TrainingObjective`) holds in
place of a base loss: ``forward(logits (B, C), targets (B, C), index (B,), epoch)`` returns a 0-dim loss, where
``index`` are the batch's rows of the training split and ``epoch`` counts from 0. Targets are 1 for an observed
positive and 0 for an unknown label. Their state (a per-image label matrix, pseudo-labels, a learnable label
estimate) lives in buffers and parameters, so the objective's ``state_dict`` carries it into every checkpoint.
Build them by name with :func:`make_stateful_loss` (``loss.base`` = "role", "ll-ct", "ll-cp", "em-apl").

With ``p = sigmoid(logit)``, per entry (BCE(x, t) = -t log p - (1 - t) log(1 - p)):

=======  ===========================================================================================================
role     0.5 [-log p + -log g] on positives + 0.5 [BCE(f, sg(g)) + BCE(g, sg(f))] everywhere, + 0.5 [R(f) + R(g)]
         once per batch; g = sigmoid of the learnable (N, C) label estimate's rows, sg = no gradient, R = EPR's
         regulariser (:func:`~clml_core.losses.single_positive.expected_positive_penalty`)
ll-ct    BCE against the targets, except the k largest-loss unknowns of the batch, trained as positives; from the
         second epoch, k = ceil(B C t rel) at 0-based epoch t
ll-cp    as ll-ct with k = ceil(B C rel), and those k entries written as positives into the stored (N, C) label
         matrix for good, so they are observed positives from the next epoch on
em-apl   EM (-log p on positives, -alpha H(p) on unknowns), and beta BCE(p, s) on pseudo-labelled unknowns, whose
         soft target s is their p when they were chosen (:meth:`EntropyMaximizationAPL.refresh`)
=======  ===========================================================================================================

Reduction as for the stateless losses: ``reduction="mean"`` is the peers' harness value (the matrix averaged over
B * C, a regulariser added once), ``"sum"`` is B * C times it.

Where these differ from the peers' code (see each class): log-probabilities come from ``logsigmoid`` of the logits
(theirs: ``-log(p + 1e-5)``); LL selects exactly k entries (ties by ``topk`` order) and caps k at the batch's
unknowns; LL-Cp really flips (the LL repository's ``mod_scheme is 'LL-Cp'`` is always False, so its Cp runs as Ct);
APL scores the training images with the evaluation transform (theirs: the training loader, augmented and shuffled)
and counts its quota with the 6-decimal rounding LL-R uses here; ROLE's initial estimate is drawn from a generator
seeded by the run's seed (theirs: torch's unseeded global generator).
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clml_core.losses.base import REDUCTIONS, LargeLossRejection, check_number
from clml_core.losses.single_positive import binary_entropy, expected_positive_penalty

#: ROLE's initial estimate: logit(0.995) on observed positives, uniform in [logit(0.4), logit(0.6)] elsewhere
#: (Cole et al.'s ``LabelEstimator``: ``init_logit_pos = inverse_sigmoid(0.995)``, ``q = inverse_sigmoid(0.5 + 0.1)``).
ROLE_POSITIVE_INIT = 0.995
ROLE_UNKNOWN_HALF_WIDTH = 0.1


def logit(p: float) -> float:
    """log(p / (1 - p)) of a probability in (0, 1)."""
    return math.log(p / (1 - p))


def role_terms(
    logits: Tensor, estimate_logits: Tensor, targets: Tensor, expected_positives: float
) -> tuple[Tensor, Tensor]:
    """ROLE's per-entry loss and its regulariser (Cole et al., ``loss_role``).

    The classifier f and the label estimate g each fit the other's detached output, and both fit the observed
    positives and the expected label count k.

    Args:
        logits: (B, C) classifier logits.
        estimate_logits: (B, C) the label estimate's logits of the batch's images.
        targets: (B, C) bool, observed positives.
        expected_positives: k > 0.

    Returns:
        The (B, C) matrix ``0.5 (pos_f + pos_g) + 0.5 (BCE(f, sg(g)) + BCE(g, sg(f)))`` and the 0-dim
        ``0.5 (R(f) + R(g))``, in the dtype of the wider input (float32 at least).
    """
    dtype = torch.promote_types(torch.promote_types(logits.dtype, estimate_logits.dtype), torch.float32)
    logits, estimate_logits = logits.to(dtype), estimate_logits.to(dtype)
    f, g = torch.sigmoid(logits), torch.sigmoid(estimate_logits)
    positive = torch.where(targets, -F.logsigmoid(logits) - F.logsigmoid(estimate_logits), 0.0)
    cross_f = F.binary_cross_entropy_with_logits(logits, g.detach(), reduction="none")
    cross_g = F.binary_cross_entropy_with_logits(estimate_logits, f.detach(), reduction="none")
    matrix = 0.5 * positive + 0.5 * (cross_f + cross_g)
    penalty = 0.5 * (
        expected_positive_penalty(f, expected_positives) + expected_positive_penalty(g, expected_positives)
    )
    return matrix, penalty


def corrected_bce(logits: Tensor, targets: Tensor, selected: Tensor) -> Tensor:
    """LL-Ct/Cp's per-entry loss: BCE against the targets with the ``selected`` unknowns turned positive, (B, C)."""
    return F.binary_cross_entropy_with_logits(logits, (targets | selected).to(logits.dtype), reduction="none")


def apl_quota(unknown_per_class: Tensor, neg_proportion: float, num_epochs: int, warmup: int) -> Tensor:
    """APL's pseudo-negatives per class and refresh, ``floor(neg_proportion U_c / (E - W))``, (C,) int64.

    The quotient is rounded to 6 decimals before the floor (as LL-R's k here), so 0.7 * 90 / 7 (8.999999999999998
    in floating point) gives 9, not 8; Zhou et al.'s ``int()`` floors the float.
    """
    quota = [math.floor(round(neg_proportion * int(u) / (num_epochs - warmup), 6)) for u in unknown_per_class]
    return torch.tensor(quota, dtype=torch.int64)


def apl_select(scores: Tensor, candidates: Tensor, quota: Tensor) -> Tensor:
    """Per class, the ``quota[c]`` candidates with the lowest score (all of them when fewer), ties by row.

    Args:
        scores: (N, C) probabilities.
        candidates: (N, C) bool, the entries that may be chosen (unknown and not yet pseudo-labelled).
        quota: (C,) integers >= 0.

    Returns:
        (N, C) bool, the chosen entries.
    """
    masked = torch.where(candidates, scores.to(torch.float64), math.inf)
    order = torch.sort(masked, dim=0, stable=True).indices  # (N, C) rows by rising score, candidates first
    ranks = torch.empty_like(order)
    rows = torch.arange(len(scores), device=scores.device).unsqueeze(1).expand_as(order)
    ranks.scatter_(0, order, rows)  # ranks[n, c]: the place of row n in class c's order
    return candidates & (ranks < quota.to(scores.device).unsqueeze(0))


def _check_observed(owner: str, observed: Tensor) -> Tensor:
    """The observed training labels as a bool (N, C) tensor, or ValueError."""
    observed = torch.as_tensor(observed)
    if observed.dim() != 2 or observed.numel() == 0:
        raise ValueError(f"{owner}: observed must be a non-empty (N, C) matrix, got shape {tuple(observed.shape)}")
    if observed.dtype != torch.bool and not bool(((observed == 0) | (observed == 1)).all()):
        raise ValueError(f"{owner}: observed labels must be in {{0, 1}}")
    return observed.bool()


class StatefulLoss(nn.Module, abc.ABC):
    """What the stateful methods share: input checks, the reduction, and the epoch-start hook.

    Args:
        observed: (N, C) observed training labels in {0, 1}, rows in the order ``index`` refers to.
        reduction: "sum" (default) or "mean" over B * C (the harness's value).
    """

    def __init__(self, observed: Tensor, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"{type(self).__name__}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.num_samples, self.num_classes = _check_observed(type(self).__name__, observed).shape

    def _prepare(self, logits: Tensor, targets: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Logits in float32 or wider (B, C), bool targets (B, C) and the index (B,) on the logits' device."""
        name = type(self).__name__
        if logits.dim() != 2 or logits.shape != targets.shape or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{name}: logits and targets must both be (B, C={self.num_classes}), got {tuple(logits.shape)} and "
                f"{tuple(targets.shape)}"
            )
        if index.shape != (logits.shape[0],):
            raise ValueError(f"{name}: index must be (B={logits.shape[0]},), got {tuple(index.shape)}")
        index = index.to(logits.device, torch.int64)
        return logits.to(torch.promote_types(logits.dtype, torch.float32)), targets.bool(), index

    def _reduce(self, matrix: Tensor, penalty: Tensor | None = None) -> Tensor:
        """The matrix averaged (or summed), plus a per-batch regulariser once (B * C times under "sum")."""
        loss = matrix.mean() if self.reduction == "mean" else matrix.sum()
        if penalty is None:
            return loss
        return loss + (penalty if self.reduction == "mean" else matrix.numel() * penalty)

    @abc.abstractmethod
    def forward(self, logits: Tensor, targets: Tensor, index: Tensor, epoch: int) -> Tensor:
        """Loss (0-dim) of logits (B, C) against targets (B, C) of training rows ``index`` (B,) at ``epoch``."""

    def wants_scores(self, epoch: int) -> bool:
        """Whether :meth:`refresh` needs the training images' scores at the start of ``epoch`` (0-based)."""
        return False

    def refresh(self, epoch: int, scores: Tensor) -> None:
        """Update the state at the start of ``epoch`` from the scores (N, C) of every training image."""

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, num_classes={self.num_classes}, reduction={self.reduction!r}"


class RoleLoss(StatefulLoss):
    """ROLE, regularised online label estimation (Cole et al., CVPR 2021, ``loss_role`` and ``LabelEstimator``).

    A learnable (N, C) matrix of label logits (``estimate_logits``, an ``nn.Parameter``) is initialised at
    logit(0.995) on observed positives and uniformly in [logit(0.4), logit(0.6)] elsewhere, drawn from a generator
    seeded with ``seed``; the training run gives it its own learning rate (Cole: 10 times the classifier's,
    ``loss.estimator_lr_mult``). The loss is :func:`role_terms` of the batch's rows.

    Args:
        observed: (N, C) observed training labels.
        expected_positives: k > 0, the expected number of positives per image (privileged: the true mean label
            count; Cole: VOC 1.5, COCO 2.9, NUS-WIDE 1.9).
        seed: seeds the initial estimate.
        reduction: "sum" (default) or "mean" over B * C.
    """

    def __init__(self, observed: Tensor, expected_positives: float, seed: int = 0, reduction: str = "sum") -> None:
        super().__init__(observed, reduction)
        check_number("RoleLoss", "expected_positives", expected_positives, 0.0, open_low=True)
        self.expected_positives = float(expected_positives)
        positives = _check_observed("RoleLoss", observed)
        generator = torch.Generator().manual_seed(int(seed))
        half_width = logit(0.5 + ROLE_UNKNOWN_HALF_WIDTH)  # logit(0.6) = -logit(0.4)
        start = half_width * (2 * torch.rand(positives.shape, generator=generator) - 1)
        start[positives] = logit(ROLE_POSITIVE_INIT)
        self.estimate_logits = nn.Parameter(start)  # (N, C) float32

    def forward(self, logits: Tensor, targets: Tensor, index: Tensor, epoch: int) -> Tensor:
        logits, targets, index = self._prepare(logits, targets, index)
        matrix, penalty = role_terms(logits, self.estimate_logits[index], targets, self.expected_positives)
        return self._reduce(matrix, penalty)

    def extra_repr(self) -> str:
        return f"expected_positives={self.expected_positives}, " + super().extra_repr()


class LargeLossCorrection(StatefulLoss):
    """LL-Ct and LL-Cp, large-loss correction (Kim et al., "Large Loss Matters in Weakly Supervised Multi-Label
    Classification", CVPR 2022).

    BCE (assume negative), except that from the second epoch (0-based ``epoch >= 1``) the k unknown entries of the
    batch with the largest BCE are trained as positives (:func:`corrected_bce`):

    * Ct (temporary, ``permanent=False``): ``k = ceil(B C min(1, rate_per_epoch * epoch))``, growing each epoch;
    * Cp (permanent): ``k = ceil(B C rate_per_epoch)``, and the k entries are written as positives into the stored
      label matrix (``labels``, (N, C) bool, part of the state), so they are observed positives from then on. An
      image is drawn once per epoch, so a flip acts from the next epoch, as in LL's code with its loader workers.

    The entries are chosen as :class:`~clml_core.losses.base.LargeLossRejection` chooses them (exactly k, ties by
    ``topk`` order, at most the batch's unknowns, ``rate * B * C`` rounded to 6 decimals before the ceiling). LL's
    code flips only the entries strictly above the k-th loss (``unobserved_loss > topk_lossvalue``: with k = 1,
    none) and, through its ``mod_scheme is 'LL-Cp'`` test, never flips at all; ours flips the k entries it corrects.
    Its Ct rate is ``1 - clean_rate`` accumulated by float subtraction; ours is ``rate_per_epoch * epoch``.

    Args:
        observed: (N, C) observed training labels (the starting label matrix of Cp).
        rate_per_epoch: LL's ``delta_rel`` as a share in [0, 1] (their 0.2 % is 0.002).
        permanent: Cp (True) or Ct (False).
        reduction: "sum" (default) or "mean" over B * C.
    """

    def __init__(
        self, observed: Tensor, rate_per_epoch: float, permanent: bool = False, reduction: str = "sum"
    ) -> None:
        super().__init__(observed, reduction)
        check_number("LargeLossCorrection", "rate_per_epoch", rate_per_epoch, 0.0, 1.0)
        self.rate_per_epoch = float(rate_per_epoch)
        self.permanent = bool(permanent)
        self.selector = LargeLossRejection(check_values=False)
        if self.permanent:
            self.register_buffer("labels", _check_observed("LargeLossCorrection", observed).clone())

    def correction_rate(self, epoch: int) -> float:
        """The share of the B * C entries corrected at ``epoch`` (0 in the first epoch)."""
        if epoch < 1:
            return 0.0
        return self.rate_per_epoch if self.permanent else min(1.0, self.rate_per_epoch * epoch)

    def forward(self, logits: Tensor, targets: Tensor, index: Tensor, epoch: int) -> Tensor:
        logits, targets, index = self._prepare(logits, targets, index)
        if self.permanent:
            targets = targets | self.labels[index]
        selected = self.selector.rejection_mask(logits, targets, self.correction_rate(epoch))  # (B, C)
        if self.permanent:
            self.labels[index] |= selected
        return self._reduce(corrected_bce(logits, targets, selected))

    def extra_repr(self) -> str:
        return f"rate_per_epoch={self.rate_per_epoch}, permanent={self.permanent}, " + super().extra_repr()


class EntropyMaximizationAPL(StatefulLoss):
    """EM + APL, entropy maximisation with asymmetric pseudo-labelling (Zhou et al., ECCV 2022, ``loss_EM_APL``
    and ``aysmmetric_pseudo_labeling``).

    The loss is EM's (``-log p`` on positives, ``-alpha H(p)`` on unknowns), except on pseudo-labelled unknowns:
    ``beta BCE(p, s)`` with s their stored soft target. At the start of each epoch t with ``warmup <= t <
    num_epochs`` the engine scores every training image (evaluation transform, current model in eval mode) and
    :meth:`refresh` takes, per class c, the ``floor(neg_proportion U_c / (num_epochs - warmup))`` lowest-scored
    entries among the unknowns not yet pseudo-labelled (U_c: the unknowns of class c at the start), and stores
    s = their p then. So ``num_epochs - warmup`` refreshes take at most ``neg_proportion`` of the unknowns.

    Zhou et al. refresh at the end of their 1-based epochs warmup..E, the same model states as the starts of our
    0-based epochs warmup..E-1 (their last refresh acts on no epoch), but score with the training loader (its
    random flip, shuffled) where ours uses the evaluation transform, as the issue defines it; their argsort breaks
    ties arbitrarily, ours by row.

    Args:
        observed: (N, C) observed training labels.
        num_epochs: E, the run's epochs.
        alpha: EM's entropy weight, >= 0 (Zhou et al.: VOC 0.2, COCO 0.1, NUS-WIDE 0.1; default 0.1, the ``em``
            loss's).
        beta: weight of the pseudo-labelled entries, >= 0 (VOC 0.02, COCO 0.9, NUS-WIDE 0.2; default 0.2).
        warmup: W, epochs of EM alone, in [0, E) (VOC 5, COCO 5, NUS-WIDE 4 of 10); None: E // 2.
        neg_proportion: the share of the unknowns pseudo-labelled over the run, in [0, 1] (Zhou et al.: 0.9).
        reduction: "sum" (default) or "mean" over B * C.
    """

    def __init__(
        self,
        observed: Tensor,
        num_epochs: int,
        alpha: float = 0.1,
        beta: float = 0.2,
        warmup: int | None = None,
        neg_proportion: float = 0.9,
        reduction: str = "sum",
    ) -> None:
        super().__init__(observed, reduction)
        warmup = num_epochs // 2 if warmup is None else warmup
        for name, value, low in (("num_epochs", num_epochs, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"EntropyMaximizationAPL: {name} must be an integer >= {low}, got {value!r}")
        if warmup >= num_epochs:
            raise ValueError(f"EntropyMaximizationAPL: warmup ({warmup}) must be < the run's epochs ({num_epochs})")
        check_number("EntropyMaximizationAPL", "alpha", alpha, 0.0)
        check_number("EntropyMaximizationAPL", "beta", beta, 0.0)
        check_number("EntropyMaximizationAPL", "neg_proportion", neg_proportion, 0.0, 1.0)
        self.num_epochs, self.warmup = int(num_epochs), int(warmup)
        self.alpha, self.beta, self.neg_proportion = float(alpha), float(beta), float(neg_proportion)
        unknown = ~_check_observed("EntropyMaximizationAPL", observed)
        self.register_buffer("unknown", unknown.clone(), persistent=False)  # rebuilt from the data on resume
        quota = apl_quota(unknown.sum(0), self.neg_proportion, self.num_epochs, self.warmup)
        self.register_buffer("quota", quota, persistent=False)  # (C,) pseudo-labels per class and refresh
        self.register_buffer("pseudo", torch.zeros_like(unknown))  # (N, C) bool
        self.register_buffer("soft", torch.zeros(unknown.shape))  # (N, C) float32 soft targets
        self.register_buffer("refreshed", torch.tensor(-1))  # the epoch of the last refresh

    def matrix(self, logits: Tensor, targets: Tensor, pseudo: Tensor, soft: Tensor) -> Tensor:
        """The per-entry loss (B, C) of logits against bool targets, pseudo-label mask and soft targets."""
        unknown = torch.where(
            pseudo,
            self.beta * F.binary_cross_entropy_with_logits(logits, soft.to(logits.dtype), reduction="none"),
            -self.alpha * binary_entropy(logits),
        )
        return torch.where(targets, -F.logsigmoid(logits), unknown)

    def forward(self, logits: Tensor, targets: Tensor, index: Tensor, epoch: int) -> Tensor:
        logits, targets, index = self._prepare(logits, targets, index)
        return self._reduce(self.matrix(logits, targets, self.pseudo[index], self.soft[index]))

    def wants_scores(self, epoch: int) -> bool:
        return self.warmup <= epoch < self.num_epochs and int(self.refreshed) < epoch

    @torch.no_grad()
    def refresh(self, epoch: int, scores: Tensor) -> None:
        """Pseudo-label this epoch's quota from the scores (N, C) of every training image (once per epoch)."""
        if not self.wants_scores(epoch):
            return
        if scores.shape != self.unknown.shape:
            raise ValueError(f"EntropyMaximizationAPL: scores must be {tuple(self.unknown.shape)}, got {scores.shape}")
        scores = scores.to(self.soft.device, torch.float32)
        chosen = apl_select(scores, self.unknown & ~self.pseudo, self.quota)
        self.soft[chosen] = scores[chosen]
        self.pseudo |= chosen
        self.refreshed.fill_(epoch)

    def extra_repr(self) -> str:
        return (
            f"num_epochs={self.num_epochs}, warmup={self.warmup}, alpha={self.alpha}, beta={self.beta}, "
            f"neg_proportion={self.neg_proportion}, " + super().extra_repr()
        )


@dataclass(frozen=True)
class MethodContext:
    """What a stateful method reads of its run besides its hyperparameters.

    Attributes:
        observed: (N, C) observed labels of the training split, in row order.
        num_epochs: the run's epochs (EM + APL's E).
        seed: the run's seed (ROLE's initial estimate).
        rate_per_epoch: LL's ``delta_rel`` as a share (config field loss.llr_rate_per_epoch).
        mean_label_count: the training split's true mean number of positives per image: ROLE's k unless its
            ``expected_positives`` is given (privileged information, as Cole's per-dataset constants are).
    """

    observed: Tensor
    num_epochs: int
    seed: int = 0
    rate_per_epoch: float = 0.0
    mean_label_count: float = 1.0


def _build_role(context: MethodContext, **kwargs: Any) -> StatefulLoss:
    kwargs.setdefault("expected_positives", context.mean_label_count)
    return RoleLoss(context.observed, seed=context.seed, **kwargs)


def _build_ll(permanent: bool):
    def build(context: MethodContext, **kwargs: Any) -> StatefulLoss:
        return LargeLossCorrection(context.observed, context.rate_per_epoch, permanent=permanent, **kwargs)

    return build


def _build_em_apl(context: MethodContext, **kwargs: Any) -> StatefulLoss:
    return EntropyMaximizationAPL(context.observed, context.num_epochs, **kwargs)


#: The stateful methods by ``loss.base`` name: (class, builder from a context and keyword hyperparameters).
STATEFUL_LOSSES: dict[str, tuple[type[StatefulLoss], Any]] = {
    "role": (RoleLoss, _build_role),
    "ll-ct": (LargeLossCorrection, _build_ll(permanent=False)),
    "ll-cp": (LargeLossCorrection, _build_ll(permanent=True)),
    "em-apl": (EntropyMaximizationAPL, _build_em_apl),
}
#: Constructor arguments a context supplies (not keyword hyperparameters of ``loss.kwargs``).
_FROM_CONTEXT = {"self", "observed", "num_epochs", "seed", "rate_per_epoch", "permanent"}


def make_stateful_loss(name: str, context: MethodContext, **kwargs: Any) -> StatefulLoss:
    """Build the stateful method ``name`` (a key of :data:`STATEFUL_LOSSES`) for a run.

    Args:
        name: "role", "ll-ct", "ll-cp" or "em-apl".
        context: what the method reads of its run.
        **kwargs: its hyperparameters (e.g. ``reduction="mean"``, ``expected_positives=1.5``, ``beta=0.02``).

    Raises:
        ValueError: an unknown name or argument (the message lists the valid ones), or a bad value.
    """
    if name not in STATEFUL_LOSSES:
        raise ValueError(f"unknown stateful loss {name!r}; valid names: {', '.join(STATEFUL_LOSSES)}")
    cls, build = STATEFUL_LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in _FROM_CONTEXT]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"make_stateful_loss({name!r}): unknown argument(s) {unknown}; {cls.__name__} accepts {accepted}"
        )
    return build(context, **kwargs)
