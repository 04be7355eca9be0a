"""The feature store of the frozen-features mode: a frozen backbone run once per image and augmented view.

With ``model.train_mode=frozen`` the backbone never changes, so its pooled features are computed once and cached on
disk, and a run trains only the projection head (which CLML acts on) and the classifier, in seconds. This is the
linear-probe harness of Cole et al. (single-positive multi-label learning) with K augmented views per image.

A store covers every image of a run (train, validation and test, in sorted path order) and holds, per image,
view 0 (the evaluation transform: resize) and views 1..K (``data.augment`` drawn under a seed that depends only on
the view and the image's path), as float32 (N, 1 + K, F) in ``<cache>/features/<key>.npy`` with a json sidecar.
The key hashes everything the features depend on: the backbone's weights (their bytes), its preprocessing, the
image size, the augmentation, K, and every image path with its file size and modification time. Runs that differ
only in seeds, losses or protocols therefore share one store, and a study computes it once.

Training images then draw one of their K views per epoch (a pure function of the engine's per-item seed, see
:meth:`FeatureDataset.seeded_item`), or view 0 when K = 0; validation and test (and ``dataset[i]`` always) read view
0, which is exactly what the whole network computes on the resized image.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from clml_core.data.cache import file_identities
from clml_core.data.dataset import MultiLabelDataset, read_image
from clml_core.data.splits import Splits, train_transform_for
from clml_core.data.transforms import eval_transform
from clml_core.devices import normalize
from clml_core.models import MultiLabelNet
from clml_core.runio import atomic_write_bytes, atomic_write_json

STORE_VERSION = 1


class FeatureDataset(torch.utils.data.Dataset):
    """Rows of a feature store with a dataset's labels: ``dataset[i]`` is ``(features (F,), observed (C,), i)`` of
    view 0; :meth:`seeded_item` draws one of the K augmented views (training).

    It has the surface the engine uses of a :class:`MultiLabelDataset` (``labels``, ``observed``, ``classes``,
    ``num_classes``, ``len``).

    Args:
        source: the image dataset whose rows these are (labels, observed labels, classes).
        features: (N, 1 + K, F) float32 features of the source's rows: view 0 (resized image) and K augmented views.
    """

    def __init__(self, source: MultiLabelDataset, features: np.ndarray) -> None:
        if features.ndim != 3 or features.shape[0] != len(source):
            raise ValueError(f"features must be (N={len(source)}, V, F), got {features.shape}")
        self.features = features
        self.labels = source.labels
        self.observed = source.observed
        self.classes = source.classes
        self.name = source.name

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self._item(index, 0)

    def seeded_item(self, index: int, seed: int) -> tuple[Tensor, Tensor, int]:
        """Item ``index`` with augmented view ``1 + mix(seed) % K`` (view 0 when K = 0): a pure function of the seed,
        with no global random state touched (seeding torch per item costs milliseconds)."""
        augmented = self.features.shape[1] - 1
        return self._item(index, 1 + _mix(seed) % augmented if augmented else 0)

    def _item(self, index: int, view: int) -> tuple[Tensor, Tensor, int]:
        return (
            torch.from_numpy(self.features[index, view]),
            torch.from_numpy(self.observed[index].astype(np.float32)),
            index,
        )


def _mix(value: int) -> int:
    """SplitMix64's finaliser: a well-spread 64-bit integer from any integer seed."""
    z = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _view_seed(view: int, path: str, seed: int) -> int:
    return (seed * 1_000_003 + view) * 4_294_967_311 + zlib.crc32(path.encode())


