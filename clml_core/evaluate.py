"""Scoring a model on a dataset, and the command line that scores finished runs from their folders alone.

    python -m clml_core.evaluate RUN_DIR [RUN_DIR ...] --dataset voc --root ROOT
        [--split test|val|train | --dataset-split NAME] [--checkpoint best|last] [--threads N] [--out FILE]

A run's checkpoint carries what rebuilds its model (``model_spec``: architecture, weights source, class names,
head sizes, preprocessing, image size); its ``config.yaml`` gives how its splits were made. What is scored:

* ``--split test|val|train`` (the default: ``test``): the run's own split, made as the run made it but from
  ``--dataset``/``--root``: its test split is the dataset's test split, or the carved one when the run carved its
  test split with ``data.test_fraction``, and only the files it comes from are read; validation and train are
  carved from the training split as the run carved them and scored with their full labels (this reads the test
  split's files too, unless the run carved its test split);
* ``--dataset-split NAME``: the dataset's own split NAME, whole, whatever the run carved (VOC ``test``, COCO
  ``val2014``, VOC ``trainval``); only that split's files are read.

Each run gets a results json: ``--out FILE`` with one run, else ``eval_<dataset>_<split>.json`` in its folder
(``eval_<dataset>_dataset-<NAME>.json`` for a dataset split). Several runs also give one table, a row per run (run,
checkpoint, mAP, mAP over the well-populated classes and their number, classes scored, images, its json), as
``TABLE.csv`` and ``TABLE.md`` (``--out TABLE``; default ``eval_<dataset>_<split>`` in the current folder).

Frozen-backbone runs (``train_mode`` frozen, the backbone rebuilt from its ``weights``) with the same architecture,
weights, preprocessing and image size that score the same images share one pass of the backbone over them, in
float32 and channels-last as the run's feature store computed it (:mod:`clml_core.features`); each run's head and
classifier (:meth:`~clml_core.models.MultiLabelNet.forward_head`) then read the features. Every other run is scored
whole, one at a time.

The results json holds mAP over the classes with a positive, mAP over the well-populated classes (at least
``FREQUENT_MIN_POSITIVES`` positives), the AP of every class, the number of positives per class and
CP/CR/CF1/OP/OR/OF1 at score 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from clml_core import runfolder
from clml_core.config import DataConfig, ModelConfig, TrainConfig, apply_updates, choices, to_dict, validate_config
from clml_core.data.dataset import MultiLabelDataset, shutdown_workers
from clml_core.data.splits import build_splits, run_test_split, whole_split
from clml_core.devices import autocast, select_device, to_input
from clml_core.loaders import eval_loader
from clml_core.metrics import (
    average_precision_per_class,
    cole_mean_average_precision,
    mean_average_precision,
    threshold_metrics,
)
from clml_core.models import MultiLabelNet, Preprocessing, build_model
from clml_core.runio import atomic_write_json

#: A class is "well populated" in a scored split with at least this many positives (VOC2007 sample: car, cat,
#: person, train and bus in a 30% test carve).
FREQUENT_MIN_POSITIVES = 20

#: The run's own splits (``--split``); any split of the dataset is scored whole with ``--dataset-split``.
RUN_SPLITS = ("test", "val", "train")


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    amp: str = "off",
    channels_last: bool = False,
    embeddings: bool = False,
) -> dict[str, np.ndarray]:
    """Sigmoid scores (N, C), observed labels (N, C) and optionally embeddings (N, E) of a dataset, in row order.

    Outputs stay on the device until the end (one host read, not one per batch). ``loader`` is an
    :func:`~clml_core.loaders.eval_loader` of the dataset. ``model`` is a :class:`MultiLabelNet` fed images
    (normalised with its preprocessing here) or a :class:`~clml_core.models.FeatureHead` fed cached features;
    ``amp`` and ``channels_last`` are the run's (config fields optim.amp, model.channels_last).
    """
    model.eval()
    preprocessing = getattr(model, "preprocessing", None)
    scores, targets, embeds = [], [], []
    for images, observed, _ in loader:
        images = to_input(images, device, preprocessing, channels_last)
        with autocast(device, amp):
            out = model(images)
        scores.append(torch.sigmoid(out.logits.float()))
        targets.append(observed)
        if embeddings:
            embeds.append(out.embeddings.float())
    result = {"scores": torch.cat(scores).cpu().numpy(), "observed": torch.cat(targets).numpy()}
    if embeddings:
        result["embeddings"] = torch.cat(embeds).cpu().numpy()
    return result


def score(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Every number a results json reports about one scored split.

    Args:
        labels: (N, C) full 0/1 labels.
        scores: (N, C) scores.
        classes: the C class names.

    Returns:
        ``map`` (classes with a positive), ``map_cole`` (every class, AP 0 without a positive: Cole et al.'s),
        ``map_frequent`` (classes with >= FREQUENT_MIN_POSITIVES positives; NaN if none), ``frequent_classes``,
        ``n_classes_scored``, ``threshold_metrics`` (CP, CR, CF1, OP, OR, OF1 at 0.5), ``ap_per_class`` (NaN
        without a positive), ``positives_per_class`` and ``n_images``.
    """
    per_class = average_precision_per_class(labels, scores)
    positives = np.asarray(labels).sum(axis=0).astype(int)
    frequent = positives >= FREQUENT_MIN_POSITIVES
    return {
        "map": mean_average_precision(labels, scores),
        "map_cole": cole_mean_average_precision(labels, scores),
        "map_frequent": float(per_class[frequent].mean()) if frequent.any() else float("nan"),
        "frequent_classes": [name for name, keep in zip(classes, frequent) if keep],
        "n_classes_scored": int((positives > 0).sum()),
        "threshold_metrics": threshold_metrics(labels, scores, 0.5),
        "ap_per_class": dict(zip(classes, per_class.tolist())),
        "positives_per_class": dict(zip(classes, positives.tolist())),
        "n_images": int(len(labels)),
    }


