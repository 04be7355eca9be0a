"""Scoring run folders with ``clml_core.evaluate``: the dataset's own split (``--dataset-split``) read from its files
alone, several runs in one table, and a frozen backbone computed once for the runs that share it.

The data is a tiny VOC2007 layout of generated JPEGs with a trainval and a test split; one frozen-features run is
trained on it (its test split carved from trainval), and other runs are made from it by giving its checkpoint
other head weights, another class list or its whole model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clml_core import runfolder
from clml_core.config import resolve_config
from clml_core.data.splits import build_splits
from clml_core.data.transforms import eval_transform
from clml_core.data.voc import VOC_CLASSES, load_voc
from clml_core.engine import train
from clml_core.evaluate import evaluate_run, evaluate_runs, load_model, main, predict, read_checkpoint, score
from clml_core.loaders import eval_loader
from clml_core.models import MultiLabelNet, preprocessing_for

N_TRAINVAL, N_TEST, IMAGE_SIZE = 48, 20, 32


def _write_split(base: Path, split: str, first_id: int, n: int, rng: np.random.Generator) -> None:
    """``n`` JPEGs with ids from ``first_id`` and the 20 class files of ``split``: car or cat alternately (a colour
    signal), every fifth image with a second, random label."""
    from PIL import Image

    car, cat = VOC_CLASSES.index("car"), VOC_CLASSES.index("cat")
    labels = np.zeros((n, len(VOC_CLASSES)), dtype=int)
    ids = [f"{first_id + i:06d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        labels[i, car if i % 2 else cat] = 1
        if i % 5 == 0:
            labels[i, rng.integers(len(VOC_CLASSES))] = 1
        colour = (200, 40, 40) if labels[i, car] else (40, 40, 200)
        pixels = (rng.integers(0, 60, size=(28, 36, 3)) + np.array(colour) // 2).astype(np.uint8)
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg")
    for k, name in enumerate(VOC_CLASSES):
        lines = [f"{image_id} {1 if labels[i, k] else -1}" for i, image_id in enumerate(ids)]
        (base / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    """VOCdevkit/VOC2007 with N_TRAINVAL trainval and N_TEST test images (disjoint ids)."""
    root = tmp_path_factory.mktemp("voc")
    base = root / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_split(base, "trainval", 0, N_TRAINVAL, rng)
    _write_split(base, "test", N_TRAINVAL, N_TEST, rng)
    return root


@pytest.fixture(scope="module")
def frozen_run(voc_root: Path, tmp_path_factory) -> Path:
    """A frozen-features run on a backbone with weights from a file, its test split carved from trainval."""
    import timm

    out = tmp_path_factory.mktemp("runs")
    torch.manual_seed(7)
    weights = out / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), weights)
    model = {"arch": "efficientnet_lite0", "weights": str(weights), "widths": None, "proj_dim": 16}
    data = {"dataset": "voc", "root": str(voc_root), "test_fraction": 0.25, "image_size": IMAGE_SIZE}
    overrides = {
        "progress": False,
        "threads": 1,
        "data": {**data, "cache_dir": str(out / "cache"), "protocol": "single_positive"},
        "model": {**model, "train_mode": "frozen"},
        "optim": {"epochs": 1, "batch_size": 8, "lr": 1e-2},
    }
    train(resolve_config("smoke", overrides=overrides), out / "run")
    return out / "run"


def _derived_run(
    source: Path, folder: Path, *, seed: int | None = None, classes: list[str] | None = None, whole: bool = False
) -> Path:
    """A copy of run ``source`` whose best checkpoint has other head weights (perturbed under ``seed``), another
    class list, or the whole model with its backbone (a run that is scored whole)."""
    shutil.copytree(source, folder)
    path = runfolder.checkpoint_file(folder, "best")
    state = read_checkpoint(path)
    spec = dict(state["model_spec"])
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        state["model"] = {
            key: value + 0.5 * torch.randn(value.shape, generator=generator)
            if key.endswith(("weight", "bias"))
            else value
            for key, value in state["model"].items()
        }
    if classes is not None:
        spec["classes"] = classes
    if whole:
        state["model"] = load_model(path)[0].state_dict()
        spec.update(train_mode="end_to_end", backbone_in_checkpoint=True)
    path.unlink()  # best.pt may be a link to best-epoch{e}.pt
    torch.save({**state, "model_spec": spec}, path)
    return folder


@pytest.fixture(scope="module")
def runs(frozen_run: Path, tmp_path_factory) -> list[Path]:
    """The trained run, a run with other head weights on the same backbone, and a run scored whole."""
    out = tmp_path_factory.mktemp("derived")
    return [
        frozen_run,
        _derived_run(frozen_run, out / "other_head", seed=1),
        _derived_run(frozen_run, out / "whole", whole=True),
    ]


def _reference(run: Path, root: Path) -> dict:
    """The scores of a run's whole network on the official test images, image by image, with no sharing."""
    model, _ = load_model(runfolder.checkpoint_file(run, "best"))
    test = load_voc(root, "2007", "test")
    resize = eval_transform(IMAGE_SIZE, to_float=False, interpolation=model.preprocessing.interpolation)
    scores = predict(model, eval_loader(test.with_transform(resize), 8, 0), torch.device("cpu"))["scores"]
    return score(test.labels, scores, VOC_CLASSES)


