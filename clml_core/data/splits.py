"""Train / validation / test datasets of a run, with the missing-label protocol applied.

Model selection uses the validation split only: for real datasets it is carved from train (seeded by
``data.protocol_seed``); the embedded benchmark generates its own. Train and validation carry the observed labels
(the protocol's output); test keeps its full labels.

A dataset without a usable test split (the 996-photo VOC2007 trainval sample) gets one carved from its training
split with ``data.test_fraction > 0``: ``train_val_split`` on the *full* labels with ``data.split_seed`` (fixed across
runs, so every run scores the same test images), which first gives every class with two or more positives one test
image, then fills the quota uniformly. Validation is then carved from what remains, as above.

Images are resized to ``data.image_size`` (0: the backbone's native input size) with the backbone's interpolation:
the data pipeline asks the model's :func:`~clml_core.models.preprocessing_for`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clml_core import distributed as dist_utils
from clml_core.config import SYNTHETIC_SIZES, TrainConfig
from clml_core.data.cache import build_packed_cache
from clml_core.data.coco import load_coco
from clml_core.data.dataset import MultiLabelDataset
from clml_core.data.nuswide import load_nuswide
from clml_core.data.protocols import keep_fraction, read_observed, single_positive, train_val_split
from clml_core.data.synthetic import SyntheticConfig, load_synthetic
from clml_core.data.transforms import crop_flip_transform, eval_transform, train_transform
from clml_core.data.voc import load_voc
from clml_core.models import Preprocessing, preprocessing_for
from clml_core.paths import DATA_DIR


@dataclass
class Splits:
    """Train / validation / test datasets; ``observed`` holds the labels training may use."""

    train: MultiLabelDataset
    val: MultiLabelDataset
    test: MultiLabelDataset


def _image_names(dataset: MultiLabelDataset) -> list[str]:
    if dataset.image_paths is not None:
        return [Path(p).name for p in dataset.image_paths]
    return [f"{dataset.name or 'image'}_{i:06d}" for i in range(len(dataset))]


def _apply_protocol(config: TrainConfig, dataset: MultiLabelDataset, seed: int) -> MultiLabelDataset:
    data = config.data
    if data.protocol == "full":
        return dataset.with_observed(dataset.labels)
    if data.protocol == "keep_fraction":
        return dataset.with_observed(keep_fraction(dataset.labels, data.fraction, seed))
    if data.protocol == "single_positive":
        return dataset.with_observed(single_positive(dataset.labels, seed))
    observed = read_observed(data.observed_file, _image_names(dataset), dataset.num_classes)
    return dataset.with_observed(observed)


#: The train and test split each real dataset reads when ``data.train_split`` / ``data.test_split`` are empty.
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {
    "coco": ("train2014", "val2014"),
    "voc": ("trainval", "test"),
    "nuswide": ("nus_train_full.txt", "nus_val.txt"),
}


def split_names(config: TrainConfig) -> tuple[str, str]:
    """The train and test split a real dataset reads: ``data.train_split`` / ``data.test_split`` or the defaults."""
    default_train, default_test = DEFAULT_SPLITS[config.data.dataset]
    return config.data.train_split or default_train, config.data.test_split or default_test


def load_sources(config: TrainConfig) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    """The whole train and test split of a real dataset as its files give them (no protocol, no validation carve);
    with ``data.test_fraction > 0`` only the train split is read and the test split is carved from it.

    Raises:
        FileNotFoundError, ValueError: the loader's error, naming the missing or malformed file.
    """
    train_split, test_split = split_names(config)
    if config.data.test_fraction:
        return carve_test(config, _load_real(config, train_split))
    return _load_real(config, train_split), _load_real(config, test_split)


def carve_test(config: TrainConfig, source: MultiLabelDataset) -> tuple[MultiLabelDataset, MultiLabelDataset]:
    """(rest, test) of ``source``: ``data.test_fraction`` of it, seeded by ``data.split_seed``, on the full labels."""
    rest, test = train_val_split(len(source), config.data.test_fraction, config.data.split_seed, labels=source.labels)
    return source.subset(rest), source.subset(test)


def image_size(config: TrainConfig) -> int:
    """The side images are resized to: ``data.image_size``, or the backbone's native size when it is 0."""
    return config.data.image_size or preprocessing_for(config.model.arch).input_size