def model_spec(
    model: MultiLabelNet, spec: ModelConfig, classes: Sequence[str], image_size: int, *, trunk_cache: bool = False
) -> dict[str, Any]:
    """What rebuilds a run's model, as plain values (a checkpoint entry, loadable with ``weights_only=True``).

    ``backbone_in_checkpoint`` is False for the frozen-features mode with given weights: the checkpoint then holds
    the head and the classifier only, and the backbone comes from ``weights`` again (a random backbone, weights
    None, cannot be rebuilt that way and stays in the checkpoint). In the partial mode the checkpoint holds the
    whole network, the frozen stages (the first ``len(stages) - trainable_stages``) as ``weights`` gave them;
    ``trunk_cache`` says whether the run trained from their stored output (``clml_core.build.uses_trunk_cache``).
    Images through the rebuilt model compute what the run computed either way.
    """
    return {
        "arch": spec.arch,
        "weights": spec.weights,
        "num_classes": len(classes),
        "classes": list(classes),
        "proj_dim": spec.proj_dim,
        "proj_hidden_dim": spec.proj_hidden_dim,
        "classify_embeddings": spec.classify_embeddings,
        "head": spec.head,
        "widths": None if spec.widths is None else list(spec.widths),
        "num_features": model.num_features,
        "embed_dim": model.embed_dim,
        "preprocessing": model.preprocessing.as_dict(),
        "image_size": int(image_size),
        "train_mode": spec.train_mode,
        "trainable_stages": spec.trainable_stages,
        "trunk_cache": trunk_cache,
        "backbone_in_checkpoint": spec.train_mode != "frozen" or spec.weights is None,
    }


