"""The SPLC/CLML split-file format: one image per line, ``file_name,idx idx idx``.

The authors of SPLC (Zhang et al., 2021) and CLML publish their training splits (the "40% left", "75% left" and
single-positive COCO labels, the NUS-WIDE splits) in this format::

    COCO_train2014_000000480023.jpg,0
    COCO_train2014_000000050518.jpg, 8 41

Class indices are 0-based columns of the label matrix, separated by whitespace; a space after the comma is
allowed. Blank lines are skipped. Rules enforced by :func:`read_split_file`:

* Every index must be a plain non-negative integer below ``num_classes``. A malformed token (the authors'
  NUS-WIDE files contain ``0437_424259217.jpg,2.``) raises ``ValueError`` naming the file and line.
* An empty index list (``name,``) is an image with no observed positive. The authors' files never contain one
  and their loader crashes on it, so by default it is an error; pass ``allow_empty=True`` to read it as an
  all-zero row (this is how :func:`clml_core.data.protocols.write_observed` stores such rows).
* A repeated index on one line is the same label listed twice and sets one entry.
* A file with no image lines is an error.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .dataset import MultiLabelDataset, PathLike

_INDEX = re.compile(r"[0-9]+")


def _parse_line(line: str, where: str, num_classes: int, allow_empty: bool) -> tuple[str, list[int]]:
    """One stripped, non-blank line ``file_name,idx idx ...`` as its name and class indices (repeats kept).

    Args:
        line: The line without surrounding whitespace.
        where: ``file:line`` for error messages.
        num_classes: C; every index must be in ``[0, C)``.
        allow_empty: Whether a line without an index is allowed.
    """
    # The index list never holds a comma, so the last comma separates it even if a name has one.
    name, sep, rest = line.rpartition(",")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{where}: expected 'file_name,idx idx ...', got {line!r}")
    indices: list[int] = []
    for token in rest.split():
        if not _INDEX.fullmatch(token):
            raise ValueError(
                f"{where}: class index {token!r} of {name!r} is not a non-negative integer "
                f"(line {line!r}); fix or remove this line"
            )
        index = int(token)
        if index >= num_classes:
            raise ValueError(
                f"{where}: class index {index} of {name!r} is out of range for "
                f"{num_classes} classes (valid: 0..{num_classes - 1})"
            )
        indices.append(index)
    if not indices and not allow_empty:
        raise ValueError(
            f"{where}: {name!r} lists no class index; pass allow_empty=True to read it as an "
            "image with no positive label"
        )
    return name, indices


def read_split_file(path: PathLike, num_classes: int, *, allow_empty: bool = False) -> tuple[list[str], np.ndarray]:
    """Parse a split file.

    Args:
        path: The split file.
        num_classes: C, the number of label columns; every index must be in ``[0, C)``.
        allow_empty: Whether a line with no class index is an all-zero row (True) or an error (False).

    Returns:
        names: N image file names, in file order.
        labels: (N, C) uint8 matrix, 1 where the line lists the class.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A malformed line, an index out of range, a disallowed empty index list, or no image lines;
            the message names the file and line number.
    """
    path = Path(path)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    names: list[str] = []
    rows: list[list[int]] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line:
                continue
            name, indices = _parse_line(line, f"{path}:{lineno}", num_classes, allow_empty)
            names.append(name)
            rows.append(indices)
    if not names:
        raise ValueError(f"split file {path} holds no image lines")
    labels = np.zeros((len(names), num_classes), dtype=np.uint8)
    for row, indices in enumerate(rows):
        labels[row, indices] = 1
    return names, labels


def write_split_file(path: PathLike, names: Sequence[str], labels: np.ndarray) -> None:
    """Write a label matrix as a split file, one ``name,i j k`` line per row (``name,`` for an empty row).

    Args:
        path: Output file; its parent folder must exist.
        names: N image file names; none may contain a newline or be empty or padded with whitespace.
        labels: (N, C) 0/1 matrix.

    Raises:
        ValueError: Lengths differ, a name cannot be written unambiguously, or labels are not 0/1.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, C) array, got shape {labels.shape}")
    if len(names) != labels.shape[0]:
        raise ValueError(f"names has {len(names)} entries but labels has {labels.shape[0]} rows")
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError("labels must hold only 0 and 1")
    lines = []
    for k, name in enumerate(names):
        if not name or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"names[{k}] = {name!r} cannot be stored in a split file")
        indices = " ".join(str(j) for j in np.flatnonzero(labels[k]))
        lines.append(f"{name},{indices}\n")
    Path(path).write_text("".join(lines), encoding="utf-8")


def load_split_file(
    path: PathLike,
    image_root: PathLike,
    num_classes: int,
    classes: Sequence[str] | None = None,
    *,
    allow_empty: bool = False,
    name: str = "",
) -> MultiLabelDataset:
    """Load a split file as a dataset whose images are ``image_root / file_name``.

    The split file's labels become both ``labels`` and ``observed``: for the authors' partial-label training
    splits the full labels are unknown. To pair full labels from the official annotations with the
    authors' observed labels, load the official dataset and use
    :func:`clml_core.data.protocols.read_observed` instead.

    Args:
        path: The split file (format in the module docstring).
        image_root: Folder holding the images named in the file. Images are opened lazily.
        num_classes: C.
        classes: C class names in column order; defaults to ``"0" .. "C-1"``.
        allow_empty: Accept lines with no class index as all-zero rows.
        name: Dataset name; defaults to the split file's stem.

    Returns:
        A dataset of N images with (N, C) labels.

    Raises:
        FileNotFoundError: The split file or ``image_root`` does not exist.
        ValueError: A malformed split file (see :func:`read_split_file`) or ``classes`` of the wrong length.
    """
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_root} (images named in {path} live there)")
    if classes is None:
        classes = [str(k) for k in range(num_classes)]
    elif len(classes) != num_classes:
        raise ValueError(f"classes has {len(classes)} names but num_classes is {num_classes}")
    names, labels = read_split_file(path, num_classes, allow_empty=allow_empty)
    return MultiLabelDataset(
        classes=classes,
        labels=labels,
        image_paths=[image_root / n for n in names],
        name=name or Path(path).stem,
    )
