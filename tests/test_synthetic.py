"""Tests for the generated benchmark: determinism, label model, drawing geometry, storage and statistics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from clml_core.data import synthetic
from clml_core.data.synthetic import (
    CLASS_NAMES,
    SyntheticConfig,
    class_template,
    generate_split,
    label_statistics,
    load_synthetic,
    make_synthetic,
    scene_class_probabilities,
)

TINY = SyntheticConfig(
    image_size=16,
    n_train=24,
    n_val=6,
    n_test=8,
    num_classes=6,
    num_scenes=3,
    classes_per_scene=2,
    max_objects=3,
    mean_labels=1.5,
)


# ----------------------------------------------------------------------------------------------- config


def test_config_rejects_bad_fields_by_name():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticConfig(num_classes=len(CLASS_NAMES) + 1)
    with pytest.raises(ValueError, match="object_scale"):
        SyntheticConfig(object_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="n_val"):
        SyntheticConfig(n_val=0)
    with pytest.raises(ValueError, match="mean_labels"):
        SyntheticConfig(num_classes=2, mean_labels=3.0, classes_per_scene=1, max_objects=2)


def test_config_json_round_trip_and_key():
    assert SyntheticConfig.from_json(json.loads(json.dumps(TINY.to_json()))) == TINY
    assert TINY.key() == dataclasses.replace(TINY).key()
    assert TINY.key() != dataclasses.replace(TINY, seed=1).key()
    with pytest.raises(ValueError, match="unknown"):
        SyntheticConfig.from_json({**TINY.to_json(), "colour": 1})


# ----------------------------------------------------------------------------------------------- labels


def test_scene_probabilities_are_calibrated_to_zipf_targets():
    config = SyntheticConfig()
    probs = scene_class_probabilities(config)
    assert probs.shape == (config.num_scenes, config.num_classes)
    weights = np.array([(k + 1.0) ** -config.zipf_exponent for k in range(config.num_classes)])
    target = config.mean_labels * weights / weights.sum()
    np.testing.assert_allclose(probs.mean(axis=0), target, rtol=1e-9, atol=1e-12)
    # The scene moves every class's probability substantially (0.23 for the rarest class).
    assert (probs.max(axis=0) - probs.min(axis=0) > 0.2).all()


def test_labels_respect_cardinality_bounds_and_scene_structure():
    config = dataclasses.replace(TINY, n_train=400)
    _, labels, scenes = generate_split(config, "train", progress=False)
    counts = labels.sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= config.max_objects
    assert ((scenes[:, 0] >= 0) & (scenes[:, 0] < config.num_scenes)).all()
    assert ((scenes[:, 1] >= -1) & (scenes[:, 1] < config.num_scenes)).all()
    # Labels depend on the scene: per-scene class frequencies differ far more than sampling noise allows.
    single = scenes[:, 1] == -1
    per_scene = np.stack([labels[single & (scenes[:, 0] == s)].mean(axis=0) for s in range(config.num_scenes)])
    assert (per_scene.max(axis=0) - per_scene.min(axis=0)).max() > 0.5


def test_generation_is_deterministic_and_prefix_stable():
    images, labels, scenes = generate_split(TINY, "train", progress=False)
    again = generate_split(TINY, "train", progress=False)
    for a, b in zip((images, labels, scenes), again):
        np.testing.assert_array_equal(a, b)
    shorter = generate_split(dataclasses.replace(TINY, n_train=10), "train", progress=False)
    np.testing.assert_array_equal(shorter[0], images[:10])
    np.testing.assert_array_equal(shorter[1], labels[:10])
    other = generate_split(dataclasses.replace(TINY, seed=1), "train", progress=False)
    assert not np.array_equal(other[0], images)
    test_images = generate_split(TINY, "test", progress=False)[0]
    assert not np.array_equal(test_images, images[: TINY.n_test])
    assert images.dtype == np.uint8 and images.shape == (TINY.n_train, 16, 16, 3)


# ----------------------------------------------------------------------------------------------- drawing


def test_class_templates_are_distinct_masks():
    masks = np.stack([class_template(name) for name in CLASS_NAMES])
    assert masks.min() >= 0 and masks.max() <= 1
    assert (masks.reshape(len(CLASS_NAMES), -1).mean(axis=1) > 0.1).all()  # every glyph has ink
    diff = np.abs(masks[:, None] - masks[None]).mean(axis=(2, 3))
    np.fill_diagonal(diff, 1.0)
    assert diff.min() > 0.03
    with pytest.raises(ValueError, match="unknown class glyph"):
        class_template("unicorn")


def test_paste_places_scales_and_rotates_the_glyph():
    disk = class_template("disk")
    image = np.zeros((64, 64, 3), np.float32)
    white = np.ones(3, np.float32)
    synthetic._paste(image, disk, (30.0, 34.0), 40.0, 0.0, white, "solid", 10.0, 0.5)
    alpha = image[..., 0]
    # The disk glyph has radius 0.85 in template units, i.e. 0.85 * 20 = 17 px here.
    assert alpha.sum() == pytest.approx(np.pi * 17.0**2, rel=0.03)
    ys, xs = np.mgrid[:64, :64] + 0.5
    assert (alpha * xs).sum() / alpha.sum() == pytest.approx(30.0, abs=0.2)
    assert (alpha * ys).sum() / alpha.sum() == pytest.approx(34.0, abs=0.2)
    np.testing.assert_allclose(image[..., 0], image[..., 2])  # a white glyph stays grey-level

    bar = class_template("bar")
    flat, upright = np.zeros((48, 48, 3), np.float32), np.zeros((48, 48, 3), np.float32)
    synthetic._paste(flat, bar, (24.0, 24.0), 30.0, 0.0, white, "solid", 10.0, 0.5)
    synthetic._paste(upright, bar, (24.0, 24.0), 30.0, np.pi / 2, white, "solid", 10.0, 0.5)
    # Rotating by +90 degrees maps frame (u, v) to pixel offsets (-v, u): upright[y, x] = flat[47 - x, y].
    np.testing.assert_allclose(upright[..., 0], flat[..., 0].T[:, ::-1], atol=1e-4)
    assert flat[..., 0].sum(axis=1).max() > 3 * flat[..., 0].sum(axis=0).max()  # wide, not tall


def test_texture_darkens_part_of_the_glyph():
    square = class_template("square")
    white = np.ones(3, np.float32)
    solid, striped = np.zeros((40, 40, 3), np.float32), np.zeros((40, 40, 3), np.float32)
    synthetic._paste(solid, square, (20.0, 20.0), 32.0, 0.0, white, "solid", 10.0, 0.6)
    synthetic._paste(striped, square, (20.0, 20.0), 32.0, 0.0, white, "stripes", 10.0, 0.6)
    inside = solid[..., 0] > 0.99
    assert inside.sum() > 200
    assert striped[..., 0][inside].min() < 0.5 < striped[..., 0][inside].max()


def test_every_positive_class_changes_the_clean_image():
    config = dataclasses.replace(
        TINY,
        image_size=32,
        clutter_rate=0.0,
        noise_std=0.0,
        background_texture=0.0,
        background_jitter=0.0,
        max_objects=1,
    )
    images, labels, scenes = generate_split(config, "train", progress=False)
    renderer = synthetic._Renderer(config)
    for image, scene in zip(images, scenes[:, 0]):
        background = (np.clip(renderer.background(int(scene), np.random.default_rng(0)), 0, 1) * 255).round()
        changed = np.abs(image.astype(np.float64) - background).max(axis=2) > 20
        assert changed.sum() > 20  # the single object covers a visible area


# ----------------------------------------------------------------------------------------------- statistics


def _statistics_reference(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    n, c = labels.shape
    freq = np.array([sum(labels[i, k] for i in range(n)) / n for k in range(c)], dtype=np.float64)
    co = np.zeros((c, c))
    for j in range(c):
        for k in range(c):
            both = sum(1 for i in range(n) if labels[i, j] and labels[i, k])
            nj, nk = freq[j] * n, freq[k] * n
            co[j, k] = both / np.sqrt(nj * nk) if nj > 0 and nk > 0 else 0.0
    counts = [int(labels[i].sum()) for i in range(n)]
    hist = [counts.count(m) for m in range(max(counts) + 1)]
    return freq, np.linalg.svd(co, compute_uv=False), hist


def test_label_statistics_match_loop_reference():
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 5)) < 0.4).astype(np.uint8)
    labels[:, 3] = labels[:, 1]  # a perfectly co-occurring pair
    stats = label_statistics(labels, top_k=5)
    freq, singular, hist = _statistics_reference(labels)
    np.testing.assert_allclose(stats["class_frequency"], freq)
    np.testing.assert_allclose(stats["cooccurrence_singular_values"], singular, atol=1e-12)
    assert stats["labels_per_image_hist"] == hist
    assert stats["labels_per_image_mean"] == pytest.approx(labels.sum() / 40)
    assert stats["imbalance_ratio"] == pytest.approx(freq.max() / freq.min())
    assert stats["cooccurrence_top_k_share"] == pytest.approx(1.0)
    assert sum(stats["cooccurrence_singular_values"]) == pytest.approx(5.0)  # trace of M


def test_label_statistics_empty_class_policy_and_errors():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]], np.uint8)
    stats = label_statistics(labels)
    assert stats["imbalance_ratio"] == float("inf")
    assert stats["class_frequency_min"] == 0.0
    assert sum(stats["cooccurrence_singular_values"]) == pytest.approx(2.0)
    assert np.isfinite(stats["cooccurrence_singular_values"]).all()
    with pytest.raises(ValueError, match="0 and 1"):
        label_statistics(np.array([[2, 0]]))
    with pytest.raises(ValueError, match="shape"):
        label_statistics(np.zeros(3))


def test_generated_labels_are_more_low_rank_than_independent_ones():
    config = dataclasses.replace(SyntheticConfig(), image_size=16, n_train=600)
    labels = generate_split(config, "train", progress=False)[1]
    rng = np.random.default_rng(0)
    independent = np.stack([rng.permutation(col) for col in labels.T], axis=1)  # same marginals
    ours, theirs = label_statistics(labels), label_statistics(independent)
    # Beyond the frequency mode (first value) scene structure concentrates the spectrum.
    assert ours["cooccurrence_top_k_share"] > theirs["cooccurrence_top_k_share"] + 0.05
    assert ours["cooccurrence_singular_values"][1] > 1.4 * theirs["cooccurrence_singular_values"][1]


# ----------------------------------------------------------------------------------------------- storage


def test_make_and_load_round_trip(tmp_path):
    folder = make_synthetic(TINY, tmp_path, progress=False)
    assert folder.parent == tmp_path
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["config"] == TINY.to_json()
    assert meta["classes"] == list(CLASS_NAMES[:6])
    assert set(meta["sha256"]) == {"images_train.npy", "images_val.npy", "images_test.npy", "labels.npz"}

    splits = load_synthetic(TINY, tmp_path, progress=False)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [24, 6, 8]
    images, labels, _ = generate_split(TINY, "val", progress=False)
    val = splits["val"]
    np.testing.assert_array_equal(val.labels, labels)
    np.testing.assert_array_equal(val.observed, labels)
    image, observed, index = val[2]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), images[2])
    assert observed.dtype == torch.float32 and index == 2


def test_existing_copy_is_reused_verified_and_forced(tmp_path, monkeypatch):
    folder = make_synthetic(TINY, tmp_path, progress=False)
    stamp = (folder / "images_train.npy").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although a valid copy exists")

    with monkeypatch.context() as patch:
        patch.setattr(synthetic, "generate_split", fail)
        assert make_synthetic(TINY, tmp_path, progress=False) == folder
    assert (folder / "images_train.npy").stat().st_mtime_ns == stamp

    labels_file = folder / "labels.npz"
    labels_file.write_bytes(labels_file.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(ValueError, match="labels.npz"):
        make_synthetic(TINY, tmp_path, progress=False)
    assert make_synthetic(TINY, tmp_path, force=True, progress=False) == folder
    load_synthetic(TINY, tmp_path, progress=False)  # verifies checksums again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_command_line_writes_dataset_and_prints_statistics(tmp_path, capsys):
    synthetic.main(["--size", "16", "--n-train", "8", "--n-val", "2", "--n-test", "2", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "labels_per_image_mean" in out
    (folder,) = tmp_path.iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["config"]["image_size"] == 16 and meta["config"]["n_train"] == 8


def test_concurrent_writer_of_the_same_config_is_tolerated(tmp_path, monkeypatch):
    real = synthetic.generate_split
    calls = []

    def generate_while_another_process_finishes(config, split, *, progress=True):
        if not calls:
            calls.append(split)
            monkeypatch.setattr(synthetic, "generate_split", real)
            make_synthetic(config, tmp_path, progress=False)  # the "other process" completes first
        return real(config, split, progress=progress)

    monkeypatch.setattr(synthetic, "generate_split", generate_while_another_process_finishes)
    folder = make_synthetic(TINY, tmp_path, progress=False)
    assert calls == ["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
    load_synthetic(TINY, tmp_path, progress=False)
