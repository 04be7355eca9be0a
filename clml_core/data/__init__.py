"""Datasets, loaders and missing-label protocols."""

from .coco import load_coco
from .dataset import MultiLabelDataset
from .download import download_coco, download_voc
from .nuswide import NUS_WIDE_CONCEPTS, load_nuswide
from .protocols import (
    keep_fraction,
    labels_checksum,
    read_observed,
    single_positive,
    train_val_split,
    write_observed,
)
from .splitfile import load_split_file, read_split_file, write_split_file
from .synthetic import load_synthetic, make_synthetic
from .voc import VOC_CLASSES, load_voc

__all__ = [
    "MultiLabelDataset",
    "NUS_WIDE_CONCEPTS",
    "VOC_CLASSES",
    "download_coco",
    "download_voc",
    "keep_fraction",
    "labels_checksum",
    "load_coco",
    "load_nuswide",
    "load_split_file",
    "load_synthetic",
    "load_voc",
    "make_synthetic",
    "read_observed",
    "read_split_file",
    "single_positive",
    "train_val_split",
    "write_observed",
    "write_split_file",
]
