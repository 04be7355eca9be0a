"""Training configuration: typed dataclasses, named presets, YAML files and ``key=value`` overrides.

A configuration is resolved in this order: preset, then ``--config FILE.yaml``, then ``section.field=value``
overrides from the command line or a notebook. The resolved configuration is written next to every run.

A choice field is a ``Literal`` of its values: :func:`apply_updates` refuses any other value, naming the field and the
valid ones, and :func:`choices` gives them to a command line. Each section checks itself (its ``validate`` method);
:func:`validate_config` runs them and the checks between sections.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import yaml

from clml_core.losses import BASE_LOSSES, CLMLLoss, make_base_loss
from clml_core.losses.stateful import STATEFUL_LOSSES, MethodContext, make_stateful_loss
from clml_core.models import ARCHS

#: Sizes of the embedded benchmark selected by ``data.synthetic_size`` (keyword arguments of SyntheticConfig).
SYNTHETIC_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_train": 384, "n_val": 128, "n_test": 256},
    "default": {},
}


@dataclass
class DataConfig:
    """Dataset, missing-label protocol and loading."""

    dataset: Literal["synthetic", "coco", "voc", "nuswide"] = "synthetic"
    root: str = ""  # the root folder of a real dataset
    train_split: str = ""  # e.g. train2014, trainval; "" = the dataset's default
    test_split: str = ""  # e.g. val2014, test; "" = the dataset's default
    test_fraction: float = 0.0  # > 0: carve the test split from the training split instead (seeded by split_seed)
    split_seed: int = 0  # seed of the test carve (fixed across runs so every run scores the same test images)
    synthetic_size: str = "default"  # size preset of the embedded benchmark: a key of SYNTHETIC_SIZES
    synthetic_seed: int = 0  # the generated dataset's own seed (independent of the run seed)
    synthetic_image_size: int = 0  # side the benchmark is generated at (0: image_size); loaders resize to image_size
    image_size: int = 32  # 0 = the backbone's native input size (its preprocessing)
    protocol: Literal["full", "keep_fraction", "single_positive", "cole", "file"] = "keep_fraction"
    fraction: float = 0.4  # kept share of positives for keep_fraction
    observed_file: str = ""  # pinned observed training labels in the split-file format (protocol=file)
    protocol_seed: int = 0  # seed of the protocol draw and the validation carve (a study adds the run seed to it)
    val_fraction: float = 0.1  # validation split carved from train
    val_labels: Literal["observed", "full"] = "observed"  # which labels validation mAP uses for model selection
    augment: Literal["none", "authors", "crop_flip"] = "none"  # authors: RandAugment + Cutout (the authors' recipe)
    # model.train_mode=frozen: augmented views of each training image in the feature store; partial: in the trunk
    # store (model.trunk_cache), recomputed from the image files at every step with model.trunk_cache=false
    feature_views: int = 0
    # the stored views are drawn under the run seed (a store per seed) instead of one pool (seed 0) that every seed
    # draws its own sequence of views from
    views_per_seed: bool = False
    packed_cache: bool = False  # decode real images once per split into a memory-mapped cache at image_size
    cache_format: Literal["raw", "jpeg"] = "raw"  # raw: uint8 pixels, 3*S*S bytes an image; jpeg: about a tenth
    cache_quality: int = 90  # JPEG quality of a jpeg cache
    # device: batches of a real dataset's jpeg cache without a per-image transform (validation, test, and training
    # without augmentation) are decoded on the device in one call (nvJPEG on a GPU)
    decode: Literal["workers", "device"] = "workers"
    cache_dir: str = ""  # where packed caches live ("" = data/cache)
    workers: int = 0
    limit_train: int = 0  # use only the first N training images (0 = all); for smoke tests

    def validate(self) -> None:
        """Raise ValueError naming the first field of this section that is out of range or contradicts another."""
        minimum = {
            "split_seed": 0,
            "synthetic_seed": 0,
            "synthetic_image_size": 0,
            "image_size": 0,
            "protocol_seed": 0,
            "feature_views": 0,
            "cache_quality": 1,
            "workers": 0,
            "limit_train": 0,
        }
        _check_fields(self, "data.", minimum)
        if self.synthetic_size not in SYNTHETIC_SIZES:
            _fail("data.synthetic_size", f"{self.synthetic_size!r} is not one of {', '.join(SYNTHETIC_SIZES)}")
        if self.cache_quality > 100:
            _fail("data.cache_quality", f"must be in [1, 100], got {self.cache_quality}")
        if not 0.0 < self.fraction <= 1.0:
            _fail("data.fraction", f"must be in (0, 1], got {self.fraction}")
        if not 0.0 < self.val_fraction < 1.0:
            _fail("data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if 0 < self.image_size < 8:
            _fail("data.image_size", f"must be 0 (the backbone's) or >= 8, got {self.image_size}")
        if not 0.0 <= self.test_fraction < 1.0:
            _fail("data.test_fraction", f"must be in [0, 1), got {self.test_fraction}")
        if self.protocol == "file" and not self.observed_file:
            _fail("data.observed_file", "required when data.protocol is 'file'")
        if self.dataset != "synthetic" and not self.root:
            _fail("data.root", f"required for dataset {self.dataset!r}")
        self._check_contradictions()

    def _check_contradictions(self) -> None:
        """Fields that only mean something for another setting of a field: an error naming both, never ignored."""
        if self.dataset != "synthetic" and self.synthetic_image_size:
            raise ValueError(
                f"config fields 'data.dataset' and 'data.synthetic_image_size' contradict: data.synthetic_image_size="
                f"{self.synthetic_image_size} sizes the embedded benchmark, but data.dataset={self.dataset!r}"
            )
        if self.dataset == "synthetic":
            for key in ("root", "train_split", "test_split"):
                if getattr(self, key):
                    raise ValueError(
                        f"config fields 'data.dataset' and 'data.{key}' contradict: data.{key}={getattr(self, key)!r} "
                        "names real data, but data.dataset='synthetic' is the embedded benchmark, which reads no "
                        f"files; set data.dataset to coco, voc or nuswide, or leave data.{key} empty"
                    )
        jpeg_cache = self.packed_cache and self.cache_format == "jpeg"
        if self.decode == "device" and self.dataset != "synthetic" and not jpeg_cache:
            raise ValueError(
                "config fields 'data.decode' and 'data.packed_cache'/'data.cache_format' contradict: data.decode="
                f"'device' decodes a JPEG cache, but data.packed_cache={self.packed_cache}, data.cache_format="
                f"{self.cache_format!r}"
            )
        if self.observed_file and self.protocol != "file":
            raise ValueError(
                f"config fields 'data.protocol' and 'data.observed_file' contradict: data.observed_file="
                f"{self.observed_file!r} is read only with data.protocol='file', but data.protocol={self.protocol!r}"
            )


@dataclass
class ModelConfig:
    arch: str = "smallcnn"  # a name in clml_core.models.ARCHS
    weights: str | None = None  # None | imagenet | a torchvision weights name | a local .pth path
    widths: list[int] | None = None  # stage widths of smallcnn (None: the model's default)
    proj_dim: int | None = None  # optional projection head; CLML then acts on its output
    proj_hidden_dim: int | None = None  # the head's hidden width (None: the backbone's num_features)
    classify_embeddings: bool = False  # the classifier reads the head's output (with a frozen backbone: the paper's
    # coupling, the classifier sees the structure CLML imposes) instead of the pooled features
    # end_to_end: everything trains | partial: the last trainable_stages backbone stages train | frozen: the backbone
    # runs once per image (and augmented view) into a feature store; only the projection head and classifier train
    train_mode: Literal["end_to_end", "partial", "frozen"] = "end_to_end"
    trainable_stages: int = 0  # train_mode=partial: backbone stages that train, counted from the output side
    # train_mode=partial: the frozen stages' output is computed once per image and view and stored, and the trainable
    # stages train from it. Applies with given weights, image files and data.augment=none or data.feature_views > 0
    # (clml_core.build.uses_trunk_cache); false runs the frozen stages at every step
    trunk_cache: bool = True
    channels_last: bool = False
    compile: bool = False
    # linear: a linear classifier on the pooled features | boostlu: a 1x1 convolution on the feature map whose
    # positive class activations are boosted (x5) before the spatial mean (Kim et al., CVPR 2023); not with frozen
    head: Literal["linear", "boostlu"] = "linear"

    def validate(self) -> None:
        """Raise ValueError naming the first field of this section that is out of range or contradicts another."""
        _check_fields(self, "model.", {"trainable_stages": 0})
        if self.arch not in ARCHS:
            _fail("model.arch", f"{self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.head == "boostlu" and self.classify_embeddings:
            _fail("model.head", "boostlu classifies the backbone's feature map, not the embeddings: it cannot be "
                  "combined with model.classify_embeddings")  # fmt: skip
        if (self.train_mode == "partial") != (self.trainable_stages > 0):
            _fail(
                "model.trainable_stages",
                f"train_mode=partial needs trainable_stages >= 1 and only partial uses it (got {self.train_mode!r}, "
                f"{self.trainable_stages})",
            )
        if self.widths is not None and (not self.widths or min(self.widths) < 1):
            _fail("model.widths", f"must be a non-empty list of positive integers, got {self.widths}")
        if self.classify_embeddings and self.proj_dim is None:
            _fail("model.classify_embeddings", "needs a projection head (model.proj_dim)")
        if self.proj_hidden_dim is not None and (self.proj_dim is None or self.proj_hidden_dim < 1):
            _fail("model.proj_hidden_dim", f"needs model.proj_dim and must be >= 1, got {self.proj_hidden_dim}")
        if self.proj_dim is not None and self.proj_dim < 1:
            _fail("model.proj_dim", f"must be None or >= 1, got {self.proj_dim}")


@dataclass
class LossConfig:
    # a name in clml_core.losses.BASE_LOSSES, or a method with its own state in clml_core.losses.stateful
    # STATEFUL_LOSSES (role, ll-ct, ll-cp, em-apl); checked by building the loss
    base: str = "bce"
    # sum: over batch x classes, the authors' convention (lambda = 1 as in the paper)
    reduction: Literal["sum", "mean"] = "sum"
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra base-loss hyperparameters
    splc_start_epoch: int = 1  # epoch from which SPLC's own correction is active
    # LL's delta_rel as a share: LL-R's rejection rate and LL-Ct's correction rate grow by this each epoch; LL-Cp
    # corrects (and flips) this share of each batch from the second epoch
    llr_rate_per_epoch: float = 0.002
    estimator_lr_mult: float = 10.0  # role: the label estimate's learning rate, times optim.lr (Cole et al.: 10)

    def validate(self, num_epochs: int = 1_000_000) -> None:
        """Raise ValueError naming the first bad field; the base loss is built once, so a bad ``kwargs`` entry fails
        now, not at the first training step. ``num_epochs`` is the run's (EM + APL's warm-up must be shorter);
        :class:`TrainConfig` passes it."""
        _check_fields(self, "loss.", {"splc_start_epoch": 0, "llr_rate_per_epoch": 0})
        if not self.estimator_lr_mult > 0:
            _fail("loss.estimator_lr_mult", f"must be > 0, got {self.estimator_lr_mult}")
        if self.base == "gr" and {"k", "v"} & set(self.kwargs):
            _fail(
                "loss.kwargs", "gr's k and v follow GR-Loss's schedule over the run (losses.gr_schedule); give q only"
            )
        known = (*BASE_LOSSES, *STATEFUL_LOSSES)
        if self.base not in known:
            _fail("loss.base", f"unknown base loss {self.base!r}; valid names: {', '.join(known)}")
        try:
            if self.base in STATEFUL_LOSSES:  # a placeholder training split: this checks the hyperparameters
                context = MethodContext(torch.tensor([[1, 0]]), num_epochs=num_epochs, rate_per_epoch=1.0)
                make_stateful_loss(self.base, context, reduction=self.reduction, **self.kwargs)
            else:
                make_base_loss(self.base, reduction=self.reduction, **self.kwargs)
        except (TypeError, ValueError) as error:
            _fail("loss.kwargs", str(error))


@dataclass
class CLMLConfig:
    enabled: bool = False
    lam: float = 1.0
    delta: float = 1.0
    local_weight: float = 1.0
    global_weight: float = 1.0
    correction: bool = True  # label correction for the CLML groups
    tau: float = 0.6
    quantile: float = 0.0  # 0: tau alone; else also above this per-class quantile of the batch's unobserved scores
    correction_start_epoch: int = 1  # 0-based epoch from which correction is on
    correct_base: bool = False  # corrected labels also feed the base loss (the authors: no)
    authors_release: bool = False  # the authors' implementation: backward ignores the incoming gradient

    def validate(self) -> None:
        """Raise ValueError naming the first field of this section that is out of range."""
        minimum = {"lam": 0, "delta": 0, "local_weight": 0, "global_weight": 0, "correction_start_epoch": 0}
        _check_fields(self, "clml.", minimum)
        if not 0.0 < self.tau < 1.0:
            _fail("clml.tau", f"must be in (0, 1), got {self.tau}")
        if not 0.0 <= self.quantile < 1.0:
            _fail("clml.quantile", f"must be in [0, 1) (0: off), got {self.quantile}")
        CLMLLoss(self.lam, self.delta, self.local_weight, self.global_weight)


@dataclass
class OptimConfig:
    epochs: int = 10  # length of the schedule
    stop_epoch: int = 0  # stop after this many epochs of the schedule (0 = epochs); the authors: 26 of 80
    batch_size: int = 64  # the GLOBAL batch B (of the CLML term and the summed base loss); each DDP rank takes B / W
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Literal["onecycle", "constant"] = "onecycle"
    pct_start: float = 0.2
    ema_decay: float = 0.0  # 0 disables EMA; the authors use 0.9997
    amp: Literal["off", "bf16", "fp16"] = "off"  # fp16 uses PyTorch's dynamic GradScaler from 65536 (no loss_scale)
    # Loss scaling in any precision, on CPU too (0 = none): the loss is multiplied by the scale before backward and
    # the gradients divided by it before the step. Static, or with loss_scale_doublings > 0 a dynamic GradScaler
    # from loss_scale that doubles every (run steps / loss_scale_doublings) overflow-free steps and halves on an
    # overflow, skipping that step. The authors' release: 65536 doubling every 2000 of its 26 x 1283 steps
    # (16.68 doublings, 2^32 at the end; see AUTHORS).
    loss_scale: float = 0.0
    loss_scale_doublings: float = 0.0
    grad_clip: float = 0.0
    classifier_lr_mult: float = 1.0  # the classifier's learning rate, times lr (LL, BoostLU and GR-Loss: 10)
    # off | no_improvement: stop after the first epoch whose validation mAP is no new best (Zhou et al.'s EM) |
    # below_best: stop after an epoch more than early_stop_points mAP points below the best (LL: 3, GR-Loss: 2)
    early_stop: Literal["off", "no_improvement", "below_best"] = "off"
    early_stop_points: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first field of this section that is out of range or contradicts another."""
        minimum = {
            "epochs": 1,
            "batch_size": 1,
            "weight_decay": 0,
            "loss_scale": 0,
            "loss_scale_doublings": 0,
            "grad_clip": 0,
            "early_stop_points": 0,
        }
        _check_fields(self, "optim.", minimum)
        if not self.lr > 0:
            _fail("optim.lr", f"must be > 0, got {self.lr}")
        if not self.classifier_lr_mult > 0:
            _fail("optim.classifier_lr_mult", f"must be > 0, got {self.classifier_lr_mult}")
        if self.early_stop_points and self.early_stop != "below_best":
            _fail("optim.early_stop_points", f"only optim.early_stop=below_best reads it (got {self.early_stop!r})")
        if not 0 <= self.stop_epoch <= self.epochs:
            _fail("optim.stop_epoch", f"must be in [0, optim.epochs = {self.epochs}], got {self.stop_epoch}")
        if not 0.0 < self.pct_start < 1.0:
            _fail("optim.pct_start", f"must be in (0, 1), got {self.pct_start}")
        if not 0.0 <= self.ema_decay < 1.0:
            _fail("optim.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.amp == "fp16" and self.loss_scale:
            raise ValueError(
                f"config fields 'optim.amp' and 'optim.loss_scale' contradict: optim.amp='fp16' scales the loss with "
                f"PyTorch's dynamic GradScaler (from 65536), and optim.loss_scale={self.loss_scale} is the scale of a "
                "run without fp16; set optim.loss_scale to 0, or optim.amp to off or bf16"
            )
        if self.loss_scale_doublings and not self.loss_scale:
            raise ValueError(
                f"config fields 'optim.loss_scale_doublings' and 'optim.loss_scale' contradict: "
                f"optim.loss_scale_doublings={self.loss_scale_doublings} grows a loss scale, but optim.loss_scale is 0 "
                "(no scaling); set the starting scale, e.g. optim.loss_scale=65536"
            )


@dataclass
class TrainConfig:
    name: str = "run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    checkpoint_every: int = 0  # also checkpoint every N steps inside an epoch (0 = at epoch ends only)
    log_every: int = 50  # read the logged loss terms from the device every N steps (a host synchronisation)
    save_embeddings: bool = True  # test-set embeddings of the selected model and training-set scores, for notebooks
    tensorboard: bool = False  # also log step and epoch scalars to out/tensorboard (needs the tensorboard extra)
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    clml: CLMLConfig = field(default_factory=CLMLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field: the run's own fields, then each section, then the checks
        between sections."""
        _check_fields(self, "", {"seed": 0, "threads": 0, "checkpoint_every": 0, "log_every": 1})
        if not self.name or "/" in self.name:
            _fail("name", f"must be a non-empty name without '/', got {self.name!r}")
        self.data.validate()
        self.model.validate()
        self.loss.validate(num_epochs=self.optim.epochs)
        self.clml.validate()
        self.optim.validate()
        _check_across_sections(self)


def _merged(preset: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``preset`` with ``updates`` applied section by section (one level deep)."""
    merged = copy.deepcopy(preset)
    for key, value in updates.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


#: Cole et al.'s single-positive harness (CVPR 2021, ``elijahcole/single-positive-multi-label``) end to end: their
#: observed labels and validation carve (data.protocol=cole, seed 1200, 20 %), selection on the full validation
#: labels, the official test split, ResNet-50 (ImageNet weights) at 448 px, Adam without weight decay or schedule,
#: the harness's mean reduction, AN (pick the method with loss.base), no CLML term. Their batch x lr grid ({8, 16} x
#: {1e-2, 1e-3, 1e-4, 1e-5}, best on clean validation) is the study's to search: override optim.batch_size and
#: optim.lr. Where ours differs: the ResNets here take [0, 1] images (theirs ImageNet-normalised), no training
#: augmentation (theirs a horizontal flip; data.augment has no flip alone), and data.dataset=voc is VOC2007
#: trainval/test (theirs VOC2012 train/val).
COLE_E2E: dict[str, Any] = {
    "name": "cole_e2e",
    "data": {
        "dataset": "voc",
        "image_size": 448,
        "protocol": "cole",
        "protocol_seed": 1200,
        "val_fraction": 0.2,
        "val_labels": "full",
    },
    "model": {"arch": "resnet50", "weights": "imagenet", "train_mode": "end_to_end"},
    "loss": {"base": "an", "reduction": "mean"},
    "clml": {"enabled": False},
    "optim": {"epochs": 10, "batch_size": 8, "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"},
}


#: The data of the presets on real photos (real, real_partial, real_finetune): a VOC2007 sample with no test split of
#: its own, 30% carved as test, 15% of the rest as validation, the backbone's input size, single positive (1.40 labels
#: per image: keep_fraction needs fraction >= 0.73 there), random-resized crop and flip.
_VOC_SAMPLE: dict[str, Any] = {
    "dataset": "voc",
    "image_size": 0,
    "test_fraction": 0.3,
    "val_fraction": 0.15,
    "protocol": "single_positive",
    "augment": "crop_flip",
}

#: Named starting configurations (``--preset``); each study profile names its own under ``PRESET``
#: (``clml_core.study.PROFILES``, checked there).
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded benchmark, tiny: under a minute on a 2-core CPU, two epochs, a checkpoint after each.
    "smoke": {
        "name": "smoke",
        "data": {"synthetic_size": "tiny", "image_size": 32},
        "model": {"arch": "smallcnn", "widths": [16, 32, 64, 128], "channels_last": True},
        "clml": {"enabled": True, "correction_start_epoch": 1},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 2e-3},
    },
    # The embedded benchmark at the size the CPU study uses. 6 epochs (the study used 8 before it had 5 seeds): over
    # 3 seeds the same test mAP within the seed spread for bce, hill and asl with and without CLML (docs/results.md).
    # channels_last: a quarter less time a step on one CPU thread (with the fused Adam step, measured in one process).
    "default": {
        "name": "default",
        "data": {"synthetic_size": "default", "image_size": 32},
        "model": {"arch": "smallcnn", "widths": [16, 32, 64, 128], "channels_last": True},
        "clml": {"enabled": True},
        "optim": {"epochs": 6, "batch_size": 32, "lr": 2e-3},
    },
    # Real photos on a 2-core CPU (the `real` study profile): the VOC2007 trainval sample (996 photos, test and
    # validation carved from it), ImageNet EfficientNet-Lite0 frozen, its features cached once with 4 augmented views;
    # runs train the projection head (CLML acts on its output) and the classifier reading it. Its 15 epochs and the
    # 256-wide head were set in commit ac95957 (from 20 epochs) with no record of the criterion: they are fixed
    # choices, not values shown to have been tuned on the validation split alone (docs/results.md says so).
    "real": {
        "name": "real",
        "data": {**_VOC_SAMPLE, "feature_views": 4},
        "model": {
            "arch": "efficientnet_lite0",
            "weights": "imagenet",
            "train_mode": "frozen",
            "proj_dim": 256,
            "proj_hidden_dim": 256,
            "classify_embeddings": True,
        },
        "clml": {"enabled": True},
        "optim": {"epochs": 15, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-4},
    },
    # Fine-tuning showcase beside it: the last stages of EfficientNet-Lite0 train (stem and first three block stages
    # frozen), on the same carved splits, channels_last (depthwise convolutions are much faster so on a CPU).
    "real_partial": {
        "name": "real_partial",
        "data": {**_VOC_SAMPLE, "packed_cache": True},
        "model": {
            "arch": "efficientnet_lite0",
            "weights": "imagenet",
            "train_mode": "partial",
            "trainable_stages": 5,
            "channels_last": True,
        },
        "clml": {"enabled": True},
        "optim": {"epochs": 3, "batch_size": 32, "lr": 3e-4, "weight_decay": 1e-4},
    },
    # CLML where the paper puts it, on real photos at CPU speed: the VOC2007 sample and splits of `real`, ImageNet
    # EfficientNet-Lite0 with its last block stage and head convolution trainable from the stored output of the frozen
    # stages (model.trunk_cache), CLML and the classifier on the 1280-d pooled features (no projection head), 8 stored
    # crop_flip views per image in one pool every seed draws its own sequence from.
    # trainable_stages=2 (block stage 7 + head conv): a step from the stored 192x7x7 activations ran 4.7x (here,
    # loaded) to 8x (issue 19) faster than from images; with 3 stages (112x14x14 stored) 1.6x to 3x, short of 4x.
    # lr and epochs chosen on the validation split only (seed 0, bce + CLML, single positive; best validation mAP of
    # the run, the engine's selection; test never looked at): lr 3e-4 / 1e-3 / 3e-3 / 1e-2 over 8 epochs gave 33.7 /
    # 43.1 / 50.9 / 40.6, and 3e-3 over 5 / 12 epochs 44.1 / 41.0 (the validation mAP of ~100 single-positive images
    # moves by several points between epochs: 3e-3 with 5 to 12 epochs are within that noise).
    "real_finetune": {
        "name": "real_finetune",
        "data": {**_VOC_SAMPLE, "feature_views": 8},
        "model": {
            "arch": "efficientnet_lite0",
            "weights": "imagenet",
            "train_mode": "partial",
            "trainable_stages": 2,
            "trunk_cache": True,
            "proj_dim": None,
            "channels_last": True,
        },
        "clml": {"enabled": True},
        "optim": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-4},
    },
    # The authors' recipe: ResNet101 at 448 px, Adam 1e-4, OneCycle, weight decay 1e-4 off bias and norm layers,
    # EMA 0.9997, RandAugment + Cutout, a global batch of 64 (split over DDP ranks), 80 epochs, fp16 AMP. Needs a GPU
    # and a dataset root.
    "paper": {
        "name": "paper",
        "data": {
            "dataset": "coco",
            "image_size": 448,
            "augment": "authors",
            "packed_cache": True,
            "cache_format": "jpeg",  # COCO-2014 at 448 px: 74 GB raw, more than a 64 GiB disk
            "decode": "device",
            "workers": 8,
        },
        "model": {"arch": "resnet101", "weights": "imagenet", "channels_last": True},
        "loss": {"base": "hill"},
        "clml": {"enabled": True},
        "optim": {
            "epochs": 80,
            "stop_epoch": 26,
            "batch_size": 64,
            "lr": 1e-4,
            "weight_decay": 1e-4,
            "schedule": "onecycle",
            "pct_start": 0.2,
            "ema_decay": 0.9997,
            "amp": "bf16",
        },
    },
    # Cole et al.'s harness (see COLE_E2E): end_to_end, 10 epochs.
    "cole_e2e": COLE_E2E,
    # Cole's linear_fixed_features: a linear classifier on the frozen backbone's cached features, 25 epochs.
    "cole_linear": _merged(
        COLE_E2E, {"name": "cole_linear", "model": {"train_mode": "frozen"}, "optim": {"epochs": 25}}
    ),
    # The descendants' deviations from Cole's harness, each by name (their published presets; end to end only):
    # LL (Kim et al., CVPR 2022): the classifier at 10 x lr, batch 16, lr 1e-5, stop after an epoch more than 3 mAP
    # points below the best validation mAP. Choose ll-r, ll-ct or ll-cp (and loss.llr_rate_per_epoch) with loss.base.
    "cole_e2e_ll": _merged(
        COLE_E2E,
        {
            "name": "cole_e2e_ll",
            "optim": {
                "batch_size": 16,
                "lr": 1e-5,
                "classifier_lr_mult": 10.0,
                "early_stop": "below_best",
                "early_stop_points": 3.0,
            },
        },
    ),  # fmt: skip
    # GR-Loss (Chen et al., IJCAI 2024): the classifier at 10 x lr, 8 epochs (the schedule of K and V spans them),
    # batch 8, lr 1e-5, stop 2 points below the best.
    "cole_e2e_gr": _merged(
        COLE_E2E,
        {
            "name": "cole_e2e_gr",
            "loss": {"base": "gr"},
            "optim": {
                "epochs": 8,
                "batch_size": 8,
                "lr": 1e-5,
                "classifier_lr_mult": 10.0,
                "early_stop": "below_best",
                "early_stop_points": 2.0,
            },
        },
    ),  # fmt: skip
    # EM / EM + APL (Zhou et al., ECCV 2022): one learning rate, batch 8 and lr 1e-5 (VOC; COCO and NUS-WIDE: 16),
    # stop after the first epoch whose validation mAP is no new best. Their per-dataset alpha, beta and warm-up go
    # in loss.kwargs.
    "cole_e2e_em": _merged(
        COLE_E2E,
        {"name": "cole_e2e_em", "optim": {"batch_size": 8, "lr": 1e-5, "early_stop": "no_improvement"}},
    ),
    # BoostLU (Kim et al., CVPR 2023): the boosted CAM head (model.head=boostlu) at 10 x lr, batch 16, lr 1e-5, all
    # 10 epochs (no early stop). Its headline pairs it with LL-R: loss.base=ll-r.
    "cole_e2e_boostlu": _merged(
        COLE_E2E,
        {
            "name": "cole_e2e_boostlu",
            "model": {"head": "boostlu"},
            "optim": {"batch_size": 16, "lr": 1e-5, "classifier_lr_mult": 10.0},
        },
    ),
}


