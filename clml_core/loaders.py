"""Batches of a run: the seeded training loader and the row-order evaluation loader.

Training: the data order and every augmentation are functions of (seed, epoch, index), so a resumed run, even one
killed mid-epoch, sees the same batches as an uninterrupted one, whatever the number of loader workers. Each step
takes ``batch_size`` images of the epoch's permutation (the remainder is dropped, so every batch has the same shape),
DDP rank r the r-th slice of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from clml_core.data.dataset import MultiLabelDataset, collate, ignore_stop_signals


class SeededItems(torch.utils.data.Dataset):
    """Item i of epoch e is drawn under its own seed, so augmentation does not depend on workers or resumption.

    Keys are ``(epoch, index)`` pairs (from :class:`EpochBatches`), so one loader with persistent workers serves
    every epoch. A dataset with a ``seeded_item(index, seed)`` method (cached features draw their view from the
    seed) is asked for it instead of seeding torch.
    """

    def __init__(self, dataset: MultiLabelDataset, seed: int, augment: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor, int]:
        epoch, index = key
        if not self.augment:
            return self.dataset[index]
        item_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + index
        seeded_item = getattr(self.dataset, "seeded_item", None)
        if seeded_item is not None:
            return seeded_item(index, item_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[tuple[Tensor, Tensor, int]]:
        """A batch: read in one call where nothing is drawn (no augmentation) and the dataset reads batches."""
        batch_items = getattr(self.dataset, "__getitems__", None)
        if self.augment or batch_items is None:
            return [self[key] for key in keys]
        return batch_items([index for _, index in keys])


def epoch_order(num_items: int, seed: int, epoch: int) -> Tensor:
    """The permutation of training items in an epoch, a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(num_items, generator=generator)


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Images per rank and step: ``batch_size`` is the global batch, split evenly over the DDP ranks."""
    if batch_size % world_size:
        raise ValueError(
            f"config field 'optim.batch_size': {batch_size} is the global batch and must split evenly over "
            f"{world_size} processes (each rank takes batch_size / world_size)"
        )
    return batch_size // world_size


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of one epoch, from ``start_step`` on; set ``epoch`` and ``start_step`` before iterating.

    Args:
        num_items: training images.
        batch_size: the global batch.
        seed: the run's seed (the epoch's order is :func:`epoch_order`).
        rank, world_size: this process's DDP rank and the number of ranks.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_items, self.seed, self.rank = num_items, seed, rank
        self.batch, self.per_rank = batch_size, rank_batch_size(batch_size, world_size)
        self.steps = num_items // self.batch
        if self.steps == 0:
            raise ValueError(f"training set of {num_items} images is smaller than one global batch ({self.batch})")
        self.epoch, self.start_step = 0, 0

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.num_items, self.seed, self.epoch)
        for step in range(self.start_step, self.steps):
            first = step * self.batch + self.rank * self.per_rank
            yield [(self.epoch, i) for i in order[first : first + self.per_rank].tolist()]


def train_loader(
    dataset: MultiLabelDataset,
    batches: EpochBatches,
    *,
    seed: int,
    augment: bool,
    workers: int,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    """One loader for the whole run: persistent workers, pinned memory on a GPU, uint8 batches."""
    return torch.utils.data.DataLoader(
        SeededItems(dataset, seed, augment),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        collate_fn=collate,
    )


def eval_loader(
    dataset: MultiLabelDataset, batch_size: int, workers: int, device: torch.device | None = None
) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in row order: uint8 images (converted on the device), pinned memory on a GPU, and
    persistent workers, so a loader kept across epochs (the trainer's validation loader) starts its workers once.

    Args:
        batch_size: the training batch; evaluation takes at least 128 images a batch.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=max(batch_size, 128),
        shuffle=False,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        collate_fn=collate,
    )
