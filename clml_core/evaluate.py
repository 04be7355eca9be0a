"""Scoring a model on a dataset, and the command line that scores a finished run from its folder alone.

    python -m clml_core.evaluate RUN_DIR --dataset voc --root ROOT --split test [--checkpoint best] [--out FILE]

The run's checkpoint carries what rebuilds its model (``model_spec``: architecture, weights source, class names,
head sizes, preprocessing, image size); its ``config.yaml`` gives how its splits were made. ``--split`` names

* ``test`` / ``val`` / ``train``: the run's own split, made as the run made it but from ``--dataset``/``--root`` (the
  official test split, or the carved one when the run carved its test split with ``data.test_fraction``);
  validation and train are scored with their full labels;
* any other name: that split of the dataset, whole (e.g. ``val2017`` of COCO, ``trainval`` of VOC).

The results json holds mAP over the classes with a positive, mAP over the well-populated classes (at least
``FREQUENT_MIN_POSITIVES`` positives), the AP of every class, the number of positives per class and
CP/CR/CF1/OP/OR/OF1 at score 0.5.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clml_core import runfolder
from clml_core.config import DataConfig, ModelConfig, TrainConfig, apply_updates, choices, validate_config
from clml_core.data.dataset import MultiLabelDataset
from clml_core.devices import autocast, select_device, to_input
from clml_core.loaders import eval_loader
from clml_core.metrics import average_precision_per_class, mean_average_precision, threshold_metrics
from clml_core.models import MultiLabelNet, Preprocessing, build_model, preprocessing_for
from clml_core.runio import atomic_write_json

#: A class is "well populated" in a scored split with at least this many positives (VOC2007 sample: car, cat,
#: person, train and bus in a 30% test carve).
FREQUENT_MIN_POSITIVES = 20


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
        ``map`` (classes with a positive), ``map_frequent`` (classes with >= FREQUENT_MIN_POSITIVES positives; NaN
        if none), ``frequent_classes``, ``n_classes_scored``, ``threshold_metrics`` (CP, CR, CF1, OP, OR, OF1 at
        0.5), ``ap_per_class`` (NaN without a positive), ``positives_per_class`` and ``n_images``.
    """
    per_class = average_precision_per_class(labels, scores)
    positives = np.asarray(labels).sum(axis=0).astype(int)
    frequent = positives >= FREQUENT_MIN_POSITIVES
    return {
        "map": mean_average_precision(labels, scores),
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


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[MultiLabelNet, dict[str, Any]]:
    """Rebuild a run's model from a checkpoint written by the engine (``best.pt`` or ``last.pt``).

    Returns:
        The model in eval mode and its ``model_spec``.

    Raises:
        ValueError: the file has no ``model_spec`` (written by an older version) or its weights do not fit.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or "model_spec" not in state:
        raise ValueError(f"{path}: no 'model_spec' entry; this checkpoint cannot rebuild its model")
    spec = state["model_spec"]
    model = build_model(
        spec["arch"],
        spec["num_classes"],
        weights=None if spec["backbone_in_checkpoint"] else spec["weights"],
        proj_dim=spec["proj_dim"],
        proj_hidden_dim=spec["proj_hidden_dim"],
        widths=spec["widths"],
        classify_embeddings=spec["classify_embeddings"],
    )
    if model.preprocessing != Preprocessing.from_dict(spec["preprocessing"]):
        raise ValueError(
            f"{path}: the preprocessing of {spec['arch']} changed since this run ({spec['preprocessing']})"
        )
    load_weights(model, state["model"], spec, str(path))
    return model.to(device).eval(), spec


def load_weights(model: MultiLabelNet, weights: dict[str, torch.Tensor], spec: dict[str, Any], where: str) -> None:
    """Load a checkpoint's model weights; without the backbone (frozen mode) only backbone keys may be missing."""
    result = model.load_state_dict(weights, strict=spec["backbone_in_checkpoint"])
    if not spec["backbone_in_checkpoint"]:
        missing = [key for key in result.missing_keys if not key.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{where}: weights do not fit (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )


def _split(config: TrainConfig, split: str) -> MultiLabelDataset:
    from clml_core.data.splits import build_splits

    preprocessing = preprocessing_for(config.model.arch)
    if split in ("train", "val", "test"):
        return getattr(build_splits(config.data, preprocessing, progress=False), split)
    whole = apply_updates(config, {"data": {"test_split": split, "test_fraction": 0.0}})
    return build_splits(whole.data, preprocessing, progress=False).test


def evaluate_run(
    run_dir: str | Path,
    dataset: str,
    root: str,
    split: str,
    *,
    checkpoint: str = "best",
    device: str = "auto",
) -> dict[str, Any]:
    """Score a run's checkpoint on a dataset split (see the module docstring); returns the results dict."""
    run_dir = Path(run_dir)
    config_path = run_dir / runfolder.CONFIG
    # The run's own configuration, validated once the scoring fields are in (its name plays no part here).
    config = apply_updates(TrainConfig(), runfolder.read_config_dict(run_dir), source=str(config_path))
    model, spec = load_model(runfolder.checkpoint_file(run_dir, checkpoint), select_device(device))
    data = {"dataset": dataset, "root": root, "limit_train": 0, "packed_cache": False, "image_size": spec["image_size"]}
    if split in ("train", "val"):
        data["val_labels"] = "full"
    config = apply_updates(config, {"name": "evaluate", "data": data, "progress": False, "device": device})
    validate_config(config, str(config_path))
    scored = _split(config, split)
    if scored.classes != spec["classes"]:
        raise ValueError(
            f"{dataset} at {root} has classes {scored.classes[:4]}... but the run was trained on "
            f"{spec['classes'][:4]}... ({len(spec['classes'])} classes)"
        )
    on = next(model.parameters()).device
    loader = eval_loader(scored, config.optim.batch_size, config.data.workers, on)
    pred = predict(model, loader, on, amp=config.optim.amp, channels_last=config.model.channels_last)
    return {
        "run": str(run_dir),
        "checkpoint": checkpoint,
        "dataset": dataset,
        "root": str(root),
        "split": split,
        **score(scored.labels, pred["scores"], scored.classes),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m clml_core.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="a finished run folder (config.yaml, checkpoints/)")
    parser.add_argument(
        "--dataset", required=True, choices=[d for d in choices(DataConfig, "dataset") if d != "synthetic"]
    )
    parser.add_argument("--root", required=True, help="the dataset root")
    parser.add_argument("--split", default="test", help="test | val | train (the run's splits) or a dataset split")
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    parser.add_argument("--device", default="auto", choices=choices(TrainConfig, "device"))
    parser.add_argument("--out", default=None, help="results json (default: RUN_DIR/eval_<dataset>_<split>.json)")
    args = parser.parse_args(argv)
    results = evaluate_run(
        args.run_dir, args.dataset, args.root, args.split, checkpoint=args.checkpoint, device=args.device
    )
    out = Path(args.out) if args.out else runfolder.eval_file(args.run_dir, args.dataset, args.split)
    atomic_write_json(out, results)
    print(
        f"{args.dataset} {args.split}: mAP {results['map']:.2f} over {results['n_classes_scored']} classes, "
        f"{results['map_frequent']:.2f} over {len(results['frequent_classes'])} well-populated ones "
        f"({results['n_images']} images) -> {out}"
    )
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
