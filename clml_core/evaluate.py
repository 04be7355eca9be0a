"""Scoring a model on a dataset: sigmoid scores, observed labels and embeddings in row order."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clml_core.config import TrainConfig
from clml_core.data.dataset import MultiLabelDataset, collate
from clml_core.devices import autocast, to_input


def eval_loader(
    dataset: MultiLabelDataset, config: TrainConfig, device: torch.device | None = None
) -> torch.utils.data.DataLoader:
    """Batches of ``dataset`` in row order: uint8 images (converted on the device), pinned memory on a GPU, and
    persistent workers, so a loader kept across epochs (the trainer's validation loader) starts its workers once."""
    workers = config.data.workers
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=max(config.optim.batch_size, 128),
        shuffle=False,
        num_workers=workers,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=workers > 0,
        collate_fn=collate,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: MultiLabelDataset,
    config: TrainConfig,
    device: torch.device,
    *,
    embeddings: bool = False,
    loader: torch.utils.data.DataLoader | None = None,
) -> dict[str, np.ndarray]:
    """Sigmoid scores (N, C), observed labels (N, C) and optionally embeddings (N, E) of a dataset, in row order.

    Outputs stay on the device until the end (one host read, not one per batch). ``loader`` is an
    :func:`eval_loader` of ``dataset`` to reuse; by default a new one is made.
    """
    model.eval()
    scores, targets, embeds = [], [], []
    for images, observed, _ in eval_loader(dataset, config, device) if loader is None else loader:
        images = to_input(images, config, device)
        with autocast(config, device):
            out = model(images)
        scores.append(torch.sigmoid(out.logits.float()))
        targets.append(observed)
        if embeddings:
            embeds.append(out.embeddings.float())
    result = {"scores": torch.cat(scores).cpu().numpy(), "observed": torch.cat(targets).numpy()}
    if embeddings:
        result["embeddings"] = torch.cat(embeds).cpu().numpy()
    return result
