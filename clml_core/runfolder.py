"""The layout of a run folder, and its readers and writers: everyone reads and writes a run through this module.

A run folder holds (every file written atomically, see :mod:`clml_core.runio`)::

    config.yaml            the resolved configuration (clml_core.config.TrainConfig as a nested mapping)
    run_info.json          provenance: time, command line, host, git sha, versions, device, data checksums, and
                           one record per resumption under "resumes"
    metrics.csv            one row per epoch: lr, train_loss/base/clml/local/global, corr_precision/recall/
                           recovered, val_map (and val_map_ema), seconds
    results.json           the finished run (:class:`Results`); its presence means the run is done
    test_embeddings.npz    embeddings, scores, labels, classes of the test split under the selected weights
    train_scores.npz       scores, observed, labels, classes of the training images under the last epoch's model
    spec.json              the study's labels of the run (group, variant, seed and the grid's columns)
    checkpoints/           last.pt, previous.pt, best.pt, best-epoch{e}.pt (see :mod:`clml_core.checkpoints`)
    tensorboard/           event files, with config field tensorboard=true
    train.lock             the owner's lock while a process trains (see :mod:`clml_core.runlock`)
    eval_<dataset>_<split>.json   scores written by ``python -m clml_core.evaluate`` (the run's own split, or
                           ``dataset-<NAME>`` for a split of the dataset scored whole)
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd
import yaml

from clml_core import checkpoints
from clml_core.config import DataConfig, TrainConfig, config_diff, from_dict, to_dict
from clml_core.correction import CorrectionQuality
from clml_core.data.dataset import MultiLabelDataset
from clml_core.data.protocols import labels_checksum
from clml_core.runio import atomic_write_bytes, atomic_write_json, atomic_write_text, run_info, write_metrics_csv

CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
METRICS = "metrics.csv"
RESULTS = "results.json"
TEST_OUTPUTS = "test_embeddings.npz"
TRAIN_SCORES = "train_scores.npz"
SPEC = "spec.json"
TENSORBOARD = "tensorboard"
CHECKPOINTS = checkpoints.FOLDER


class Results(TypedDict):
    """The content of ``results.json``: test scores of the selected weights, the selection and the run's cost."""

    test_map: float  # mAP (%) over the test classes with a positive
    test_map_cole: float  # mAP (%) over every class, AP 0 for a class without a test positive (Cole et al.'s)
    test_map_frequent: float  # mAP (%) over the well-populated test classes (clml_core.evaluate.FREQUENT_MIN_POSITIVES)
    test_frequent_classes: list[str]
    test_classes_scored: int
    best_val_map: float  # the validation mAP that selected the weights
    best_epoch: int  # 0-based
    best_variant: str  # "model" or "ema"
    test_threshold_metrics: dict[str, float]  # CP, CR, CF1, OP, OR, OF1 at score 0.5
    test_ap_per_class: dict[str, float]  # NaN (null) for a class without a test positive
    test_positives_per_class: dict[str, int]
    final_corr_precision: float  # label correction in the last epoch (NaN when it never ran)
    final_corr_recall: float
    run_corr_precision: float  # label correction over the whole run: its counts summed over the epochs
    run_corr_recall: float
    selected_corr_precision: float  # label correction in the selected epoch (best_epoch)
    selected_corr_recall: float
    train_seconds: float
    epochs: int


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (a part of) a run."""
    return any((Path(folder) / name).exists() for name in (CONFIG, RUN_INFO, RESULTS, CHECKPOINTS))


def remove_partial_writes(folder: Path) -> None:
    """Temporary files of writes cut short by a kill (a live writer would hold the lock, so these are dead)."""
    for part in (Path(folder), Path(folder) / CHECKPOINTS):
        if part.is_dir():
            for path in part.glob(".*.tmp"):
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- configuration


def write_config(folder: Path, config: TrainConfig) -> None:
    atomic_write_text(Path(folder) / CONFIG, yaml.safe_dump(to_dict(config), sort_keys=False))


def read_config(folder: str | Path) -> TrainConfig | None:
    """The configuration a run folder was trained with (its ``config.yaml``); None when there is none.

    Raises:
        ValueError: the file is not valid YAML or not a valid configuration (naming the file and field).
    """
    path = Path(folder) / CONFIG
    if not path.exists():
        return None
    return from_dict(_read_yaml_mapping(path), source=str(path))


def read_config_dict(folder: str | Path) -> dict[str, Any]:
    """``config.yaml`` as the nested mapping it holds, unvalidated (for tables and for overriding before use).

    Raises:
        FileNotFoundError: there is no ``config.yaml``.
    """
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; is {folder} a run folder?")
    return _read_yaml_mapping(path)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------- provenance


def config_to_train(out: Path, config: TrainConfig | None, resume: bool) -> TrainConfig:
    """The configuration to train ``out`` with; refuses what would mix two runs in one folder (writes nothing)."""
    if not holds_run(out):
        if config is None:
            raise ValueError(f"{out} holds no run to resume (no config.yaml); give a configuration (--preset ...)")
        return config
    if not resume:
        raise FileExistsError(f"{out} already holds a run; pass resume=True (--resume) or choose another folder")
    saved = read_config(out)
    if saved is None:
        raise ValueError(f"{out} holds run files but no config.yaml, so it cannot be resumed; choose another folder")
    if config is not None and to_dict(config) != to_dict(saved):
        diff = "; ".join(config_diff(to_dict(saved), to_dict(config)))
        raise ValueError(
            f"{out / CONFIG} holds another configuration than the one given ({diff}); a resumed run keeps "
            "its folder's configuration: resume without overrides, or train into another folder"
        )
    return saved


def record_start(folder: Path, config: TrainConfig, data: dict[str, Any], where: dict[str, Any]) -> None:
    """Record that a run starts or resumes in ``folder``: ``config.yaml`` once, and ``run_info.json`` for a new
    run (provenance and ``data``, see :func:`data_record`) or a resumption record (``where`` it continued)."""
    folder = Path(folder)
    if not (folder / CONFIG).exists():
        write_config(folder, config)
    if (folder / RUN_INFO).exists():
        append_resume(folder, where)
    else:
        write_run_info(folder, data)


def write_run_info(folder: Path, extra: dict[str, Any]) -> None:
    """``run_info.json`` of a new run: :func:`clml_core.runio.run_info` with ``extra`` (data checksums, sizes)."""
    atomic_write_json(Path(folder) / RUN_INFO, run_info(extra))


def data_record(
    data: DataConfig, train: MultiLabelDataset, val: MultiLabelDataset, test: MultiLabelDataset
) -> dict[str, Any]:
    """What ``run_info.json`` records of a new run's data: the dataset, its classes, sizes and label checksums."""
    return {
        "dataset": data.dataset,
        "data_root": data.root,
        "classes": train.classes,
        "train_labels_checksum": labels_checksum(train.labels),
        "test_labels_checksum": labels_checksum(test.labels),
        "observed_train_checksum": labels_checksum(train.observed),
        "observed_val_checksum": labels_checksum(val.observed),
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
    }


