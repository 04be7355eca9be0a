"""The paper profile on real data: every notebook through papermill on small real-layout fixtures written here
(COCO instance json + JPEGs, VOC ImageSets, a NUS-WIDE split file), with the model shrunk by parameters. The runs
must have trained on that data (their recorded dataset, class names and label checksums), not on the embedded
benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from clml_core.config import resolve_config
from clml_core.data import NUS_WIDE_CONCEPTS, VOC_CLASSES, labels_checksum
from clml_core.experiments import with_dataset
from clml_core.study import run_study

#: Sparse category ids, as in the official COCO files (the columns are sorted by id).
COCO_CATEGORIES = {1: "person", 3: "car", 5: "airplane", 18: "dog", 44: "bottle", 62: "chair", 72: "tv", 90: "brush"}

#: The shrunk model of every test run: the paper preset otherwise (hill, CLML, EMA, RandAugment + Cutout, cache).
SHRINK = {
    "model": {"arch": "resnet18", "weights": None},
    "optim": {"epochs": 1, "stop_epoch": 0, "batch_size": 8, "amp": "off"},
}


def _jpeg(path: Path, rng: np.random.Generator) -> None:
    height, width = rng.integers(40, 80, size=2)  # real photos come in many sizes
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path, quality=85)


def _labels(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    """(n, c) labels, 1-3 per image, every class on at least two images."""
    labels = np.zeros((n, c), dtype=np.uint8)
    for row in range(n):
        labels[row, rng.choice(c, size=rng.integers(1, 4), replace=False)] = 1
    for col in range(c):
        labels[[2 * col % n, (2 * col + 1) % n], col] = 1
    return labels


def write_coco(root: Path, split: str, n: int, seed: int, absent: int | None = None) -> np.ndarray:
    """``root/annotations/instances_{split}.json`` and ``root/{split}/*.jpg``; returns the (N, C) labels of the
    annotated images. One extra image has no annotation (dropped on loading, as in the official files); category
    column ``absent`` has no instance in this split (as in small real samples such as coco128)."""
    rng = np.random.default_rng(seed)
    ids = sorted(COCO_CATEGORIES)
    labels = _labels(rng, n, len(ids))
    if absent is not None:
        labels[:, absent] = 0
        labels[labels.sum(axis=1) == 0, (absent + 1) % len(ids)] = 1
    images, annotations = [], []
    for row in range(n + 1):
        name = f"{row:012d}.jpg"
        _jpeg(root / split / name, rng)
        images.append({"id": 1000 + row, "file_name": name, "height": 60, "width": 60})
        if row == n:
            continue  # the unannotated image
        for col in np.flatnonzero(labels[row]):
            for _ in range(rng.integers(1, 3)):  # one or two instances of a present category
                box = [float(v) for v in rng.integers(0, 30, size=4) + 1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": 1000 + row,
                        "category_id": ids[col],
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
    categories = [{"id": cid, "name": COCO_CATEGORIES[cid], "supercategory": "x"} for cid in ids[::-1]]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    document = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return labels


def write_voc(root: Path, split: str, n: int, seed: int) -> np.ndarray:
    """``root/VOCdevkit/VOC2007/ImageSets/Main/{class}_{split}.txt`` (1 / -1, and 0 for difficult, read as
    negative) and ``JPEGImages/{id}.jpg``; returns the (N, 20) labels."""
    rng = np.random.default_rng(seed)
    base = root / "VOCdevkit" / "VOC2007"
    labels = _labels(rng, n, len(VOC_CLASSES))
    ids = [f"{seed:02d}{row:04d}" for row in range(n)]
    for image_id in ids:
        _jpeg(base / "JPEGImages" / f"{image_id}.jpg", rng)
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    for col, name in enumerate(VOC_CLASSES):
        marks = np.where(labels[:, col] == 1, "1", np.where(rng.random(n) < 0.05, "0", "-1"))
        (main / f"{name}_{split}.txt").write_text("".join(f"{i} {m}\n" for i, m in zip(ids, marks)))
    return labels


def write_nuswide(root: Path, split_file: str, n: int, seed: int) -> np.ndarray:
    """``root/images/*.jpg`` and the SPLC/CLML split file ``root/{split_file}``; returns the (N, 81) labels."""
    rng = np.random.default_rng(seed)
    labels = _labels(rng, n, len(NUS_WIDE_CONCEPTS))
    lines = []
    for row in range(n):
        name = f"{seed:02d}{row:04d}_{rng.integers(10**8)}_abc_m.jpg"
        _jpeg(root / "images" / name, rng)
        lines.append(f"{name}," + " ".join(str(k) for k in np.flatnonzero(labels[row])) + "\n")
    (root / split_file).write_text("".join(lines))
    return labels


def _runs(run_root: Path) -> list[Path]:
    return sorted(path.parent for path in run_root.rglob("run_info.json"))


def _check_runs(run_root: Path, dataset: str, root: Path, classes: list[str], test_labels: np.ndarray) -> int:
    """Every run under ``run_root`` trained on ``dataset`` at ``root`` with these classes and test labels."""
    folders = _runs(run_root)
    for folder in folders:
        info = json.loads((folder / "run_info.json").read_text())
        assert info["dataset"] == dataset and info["data_root"] == str(root), folder
        assert info["classes"] == classes, folder
        assert info["test_labels_checksum"] == labels_checksum(test_labels), folder
        assert info["n_test"] == len(test_labels)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert (config["data"]["dataset"], config["model"]["arch"], config["data"]["image_size"]) == (
            dataset,
            "resnet18",
            64,
        )
        results = json.loads((folder / "results.json").read_text())
        assert set(results["test_ap_per_class"]) == set(classes)
    return len(folders)


@pytest.mark.slow
def test_paper_study_trains_every_notebook_on_the_coco_it_is_given(tmp_path):
    root = tmp_path / "coco"
    train_labels = write_coco(root, "train2017", 40, seed=1)
    test_labels = write_coco(root, "val2017", 24, seed=2, absent=7)  # no test positive: AP undefined
    classes = [COCO_CATEGORIES[cid] for cid in sorted(COCO_CATEGORIES)]
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    data = {"image_size": 64, "workers": 0, "cache_dir": str(tmp_path / "cache")}
    data |= {"train_split": "train2017", "test_split": "val2017"}
    extra = {
        "DATA_ROOT": str(root),  # DATASET is the paper profile's: coco
        "OVERRIDES": {**SHRINK, "data": data},
        "LOSSES": ["hill"],
        "PROTOCOLS": ["40% left"],
        "LAMS": [0.3],
        "TAUS": [0.7],
        "N_SAMPLES": 6,
        "SEEDS": [0],  # one seed per cell keeps the run count below small (the profile's are 3)
        "SWEEP_SEEDS": [0],
    }
    run_study("paper", run_root=runs, figures_dir=figures, extra=extra, progress=False)

    # showcase, main, ablation, sensitivity, full-label reference
    assert _check_runs(runs, "coco", root, classes, test_labels) == 1 + 2 + 10 + 2 + 1
    for folder in _runs(runs):
        info = json.loads((folder / "run_info.json").read_text())
        assert info["n_train"] + info["n_val"] == len(train_labels)  # the unannotated image was dropped
    statistics = json.loads((runs / "data" / "label_statistics.json").read_text())
    assert statistics["classes"] == classes
    assert statistics["statistics"]["full labels"]["n_images"] + 4 == len(train_labels)  # 10% carved for validation
    assert statistics["statistics"]["test (full labels)"]["n_images"] == len(test_labels)
    assert (figures / "main_table.md").is_file() and (figures / "embeddings.png").is_file()
    per_class = pd.read_csv(figures / "per_class_table.csv")  # "brush" has no test positive, so no AP and no row
    assert sorted(per_class["class"]) == sorted(classes[:7])
    # The packed JPEG cache holds each source split once, whatever the protocol: two stores, not one per carve.
    stores = sorted(p.name for p in (tmp_path / "cache").rglob("*.jpegs"))
    assert stores == ["train2017-64px-q90.jpegs", "val2017-64px-q90.jpegs"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["voc", "nuswide"])
def test_paper_profile_trains_on_the_dataset_named_by_parameter(tmp_path, dataset):
    root = tmp_path / dataset
    if dataset == "voc":
        write_voc(root, "trainval", 40, seed=3)
        test_labels = write_voc(root, "test", 16, seed=4)
        classes, splits = list(VOC_CLASSES), {}
    else:
        write_nuswide(root, "nus_train.txt", 40, seed=5)
        test_labels = write_nuswide(root, "nus_test.txt", 16, seed=6)
        classes, splits = list(NUS_WIDE_CONCEPTS), {"train_split": "nus_train.txt", "test_split": "nus_test.txt"}
    data = {"image_size": 64, "workers": 0, "cache_dir": str(tmp_path / "cache"), **splits}
    extra = {"DATASET": dataset, "DATA_ROOT": str(root), "OVERRIDES": {**SHRINK, "data": data}}
    run_study("paper", only=["01_train"], run_root=tmp_path / "runs", extra=extra, progress=False)
    assert _check_runs(tmp_path / "runs", dataset, root, classes, test_labels) == 1


def test_paper_profile_without_a_data_root_stops_before_any_notebook(tmp_path):
    with pytest.raises(ValueError, match=r"DATASET='coco'.*-p DATA_ROOT"):
        run_study("paper", run_root=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs" / "notebooks" / "00_data.ipynb").exists()


def test_a_data_root_with_the_synthetic_benchmark_is_an_error_naming_both(tmp_path):
    with pytest.raises(ValueError, match=r"DATASET='synthetic'.*'data\.dataset' and 'data\.root' contradict"):
        run_study("default", run_root=tmp_path / "runs", extra={"DATA_ROOT": str(tmp_path)}, progress=False)
    with pytest.raises(ValueError, match=r"DATASET='voc'.*OVERRIDES data\.dataset='coco' contradict"):
        with_dataset("paper", {"data": {"dataset": "coco"}}, "voc", "/data/voc")


@pytest.mark.parametrize(
    "data,second",
    [
        ({"dataset": "synthetic", "root": "/data/coco"}, "data.root"),
        ({"dataset": "synthetic", "train_split": "train2014"}, "data.train_split"),
        ({"dataset": "synthetic", "test_split": "val2014"}, "data.test_split"),
        ({"dataset": "coco", "root": "/x", "observed_file": "obs.txt"}, "data.observed_file"),
    ],
)
def test_contradicting_config_fields_are_errors_naming_both(data, second):
    first = "data.protocol" if second == "data.observed_file" else "data.dataset"
    with pytest.raises(ValueError, match=rf"'{first}' and '{second}' contradict"):
        resolve_config("default", overrides={"data": data})


def test_the_paper_preset_resolves_to_the_named_dataset():
    for dataset in ("coco", "voc", "nuswide"):
        config = resolve_config("paper", overrides=with_dataset("paper", {}, dataset, f"/data/{dataset}"))
        assert (config.data.dataset, config.data.root) == (dataset, f"/data/{dataset}")


def test_a_jpeg_cache_decoded_on_the_device_trains_exactly_as_decoded_in_the_workers(tmp_path):
    from clml_core.engine import train

    root = tmp_path / "coco"
    write_coco(root, "train2017", 40, seed=1)
    write_coco(root, "val2017", 16, seed=2)
    results = {}
    for decode in ("workers", "device"):
        data = {"dataset": "coco", "root": str(root), "train_split": "train2017", "test_split": "val2017"}
        data |= {"image_size": 24, "packed_cache": True, "cache_format": "jpeg", "decode": decode}
        data |= {"cache_dir": str(tmp_path / "cache"), "workers": 1 if decode == "workers" else 0}
        overrides = {"progress": False, "threads": 1, "data": data, "optim": {"epochs": 2, "batch_size": 8}}
        out = tmp_path / decode
        results[decode] = train(resolve_config("smoke", overrides=overrides), out)
        results[decode]["metrics"] = pd.read_csv(out / "metrics.csv").drop(columns=["seconds"])
    pd.testing.assert_frame_equal(results["workers"].pop("metrics"), results["device"].pop("metrics"))
    assert results["workers"]["test_map"] == results["device"]["test_map"]
    assert len(list((tmp_path / "cache").rglob("*.jpegs"))) == 2  # built once, used by both runs


def test_decoding_on_the_device_needs_a_jpeg_cache():
    with pytest.raises(ValueError, match="'data.decode' and 'data.packed_cache'/'data.cache_format' contradict"):
        resolve_config("paper", overrides={"data": {"root": "/x", "cache_format": "raw"}})


def test_per_class_table_leaves_out_a_class_without_test_positives():
    from clml_core.tables import per_class_table

    runs = pd.DataFrame(
        [
            {"class": name, "clml": clml, "seed": 0, "ap": ap}
            for name, aps in (("a", (50.0, 55.0)), ("b", (float("nan"), float("nan"))))
            for clml, ap in zip((False, True), aps)
        ]
    )
    table = per_class_table(runs, {"a": 0.5, "b": 0.1}, test_images=False)  # no run folders: seeds only
    assert table["class"].tolist() == ["a"] and table.loc[0, "diff"] == 5.0
