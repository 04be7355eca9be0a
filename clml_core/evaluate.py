"""Scoring a model on a dataset: sigmoid scores, observed labels and embeddings in row order."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clml_core.config import TrainConfig
from clml_core.data.dataset import MultiLabelDataset
from clml_core.devices import autocast, to_input


def eval_loader(dataset: MultiLabelDataset, config: TrainConfig) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=max(config.optim.batch_size, 128), shuffle=False, num_workers=config.data.workers
    )


@torch.no_grad()
def predict(
    model: nn.Module, dataset: MultiLabelDataset, config: TrainConfig, device: torch.device, *, embeddings: bool = False
) -> dict[str, np.ndarray]:
    """Sigmoid scores (N, C), observed labels (N, C) and optionally embeddings (N, E) of a dataset, in row order."""
    model.eval()
    scores, targets, embeds = [], [], []
    for images, observed, _ in eval_loader(dataset, config):
        images = to_input(images, config, device)
        with autocast(config, device):
            out = model(images)
        scores.append(torch.sigmoid(out.logits.float()).cpu())
        targets.append(observed)
        if embeddings:
            embeds.append(out.embeddings.float().cpu())
    result = {"scores": torch.cat(scores).numpy(), "observed": torch.cat(targets).numpy()}
    if embeddings:
        result["embeddings"] = torch.cat(embeds).numpy()
    return result