def train_transform_for(config: TrainConfig, preprocessing: Preprocessing | None = None, *, to_float: bool = False):
    """The training augmentation of ``data.augment`` at the run's image size (None: no augmentation)."""
    preprocessing = preprocessing or preprocessing_for(config.model.arch)
    size = image_size(config)
    if config.data.augment == "authors":
        return train_transform(size, randaugment=True, cutout=True, to_float=to_float)
    if config.data.augment == "crop_flip":
        return crop_flip_transform(size, interpolation=preprocessing.interpolation, to_float=to_float)
    return None


def _load_real(config: TrainConfig, split: str) -> MultiLabelDataset:
    data = config.data
    if data.dataset == "coco":
        return load_coco(data.root, split)
    if data.dataset == "voc":
        return load_voc(data.root, "2007", split)
    return load_nuswide(data.root, split)


def _packed(config: TrainConfig, dataset: MultiLabelDataset, split: str) -> MultiLabelDataset:
    """``dataset`` (a whole source split) read from its packed cache, built once per split and image size.

    Protocols and the train / validation carve index rows of this one cache. Under DDP rank 0 builds it while
    the other ranks wait at a barrier, then open it.
    """
    data = config.data
    folder = (Path(data.cache_dir) if data.cache_dir else DATA_DIR / "cache") / data.dataset
    with dist_utils.rank_zero_first():
        size = image_size(config)
        name = f"{Path(split).stem}-{size}px"
        name += f"-q{data.cache_quality}.jpegs" if data.cache_format == "jpeg" else ".npy"
        cache = build_packed_cache(
            dataset,
            size,
            folder / name,
            fmt=data.cache_format,
            quality=data.cache_quality,
            progress=config.progress,
        )
    return cache.dataset(dataset)


def build_splits(config: TrainConfig) -> Splits:
    """Datasets with the missing-label protocol applied to train and validation (test keeps its full labels)."""
    data = config.data
    if data.dataset == "synthetic":
        side = data.synthetic_image_size or image_size(config)  # generated at this side, resized to image_size
        synthetic = SyntheticConfig(image_size=side, seed=data.synthetic_seed, **SYNTHETIC_SIZES[data.synthetic_size])
        parts = load_synthetic(synthetic, progress=config.progress)
        train = _apply_protocol(config, parts["train"], data.protocol_seed)
        val = _apply_protocol(config, parts["val"], data.protocol_seed + 1)
        test = parts["test"]
    else:
        train_split, test_split = split_names(config)
        if data.test_fraction:  # carve the test split from the (packed) train split
            source = _load_real(config, train_split)
            full_train, test = carve_test(config, _packed(config, source, train_split) if data.packed_cache else source)
        else:
            full_train, test = load_sources(config)
            if data.packed_cache:
                full_train, test = _packed(config, full_train, train_split), _packed(config, test, test_split)
        observed_train = _apply_protocol(config, full_train, data.protocol_seed)
        train_idx, val_idx = train_val_split(
            len(observed_train), data.val_fraction, data.protocol_seed, labels=observed_train.observed
        )
        train, val = observed_train.subset(train_idx), observed_train.subset(val_idx)
    if data.limit_train:
        train = train.subset(np.arange(min(data.limit_train, len(train))))
    if data.val_labels == "full":
        val = val.with_observed(val.labels)
    size = image_size(config)
    preprocessing = preprocessing_for(config.model.arch)
    augmentation = train_transform_for(config, preprocessing)
    splits = Splits(
        train=train.with_transform(augmentation or _plain(train, size, preprocessing)),
        val=val.with_transform(_plain(val, size, preprocessing)),
        test=test.with_transform(_plain(test, size, preprocessing)),
    )
    if data.decode == "device":  # JPEG bytes to the device, decoded there a batch at a time (decode_batch)
        for name in ("train", "val", "test"):
            part = getattr(splits, name)
            if part.has_encoded_images and part.transform is None:
                setattr(splits, name, part.with_encoded_items())
    return splits


def _plain(dataset: MultiLabelDataset, size: int, preprocessing: Preprocessing):
    """No per-item work for stored images of the right size, else a resize. Items stay uint8 (a quarter of the
    bytes of float32); batches are converted to float and normalised on the device
    (:func:`clml_core.devices.to_input`)."""
    if dataset.has_image_array and tuple(dataset.read_image(0).shape[-2:]) == (size, size):
        return None
    return eval_transform(size, to_float=False, interpolation=preprocessing.interpolation)
