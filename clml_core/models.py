"""Multi-label networks: a backbone, an optional projection head and a linear classifier.

The CLML term acts on ``ModelOutput.embeddings``. By default these are the backbone's pooled features (2048-d for
ResNet101, as in the paper) and the classifier reads the same tensor, so the low-rank structure CLML imposes is the
structure the classifier sees. With ``proj_dim`` set, a SimCLR-style head (Linear-BN-ReLU-Linear) maps the pooled
features to the embeddings; the classifier still reads the pooled features, so the logits have the same form in both
variants and the head only shapes the space the regulariser acts on (an ablation, not the paper's method).

Weights are always an explicit argument: ``None`` (random initialisation, what the tests use), ``"imagenet"``, a
torchvision weights enum name such as ``"IMAGENET1K_V2"``, or a local path to a state dict. Nothing downloads unless
ImageNet weights are asked for, and an offline machine gets a RuntimeError that says where to put the checkpoint.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

ARCHS = ("resnet101", "resnet50", "resnet18", "smallcnn")

_RESNETS: dict[str, tuple[Callable[..., torchvision.models.ResNet], type[WeightsEnum]]] = {
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights),
}
# "imagenet" means the original torchvision recipe (IMAGENET1K_V1), the one papers of the CLML period started from;
# pass "IMAGENET1K_V2" for the newer, stronger recipe.
_IMAGENET_ALIAS = "IMAGENET1K_V1"


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


class MultiLabelNet(nn.Module):
    """Backbone + optional projection head + linear classifier on the pooled features.

    Args:
        backbone: maps (B, 3, H, W) images to (B, num_features) pooled features.
        num_features: backbone feature dimension.
        num_classes: number of labels C.
        proj_dim: None for embeddings = pooled features (the paper); else the output size of a projection head.
        proj_hidden_dim: hidden size of the projection head; None uses ``num_features``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        proj_dim: int | None = None,
        proj_hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_features", num_features), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiLabelNet: {name} must be a positive int, got {value!r}")
        for name, value in (("proj_dim", proj_dim), ("proj_hidden_dim", proj_hidden_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MultiLabelNet: {name} must be None or a positive int, got {value!r}")
        if proj_dim is None and proj_hidden_dim is not None:
            raise ValueError("MultiLabelNet: proj_hidden_dim is set but proj_dim is None (no projection head)")
        self.backbone = backbone
        self.num_features = num_features
        self.head = (
            None if proj_dim is None else ProjectionHead(num_features, proj_hidden_dim or num_features, proj_dim)
        )
        self.embed_dim = num_features if proj_dim is None else proj_dim
        self.classifier = nn.Linear(num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images -> (B, num_features) pooled backbone features."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> ModelOutput:
        """(B, 3, H, W) images -> logits (B, C) and embeddings (B, embed_dim)."""
        features = self.forward_features(x)  # (B, num_features)
        embeddings = features if self.head is None else self.head(features)
        return ModelOutput(logits=self.classifier(features), embeddings=embeddings)


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


def _resolve_weights(arch: str, weights: str | os.PathLike | None) -> WeightsEnum | Path | None:
    if weights is None:
        return None
    enum = _RESNETS[arch][1] if arch in _RESNETS else None
    names = [] if enum is None else ["imagenet", *enum.__members__]
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
    # The ImageNet classifier ("fc.*") is replaced by our own, so its weights are dropped.
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


def build_model(
    arch: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    proj_dim: int | None = None,
    proj_hidden_dim: int | None = None,
    widths: Sequence[int] | None = None,
) -> MultiLabelNet:
    """Build a :class:`MultiLabelNet`.

    Args:
        arch: one of ``ARCHS``: "resnet101" (the paper), "resnet50", "resnet18" (torchvision), or "smallcnn" (fast
            CPU model for 64 x 64 inputs).
        num_classes: number of labels C.
        weights: backbone weights. None: random initialisation. "imagenet" (torchvision IMAGENET1K_V1) or a
            torchvision weights enum name such as "IMAGENET1K_V2": downloaded to, or read from,
            ``torch.hub.get_dir()/checkpoints``. A path: a local state dict of the torchvision model (keys ``fc.*``
            ignored) or of :class:`SmallCNN`.
        proj_dim: None for embeddings = pooled features; else the size of a projection head's output.
        proj_hidden_dim: hidden size of the projection head (default: num_features).
        widths: stage widths of "smallcnn" (default (32, 64, 128, 256)); not allowed for the ResNets.

    Returns:
        The model; ``num_features`` is 2048 for resnet50/101, 512 for resnet18 and ``widths[-1]`` for smallcnn.

    Raises:
        ValueError: unknown arch, bad sizes, or a state dict that does not fit.
        FileNotFoundError: ``weights`` is neither a known name nor an existing file.
        RuntimeError: ImageNet weights requested but not downloadable (the message says how to proceed).
    """
    if arch not in ARCHS:
        raise ValueError(f"build_model: unknown arch {arch!r}; valid names are {list(ARCHS)}")
    resolved = _resolve_weights(arch, weights)
    if arch == "smallcnn":
        backbone: nn.Module = SmallCNN(widths if widths is not None else (32, 64, 128, 256))
        num_features = backbone.num_features
    else:
        if widths is not None:
            raise ValueError(f"build_model({arch!r}): widths applies to 'smallcnn' only")
        resnet = _RESNETS[arch][0](weights=None)
        num_features = resnet.fc.in_features
        resnet.fc = nn.Identity()  # (B, num_features) pooled features out
        backbone = resnet
    if isinstance(resolved, Path):
        _load_backbone(backbone, _read_state_dict(resolved), str(resolved))
    elif resolved is not None:
        _load_backbone(backbone, _download_state_dict(arch, resolved), f"{arch} {resolved.name}")
    return MultiLabelNet(backbone, num_features, num_classes, proj_dim=proj_dim, proj_hidden_dim=proj_hidden_dim)
