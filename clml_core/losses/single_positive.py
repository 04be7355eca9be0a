"""Single-positive losses: Cole et al.'s AN-LS, WAN and EPR, Zhou et al.'s EM, and Chen et al.'s GR-Loss.

Every loss is a :class:`~clml_core.losses.base.MultiLabelLoss`: ``forward(logits (B, C), targets (B, C), *,
correction_active=False)`` returns a 0-dim tensor, targets are 1 for an observed positive and 0 for an unknown label,
and :meth:`loss_matrix` gives the (B, C) per-entry loss. Build them by name with
:func:`~clml_core.losses.base.make_base_loss` ("an-ls", "wan", "epr", "em", "gr"). With ``p = sigmoid(logit)``:

=========  ===============================  ====================================================================
name       observed positive                unknown
=========  ===============================  ====================================================================
an-ls      (1-e)(-log p) + e(-log(1-p))     (1-e)(-log(1-p)) + e(-log p)
wan        -log p                           -log(1-p) / (C-1)
epr        -log p                           0, plus (mean over the batch of sum_c p - k)^2 / C^2 once per batch
em         -log p                           -alpha H(p), H(p) = -p log p - (1-p) log(1-p) (entropy, in nats)
gr         -log p                           V(p) [K(p)(1 - p^q2)/q2 + (1 - K(p))(1 - (1-p)^q3)/q3]
=========  ===============================  ====================================================================

GR-Loss's K(p) = sigmoid(w p + b) and V(p) = exp(-(p - mu)^2 / (2 sigma^2)) are evaluated on the detached p, as in
Chen et al.'s code (``K = k_function(preds.detach())``): no gradient flows through them. Their training loop moves
(w, b) and (mu, sigma) linearly over the epochs; :func:`gr_schedule` gives the values of an epoch and the loop
passes them per call (``loss(logits, targets, k=(w, b), v=(mu, sigma))``), so the loss knows nothing of epochs.

Reduction. ``reduction="mean"`` is the value of the peers' harness (Cole et al.'s ``compute_batch_loss``, copied
by LL, EM and GR-Loss): the (B, C) matrix divided by B * C and summed, plus EPR's regulariser once.
``reduction="sum"`` is B * C times that (the matrix summed plus B * C times the regulariser), so the balance
between the terms is the authors' under either reduction.

Precision. The authors compute ``-log(p + 1e-5)`` (Cole, Zhou; ``1e-7`` in GR-Loss) from probabilities; here every
log-probability comes from ``logsigmoid`` of the logits, without that epsilon, so large logits neither overflow
nor saturate. The two differ by ``log(1 + 1e-5 / p)``: under 2e-5 where p >= 0.5, growing as p falls. The losses
are computed in float32, or float64 for float64 logits (also under autocast, as the base losses).

Bad input (shapes, targets outside {0, 1}, hyperparameters) raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from clml_core.losses.base import MultiLabelLoss, check_number

#: GR-Loss's (w, b) of K at the first and the last epoch (``--beta [w0, wT, b0, bT] = [0, 2, -2, -2]`` in
#: Chen et al.'s ``config.py``).
GR_K_START: tuple[float, float] = (0.0, -2.0)
GR_K_END: tuple[float, float] = (2.0, -2.0)
#: GR-Loss's (mu, sigma) of V at the first and the last epoch (``--alpha [mu0, sigma0, muT, sigmaT] =
#: [0.5, 2, 0.8, 0.5]``).
GR_V_START: tuple[float, float] = (0.5, 2.0)
GR_V_END: tuple[float, float] = (0.8, 0.5)
#: GR-Loss's exponents (q2, q3) (``--q2q3 [0.01, 1]``).
GR_Q: tuple[float, float] = (0.01, 1.0)


def expected_positive_penalty(probs: Tensor, expected_positives: float) -> Tensor:
    """Cole et al.'s expected-positive regulariser, ``(mean_b sum_c probs[b, c] - k)^2 / C^2``.

    The squared gap between the batch's mean predicted label count and the expected count k, divided by C^2 as
    their ``loss_epr`` and ``loss_role`` divide it. ROLE applies it to the classifier's and to the label
    estimator's probabilities.

    Args:
        probs: (B, C) probabilities in [0, 1].
        expected_positives: k, the expected number of positives per image (> 0).

    Returns:
        0-dim tensor, same dtype as ``probs``.
    """
    num_classes = probs.shape[1]
    return (probs.sum(dim=1).mean() - expected_positives) ** 2 / num_classes**2


def binary_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(sigmoid(logits)), ``-p log p - (1 - p) log(1 - p)``, per entry.

    Computed as ``p softplus(-x) + (1 - p) softplus(x)`` with ``1 - p = sigmoid(-x)``: no log of 0, no
    cancellation, 0 (not NaN) in the far tails, log 2 at x = 0.

    Args:
        logits: (B, C) floating point.

    Returns:
        (B, C), same dtype as ``logits``.
    """
    return torch.sigmoid(logits) * F.softplus(-logits) + torch.sigmoid(-logits) * F.softplus(logits)


