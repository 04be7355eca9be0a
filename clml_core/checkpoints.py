"""Training checkpoints: plain dicts of tensors and primitive values, written atomically, read back safely.

A checkpoint holds no pickled class of this project (or of numpy), so it loads with ``torch.load(weights_only=True)``
from any process, the command line's or a notebook's. ``checkpoints/last.pt`` is the newest; the checkpoint it
replaced is kept as ``checkpoints/previous.pt``, so a ``last.pt`` that cannot be read (truncated, corrupted) is
reported and the run continues from ``previous.pt``. Keys of a training checkpoint (:data:`FORMAT` 2):

- ``format`` (int), ``config`` (the resolved configuration as a nested dict),
- ``model``, ``optimizer``, ``scheduler``, ``ema`` (or None), ``scaler``: state dicts,
- ``objective``: the training objective's state dict (a method's own state, e.g. a label matrix; empty for most),
- ``epoch``, ``step``: where training continues; ``sums``: the epoch's running sums (a dict of numbers),
- ``rows``: the ``metrics.csv`` rows so far; ``best``: the selected model so far (val_map, epoch, variant),
- ``rng``: the random states (``torch``: uint8 tensor, ``numpy``: dict with a tensor key, ``python``: list).

Other keys (a description of the model, say) may be added by their owners; readers ignore keys they do not know.

Model selection keeps its weights beside them: ``best-epoch{e}.pt`` (``model_spec`` and ``model``) for the epoch
whose validation mAP was best, and ``best.pt`` a link to the one the newest checkpoint records.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from clml_core.runio import atomic_torch_save

FORMAT = 2  # 2: the objective's state
FOLDER = "checkpoints"  # inside a run folder
LAST = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
BEST_EPOCH_GLOB = "best-epoch*.pt"
REQUIRED = (
    "format", "config", "model", "optimizer", "scheduler", "scaler", "objective", "epoch", "step", "sums", "rows",
    "rng",
)  # fmt: skip


def best_epoch_file(folder: str | Path, epoch: int) -> Path:
    """The selected weights of ``epoch`` in the checkpoint folder ``folder``."""
    return Path(folder) / f"best-epoch{epoch}.pt"


class CheckpointError(ValueError):
    """No readable checkpoint: every candidate was truncated, corrupt or of another format."""


def plain(value: Any, where: str = "checkpoint") -> Any:
    """Check that ``value`` is made of tensors, dicts, lists, tuples, str, int, float, bool and None.

    Raises:
        TypeError: naming the key path of the first other value (it would not load with weights_only=True).
    """
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not a str or int")
            plain(item, f"{where}[{key!r}]")
        return value
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            plain(item, f"{where}[{i}]")
        return value
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}; checkpoints hold plain values")


def save(state: dict[str, Any], folder: str | Path) -> Path:
    """Write ``state`` as ``folder/last.pt`` atomically, keeping the checkpoint it replaces as ``previous.pt``."""
    folder = Path(folder)
    plain(state)
    path = folder / LAST
    atomic_torch_save({"format": FORMAT, **state}, path, keep_previous=folder / PREVIOUS)
    return path


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def read(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """One checkpoint file, loaded with ``weights_only=True`` and checked for the keys of :data:`FORMAT`.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a training checkpoint of this format.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, bad pickle, unsafe global, I/O error: all say "unreadable"
        raise CheckpointError(f"{path} cannot be read ({_first_line(error)})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a training checkpoint of format {FORMAT} (found {found!r})")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the keys {missing}")
    return state


def set_aside_unreadable(folder: str | Path, used: Path) -> None:
    """When the run continues from ``previous.pt`` because ``last.pt`` could not be read, keep that file for
    inspection as ``last.pt.unreadable``: the next checkpoint must not keep it as its previous one."""
    unreadable = Path(folder) / LAST
    if Path(used).name == PREVIOUS and unreadable.exists():
        os.replace(unreadable, unreadable.with_name(LAST + ".unreadable"))


def load_latest(folder: str | Path, map_location: Any = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``folder`` and its path; None when the folder holds no checkpoint.

    An unreadable ``last.pt`` is reported on stderr and ``previous.pt`` is used instead.

    Raises:
        CheckpointError: checkpoints exist but none can be read (the message names each file and why).
    """
    folder = Path(folder)
    problems = []
    for name in (LAST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = read(path, map_location)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems:
            print(f"clml: {'; '.join(problems)}; continuing from {path} instead", file=sys.stderr, flush=True)
        return state, path
    if problems:
        raise CheckpointError(f"{'; '.join(problems)}; no readable checkpoint is left in {folder}")
    return None
