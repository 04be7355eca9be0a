"""An epoch of the partial mode from the stored trunk against the same epoch with the trunk run at every step.

    python benchmarks/bench_trunk_cache.py --root DATA_ROOT              # real_finetune on VOC2007 (the folder
                                                                         # holding VOCdevkit/), 3 rounds
    python benchmarks/bench_trunk_cache.py --root DATA_ROOT --cache-dir DIR --rounds 5
    python benchmarks/bench_trunk_cache.py --root DATA_ROOT --trainable-stages 3
    python benchmarks/bench_trunk_cache.py --tiny                        # seconds: a check that the script runs

Each round trains epoch 0 of the ``real_finetune`` preset twice in this process, once with ``model.trunk_cache=true``
(the trainable stages, head convolution and classifier from the stored output of the frozen stages) and once with
``model.trunk_cache=false`` (the frozen stages run on the images at every step); the two runs see the same seed,
batches and views (``data.feature_views`` stored views, drawn from the files without the cache). The time is the
``seconds`` column of the run's ``metrics.csv``: the epoch's training steps (loading included), not validation, nor
the store, which is built (or found, in ``--cache-dir``) before the rounds and timed apart. One untimed cached epoch
warms the process first (a process's first epoch ran twice as long). Rounds alternate the two so a drift in the
machine's speed hits both; the ratio is taken within each round and the median over rounds is reported, with the
load average before and after (the timings mean little on a machine others are using).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from clml_core.build import build_network, input_splits, uses_trunk_cache
from clml_core.config import TrainConfig, apply_updates, resolve_config
from clml_core.data.splits import build_splits
from clml_core.data.voc import VOC_CLASSES
from clml_core.engine import train
from clml_core.models import preprocessing_for


def write_tiny_voc(root: Path, n: int = 48) -> Path:
    """A VOCdevkit/VOC2007 trainval of ``n`` small JPEGs (two colour-coded classes) under ``root``."""
    from PIL import Image

    base = root / "VOCdevkit" / "VOC2007"
    (base / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.zeros((n, len(VOC_CLASSES)), dtype=int)
    for i in range(n):
        labels[i, VOC_CLASSES.index("car" if i % 2 else "cat")] = 1
        colour = np.array((200, 40, 40) if i % 2 else (40, 40, 200))
        pixels = (rng.integers(0, 60, size=(30, 40, 3)) + colour // 2).astype(np.uint8)
        Image.fromarray(pixels).save(base / "JPEGImages" / f"{i:06d}.jpg")
    for k, name in enumerate(VOC_CLASSES):
        lines = [f"{i:06d} {1 if labels[i, k] else -1}" for i in range(n)]
        (base / "ImageSets" / "Main" / f"{name}_trainval.txt").write_text("\n".join(lines) + "\n")
    return root


def bench_config(root: Path, cache: Path, args: argparse.Namespace, weights: str | None) -> TrainConfig:
    """The ``real_finetune`` preset for two epochs (the runs stop after the first) without test outputs."""
    overrides: dict[str, Any] = {
        "progress": False,
        "save_embeddings": False,
        "threads": args.threads,
        "data": {"root": str(root), "cache_dir": str(cache) if cache else ""},
        "model": {"trainable_stages": args.trainable_stages},
        "optim": {"epochs": 2},
    }
    if args.tiny:
        overrides["data"].update(image_size=32, feature_views=2, test_fraction=0.25, val_fraction=0.2)
        overrides["optim"].update(batch_size=8)
        overrides["model"].update(weights=weights)
    return resolve_config("real_finetune", overrides=overrides)


def build_stores(config: TrainConfig) -> tuple[float, int]:
    """Build (or find) the run's trunk stores; (seconds, training steps per epoch)."""
    started = time.perf_counter()
    preprocessing = preprocessing_for(config.model.arch)
    splits = build_splits(config.data, preprocessing, progress=False)
    torch.manual_seed(config.seed)
    model = build_network(config.model, splits.train.num_classes, torch.device("cpu"))
    input_splits(config, splits, model, torch.device("cpu"))
    return time.perf_counter() - started, len(splits.train) // config.optim.batch_size


def epoch_seconds(config: TrainConfig, out: Path, steps: int) -> float:
    """Train epoch 0 of ``config`` into the new folder ``out`` and return its ``seconds`` (metrics.csv)."""
    train(config, out, max_steps=steps)  # stops at the first step of epoch 1: no test scoring
    return float(pd.read_csv(out / "metrics.csv")["seconds"].iloc[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="", help="the VOC2007 root (the folder holding VOCdevkit/)")
    parser.add_argument("--cache-dir", default="", help="where the trunk stores live ('' = the project's data/cache)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trainable-stages", type=int, default=2, help="model.trainable_stages (preset: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tiny", action="store_true", help="a made-up 48-image VOC at 32 px, random weights")
    args = parser.parse_args(argv)
    if not args.tiny and not args.root:
        parser.error("--root is required (or --tiny)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-trunk-") as scratch:
        scratch = Path(scratch)
        root, cache, weights = Path(args.root), Path(args.cache_dir) if args.cache_dir else None, None
        if args.tiny:
            import timm

            root, cache, weights = write_tiny_voc(scratch / "voc"), scratch / "cache", str(scratch / "lite0.pth")
            torch.manual_seed(0)
            torch.save(timm.create_model("tf_efficientnet_lite0", num_classes=0).state_dict(), weights)
        cached = bench_config(root, cache, args, weights)
        uncached = apply_updates(cached, {"model": {"trunk_cache": False}})
        if not uses_trunk_cache(cached):
            parser.error("the configuration does not train from a stored trunk (see clml_core.build.uses_trunk_cache)")
        load_before = os.getloadavg()
        store_s, steps = build_stores(cached)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
        print(
            f"real_finetune, trainable_stages={args.trainable_stages}, {steps} steps of {cached.optim.batch_size} "
            f"images an epoch, {cached.data.feature_views} stored views; trunk stores built or found in {store_s:.1f} s"
        )
        epoch_seconds(cached, scratch / "warmup", steps)  # untimed: the process's first epoch starts its pools
        print("| round | cached trunk s | trunk every step s | ratio |")
        print("|---:|---:|---:|---:|")
        ratios = []
        for k in range(args.rounds):
            fast = epoch_seconds(cached, scratch / f"cached{k}", steps)
            slow = epoch_seconds(uncached, scratch / f"uncached{k}", steps)
            ratios.append(slow / fast)
            print(f"| {k} | {fast:.2f} | {slow:.2f} | {slow / fast:.2f}x |", flush=True)
        load_after = os.getloadavg()
    spread = f"lowest {min(ratios):.2f}x, highest {max(ratios):.2f}x"
    print(f"{args.rounds} rounds: epoch time ratio median {statistics.median(ratios):.2f}x, {spread}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")


if __name__ == "__main__":
    main()
