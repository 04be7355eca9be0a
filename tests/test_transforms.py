"""Tests for the training and evaluation augmentations."""

from __future__ import annotations

import pytest
import torch

from clml_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Cutout, eval_transform, train_transform


def _image(height: int = 40, width: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [train_transform, eval_transform])
def test_output_shape_dtype_and_range(make):
    out = make(24)(_image())
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_eval_transform_is_exact_scaling_at_native_size():
    image = _image(24, 24)
    torch.testing.assert_close(eval_transform(24)(image), image.float() / 255)
    normalised = eval_transform(24, normalize=True)(image)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(normalised, (image.float() / 255 - mean) / std)


def test_train_transform_follows_torch_seed():
    transform, image = train_transform(32), _image()
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    again = transform(image)
    torch.manual_seed(4)
    other = transform(image)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_train_transform_without_augmentation_equals_eval():
    image = _image()
    plain = train_transform(20, randaugment=False, cutout=False)
    torch.testing.assert_close(plain(image), eval_transform(20)(image))


def _cutout_reference(image: torch.Tensor, factor: float, seed: int) -> torch.Tensor:
    """CutoutPIL written out pixel by pixel, drawing the same random numbers in the same order."""
    torch.manual_seed(seed)
    channels, height, width = image.shape
    yc, xc = int(torch.randint(height, ())), int(torch.randint(width, ()))
    colour = torch.randint(256, (channels,), dtype=torch.uint8)
    cut_h, cut_w = int(factor * height + 0.5), int(factor * width + 0.5)
    y1, y2 = min(max(yc - cut_h // 2, 0), height), min(max(yc + cut_h // 2, 0), height)
    x1, x2 = min(max(xc - cut_w // 2, 0), width), min(max(xc + cut_w // 2, 0), width)
    out = image.clone()
    for y in range(height):
        for x in range(width):
            if y1 <= y <= y2 and x1 <= x <= x2:  # PIL's rectangle includes both corners
                out[:, y, x] = colour
    return out


@pytest.mark.parametrize("seed", range(6))
def test_cutout_matches_pixel_loop_reference(seed):
    image = _image(14, 18, seed)
    torch.manual_seed(seed)
    out = Cutout(0.5)(image)
    torch.testing.assert_close(out, _cutout_reference(image, 0.5, seed), rtol=0, atol=0)


def test_cutout_paints_one_filled_rectangle_of_half_size():
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    sizes = []
    for seed in range(40):
        torch.manual_seed(seed)
        changed = (Cutout(0.5)(image) != 0).any(dim=0)
        rows, cols = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert changed.sum() == height * width  # a filled axis-aligned rectangle
        sizes.append((height, width))
    assert max(sizes) == (11, 11)  # int(0.5 * 20 + 0.5) = 10 rows plus PIL's inclusive corner
    assert min(h * w for h, w in sizes) < 11 * 11  # clipped at the border for some centres


def test_cutout_on_float_images_and_bad_arguments():
    torch.manual_seed(0)
    out = Cutout(0.5)(torch.full((3, 10, 10), -1.0))
    painted = out[:, out[0] != -1.0]
    assert painted.numel() > 0 and painted.min() >= 0 and painted.max() < 1
    with pytest.raises(ValueError, match="factor"):
        Cutout(0.0)
    with pytest.raises(ValueError, match="shape"):
        Cutout(0.5)(torch.zeros(10, 10))
    with pytest.raises(ValueError, match="size"):
        eval_transform(0)