#: The authors' release (github chuangua/ContrastiveLossMLML) as it ran, as configuration overrides.
#: ``"run"`` is how it trained: its CLML implementation, whose backward ignores the incoming gradient
#: (``clml.authors_release``), in fp32 without autocast behind a dynamic GradScaler that starts at 65536 and doubles
#: every 2000 overflow-free steps; over its 26 epochs of 1283 steps that is 16.68 doublings, so its CLML gradient
#: ends divided by 2^32 (about 4e9), not 65536. ``optim.loss_scale_doublings`` spreads the same doublings over a
#: run's own steps, so a short CPU run ends at the same scale. ``"values"`` are its hyperparameters where they differ
#: from ours: label-correction threshold 0.75 (its training script's default; the command in its README passes 0.8;
#: ours is SPLC's 0.6), and in ``"base_kwargs"`` per base loss: SPLC tau 0.7 (ours: SPLC's published 0.6) and Focal
#: without gradient through its focusing weight (ours: Lin et al.'s, with it). See :func:`authors_overrides`.
AUTHORS: dict[str, Any] = {
    "run": {
        "clml": {"authors_release": True},
        "optim": {"amp": "off", "loss_scale": 65536.0, "loss_scale_doublings": 26 * 1283 / 2000},
    },
    "values": {"clml": {"tau": 0.75}},
    "base_kwargs": {"splc": {"tau": 0.7}, "focal": {"detach_focal_weight": True}},
}


