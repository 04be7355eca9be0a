"""The training engine, shared by the notebooks and the command line (:mod:`clml_core.train`).

A run folder holds ``config.yaml`` (the resolved configuration), ``run_info.json`` (git sha, versions, the checksum
of the observed labels, one record per resumption), ``metrics.csv`` (one row per epoch), ``results.json`` and
``checkpoints/`` (see :mod:`clml_core.checkpoints`). Every file is written atomically. Model selection uses the
validation split only (carved from train, scored with the labels that training can see unless
``data.val_labels=full``); the test split is scored once, with the selected weights.

A folder has one owner and one configuration: the training process holds ``train.lock`` (see
:mod:`clml_core.runlock`); a resumed run trains with the folder's own ``config.yaml``, and a configuration that
differs from it is refused before any file is written.

Resuming: the data order and every augmentation are functions of (seed, epoch, index), and a checkpoint holds the
model, optimiser, schedule, EMA, loss scaler, the epoch's running sums and the random states, so a resumed run, even
one killed mid-epoch, ends with the same result as an uninterrupted one.

Three training modes (``model.train_mode``), one engine: ``end_to_end`` trains every weight (the paper); ``partial``
trains the last ``model.trainable_stages`` backbone stages and keeps the rest frozen (weights and BatchNorm
statistics); ``frozen`` runs the backbone once per image and augmented view into a feature store
(:mod:`clml_core.features`) and trains the projection head and the classifier on the cached features. Every
checkpoint (``best.pt`` too) carries a ``model_spec`` (architecture, weights source, classes, head sizes,
preprocessing), so ``python -m clml_core.evaluate RUN_DIR ...`` rebuilds the model from the run folder alone; in the
frozen mode with given weights the checkpoints leave the unchanged backbone out and the spec says where its weights
come from.

Stopping: SIGTERM or SIGINT during training lets the current step finish (under DDP: the next step that logs, when
the ranks agree), writes a checkpoint and raises :class:`RunInterrupted` (the command line exits with
:data:`EXIT_INTERRUPTED`); a second SIGINT stops at once, with the previous checkpoint kept, while a repeated SIGTERM
(a launcher forwarding the scheduler's) is ignored. Before training starts and while the test split is scored, the
first signal stops at once: nothing of the run is lost there, since every file is written atomically.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from clml_core import checkpoints
from clml_core import distributed as dist_utils
from clml_core.config import OptimConfig, TrainConfig, config_diff, read_run_config, to_dict
from clml_core.correction import CorrectionQuality, correct_labels
from clml_core.data import MultiLabelDataset, labels_checksum
from clml_core.data.dataset import collate, ignore_stop_signals, shutdown_workers
from clml_core.data.splits import build_splits, image_size
from clml_core.devices import autocast, select_device, to_input
from clml_core.evaluate import eval_loader, load_weights, model_spec, predict, score
from clml_core.losses import CLMLLoss, make_base_loss
from clml_core.losses.authors import AuthorsCLMLLoss
from clml_core.metrics import mean_average_precision
from clml_core.models import FeatureHead, MultiLabelNet, build_model, param_groups
from clml_core.runio import (
    atomic_link,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    run_info,
    write_metrics_csv,
)
from clml_core.runlock import RunLock

#: Exit status of the command line when a signal stopped training after a checkpoint (EX_TEMPFAIL: run it again).
EXIT_INTERRUPTED = 75


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf; the run stopped and its last good checkpoint was kept."""


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run; what was trained is checkpointed and ``--resume`` continues it.

    Attributes:
        signum: the signal's number.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------------------------------- data


