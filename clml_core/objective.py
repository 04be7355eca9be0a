"""The training objective: what one step minimises, returned as named terms.

``loss = base(logits, targets) + CLML(embeddings, corrected labels)``, where

* label correction (:func:`clml_core.correction.correct_labels`) turns an unobserved label positive when its score
  passes ``tau``, from ``correction.start_epoch`` on; the corrected labels form the CLML groups, and feed the base
  loss too with ``correction.feeds_base``;
* the base loss gets its own per-epoch inputs from :class:`BaseLossInputs` (SPLC's switch, LL-R's rejection
  rate, GR-Loss's scheduled K and V): a loss knows nothing about epochs;
* a method with state of its own (:mod:`clml_core.losses.stateful`: ROLE, LL-Ct/Cp, EM + APL) takes the base loss's
  place and gets the batch's training rows and the epoch too; the engine calls :meth:`TrainingObjective.epoch_start`
  before the first step of every epoch, which hands such a method the scores of every training image when it asks
  for them (:class:`TrainScorer`: the evaluation transform and the current model in eval mode, in row order, so
  the result is a function of the weights alone and a resumed run recomputes it identically);
* the CLML term is :class:`~clml_core.losses.CLMLLoss` on the embeddings of the whole global batch (gathered over
  DDP ranks, with gradients), or the authors' release (:class:`~clml_core.losses.authors.AuthorsCLMLLoss`), which
  gives the term alone, without its local and global parts;
* with ``reduction="sum"`` the base loss is multiplied by the number of DDP ranks, so that DDP's rank average is the
  sum over the global batch (see :mod:`clml_core.distributed`).

The objective is an ``nn.Module``: a method with state of its own (a per-image label matrix, pseudo-labels, ROLE's
learnable label estimate) keeps it in buffers or parameters, which :meth:`state_dict` hands to the checkpoint and a
resumed run loads back; its parameters are a parameter group of the run's optimiser
(:func:`clml_core.build.optimizer_groups`).

Resumption: the hook runs at step 0 of an epoch only. A checkpoint inside an epoch is written after its hook ran,
so it holds the hook's result; a checkpoint at an epoch's end is written before the next epoch's hook, and the
resumed run runs that hook on the same weights, with the same result. A refreshed method records the epoch, so
a second call in the same epoch changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from clml_core import distributed as dist_utils
from clml_core.correction import correct_labels
from clml_core.evaluate import predict
from clml_core.loaders import eval_loader
from clml_core.losses import CLMLLoss, gr_schedule
from clml_core.losses.stateful import StatefulLoss
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
        gr_epochs: GR-Loss's K and V follow :func:`~clml_core.losses.gr_schedule` over this many epochs (the run's);
            None for every other loss.
    """

    splc_start_epoch: int
    reject_rate_per_epoch: float | None = None
    gr_epochs: int | None = None

    def at(self, epoch: int) -> dict[str, Any]:
        inputs: dict[str, Any] = {"correction_active": epoch >= self.splc_start_epoch}
        if self.reject_rate_per_epoch is not None:
            inputs["reject_rate"] = min(1.0, self.reject_rate_per_epoch * epoch)
        if self.gr_epochs is not None:
            inputs.update(gr_schedule(epoch, self.gr_epochs).loss_kwargs())
        return inputs


@dataclass(frozen=True)
class TrainScorer:
    """Scores every training image as evaluation does: the evaluation transform (view 0 of a feature store), the
    model in eval mode, rows in order (no augmentation, no shuffling), so the scores depend on the weights alone.

    Attributes:
        dataset: the training split with the evaluation transform.
        batch_size: the run's batch (evaluation takes at least 128 a batch).
        workers: loader workers.
        device: where the model is.
        amp, channels_last: the run's (config fields optim.amp, model.channels_last).
    """

    dataset: Any
    batch_size: int
    workers: int
    device: torch.device
    amp: str = "off"
    channels_last: bool = False

    def __call__(self, net: nn.Module) -> Tensor:
        """(N, C) float32 sigmoid scores of ``net`` (a model, or its head on cached features) on the device; ``net``
        is left in the training mode it was in."""
        training = net.training
        loader = eval_loader(self.dataset, self.batch_size, self.workers, self.device)
        scores = predict(net, loader, self.device, amp=self.amp, channels_last=self.channels_last)["scores"]
        net.train(training)
        return torch.as_tensor(scores).to(self.device)


class TrainingObjective(nn.Module):
    """Base loss plus the CLML term, with the correction schedule (see the module docstring).

    Args:
        base_loss: a :mod:`clml_core.losses.base` loss.
        clml_loss: :class:`CLMLLoss`, the authors' release, or None for the base loss alone.
        correction: when correction runs.
        base_inputs: the base loss's per-epoch inputs.
        base_scale: the factor of the base loss (the number of DDP ranks for a summed loss, else 1).
        scorer: scores the training images for a stateful base loss that asks for them (None: none can).
    """

    def __init__(
        self,
        base_loss: nn.Module,
        clml_loss: nn.Module | None,
        correction: CorrectionSchedule,
        base_inputs: BaseLossInputs,
        base_scale: int = 1,
        scorer: TrainScorer | None = None,
    ) -> None:
        super().__init__()
        self.base_loss = base_loss
        self.clml_loss = clml_loss
        self.correction = correction
        self.base_inputs = base_inputs
        self.base_scale = base_scale
        self.scorer = scorer

    def epoch_start(self, epoch: int, net: nn.Module) -> None:
        """The hook the engine calls before the first step of ``epoch`` (and never inside an epoch): a stateful
        base loss that asks for them gets the scores of every training image under ``net``, the module a batch of
        the run goes through without DDP (see the module docstring for why this is resume-safe)."""
        method = self.base_loss
        if isinstance(method, StatefulLoss) and method.wants_scores(epoch):
            if self.scorer is None:
                raise ValueError(f"{type(method).__name__} needs the training images' scores, but no scorer was given")
            method.refresh(epoch, self.scorer(net))

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
        if isinstance(self.base_loss, StatefulLoss):
            base = self.base_loss(outputs.logits.float(), targets, batch.index, epoch)
        else:
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
