"""Missing-label protocols: which positives the learner observes, plus tools to pin and verify a split.

All protocols are pure functions of the full label matrix and a seed; they only ever turn positives into
unobserved entries (``observed <= labels`` elementwise), never create positives.

* :func:`keep_fraction` is the SPLC construction ("40% left", "75% left"): keep a fraction of all positives
  of the dataset, every image with a positive keeping at least one. Because single-label images keep 100%,
  images with many labels keep less than the fraction.
* :func:`single_positive` keeps exactly one random positive per image.
* :func:`cole_single_positive` and :func:`cole_split` are Cole et al.'s single-positive draw and their clean
  validation split (CVPR 2021, github.com/elijahcole/single-positive-multi-label), reproduced bit for bit so that a
  study under their protocol sees the very labels and images their harness (and every method built on it) sees.

A generated split can be written with :func:`write_observed` (the SPLC/CLML split-file format), read back
with :func:`read_observed` (also the way to use the authors' published split files on top of the official
annotations), and identified by :func:`labels_checksum`, which every run records.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Sequence

import numpy as np

from .dataset import PathLike, binary_matrix
from .splitfile import read_split_file, write_split_file


def _one_positive_per_row(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Choose one entry per distinct row, uniformly at random.

    Args:
        rows: (P,) row index of each positive, sorted ascending (as from ``np.nonzero``).

    Returns:
        (R,) indices into ``rows``, one per distinct row.
    """
    keys = rng.random(rows.shape[0])
    order = np.lexsort((keys, rows))  # by row, then by random key
    first = np.ones(rows.shape[0], dtype=bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    return order[first]


def keep_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Keep ``round(fraction * P)`` of the P positives, at least one in every image that has one.

    First one random positive per image is kept, then the remaining quota is drawn uniformly without
    replacement from the other positives. The number kept is exact: ``floor(fraction * P + 0.5)``.

    Args:
        labels: (N, C) full 0/1 labels.
        fraction: Share of positives to keep, in (0, 1].
        seed: Seed of the random choice; the same seed gives the same observed matrix.

    Returns:
        (N, C) uint8 observed labels, a subset of ``labels``.

    Raises:
        ValueError: ``fraction`` outside (0, 1], or so small that the quota is below the number of images
            with a positive (each of which must keep one).
    """
    labels = binary_matrix("labels", labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rows, cols = np.nonzero(labels)  # (P,) each, sorted by row
    total = rows.shape[0]
    quota = math.floor(fraction * total + 0.5)
    n_images = np.unique(rows).shape[0]
    if quota < n_images:
        raise ValueError(
            f"keeping {fraction} of {total} positives gives {quota}, fewer than the {n_images} images with a "
            f"positive, each of which keeps one; use fraction >= {n_images / total:.6f}"
        )
    rng = np.random.default_rng(seed)
    kept = np.zeros(total, dtype=bool)
    kept[_one_positive_per_row(rows, rng)] = True
    others = np.flatnonzero(~kept)
    kept[rng.choice(others, size=quota - n_images, replace=False)] = True
    observed = np.zeros_like(labels)
    observed[rows[kept], cols[kept]] = 1
    return observed


def single_positive(labels: np.ndarray, seed: int) -> np.ndarray:
    """Keep exactly one random positive per image; images without a positive stay all zero.

    Args:
        labels: (N, C) full 0/1 labels.
        seed: Seed of the random choice.

    Returns:
        (N, C) uint8 observed labels with at most one 1 per row, a subset of ``labels``.
    """
    labels = binary_matrix("labels", labels)
    rows, cols = np.nonzero(labels)
    chosen = _one_positive_per_row(rows, np.random.default_rng(seed))
    observed = np.zeros_like(labels)
    observed[rows[chosen], cols[chosen]] = 1
    return observed


#: Cole et al.'s seed of the observed-label draw (``--seed`` of ``preproc/generate_observed_labels.py``) and of the
#: train/validation split (``P['split_seed']`` in ``train.py``).
COLE_SEED = 1200


def _check_seed(seed: int) -> None:
    """Raise ValueError unless seed is an integer numpy's legacy ``RandomState`` accepts."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def cole_single_positive(labels: np.ndarray, seed: int = COLE_SEED) -> np.ndarray:
    """Cole et al.'s single-positive draw: the observed labels their harness trains on, bit for bit.

    Their ``preproc/generate_observed_labels.py`` (``observe_uniform`` with ``num_pos=1, num_neg=0``) draws each
    official split with a fresh ``numpy.random.RandomState(seed)`` and, image by image in row order, shuffles the
    column indices of the image's positives and keeps the first, then shuffles the column indices of its negatives
    and keeps none of them. That second shuffle still consumes random numbers (``n - 1`` bounded draws for ``n``
    negatives), so it is done here too: leaving it out would change every image after the first. An image
    without a positive observes nothing; its negatives are still shuffled. Call this once per official split, on
    the whole split (before the train/validation split of :func:`cole_split`), as their script does.

    Their script asserts that the matrix holds both values (it converts 0 to -1 and checks for -1 and +1), so a
    matrix of only zeros or only ones is refused here as well.

    Args:
        labels: (N, C) full 0/1 labels of one official split, in the row order of Cole's formatted files.
        seed: Seed of the ``RandomState`` (their default 1200).

    Returns:
        (N, C) uint8 observed labels with at most one 1 per row, a subset of ``labels``.

    Raises:
        ValueError: ``labels`` is not a 0/1 (N, C) matrix, holds no 0 or no 1, or ``seed`` is not an integer in
            [0, 2**32).
    """
    labels = binary_matrix("labels", labels)
    if labels.size == 0 or not labels.any() or labels.all():
        raise ValueError(f"labels of shape {labels.shape} must hold both 0 and 1 (Cole et al.'s generator asserts it)")
    _check_seed(seed)
    rng = np.random.RandomState(seed)
    observed = np.zeros(labels.shape, dtype=np.uint8)
    for row, values in enumerate(labels):
        positives = np.flatnonzero(values)  # (P_i,) column indices, ascending as in their np.nonzero
        rng.shuffle(positives)
        observed[row, positives[:1]] = 1
        rng.shuffle(np.flatnonzero(values == 0))  # their negatives' shuffle: none kept, random state consumed
    return observed


def cole_split(n: int, val_fraction: float = 0.2, seed: int = COLE_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Cole et al.'s split of an official training set into training and clean validation images.

    As ``generate_split`` in their ``datasets.py``: ``V = int(np.round(val_fraction * n))`` (numpy rounds halves
    to even), ``perm = RandomState(seed).permutation(n)``, training is ``sorted(perm[:n - V])`` and validation
    ``sorted(perm[-V:])``. Their subsampling step that follows (``ss_frac_train = ss_frac_val = 1.0``) keeps
    every index, so it is left out. Their code would return every image as validation when V = 0
    (``perm[-0:]``); here V must be between 1 and n - 1.

    Args:
        n: Number of images of the official training split.
        val_fraction: Share for validation, in (0, 1) (theirs: 0.2).
        seed: Seed of the ``RandomState`` (their ``split_seed``, 1200).

    Returns:
        train_idx: (n - V,) sorted int64 row indices.
        val_idx: (V,) sorted int64 row indices, disjoint from ``train_idx``.

    Raises:
        ValueError: ``n`` is not an integer >= 2, ``val_fraction`` is outside (0, 1) or gives V = 0 or V = n,
            or ``seed`` is not an integer in [0, 2**32).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if not isinstance(val_fraction, numbers.Real) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    _check_seed(seed)
    n_val = int(np.round(val_fraction * n))
    if not 1 <= n_val <= n - 1:
        raise ValueError(
            f"val_fraction={val_fraction} of n={n} rounds to {n_val} validation images; it must give 1 to {n - 1}"
        )
    perm = np.random.RandomState(seed).permutation(n)
    return np.sort(perm[: n - n_val]).astype(np.int64), np.sort(perm[n - n_val :]).astype(np.int64)


def write_observed(path: PathLike, observed: np.ndarray, image_names: Sequence[str]) -> None:
    """Store an observed-label matrix as a split file so that a run can be repeated on the exact split.

    Rows without an observed positive are written as ``name,`` (read them back with :func:`read_observed`,
    which accepts such rows).

    Args:
        path: Output file.
        observed: (N, C) 0/1 matrix.
        image_names: N image file names, unique, in row order.
    """
    if len(set(image_names)) != len(image_names):
        raise ValueError("image_names must be unique so the file can be matched back to the images")
    write_split_file(path, image_names, binary_matrix("observed", observed))


def read_observed(path: PathLike, image_names: Sequence[str], num_classes: int) -> np.ndarray:
    """Read an observed-label split file and align it to a dataset's rows.

    The file must name exactly the images in ``image_names`` (any order). This also applies the authors'
    published splits to a dataset loaded from the official annotations, e.g.
    ``ds.with_observed(read_observed("coco_train_0.4left.txt", [p.name for p in ds.image_paths], 80))``.

    Args:
        path: Split file (lines with no index are read as all-zero rows).
        image_names: N image file names of the dataset, in row order.
        num_classes: C.

    Returns:
        (N, C) uint8 observed labels in the order of ``image_names``.

    Raises:
        ValueError: The file repeats a name, or its names differ from ``image_names`` (examples given).
    """
    names, labels = read_split_file(path, num_classes, allow_empty=True)
    row_of = {name: k for k, name in enumerate(names)}
    if len(row_of) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"{path}: image names repeat (e.g. {repeated}); cannot align rows")
    missing = [n for n in image_names if n not in row_of]
    extra = set(names) - set(image_names)
    if missing or extra:
        raise ValueError(
            f"{path}: images differ from the dataset's: {len(missing)} dataset images are not in the file "
            f"(e.g. {missing[:3]}), {len(extra)} file images are not in the dataset (e.g. {sorted(extra)[:3]})"
        )
    return labels[[row_of[n] for n in image_names]]


def labels_checksum(observed: np.ndarray) -> str:
    """SHA-256 of a 0/1 label matrix, including its shape, so a run can record which split it used.

    Equal matrices give equal checksums whatever their dtype (bool, int, float holding 0/1).

    Args:
        observed: (N, C) 0/1 matrix.

    Returns:
        64 hex characters.
    """
    matrix = binary_matrix("observed", observed)
    digest = hashlib.sha256(f"{matrix.shape[0]}x{matrix.shape[1]}:".encode())
    digest.update(np.ascontiguousarray(matrix).tobytes())
    return digest.hexdigest()


def train_val_split(
    n: int, val_fraction: float, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a seeded validation set out of a training set, so model selection never sees the test set.

    The validation set has ``floor(val_fraction * n + 0.5)`` images, at least 1 and at most ``n - 1``.
    Without ``labels`` it is a uniform random subset. With ``labels`` (pass the *observed* labels: they are
    what training can see) it first takes, from the rarest class up, one random image of every class that
    has at least two positive images and is not yet covered, while the quota lasts, then fills the rest
    uniformly. So every class with two or more positives appears in validation if the quota allows it;
    classes with a single positive image are left to training.

    Args:
        n: Number of training images.
        val_fraction: Share for validation, in (0, 1).
        seed: Seed of the split.
        labels: Optional (n, C) 0/1 labels for class coverage.

    Returns:
        train_idx: (n - V,) sorted int64 row indices.
        val_idx: (V,) sorted int64 row indices, disjoint from ``train_idx``.
    """
    if n < 2:
        raise ValueError(f"need at least 2 images to split, got n={n}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(max(math.floor(val_fraction * n + 0.5), 1), n - 1)
    rng = np.random.default_rng(seed)
    in_val = np.zeros(n, dtype=bool)
    if labels is not None:
        labels = binary_matrix("labels", labels)
        if labels.shape[0] != n:
            raise ValueError(f"labels has {labels.shape[0]} rows but n is {n}")
        counts = labels.sum(axis=0)
        for cls in np.argsort(counts, kind="stable"):
            if in_val.sum() == n_val:
                break
            members = np.flatnonzero(labels[:, cls])
            if members.shape[0] >= 2 and not in_val[members].any():
                in_val[rng.choice(members)] = True
    rest = np.flatnonzero(~in_val)
    in_val[rng.choice(rest, size=n_val - int(in_val.sum()), replace=False)] = True
    return np.flatnonzero(~in_val).astype(np.int64), np.flatnonzero(in_val).astype(np.int64)


def _full(labels: np.ndarray, seed: int, **_: object) -> np.ndarray:
    return labels


def _keep_fraction(labels: np.ndarray, seed: int, *, fraction: float, **_: object) -> np.ndarray:
    return keep_fraction(labels, fraction, seed)


def _single_positive(labels: np.ndarray, seed: int, **_: object) -> np.ndarray:
    return single_positive(labels, seed)


def _cole(labels: np.ndarray, seed: int, **_: object) -> np.ndarray:
    return cole_single_positive(labels, seed)


def _file(labels: np.ndarray, seed: int, *, observed_file: str, image_names: Sequence[str], **_: object) -> np.ndarray:
    return read_observed(observed_file, image_names, labels.shape[1])


#: The missing-label protocols by config name (data.protocol): each maps (labels, seed, fraction=,
#: observed_file=, image_names=) to the observed labels, reading the keywords it needs.
PROTOCOLS: dict[str, Callable[..., np.ndarray]] = {
    "full": _full,
    "keep_fraction": _keep_fraction,
    "single_positive": _single_positive,
    "cole": _cole,
    "file": _file,
}


def observed_labels(
    labels: np.ndarray,
    protocol: str,
    seed: int,
    *,
    fraction: float = 1.0,
    observed_file: str = "",
    image_names: Sequence[str] = (),
) -> np.ndarray:
    """The observed labels of a missing-label protocol (config fields data.protocol, data.fraction,
    data.observed_file), drawn under ``seed``.

    Args:
        labels: (N, C) full 0/1 labels of the split.
        protocol: full | keep_fraction | single_positive | cole (:func:`cole_single_positive`) | file.
        seed: seed of the draw.
        fraction: the kept share of positives of keep_fraction.
        observed_file: the split file of the file protocol (read by :func:`read_observed`).
        image_names: the N image names, in row order, that the file protocol matches the file against.

    Returns:
        (N, C) observed 0/1 labels.
    """
    draw = PROTOCOLS.get(protocol)
    if draw is None:
        raise ValueError(f"config field 'data.protocol': {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return draw(labels, seed, fraction=fraction, observed_file=observed_file, image_names=image_names)


def validation_split(
    n: int, protocol: str, val_fraction: float, seed: int, observed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The (train_idx, val_idx) carve of a protocol's training split: Cole et al.'s :func:`cole_split` for the cole
    protocol, otherwise :func:`train_val_split` covering the classes of the ``observed`` labels (what training can
    see)."""
    if protocol == "cole":
        return cole_split(n, val_fraction, seed)
    return train_val_split(n, val_fraction, seed, labels=observed)
