"""How well an embedding keeps label structure: kNN label precision, label-set groups and their silhouette.

* :func:`knn_label_precision`: for every image and each of its labels, the share of its ``k`` nearest neighbours
  (cosine, itself excluded) that carry that label, averaged over all (image, label) pairs; *chance* is the same
  average for neighbours drawn at random from the other images.
* :func:`label_set_groups`: each image named by its exact label set when that set is one of the most frequent
  (as in the paper's t-SNE figure), else ``other``.
* :func:`group_silhouette`: scikit-learn's silhouette (cosine) of the named groups, ``other`` left out.
* :func:`embedding_panels`: both numbers and a seeded 2-D UMAP map for each of several embeddings of the same
  images (the panels of ``03_embeddings``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors


def knn_label_precision(embeddings: np.ndarray, labels: np.ndarray, k: int = 10) -> tuple[float, float]:
    """kNN label precision of an embedding and its chance level.

    Args:
        embeddings: (N, E) vectors; neighbours by cosine distance, the image itself excluded.
        labels: (N, C) 0/1 labels; images without a label contribute no pair.
        k: neighbours per image, 1 <= k < N.

    Returns:
        (precision, chance), both in [0, 1]: the mean over (image i, label c) pairs with ``labels[i, c] = 1`` of
        the share of i's k neighbours carrying c, and of ``(n_c - 1) / (N - 1)`` (a random other image carries c).

    Raises:
        ValueError: on shapes that do not match, k out of range or no positive label.
    """
    embeddings, labels = np.asarray(embeddings, dtype=np.float64), np.asarray(labels)
    if embeddings.ndim != 2 or labels.ndim != 2 or len(embeddings) != len(labels):
        raise ValueError(f"embeddings (N, E) and labels (N, C) must share N, got {embeddings.shape} and {labels.shape}")
    if not 1 <= k < len(labels):
        raise ValueError(f"k must be in [1, N - 1] = [1, {len(labels) - 1}], got {k}")
    image_idx, label_idx = np.nonzero(labels)
    if len(image_idx) == 0:
        raise ValueError("labels hold no positive: kNN label precision is undefined")
    neighbours = NearestNeighbors(n_neighbors=k, metric="cosine").fit(embeddings).kneighbors(return_distance=False)
    share = labels[neighbours].mean(axis=1)  # (N, C) share of an image's k neighbours carrying each label
    chance = (labels.sum(axis=0)[label_idx] - 1) / (len(labels) - 1)
    return float(share[image_idx, label_idx].mean()), float(chance.mean())


def label_set_groups(
    labels: np.ndarray,
    classes: Sequence[str],
    n_groups: int = 5,
    min_size: int = 5,
    min_labels: int = 2,
    other: str = "other",
) -> np.ndarray:
    """Name each image by its exact label set if that set is one of the most frequent, else ``other``.

    The chosen sets are the ``n_groups`` most frequent exact label sets with at least ``min_labels`` labels held
    by at least ``min_size`` images (ties broken by name), as in the paper's t-SNE figure.

    Args:
        labels: (N, C) 0/1 labels.
        classes: C class names; a set is named ``"a + b"`` in class order.

    Returns:
        (N,) object array of group names.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != len(classes):
        raise ValueError(f"labels must be (N, {len(classes)}), got shape {labels.shape}")
    names = np.array([" + ".join(c for c, y in zip(classes, row) if y) for row in labels], dtype=object)
    counts = Counter(names[labels.sum(axis=1) >= min_labels])
    eligible = [name for name, count in counts.items() if count >= min_size]
    chosen = sorted(eligible, key=lambda name: (-counts[name], name))[:n_groups]
    return np.where(np.isin(names, chosen), names, other)


