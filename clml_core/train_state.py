"""What a training run carries from step to step, and what a checkpoint restores: the epoch's running sums, the
logged values not yet read from the device, the EMA of the weights and the random states.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from clml_core.correction import CorrectionQuality


@dataclass
class EpochSums:
    """Running sums of one epoch, part of every checkpoint so a resumed epoch logs what an uninterrupted one does."""

    steps: int = 0
    loss: float = 0.0
    base: float = 0.0
    clml: float = 0.0
    local: float = 0.0
    global_: float = 0.0
    correction: CorrectionQuality = field(default_factory=CorrectionQuality)

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only, for a checkpoint."""
        state = {name: getattr(self, name) for name in ("steps", "loss", "base", "clml", "local", "global_")}
        correction = self.correction
        state["correction"] = {
            "n_missing": correction.n_missing,
            "n_recovered": correction.n_recovered,
            "n_true_recovered": correction.n_true_recovered,
        }
        return state

    def add(self, steps: int, terms: list[float], correction: CorrectionQuality) -> None:
        """Add ``steps`` steps' sums of the five logged terms (loss, base, CLML, local, global) and their counts."""
        self.steps += steps
        self.loss += terms[0]
        self.base += terms[1]
        self.clml += terms[2]
        self.local += terms[3]
        self.global_ += terms[4]
        self.correction = self.correction + correction

    def row(self) -> dict[str, float]:
        """The epoch's ``metrics.csv`` columns of these sums: mean terms per step and the correction's quality."""
        steps = max(self.steps, 1)
        return {
            "train_loss": self.loss / steps,
            "train_base": self.base / steps,
            "train_clml": self.clml / steps,
            "train_local": self.local / steps,
            "train_global": self.global_ / steps,
            "corr_precision": self.correction.precision,
            "corr_recall": self.correction.recall,
            "corr_recovered": self.correction.n_recovered,
            "corr_missing": self.correction.n_missing,
            "corr_true_recovered": self.correction.n_true_recovered,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EpochSums:
        values = dict(state)
        values["correction"] = CorrectionQuality(**values["correction"])
        return cls(**values)


class PendingLogs:
    """Logged values of the steps since the last read, kept on the device so a step never waits for the host.

    ``terms`` (5,) float64 sums of loss, base, CLML, local, global; ``correction`` (3,) float64 sums of missing,
    recovered and truly recovered labels; ``bad`` counts non-finite losses and ``first_bad`` (6,) holds the step
    and the five terms of the first one.
    """

    def __init__(self, device: torch.device) -> None:
        self.steps = 0
        self.terms = torch.zeros(5, dtype=torch.float64, device=device)
        self.correction = torch.zeros(3, dtype=torch.float64, device=device)
        self.bad = torch.zeros(1, dtype=torch.float64, device=device)
        self.first_bad = torch.zeros(6, dtype=torch.float64, device=device)

    def add(self, step: int, terms: Tensor, correction: Tensor | None) -> None:
        """Accumulate one step's (5,) terms and optional (3,) correction counts, without a host read."""
        terms = terms.detach().double()
        finite = torch.isfinite(terms[0])
        first = (~finite) & (self.bad == 0)
        self.first_bad = torch.where(first, torch.cat([terms.new_full((1,), step), terms]), self.first_bad)
        self.bad += (~finite).double()
        self.terms += terms
        if correction is not None:
            self.correction += correction.double()
        self.steps += 1


class DeviceEMA(AveragedModel):
    """torch's EMA of parameters and buffers (``AveragedModel`` with ``get_ema_multi_avg_fn``, same state dict and
    same values) without the two host reads of ``n_averaged`` that ``update_parameters`` makes every step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        self._updates: int | None = 0  # host copy of n_averaged; None after loading a state dict

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        averaged = [t.detach() for t in itertools.chain(self.module.parameters(), self.module.buffers())]
        current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
        if self._updates is None:
            self._updates = int(self.n_averaged)  # one read, after a resume
        if self._updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current):
                if a.is_floating_point():
                    groups.setdefault(a.dtype, ([], []))
                    groups[a.dtype][0].append(a)
                    groups[a.dtype][1].append(c)
                else:  # integer buffers (BatchNorm's num_batches_tracked), as get_ema_multi_avg_fn does
                    a.copy_(a * self.decay + c * (1 - self.decay))
            for a_list, c_list in groups.values():
                torch._foreach_lerp_(a_list, c_list, 1 - self.decay)
        self.n_averaged += 1
        self._updates += 1

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._updates = None
        return super().load_state_dict(*args, **kwargs)


def rng_state() -> dict[str, Any]:
    """The random states as tensors and plain values (see :mod:`clml_core.checkpoints`)."""
    numpy_state = np.random.get_state(legacy=False)
    mt = numpy_state["state"]
    python_version, python_key, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(mt["key"].astype(np.int64)),
            "pos": int(mt["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": [python_version, list(python_key), python_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    version, key, gauss = state["python"]
    random.setstate((version, tuple(key), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
