"""Data fixtures shared by the dataset, loader and protocol tests: small real image files written with PIL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pixels(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    """A (H, W, 3) uint8 random image; different seeds give different images."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """Write ``pixels(seed)`` to ``path`` in the PIL ``mode`` and format implied by the suffix."""

    def write(path: Path, seed: int = 0, mode: str = "RGB", height: int = 12, width: int = 16) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels(seed, height, width)).convert(mode).save(path)
        return path

    return write