def group_silhouette(embeddings: np.ndarray, groups: np.ndarray, other: str = "other") -> float:
    """Silhouette (cosine) of the images in named groups, ``other`` left out; NaN with fewer than two groups.

    Args:
        embeddings: (N, E) vectors.
        groups: (N,) group names, as :func:`label_set_groups`.
    """
    embeddings, groups = np.asarray(embeddings, dtype=np.float64), np.asarray(groups, dtype=object)
    if len(embeddings) != len(groups):
        raise ValueError(f"{len(embeddings)} embeddings for {len(groups)} group names")
    named = groups != other
    if len(set(groups[named])) < 2:
        return float("nan")
    return float(silhouette_score(embeddings[named], groups[named], metric="cosine"))


def _check_panels(
    embeddings: Mapping[str, np.ndarray], labels: np.ndarray, groups: np.ndarray, index: np.ndarray
) -> None:
    if not embeddings:
        raise ValueError("embeddings is empty; give at least one panel name -> (N, E) embeddings")
    if len(groups) != len(labels) or len(index) != len(labels):
        raise ValueError(f"groups {groups.shape} and index {index.shape} must both be ({len(labels)},) like labels")
    for panel, vectors in embeddings.items():
        if np.ndim(vectors) != 2 or len(vectors) != len(labels):
            raise ValueError(f"embeddings[{panel!r}] must be ({len(labels)}, E), got shape {np.shape(vectors)}")


def embedding_panels(
    embeddings: Mapping[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    k: int = 10,
    index: np.ndarray | None = None,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_epochs: int = 500,
    seed: int = 0,
    other: str = "other",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """kNN label precision, silhouette and a 2-D UMAP map (cosine, seeded) of each of several embeddings of the
    same images, computed panel by panel in the order given.

    Args:
        embeddings: panel name -> (N, E) embeddings of the same N images (E may differ between panels).
        labels: (N, C) 0/1 labels of the images.
        groups: (N,) group names of the images, as :func:`label_set_groups`.
        k: neighbours of :func:`knn_label_precision`.
        index: (N,) image ids written beside the coordinates, e.g. the rows of the test set kept (default 0..N-1).
        n_neighbors, min_dist, n_epochs: the ``umap.UMAP`` settings.
        seed: ``random_state`` of UMAP (a seeded UMAP runs on one thread and gives the same map every time).
        other: the group name of the images in no named group.

    Returns:
        ``(numbers, coords)``: ``numbers`` has one row per panel with columns ``model``, ``knn_label_precision``,
        ``chance``, ``silhouette``, ``k``, ``n_images`` and ``n_grouped`` (images not in ``other``); ``coords``
        has one row per panel and image with columns ``model``, ``index``, ``x``, ``y`` and ``group``.

    Raises:
        ValueError: on no panel or a panel, ``groups`` or ``index`` whose N differs from the labels'.
        ImportError: when umap-learn (the ``notebooks`` extra) is not installed.
    """
    labels, groups = np.asarray(labels), np.asarray(groups, dtype=object)
    index = np.arange(len(labels)) if index is None else np.asarray(index)
    _check_panels(embeddings, labels, groups, index)
    import umap  # the notebooks extra; imported here so the package does not need it

    numbers, coords = [], []
    for panel, vectors in embeddings.items():
        precision, chance = knn_label_precision(vectors, labels, k)
        silhouette = group_silhouette(vectors, groups, other)
        numbers.append({"model": panel, "knn_label_precision": precision, "chance": chance, "silhouette": silhouette,
                        "k": k, "n_images": len(labels), "n_grouped": int((groups != other).sum())})  # fmt: skip
        reducer = umap.UMAP(
            n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine", n_epochs=n_epochs, random_state=seed
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)  # seeded: one thread
            xy = reducer.fit_transform(vectors)  # (N, 2)
        coords.append(pd.DataFrame({"model": panel, "index": index, "x": xy[:, 0], "y": xy[:, 1], "group": groups}))
    return pd.DataFrame(numbers), pd.concat(coords, ignore_index=True)