def append_resume(folder: Path, where: dict[str, Any]) -> None:
    """Add a resumption record (time, command line, host, git sha, and ``where`` it continued) to ``run_info.json``."""
    path = Path(folder) / RUN_INFO
    info = json.loads(path.read_text())
    now = run_info()
    record = {"utc": now["started_utc"], "argv": now["argv"], "host": now["host"], "git_sha": now["git_sha"]}
    info.setdefault("resumes", []).append({**record, **where})
    atomic_write_json(path, info)


def read_run_info(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / RUN_INFO).read_text())


# ---------------------------------------------------------------------------------------- metrics, results


def write_metrics(folder: Path, rows: list[dict[str, Any]]) -> None:
    write_metrics_csv(Path(folder) / METRICS, rows)


def read_metrics(folder: str | Path) -> pd.DataFrame:
    """``metrics.csv``: one row per epoch (``epoch`` 0-based)."""
    return pd.read_csv(Path(folder) / METRICS)


def _correction_over(rows: list[dict[str, Any]], name: str) -> dict[str, float]:
    """``{name}_corr_precision`` and ``{name}_corr_recall`` of the correction counts summed over ``rows``."""
    quality = CorrectionQuality(
        sum(row["corr_missing"] for row in rows),
        sum(row["corr_recovered"] for row in rows),
        sum(row["corr_true_recovered"] for row in rows),
    )
    return {f"{name}_corr_precision": quality.precision, f"{name}_corr_recall": quality.recall}