class _SeededItems(torch.utils.data.Dataset):
    """Item i of epoch e is drawn under its own seed, so augmentation does not depend on workers or resumption.

    Keys are ``(epoch, index)`` pairs (from :class:`_EpochBatches`), so one loader with persistent workers serves
    every epoch.
    """

    def __init__(self, dataset: MultiLabelDataset, seed: int, augment: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        epoch, index = key
        if not self.augment:
            return self.dataset[index]
        item_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        seeded_item = getattr(self.dataset, "seeded_item", None)  # cached features draw their view from the seed
        if seeded_item is not None:
            return seeded_item(index, item_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.dataset[index]


def epoch_order(num_items: int, seed: int, epoch: int) -> Tensor:
    """The permutation of training items in an epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(num_items, generator=generator)


def rank_batch_size(config: TrainConfig) -> int:
    """Images per rank and step: ``optim.batch_size`` is the global batch, split evenly over the DDP ranks."""
    batch, world = config.optim.batch_size, dist_utils.world_size()
    if batch % world:
        raise ValueError(
            f"config field 'optim.batch_size': {batch} is the global batch and must split evenly over "
            f"{world} processes (each rank takes batch_size / world_size)"
        )
    return batch // world


class _EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of one epoch, from ``start_step`` on; set ``epoch`` and ``start_step`` before iterating.

    Every step takes ``batch_size`` images of the epoch's permutation (the remainder is dropped, so every batch has
    the same shape and the same size on every rank), rank r the r-th slice of them.
    """

    def __init__(self, num_items: int, config: TrainConfig) -> None:
        self.num_items, self.seed = num_items, config.seed
        self.batch, self.per_rank, self.rank = config.optim.batch_size, rank_batch_size(config), dist_utils.rank()
        self.steps = num_items // self.batch
        if self.steps == 0:
            raise ValueError(f"training set of {num_items} images is smaller than one global batch ({self.batch})")
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_items, self.seed, self.epoch)
        for step in range(self.start_step, self.steps):
            first = step * self.batch + self.rank * self.per_rank
            yield [(self.epoch, i) for i in order[first : first + self.per_rank].tolist()]


def _train_loader(dataset: MultiLabelDataset, config: TrainConfig, device: torch.device) -> torch.utils.data.DataLoader:
    """One loader for the whole run: persistent workers, pinned memory on a GPU, uint8 batches."""
    workers = config.data.workers
    return torch.utils.data.DataLoader(
        _SeededItems(dataset, config.seed, config.data.augment != "none"),
        batch_sampler=_EpochBatches(len(dataset), config),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        collate_fn=collate,
    )


# ---------------------------------------------------------------------------------------------------- model


def _build_model(config: TrainConfig, num_classes: int, device: torch.device) -> MultiLabelNet:
    model = build_model(
        config.model.arch,
        num_classes,
        weights=config.model.weights,
        proj_dim=config.model.proj_dim,
        proj_hidden_dim=config.model.proj_hidden_dim,
        widths=config.model.widths,
        classify_embeddings=config.model.classify_embeddings,
    )
    mode = config.model.train_mode
    model.freeze_backbone(0 if mode == "frozen" else config.model.trainable_stages if mode == "partial" else None)
    model = model.to(device)
    if config.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------------------------- train state


@dataclass
class _EpochSums:
    """Running sums of one epoch, part of every checkpoint so a resumed epoch logs what an uninterrupted one does."""

    steps: int = 0
    loss: float = 0.0
    base: float = 0.0
    clml: float = 0.0
    local: float = 0.0
    global_: float = 0.0
    correction: CorrectionQuality = field(default_factory=CorrectionQuality)

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only, for a checkpoint."""
        state = {name: getattr(self, name) for name in ("steps", "loss", "base", "clml", "local", "global_")}
        correction = self.correction
        state["correction"] = {
            "n_missing": correction.n_missing,
            "n_recovered": correction.n_recovered,
            "n_true_recovered": correction.n_true_recovered,
        }
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> _EpochSums:
        values = dict(state)
        values["correction"] = CorrectionQuality(**values["correction"])
        return cls(**values)


class _Pending:
    """Logged values of the steps since the last read, kept on the device so a step never waits for the host.

    ``terms`` (5,) float64 sums of loss, base, CLML, local, global; ``correction`` (3,) float64 sums of missing,
    recovered and truly recovered labels; ``bad`` counts non-finite losses and ``first_bad`` (6,) holds the step
    and the five terms of the first one.
    """

    def __init__(self, device: torch.device) -> None:
        self.steps = 0
        self.terms = torch.zeros(5, dtype=torch.float64, device=device)
        self.correction = torch.zeros(3, dtype=torch.float64, device=device)
        self.bad = torch.zeros(1, dtype=torch.float64, device=device)
        self.first_bad = torch.zeros(6, dtype=torch.float64, device=device)

    def add(self, step: int, terms: Tensor, correction: Tensor | None) -> None:
        """Accumulate one step's (5,) terms and optional (3,) correction counts, without a host read."""
        terms = terms.detach().double()
        finite = torch.isfinite(terms[0])
        first = (~finite) & (self.bad == 0)
        self.first_bad = torch.where(first, torch.cat([terms.new_full((1,), step), terms]), self.first_bad)
        self.bad += (~finite).double()
        self.terms += terms
        if correction is not None:
            self.correction += correction.double()
        self.steps += 1


class _DeviceEMA(AveragedModel):
    """torch's EMA of parameters and buffers (``AveragedModel`` with ``get_ema_multi_avg_fn``, same state dict and
    same values) without the two host reads of ``n_averaged`` that ``update_parameters`` makes every step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        self._updates: int | None = 0  # host copy of n_averaged; None after loading a state dict

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())]
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if self._updates is None:
            self._updates = int(self.n_averaged)  # one read, after a resume
        if self._updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current):
                if a.is_floating_point():
                    groups.setdefault(a.dtype, ([], []))
                    groups[a.dtype][0].append(a)
                    groups[a.dtype][1].append(c)
                else:  # integer buffers (BatchNorm's num_batches_tracked), as get_ema_multi_avg_fn does
                    a.copy_(a * self.decay + c * (1 - self.decay))
            for a_list, c_list in groups.values():
                torch._foreach_lerp_(a_list, c_list, 1 - self.decay)
        self.n_averaged += 1
        self._updates += 1

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._updates = None
        return super().load_state_dict(*args, **kwargs)


def _rng_state() -> dict[str, Any]:
    """The random states as tensors and plain values (see :mod:`clml_core.checkpoints`)."""
    numpy_state = np.random.get_state(legacy=False)
    mt = numpy_state["state"]
    python_version, python_key, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(mt["key"].astype(np.int64)),
            "pos": int(mt["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": [python_version, list(python_key), python_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _grad_scaler(optim: OptimConfig, device: torch.device, steps: int) -> torch.amp.GradScaler:
    """The run's GradScaler: PyTorch's dynamic one for fp16; with ``optim.loss_scale`` and
    ``optim.loss_scale_doublings`` the same dynamic scaler in any precision (the authors' release ran it in fp32),
    from that scale, doubling every ``steps / loss_scale_doublings`` overflow-free steps of the run's ``steps``;
    otherwise disabled (a static ``optim.loss_scale`` is applied by the training step)."""
    if optim.loss_scale and optim.loss_scale_doublings:
        interval = max(1, int(steps / optim.loss_scale_doublings))
        return torch.amp.GradScaler(device.type, init_scale=optim.loss_scale, growth_interval=interval)
    return torch.amp.GradScaler(device.type, enabled=optim.amp == "fp16")


class Trainer:
    """One training run in one folder. Use :func:`train` unless you need the pieces."""

    def __init__(self, config: TrainConfig, out_dir: str | Path) -> None:
        self.config = config
        self.out = Path(out_dir)
        self.ckpt_dir = self.out / checkpoints.FOLDER
        self.device = select_device(config.device)
        self.main = dist_utils.is_main_process()
        if config.threads:
            torch.set_num_threads(config.threads)
        seed_everything(config.seed)
        self.splits = build_splits(config)
        classes = list(self.splits.train.classes)
        self.model = _build_model(config, len(classes), self.device)
        self.frozen = config.model.train_mode == "frozen"
        if self.frozen:
            from clml_core.features import feature_splits

            self.splits = feature_splits(self.splits, self.model, config, self.device)
        self.spec = model_spec(self.model, config, classes, image_size(config))
        self.net: nn.Module = self._runnable(self.model)
        if dist_utils.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if config.model.compile:
            self.net = torch.compile(self.net)
        optim = config.optim
        self.optimizer = torch.optim.Adam(param_groups(self.model, optim.weight_decay), lr=optim.lr)
        self.loader = _train_loader(self.splits.train, config, self.device)
        self.val_loader = eval_loader(self.splits.val, config, self.device)
        self.steps_per_epoch = self.loader.batch_sampler.steps
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every training batch has the same shape (remainder dropped)
        if optim.schedule == "onecycle":
            self.scheduler: Any = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer,
                max_lr=optim.lr,
                total_steps=optim.epochs * max(self.steps_per_epoch, 1),
                pct_start=optim.pct_start,
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.ema = _DeviceEMA(self.model, optim.ema_decay) if optim.ema_decay > 0 else None
        self.scaler = _grad_scaler(optim, self.device, self.steps_per_epoch * (optim.stop_epoch or optim.epochs))
        # Labels were validated when the datasets were built, and a non-finite loss stops the run with its own
        # message, so the losses skip their per-call value checks (a device synchronisation each on a GPU).
        loss_kwargs = dict(config.loss.kwargs)
        self.base_loss = make_base_loss(
            config.loss.base, reduction=config.loss.reduction, check_values=False, **loss_kwargs
        )
        clml = config.clml
        if clml.authors_release:
            self.clml_loss: nn.Module | None = AuthorsCLMLLoss(lam=clml.lam, delta=clml.delta)
        elif clml.enabled:
            self.clml_loss = CLMLLoss(clml.lam, clml.delta, clml.local_weight, clml.global_weight, check_values=False)
        else:
            self.clml_loss = None
        # Where the run continues from.
        self.epoch, self.step = 0, 0
        self.sums = _EpochSums()
        self.pending = _Pending(self.device)
        self.rows: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_map": -math.inf, "epoch": -1, "variant": None}
        self.previous_best_epoch = -1  # the selection the checkpoint before the newest records
        # SIGTERM / SIGINT: the first sets stop_signal; while training, the run stops after the current step.
        self.stop_signal: int | None = None
        self.stage = "setup"  # setup | training | testing
        self.writer: Any = None  # a TensorBoard SummaryWriter while fit runs with config.tensorboard

    # ---- checkpoints

    def _runnable(self, model: MultiLabelNet) -> nn.Module:
        """What a batch goes through: the network, or its head alone on cached features (frozen mode)."""
        return FeatureHead(model) if self.frozen else model

    def _model_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The weights a checkpoint keeps: all, or without the unchanged backbone when its weights have a source."""
        state = model.state_dict()
        if self.spec["backbone_in_checkpoint"]:
            return state
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def state_dict(self) -> dict[str, Any]:
        """The training checkpoint: plain tensors and values (see :mod:`clml_core.checkpoints`)."""
        return {
            "config": to_dict(self.config),
            "model_spec": self.spec,
            "model": self._model_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self._model_state(self.ema) if self.ema is not None else None,
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "sums": self.sums.state_dict(),
            "rows": self.rows,
            "best": self.best,
            "rng": _rng_state(),
        }

    def save_checkpoint(self) -> None:
        if self.main:
            checkpoints.save(self.state_dict(), self.ckpt_dir)
            self._publish_best()

    def _best_path(self, epoch: int) -> Path:
        return self.ckpt_dir / f"best-epoch{epoch}.pt"

    def _publish_best(self) -> None:
        """Point ``best.pt`` at the selected weights ``last.pt`` records; keep those ``previous.pt`` records too.

        An evaluation writes improved weights as ``best-epoch{e}.pt``, published only once a checkpoint records the
        selection. A run resumed from an earlier checkpoint replays the epoch; should the replay select otherwise (a
        GPU replay need not be bitwise the same), the weights its checkpoint records are still there, and never
        are another trajectory's weights found under ``best.pt``.
        """
        epoch = self.best["epoch"]
        if epoch < 0:
            return
        atomic_link(self._best_path(epoch), self.ckpt_dir / "best.pt")
        keep = {self._best_path(epoch), self._best_path(self.previous_best_epoch)}
        for path in self.ckpt_dir.glob("best-epoch*.pt"):
            if path not in keep:
                path.unlink()
        self.previous_best_epoch = epoch

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Continue from a checkpoint read by :func:`clml_core.checkpoints.read` (``path`` names it in errors)."""
        if state["config"] != to_dict(self.config):
            diff = "; ".join(config_diff(state["config"], to_dict(self.config)))
            raise ValueError(f"{path} was written by another configuration than this run's ({diff})")
        load_weights(self.model, state["model"], self.spec, str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"], strict=self.spec["backbone_in_checkpoint"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.sums = _EpochSums.from_state_dict(state["sums"])
        self.rows, self.best = state["rows"], state["best"]
        self.previous_best_epoch = self.best["epoch"]  # this checkpoint is the previous one after the next save
        _set_rng_state(state["rng"])

    def _last_checkpoint_text(self) -> str:
        last = self.ckpt_dir / checkpoints.LAST
        if last.exists():
            return f"The last good checkpoint is {last}"
        return "No checkpoint was written yet (the run stopped before its first one)"

    # ---- one step

    def _train_step(self, images: Tensor, observed: Tensor, index: Tensor) -> None:
        config, device = self.config, self.device
        images = to_input(images, config, device, self.model.preprocessing)
        observed = observed.to(device, non_blocking=True)
        clml = config.clml
        # Correction feeds the CLML groups, and the base loss too with correct_base (also without a CLML term).
        correcting = (
            clml.correction
            and (clml.enabled or clml.authors_release or clml.correct_base)
            and self.epoch >= clml.correction_start_epoch
        )
        with autocast(config, device):
            out = self.net(images)
            logits = out.logits.detach().float()
            corrected = (
                correct_labels(observed, logits, clml.tau, quantile=clml.quantile or None, check_values=False)
                if correcting
                else observed
            )
            base_targets = corrected if correcting and clml.correct_base else observed
            loss_kwargs: dict[str, Any] = {"correction_active": self.epoch >= config.loss.splc_start_epoch}
            if config.loss.base == "ll-r":
                loss_kwargs["reject_rate"] = min(1.0, config.loss.llr_rate_per_epoch * self.epoch)
            base = self.base_loss(out.logits.float(), base_targets, **loss_kwargs)
            if config.loss.reduction == "sum":
                base = base * dist_utils.world_size()  # see clml_core.distributed: the rank average is the sum
            loss = base
            local = global_ = clml_value = torch.zeros((), device=device)
            if self.clml_loss is not None:
                # Every rank has the same batch size (the epoch drops its remainder): no all-gather of the sizes.
                embeddings = dist_utils.gather_with_grad(out.embeddings, equal_sizes=True)
                groups = dist_utils.gather_no_grad(corrected, equal_sizes=True)
                if isinstance(self.clml_loss, CLMLLoss):
                    terms = self.clml_loss.terms(embeddings, groups)
                    clml_value, local, global_ = terms.loss, terms.local, terms.global_
                else:
                    clml_value = self.clml_loss(embeddings.float(), groups)
                loss = base + clml_value
        self.optimizer.zero_grad(set_to_none=True)
        static_scale = config.optim.loss_scale if not config.optim.loss_scale_doublings else 0.0
        if static_scale:
            (loss * static_scale).backward()
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.div_(static_scale)
        else:
            self.scaler.scale(loss).backward()
        if config.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        self.scaler.step(self.optimizer)  # a dynamic scaler (fp16, loss_scale_doublings) reads its inf check here
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        # Logged values and correction counts stay on the device until _read_pending (every log_every steps).
        counts = None
        if correcting:
            full = torch.as_tensor(self.splits.train.labels[index.numpy()]).to(device, non_blocking=True).bool()
            seen, missing = observed.bool(), full & ~observed.bool()
            recovered = corrected.bool() & ~seen
            counts = torch.stack([missing.sum(), recovered.sum(), (missing & recovered).sum()])
        self.pending.add(self.step, torch.stack([loss, base, clml_value, local, global_]), counts)

    def _read_pending(self) -> None:
        """Move the pending logged values to the host (one synchronisation), all-reduced over ranks.

        Under DDP every rank calls this at the same steps. The logged values are the rank means (the single-process
        values, see :mod:`clml_core.distributed`); correction counts are summed over ranks. A non-finite loss on any
        rank stops every rank here with the same error, before a checkpoint is written.

        Raises:
            NonFiniteLossError: a loss since the last read was NaN or Inf.
        """
        pending = self.pending
        if pending.steps == 0:
            return
        values = torch.cat([pending.terms, pending.correction, pending.bad, pending.bad, pending.first_bad])
        world = dist_utils.world_size()
        if world > 1:
            torch.distributed.all_reduce(values[:9])  # a view, reduced in place; the rest stays this rank's
        host = values.tolist()
        terms, correction, any_bad, own_bad, first = host[:5], host[5:8], host[8], host[9], host[10:]
        if any_bad:
            where = (
                f"{first[1]} at epoch {self.epoch} step {int(first[0])} (base {first[2]:.4g}, CLML {first[3]:.4g})"
                if own_bad
                else f"not finite on another rank in epoch {self.epoch}"
            )
            raise NonFiniteLossError(
                f"loss is {where}; the run stopped on every rank. {self._last_checkpoint_text()}; lower optim.lr or "
                "check the data (a resumed run keeps its configuration: start a new folder to change it)."
            )
        sums = self.sums
        sums.steps += pending.steps
        sums.loss += terms[0] / world
        sums.base += terms[1] / world
        sums.clml += terms[2] / world
        sums.local += terms[3] / world
        sums.global_ += terms[4] / world
        if any(correction):
            sums.correction = sums.correction + CorrectionQuality(*(int(c) for c in correction))
        if self.writer is not None:  # the means over the steps since the last read, at the last of them
            step = self.epoch * self.steps_per_epoch + self.step - 1
            for name, total in zip(("loss", "base", "clml", "local", "global"), terms):
                self.writer.add_scalar(f"step/{name}", total / world / pending.steps, step)
            self.writer.add_scalar("step/lr", self.scheduler.get_last_lr()[0], step)
        self.pending = _Pending(self.device)

    # ---- epochs

    def _evaluate_epoch(self, seconds: float) -> None:
        config, sums = self.config, self.sums
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": sums.loss / max(sums.steps, 1),
            "train_base": sums.base / max(sums.steps, 1),
            "train_clml": sums.clml / max(sums.steps, 1),
            "train_local": sums.local / max(sums.steps, 1),
            "train_global": sums.global_ / max(sums.steps, 1),
            "corr_precision": sums.correction.precision,
            "corr_recall": sums.correction.recall,
            "corr_recovered": sums.correction.n_recovered,
            "seconds": seconds,
        }
        if self.main:
            val = self.splits.val
            candidates = {"model": self.model}
            if self.ema is not None:
                candidates["ema"] = self.ema.module
            for variant, net in candidates.items():
                pred = predict(self._runnable(net), val, config, self.device, loader=self.val_loader)
                val_map = float(mean_average_precision(pred["observed"], pred["scores"]))
                row["val_map" if variant == "model" else "val_map_ema"] = val_map
                if val_map > self.best["val_map"]:
                    self.best = {"val_map": val_map, "epoch": self.epoch, "variant": variant}
                    best = {"model_spec": self.spec, "model": self._model_state(net)}
                    atomic_torch_save(best, self._best_path(self.epoch))
            self.model.train()
        self.rows.append(row)
        if self.main:
            write_metrics_csv(self.out / "metrics.csv", self.rows)
        if self.writer is not None:
            last_step = (self.epoch + 1) * self.steps_per_epoch - 1  # the epoch's last step: the x of its scalars
            for name, value in row.items():
                if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{name}", value, last_step)
            self.writer.flush()

    def fit(self, max_steps: int | None = None) -> bool:
        """Train until the last epoch (True) or until ``max_steps`` steps were taken in this call (False)."""
        config = self.config
        last_epoch = config.optim.stop_epoch or config.optim.epochs
        self.model.train()
        if config.tensorboard and self.main:
            self.writer = _summary_writer(self.out / "tensorboard", self.epoch * self.steps_per_epoch + self.step)
        try:
            return self._fit_epochs(last_epoch, max_steps)
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    def _fit_epochs(self, last_epoch: int, max_steps: int | None) -> bool:
        config = self.config
        taken = 0
        while self.epoch < last_epoch:
            started = time.perf_counter()
            sampler = self.loader.batch_sampler
            sampler.epoch, sampler.start_step = self.epoch, self.step
            steps = sampler.steps
            bar = tqdm(
                self.loader,
                total=steps,
                initial=self.step,
                desc=f"{config.name} epoch {self.epoch + 1}/{last_epoch}",
                disable=not (config.progress and self.main),
                leave=False,
            )
            for images, observed, index in bar:
                if max_steps is not None and taken >= max_steps:
                    self._read_pending()
                    return False
                self._train_step(images, observed, index)
                self.step += 1
                taken += 1
                if self.step % config.log_every == 0:
                    self._read_pending()
                    bar.set_postfix(loss=f"{self.sums.loss / self.sums.steps:.3g}")
                # Under DDP the agreement on a stop signal is a collective with a host read: at the log_every steps.
                if (self.step % config.log_every == 0 or not dist_utils.is_distributed()) and self._stop_requested():
                    bar.close()
                    self._stop(checkpoint=True)
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < steps:
                    self._read_pending()
                    self.save_checkpoint()
            self._read_pending()
            bar.close()
            self._evaluate_epoch(time.perf_counter() - started)
            self.epoch, self.step, self.sums = self.epoch + 1, 0, _EpochSums()
            self.save_checkpoint()
            if dist_utils.is_distributed():
                torch.distributed.barrier()
            if self._stop_requested():
                self._stop(checkpoint=False)
        return True

    # ---- stopping on a signal

    def _stop_requested(self) -> bool:
        """Whether a stop signal arrived, agreed by every rank (so all ranks stop after the same step)."""
        requested = self.stop_signal is not None
        if not dist_utils.is_distributed():
            return requested
        flag = torch.tensor([self.stop_signal or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.stop_signal = int(flag.item()) or None
        return self.stop_signal is not None

    def _stop(self, checkpoint: bool) -> None:
        if checkpoint:
            self._read_pending()
            self.save_checkpoint()
            if dist_utils.is_distributed():
                torch.distributed.barrier()
        name = signal.Signals(self.stop_signal).name
        raise RunInterrupted(
            self.stop_signal,
            f"stopped by {name} at epoch {self.epoch} step {self.step}; checkpoint written to "
            f"{self.ckpt_dir / checkpoints.LAST}; continue with --resume (resume=True)",
        )

    def on_signal(self, signum: int, _frame: Any) -> None:
        """Signal handler: while training, the first signal stops the run after the current step and a second SIGINT
        (Ctrl-C twice) stops it at once; a repeated SIGTERM (a launcher forwarding the scheduler's) changes nothing.
        Outside training every signal stops at once."""
        name = signal.Signals(signum).name
        if self.stage == "training" and self.stop_signal is not None and signum != signal.SIGINT:
            return
        if self.stop_signal is not None or self.stage != "training":
            self.stop_signal = signum
            where = {"setup": "before training", "training": "during training", "testing": "while testing"}
            last = self._last_checkpoint_text()
            raise RunInterrupted(
                signum,
                f"stopped by {name} {where[self.stage]} (epoch {self.epoch} step {self.step}); every file saved so "
                f"far is intact ({last[0].lower()}{last[1:]}); continue with --resume (resume=True)",
            )
        self.stop_signal = signum
        if self.main:
            again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            print(f"clml: {name}: finishing this step and writing a checkpoint{again}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop the loaders' persistent workers: they ignore SIGTERM (see ``ignore_stop_signals``), so the
        interpreter's exit could not stop them, and would wait for them forever."""
        shutdown_workers(self.loader)
        shutdown_workers(self.val_loader)

    def finish(self) -> dict[str, Any]:
        """Score the selected weights on the test split once and write ``results.json`` (main process)."""
        if not self.main:
            return {}
        best_model = copy.deepcopy(self.model)
        self._publish_best()
        path = self._best_path(self.best["epoch"])
        best = torch.load(path, map_location=self.device, weights_only=True)
        load_weights(best_model, best["model"], self.spec, str(path))
        test = self.splits.test
        pred = predict(
            self._runnable(best_model), test, self.config, self.device, embeddings=self.config.save_embeddings
        )
        scored = score(test.labels, pred["scores"], test.classes)
        results = {
            "test_map": scored["map"],
            "test_map_frequent": scored["map_frequent"],
            "test_frequent_classes": scored["frequent_classes"],
            "test_classes_scored": scored["n_classes_scored"],
            "best_val_map": self.best["val_map"],
            "best_epoch": self.best["epoch"],
            "best_variant": self.best["variant"],
            "test_threshold_metrics": scored["threshold_metrics"],
            "test_ap_per_class": scored["ap_per_class"],
            "test_positives_per_class": scored["positives_per_class"],
            "final_corr_precision": self.rows[-1]["corr_precision"] if self.rows else math.nan,
            "final_corr_recall": self.rows[-1]["corr_recall"] if self.rows else math.nan,
            "train_seconds": sum(row["seconds"] for row in self.rows),
            "epochs": len(self.rows),
        }
        if self.config.save_embeddings:
            _write_npz(
                self.out / "test_embeddings.npz",
                embeddings=pred["embeddings"],
                scores=pred["scores"],
                labels=test.labels,
                classes=np.array(test.classes),
            )
            # The last epoch's model on its own training images: the scores label correction last acted on.
            train = self.splits.train
            seen = predict(self._runnable(self.model), train, self.config, self.device)
            _write_npz(
                self.out / "train_scores.npz",
                scores=seen["scores"],
                observed=seen["observed"],
                labels=train.labels,
                classes=np.array(train.classes),
            )
        atomic_write_json(self.out / "results.json", results)
        return results


def _summary_writer(log_dir: Path, purge_step: int) -> Any:
    """A TensorBoard writer that drops events logged after ``purge_step`` by an interrupted earlier attempt."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch imports tensorboard lazily here
        raise ImportError(
            "config field 'tensorboard' is true but the tensorboard package is not installed; "
            "pip install -e '.[tensorboard]' (or pip install tensorboard)"
        ) from error
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def _holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("config.yaml", "run_info.json", "results.json", checkpoints.FOLDER))


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``arrays`` as one compressed ``.npz`` file, written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def _run_config(out: Path, config: TrainConfig | None, resume: bool) -> TrainConfig:
    """The configuration to train ``out`` with; refuses what would mix two runs in one folder (writes nothing)."""
    if not _holds_run(out):
        if config is None:
            raise ValueError(f"{out} holds no run to resume (no config.yaml); give a configuration (--preset ...)")
        return config
    if not resume:
        raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) or choose another folder")
    saved = read_run_config(out)
    if saved is None:
        raise ValueError(f"{out} holds run files but no config.yaml, so it cannot be resumed; choose another folder")
    if config is not None and to_dict(config) != to_dict(saved):
        diff = "; ".join(config_diff(to_dict(saved), to_dict(config)))
        raise ValueError(
            f"{out / 'config.yaml'} holds another configuration than the one given ({diff}); a resumed run keeps "
            "its folder's configuration: resume without overrides, or train into another folder"
        )
    return saved


def _write_run_info(trainer: Trainer, resumed_from: Path | None) -> None:
    """``run_info.json`` for a new run; a resumption appends a record to it (time, command line, host, where)."""
    path = trainer.out / "run_info.json"
    if path.exists():
        info = json.loads(path.read_text())
        now = run_info()
        info.setdefault("resumes", []).append(
            {
                "utc": now["started_utc"],
                "argv": now["argv"],
                "host": now["host"],
                "git_sha": now["git_sha"],
                "checkpoint": str(resumed_from) if resumed_from else None,
                "epoch": trainer.epoch,
                "step": trainer.step,
            }
        )
        atomic_write_json(path, info)
        return
    splits, data = trainer.splits, trainer.config.data
    atomic_write_json(
        path,
        run_info(
            {
                "dataset": data.dataset,
                "data_root": data.root,
                "classes": splits.train.classes,
                "train_labels_checksum": labels_checksum(splits.train.labels),
                "test_labels_checksum": labels_checksum(splits.test.labels),
                "observed_train_checksum": labels_checksum(splits.train.observed),
                "observed_val_checksum": labels_checksum(splits.val.observed),
                "n_train": len(splits.train),
                "n_val": len(splits.val),
                "n_test": len(splits.test),
                "world_size": dist_utils.world_size(),
                "device": str(trainer.device),
            }
        ),
    )


class _StopSignals:
    """SIGTERM and SIGINT go to ``trainer.on_signal`` while the block runs (in the main thread only).

    Before the trainer exists (the data is loading) a signal stops at once: nothing was written yet.
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer is not None:
            self.trainer.on_signal(signum, frame)
            return
        name = signal.Signals(signum).name
        raise RunInterrupted(signum, f"stopped by {name} while the data was loading; nothing was trained or written")

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(
    config: TrainConfig | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train one run into ``out_dir`` and return its results (the content of ``results.json``).

    Every check that can refuse the call (another run in the folder, another configuration, a folder in use, a
    configuration that fails to load its data, an unreadable checkpoint) comes before the first file is written, so a
    refused call changes no file.

    Args:
        config: a resolved configuration (see :func:`clml_core.config.resolve_config`); None to resume with the
            folder's own ``config.yaml``.
        out_dir: the run folder.
        resume: continue the run in ``out_dir`` if it holds one (with its own configuration: ``config`` must be
            None or equal to it), from its newest readable checkpoint; start it if the folder holds no run.
        max_steps: stop after this many optimiser steps in this call, leaving the checkpoints as a crash would
            (for tests of resumption); the return value is then ``{}``.

    Raises:
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is False.
        ValueError: ``config`` differs from the folder's; a bad configuration or dataset.
        clml_core.runlock.FolderInUseError: another live process trains into ``out_dir``.
        clml_core.checkpoints.CheckpointError: the folder's checkpoints exist but none can be read.
        NonFiniteLossError: the loss became NaN or Inf.
        RunInterrupted: SIGTERM or SIGINT stopped the run (resume it to continue).
        clml_core.runio.DiskFullError: the disk filled up; every file already saved is intact.
    """
    out = Path(out_dir)
    main = dist_utils.is_main_process()
    if not main:  # rank 0 checks and owns the folder; the others train with the same configuration
        config = _run_config(out, config, resume) if config is None else config
        return _train_locked(config, out, max_steps)
    created = not out.exists()
    _run_config(out, config, resume)  # refuse early, before the folder or its lock is touched
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(out)
    except BaseException:
        if created:
            out.rmdir()
        raise
    try:
        if lock.stale_owner:
            print(f"clml: {lock.describe_stale()}", file=sys.stderr, flush=True)
        config = _run_config(out, config, resume)  # again, now that no other process can change the folder
        _remove_partial_writes(out)
        return _train_locked(config, out, max_steps)
    finally:
        lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused or failed start leaves no empty folder behind


def _remove_partial_writes(out: Path) -> None:
    """Temporary files of writes cut short by a kill (a live writer would hold the lock, so these are dead)."""
    for folder in (out, out / checkpoints.FOLDER):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)


def _train_locked(config: TrainConfig, out: Path, max_steps: int | None) -> dict[str, Any]:
    if (out / "results.json").exists():  # finished (maybe killed just after): nothing left to do
        return json.loads((out / "results.json").read_text())
    with _StopSignals() as signals:
        trainer = Trainer(config, out)
        signals.trainer = trainer
        try:
            return _run(trainer, out, max_steps)
        finally:
            trainer.close()


def _run(trainer: Trainer, out: Path, max_steps: int | None) -> dict[str, Any]:
    """Continue ``trainer`` from its latest checkpoint in ``out`` to the end (or ``max_steps``) and score it."""
    config = trainer.config
    latest = checkpoints.load_latest(trainer.ckpt_dir, map_location=trainer.device)
    if latest is not None:
        trainer.load_state_dict(*latest)
        unreadable = trainer.ckpt_dir / checkpoints.LAST
        if trainer.main and latest[1].name == checkpoints.PREVIOUS and unreadable.exists():
            # Kept for inspection; the next checkpoint must not keep it as its previous one.
            os.replace(unreadable, unreadable.with_name(checkpoints.LAST + ".unreadable"))
    if trainer.main:
        if not (out / "config.yaml").exists():
            atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
        _write_run_info(trainer, latest[1] if latest else None)
    trainer.stage = "training"
    finished = trainer.fit(max_steps)
    trainer.stage = "testing"
    return trainer.finish() if finished else {}
