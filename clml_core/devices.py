"""Where a run computes: the device, the input layout and the autocast precision."""

from __future__ import annotations

import torch
from torch import Tensor

from clml_core.data.dataset import decode_batch
from clml_core.models import Preprocessing


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("config field 'device' is 'cuda' but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_input(
    images: Tensor | list[Tensor],
    device: torch.device,
    preprocessing: Preprocessing | None = None,
    channels_last: bool = False,
) -> Tensor:
    """A batch (B, 3, H, W) on the device as float in [0, 1] (uint8 batches are converted here, and a list of JPEG
    byte tensors from a jpeg cache with ``data.decode=device`` is decoded here, in one call), normalised with the
    backbone's ``preprocessing`` (mean, std) when given, in the channels-last layout when asked. Other inputs
    (cached (B, F) features) only move."""
    if isinstance(images, list):
        images = decode_batch(images, device)
    images = images.to(device, non_blocking=True)
    if images.ndim != 4:
        return images
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if preprocessing is not None:
        images = normalize(images, preprocessing)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def normalize(images: Tensor, preprocessing: Preprocessing) -> Tensor:
    """(B, 3, H, W) float images in [0, 1] -> ``(images - mean) / std`` of the backbone (unchanged for identity)."""
    if preprocessing.is_identity:
        return images
    mean = torch.tensor(preprocessing.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Mixed precision on ``device``: ``amp`` is off, bf16 or fp16 (config field optim.amp)."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")
