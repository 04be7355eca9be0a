"""The CLML term as the authors released it, kept only to measure what its gradient bug costs.

The release (github chuangua/ContrastiveLossMLML, ``ConLoss_MLML.py``) computes the term with one SVD per class
moved to NumPy, drops singular values under an absolute 1e-6, and returns a precomputed gradient from a hand-written
backward that ignores the incoming gradient. Its training script runs in fp32 without autocast, but behind a
dynamic GradScaler: the loss is multiplied by the scale before ``backward`` and the parameter gradients divided by it
before the step, so the CLML gradient arrives divided by the scale. The scale starts at 65536 and doubles every 2000
overflow-free steps, and fp32 gradients do not overflow: after its 26 epochs of 1283 steps it is 2^32 (about 4e9),
and the CLML gradient is divided by that, not by 65536. ``clml_core.config.AUTHORS`` trains this way (on CPU too).
Its value also weighs the global term by lambda twice: ``lam / B * (local - lam * global)``. Use
:class:`clml_core.losses.CLMLLoss` for real work.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

_SINGULAR_THRESHOLD = 1e-6


def _nuclear_and_subgradient(rows: np.ndarray) -> tuple[float, np.ndarray]:
    u, s, vt = np.linalg.svd(rows, full_matrices=False)
    keep = s >= _SINGULAR_THRESHOLD
    return float(s.sum()), u[:, keep] @ vt[keep]


class _AuthorsCLML(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings: Tensor, labels: Tensor, lam: float, delta: float) -> Tensor:
        z = embeddings.detach().double().cpu().numpy()
        members = labels.detach().bool().cpu().numpy()
        batch = z.shape[0]
        local, grad_local = 0.0, np.zeros_like(z)
        for k in range(members.shape[1]):
            rows = members[:, k]
            norm, sub = _nuclear_and_subgradient(z[rows]) if rows.any() else (0.0, None)
            if norm > delta:
                local += norm
                grad_local[rows] += sub
            else:
                local += delta
        global_, grad_global = _nuclear_and_subgradient(z)
        grad = (grad_local - lam * grad_global) / batch * lam
        ctx.grad = torch.as_tensor(grad, dtype=embeddings.dtype, device=embeddings.device)
        return embeddings.new_tensor((local - lam * global_) / batch * lam)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        # The release's bug, reproduced on purpose: grad_output (e.g. the AMP loss scale) is ignored.
        return ctx.grad, None, None, None


class AuthorsCLMLLoss(nn.Module):
    """The released CLML term (see the module docstring); ``forward(embeddings (B, D), labels (B, C))``."""

    def __init__(self, lam: float = 1.0, delta: float = 1.0) -> None:
        super().__init__()
        self.lam = lam
        self.delta = delta

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return _AuthorsCLML.apply(embeddings, labels, self.lam, self.delta)