@torch.no_grad()
def backbone_features(
    model: MultiLabelNet, loader: torch.utils.data.DataLoader, device: torch.device, *, channels_last: bool = True
) -> Tensor:
    """Pooled backbone features (N, F) of a dataset in row order, in float32, left on the device.

    ``loader`` is an :func:`~clml_core.loaders.eval_loader` of the dataset; images are normalised with the model's
    preprocessing. Without autocast and channels-last by default, as a feature store computes view 0
    (:func:`clml_core.features.build_store`), so a frozen run's head reads what it read in training.
    """
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    chunks = [
        model.forward_features(to_input(images, device, model.preprocessing, channels_last)) for images, *_ in loader
    ]
    return torch.cat(chunks).float()


@torch.no_grad()
def head_scores(
    model: MultiLabelNet, features: Tensor, device: torch.device, *, amp: str = "off", batch_size: int = 1024
) -> np.ndarray:
    """Sigmoid scores (N, C) of a model's projection head and classifier
    (:meth:`~clml_core.models.MultiLabelNet.forward_head`) on pooled features (N, F), under autocast ``amp``."""
    eval_mode(model)
    logits = []
    for chunk in features.split(batch_size):
        with autocast(device, amp):
            logits.append(model.forward_head(chunk.to(device)).logits.float())
    return torch.sigmoid(torch.cat(logits)).cpu().numpy()


# -------------------------------------------------------------------------------------------- checkpoints


