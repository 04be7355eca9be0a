"""Where a run computes: the device, the input layout and the autocast precision."""

from __future__ import annotations

import torch
from torch import Tensor

from clml_core.config import TrainConfig
from clml_core.data.dataset import decode_batch


def select_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("config field 'device' is 'cuda' but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_input(images: Tensor | list[Tensor], config: TrainConfig, device: torch.device) -> Tensor:
    """A batch (B, 3, H, W) on the device as float in [0, 1] (uint8 batches are converted here, and a list of JPEG
    byte tensors from a jpeg cache with ``data.decode=device`` is decoded here, in one call)."""
    if isinstance(images, list):
        images = decode_batch(images, device)
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    if config.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    amp = config.optim.amp
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")
