"""MS-COCO as a multi-label dataset, read from the official instance annotations.

Expected layout (the official release, 2014 or 2017 names)::

    root/annotations/instances_{split}.json     e.g. instances_train2014.json, instances_val2017.json
    root/{split}/                               e.g. root/train2014/COCO_train2014_000000000009.jpg

An image is positive for a category when at least one of its instance annotations has that category
(crowd annotations included, as in the SPLC/CLML code). Columns are the categories sorted by category id,
which is the order of the SPLC/CLML split files (``person`` = 0, ..., ``toothbrush`` = 79 for the official
80 categories); class names come from the json.

Images without any annotation (702 of the 82,783 COCO-2014 training images) are handled by ``empty_images``:

* ``"drop"`` (default, what the authors do: their image list is the set of annotated images),
* ``"keep"``: an all-negative row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import MultiLabelDataset, PathLike

EMPTY_IMAGE_POLICIES = ("drop", "keep")


def _require(entry: Any, keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} must be a JSON object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{path}: {where} has no {key!r} key (keys present: {sorted(entry)})")


def _annotation_file(root: Path, split: str) -> Path:
    ann_dir = root / "annotations"
    path = ann_dir / f"instances_{split}.json"
    if path.is_file():
        return path
    available = sorted(p.name for p in ann_dir.glob("instances_*.json")) if ann_dir.is_dir() else []
    nested = sorted(p.parents[1] for p in root.glob(f"*/annotations/{path.name}"))
    if available:
        hint = f"annotation files found there: {available} (split = the part after 'instances_')"
    elif (root / path.name).is_file():
        hint = f"{root} looks like the annotations folder itself; pass its parent {root.parent} as root"
    elif nested:
        hint = f"found {path.name} one level down; pass root={nested[0]}"
    else:
        hint = f"expected the official layout root/annotations/instances_{{split}}.json under {root}"
    raise FileNotFoundError(f"COCO annotation file not found: {path}; {hint}")


def _image_folder(root: Path, split: str, ann_path: Path) -> Path:
    """``root/split``, the folder of the split's images; a FileNotFoundError says where they may be instead."""
    image_dir = root / split
    if image_dir.is_dir():
        return image_dir
    elsewhere = root / "images" / split
    hint = (
        f"; images found in {elsewhere} (a YOLO-style layout): move or link them to {image_dir}"
        if elsewhere.is_dir()
        else ""
    )
    raise FileNotFoundError(
        f"COCO image folder not found: {image_dir} (annotations {ann_path.name} found; the official "
        f"layout keeps the images of {split} in root/{split}/){hint}"
    )


def _read_annotations(ann_path: Path) -> dict[str, Any]:
    """The annotation json, checked to hold ``images``, ``annotations`` and ``categories``."""
    try:
        with ann_path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_path}: not valid JSON ({err})") from err
    _require(data, ("images", "annotations", "categories"), "the top level", ann_path)
    return data


def _sorted_categories(categories: list[Any], ann_path: Path) -> tuple[list[dict[str, Any]], dict[Any, int]]:
    """The categories sorted by id, and the label column of each category id."""
    for k, cat in enumerate(categories):
        _require(cat, ("id", "name"), f"categories[{k}]", ann_path)
    categories = sorted(categories, key=lambda c: c["id"])
    if not categories:
        raise ValueError(f"{ann_path}: 'categories' is empty")
    column = {cat["id"]: k for k, cat in enumerate(categories)}
    if len(column) != len(categories):
        raise ValueError(f"{ann_path}: category ids are not unique")
    return categories, column


def _image_rows(images: list[Any], ann_path: Path) -> dict[Any, int]:
    """The row of each image id: its position in the json's image list."""
    if not images:
        raise ValueError(f"{ann_path}: 'images' is empty")
    row_of: dict[Any, int] = {}
    for k, img in enumerate(images):
        _require(img, ("id", "file_name"), f"images[{k}]", ann_path)
        if img["id"] in row_of:
            raise ValueError(f"{ann_path}: images[{k}] repeats image id {img['id']!r}")
        row_of[img["id"]] = k
    return row_of


def _image_labels(annotations: list[Any], row_of: dict[Any, int], column: dict[Any, int], ann_path: Path) -> np.ndarray:
    """(N, C) uint8 labels: 1 where at least one instance annotation of the image has the category."""
    labels = np.zeros((len(row_of), len(column)), dtype=np.uint8)
    for k, ann in enumerate(annotations):
        _require(ann, ("image_id", "category_id"), f"annotations[{k}]", ann_path)
        row = row_of.get(ann["image_id"])
        if row is None:
            raise ValueError(f"{ann_path}: annotations[{k}] refers to unknown image id {ann['image_id']!r}")
        col = column.get(ann["category_id"])
        if col is None:
            raise ValueError(f"{ann_path}: annotations[{k}] refers to unknown category id {ann['category_id']!r}")
        labels[row, col] = 1
    return labels


def load_coco(root: PathLike, split: str, *, empty_images: str = "drop") -> MultiLabelDataset:
    """Load one COCO split with image-level labels from the instance annotations.

    Images are not opened here; only the split folder's existence is checked.

    Args:
        root: Folder holding ``annotations/`` and the image folders.
        split: ``"train2014"``, ``"val2014"``, ``"train2017"``, ``"val2017"`` or any ``X`` for which
            ``annotations/instances_X.json`` and the folder ``X/`` exist.
        empty_images: ``"drop"`` images without annotations (the authors' choice) or ``"keep"`` them as
            all-negative rows.

    Returns:
        A dataset with N images in the json's image order and (N, C) labels, C = number of categories
        (80 for the official files), columns sorted by category id.

    Raises:
        FileNotFoundError: The annotation file or the image folder is missing.
        ValueError: The json lacks a required key (the message names the file and key), references an
            unknown image or category id, or ``empty_images`` is not a known policy.
    """
    if empty_images not in EMPTY_IMAGE_POLICIES:
        raise ValueError(f"empty_images must be one of {EMPTY_IMAGE_POLICIES}, got {empty_images!r}")
    root = Path(root)
    ann_path = _annotation_file(root, split)
    image_dir = _image_folder(root, split, ann_path)
    data = _read_annotations(ann_path)
    categories, column = _sorted_categories(data["categories"], ann_path)
    images = data["images"]
    row_of = _image_rows(images, ann_path)
    labels = _image_labels(data["annotations"], row_of, column, ann_path)  # (N, C)

    keep = labels.any(axis=1) if empty_images == "drop" else np.ones(len(images), dtype=bool)
    if not keep.any():
        raise ValueError(f"{ann_path}: no image has an annotation, so empty_images='drop' leaves nothing")
    rows = np.flatnonzero(keep)
    return MultiLabelDataset(
        classes=[str(cat["name"]) for cat in categories],
        labels=labels[rows],
        image_paths=[image_dir / images[r]["file_name"] for r in rows],
        name=f"coco/{split}",
    )