def read_checkpoint(checkpoint: str | Path, device: torch.device | str = "cpu", *, mmap: bool = False) -> dict:
    """A checkpoint written by the engine, with its ``model_spec`` (``mmap``: tensors memory-mapped, not read, for a
    cheap look at the spec).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no ``model_spec`` (written by an older version).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    if not isinstance(state, dict) or "model_spec" not in state:
        raise ValueError(f"{path}: no 'model_spec' entry; this checkpoint cannot rebuild its model")
    return state


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[MultiLabelNet, dict[str, Any]]:
    """Rebuild a run's model from a checkpoint written by the engine (``best.pt`` or ``last.pt``).

    Returns:
        The model in eval mode and its ``model_spec``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file has no ``model_spec`` (written by an older version) or its weights do not fit.
    """
    state = read_checkpoint(checkpoint, device)
    spec = state["model_spec"]
    model = build_model(
        spec["arch"],
        spec["num_classes"],
        weights=None if spec["backbone_in_checkpoint"] else spec["weights"],
        proj_dim=spec["proj_dim"],
        proj_hidden_dim=spec["proj_hidden_dim"],
        widths=spec["widths"],
        classify_embeddings=spec["classify_embeddings"],
        classifier_head=spec.get("head", "linear"),  # checkpoints from before model.head have the linear one
    )
    if model.preprocessing != Preprocessing.from_dict(spec["preprocessing"]):
        raise ValueError(
            f"{checkpoint}: the preprocessing of {spec['arch']} changed since this run ({spec['preprocessing']})"
        )
    load_weights(model, state["model"], spec, str(checkpoint))
    return model.to(device).eval(), spec


def load_head(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[MultiLabelNet, dict[str, Any]]:
    """The projection head and classifier of a frozen-backbone run, without its backbone: a :class:`MultiLabelNet`
    whose backbone is the identity, for :meth:`~clml_core.models.MultiLabelNet.forward_head` on pooled features.

    Returns:
        The model in eval mode and its ``model_spec``.

    Raises:
        ValueError: the checkpoint holds its backbone (not a frozen run on given weights; use :func:`load_model`),
            or its weights do not fit.
    """
    state = read_checkpoint(checkpoint, device)
    spec = state["model_spec"]
    if spec["backbone_in_checkpoint"]:
        raise ValueError(f"{checkpoint}: the checkpoint holds its own backbone; load_model rebuilds the whole model")
    head = MultiLabelNet(
        nn.Identity(),
        spec["num_features"],
        spec["num_classes"],
        proj_dim=spec["proj_dim"],
        proj_hidden_dim=spec["proj_hidden_dim"],
        preprocessing=Preprocessing.from_dict(spec["preprocessing"]),
        classify_embeddings=spec["classify_embeddings"],
    )
    load_weights(head, state["model"], spec, str(checkpoint))
    return eval_mode(head.to(device)), spec


def eval_mode(model: MultiLabelNet) -> MultiLabelNet:
    """``model.eval()`` for a :class:`MultiLabelNet` whose backbone may be the identity (:func:`load_head`), which
    ``MultiLabelNet.train`` cannot ask for its stages; with every module in eval mode, no stage is left to keep."""
    return nn.Module.train(model, False)


def load_weights(model: MultiLabelNet, weights: dict[str, torch.Tensor], spec: dict[str, Any], where: str) -> None:
    """Load a checkpoint's model weights; without the backbone (frozen mode) only backbone keys may be missing."""
    result = model.load_state_dict(weights, strict=spec["backbone_in_checkpoint"])
    if not spec["backbone_in_checkpoint"]:
        missing = [key for key in result.missing_keys if not key.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{where}: weights do not fit (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )


# -------------------------------------------------------------------------------------------- runs to score


class RunToScore(NamedTuple):
    """A run folder ready to score: its configuration with the scoring fields, its checkpoint and ``model_spec``."""

    folder: Path
    config: TrainConfig
    checkpoint: Path
    spec: dict[str, Any]

    @property
    def shares_backbone(self) -> bool:
        """A frozen run whose backbone comes from its ``weights`` (not from its checkpoint): its features can be
        computed once for every run on the same backbone."""
        return self.spec["train_mode"] == "frozen" and not self.spec["backbone_in_checkpoint"]


def checked_split(split: str | None, dataset_split: str | None) -> str | None:
    """The run split to score (``split``, default ``test``), or None when ``dataset_split`` names the dataset's split.

    Raises:
        ValueError: both are given, or ``split`` is not one of :data:`RUN_SPLITS`.
    """
    if split is not None and dataset_split is not None:
        raise ValueError(
            f"give --split (the run's own split: {', '.join(RUN_SPLITS)}) or --dataset-split (a split of the "
            f"dataset, whole), not both (got --split {split} and --dataset-split {dataset_split})"
        )
    if dataset_split is not None:
        if not dataset_split:
            raise ValueError("--dataset-split: empty split name")
        return None
    split = split or "test"
    if split not in RUN_SPLITS:
        raise ValueError(
            f"--split {split!r} is not one of the run's own splits ({', '.join(RUN_SPLITS)}); to score the "
            f"dataset's split {split!r} whole, use --dataset-split {split}"
        )
    return split


def prepare_run(
    run_dir: str | Path, dataset: str, root: str, split: str | None, *, checkpoint: str = "best", device: str = "auto"
) -> RunToScore:
    """Read a run folder for scoring, before any image is read.

    Args:
        run_dir: the run folder (``config.yaml``, ``checkpoints/``).
        dataset, root: the dataset to score on (config fields data.dataset, data.root).
        split: the run's split (:data:`RUN_SPLITS`), or None for a dataset split.
        checkpoint: ``best`` or ``last``.
        device: config field device.

    Raises:
        FileNotFoundError: no ``config.yaml`` or no such checkpoint, naming the file.
        ValueError: the configuration or the checkpoint is unusable, naming the file and field.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / runfolder.CONFIG
    # The run's own configuration, validated once the scoring fields are in (its name plays no part here).
    config = apply_updates(TrainConfig(), runfolder.read_config_dict(run_dir), source=str(config_path))
    path = runfolder.checkpoint_file(run_dir, checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"run {run_dir}: checkpoint not found: {path} (has the run finished? --checkpoint last scores the newest "
            "training checkpoint)"
        )
    spec = read_checkpoint(path, mmap=True)["model_spec"]
    data = {"dataset": dataset, "root": root, "limit_train": 0, "packed_cache": False, "decode": "workers"}
    data["image_size"] = spec["image_size"]
    if split in ("train", "val"):
        data["val_labels"] = "full"
    config = apply_updates(config, {"name": "evaluate", "data": data, "progress": False, "device": device})
    validate_config(config, str(config_path))
    return RunToScore(run_dir, config, path, spec)


def scored_split(run: RunToScore, split: str | None, dataset_split: str | None) -> MultiLabelDataset:
    """The images and full labels to score ``run`` on: its own ``split``, or the dataset's ``dataset_split`` whole."""
    data, preprocessing = run.config.data, Preprocessing.from_dict(run.spec["preprocessing"])
    if dataset_split is not None:
        return whole_split(data, preprocessing, dataset_split)
    if split == "test":
        return run_test_split(data, preprocessing)
    return getattr(build_splits(data, preprocessing, progress=False), split)


def split_key(run: RunToScore, split: str | None, dataset_split: str | None) -> str:
    """What the scored images of ``run`` depend on: runs with the same key score the same images, the same way."""
    data = to_dict(run.config)["data"]
    if dataset_split is not None:
        data = {name: data[name] for name in ("dataset", "root", "image_size")}
    elif split == "test":
        fields = ("dataset", "root", "image_size", "train_split", "test_split", "test_fraction", "split_seed")
        data = {name: data[name] for name in fields}
    return json.dumps([split, dataset_split, data, run.spec["preprocessing"]], sort_keys=True)


def backbone_key(run: RunToScore, images: str) -> str | None:
    """Runs with the same key share one pass of their backbone over the same ``images`` (a :func:`split_key`); None
    for a run scored whole."""
    if not run.shares_backbone:
        return None
    spec = run.spec
    return json.dumps([spec["arch"], spec["weights"], spec["preprocessing"], spec["image_size"], images])


# ---------------------------------------------------------------------------------------------- scoring


def full_scores(run: RunToScore, dataset: MultiLabelDataset, device: torch.device) -> np.ndarray:
    """Scores (N, C) of one run's whole model on images, with the run's autocast and layout."""
    model, _ = load_model(run.checkpoint, device)
    loader = eval_loader(dataset, run.config.optim.batch_size, run.config.data.workers, device)
    try:
        amp, channels_last = run.config.optim.amp, run.config.model.channels_last
        return predict(model, loader, device, amp=amp, channels_last=channels_last)["scores"]
    finally:
        shutdown_workers(loader)


def shared_scores(runs: Sequence[RunToScore], dataset: MultiLabelDataset, device: torch.device) -> list[np.ndarray]:
    """Scores (N, C) of frozen runs that share a backbone: the first run's backbone runs once over the images, then
    every run's head reads the features (:func:`backbone_features`, :func:`head_scores`)."""
    first = runs[0]
    model, _ = load_model(first.checkpoint, device)
    loader = eval_loader(dataset, first.config.optim.batch_size, first.config.data.workers, device)
    try:
        features = backbone_features(model, loader, device)  # (N, F)
    finally:
        shutdown_workers(loader)
    del model
    return [
        head_scores(load_head(run.checkpoint, device)[0], features, device, amp=run.config.optim.amp) for run in runs
    ]


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    dataset: str,
    root: str,
    split: str | None = None,
    *,
    dataset_split: str | None = None,
    checkpoint: str = "best",
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Score the checkpoints of several runs on a split (see the module docstring), sharing a frozen backbone's
    features among the runs that can; every run and checkpoint is checked before any image is read.

    Returns:
        One results dict per run, in the order given.

    Raises:
        ValueError: both ``split`` and ``dataset_split``, a run given twice, runs trained on different classes, or
            a dataset whose classes are not the runs'.
        FileNotFoundError: a run without its configuration or checkpoint, or a missing dataset file.
    """
    split = checked_split(split, dataset_split)
    runs = [prepare_run(d, dataset, root, split, checkpoint=checkpoint, device=device) for d in run_dirs]
    check_runs(runs)
    keys = [split_key(run, split, dataset_split) for run in runs]
    datasets: dict[str, MultiLabelDataset] = {}
    for run, key in zip(runs, keys):
        if key not in datasets:
            datasets[key] = scored_split(run, split, dataset_split)
            check_classes(run, datasets[key], dataset, root)
    scored = [datasets[key] for key in keys]
    scores = score_runs(runs, scored, keys, select_device(device))
    where = {"checkpoint": checkpoint, "dataset": dataset, "root": str(root)}
    # split_kind "run": the run's own split; "dataset": the dataset's split, whole
    split_fields = {"split": split, "split_kind": "run"} if split else {"split": dataset_split, "split_kind": "dataset"}
    return [
        {"run": str(run.folder), **where, **split_fields, **score(part.labels, run_scores, part.classes)}
        for run, part, run_scores in zip(runs, scored, scores)
    ]


def score_runs(
    runs: Sequence[RunToScore], scored: Sequence[MultiLabelDataset], keys: Sequence[str], device: torch.device
) -> list[np.ndarray]:
    """Scores (N, C) of every run on its images ``scored[i]`` (whose :func:`split_key` is ``keys[i]``): runs with
    the same :func:`backbone_key` share one pass of their backbone (:func:`shared_scores`), the others are scored
    whole (:func:`full_scores`)."""
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(backbone_key(run, keys[i]) or f"whole {i}", []).append(i)
    scores: dict[int, np.ndarray] = {}
    for members in groups.values():
        first = members[0]
        if runs[first].shares_backbone:
            scores.update(zip(members, shared_scores([runs[i] for i in members], scored[first], device)))
        else:
            scores[first] = full_scores(runs[first], scored[first], device)
    return [scores[i] for i in range(len(runs))]


def check_runs(runs: Sequence[RunToScore]) -> None:
    """Runs scored together are distinct folders trained on the same classes (a table compares them).

    Raises:
        ValueError: no run, a folder given twice, or two runs with different class sets, naming them.
    """
    if not runs:
        raise ValueError("no run folder given")
    folders = [run.folder.resolve() for run in runs]
    twice = [run.folder for run, folder in zip(runs, folders) if folders.count(folder) > 1]
    if twice:
        raise ValueError(f"run {twice[0]} is given twice")
    first = runs[0].spec["classes"]
    for run in runs[1:]:
        classes = run.spec["classes"]
        if classes != first:
            raise ValueError(
                f"runs trained on different classes cannot be scored together: {runs[0].folder} has {len(first)} "
                f"({', '.join(first[:4])}, ...) but {run.folder} has {len(classes)} ({', '.join(classes[:4])}, ...); "
                "score them in separate commands"
            )


def check_classes(run: RunToScore, scored: MultiLabelDataset, dataset: str, root: str) -> None:
    """Raises ValueError when the scored split's classes are not the ones ``run`` was trained on."""
    if list(scored.classes) != list(run.spec["classes"]):
        raise ValueError(
            f"{dataset} at {root} has classes {list(scored.classes)[:4]}... but {run.folder} was trained on "
            f"{run.spec['classes'][:4]}... ({len(run.spec['classes'])} classes)"
        )


def evaluate_run(
    run_dir: str | Path,
    dataset: str,
    root: str,
    split: str | None = None,
    *,
    dataset_split: str | None = None,
    checkpoint: str = "best",
    device: str = "auto",
) -> dict[str, Any]:
    """Score one run's checkpoint on a split (see the module docstring); returns the results dict."""
    return evaluate_runs(
        [run_dir], dataset, root, split, dataset_split=dataset_split, checkpoint=checkpoint, device=device
    )[0]


# ---------------------------------------------------------------------------------------------- outputs


def split_label(split: str | None, dataset_split: str | None) -> str:
    """The split's part of the output names: ``test`` for the run's test split, ``dataset-test`` for the dataset's."""
    split = checked_split(split, dataset_split)
    return f"dataset-{dataset_split}" if split is None else split


def results_table(results: Sequence[dict[str, Any]], json_files: Sequence[Path]) -> pd.DataFrame:
    """One row per scored run: run, checkpoint, map, map_frequent, frequent_classes (their number),
    classes_scored, images and json (its results file)."""
    return pd.DataFrame(
        {
            "run": [r["run"] for r in results],
            "checkpoint": [r["checkpoint"] for r in results],
            "map": [r["map"] for r in results],
            "map_frequent": [r["map_frequent"] for r in results],
            "frequent_classes": [len(r["frequent_classes"]) for r in results],
            "classes_scored": [r["n_classes_scored"] for r in results],
            "images": [r["n_images"] for r in results],
            "json": [str(path) for path in json_files],
        }
    )


def write_table(table: pd.DataFrame, stem: str | Path) -> list[Path]:
    """``stem.csv`` (the numbers) and ``stem.md`` (mAP to 2 decimals) of a :func:`results_table`; returns both paths."""
    from clml_core.tables import markdown_table  # here: tables imports scipy, which training need not load

    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".csv", ".md") else stem
    csv, md = stem.parent / f"{stem.name}.csv", stem.parent / f"{stem.name}.md"
    csv.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False)
    shown = table.rename(
        columns={"map": "mAP", "map_frequent": "mAP (well-populated)", "frequent_classes": "well-populated classes"}
    )
    shown = shown.assign(**{name: shown[name].map("{:.2f}".format) for name in ("mAP", "mAP (well-populated)")})
    md.write_text(markdown_table(shown.rename(columns=lambda name: name.replace("_", " "))))
    return [csv, md]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clml_core.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders (config.yaml, checkpoints/)"
    )
    parser.add_argument(
        "--dataset", required=True, choices=[d for d in choices(DataConfig, "dataset") if d != "synthetic"]
    )
    parser.add_argument("--root", required=True, help="the dataset root")
    parser.add_argument(
        "--split", default=None, metavar="{test,val,train}", help="the run's own split: test (default), val or train"
    )
    parser.add_argument(
        "--dataset-split",
        default=None,
        metavar="NAME",
        help="a split of the dataset, scored whole (e.g. test, val2014)",
    )
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; on a busy machine fewer can be faster)",
    )
    parser.add_argument("--device", default="auto", choices=choices(TrainConfig, "device"))
    parser.add_argument(
        "--out", default=None, metavar="FILE", help="one run: its results json; several: the table FILE(.csv, .md)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    label = split_label(args.split, args.dataset_split)  # rejects both, before anything is read
    if args.threads < 0:
        raise ValueError(f"--threads: expected 0 (torch's default) or a positive number, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = evaluate_runs(
        args.run_dirs, args.dataset, args.root, args.split,
        dataset_split=args.dataset_split, checkpoint=args.checkpoint, device=args.device,
    )  # fmt: skip
    single = len(results) == 1
    files = [
        Path(args.out) if single and args.out else runfolder.eval_file(r["run"], args.dataset, label) for r in results
    ]
    for result, out in zip(results, files):
        atomic_write_json(out, result)
        print(
            f"{result['run']}: {args.dataset} {label}: mAP {result['map']:.2f} over {result['n_classes_scored']} "
            f"classes, {result['map_frequent']:.2f} over {len(result['frequent_classes'])} well-populated ones "
            f"({result['n_images']} images) -> {out}"
        )
    if not single:
        stem = args.out or runfolder.eval_file(".", args.dataset, label).with_suffix("")
        written = write_table(results_table(results, files), stem)
        print(f"{len(results)} runs -> {', '.join(map(str, written))}")
    print(f"scored in {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