def _check_pair(owner: str, name: str, pair: object) -> tuple[float, float]:
    """A pair of finite real numbers as a tuple of floats, or ValueError naming the argument."""
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    ok = ok and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in pair)
    if not ok:
        raise ValueError(f"{owner}: {name} must be a pair of finite numbers, got {pair!r}")
    return float(pair[0]), float(pair[1])


class ANLabelSmoothingLoss(MultiLabelLoss):
    """AN-LS, assume negative with label smoothing (Cole et al., CVPR 2021, ``loss_an_ls``).

    BCE against the smoothed targets 1 - e (observed positive) and e (unknown), per entry
    ``(1-e)(-log p) + e(-log(1-p))`` and ``(1-e)(-log(1-p)) + e(-log p)``.

    Args:
        epsilon: smoothing e in [0, 0.5] (Cole's ``ls_coef``, 0.1); 0 gives AN.
        reduction: "sum" (default) or "mean" over B * C (the harness's value).
        check_values: check that targets are in {0, 1}.
    """

    def __init__(self, epsilon: float = 0.1, reduction: str = "sum", check_values: bool = True) -> None:
        super().__init__(reduction, check_values)
        check_number("ANLabelSmoothingLoss", "epsilon", epsilon, 0.0, 0.5)
        self.epsilon = epsilon

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        nll_pos, nll_neg = -F.logsigmoid(logits), -F.logsigmoid(-logits)  # -log p, -log(1 - p)
        e = self.epsilon
        return torch.where(targets, (1 - e) * nll_pos + e * nll_neg, (1 - e) * nll_neg + e * nll_pos)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, " + super().extra_repr()


class WeightedANLoss(MultiLabelLoss):
    """WAN, weighted assume negative (Cole et al., ``loss_wan``): unknowns' ``-log(1-p)`` weighted 1 / (C - 1).

    C is the number of classes, the width of the logits (Cole's ``P['num_classes']``), so it needs C >= 2.

    Args:
        reduction: "sum" (default) or "mean" over B * C (the harness's value).
        check_values: check that targets are in {0, 1}.
    """

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        num_classes = logits.shape[1]
        if num_classes < 2:
            raise ValueError("WeightedANLoss: needs C >= 2 classes (it weights unknowns by 1/(C-1)), got C = 1")
        return torch.where(targets, -F.logsigmoid(logits), -F.logsigmoid(-logits) / (num_classes - 1))


