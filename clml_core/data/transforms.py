"""Image augmentations on uint8 CHW tensors (torchvision.transforms.v2), as in the CLML/ASL training code.

The authors' training pipeline (inherited from ASL) is::

    Resize((size, size)) -> CutoutPIL(cutout_factor=0.5) -> RandAugment() -> ToTensor()

on PIL images. Here the same steps run on the uint8 (3, H, W) tensors that :class:`MultiLabelDataset` returns:
:class:`Cutout` reproduces ``CutoutPIL`` (a rectangle of half the image side, centred at a uniformly random
pixel, clipped at the border, filled with one uniformly random colour, applied to every image), and
RandAugment is torchvision's (2 ops, magnitude 9), which is what ``RandAugment()`` means in torchvision; the
ASL repository imports a third-party RandAugment whose op list and magnitudes differ slightly. Like the
authors, we do not normalise by default; ``normalize=True`` adds the ImageNet mean/std. Training and evaluation
normalise on the device instead, with the backbone's own mean and std (``clml_core.devices.to_input`` asks the
model's :class:`~clml_core.models.Preprocessing`). :func:`train_transform_for` picks a run's training
augmentation by its config name (data.augment): ``authors`` (the pipeline above) or ``crop_flip``.

Randomness comes from torch's global generator only (``torch.rand``/``torch.randint`` inside every random
step), so ``torch.manual_seed(s)`` before a call repeats it exactly. In a DataLoader each worker process
seeds torch from the loader's base seed plus its worker id, so a seeded loader ``generator`` makes the
augmentations of a whole epoch reproducible for a fixed number of workers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from clml_core.models import Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Cutout(nn.Module):
    """Paste one random-colour rectangle of ``factor`` times the image size at a random centre.

    Matches ASL's ``CutoutPIL``: for an image of height H and width W the rectangle spans rows
    ``clip(yc - h // 2, 0, H) .. clip(yc + h // 2, 0, H)`` inclusive (PIL's ``rectangle`` includes both
    corners) with ``h = int(factor * H + 0.5)`` and ``yc`` uniform in [0, H), likewise for columns; near a
    border the rectangle is cut off. The fill colour is uniform per channel over the dtype's range
    ([0, 255] for uint8, [0, 1) for floating point).

    Args:
        factor: Rectangle side as a fraction of the image side, in (0, 1].
    """

    def __init__(self, factor: float = 0.5) -> None:
        super().__init__()
        if not 0 < factor <= 1:
            raise ValueError(f"Cutout factor must be in (0, 1], got {factor}")
        self.factor = factor

    def forward(self, image: Tensor) -> Tensor:
        """Args: image (..., C, H, W) uint8 or floating point. Returns: a new tensor of the same shape."""
        if image.ndim < 3:
            raise ValueError(f"Cutout expects a (..., C, H, W) tensor, got shape {tuple(image.shape)}")
        channels, height, width = image.shape[-3:]
        cut_h, cut_w = int(self.factor * height + 0.5), int(self.factor * width + 0.5)
        yc, xc = int(torch.randint(height, ())), int(torch.randint(width, ()))
        y1, y2 = min(max(yc - cut_h // 2, 0), height), min(max(yc + cut_h // 2, 0), height)
        x1, x2 = min(max(xc - cut_w // 2, 0), width), min(max(xc + cut_w // 2, 0), width)
        if image.dtype == torch.uint8:
            colour = torch.randint(256, (channels,), dtype=torch.uint8)
        elif image.is_floating_point():
            colour = torch.rand(channels, dtype=image.dtype)
        else:
            raise ValueError(f"Cutout supports uint8 or floating-point images, got {image.dtype}")
        out = image.clone()
        out[..., y1 : y2 + 1, x1 : x2 + 1] = colour.to(image.device)[:, None, None]  # +1: inclusive corners
        return out

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _to_float(normalize: bool, to_float: bool = True) -> list[nn.Module]:
    if not to_float:
        if normalize:
            raise ValueError("normalize=True needs to_float=True: normalisation works on floats")
        return []
    steps: list[nn.Module] = [v2.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return steps


def train_transform(
    size: int, *, randaugment: bool = True, cutout: bool = True, normalize: bool = False, to_float: bool = True
) -> v2.Compose:
    """The authors' training augmentation for uint8 images.

    Resize((size, size)) -> Cutout(0.5) -> RandAugment() -> float32 in [0, 1] (-> ImageNet normalisation).

    Args:
        size: Output side in pixels.
        randaugment: Include RandAugment (2 ops, magnitude 9).
        cutout: Include :class:`Cutout` with factor 0.5.
        normalize: Subtract the ImageNet mean and divide by its std after scaling to [0, 1].
        to_float: End with the float32 conversion. False keeps uint8 (a quarter of the bytes a DataLoader
            worker hands over); the training engine converts on the device.

    Returns:
        A callable mapping a (3, H, W) uint8 tensor to a (3, size, size) float32 (or uint8) tensor.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    steps: list[nn.Module] = [v2.Resize((size, size), antialias=True)]
    if cutout:
        steps.append(Cutout(0.5))
    if randaugment:
        steps.append(v2.RandAugment())
    return v2.Compose(steps + _to_float(normalize, to_float))


