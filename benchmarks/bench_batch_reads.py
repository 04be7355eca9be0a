"""Reading a DataLoader batch of an image array in one call against reading it image by image.

    python benchmarks/bench_batch_reads.py            # the default study's benchmark: 32 px images, batches of 32
    python benchmarks/bench_batch_reads.py --tiny     # seconds: a check that the script runs (CI)

A training run of the default study spends most of its loading time on per-image Python work (a row of the
memory-mapped image array, a copy, a tensor, the labels), not on bytes. ``batch read`` is what the loaders do
(``MultiLabelDataset.__getitems__``: one gather from the array a batch); ``item reads`` is the same DataLoader with
the batch read switched off (``[dataset[i] for i in batch]``). Both read one epoch of the training split through
the run's own loader (``SeededItems`` + ``EpochBatches``, no workers, one torch thread) in alternating rounds; the
ratio is item reads / batch read, within each round. The two give equal batches (``tests/test_dataset.py``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import paired_seconds

from clml_core import loaders
from clml_core.data import MultiLabelDataset
from clml_core.data.dataset import collate


def epoch_reader(dataset: MultiLabelDataset, batch_size: int, batch_reads: bool):
    """A function reading one epoch of ``dataset`` through the training loader."""
    items = loaders.SeededItems(dataset, seed=0, augment=False)
    if not batch_reads:
        items.__getitems__ = None  # the DataLoader then fetches item by item
    batches = loaders.EpochBatches(len(dataset), batch_size, seed=0)
    loader = torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate)

    def read() -> None:
        for _ in loader:
            pass

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="training images")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20, help="epochs of each reader, over 5 alternating rounds")
    parser.add_argument("--tiny", action="store_true", help="256 images, 5 repeats")
    args = parser.parse_args()
    if args.tiny:
        args.n, args.repeats = 256, 5
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = (rng.random((args.n, 20)) < 0.1).astype(np.uint8)
    with tempfile.TemporaryDirectory() as folder:  # memory-mapped, as the benchmark's generated images are
        path = Path(folder) / "images.npy"
        np.save(path, rng.integers(0, 256, size=(args.n, args.size, args.size, 3), dtype=np.uint8))
        dataset = MultiLabelDataset([f"c{i}" for i in range(20)], labels, images=np.load(path, mmap_mode="r"))
        timed = paired_seconds(
            epoch_reader(dataset, args.batch, batch_reads=True),
            epoch_reader(dataset, args.batch, batch_reads=False),
            torch.device("cpu"),
            repeats=args.repeats,
        )
    print(f"{args.n} images of {args.size} px, batches of {args.batch}, one epoch per call (median of rounds)\n")
    print("| reader | ms / epoch | ratio (item reads / batch read) |")
    print("|---|---|---|")
    print(f"| batch read | {timed.a * 1e3:.1f} | |")
    print(f"| item reads | {timed.b * 1e3:.1f} | {timed.ratio:.2f}x |")


if __name__ == "__main__":
    main()