class EPRLoss(MultiLabelLoss):
    """EPR, expected positive regularisation (Cole et al., ``loss_epr``).

    ``-log p`` on observed positives, nothing on unknowns, plus :func:`expected_positive_penalty` of the batch's
    probabilities, added once per batch: "mean" gives ``matrix.mean() + penalty`` (the harness's value), "sum"
    gives ``matrix.sum() + B * C * penalty``. :meth:`loss_matrix` is the matrix alone; :meth:`penalty` the rest.

    k is the true mean label count of the training images (Cole's ``expected_num_pos``: VOC 1.5, COCO 2.9 in their
    latest ``train.py``, 2.5 in its first version, NUS-WIDE 1.9, CUB 31.4): information a single-positive learner
    does not have. It has no default, so every use names it.

    Args:
        expected_positives: k > 0.
        reduction: "sum" (default) or "mean" over B * C (the harness's value).
        check_values: check that targets are in {0, 1}.
    """

    def __init__(self, expected_positives: float, reduction: str = "sum", check_values: bool = True) -> None:
        super().__init__(reduction, check_values)
        check_number("EPRLoss", "expected_positives", expected_positives, 0.0, open_low=True)
        self.expected_positives = expected_positives

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        return torch.where(targets, -F.logsigmoid(logits), torch.zeros_like(logits))

    def penalty(self, logits: Tensor) -> Tensor:
        """The regulariser (0-dim) of logits (B, C), in float32 or wider; see :func:`expected_positive_penalty`."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return expected_positive_penalty(torch.sigmoid(logits), self.expected_positives)

    def forward(self, logits: Tensor, targets: Tensor, *, correction_active: bool = False) -> Tensor:
        """Loss (0-dim): the matrix reduced, plus the regulariser once (times B * C under "sum")."""
        matrix = self.loss_matrix(logits, targets)
        penalty = self.penalty(logits)
        if self.reduction == "mean":
            return matrix.mean() + penalty
        return matrix.sum() + matrix.numel() * penalty

    def extra_repr(self) -> str:
        return f"expected_positives={self.expected_positives}, " + super().extra_repr()


class EntropyMaximizationLoss(MultiLabelLoss):
    """EM, entropy maximisation (Zhou et al., "Acknowledging the Unknown for Multi-label Learning with Single
    Positive Labels", ECCV 2022, ``loss_EM``): ``-log p`` on observed positives, ``-alpha H(p)`` on unknowns.

    Minimising ``-alpha H(p)`` pushes unknown predictions towards p = 1/2 rather than towards 0; the loss of an
    unknown is negative, at least ``-alpha log 2``. Their alpha: VOC 0.2, COCO 0.1, NUS-WIDE 0.1, CUB 0.01
    (``train.py``); the default is 0.1.

    Args:
        alpha: weight of the entropy term, >= 0.
        reduction: "sum" (default) or "mean" over B * C (the harness's value).
        check_values: check that targets are in {0, 1}.
    """

    def __init__(self, alpha: float = 0.1, reduction: str = "sum", check_values: bool = True) -> None:
        super().__init__(reduction, check_values)
        check_number("EntropyMaximizationLoss", "alpha", alpha, 0.0)
        self.alpha = alpha

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        return torch.where(targets, -F.logsigmoid(logits), -self.alpha * binary_entropy(logits))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, " + super().extra_repr()


class GRSchedule(NamedTuple):
    """GR-Loss's scalars for one epoch: K's (w, b) and V's (mu, sigma)."""

    w: float
    b: float
    mu: float
    sigma: float

    def loss_kwargs(self) -> dict[str, tuple[float, float]]:
        """The keyword arguments of :meth:`GRLoss.forward` for this epoch, ``{"k": (w, b), "v": (mu, sigma)}``."""
        return {"k": (self.w, self.b), "v": (self.mu, self.sigma)}


def gr_schedule(
    epoch: int,
    num_epochs: int,
    *,
    linear_init_epochs: int = 0,
    k_start: tuple[float, float] = GR_K_START,
    k_end: tuple[float, float] = GR_K_END,
    v_start: tuple[float, float] = GR_V_START,
    v_end: tuple[float, float] = GR_V_END,
) -> GRSchedule:
    """GR-Loss's (w, b, mu, sigma) at an epoch, moved as Chen et al.'s ``train.py`` moves them.

    With their 1-based epoch ``e = epoch + 1``, ``T = num_epochs`` and ``n = linear_init_epochs``::

        (w, b)      = start + (end - start) * max(e - n - 1, 0) / (T - n)
        (mu, sigma) = start + (end - start) * max(e - n, 0) / (T - n)

    so (w, b) moves one epoch later than (mu, sigma): at the first epoch (n = 0) (w, b) is at its start but
    (mu, sigma) is already one step along, and at the last epoch (mu, sigma) reaches its end while w reaches only
    ``w0 + (wT - w0)(T - n - 1)/(T - n)``. During the n linear-initialisation epochs both stay at their start.

    Args:
        epoch: the epoch, counted from 0, in [0, num_epochs).
        num_epochs: T, the run's number of epochs (>= 1).
        linear_init_epochs: n, epochs of linear initialisation before the schedule starts, in [0, num_epochs).
        k_start, k_end: (w, b) at the start and the end.
        v_start, v_end: (mu, sigma) at the start and the end; sigma > 0 at both.

    Returns:
        The epoch's :class:`GRSchedule`.
    """
    for name, value, low in (("num_epochs", num_epochs, 1), ("linear_init_epochs", linear_init_epochs, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"gr_schedule: {name} must be an integer >= {low}, got {value!r}")
    if linear_init_epochs >= num_epochs:
        raise ValueError(f"gr_schedule: linear_init_epochs ({linear_init_epochs}) must be < num_epochs ({num_epochs})")
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or not 0 <= epoch < num_epochs:
        raise ValueError(f"gr_schedule: epoch must be an integer in [0, {num_epochs}), got {epoch!r}")
    k0, k1 = _check_pair("gr_schedule", "k_start", k_start), _check_pair("gr_schedule", "k_end", k_end)
    v0, v1 = _check_pair("gr_schedule", "v_start", v_start), _check_pair("gr_schedule", "v_end", v_end)
    if not (v0[1] > 0 and v1[1] > 0):
        raise ValueError(f"gr_schedule: sigma must be > 0 in v_start and v_end, got {v_start!r} and {v_end!r}")
    e, span = epoch + 1, num_epochs - linear_init_epochs
    k_step = max(e - linear_init_epochs - 1, 0) / span
    v_step = max(e - linear_init_epochs, 0) / span
    return GRSchedule(
        w=k0[0] + (k1[0] - k0[0]) * k_step,
        b=k0[1] + (k1[1] - k0[1]) * k_step,
        mu=v0[0] + (v1[0] - v0[0]) * v_step,
        sigma=v0[1] + (v1[1] - v0[1]) * v_step,
    )


class GRLoss(MultiLabelLoss):
    """GR-Loss, generalized robust loss (Chen et al., "Boosting Single Positive Multi-label Classification with
    Generalized Robust Loss", IJCAI 2024, ``GR_loss``).

    Per entry, with p = sigmoid(logit) and K, V evaluated on the detached p::

        observed positive: -log p
        unknown:           V(p) [K(p) (1 - p^q2)/q2 + (1 - K(p)) (1 - (1-p)^q3)/q3]
        K(p) = sigmoid(w p + b),   V(p) = exp(-(p - mu)^2 / (2 sigma^2))

    K weighs the unknown between a pseudo-positive term (small when p is near 1) and a negative term (GCE-like,
    small when p is near 0); V down-weights unknowns far from mu. The constructor's ``k`` and ``v`` are used unless
    a call passes its own (the training loop passes :func:`gr_schedule`'s values each epoch). Defaults are the
    schedule's start values and Chen et al.'s q.

    Args:
        k: (w, b) of K.
        v: (mu, sigma) of V, sigma > 0.
        q: (q2, q3), both > 0.
        reduction: "sum" (default) or "mean" over B * C (the harness's value).
        check_values: check that targets are in {0, 1}.
    """

    def __init__(
        self,
        k: tuple[float, float] = GR_K_START,
        v: tuple[float, float] = GR_V_START,
        q: tuple[float, float] = GR_Q,
        reduction: str = "sum",
        check_values: bool = True,
    ) -> None:
        super().__init__(reduction, check_values)
        self.k = self._check_k(k)
        self.v = self._check_v(v)
        self.q = _check_pair("GRLoss", "q", q)
        if not (self.q[0] > 0 and self.q[1] > 0):
            raise ValueError(f"GRLoss: q = (q2, q3) must both be > 0, got {q!r}")

    @staticmethod
    def _check_k(k: object) -> tuple[float, float]:
        return _check_pair("GRLoss", "k", k)

    @staticmethod
    def _check_v(v: object) -> tuple[float, float]:
        mu, sigma = _check_pair("GRLoss", "v", v)
        if not sigma > 0:
            raise ValueError(f"GRLoss: v = (mu, sigma) needs sigma > 0, got {v!r}")
        return mu, sigma

    def _gr_matrix(self, logits: Tensor, targets: Tensor, k: tuple[float, float], v: tuple[float, float]) -> Tensor:
        (w, b), (mu, sigma), (q2, q3) = k, v, self.q
        p = torch.sigmoid(logits.detach())
        weight_k = torch.sigmoid(w * p + b)
        weight_v = torch.exp(-((p - mu) ** 2) / (2 * sigma**2))
        # p^q2 = exp(q2 log p) and (1 - p)^q3 = exp(q3 log(1 - p)), from logsigmoid: finite gradients at p = 0 or 1.
        pseudo_positive = (1 - torch.exp(q2 * F.logsigmoid(logits))) / q2
        negative = (1 - torch.exp(q3 * F.logsigmoid(-logits))) / q3
        unknown = weight_v * (weight_k * pseudo_positive + (1 - weight_k) * negative)
        return torch.where(targets, -F.logsigmoid(logits), unknown)

    def _matrix(self, logits: Tensor, targets: Tensor, correction_active: bool) -> Tensor:
        return self._gr_matrix(logits, targets, self.k, self.v)

    def loss_matrix(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        correction_active: bool = False,
        k: tuple[float, float] | None = None,
        v: tuple[float, float] | None = None,
    ) -> Tensor:
        """Per-entry loss (B, C), with this call's ``k = (w, b)`` and ``v = (mu, sigma)`` when given."""
        k = self.k if k is None else self._check_k(k)
        v = self.v if v is None else self._check_v(v)
        logits, targets = self._prepare(logits, targets)
        return self._gr_matrix(logits, targets, k, v)

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        *,
        correction_active: bool = False,
        k: tuple[float, float] | None = None,
        v: tuple[float, float] | None = None,
    ) -> Tensor:
        """Loss (0-dim); ``k`` and ``v`` as in :meth:`loss_matrix`, ``correction_active`` is ignored."""
        return self._reduce(self.loss_matrix(logits, targets, k=k, v=v))

    def extra_repr(self) -> str:
        return f"k={self.k}, v={self.v}, q={self.q}, " + super().extra_repr()
