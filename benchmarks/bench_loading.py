"""Images per second through a DataLoader: JPEG files decoded by PIL per item against the packed cache.

    python benchmarks/bench_loading.py [--images DIR] [--n 384] [--src-size 256] [--size 224]
                                       [--workers 0 2] [--batch-size 32] [--epochs 3]

Without ``--images`` it writes ``--n`` synthetic images of ``--src-size`` pixels as JPEG files (quality 90)
into a temporary folder; with ``--images`` it uses every .jpg/.jpeg/.png file of that folder. Both pipelines
read the same files, apply the same transform and go through the same DataLoader; the packed one reads the
images from a cache built once by :func:`build_packed_cache` (its build time is printed separately, with
and without the decoding thread pool). Each row reports the fastest of ``--epochs`` epochs after one warm-up
epoch, with persistent workers and one torch thread per process; the ratio is packed / files in the same
process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clml_core.data.cache import build_packed_cache
from clml_core.data.dataset import MultiLabelDataset
from clml_core.data.synthetic import CLASS_NAMES, SyntheticConfig, generate_split
from clml_core.data.transforms import eval_transform, train_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def synthetic_jpegs(folder: Path, n: int, size: int, seed: int) -> MultiLabelDataset:
    """Write ``n`` synthetic (size x size) images as JPEG files and return them as a file-backed dataset."""
    config = SyntheticConfig(image_size=size, n_train=n, n_val=1, n_test=1, seed=seed)
    images, labels, _ = generate_split(config, "train")
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:06d}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90)
    return MultiLabelDataset(CLASS_NAMES[: config.num_classes], labels, image_paths=paths, name="synthetic-jpeg")


def folder_dataset(folder: Path) -> MultiLabelDataset:
    """Every image file of ``folder`` (sorted), with one dummy all-zero label column."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return MultiLabelDataset(["none"], np.zeros((len(paths), 1), np.uint8), image_paths=paths, name=folder.name)


def images_per_second(dataset: MultiLabelDataset, workers: int, batch_size: int, epochs: int) -> float:
    """Images per second of the fastest of ``epochs`` shuffled epochs, after one warm-up epoch.

    The fastest epoch is reported because other processes on the machine only ever slow an epoch down.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in loader:
        pass
    best = float("inf")
    for _ in range(epochs):
        start = time.perf_counter()
        for _ in loader:
            pass
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, help="folder of image files (default: synthetic JPEGs)")
    parser.add_argument("--n", type=int, default=384, help="number of synthetic images")
    parser.add_argument("--src-size", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--size", type=int, default=224, help="training image side (Resize((size, size)))")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # One intra-op thread, as DataLoader workers use: per-image ops are too small to split, and with
    # workers=0 a second thread only adds synchronisation.
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="clml-bench-loading-") as tmp:
        tmp = Path(tmp)
        if args.images is None:
            (tmp / "jpeg").mkdir()
            files = synthetic_jpegs(tmp / "jpeg", args.n, args.src_size, args.seed)
        else:
            files = folder_dataset(args.images)
        print(
            f"{len(files)} images from {files.image_paths[0].parent}, training size {args.size}px, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}"
        )

        build = {}
        for threads in (1, min(8, os.cpu_count() or 1)):
            start = time.perf_counter()
            cache = build_packed_cache(files, args.size, tmp / f"cache_{threads}.npy", workers=threads, progress=False)
            build[threads] = time.perf_counter() - start
        print(
            "cache build: "
            + ", ".join(f"{t} thread(s) {s:.2f} s ({len(files) / s:.0f} img/s)" for t, s in build.items())
        )
        packed = cache.dataset(files)

        rows = []
        for name, transform in (("eval", eval_transform(args.size)), ("train", train_transform(args.size))):
            for workers in args.workers:
                torch.manual_seed(args.seed)
                file_rate = images_per_second(files.with_transform(transform), workers, args.batch_size, args.epochs)
                torch.manual_seed(args.seed)
                packed_rate = images_per_second(packed.with_transform(transform), workers, args.batch_size, args.epochs)
                rows.append((name, workers, file_rate, packed_rate))

    print()
    print("| transform | workers | files (PIL) img/s | packed cache img/s | packed / files |")
    print("|-----------|--------:|------------------:|-------------------:|---------------:|")
    for name, workers, file_rate, packed_rate in rows:
        print(
            f"| {name:9s} | {workers:7d} | {file_rate:17.0f} | {packed_rate:18.0f} | {packed_rate / file_rate:14.2f} |"
        )


if __name__ == "__main__":
    main()
