"""The training objective: what one step minimises, returned as named terms.

``loss = base(logits, targets) + CLML(embeddings, corrected labels)``, where

* label correction (:func:`clml_core.correction.correct_labels`) turns an unobserved label positive when its score
  passes ``tau``, from ``correction.start_epoch`` on; the corrected labels form the CLML groups, and feed the base
  loss too with ``correction.feeds_base``;
* the base loss gets its own per-epoch inputs from :class:`BaseLossInputs` (SPLC's switch, LL-R's rejection
  rate): a loss knows nothing about epochs;
* the CLML term is :class:`~clml_core.losses.CLMLLoss` on the embeddings of the whole global batch (gathered over
  DDP ranks, with gradients), or the authors' release (:class:`~clml_core.losses.authors.AuthorsCLMLLoss`), which
  gives the term alone, without its local and global parts;
* with ``reduction="sum"`` the base loss is multiplied by the number of DDP ranks, so that DDP's rank average is the
  sum over the global batch (see :mod:`clml_core.distributed`).

The objective is an ``nn.Module``: a method with state of its own (a per-image label matrix, pseudo-labels) keeps it
in buffers or parameters, which :meth:`state_dict` hands to the checkpoint and a resumed run loads back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from clml_core import distributed as dist_utils
from clml_core.correction import correct_labels
from clml_core.losses import CLMLLoss
from clml_core.models import ModelOutput


class Batch(NamedTuple):
    """One training step's batch on the device."""

    images: Tensor  # (B, 3, H, W) normalised images, or (B, F) cached features
    observed: Tensor  # (B, C) observed labels in {0, 1}, float
    index: Tensor  # (B,) rows of the training split (on the host)


@dataclass(frozen=True)
class CorrectionSchedule:
    """When label correction runs and what reads its output.

    Attributes:
        enabled: correction is on and something reads it (the CLML groups, or the base loss with ``feeds_base``).
        start_epoch: the first (0-based) epoch with correction.
        tau: the score threshold.
        quantile: None, or also above this per-class quantile of the batch's unobserved scores.
        feeds_base: the base loss sees the corrected labels too (the authors: no).
    """

    enabled: bool
    start_epoch: int
    tau: float
    quantile: float | None
    feeds_base: bool

    def active(self, epoch: int) -> bool:
        return self.enabled and epoch >= self.start_epoch


@dataclass(frozen=True)
class BaseLossInputs:
    """The base loss's per-epoch keyword inputs.

    Attributes:
        splc_start_epoch: from this epoch SPLC's own correction is on (``correction_active``; others ignore it).
        reject_rate_per_epoch: LL-R's rejection rate grows by this each epoch; None for every other loss.
    """

    splc_start_epoch: int
    reject_rate_per_epoch: float | None = None

    def at(self, epoch: int) -> dict[str, Any]:
        inputs: dict[str, Any] = {"correction_active": epoch >= self.splc_start_epoch}
        if self.reject_rate_per_epoch is not None:
            inputs["reject_rate"] = min(1.0, self.reject_rate_per_epoch * epoch)
        return inputs


class TrainingObjective(nn.Module):
    """Base loss plus the CLML term, with the correction schedule (see the module docstring).

    Args:
        base_loss: a :mod:`clml_core.losses.base` loss.
        clml_loss: :class:`CLMLLoss`, the authors' release, or None for the base loss alone.
        correction: when correction runs.
        base_inputs: the base loss's per-epoch inputs.
        base_scale: the factor of the base loss (the number of DDP ranks for a summed loss, else 1).
    """

    def __init__(
        self,
        base_loss: nn.Module,
        clml_loss: nn.Module | None,
        correction: CorrectionSchedule,
        base_inputs: BaseLossInputs,
        base_scale: int = 1,
    ) -> None:
        super().__init__()
        self.base_loss = base_loss
        self.clml_loss = clml_loss
        self.correction = correction
        self.base_inputs = base_inputs
        self.base_scale = base_scale

    def forward(self, outputs: ModelOutput, batch: Batch, epoch: int) -> dict[str, Tensor | None]:
        """The step's terms: ``loss`` (what backward runs on), ``base``, ``clml``, ``local``, ``global`` (0-dim) and
        ``corrected`` ((B, C) labels after correction; None in an epoch without correction)."""
        correction = self.correction
        correcting = correction.active(epoch)
        corrected = batch.observed
        if correcting:
            scores = outputs.logits.detach().float()
            corrected = correct_labels(
                batch.observed, scores, correction.tau, quantile=correction.quantile, check_values=False
            )
        targets = corrected if correcting and correction.feeds_base else batch.observed
        base = self.base_loss(outputs.logits.float(), targets, **self.base_inputs.at(epoch))
        if self.base_scale != 1:
            base = base * self.base_scale
        clml = local = global_ = torch.zeros((), device=batch.observed.device)
        if self.clml_loss is not None:
            # Every rank has the same batch size (the epoch drops its remainder): no all-gather of the sizes.
            embeddings = dist_utils.gather_with_grad(outputs.embeddings, equal_sizes=True)
            groups = dist_utils.gather_no_grad(corrected, equal_sizes=True)
            if isinstance(self.clml_loss, CLMLLoss):
                clml, local, global_ = self.clml_loss.terms(embeddings, groups)
            else:
                clml = self.clml_loss(embeddings.float(), groups)
        loss = base + clml if self.clml_loss is not None else base
        return {
            "loss": loss,
            "base": base,
            "clml": clml,
            "local": local,
            "global": global_,
            "corrected": corrected if correcting else None,
        }