def test_the_dataset_split_is_scored_whole_and_the_run_split_stays_the_runs(frozen_run: Path, voc_root: Path) -> None:
    official = evaluate_run(frozen_run, "voc", str(voc_root), dataset_split="test", device="cpu")
    assert official["n_images"] == N_TEST and (official["split"], official["split_kind"]) == ("test", "dataset")
    expected = _reference(frozen_run, voc_root)
    assert official["map"] == pytest.approx(expected["map"], abs=1e-4)
    assert official["ap_per_class"] == pytest.approx(expected["ap_per_class"], abs=1e-4, nan_ok=True)
    # --split test is the run's own (carved) test split: what the run scored itself on.
    carved = evaluate_run(frozen_run, "voc", str(voc_root), "test", device="cpu")
    assert carved["n_images"] == round(0.25 * N_TRAINVAL) and carved["split_kind"] == "run"
    assert carved["map"] == pytest.approx(runfolder.read_results(frozen_run)["test_map"], abs=1e-3)
    config = runfolder.read_config(frozen_run)
    splits = build_splits(config.data, preprocessing_for(config.model.arch), progress=False)
    assert evaluate_run(frozen_run, "voc", str(voc_root), "val", device="cpu")["n_images"] == len(splits.val)


def test_scoring_a_split_reads_only_that_splits_files(frozen_run: Path, voc_root: Path, tmp_path: Path) -> None:
    root = shutil.copytree(voc_root, tmp_path / "voc")
    for path in load_voc(root, "2007", "trainval").image_paths:
        path.unlink()
    for path in (root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main").glob("*_trainval.txt"):
        path.unlink()
    alone = evaluate_run(frozen_run, "voc", str(root), dataset_split="test", device="cpu")
    complete = evaluate_run(frozen_run, "voc", str(voc_root), dataset_split="test", device="cpu")
    assert alone["n_images"] == N_TEST and alone["map"] == complete["map"]
    assert alone["ap_per_class"] == pytest.approx(complete["ap_per_class"], nan_ok=True)
    # A run that did not carve its test split scores it (--split test) from the test split's files alone too ...
    uncarved = shutil.copytree(frozen_run, tmp_path / "uncarved")
    config = runfolder.read_config(uncarved)
    runfolder.write_config(
        uncarved, dataclasses.replace(config, data=dataclasses.replace(config.data, test_fraction=0.0))
    )
    assert evaluate_run(uncarved, "voc", str(root), "test", device="cpu")["map"] == pytest.approx(alone["map"])
    # ... while a carved test split comes from the trainval files.
    with pytest.raises(FileNotFoundError, match="trainval"):
        evaluate_run(frozen_run, "voc", str(root), "test", device="cpu")


def test_several_runs_give_one_table_with_a_row_each(runs: list[Path], voc_root: Path, tmp_path: Path) -> None:
    command = [*map(str, runs), "--dataset", "voc", "--root", str(voc_root), "--dataset-split", "test"]
    results = main([*command, "--device", "cpu", "--out", str(tmp_path / "table.csv")])
    table = pd.read_csv(tmp_path / "table.csv")
    columns = ["run", "checkpoint", "map", "map_frequent", "frequent_classes", "classes_scored", "images", "json"]
    assert list(table.columns) == columns and list(table["run"]) == list(map(str, runs))
    assert (table["images"] == N_TEST).all() and (table["checkpoint"] == "best").all()
    for row, run, result in zip(table.itertuples(), runs, results):
        assert Path(row.json) == runfolder.eval_file(run, "voc", "dataset-test")
        saved = json.loads(Path(row.json).read_text())
        assert saved["run"] == str(run) and saved["map"] == pytest.approx(result["map"])
        assert row.map == pytest.approx(result["map"]) and row.classes_scored == result["n_classes_scored"]
    markdown = (tmp_path / "table.md").read_text().splitlines()
    assert len(markdown) == 2 + len(runs) and f"| {table['map'][1]:.2f} |" in markdown[3]


def test_runs_on_one_frozen_backbone_compute_it_once_and_score_as_alone(
    runs: list[Path], voc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = MultiLabelNet.forward_features

    def counted(self: MultiLabelNet, images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return original(self, images)

    monkeypatch.setattr(MultiLabelNet, "forward_features", counted)
    together = evaluate_runs(runs, "voc", str(voc_root), dataset_split="test", device="cpu")
    assert calls == [N_TEST, N_TEST]  # one pass for the two frozen runs, one for the run scored whole
    calls.clear()
    alone = [evaluate_run(run, "voc", str(voc_root), dataset_split="test", device="cpu") for run in runs]
    assert calls == [N_TEST] * 3
    for shared, single, run in zip(together, alone, runs):
        assert shared["run"] == str(run)
        assert shared["ap_per_class"] == pytest.approx(single["ap_per_class"], abs=1e-6, nan_ok=True)
        expected = _reference(run, voc_root)  # the whole network on images, the run by itself
        assert shared["ap_per_class"] == pytest.approx(expected["ap_per_class"], abs=1e-4, nan_ok=True)
    assert together[0]["ap_per_class"] != together[1]["ap_per_class"]  # each run is scored with its own head


def test_runs_with_other_classes_are_refused(frozen_run: Path, voc_root: Path, tmp_path: Path) -> None:
    renamed = _derived_run(frozen_run, tmp_path / "renamed", classes=[*VOC_CLASSES[:-1], "monitor"])
    with pytest.raises(ValueError, match="different classes.*renamed"):
        evaluate_runs([frozen_run, renamed], "voc", str(voc_root), dataset_split="test", device="cpu")
    with pytest.raises(ValueError, match="renamed was trained on"):
        evaluate_run(renamed, "voc", str(voc_root), dataset_split="test", device="cpu")


def test_a_missing_checkpoint_is_named_before_any_image_is_read(frozen_run: Path, tmp_path: Path) -> None:
    unfinished = shutil.copytree(frozen_run, tmp_path / "unfinished")
    runfolder.checkpoint_file(unfinished, "best").unlink()
    with pytest.raises(FileNotFoundError, match=r"unfinished: checkpoint not found: .*best\.pt"):
        evaluate_runs([frozen_run, unfinished], "voc", str(tmp_path / "no_dataset"), dataset_split="test")
    with pytest.raises(ValueError, match="given twice"):
        evaluate_runs([frozen_run, frozen_run], "voc", str(tmp_path / "no_dataset"), dataset_split="test")


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (["--split", "test", "--dataset-split", "test"], "--split .* or --dataset-split .*not both"),
        (["--split", "val2014"], "not one of the run's own splits.*use --dataset-split val2014"),
        (["--threads", "-1"], "--threads: expected 0"),
    ],
)
def test_the_split_arguments_are_checked_first(arguments: list[str], match: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        main([str(tmp_path / "no_run"), "--dataset", "voc", "--root", str(tmp_path), *arguments])
