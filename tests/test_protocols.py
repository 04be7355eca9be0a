"""Missing-label protocols: exact counts, the at-least-one rule, uniformity, pinning splits, checksums, val split."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from clml_core.data import (
    keep_fraction,
    labels_checksum,
    read_observed,
    single_positive,
    train_val_split,
    write_observed,
)
from clml_core.data.protocols import COLE_SEED, cole_single_positive, cole_split


def _random_labels(n: int, c: int, density: float, seed: int) -> np.ndarray:
    labels = (np.random.default_rng(seed).random((n, c)) < density).astype(np.uint8)
    labels[::7] = 0  # some images without a positive
    return labels


def _coco2014_like(seed: int = 0) -> np.ndarray:
    """(82081, 80) labels with exactly 241,035 positives and one or more per image, as COCO-2014 train."""
    n, c, total = 82_081, 80, 241_035
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, c), dtype=np.uint8)
    labels[np.arange(n), rng.integers(0, c, n)] = 1
    free = np.flatnonzero(labels.ravel() == 0)
    labels.ravel()[rng.choice(free, size=total - n, replace=False)] = 1
    return labels


# --- keep_fraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.45, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_keep_fraction_exact_count_subset_and_at_least_one(fraction, seed):
    labels = _random_labels(200, 12, 0.25, seed=seed)
    observed = keep_fraction(labels, fraction, seed=seed)
    assert observed.dtype == np.uint8 and observed.shape == labels.shape
    assert observed.sum() == math.floor(fraction * labels.sum() + 0.5)
    assert (observed <= labels).all()  # only positives are hidden, never created
    has_positive = labels.sum(axis=1) > 0
    assert (observed.sum(axis=1)[has_positive] >= 1).all()
    assert (observed.sum(axis=1)[~has_positive] == 0).all()


def test_keep_fraction_splc_coco_counts():
    labels = _coco2014_like()
    assert keep_fraction(labels, 0.4, seed=0).sum() == 96_414  # round(0.4 * 241,035); SPLC published 96,251
    assert keep_fraction(labels, 0.75, seed=0).sum() == 180_776  # round(0.75 * 241,035); SPLC: 181,422
    with pytest.raises(ValueError, match="fewer than the 82081 images with a positive"):
        keep_fraction(labels, 0.3, seed=0)


def test_keep_fraction_deterministic_per_seed_and_seeds_differ():
    labels = _random_labels(300, 10, 0.3, seed=5)
    a = keep_fraction(labels, 0.6, seed=11)
    np.testing.assert_array_equal(a, keep_fraction(labels, 0.6, seed=11))
    assert not np.array_equal(a, keep_fraction(labels, 0.6, seed=12))


def test_keep_fraction_is_uniform_beyond_the_first_positive():
    # Image with k positives: one is kept first (prob 1/k each), then the extra quota Q - R is spread uniformly
    # over the P - R remaining positives: P(kept) = 1/k + (1 - 1/k) (Q - R) / (P - R).
    labels = np.zeros((5, 6), dtype=np.uint8)
    for row, k in enumerate([1, 2, 3, 4, 0]):
        labels[row, :k] = 1
    total, images, fraction = 10, 4, 0.6
    quota = 6
    runs = 3000
    kept = np.mean([keep_fraction(labels, fraction, seed=s) for s in range(runs)], axis=0)
    for row, k in enumerate([1, 2, 3, 4]):
        expected = 1 / k + (1 - 1 / k) * (quota - images) / (total - images)
        np.testing.assert_allclose(kept[row, :k], expected, atol=0.04)
    assert kept[4].sum() == 0


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_keep_fraction_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        keep_fraction(np.eye(3, dtype=np.uint8), fraction, seed=0)


def test_keep_fraction_validates_labels():
    with pytest.raises(ValueError, match=r"labels\[0, 0\] = 2"):
        keep_fraction(np.full((2, 2), 2), 0.5, seed=0)


# --- single_positive -------------------------------------------------------------------------------------


def test_single_positive_one_per_image_uniform():
    labels = np.zeros((4, 5), dtype=np.uint8)
    labels[0, [0, 2, 4]] = 1
    labels[1, [1, 3]] = 1
    labels[2, 4] = 1  # row 3 has no positive
    runs = 2000
    draws = np.array([single_positive(labels, seed=s) for s in range(runs)])  # (runs, 4, 5)
    assert (draws <= labels).all()
    np.testing.assert_array_equal(draws.sum(axis=2)[:, :3], 1)
    assert draws[:, 3].sum() == 0
    freq = draws.mean(axis=0)
    np.testing.assert_allclose(freq[0, [0, 2, 4]], 1 / 3, atol=0.04)
    np.testing.assert_allclose(freq[1, [1, 3]], 1 / 2, atol=0.04)
    assert freq[2, 4] == 1.0


def test_single_positive_deterministic_and_seeded():
    labels = _random_labels(100, 8, 0.4, seed=0)
    np.testing.assert_array_equal(single_positive(labels, 3), single_positive(labels, 3))
    assert not np.array_equal(single_positive(labels, 3), single_positive(labels, 4))


# --- pinning and identifying splits ----------------------------------------------------------------------


def test_write_read_observed_round_trip_with_empty_rows_and_any_order(tmp_path):
    labels = _random_labels(40, 9, 0.3, seed=1)
    observed = keep_fraction(labels, 0.7, seed=2)
    names = [f"COCO_train2014_{k:012d}.jpg" for k in range(40)]
    write_observed(tmp_path / "obs.txt", observed, names)
    lines = (tmp_path / "obs.txt").read_text().splitlines()
    assert lines[0] == "COCO_train2014_000000000000.jpg,"  # row 0 has no positive (labels[::7] = 0)
    np.testing.assert_array_equal(read_observed(tmp_path / "obs.txt", names, 9), observed)
    order = np.random.default_rng(0).permutation(40)
    shuffled = [names[k] for k in order]
    np.testing.assert_array_equal(read_observed(tmp_path / "obs.txt", shuffled, 9), observed[order])


def test_read_observed_rejects_mismatched_names(tmp_path):
    (tmp_path / "obs.txt").write_text("a.jpg,0\nb.jpg,1\n")
    with pytest.raises(ValueError, match=r"1 dataset images are not in the file \(e.g. \['c.jpg'\]\)"):
        read_observed(tmp_path / "obs.txt", ["a.jpg", "c.jpg"], 2)
    with pytest.raises(ValueError, match=r"1 file images are not in the dataset \(e.g. \['b.jpg'\]\)"):
        read_observed(tmp_path / "obs.txt", ["a.jpg"], 2)
    (tmp_path / "dup.txt").write_text("a.jpg,0\na.jpg,1\n")
    with pytest.raises(ValueError, match="image names repeat"):
        read_observed(tmp_path / "dup.txt", ["a.jpg"], 2)
    with pytest.raises(ValueError, match="image_names must be unique"):
        write_observed(tmp_path / "x.txt", np.eye(2), ["a.jpg", "a.jpg"])


def test_labels_checksum_reference_and_sensitivity():
    observed = _random_labels(20, 6, 0.3, seed=0)
    expected = hashlib.sha256(b"20x6:" + observed.astype(np.uint8).tobytes()).hexdigest()
    assert labels_checksum(observed) == expected
    assert labels_checksum(observed.astype(bool)) == expected
    assert labels_checksum(observed.astype(np.float32)) == expected
    assert labels_checksum(np.asfortranarray(observed)) == expected
    flipped = observed.copy()
    flipped[3, 2] ^= 1
    assert labels_checksum(flipped) != expected
    assert labels_checksum(np.zeros((2, 3))) != labels_checksum(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"observed\[0, 0\] = 3"):
        labels_checksum(np.full((2, 2), 3))


# --- train/validation split ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,fraction,n_val", [(100, 0.1, 10), (7, 0.5, 4), (5, 0.01, 1), (3, 0.99, 2)])
def test_train_val_split_sizes_disjoint_and_complete(n, fraction, n_val):
    train, val = train_val_split(n, fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


def test_train_val_split_seeded():
    a = train_val_split(1000, 0.2, seed=1)
    b = train_val_split(1000, 0.2, seed=1)
    c = train_val_split(1000, 0.2, seed=2)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_train_val_split_covers_every_class_with_two_positives():
    rng = np.random.default_rng(0)
    n, c = 500, 30
    labels = np.zeros((n, c), dtype=np.uint8)
    labels[np.arange(n), rng.integers(0, 5, n)] = 1  # five common classes
    for cls in range(5, c - 1):
        labels[rng.choice(n, size=2, replace=False), cls] = 1  # rare: exactly two images each
    labels[rng.integers(n), c - 1] = 1  # a class with one image stays in train
    for seed in range(5):
        train, val = train_val_split(n, 0.1, seed=seed, labels=labels)
        assert len(val) == 50
        assert (labels[val][:, : c - 1].sum(axis=0) >= 1).all()
        assert labels[train][:, c - 1].sum() == 1
    # Without labels a 10% split misses most two-image classes.
    _, val = train_val_split(n, 0.1, seed=0)
    assert (labels[val][:, 5 : c - 1].sum(axis=0) == 0).any()


def test_train_val_split_quota_smaller_than_classes():
    labels = np.repeat(np.eye(20, dtype=np.uint8), 3, axis=0)  # 60 images, 20 classes, 3 images each
    _, val = train_val_split(60, 0.1, seed=0, labels=labels)
    assert len(val) == 6 and labels[val].sum(axis=0).max() == 1  # six distinct classes, one image each


@pytest.mark.parametrize(
    "args,match",
    [
        ((1, 0.5, 0), "need at least 2 images"),
        ((10, 0.0, 0), r"val_fraction must be in \(0, 1\)"),
        ((10, 1.0, 0), r"val_fraction must be in \(0, 1\)"),
    ],
)
def test_train_val_split_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        train_val_split(*args)
    with pytest.raises(ValueError, match="labels has 3 rows but n is 10"):
        train_val_split(10, 0.2, 0, labels=np.zeros((3, 2)))


# --- Cole et al.'s single-positive draw and split ---------------------------------------------------------------
# The reference below restates Cole's preproc/generate_observed_labels.py step by step in its own terms (labels as
# -1/+1 floats, one RandomState per split, per image: find, shuffle and cut the positives, then the negatives), and
# restates numpy's legacy shuffle itself (Fisher-Yates from the last position down, each position drawing raw
# 32-bit words masked to the next power of two minus one, rejecting values above the position), so the test
# depends on neither the implementation nor RandomState.shuffle.


def _raw_word(rng: np.random.RandomState) -> int:
    """One raw 32-bit output of the Mersenne Twister (a full-range uint32 draw returns it unmasked)."""
    return int(rng.randint(0, 2**32, dtype=np.uint32))


def _legacy_shuffle(values: list[int], rng: np.random.RandomState) -> list[int]:
    values = list(values)
    for i in range(len(values) - 1, 0, -1):
        mask = (1 << i.bit_length()) - 1
        j = _raw_word(rng) & mask
        while j > i:
            j = _raw_word(rng) & mask
        values[i], values[j] = values[j], values[i]
    return values


def _cole_reference(labels: np.ndarray, seed: int, shuffle_negatives: bool = True) -> np.ndarray:
    signed = np.where(np.asarray(labels) == 1, 1.0, -1.0)
    rng = np.random.RandomState(seed)
    observed = np.zeros(signed.shape)
    for i in range(signed.shape[0]):
        positives = _legacy_shuffle([c for c in range(signed.shape[1]) if signed[i, c] == 1.0], rng)
        for c in positives[:1]:
            observed[i, c] = 1.0
        if shuffle_negatives:
            _legacy_shuffle([c for c in range(signed.shape[1]) if signed[i, c] == -1.0], rng)
    return observed


def _cole_test_matrix() -> np.ndarray:
    labels = _random_labels(300, 23, 0.2, seed=3)  # every 7th row has no positive
    labels[5] = 1  # all positive
    labels[6] = 0
    labels[6, 22] = 1  # one positive
    labels[8, :17] = 1  # 17 positives: a shuffle range past 16 draws with a wider mask
    return labels


def test_legacy_shuffle_restatement_is_numpys():
    for seed in (0, 1200, 2**32 - 1):
        ours, numpys = np.random.RandomState(seed), np.random.RandomState(seed)
        for n in (0, 1, 2, 3, 17, 80, 257):
            expected = np.arange(n)
            numpys.shuffle(expected)
            assert _legacy_shuffle(list(range(n)), ours) == expected.tolist()
        assert ours.randint(2**31) == numpys.randint(2**31)  # both streams consumed alike


@pytest.mark.parametrize("seed", [COLE_SEED, 0, 7])
def test_cole_single_positive_equals_the_restated_generator_bit_for_bit(seed):
    labels = _cole_test_matrix()
    observed = cole_single_positive(labels, seed=seed)
    assert observed.dtype == np.uint8 and observed.shape == labels.shape
    np.testing.assert_array_equal(observed, _cole_reference(labels, seed))
    has_positive = labels.sum(axis=1) > 0
    assert (observed <= labels).all()
    np.testing.assert_array_equal(observed.sum(axis=1), has_positive.astype(int))
    for dtype in (bool, np.float64, np.int64):
        np.testing.assert_array_equal(cole_single_positive(labels.astype(dtype), seed=seed), observed)


def test_cole_single_positive_default_seed_is_1200_and_seeds_differ():
    labels = _cole_test_matrix()
    np.testing.assert_array_equal(cole_single_positive(labels), cole_single_positive(labels, seed=1200))
    assert not np.array_equal(cole_single_positive(labels, seed=1200), cole_single_positive(labels, seed=1201))


def test_cole_single_positive_hand_checked_cases():
    # Rows with one positive keep it and rows without keep nothing, whatever the seed.
    labels = np.array([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    for seed in (0, 1, 1200):
        np.testing.assert_array_equal(cole_single_positive(labels, seed=seed), labels)
    # Row 0 = [1, 1, 0, 0]: shuffling its positives [0, 1] swaps them iff the first raw word is even (position 1
    # draws word & 1 and swaps with that index). Its negatives [2, 3] then use the second word, and row 1 = [1, 1,
    # 0, 0] the third: it keeps column 1 iff the third word is even.
    words = np.random.RandomState(1200).randint(0, 2**32, size=3, dtype=np.uint32)
    observed = cole_single_positive(np.array([[1, 1, 0, 0], [1, 1, 0, 0]]), seed=1200)
    assert observed[0].tolist() == ([0, 1, 0, 0] if words[0] % 2 == 0 else [1, 0, 0, 0])
    assert observed[1].tolist() == ([0, 1, 0, 0] if words[2] % 2 == 0 else [1, 0, 0, 0])


def test_cole_single_positive_negative_shuffle_consumes_random_state():
    # Row 0 keeps its only positive either way, but with three negatives instead of one its negatives' shuffle
    # consumes at least two words instead of none, which moves the word that decides row 1's positive.
    one_negative = np.array([[1, 0], [1, 1]])
    three_negatives = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
    kept = [
        (
            cole_single_positive(one_negative, seed=s)[1].tolist(),
            cole_single_positive(three_negatives, seed=s)[1, :2].tolist(),
        )
        for s in range(16)
    ]
    assert any(a != b for a, b in kept)
    # On the test matrix, a generator that skips the negatives' shuffle draws different positives.
    labels = _cole_test_matrix()
    assert not np.array_equal(cole_single_positive(labels), _cole_reference(labels, COLE_SEED, shuffle_negatives=False))


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.zeros((3, 4)), "must hold both 0 and 1"),
        (np.ones((3, 4)), "must hold both 0 and 1"),
        (np.full((2, 2), 2), r"labels\[0, 0\] = 2"),
        (np.zeros(4), "2-D"),
    ],
)
def test_cole_single_positive_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        cole_single_positive(labels)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "1200"])
def test_cole_protocol_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        cole_single_positive(np.eye(3), seed=seed)
    with pytest.raises(ValueError, match="seed must be an integer"):
        cole_split(10, seed=seed)


def _cole_split_reference(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    n_val = int(np.round(frac * n))
    order = np.random.RandomState(seed).permutation(n).tolist()
    return sorted(order[: n - n_val]), sorted(order[len(order) - n_val :])


@pytest.mark.parametrize(("n", "frac", "seed"), [(5717, 0.2, 1200), (100, 0.2, 1200), (37, 0.3, 5), (2, 0.5, 0)])
def test_cole_split_equals_the_restated_split(n, frac, seed):
    train, val = cole_split(n, frac, seed)
    ref_train, ref_val = _cole_split_reference(n, frac, seed)
    assert train.tolist() == ref_train and val.tolist() == ref_val
    assert train.dtype == np.int64 and val.dtype == np.int64
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


@pytest.mark.parametrize(
    ("n", "frac", "n_val"),
    [
        (5717, 0.2, 1143),  # VOC2012 train: Cole et al.'s 4,574 training and 1,143 validation images
        (82081, 0.2, 16416),  # COCO-2014 train: their 65,665 and 16,416
        (12, 0.2, 2),  # 2.4 rounds down
        (13, 0.2, 3),  # 2.6 rounds up
        (5, 0.5, 2),  # 2.5: numpy rounds halves to even
        (7, 0.5, 4),  # 3.5 -> 4
    ],
)
def test_cole_split_sizes_by_hand(n, frac, n_val):
    train, val = cole_split(n, frac)
    assert (len(train), len(val)) == (n - n_val, n_val)


def test_cole_split_defaults_and_the_validation_set_is_the_permutations_tail():
    train, val = cole_split(10)
    perm = np.random.RandomState(1200).permutation(10)
    assert val.tolist() == sorted(perm[8:].tolist()) and train.tolist() == sorted(perm[:8].tolist())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1,), "n must be an integer >= 2"),
        ((10.0,), "n must be an integer >= 2"),
        ((10, 0.0), r"val_fraction must be in \(0, 1\)"),
        ((10, 1.0), r"val_fraction must be in \(0, 1\)"),
        ((10, 0.01), "rounds to 0 validation images"),
        ((3, 0.9), "rounds to 3 validation images"),
    ],
)
def test_cole_split_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        cole_split(*args)
