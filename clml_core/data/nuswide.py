"""NUS-WIDE (81 concepts) through the SPLC/CLML split files.

Expected layout, as in the authors' ``train_nus.py``::

    root/images/{file_name}        e.g. root/images/123940_1158315062_02a15f03aa_m.jpg
    root/Concepts81.txt            optional: the official concept list, one name per line

Only the split-file route is supported. The official release's ``ImageList`` and ``TrainTestLabels`` files
name images as ``{concept folder}\\{n}_{flickr id}.jpg``, while the authors' split files (and the image
collections in circulation) use ``{n}_{flickr id}_{secret}_m.jpg``. No published table maps one to the other,
so reading the official lists would mean guessing that mapping.

The authors' NUS-WIDE files contain at least one malformed line (``0437_424259217.jpg,2.``); loading such a
file raises a ``ValueError`` naming the file and line, so the fix is a deliberate edit of that line.
"""

from __future__ import annotations

from pathlib import Path

from .dataset import MultiLabelDataset, PathLike
from .splitfile import load_split_file

# The official Concepts81.txt order (alphabetical), which the split files' indices refer to.
NUS_WIDE_CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars",
    "castle", "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake",
    "elk", "fire", "fish", "flags", "flowers", "food", "fox", "frost", "garden", "glacier",
    "grass", "harbor", "horses", "house", "lake", "leaf", "map", "military", "moon", "mountain",
    "nighttime", "ocean", "person", "plane", "plants", "police", "protest", "railroad", "rainbow", "reflection",
    "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer", "sports", "statue",
    "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town",
    "toy", "train", "tree", "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window",
    "zebra",
)  # fmt: skip


def read_concepts(path: PathLike) -> list[str]:
    """Read a ``Concepts81.txt`` file: one concept per line, blank lines ignored.

    Returns:
        The 81 concept names in file order.

    Raises:
        ValueError: The file does not hold 81 distinct names.
    """
    path = Path(path)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != len(NUS_WIDE_CONCEPTS) or len(set(names)) != len(names):
        raise ValueError(
            f"{path}: expected {len(NUS_WIDE_CONCEPTS)} distinct concept names, one per line; "
            f"got {len(names)} lines, {len(set(names))} distinct"
        )
    return names


def load_nuswide(
    root: PathLike, split: PathLike, *, image_dir: str = "images", allow_empty: bool = False
) -> MultiLabelDataset:
    """Load a NUS-WIDE split file.

    Args:
        root: NUS-WIDE folder holding ``image_dir`` (and optionally ``Concepts81.txt``, whose names are then
            used as class names; otherwise the built-in official list).
        split: The split file (e.g. the authors' ``nus_val.txt``); a relative path that does not exist from
            the working directory is looked up under ``root``.
        image_dir: Image folder under ``root``.
        allow_empty: Accept lines with no class index as all-zero rows (see :mod:`clml_core.data.splitfile`).

    Returns:
        A dataset with N images and (N, 81) labels.

    Raises:
        FileNotFoundError: The split file or the image folder is missing.
        ValueError: A malformed split file (file and line number given) or a malformed ``Concepts81.txt``.
    """
    root = Path(root)
    split_path = Path(split)
    if not split_path.is_file() and not split_path.is_absolute() and (root / split_path).is_file():
        split_path = root / split_path
    concepts_file = root / "Concepts81.txt"
    classes = read_concepts(concepts_file) if concepts_file.is_file() else list(NUS_WIDE_CONCEPTS)
    return load_split_file(
        split_path,
        root / image_dir,
        len(classes),
        classes,
        allow_empty=allow_empty,
        name=f"nuswide/{split_path.stem}",
    )
