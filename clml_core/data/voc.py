"""PASCAL VOC classification labels as a multi-label dataset.

Expected layout (torchvision's ``VOCDetection(root, download=True)`` produces it)::

    root/VOCdevkit/VOC{year}/ImageSets/Main/{class}_{split}.txt   lines "000005 -1" (id, label)
    root/VOCdevkit/VOC{year}/JPEGImages/{id}.jpg

Labels in the class files: 1 positive, -1 negative, 0 "difficult" (the object is present but hard to
recognise). Difficult entries are negative by default, the common choice in multi-label work on VOC;
``difficult_as_positive=True`` makes them positive. The dataset keeps no separate difficult mask, so the
official VOC protocol that ignores difficult entries at evaluation is not reproduced by these labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import MultiLabelDataset, PathLike

VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def _read_class_file(path: Path) -> dict[str, int]:
    """Parse one ``{class}_{split}.txt`` file into ``{image_id: label}`` with labels in {-1, 0, 1}."""
    if not path.is_file():
        raise FileNotFoundError(f"VOC class file not found: {path}")
    entries: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            tokens = raw.split()
            if not tokens:
                continue
            if len(tokens) != 2 or tokens[1] not in ("-1", "0", "1"):
                raise ValueError(f"{path}:{lineno}: expected '<image id> <-1|0|1>', got {raw.rstrip()!r}")
            image_id, label = tokens
            if image_id in entries:
                raise ValueError(f"{path}:{lineno}: image id {image_id!r} listed twice")
            entries[image_id] = int(label)
    if not entries:
        raise ValueError(f"VOC class file {path} lists no image")
    return entries


def load_voc(
    root: PathLike, year: str = "2007", split: str = "trainval", *, difficult_as_positive: bool = False
) -> MultiLabelDataset:
    """Load a VOC split with the 20 classes in the usual alphabetical order.

    Args:
        root: Folder holding ``VOCdevkit/``.
        year: ``"2007"``, ``"2012"``, ... (the ``VOC{year}`` folder).
        split: ``"train"``, ``"val"``, ``"trainval"`` or ``"test"`` (VOC2007).
        difficult_as_positive: Whether a difficult entry (0 in the class file) is positive.

    Returns:
        A dataset with N images in the order of the ``aeroplane`` class file and (N, 20) labels.

    Raises:
        FileNotFoundError: A class file or the ``JPEGImages`` folder is missing.
        ValueError: A malformed line (file and line number given) or class files that do not list the same
            image ids.
    """
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    main = base / "ImageSets" / "Main"
    image_dir = base / "JPEGImages"
    if not main.is_dir():
        raise FileNotFoundError(
            f"VOC folder not found: {main}; expected root/VOCdevkit/VOC{year}/ImageSets/Main under {root}"
        )
    if not image_dir.is_dir():
        raise FileNotFoundError(f"VOC image folder not found: {image_dir}")
    per_class = [_read_class_file(main / f"{cls}_{split}.txt") for cls in VOC_CLASSES]
    image_ids = list(per_class[0])
    reference = set(image_ids)
    for cls, entries in zip(VOC_CLASSES[1:], per_class[1:]):
        if set(entries) != reference:
            missing = sorted(reference - set(entries))[:3]
            extra = sorted(set(entries) - reference)[:3]
            raise ValueError(
                f"{main / f'{cls}_{split}.txt'} does not list the same image ids as "
                f"{main / f'{VOC_CLASSES[0]}_{split}.txt'} (missing e.g. {missing}, extra e.g. {extra})"
            )
    raw = np.array([[entries[i] for entries in per_class] for i in image_ids], dtype=np.int8)  # (N, 20)
    labels = (raw == 1) | ((raw == 0) & difficult_as_positive)
    return MultiLabelDataset(
        classes=VOC_CLASSES,
        labels=labels,
        image_paths=[image_dir / f"{i}.jpg" for i in image_ids],
        name=f"voc{year}/{split}",
    )
