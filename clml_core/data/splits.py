"""Train / validation / test datasets of a run, with the missing-label protocol applied.

:func:`build_splits` reads top to bottom in three steps:

1. **Sources**: the whole splits a run draws from. The embedded benchmark generates train, validation and test; a
   real dataset reads its train and test split files (with ``data.packed_cache`` each from a packed cache that holds
   the whole split).
2. **Observed labels and carves**: the protocol (``data.protocol``, seeded by ``data.protocol_seed``) is drawn on
   the whole training split; for a real dataset validation is then carved from it
   (:func:`~clml_core.data.protocols.validation_split`), the benchmark draws on its own validation split under the
   next seed. Model selection uses the validation split only. Train and validation carry the observed labels (the
   protocol's output); test keeps its full labels.
3. **Transforms**: the training augmentation, else a resize where the stored images are not at the run's size.

A dataset without a usable test split (the 996-photo VOC2007 trainval sample) gets one carved from its training
split with ``data.test_fraction > 0`` (step 1, :func:`carve_test`): ``train_val_split`` on the *full* labels with
``data.split_seed`` (fixed across runs, so every run scores the same test images), which first gives every class with
two or more positives one test image, then fills the quota uniformly. Validation is then carved from what remains.

Images are resized to ``data.image_size`` (0: the backbone's native input size) with the backbone's interpolation:
the data pipeline asks the model's :func:`~clml_core.models.preprocessing_for`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clml_core import distributed as dist_utils
from clml_core.config import SYNTHETIC_SIZES, DataConfig
from clml_core.data.cache import build_packed_cache
from clml_core.data.coco import load_coco
from clml_core.data.dataset import MultiLabelDataset
from clml_core.data.nuswide import load_nuswide
from clml_core.data.protocols import observed_labels, train_val_split, validation_split
from clml_core.data.synthetic import SyntheticConfig, load_synthetic
from clml_core.data.transforms import eval_transform, train_transform_for
from clml_core.data.voc import load_voc
from clml_core.models import Preprocessing
from clml_core.paths import DATA_DIR


@dataclass
class Splits:
    """Train / validation / test datasets; ``observed`` holds the labels training may use."""

    train: MultiLabelDataset
    val: MultiLabelDataset
    test: MultiLabelDataset


def build_splits(data: DataConfig, preprocessing: Preprocessing, *, progress: bool = True) -> Splits:
    """Datasets with the missing-label protocol applied to train and validation (test keeps its full labels).

    Args:
        data: the run's data configuration.
        preprocessing: the backbone's (its native input size and interpolation).
        progress: show progress bars while a dataset or cache is built.
    """
    size = image_size(data.image_size, preprocessing)
    if data.dataset == "synthetic":
        train, val, test = _synthetic_splits(data, size, progress)
    else:
        train, val, test = _real_splits(data, size, progress)
    if data.limit_train:
        train = train.subset(np.arange(min(data.limit_train, len(train))))
    if data.val_labels == "full":
        val = val.with_observed(val.labels)
    plain = [_plain(part, size, preprocessing) for part in (train, val, test)]
    augmentation = train_transform_for(data.augment, size, preprocessing)
    transforms = [augmentation or plain[0], *plain[1:]]  # the augmentation resizes training images itself
    parts = (part.with_transform(t) for part, t in zip((train, val, test), transforms))
    if data.decode == "device":  # JPEG bytes to the device, decoded there a batch at a time (decode_batch)
        parts = (p.with_encoded_items() if p.has_encoded_images and p.transform is None else p for p in parts)
    return Splits(*parts)


def _synthetic_splits(data: DataConfig, size: int, progress: bool) -> tuple[MultiLabelDataset, ...]:
    """(train, val, test) of the embedded benchmark, the protocol drawn on its train and validation splits."""
    side = data.synthetic_image_size or size  # generated at this side, resized to image_size
    synthetic = SyntheticConfig(image_size=side, seed=data.synthetic_seed, **SYNTHETIC_SIZES[data.synthetic_size])
    parts = load_synthetic(synthetic, progress=progress)
    train = apply_protocol(parts["train"], data, data.protocol_seed)
    val = apply_protocol(parts["val"], data, data.protocol_seed + 1)  # validation draws under the next seed
    return train, val, parts["test"]


def _real_splits(data: DataConfig, size: int, progress: bool) -> tuple[MultiLabelDataset, ...]:
    """(train, val, test) of a real dataset: the protocol drawn on the whole training split (what remains after a
    test carve), then validation carved from it."""
    full_train, test = _real_sources(data, size, progress)
    seed = data.protocol_seed
    observed = _draw(full_train, data, seed)
    train_idx, val_idx = validation_split(len(full_train), data.protocol, data.val_fraction, seed, observed)
    full_train = full_train.with_observed(observed)
    return full_train.subset(train_idx), full_train.subset(val_idx), test


def _real_sources(data: DataConfig, size: int, progress: bool) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    """The whole (train, test) of a real dataset, as :func:`load_sources` gives them, each split file read from its
    packed cache with ``data.packed_cache`` (a test carve then indexes the packed training split)."""
    train_split, test_split = split_names(data)
    names = [train_split] if data.test_fraction else [train_split, test_split]
    sources = [load_real(data.dataset, data.root, name) for name in names]
    if data.packed_cache:
        sources = [packed(source, name, size, data, progress) for source, name in zip(sources, names)]
    if data.test_fraction:
        return carve_test(sources[0], data.test_fraction, data.split_seed)
    return sources[0], sources[1]


# ------------------------------------------------------------------------------------------ the protocol's draw


def apply_protocol(dataset: MultiLabelDataset, data: DataConfig, seed: int) -> MultiLabelDataset:
    """``dataset`` with the observed labels of the missing-label protocol ``data.protocol``, drawn under ``seed``
    (:func:`clml_core.data.protocols.observed_labels`)."""
    observed = _draw(dataset, data, seed)
    return dataset.with_observed(observed)


def _draw(dataset: MultiLabelDataset, data: DataConfig, seed: int) -> np.ndarray:
    """(N, C) observed labels of ``dataset`` under the protocol ``data.protocol``, drawn under ``seed``."""
    names = _image_names(dataset) if data.protocol == "file" else ()
    return observed_labels(
        dataset.labels, data.protocol, seed, fraction=data.fraction, observed_file=data.observed_file, image_names=names
    )


def _image_names(dataset: MultiLabelDataset) -> list[str]:
    """The names a split file gives ``dataset``'s rows: the image file names, or ``<name>_<row>`` for an array."""
    if dataset.image_paths is not None:
        return [Path(p).name for p in dataset.image_paths]
    return [f"{dataset.name or 'image'}_{i:06d}" for i in range(len(dataset))]


