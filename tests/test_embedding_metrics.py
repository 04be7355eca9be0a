"""kNN label precision, label-set groups and their silhouette against slow loops and scikit-learn; the panels
of 03_embeddings against those functions and umap-learn called directly."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from clml_core.embedding_metrics import embedding_panels, group_silhouette, knn_label_precision, label_set_groups

CLASSES = ["cat", "dog", "car", "tree"]


def _slow_knn_label_precision(embeddings, labels, k):
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    n = len(labels)
    shares, chances = [], []
    for i in range(n):
        others = [j for j in np.argsort(distance[i], kind="stable") if j != i][:k]
        for c in np.flatnonzero(labels[i]):
            shares.append(np.mean([labels[j, c] for j in others]))
            chances.append((labels[:, c].sum() - 1) / (n - 1))
    return float(np.mean(shares)), float(np.mean(chances))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_label_precision_matches_slow_loop(k):
    rng = np.random.default_rng(k)
    labels = (rng.random((40, 4)) < 0.3).astype(int)
    embeddings = labels @ rng.normal(size=(4, 6)) + rng.normal(0, 0.5, (40, 6))  # label structure plus noise
    got = knn_label_precision(embeddings, labels, k)
    assert np.allclose(got, _slow_knn_label_precision(embeddings, labels, k))
    assert got[0] > got[1]  # the embedding carries the labels: better than chance


def test_knn_label_precision_hand_example():
    embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([[1, 0], [1, 0], [0, 1], [1, 1]])
    # nearest neighbour (cosine): 0<->1, 2<->3. Pairs: (0,a): 1 has a ->1; (1,a): 0 -> 1; (2,b): 3 -> 1;
    # (3,a): 2 lacks a -> 0; (3,b): 2 -> 1. Mean 4/5. Chance: a in 3 of 4 -> 2/3 (x3), b in 2 -> 1/3 (x2).
    precision, chance = knn_label_precision(embeddings, labels, k=1)
    assert np.isclose(precision, 0.8) and np.isclose(chance, (3 * 2 / 3 + 2 * 1 / 3) / 5)


def test_knn_label_precision_bad_input():
    with pytest.raises(ValueError, match="share N"):
        knn_label_precision(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="k must be"):
        knn_label_precision(np.ones((3, 2)), np.ones((3, 2)), k=3)
    with pytest.raises(ValueError, match="no positive"):
        knn_label_precision(np.ones((3, 2)), np.zeros((3, 2)), k=1)


def test_group_silhouette_is_sklearns_on_named_groups():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(30, 5))
    groups = np.array(["a"] * 10 + ["b"] * 10 + ["other"] * 10, dtype=object)
    expected = silhouette_score(embeddings[:20], groups[:20], metric="cosine")
    assert np.isclose(group_silhouette(embeddings, groups), expected)
    assert np.isnan(group_silhouette(embeddings, np.array(["a"] * 10 + ["other"] * 20, dtype=object)))
    with pytest.raises(ValueError, match="group names"):
        group_silhouette(embeddings, groups[:5])


def _slow_label_set_groups(labels, classes, n_groups, min_size, min_labels, other="other"):
    counts: dict[tuple[int, ...], int] = {}
    for row in labels:
        key = tuple(int(c) for c in np.flatnonzero(row))
        if len(key) >= min_labels:
            counts[key] = counts.get(key, 0) + 1
    named = {" + ".join(classes[c] for c in key): n for key, n in counts.items() if n >= min_size}
    chosen = sorted(named, key=lambda name: (-named[name], name))[:n_groups]
    out = []
    for row in labels:
        name = " + ".join(classes[c] for c in np.flatnonzero(row))
        out.append(name if name in chosen else other)
    return out


def test_label_set_groups_hand_example():
    labels = np.array([[1, 1, 0, 0]] * 3 + [[0, 0, 1, 1]] * 2 + [[1, 0, 0, 0]] * 5 + [[0, 1, 1, 0]])
    groups = label_set_groups(labels, CLASSES, n_groups=5, min_size=2, min_labels=2)
    assert groups.tolist() == ["cat + dog"] * 3 + ["car + tree"] * 2 + ["other"] * 6
    singletons = label_set_groups(labels, CLASSES, n_groups=1, min_size=2, min_labels=1)
    assert singletons.tolist() == ["other"] * 5 + ["cat"] * 5 + ["other"]
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        label_set_groups(labels[:, :3], CLASSES)


@pytest.mark.parametrize("n_groups, min_size, min_labels", list(itertools.product([1, 3, 6], [1, 3], [1, 2])))
def test_label_set_groups_matches_slow_reference(n_groups, min_size, min_labels):
    labels = (np.random.default_rng(n_groups * 10 + min_size).random((200, 4)) < 0.35).astype(int)
    expected = _slow_label_set_groups(labels, CLASSES, n_groups, min_size, min_labels)
    got = label_set_groups(labels, CLASSES, n_groups, min_size, min_labels)
    assert got.tolist() == expected


def _panels_case():
    """30 images, 4 classes, three label sets; one embedding built from the labels, one of noise (other width)."""
    rng = np.random.default_rng(0)
    labels = np.array([[1, 1, 0, 0]] * 10 + [[0, 0, 1, 1]] * 10 + [[1, 0, 1, 0]] * 10)
    informative = labels @ rng.normal(size=(4, 6)) + rng.normal(0, 0.1, (30, 6))
    noise = rng.normal(size=(30, 3))
    groups = label_set_groups(labels, CLASSES, n_groups=2, min_size=2, min_labels=2)
    return {"labels": informative, "noise": noise}, labels, groups


def test_embedding_panels_is_the_metrics_and_a_seeded_umap_per_panel():
    umap = pytest.importorskip("umap")
    embeddings, labels, groups = _panels_case()
    index = np.arange(100, 130)
    settings = {"n_neighbors": 5, "min_dist": 0.2, "n_epochs": 20}
    numbers, coords = embedding_panels(embeddings, labels, groups, k=3, index=index, seed=1, **settings)
    columns = ["model", "knn_label_precision", "chance", "silhouette", "k", "n_images", "n_grouped"]
    assert list(numbers.columns) == columns
    assert numbers["model"].tolist() == ["labels", "noise"]
    assert numbers["k"].tolist() == [3, 3] and numbers["n_images"].tolist() == [30, 30]
    assert numbers["n_grouped"].tolist() == [20, 20]  # two of the three label sets are named
    assert list(coords.columns) == ["model", "index", "x", "y", "group"]
    for (panel, vectors), row in zip(embeddings.items(), numbers.itertuples()):
        assert np.allclose((row.knn_label_precision, row.chance), knn_label_precision(vectors, labels, 3))
        assert np.isclose(row.silhouette, group_silhouette(vectors, groups))
        part = coords[coords["model"] == panel]
        with warnings.catch_warnings():  # a seeded UMAP warns that it runs on one thread
            warnings.simplefilter("ignore", UserWarning)
            expected = umap.UMAP(metric="cosine", random_state=1, **settings).fit_transform(vectors)  # (N, 2)
        np.testing.assert_allclose(part[["x", "y"]].to_numpy(), expected)
        np.testing.assert_array_equal(part["index"], index)
        assert part["group"].tolist() == groups.tolist()
    by_model = numbers.set_index("model")
    assert by_model.loc["labels", "knn_label_precision"] > by_model.loc["noise", "knn_label_precision"]
    assert by_model.loc["labels", "silhouette"] > by_model.loc["noise", "silhouette"]


def test_embedding_panels_bad_input():
    embeddings, labels, groups = _panels_case()
    with pytest.raises(ValueError, match="embeddings is empty"):
        embedding_panels({}, labels, groups)
    with pytest.raises(ValueError, match=r"embeddings\['noise'\] must be \(30, E\)"):
        embedding_panels({**embeddings, "noise": embeddings["noise"][:20]}, labels, groups)
    with pytest.raises(ValueError, match=r"must both be \(30,\)"):
        embedding_panels(embeddings, labels, groups[:5])
    with pytest.raises(ValueError, match=r"must both be \(30,\)"):
        embedding_panels(embeddings, labels, groups, index=np.arange(29))