def authors_overrides(base: str, values: bool) -> dict[str, Any]:
    """Overrides that train like the authors' release (``AUTHORS["run"]``), with its hyperparameters for base loss
    ``base`` too when ``values`` (``AUTHORS["values"]`` and ``AUTHORS["base_kwargs"][base]``)."""
    overrides = copy.deepcopy(AUTHORS["run"])
    if values:
        overrides["clml"].update(AUTHORS["values"]["clml"])
        if base in AUTHORS["base_kwargs"]:
            overrides["loss"] = {"kwargs": dict(AUTHORS["base_kwargs"][base])}
    return overrides


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(cls)


def _literal_choices(annotation: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` annotation; () for any other annotation."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def choices(section: type, name: str) -> tuple[str, ...]:
    """The values a choice field accepts, in declared order, e.g. for an argparse ``choices``.

    ``choices(DataConfig, "dataset")`` -> ``("synthetic", "coco", "voc", "nuswide")``. Fields checked against a
    registry instead (``model.arch``: ``models.ARCHS``, ``loss.base``: ``losses.BASE_LOSSES``, ``data.synthetic_size``:
    ``SYNTHETIC_SIZES``) are no ``Literal`` and raise here.
    """
    hints = _hints(section)
    if name not in hints:
        raise ValueError(f"{section.__name__} has no field {name!r} (fields: {', '.join(hints)})")
    valid = _literal_choices(hints[name])
    if not valid:
        raise ValueError(f"{section.__name__}.{name} is not a choice field (its annotation is {hints[name]!r})")
    return valid


def _fail(key: str, message: str) -> NoReturn:
    raise ValueError(f"config field {key!r}: {message}")


def _check_fields(section: Any, prefix: str, minimum: dict[str, float]) -> None:
    """The checks every section makes first: each number finite, each choice field one of its ``Literal`` values,
    and each field in ``minimum`` at least its bound. ``prefix`` is the section's key (``"data."``)."""
    for name, annotation in _hints(type(section)).items():
        value = getattr(section, name)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(prefix + name, f"expected a finite number, got {value}")
        valid = _literal_choices(annotation)
        if valid and value not in valid:
            _fail(prefix + name, f"{value!r} is not one of {', '.join(valid)}")
    for name, low in minimum.items():
        if getattr(section, name) < low:
            _fail(prefix + name, f"must be >= {low}, got {getattr(section, name)}")


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"config field {key!r}: expected a boolean (true/false), got {text!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert ``value`` (a YAML value or a command-line string) to the field's type, strictly."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if not (isinstance(value, str) and value in args):
            # YAML reads an unquoted off/on/yes/no as a boolean
            hint = " (a YAML boolean: quote the value)" if isinstance(value, bool) else ""
            raise ValueError(f"config field {key!r}: {value!r} is not one of {', '.join(args)}{hint}")
        return value
    if origin is typing.Union or (origin is not None and type(None) in args):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return _coerce(value, inner[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value, key)
        raise ValueError(f"config field {key!r}: expected a boolean, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"config field {key!r}: expected a number, got a boolean")
        kind = "an integer" if annotation is int else "a number"
        try:
            number = float(value) if annotation is float else int(str(value), 0) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"config field {key!r}: expected {kind}, got {value!r}") from None
        if annotation is int and (not isinstance(number, int) or isinstance(number, bool)):
            raise ValueError(f"config field {key!r}: expected an integer, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"config field {key!r}: expected a string, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config field {key!r}: expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"config field {key!r}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"config field {key!r}: unsupported annotation {annotation!r}")


def apply_updates(config: TrainConfig, updates: dict[str, Any], source: str = "override") -> TrainConfig:
    """Return a copy of ``config`` with nested ``updates`` applied (unknown fields raise, naming the source)."""

    def merge(obj: Any, upd: dict[str, Any], prefix: str) -> Any:
        hints = _hints(type(obj))
        changes = {}
        for key, value in upd.items():
            dotted = f"{prefix}{key}"
            if key not in hints:
                valid = ", ".join(sorted(hints))
                raise ValueError(f"{source}: unknown config field {dotted!r} (valid here: {valid})")
            current = getattr(obj, key)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: config field {dotted!r} is a section; give a mapping")
                changes[key] = merge(current, value, dotted + ".")
            else:
                try:
                    changes[key] = _coerce(value, hints[key], dotted)
                except ValueError as error:
                    raise ValueError(f"{source}: {error}") from None
        return dataclasses.replace(obj, **changes)

    return merge(config, updates, "")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "clml.enabled=false"]`` -> nested dict of strings (typed later by the dataclasses)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML configuration file (a nested mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> TrainConfig:
    """Preset, then YAML file, then overrides (a nested dict, or ``section.field=value`` strings)."""
    config = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
        config = apply_updates(config, PRESETS[preset], source=f"preset {preset!r}")
    if config_file is not None:
        config = apply_updates(config, load_yaml(config_file), source=str(config_file))
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        config = apply_updates(config, overrides)
    validate_config(config)
    return config


def validate_config(config: TrainConfig, source: str = "") -> None:
    """Check every field's choice, range and type before any data is loaded; raise ValueError naming the field.

    Each section checks itself (:meth:`TrainConfig.validate`); the losses are built once too, so a bad
    ``loss.kwargs`` entry or CLML weight fails now, not at the first training step.

    Args:
        config: the configuration to check.
        source: where it came from (a file), put before the message; "" for none.
    """
    try:
        config.validate()
    except ValueError as error:
        if not source:
            raise
        raise ValueError(f"{source}: {error}") from None


def _check_across_sections(config: TrainConfig) -> None:
    """The data settings that depend on the model's training mode."""
    data, model = config.data, config.model
    if data.feature_views and model.train_mode not in ("frozen", "partial"):
        _fail("data.feature_views", "only used with model.train_mode=frozen or partial")
    if data.feature_views and data.augment == "none":
        _fail("data.feature_views", "the views are augmented; set data.augment")
    if data.views_per_seed and not data.feature_views:
        _fail("data.views_per_seed", "seeds the stored views; set data.feature_views")
    if model.train_mode == "frozen" and data.dataset == "synthetic":
        _fail("model.train_mode", "frozen needs a dataset of image files, not synthetic")
    if model.train_mode == "frozen" and model.head == "boostlu":
        _fail("model.head", "boostlu reads the backbone's feature map, but model.train_mode=frozen caches pooled "
              "features only; use end_to_end or partial, or model.head=linear")  # fmt: skip


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Inverse of :func:`to_dict` (e.g. a run folder's ``config.yaml``); ``source`` names it in errors."""
    config = apply_updates(TrainConfig(), data, source=source)
    validate_config(config, source)
    return config


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``["clml.lam: 1.0 -> 0.5", ...]``: the fields of two nested config dicts that differ."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