def results_record(scored: dict[str, Any], best: dict[str, Any], rows: list[dict[str, Any]]) -> Results:
    """``results.json`` of a finished run from its test scores (:func:`clml_core.evaluate.score`), the selection
    and the metrics rows."""
    return {
        "test_map": scored["map"],
        "test_map_cole": scored["map_cole"],
        "test_map_frequent": scored["map_frequent"],
        "test_frequent_classes": scored["frequent_classes"],
        "test_classes_scored": scored["n_classes_scored"],
        "best_val_map": best["val_map"],
        "best_epoch": best["epoch"],
        "best_variant": best["variant"],
        "test_threshold_metrics": scored["threshold_metrics"],
        "test_ap_per_class": scored["ap_per_class"],
        "test_positives_per_class": scored["positives_per_class"],
        "final_corr_precision": rows[-1]["corr_precision"] if rows else math.nan,
        "final_corr_recall": rows[-1]["corr_recall"] if rows else math.nan,
        **_correction_over(rows, "run"),
        **_correction_over([row for row in rows if row["epoch"] == best["epoch"]], "selected"),
        "train_seconds": sum(row["seconds"] for row in rows),
        "epochs": len(rows),
    }


def write_results(folder: Path, results: Results) -> None:
    atomic_write_json(Path(folder) / RESULTS, results)


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / RESULTS).exists()


def read_results(folder: str | Path) -> Results:
    return json.loads((Path(folder) / RESULTS).read_text())


def write_spec(folder: Path, spec: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / SPEC, spec)


def read_spec(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / SPEC).read_text())


def spec_folders(root: str | Path) -> list[Path]:
    """Every run folder under ``root`` that the study labelled (holds ``spec.json``), sorted."""
    return sorted(path.parent for path in Path(root).rglob(SPEC))


# ---------------------------------------------------------------------------------------------- npz arrays


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def write_test_outputs(
    folder: Path, embeddings: np.ndarray, scores: np.ndarray, labels: np.ndarray, classes: list[str]
) -> None:
    """The test split under the selected weights: embeddings (N, E), scores (N, C), full labels (N, C), classes."""
    path = Path(folder) / TEST_OUTPUTS
    _write_npz(path, embeddings=embeddings, scores=scores, labels=labels, classes=np.array(classes))


def read_test_outputs(folder: str | Path) -> dict[str, np.ndarray]:
    """The arrays of :func:`write_test_outputs` (``classes`` as a str array).

    Raises:
        FileNotFoundError: the run saved none (config field save_embeddings=false), naming the file.
    """
    path = Path(folder) / TEST_OUTPUTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run saved no test outputs (save_embeddings=false?)")
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def write_train_scores(
    folder: Path, scores: np.ndarray, observed: np.ndarray, labels: np.ndarray, classes: list[str]
) -> None:
    """The last epoch's model on its own training images: scores, observed and full labels (N, C), classes."""
    path = Path(folder) / TRAIN_SCORES
    _write_npz(path, scores=scores, observed=observed, labels=labels, classes=np.array(classes))


def read_train_scores(folder: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(folder) / TRAIN_SCORES) as saved:
        return {name: saved[name] for name in saved.files}


# ------------------------------------------------------------------------------------------ other paths


def checkpoint_file(folder: str | Path, name: str) -> Path:
    """``checkpoints/{name}.pt``: ``best`` (the selected weights) or ``last`` (the newest training checkpoint)."""
    return Path(folder) / CHECKPOINTS / f"{name}.pt"


def summary_writer(folder: Path, purge_step: int) -> Any:
    """A TensorBoard writer into ``tensorboard/`` that drops events logged after ``purge_step`` by an interrupted
    earlier attempt."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch imports tensorboard lazily here
        raise ImportError(
            "config field 'tensorboard' is true but the tensorboard package is not installed; "
            "pip install -e '.[tensorboard]' (or pip install tensorboard)"
        ) from error
    return SummaryWriter(str(Path(folder) / TENSORBOARD), purge_step=purge_step)


def eval_file(folder: str | Path, dataset: str, split: str) -> Path:
    """Where ``python -m clml_core.evaluate`` writes its scores by default."""
    return Path(folder) / f"eval_{dataset}_{split}.json"
