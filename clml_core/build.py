"""The composition root of a training run: every part built once from the configuration, in phases.

:func:`build_run` reads the configuration and hands the :class:`~clml_core.engine.Trainer` built parts and plain
values (:class:`RunParts`, :class:`LoopSettings`); nothing below it sees the whole configuration. The phases run
in a fixed order, since the model's initialisation draws from the random state that seeding and the data left:

1. device and seeds;
2. data: the splits with the missing-label protocol (:mod:`clml_core.data.splits`);
3. model: the network, frozen as ``model.train_mode`` says, the feature store in the frozen mode and the trunk
   store in the partial mode (:func:`input_splits`, :mod:`clml_core.features`), its ``model_spec``, and the module a
   batch goes through (DDP, compile);
4. objective: the base loss (or a stateful method, which reads the training split), the CLML term and the
   correction schedule (:mod:`clml_core.objective`); it draws nothing from the global random state;
5. optimisation: Adam over the model's parameter groups and the objective's parameters (ROLE's label estimate),
   the batches, the schedule, the EMA of the weights and the loss scaler.

Three training modes (``model.train_mode``), one engine: ``end_to_end`` trains every weight (the paper); ``partial``
trains the last ``model.trainable_stages`` backbone stages and keeps the rest frozen (weights and BatchNorm
statistics), with given weights from the frozen stages' output stored once per image and view
(``model.trunk_cache``, :func:`uses_trunk_cache`); ``frozen`` runs the backbone once per image and augmented view
into a feature store (:mod:`clml_core.features`) and trains the projection head and the classifier on the cached
features. In the frozen mode with given weights the checkpoints leave the unchanged backbone out and the
``model_spec`` says where its weights come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clml_core import distributed as dist_utils
from clml_core.config import ModelConfig, OptimConfig, TrainConfig
from clml_core.data.dataset import MultiLabelDataset
from clml_core.data.splits import Splits, build_splits, cache_folder, image_size, train_transform_for
from clml_core.devices import select_device
from clml_core.evaluate import model_spec
from clml_core.features import ViewImages, feature_splits, trunk_splits, view_seed
from clml_core.loaders import EpochBatches, eval_loader, train_loader
from clml_core.losses import CLMLLoss, make_base_loss
from clml_core.losses.authors import AuthorsCLMLLoss
from clml_core.losses.stateful import STATEFUL_LOSSES, MethodContext, make_stateful_loss
from clml_core.models import FeatureHead, MultiLabelNet, TrunkHead, build_model, param_groups, preprocessing_for
from clml_core.objective import BaseLossInputs, CorrectionSchedule, TrainingObjective, TrainScorer
from clml_core.train_state import DeviceEMA, seed_everything


@dataclass(frozen=True)
class EarlyStop:
    """When training ends before its last epoch (config fields optim.early_stop, optim.early_stop_points).

    A rule on the validation mAP of the epochs so far (the model's ``val_map`` column, in points), checked before
    each epoch. The metrics rows are part of every checkpoint, so a resumed run stops where an uninterrupted one
    does.

    Attributes:
        rule: "off"; "no_improvement": stop after the first epoch whose mAP is not above every earlier one (Zhou et
            al.'s EM code); "below_best": stop after an epoch whose mAP is more than ``points`` below the best so far
            (LL: 3, GR-Loss: 2).
        points: the margin of "below_best".
    """

    rule: str = "off"
    points: float = 0.0

    def stops(self, rows: list[dict[str, Any]]) -> bool:
        """Whether the run ends after the epochs of ``rows`` (the metrics rows, oldest first)."""
        if self.rule == "off" or len(rows) < 2:
            return False
        scores = [row["val_map"] for row in rows]
        if self.rule == "no_improvement":
            return not scores[-1] > max(scores[:-1])
        return max(scores) - scores[-1] > self.points


@dataclass(frozen=True)
class LoopSettings:
    """The values the training loop reads (from the configuration's fields of the same names)."""

    name: str
    last_epoch: int  # optim.stop_epoch, or optim.epochs
    log_every: int
    checkpoint_every: int
    progress: bool
    tensorboard: bool
    save_embeddings: bool
    amp: str  # optim.amp
    channels_last: bool  # model.channels_last
    grad_clip: float  # optim.grad_clip (0: none)
    static_loss_scale: float  # optim.loss_scale without loss_scale_doublings (0: none)
    early_stop: EarlyStop = EarlyStop()  # optim.early_stop, optim.early_stop_points


@dataclass
class RunParts:
    """Everything a run trains with, built by :func:`build_run`.

    Attributes:
        device: where it computes.
        splits: train / val / test datasets (cached features in the frozen mode).
        model: the network (its weights are what checkpoints keep).
        net: what a training batch goes through: the model, its head alone on cached features, DDP, compiled.
        frozen: the backbone is frozen and its features cached (batches are features, not images).
        trunk_shape: (c, h, w) of the stored trunk output when the partial mode trains from it (batches are
            flattened activations), else None.
        spec: the ``model_spec`` that rebuilds the model (see :func:`clml_core.evaluate.model_spec`).
        loader, val_loader: the seeded training batches and the validation batches in row order.
        optimizer, scheduler, ema, scaler: Adam, its schedule (stepped every step), the EMA (or None), the scaler.
        objective: the training objective.
        settings: the loop's values.
    """

    device: torch.device
    splits: Splits
    model: MultiLabelNet
    net: nn.Module
    frozen: bool
    spec: dict[str, Any]
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: DeviceEMA | None
    scaler: torch.amp.GradScaler
    objective: TrainingObjective
    settings: LoopSettings
    trunk_shape: tuple[int, int, int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.batch_sampler.steps

    def runnable(self, model: MultiLabelNet) -> nn.Module:
        """What a batch of this run goes through for ``model`` (the model, or its EMA copy): its head alone on
        cached features in the frozen mode, its trainable stages and head on the stored trunk output."""
        return runnable_for(model, self.frozen, self.trunk_shape, self.settings.channels_last)


def runnable_for(
    model: MultiLabelNet, frozen: bool, trunk_shape: tuple[int, int, int] | None, channels_last: bool
) -> nn.Module:
    """What a batch goes through for ``model``: :class:`FeatureHead` on cached features (``frozen``),
    :class:`TrunkHead` on stored trunk activations of ``trunk_shape`` (c, h, w), else the model on images."""
    if frozen:
        return FeatureHead(model)
    if trunk_shape is not None:
        return TrunkHead(model, trunk_shape, channels_last)
    return model


def build_run(config: TrainConfig) -> RunParts:
    """Build every part of a run from a resolved configuration (see the module docstring for the phases)."""
    # ---------------------------------------------------------------------------------- device and seeds
    device = select_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    # ------------------------------------------------------------------------------------------------ data
    preprocessing = preprocessing_for(config.model.arch)
    splits = build_splits(config.data, preprocessing, progress=config.progress)
    # ----------------------------------------------------------------------------------------------- model
    data, frozen = config.data, config.model.train_mode == "frozen"
    size = image_size(data.image_size, preprocessing)
    model = build_network(config.model, splits.train.num_classes, device)
    splits, trunk = input_splits(config, splits, model, device)
    spec = model_spec(model, config.model, splits.train.classes, size, trunk_cache=trunk is not None)
    net = _trainable(runnable_for(model, frozen, trunk, config.model.channels_last), device, config.model.compile)
    # ------------------------------------------------------------------------------------------- objective
    optim = config.optim
    scored = _as_evaluated(splits)
    scorer = TrainScorer(scored, optim.batch_size, data.workers, device, optim.amp, config.model.channels_last)
    objective = build_objective(config, splits.train, scorer).to(device)
    # ---------------------------------------------------------------------------------------- optimisation
    groups = optimizer_groups(model, objective, optim, config.loss.estimator_lr_mult)
    optimizer = torch.optim.Adam(groups, lr=optim.lr, fused=True)  # one kernel a step (CPU and CUDA, torch >= 2.4)
    batches = EpochBatches(len(splits.train), optim.batch_size, config.seed, dist_utils.rank(), dist_utils.world_size())
    augment = data.augment != "none"
    loader = train_loader(splits.train, batches, seed=config.seed, augment=augment, workers=data.workers, device=device)
    val_loader = eval_loader(splits.val, optim.batch_size, data.workers, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every training batch has the same shape (remainder dropped)
    scheduler = _scheduler(optimizer, optim, batches.steps)
    ema = DeviceEMA(model, optim.ema_decay) if optim.ema_decay > 0 else None
    scaler = _grad_scaler(optim, device, batches.steps * (optim.stop_epoch or optim.epochs))
    return RunParts(
        device=device, splits=splits, model=model, net=net, frozen=frozen, spec=spec, loader=loader,
        val_loader=val_loader, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler,
        objective=objective, settings=loop_settings(config), trunk_shape=trunk,
    )  # fmt: skip


def _as_evaluated(splits: Splits) -> Any:
    """The training images as evaluation sees them: view 0 of a feature or trunk store (a stored split's item), or
    the image files under the validation transform."""
    train = splits.train.source if isinstance(splits.train, ViewImages) else splits.train
    return train.with_transform(splits.val.transform) if isinstance(train, MultiLabelDataset) else train


def uses_trunk_cache(config: TrainConfig) -> bool:
    """Whether a run trains the partial mode from the stored trunk output (config field model.trunk_cache, where it
    applies): given weights (a random trunk would be a store per seed), image files (a real dataset), and views that
    can be stored (data.augment=none, or data.feature_views > 0 augmented views; augmentation drawn afresh every
    epoch cannot be)."""
    model, data = config.model, config.data
    storable = data.augment == "none" or data.feature_views > 0
    applies = model.weights is not None and data.dataset != "synthetic" and storable
    return model.train_mode == "partial" and model.trunk_cache and applies


def input_splits(
    config: TrainConfig, splits: Splits, model: MultiLabelNet, device: torch.device
) -> tuple[Splits, tuple[int, int, int] | None]:
    """The splits a run's batches come from, and the (c, h, w) trunk shape when they are stored trunk activations.

    frozen: the feature store's rows (:func:`clml_core.features.feature_splits`); partial with the trunk cache
    (:func:`uses_trunk_cache`): the trunk stores' rows (:func:`clml_core.features.trunk_splits`); partial without it
    but with ``data.feature_views``: the same stored views drawn from the image files at every step
    (:class:`clml_core.features.ViewImages`); otherwise the image splits. A store is built here if missing, under a
    forked random state, so a run draws the same numbers whether it finds its store or builds it.
    """
    data = config.data
    size = image_size(data.image_size, model.preprocessing)
    seed = view_seed(config.seed, data.views_per_seed)
    folder = cache_folder(data.cache_dir)
    options = {"size": size, "augment": data.augment, "views": data.feature_views, "seed": seed}
    options.update(workers=data.workers, progress=config.progress, device=device)
    with torch.random.fork_rng(devices=[]):
        if config.model.train_mode == "frozen":
            return feature_splits(splits, model, folder=folder / "features", **options), None
        if uses_trunk_cache(config):
            return trunk_splits(
                splits, model, folder=folder / "trunk", channels_last=config.model.channels_last, **options
            )
    if config.model.train_mode == "partial" and data.feature_views:
        transform = train_transform_for(data.augment, size, model.preprocessing, to_float=True)
        views = ViewImages(splits.train, transform, data.feature_views, seed)
        return Splits(train=views, val=splits.val, test=splits.test), None
    return splits, None


def build_network(model: ModelConfig, num_classes: int, device: torch.device) -> MultiLabelNet:
    """The network of ``model`` on ``device``, its backbone frozen as ``model.train_mode`` says."""
    network = build_model(
        model.arch,
        num_classes,
        weights=model.weights,
        proj_dim=model.proj_dim,
        proj_hidden_dim=model.proj_hidden_dim,
        widths=model.widths,
        classify_embeddings=model.classify_embeddings,
        classifier_head=model.head,
    )
    mode = model.train_mode
    network.freeze_backbone(0 if mode == "frozen" else model.trainable_stages if mode == "partial" else None)
    network = network.to(device)
    if model.channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def _trainable(net: nn.Module, device: torch.device, compile_: bool) -> nn.Module:
    """``net`` wrapped for training: in DDP under several processes, compiled with ``model.compile``."""
    if dist_utils.is_distributed():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if compile_ else net


def _scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, steps_per_epoch: int) -> Any:
    """OneCycle over the run's ``optim.epochs`` (stepped every step), or a constant learning rate."""
    if optim.schedule == "onecycle":
        total, warmup = optim.epochs * max(steps_per_epoch, 1), optim.pct_start
        peaks = [group["lr"] for group in optimizer.param_groups]  # optim.lr, times a group's multiplier
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _grad_scaler(optim: OptimConfig, device: torch.device, steps: int) -> torch.amp.GradScaler:
    """The run's GradScaler: PyTorch's dynamic one for fp16; with ``optim.loss_scale`` and
    ``optim.loss_scale_doublings`` the same dynamic scaler in any precision (the authors' release ran it in fp32),
    from that scale, doubling every ``steps / loss_scale_doublings`` overflow-free steps of the run's ``steps``;
    otherwise disabled (a static ``optim.loss_scale`` is applied by the training step)."""
    if optim.loss_scale and optim.loss_scale_doublings:
        interval = max(1, int(steps / optim.loss_scale_doublings))
        return torch.amp.GradScaler(device.type, init_scale=optim.loss_scale, growth_interval=interval)
    return torch.amp.GradScaler(device.type, enabled=optim.amp == "fp16")


def optimizer_groups(
    model: nn.Module, objective: nn.Module, optim: OptimConfig, estimator_lr_mult: float
) -> list[dict[str, Any]]:
    """Adam's parameter groups: the model's (:func:`~clml_core.models.param_groups`), the classifier's apart at
    ``optim.classifier_lr_mult`` times the learning rate when that is not 1 (LL, BoostLU, GR-Loss: 10), and the
    objective's own parameters (ROLE's label estimate) at ``estimator_lr_mult`` times it without weight decay.

    With neither, the groups are exactly :func:`~clml_core.models.param_groups`'s.
    """
    groups = param_groups(model, optim.weight_decay)
    if optim.classifier_lr_mult != 1:
        classifier = {id(param) for param in model.classifier.parameters()}
        split = []
        for group in groups:
            rest = [param for param in group["params"] if id(param) not in classifier]
            own = [param for param in group["params"] if id(param) in classifier]
            split.append({**group, "params": rest})
            split.append({**group, "params": own, "lr": optim.lr * optim.classifier_lr_mult})
        groups = [group for group in split if group["params"]]
    extra = [param for param in objective.parameters() if param.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0, "lr": optim.lr * estimator_lr_mult})
    return groups


def build_objective(config: TrainConfig, train: Any = None, scorer: TrainScorer | None = None) -> TrainingObjective:
    """The training objective of ``config.loss`` and ``config.clml``.

    Labels were validated when the datasets were built, and a non-finite loss stops the run with its own message,
    so the losses skip their per-call value checks (a device synchronisation each on a GPU).

    Args:
        config: the run's configuration.
        train: the training split (its ``observed`` and ``labels``), which a stateful method (``loss.base`` in
            :data:`~clml_core.losses.stateful.STATEFUL_LOSSES`) needs; None otherwise.
        scorer: scores the training images for a method that asks for them at an epoch's start (EM + APL).

    Raises:
        ValueError: a stateful method without ``train``, or under several DDP processes (its per-image state
            would differ between ranks).
    """
    loss, clml = config.loss, config.clml
    if loss.base in STATEFUL_LOSSES:
        base: nn.Module = _stateful_method(config, train)
    else:
        base = make_base_loss(loss.base, reduction=loss.reduction, check_values=False, **dict(loss.kwargs))
    if clml.authors_release:
        term: nn.Module | None = AuthorsCLMLLoss(lam=clml.lam, delta=clml.delta)
    elif clml.enabled:
        term = CLMLLoss(clml.lam, clml.delta, clml.local_weight, clml.global_weight, check_values=False)
    else:
        term = None
    # Correction feeds the CLML groups, and the base loss too with correct_base (also without a CLML term).
    read = clml.enabled or clml.authors_release or clml.correct_base
    correction = CorrectionSchedule(
        enabled=clml.correction and read,
        start_epoch=clml.correction_start_epoch,
        tau=clml.tau,
        quantile=clml.quantile or None,
        feeds_base=clml.correct_base,
    )
    rate = loss.llr_rate_per_epoch if loss.base == "ll-r" else None
    gr_epochs = config.optim.epochs if loss.base == "gr" else None  # GR-Loss's K and V move over the run
    inputs = BaseLossInputs(splc_start_epoch=loss.splc_start_epoch, reject_rate_per_epoch=rate, gr_epochs=gr_epochs)
    scale = dist_utils.world_size() if loss.reduction == "sum" else 1  # see clml_core.distributed
    return TrainingObjective(base, term, correction, inputs, base_scale=scale, scorer=scorer)


def _stateful_method(config: TrainConfig, train: Any) -> nn.Module:
    """The stateful method ``config.loss.base`` for the training split ``train``."""
    loss = config.loss
    if train is None:
        raise ValueError(f"loss.base={loss.base!r} keeps per-image state: build_objective needs the training split")
    if dist_utils.world_size() > 1:
        raise ValueError(
            f"loss.base={loss.base!r} keeps per-image state, which this engine does not share between DDP processes; "
            "train it in one process"
        )
    context = MethodContext(
        observed=torch.tensor(train.observed),  # a copy: the split's array may be read-only
        num_epochs=config.optim.epochs,
        seed=config.seed,
        rate_per_epoch=loss.llr_rate_per_epoch,
        mean_label_count=float(train.labels.sum(axis=1).mean()),
    )
    return make_stateful_loss(loss.base, context, reduction=loss.reduction, **dict(loss.kwargs))


def loop_settings(config: TrainConfig) -> LoopSettings:
    optim = config.optim
    if optim.early_stop != "off" and dist_utils.world_size() > 1:
        raise ValueError(
            "config field 'optim.early_stop': the rule reads the validation mAP, which only the main process of a "
            "DDP run computes; train in one process or set optim.early_stop=off"
        )
    return LoopSettings(
        name=config.name,
        last_epoch=optim.stop_epoch or optim.epochs,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        progress=config.progress,
        tensorboard=config.tensorboard,
        save_embeddings=config.save_embeddings,
        amp=optim.amp,
        channels_last=config.model.channels_last,
        grad_clip=optim.grad_clip,
        static_loss_scale=optim.loss_scale if not optim.loss_scale_doublings else 0.0,
        early_stop=EarlyStop(optim.early_stop, optim.early_stop_points),
    )