def _interpolation(name: str) -> v2.InterpolationMode:
    try:
        return v2.InterpolationMode(name)
    except ValueError:
        valid = [mode.value for mode in v2.InterpolationMode]
        raise ValueError(f"unknown interpolation {name!r}; valid: {valid}") from None


def eval_transform(
    size: int, *, normalize: bool = False, to_float: bool = True, interpolation: str = "bilinear"
) -> v2.Compose:
    """Deterministic evaluation transform: Resize((size, size)) -> float32 in [0, 1] (-> normalisation).

    Args:
        size: Output side in pixels.
        normalize: Subtract the ImageNet mean and divide by its std after scaling to [0, 1].
        to_float: End with the float32 conversion; False keeps uint8 (see :func:`train_transform`).
        interpolation: torchvision interpolation name (the backbone's, e.g. "bicubic" for EfficientNet-Lite).

    Returns:
        A callable mapping a (3, H, W) uint8 tensor to a (3, size, size) float32 (or uint8) tensor.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    resize = v2.Resize((size, size), interpolation=_interpolation(interpolation), antialias=True)
    return v2.Compose([resize, *_to_float(normalize, to_float)])


def crop_flip_transform(
    size: int, *, interpolation: str = "bilinear", min_scale: float = 0.5, to_float: bool = True
) -> v2.Compose:
    """The standard light augmentation for pretrained backbones on photos.

    RandomResizedCrop(size, scale=(min_scale, 1)) -> RandomHorizontalFlip -> float32 in [0, 1]. A crop keeps at
    least ``min_scale`` of the image area, so small objects (and their labels) mostly survive.

    Args:
        size: Output side in pixels.
        interpolation: torchvision interpolation name.
        min_scale: Smallest kept share of the image area, in (0, 1].
        to_float: End with the float32 conversion; False keeps uint8 (see :func:`train_transform`).

    Returns:
        A callable mapping a (3, H, W) uint8 tensor to a (3, size, size) float32 (or uint8) tensor.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    crop = v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=_interpolation(interpolation))
    return v2.Compose([crop, v2.RandomHorizontalFlip(), *_to_float(False, to_float)])


def train_transform_for(augment: str, size: int, preprocessing: Preprocessing, *, to_float: bool = False):
    """The training augmentation ``augment`` (config field data.augment) at side ``size`` (None: no augmentation);
    crop_flip resizes with the backbone's interpolation."""
    if augment == "authors":
        return train_transform(size, randaugment=True, cutout=True, to_float=to_float)
    if augment == "crop_flip":
        return crop_flip_transform(size, interpolation=preprocessing.interpolation, to_float=to_float)
    return None
