"""Tests for the packed image cache: contents, reuse, invalidation, atomicity and error reporting."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from clml_core.data import cache as cache_module
from clml_core.data.cache import PackedCache, build_packed_cache
from clml_core.data.dataset import MultiLabelDataset

SHAPES = [(16, 16), (30, 44), (21, 13), (16, 16), (50, 20)]  # (height, width)


def _write_images(folder, shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    paths, arrays = [], []
    for i, (height, width) in enumerate(shapes):
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(folder / f"img_{i}.png")  # lossless, so the test knows every pixel
        Image.fromarray(array).save(paths[-1])
        arrays.append(array)
    return paths, arrays


def _dataset(paths):
    labels = np.eye(len(paths), 3, dtype=np.uint8)
    observed = labels.copy()
    observed[0] = 0
    return MultiLabelDataset(["a", "b", "c"], labels, image_paths=paths, observed=observed, name="tiny")


def _pil_resized(array, size):
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("workers", [0, 3])
def test_cache_holds_resized_images_in_order(tmp_path, workers):
    paths, arrays = _write_images(tmp_path)
    cache = build_packed_cache(_dataset(paths), 16, tmp_path / "c.npy", workers=workers, progress=False)
    assert cache.images.shape == (5, 16, 16, 3) and cache.images.dtype == np.uint8
    assert not cache.images.flags.writeable
    for row, array in zip(cache.images, arrays):
        if array.shape[:2] == (16, 16):
            np.testing.assert_array_equal(row, array)  # already at size: stored untouched
        else:
            # Antialiased bilinear, as torchvision's Resize on PIL images (PIL BILINEAR) within one level.
            diff = np.abs(row.astype(int) - _pil_resized(array, 16).astype(int))
            assert diff.max() <= 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_threaded_and_inline_builds_are_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "_CHUNK_PER_WORKER", 1)  # 5 images in chunks of 4: two chunks
    paths, _ = _write_images(tmp_path)
    inline = build_packed_cache(_dataset(paths), 12, tmp_path / "a.npy", workers=0, progress=False)
    threaded = build_packed_cache(_dataset(paths), 12, tmp_path / "b.npy", workers=4, progress=False)
    np.testing.assert_array_equal(inline.images, threaded.images)


def test_cache_dataset_serves_cached_pixels_with_source_labels(tmp_path):
    paths, _ = _write_images(tmp_path)
    source = _dataset(paths).with_transform(lambda image: image.float())
    cache = build_packed_cache(source, 16, tmp_path / "c.npy", progress=False)
    packed = cache.dataset(source)
    np.testing.assert_array_equal(packed.labels, source.labels)
    np.testing.assert_array_equal(packed.observed, source.observed)
    assert packed.classes == source.classes and packed.name == "tiny"
    image, observed, index = packed[2]
    assert image.dtype == torch.float32 and index == 2
    torch.testing.assert_close(image, torch.from_numpy(np.array(cache.images[2])).permute(2, 0, 1).float())
    torch.testing.assert_close(observed, torch.from_numpy(source.observed[2].astype(np.float32)))

    (tmp_path / "other").mkdir()
    other_paths, _ = _write_images(tmp_path / "other", shapes=SHAPES, seed=1)
    with pytest.raises(ValueError, match="was not built from"):
        cache.dataset(_dataset(other_paths))


def test_cache_is_reused_until_the_source_changes(tmp_path):
    paths, _ = _write_images(tmp_path)
    target = tmp_path / "c.npy"
    build_packed_cache(_dataset(paths), 16, target, progress=False)
    stamp = target.stat().st_mtime_ns
    again = build_packed_cache(_dataset(paths), 16, target, progress=False)
    assert target.stat().st_mtime_ns == stamp  # not rewritten
    assert again.matches(_dataset(paths))

    replacement = np.full((16, 16, 3), 7, np.uint8)
    Image.fromarray(replacement).save(paths[3])
    os.utime(paths[3], ns=(stamp + 10**9, stamp + 10**9))  # a later mtime even on coarse clocks
    assert not again.matches(_dataset(paths))
    rebuilt = build_packed_cache(_dataset(paths), 16, target, progress=False)
    np.testing.assert_array_equal(rebuilt.images[3], replacement)

    resized = build_packed_cache(_dataset(paths), 8, target, progress=False)  # another size: rebuilt
    assert resized.images.shape == (5, 8, 8, 3)


def test_missing_or_corrupt_image_names_the_file_and_writes_nothing(tmp_path):
    paths, _ = _write_images(tmp_path)
    dataset = _dataset(paths)
    paths[1].write_bytes(b"not an image")
    with pytest.raises(OSError, match="img_1.png"):
        build_packed_cache(dataset, 16, tmp_path / "c.npy", workers=2, progress=False)
    paths[2].unlink()
    with pytest.raises(FileNotFoundError, match="img_2.png"):
        build_packed_cache(dataset, 16, tmp_path / "c.npy", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_0.png", "img_1.png", "img_3.png", "img_4.png"]


def test_open_validates_files(tmp_path):
    paths, _ = _write_images(tmp_path)
    target = tmp_path / "c.npy"
    with pytest.raises(FileNotFoundError, match="c.npy"):
        PackedCache.open(target)
    build_packed_cache(_dataset(paths), 16, target, progress=False)
    sidecar = tmp_path / "c.npy.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "size": 17}))
    with pytest.raises(ValueError, match="c.npy.json"):
        PackedCache.open(target)
    sidecar.write_text("{")
    with pytest.raises(ValueError, match="sidecar"):
        PackedCache.open(target)
    rebuilt = build_packed_cache(_dataset(paths), 16, target, progress=False)  # an invalid cache is rebuilt
    assert len(rebuilt) == 5 and repr(rebuilt).startswith("PackedCache(")


def test_array_backed_dataset_and_bad_size_are_rejected(tmp_path):
    arrays = MultiLabelDataset(["a"], np.ones((2, 1), np.uint8), images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no image files"):
        build_packed_cache(arrays, 4, tmp_path / "c.npy")
    paths, _ = _write_images(tmp_path)
    with pytest.raises(ValueError, match="size"):
        build_packed_cache(_dataset(paths), 0, tmp_path / "c.npy")


def _smooth_images(folder, n=6, size=48):
    """Photo-like (smooth) PNGs, so JPEG at high quality stays close to the pixels."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(n):
        array = np.stack([128 + 100 * np.sin(2 * np.pi * (xx * (1 + 0.25 * i) + yy * c)) for c in (0.5, 1, 2)], axis=-1)
        paths.append(folder / f"smooth_{i}.png")
        Image.fromarray(array.astype(np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("workers", [0, 3])
def test_jpeg_cache_decodes_close_to_the_raw_cache_in_a_fraction_of_the_bytes(tmp_path, workers):
    paths = _smooth_images(tmp_path)
    dataset = MultiLabelDataset(["a"], np.ones((len(paths), 1)), image_paths=paths, name="smooth")
    raw = build_packed_cache(dataset, 40, tmp_path / "r.npy", progress=False)
    jpeg = build_packed_cache(
        dataset, 40, tmp_path / "j.jpegs", fmt="jpeg", quality=95, workers=workers, progress=False
    )
    assert jpeg.format == "jpeg" and jpeg.quality == 95 and len(jpeg) == len(paths)
    assert jpeg.nbytes < raw.images.nbytes / 3
    packed = jpeg.dataset(dataset)
    for i in range(len(paths)):
        decoded = packed.read_image(i)  # (3, 40, 40) uint8
        error = (decoded.int() - torch.from_numpy(np.array(raw.images[i])).permute(2, 0, 1).int()).abs().float()
        # Chroma subsampling costs a few levels on these colourful patterns; a wrong image is ~70 off.
        assert decoded.shape == (3, 40, 40) and error.mean() < 5.0, (i, error.mean())
    reopened = PackedCache.open(tmp_path / "j.jpegs")  # the same bytes, memory-mapped
    assert torch.equal(reopened.dataset(dataset).read_image(3), packed.read_image(3))
    # Another quality is another cache: rebuilt, not reused.
    other = build_packed_cache(dataset, 40, tmp_path / "j.jpegs", fmt="jpeg", quality=50, progress=False)
    assert other.quality == 50 and other.nbytes < jpeg.nbytes


def test_jpeg_items_decode_on_the_device_exactly_as_in_the_workers(tmp_path):
    import pickle

    from clml_core.data.dataset import collate, decode_batch

    paths = _smooth_images(tmp_path)
    dataset = MultiLabelDataset(["a"], np.ones((len(paths), 1)), image_paths=paths, name="smooth")
    cache = build_packed_cache(dataset, 32, tmp_path / "j.jpegs", fmt="jpeg", progress=False)
    carve = cache.dataset(dataset).subset([4, 1, 2])  # rows of the one cache, as a train / validation carve
    encoded = pickle.loads(pickle.dumps(carve.with_encoded_items()))  # as a spawned DataLoader worker gets it
    images, observed, index = collate([encoded[i] for i in range(3)])
    assert isinstance(images, list) and images[0].ndim == 1 and index.tolist() == [0, 1, 2]
    batch = decode_batch(images, torch.device("cpu"))
    assert torch.equal(batch, torch.stack([carve.read_image(i) for i in range(3)]))
    with pytest.raises(ValueError, match="has a transform"):
        carve.with_transform(lambda x: x).with_encoded_items()
    with pytest.raises(ValueError, match="no JPEG store"):
        dataset.with_encoded_items()