# ---------------------------------------------------------------------------------- the real datasets' sources

#: The train and test split each real dataset reads when ``data.train_split`` / ``data.test_split`` are empty.
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "coco": ("train2014", "val2014"),
    "voc": ("trainval", "test"),
    "nuswide": ("nus_train_full.txt", "nus_val.txt"),
}


def split_names(data: DataConfig) -> tuple[str, str]:
    """The train and test split a real dataset reads: ``data.train_split`` / ``data.test_split`` or the defaults."""
    default_train, default_test = DEFAULT_SPLITS[data.dataset]
    return data.train_split or default_train, data.test_split or default_test


def _load_voc2007(root: str, split: str) -> MultiLabelDataset:
    return load_voc(root, "2007", split)


#: The real datasets by config name (data.dataset): each loads split ``split`` under ``root``.
REAL_DATASETS: dict[str, Callable[[str, str], MultiLabelDataset]] = {
    "coco": load_coco,
    "voc": _load_voc2007,
    "nuswide": load_nuswide,
}


def load_real(dataset: str, root: str, split: str) -> MultiLabelDataset:
    """Split ``split`` of the real dataset ``dataset`` (a key of :data:`REAL_DATASETS`) under ``root``."""
    return REAL_DATASETS[dataset](root, split)


def load_sources(data: DataConfig) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    """The whole train and test split of a real dataset as its files give them (no protocol, no validation carve);
    with ``data.test_fraction > 0`` only the train split is read and the test split is carved from it.

    Raises:
        FileNotFoundError, ValueError: the loader's error, naming the missing or malformed file.
    """
    train_split, test_split = split_names(data)
    if data.test_fraction:
        return carve_test(load_real(data.dataset, data.root, train_split), data.test_fraction, data.split_seed)
    return load_real(data.dataset, data.root, train_split), load_real(data.dataset, data.root, test_split)