class _Views(torch.utils.data.Dataset):
    """Image ``i`` of ``paths`` under ``transform``, seeded by (view, path): a view never depends on batching."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Tensor], Tensor], view: int, seed: int) -> None:
        self.paths, self.transform, self.view, self.seed = list(paths), transform, view, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        path = self.paths[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(self.view, str(path), self.seed) % (2**63))
            return self.transform(read_image(path))


def store_key(
    model: MultiLabelNet,
    paths: Sequence[Path],
    settings: dict,
) -> str:
    """SHA-256 (first 20 hex digits) of the backbone's weights, the settings and every image file's identity."""
    digest = hashlib.sha256(f"clml-feature-store v{STORE_VERSION}\n".encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(model.preprocessing.as_dict(), sort_keys=True).encode())
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(file_identities(paths))
    return digest.hexdigest()[:20]


@torch.no_grad()
def build_store(
    model: MultiLabelNet,
    paths: Sequence[Path],
    eval_transform: Callable[[Tensor], Tensor],
    train_transform: Callable[[Tensor], Tensor] | None,
    views: int,
    folder: Path,
    settings: dict,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    channels_last: bool = True,
    progress: bool = True,
) -> tuple[np.ndarray, Path]:
    """Compute (or load) the features of ``paths``: view 0 under ``eval_transform``, views 1..K augmented.

    Args:
        model: the network whose backbone (in eval mode, preprocessing applied) makes the features.
        paths: the image files, in the store's row order.
        eval_transform / train_transform: uint8 (3, H, W) -> float (3, S, S) in [0, 1]; train_transform may be
            None only when ``views`` is 0.
        views: K augmented views per image.
        folder: where stores live.
        settings: what else the features depend on (image size, augmentation name, seed, ...), part of the key;
            ``settings["seed"]`` seeds the views.

    Returns:
        The (N, 1 + K, F) float32 array (memory-mapped read-only when it was on disk) and its file.
    """
    if views and train_transform is None:
        raise ValueError("build_store: augmented views need a train_transform")
    paths = [Path(p) for p in paths]
    key = store_key(model, paths, {**settings, "views": views})
    path = Path(folder) / f"{key}.npy"
    if path.is_file() and path.with_suffix(".json").is_file():
        return np.load(path, mmap_mode="r"), path
    transforms = [eval_transform] + [train_transform] * views
    settings = {**settings, "views": views}
    out = _run_backbone(
        model, paths, transforms, int(settings.get("seed", 0)), f"feature store {key}",
        device=device, batch_size=batch_size, workers=workers, channels_last=channels_last, progress=progress,
    )  # fmt: skip
    atomic_write_bytes(path, _npy_bytes(out))
    atomic_write_json(
        path.with_suffix(".json"), {"key": key, "shape": list(out.shape), "settings": settings, "n_images": len(paths)}
    )
    return out, path


def _run_backbone(
    model: MultiLabelNet,
    paths: list[Path],
    transforms: list[Callable[[Tensor], Tensor]],
    seed: int,
    desc: str,
    *,
    device: torch.device | str,
    batch_size: int,
    workers: int,
    channels_last: bool,
    progress: bool,
) -> np.ndarray:
    """(N, V, F) float32 pooled features of every image under each of the V view transforms (in eval mode)."""
    backbone = model.backbone
    was_training = backbone.training
    backbone.eval().to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    backbone.to(memory_format=layout)
    out = np.empty((len(paths), len(transforms), model.num_features), dtype=np.float32)
    bar = tqdm(total=len(paths) * len(transforms), desc=desc, disable=not progress, leave=False)
    for view, transform in enumerate(transforms):
        loader = torch.utils.data.DataLoader(_Views(paths, transform, view, seed), batch_size, num_workers=workers)
        row = 0
        for images in loader:
            images = normalize(images.to(device), model.preprocessing).contiguous(memory_format=layout)
            out[row : row + len(images), view] = backbone(images).float().cpu().numpy()
            row += len(images)
            bar.update(len(images))
    bar.close()
    backbone.train(was_training)
    backbone.to(memory_format=torch.contiguous_format)
    return out


def _npy_bytes(array: np.ndarray) -> bytes:
    handle = io.BytesIO()
    np.save(handle, array)
    return handle.getvalue()


def feature_splits(
    splits: Splits,
    model: MultiLabelNet,
    *,
    size: int,
    augment: str,
    views: int,
    folder: Path,
    workers: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> Splits:
    """The run's splits as :class:`FeatureDataset` rows of one shared feature store (built here if missing).

    Args:
        splits: the run's image splits (:func:`clml_core.data.splits.build_splits`); their images must be files.
        model: the network whose frozen backbone makes the features.
        size: the image side (:func:`clml_core.data.splits.image_size`).
        augment: the augmentation of the K views (config field data.augment).
        views: K augmented views per training image (config field data.feature_views).
        folder: where stores live (``<cache>/features``).
        workers: loader workers while the store is built.

    Returns:
        ``Splits`` of FeatureDatasets: train draws among views 1..K (view 0 when K = 0), val and test read view 0.
    """
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    for name, dataset in parts.items():
        if dataset.image_paths is None:
            raise ValueError(f"model.train_mode=frozen: the {name} split has no image files to compute features of")
    paths = sorted({path for dataset in parts.values() for path in dataset.image_paths})
    preprocessing = model.preprocessing
    store, _ = build_store(
        model,
        paths,
        eval_transform(size, interpolation=preprocessing.interpolation),
        train_transform_for(augment, size, preprocessing, to_float=True) if views else None,
        views,
        folder,
        {"image_size": size, "augment": augment, "seed": 0},
        device=device,
        workers=workers,
        progress=progress,
    )
    row = {path: i for i, path in enumerate(paths)}

    def rows(dataset: MultiLabelDataset, views: slice) -> FeatureDataset:
        index = np.array([row[path] for path in dataset.image_paths], dtype=np.int64)
        return FeatureDataset(dataset, np.ascontiguousarray(store[index][:, views]))

    return Splits(
        train=rows(splits.train, slice(None)), val=rows(splits.val, slice(0, 1)), test=rows(splits.test, slice(0, 1))
    )
