"""The packed cache for COCO-sized input: its size on disk and the images/s each pipeline delivers.

    python benchmarks/bench_loading.py                          # synthetic 640 x 480 JPEGs, cached at 448 px
    python benchmarks/bench_loading.py --images DIR             # every .jpg/.jpeg/.png of DIR (e.g. real photos)
    python benchmarks/bench_loading.py --device cuda            # adds JPEG decoding on the GPU (nvJPEG)
    python benchmarks/bench_loading.py --tiny                   # seconds: a check that the script runs (CI)

Without ``--images`` it writes ``--n`` synthetic images of ``--src-size`` (COCO's typical 640 x 480) as JPEG files
(quality 90). Every pipeline reads the same images into (B, 3, size, size) uint8 batches through a DataLoader:

* ``files``: PIL decodes each file and resizes it to size x size in the workers (no cache);
* ``raw cache``: rows of the (N, size, size, 3) uint8 cache (nothing to decode);
* ``jpeg cache``: each row's JPEG bytes decoded by libjpeg-turbo in the workers;
* ``jpeg cache, decode on DEVICE``: the workers hand over bytes, the main process decodes the batch on the device
  in one ``decode_jpeg`` call (nvJPEG on a GPU; the time includes the decode).

The cache table gives bytes per image and, scaled to COCO-2014 (123,287 train + val images), the disk a cache needs.
JPEG sizes depend on the content: synthetic glyph scenes compress better than photos, so run it on real photos too
(``--images``). Each images/s figure is the fastest of ``--epochs`` epochs after one warm-up epoch (persistent
workers, one torch thread per process); ratios are against ``files`` in the same process.
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
from clml_core.data.dataset import MultiLabelDataset, collate, decode_batch
from clml_core.data.synthetic import CLASS_NAMES, SyntheticConfig, generate_split
from clml_core.data.transforms import eval_transform

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COCO_2014_IMAGES = 82_783 + 40_504


def synthetic_jpegs(folder: Path, n: int, width: int, height: int, seed: int) -> MultiLabelDataset:
    """Write ``n`` synthetic (height x width) images as JPEG files (quality 90); a file-backed dataset of them."""
    config = SyntheticConfig(image_size=max(width, height), n_train=n, n_val=1, n_test=1, seed=seed)
    images, labels, _ = generate_split(config, "train", progress=False)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:06d}.jpg")
        Image.fromarray(image[:height, :width]).save(paths[-1], quality=90)
    return MultiLabelDataset(CLASS_NAMES[: config.num_classes], labels, image_paths=paths, name="synthetic-jpeg")


def folder_dataset(folder: Path) -> MultiLabelDataset:
    """Every image file of ``folder`` (sorted), with one dummy all-zero label column."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return MultiLabelDataset(["none"], np.zeros((len(paths), 1), np.uint8), image_paths=paths, name=folder.name)


def images_per_second(
    dataset: MultiLabelDataset, workers: int, batch_size: int, epochs: int, device: torch.device | None
) -> float:
    """Images per second of the fastest of ``epochs`` shuffled epochs after a warm-up epoch; with ``device``, the
    batches (JPEG bytes) are decoded there and the time includes it."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )

    def epoch() -> None:
        for images, _, _ in loader:
            if device is not None:
                batch = decode_batch(images, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                assert batch.dtype == torch.uint8

    epoch()
    best = float("inf")
    for _ in range(epochs):
        start = time.perf_counter()
        epoch()
        best = min(best, time.perf_counter() - start)
    return len(dataset) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="folder of image files (default: synthetic JPEGs)")
    parser.add_argument("--n", type=int, default=256, help="number of synthetic images")
    parser.add_argument("--src-size", type=int, nargs=2, default=[640, 480], metavar=("W", "H"))
    parser.add_argument("--size", type=int, default=448, help="training image side (the cache's side)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the jpeg cache")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs; the fastest is reported")
    parser.add_argument("--device", default="cpu", help="where the last pipeline decodes JPEG batches")
    parser.add_argument("--tiny", action="store_true", help="a few small images, one epoch: checks the script")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tiny:
        args.n, args.src_size, args.size, args.workers, args.epochs, args.batch_size = 16, [64, 48], 32, [0], 1, 8
    # One intra-op thread, as DataLoader workers use: per-image ops are too small to split.
    torch.set_num_threads(1)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="clml-bench-loading-") as tmp:
        tmp = Path(tmp)
        if args.images is None:
            (tmp / "jpeg").mkdir()
            width, height = args.src_size
            files = synthetic_jpegs(tmp / "jpeg", args.n, width, height, args.seed)
        else:
            files = folder_dataset(args.images)
        source_bytes = sum(os.path.getsize(p) for p in files.image_paths)
        print(
            f"{len(files)} images from {files.image_paths[0].parent} ({source_bytes / len(files) / 1e3:.1f} kB each), "
            f"cache side {args.size} px, {os.cpu_count()} CPUs, torch {torch.__version__}, decode device {device}"
        )
        caches, build = {}, {}
        for fmt in ("raw", "jpeg"):
            start = time.perf_counter()
            path = tmp / ("cache.npy" if fmt == "raw" else "cache.jpegs")
            caches[fmt] = build_packed_cache(files, args.size, path, fmt=fmt, quality=args.quality, progress=False)
            build[fmt] = time.perf_counter() - start

        print()
        print("| cache | bytes / image | COCO-2014 (123,287 images) | build img/s |")
        print("|---|---:|---:|---:|")
        for fmt, cache in caches.items():
            per_image = cache.nbytes / len(cache)
            label = fmt if fmt == "raw" else f"jpeg q{args.quality}"
            print(
                f"| {label} | {per_image / 1e3:.1f} kB | {per_image * COCO_2014_IMAGES / 2**30:.1f} GiB | "
                f"{len(files) / build[fmt]:.0f} |"
            )

        resize = eval_transform(args.size, to_float=False)
        pipelines = {
            "files (PIL + resize)": (files.with_transform(resize), None),
            "raw cache": (caches["raw"].dataset(files), None),
            "jpeg cache, decode in workers": (caches["jpeg"].dataset(files), None),
            f"jpeg cache, decode on {device.type}": (caches["jpeg"].dataset(files).with_encoded_items(), device),
        }
        rows = []
        for workers in args.workers:
            rates = {}
            for name, (dataset, decode_on) in pipelines.items():
                torch.manual_seed(args.seed)
                rates[name] = images_per_second(dataset, workers, args.batch_size, args.epochs, decode_on)
            rows += [(name, workers, rate, rate / rates["files (PIL + resize)"]) for name, rate in rates.items()]

    print()
    print("| pipeline | workers | images/s | vs files |")
    print("|---|---:|---:|---:|")
    for name, workers, rate, ratio in rows:
        print(f"| {name} | {workers} | {rate:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