def carve_test(source: MultiLabelDataset, fraction: float, seed: int) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    """(rest, test) of ``source``: ``fraction`` of it, seeded by ``seed``, on the full labels."""
    rest, test = train_val_split(len(source), fraction, seed, labels=source.labels)
    return source.subset(rest), source.subset(test)


def cache_folder(cache_dir: str) -> Path:
    """Where packed caches and feature stores live (config field data.cache_dir; "" = data/cache)."""
    return Path(cache_dir) if cache_dir else DATA_DIR / "cache"


def packed(dataset: MultiLabelDataset, split: str, size: int, data: DataConfig, progress: bool) -> MultiLabelDataset:
    """``dataset`` (a whole source split) read from its packed cache, built once per split and image size (config
    fields data.cache_dir, data.cache_format, data.cache_quality).

    Protocols and the train / validation carve index rows of this one cache. Under DDP rank 0 builds it while
    the other ranks wait at a barrier, then open it.
    """
    name = f"{Path(split).stem}-{size}px"
    name += f"-q{data.cache_quality}.jpegs" if data.cache_format == "jpeg" else ".npy"
    path = cache_folder(data.cache_dir) / data.dataset / name
    with dist_utils.rank_zero_first():
        cache = build_packed_cache(
            dataset, size, path, fmt=data.cache_format, quality=data.cache_quality, progress=progress
        )
    return cache.dataset(dataset)


# ------------------------------------------------------------------------------ one split alone, for evaluation


def whole_split(data: DataConfig, preprocessing: Preprocessing, split: str) -> MultiLabelDataset:
    """Split ``split`` of the real dataset ``data.dataset`` under ``data.root``, whole, with its full labels and the
    evaluation resize to ``data.image_size``; only that split's files are read.

    Raises:
        ValueError: ``data.dataset`` is not a real dataset (a key of :data:`REAL_DATASETS`).
        FileNotFoundError, ValueError: the loader's error, naming the missing or malformed file.
    """
    if data.dataset not in REAL_DATASETS:
        raise ValueError(
            f"config field 'data.dataset': {data.dataset!r} has no split files; one of {list(REAL_DATASETS)}"
        )
    return _eval_resized(load_real(data.dataset, data.root, split), data, preprocessing)


def run_test_split(data: DataConfig, preprocessing: Preprocessing) -> MultiLabelDataset:
    """A run's test split alone, the images and full labels :func:`build_splits` gives it (without a packed cache):
    the dataset's test split, or with ``data.test_fraction`` the carve from its training split. Only the files of
    the split it comes from are read."""
    train_split, test_split = split_names(data)
    if not data.test_fraction:
        return whole_split(data, preprocessing, test_split)
    _, test = carve_test(load_real(data.dataset, data.root, train_split), data.test_fraction, data.split_seed)
    return _eval_resized(test, data, preprocessing)


def _eval_resized(dataset: MultiLabelDataset, data: DataConfig, preprocessing: Preprocessing) -> MultiLabelDataset:
    return dataset.with_transform(_plain(dataset, image_size(data.image_size, preprocessing), preprocessing))


# -------------------------------------------------------------------------------------------- sizes, transforms


def image_size(requested: int, preprocessing: Preprocessing) -> int:
    """The side images are resized to: ``requested`` (config field data.image_size), or the backbone's native input
    size when it is 0."""
    return requested or preprocessing.input_size


def _plain(dataset: MultiLabelDataset, size: int, preprocessing: Preprocessing):
    """No per-item work for stored images of the right size, else a resize. Items stay uint8 (a quarter of the
    bytes of float32); batches are converted to float and normalised on the device
    (:func:`clml_core.devices.to_input`)."""
    if dataset.has_image_array and tuple(dataset.read_image(0).shape[-2:]) == (size, size):
        return None
    return eval_transform(size, to_float=False, interpolation=preprocessing.interpolation)
