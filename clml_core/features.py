"""The stores of the modes that keep part of the backbone frozen: its output computed once per image and view.

**The feature store** (``model.train_mode=frozen``). The backbone never changes, so its pooled features are computed
once and cached on disk, and a run trains only the projection head (which CLML acts on) and the classifier, in
seconds. This is the linear-probe harness of Cole et al. (single-positive multi-label learning) with K augmented
views per image.

A store covers every image of a run (train, validation and test, in sorted path order) and holds, per image,
view 0 (the evaluation transform: resize) and views 1..K (``data.augment`` drawn under a seed that depends only on
the view and the image's path), as float32 (N, 1 + K, F) in ``<cache>/features/<key>.npy`` with a json sidecar.
The key hashes everything the features depend on: the backbone's weights (their bytes), its preprocessing, the
image size, the augmentation, K, and every image path with its file size and modification time. Runs that differ
only in seeds, losses or protocols therefore share one store, and a study computes it once.

Training images then draw one of their K views per epoch (a pure function of the engine's per-item seed, see
:meth:`FeatureDataset.seeded_item`), or view 0 when K = 0; validation and test (and ``dataset[i]`` always) read view
0, which is exactly what the whole network computes on the resized image.

**The trunk store** (``model.train_mode=partial`` with ``model.trunk_cache``). The frozen stages (the *trunk*,
:meth:`~clml_core.models.MultiLabelNet.forward_trunk`) never change either, so their output, the activations
entering the first trainable stage, is computed once per image and view, and a run trains the trainable stages, the
head convolution and the classifier from it (:class:`~clml_core.models.TrunkHead`), their BatchNorm in training
mode. Two stores in ``<cache>/trunk/<key>.npy`` (json sidecars give the shape (c, h, w) of one view):

* the plain view of every image of the run: (N, 1, c*h*w), the evaluation pipeline's image (resized as uint8, as
  the image loaders and ``clml_core.evaluate`` resize it), what validation and test read;
* K augmented views of every image training can draw (train and validation together, the same whatever the
  protocol): (N', K, c*h*w), view v of an image under a seed of (v, its file name, the store's seed), so the views
  do not depend on where the dataset lies.

Both are float32 memory maps, written through a memory map and moved into place: a run reads the rows of its batch,
never the whole store. float32, not float16, because the stored activations are then exactly what the frozen stages
hand the trainable ones in a run without the store (the tests hold the two runs equal to float tolerance, and
``clml_core.evaluate`` on images gives the run's own test score); at Lite0's last block stage (192 x 7 x 7 at
224 px) a view is 37.6 kB, so the 996-photo VOC2007 sample with 8 views is 37 MB + 209 MB. The key hashes the trunk's
weights (the frozen stages' only, so runs with other top weights share it), the backbone's class and the split point,
the preprocessing, the image size, the views (augmentation, K, seed) and every image file's identity.

**Views and seeds.** The store's seed is 0 by default, one pool of K views that every run seed shares: each run
draws its own sequence from the pool (view ``mix(item seed) % K`` per epoch and image, the item seed a function of
the run seed, epoch and index), and both arms of a seed (with and without CLML) draw the same one. With
``data.views_per_seed`` the seed is the run's: every seed has a pool of its own (a store each, K views per seed).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from clml_core.data.cache import file_identities
from clml_core.data.dataset import MultiLabelDataset, read_image
from clml_core.data.splits import Splits, train_transform_for
from clml_core.data.transforms import eval_transform
from clml_core.devices import normalize, to_input
from clml_core.models import MultiLabelNet, Preprocessing, backbone_stages
from clml_core.runio import atomic_write_bytes, atomic_write_json

STORE_VERSION = 1
TRUNK_STORE_VERSION = 1


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
    """Image ``i`` of ``paths`` under ``transform``, seeded by (view, path): a view never depends on batching.

    ``by_name``: seeded by the file's name instead of its whole path, so the views do not depend on where the
    dataset lies (the trunk store's views; the feature store's keep the path).
    """

    def __init__(
        self, paths: Sequence[Path], transform: Callable[[Tensor], Tensor], view: int, seed: int, by_name: bool = False
    ) -> None:
        self.paths, self.transform, self.view, self.seed, self.by_name = list(paths), transform, view, seed, by_name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        path = self.paths[index]
        return _view_image(
            path, self.transform, _view_seed(self.view, path.name if self.by_name else str(path), self.seed)
        )


def _view_image(path: Path, transform: Callable[[Tensor], Tensor], seed: int) -> Tensor:
    """The image file ``path`` under ``transform``, its random draws seeded by ``seed`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (2**63))
        return transform(read_image(path))


def store_key(
    model: MultiLabelNet,
    paths: Sequence[Path],
    settings: dict,
) -> str:
    """SHA-256 (first 20 hex digits) of the backbone's weights, the settings and every image file's identity."""
    header = f"clml-feature-store v{STORE_VERSION}\n"
    return _digest(header, settings, model.preprocessing, model.backbone.state_dict(), paths)


def _digest(
    header: str, settings: dict, preprocessing: Preprocessing, state: Mapping[str, Tensor], paths: Sequence[Path]
) -> str:
    """SHA-256 (first 20 hex digits) of a store's header, settings, preprocessing, weights and image files."""
    digest = hashlib.sha256(header.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(json.dumps(preprocessing.as_dict(), sort_keys=True).encode())
    for name, tensor in state.items():
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
    seed: int = 0,
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
        seed: the seed the K views are drawn under (:func:`view_seed`), part of the store's key.

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
        {"image_size": size, "augment": augment, "seed": seed},
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


# ---------------------------------------------------------------------------------------------- the trunk store


def view_seed(run_seed: int, per_seed: bool) -> int:
    """The seed a store's augmented views are drawn under (config field data.views_per_seed): the run's seed, so
    every run seed has views of its own (a store each), or 0, one pool of views that every seed shares and draws its
    own sequence from (:meth:`FeatureDataset.seeded_item`, :meth:`TrunkDataset.seeded_item`)."""
    return run_seed if per_seed else 0


def trunk_key(model: MultiLabelNet, paths: Sequence[Path], settings: dict) -> str:
    """SHA-256 (first 20 hex digits) of the trunk's weights (the frozen stages', by stage), the backbone's class,
    the split point, the settings, the preprocessing and every image file's identity."""
    state = {
        f"{k}.{name}": tensor
        for k, stage in enumerate(backbone_stages(model.backbone)[: model.frozen_stages])
        for name, tensor in stage.state_dict().items()
    }
    where = {"backbone": type(model.backbone).__name__, "frozen_stages": model.frozen_stages}
    header = f"clml-trunk-store v{TRUNK_STORE_VERSION}\n"
    return _digest(header, {**settings, **where}, model.preprocessing, state, paths)


@torch.no_grad()
def trunk_shape(model: MultiLabelNet, size: int) -> tuple[int, int, int]:
    """(c, h, w) of the trunk's output for one ``size`` x ``size`` image."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    shape = tuple(model.forward_trunk(torch.zeros(1, 3, size, size, device=device)).shape[1:])
    model.train(was_training)
    return shape  # type: ignore[return-value]


@torch.no_grad()
def build_trunk_store(
    model: MultiLabelNet,
    paths: Sequence[Path],
    views: Sequence[tuple[int, Callable[[Tensor], Tensor]]],
    folder: Path,
    settings: dict,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    channels_last: bool = False,
    progress: bool = True,
) -> Path:
    """Compute (or find) the trunk's output for every image of ``paths`` and view of ``views``.

    The store is written through a memory map into a temporary file and moved into place, so it never sits whole in
    memory and a reader never sees a part of it.

    Args:
        model: the network, its trunk frozen (:meth:`MultiLabelNet.freeze_backbone`); the trunk runs in eval mode.
        paths: the image files, in the store's row order.
        views: (view number, transform) pairs, each transform uint8 (3, H, W) -> (3, S, S) uint8 or float in
            [0, 1]; view v of an image is drawn under a seed of (v, file name, ``settings["seed"]``).
        folder: where trunk stores live.
        settings: what else the activations depend on (``image_size``, the views, the augmentation, ``seed``), part
            of the key (:func:`trunk_key`).
        channels_last: the trunk's input layout (config field model.channels_last).

    Returns:
        The store's .npy file: float32 (N, V, c * h * w); its json sidecar gives ``activation_shape`` (c, h, w).
    """
    paths = [Path(p) for p in paths]
    key = trunk_key(model, paths, settings)
    path = Path(folder) / f"{key}.npy"
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = trunk_shape(model, int(settings["image_size"]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        size = (len(paths), len(views), math.prod(shape))
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=size)
        bar = tqdm(total=len(paths) * len(views), desc=f"trunk store {key}", disable=not progress, leave=False)
        for j, (view, transform) in enumerate(views):
            dataset = _Views(paths, transform, view, int(settings.get("seed", 0)), by_name=True)
            loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers)
            _fill_trunk(model, loader, out[:, j], torch.device(device), channels_last, bar)
        bar.close()
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"key": key, "shape": list(size), "activation_shape": list(shape), "dtype": "float32"}
    atomic_write_json(path.with_suffix(".json"), {**record, "settings": settings, "n_images": len(paths)})
    return path


def _fill_trunk(
    model: MultiLabelNet,
    loader: torch.utils.data.DataLoader,
    out: np.ndarray,
    device: torch.device,
    channels_last: bool,
    bar: tqdm,
) -> None:
    """``out[i]`` (D,) = the trunk's flattened output, in eval mode, for image batch rows of ``loader`` in order."""
    was_training = model.training
    model.eval()
    row = 0
    for images in loader:
        inputs = to_input(images, device, model.preprocessing, channels_last)
        out[row : row + len(images)] = model.forward_trunk(inputs).flatten(1).float().cpu().numpy()
        row += len(images)
        bar.update(len(images))
    model.train(was_training)


class StoreRows(NamedTuple):
    """Rows of a store file: ``rows[i]`` is the store row of a dataset's row ``i``."""

    path: Path
    rows: np.ndarray  # (N,) int64


class TrunkDataset(torch.utils.data.Dataset):
    """Rows of trunk stores with a dataset's labels: ``dataset[i]`` is ``(activations (D,), observed (C,), i)`` of
    the plain view (the resized image); :meth:`seeded_item` draws one of the K stored augmented views (training).

    The stores are memory-mapped read-only, each process (a loader worker too) opening its own map on first use, so
    a run holds in memory only the rows it reads. It has the surface the engine uses of a
    :class:`MultiLabelDataset` (``labels``, ``observed``, ``classes``, ``num_classes``, ``len``).

    Args:
        source: the image dataset whose rows these are (labels, observed labels, classes).
        plain: rows of a (M, 1, D) store of the plain view.
        views: rows of a (M', K, D) store of K augmented views; None: the plain view only.
    """

    def __init__(self, source: MultiLabelDataset, plain: StoreRows, views: StoreRows | None = None) -> None:
        for rows in (plain, views):
            if rows is not None and len(rows.rows) != len(source):
                raise ValueError(f"TrunkDataset: {len(rows.rows)} store rows for {len(source)} images ({rows.path})")
        self.plain, self.views = plain, views
        self.labels, self.observed = source.labels, source.observed
        self.classes, self.name = source.classes, source.name
        self._maps: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.plain.rows)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_views(self) -> int:
        """K, the stored augmented views per image (0: the plain view only)."""
        return 0 if self.views is None else int(self._array(self.views.path).shape[1])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self._item(self.plain, index, 0)

    def seeded_item(self, index: int, seed: int) -> tuple[Tensor, Tensor, int]:
        """Item ``index`` with augmented view ``mix(seed) % K`` (the plain view without views): a pure function of
        the seed, drawn as :class:`ViewImages` draws it."""
        if self.views is None:
            return self[index]
        return self._item(self.views, index, _mix(seed) % self.num_views)

    def _array(self, path: Path) -> np.ndarray:
        if path not in self._maps:
            self._maps[path] = np.load(path, mmap_mode="r")
        return self._maps[path]

    def _item(self, rows: StoreRows, index: int, view: int) -> tuple[Tensor, Tensor, int]:
        activations = np.array(self._array(rows.path)[rows.rows[index], view])  # a copy out of the read-only map
        return torch.from_numpy(activations), torch.from_numpy(self.observed[index].astype(np.float32)), index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # a worker maps the files itself


class ViewImages(torch.utils.data.Dataset):
    """A training split that draws the trunk store's augmented views from the image files at every step (the
    reference for the cached trunk: model.trunk_cache=false with data.feature_views).

    ``seeded_item(i, seed)`` is view ``1 + mix(seed) % K`` of image i, drawn under (view, file name, ``view_seed``) as
    :func:`build_trunk_store` draws it, so a run without the cache sees the images whose trunk output the cached
    run reads. ``dataset[i]`` is the source's item.

    Args:
        source: the training split (image files).
        transform: the augmentation (uint8 -> float in [0, 1]) the store applies.
        views: K.
        view_seed: the store's seed (:func:`view_seed`).
    """

    def __init__(self, source: MultiLabelDataset, transform: Callable[[Tensor], Tensor], views: int, view_seed: int):
        if source.image_paths is None or views < 1:
            raise ValueError("ViewImages: needs image files and views >= 1")
        self.source, self.transform, self.views, self.seed = source, transform, views, view_seed
        self.labels, self.observed = source.labels, source.observed
        self.classes, self.name, self.image_paths = source.classes, source.name, source.image_paths

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.source[index]

    def seeded_item(self, index: int, seed: int) -> tuple[Tensor, Tensor, int]:
        view = 1 + _mix(seed) % self.views
        path = Path(self.image_paths[index])
        image = _view_image(path, self.transform, _view_seed(view, path.name, self.seed))
        return image, torch.from_numpy(self.observed[index].astype(np.float32)), index


def trunk_splits(
    splits: Splits,
    model: MultiLabelNet,
    *,
    size: int,
    augment: str,
    views: int,
    seed: int,
    folder: Path,
    workers: int = 0,
    progress: bool = True,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> tuple[Splits, tuple[int, int, int]]:
    """The run's splits as :class:`TrunkDataset` rows of the trunk stores (built here if missing).

    Two stores: the plain view (the evaluation transform, uint8 as the image pipeline resizes) of every image of
    the run, and K views under ``augment`` of every image training can draw from whatever the protocol (train and
    validation together). Runs that differ in seed (unless ``seed`` is the run's), loss, CLML or protocol share them.

    Args:
        splits: the run's image splits; their images must be files.
        model: the network, its trunk frozen (model.train_mode=partial).
        size: the image side (:func:`clml_core.data.splits.image_size`).
        augment: the augmentation of the K views (config field data.augment).
        views: K augmented views per training image (config field data.feature_views); 0: the plain view only.
        seed: the seed the views are drawn under (:func:`view_seed`).
        folder: where trunk stores live (``<cache>/trunk``).
        workers: loader workers while a store is built.
        channels_last: the trunk's input layout (config field model.channels_last).

    Returns:
        ``Splits`` of TrunkDatasets (train draws among the K views, val and test read the plain view) and the
        (c, h, w) shape of one view's activations.
    """
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    _check_trunk_inputs(parts, model)
    options = {"device": device, "workers": workers, "channels_last": channels_last, "progress": progress}
    base = {"image_size": size}
    everything = sorted({path for dataset in parts.values() for path in dataset.image_paths})
    plain = eval_transform(size, to_float=False, interpolation=model.preprocessing.interpolation)
    plain_path = build_trunk_store(model, everything, [(0, plain)], folder, {**base, "views": 0}, **options)
    pool_path, pool = None, sorted({*splits.train.image_paths, *splits.val.image_paths})
    if views:
        transform = train_transform_for(augment, size, model.preprocessing, to_float=True)
        settings = {**base, "augment": augment, "views": views, "seed": seed}
        numbered = [(1 + j, transform) for j in range(views)]
        pool_path = build_trunk_store(model, pool, numbered, folder, settings, **options)

    def part(dataset: MultiLabelDataset, augmented: bool) -> TrunkDataset:
        extra = _store_rows(dataset, pool, pool_path) if augmented and pool_path is not None else None
        return TrunkDataset(dataset, _store_rows(dataset, everything, plain_path), extra)

    shape = tuple(json.loads(plain_path.with_suffix(".json").read_text())["activation_shape"])
    trunk = Splits(train=part(splits.train, True), val=part(splits.val, False), test=part(splits.test, False))
    return trunk, shape  # type: ignore[return-value]


def _store_rows(dataset: MultiLabelDataset, order: list[Path], path: Path) -> StoreRows:
    """The rows of ``dataset``'s images in the store ``path`` whose rows are the images of ``order``."""
    row = {p: i for i, p in enumerate(order)}
    return StoreRows(path, np.array([row[p] for p in dataset.image_paths], dtype=np.int64))


def _check_trunk_inputs(parts: dict[str, MultiLabelDataset], model: MultiLabelNet) -> None:
    """Raise ValueError unless every split has image files and the model has a frozen trunk."""
    for name, dataset in parts.items():
        if dataset.image_paths is None:
            raise ValueError(f"model.trunk_cache: the {name} split has no image files to compute the trunk of")
    if model.frozen_stages == 0:
        raise ValueError(
            "config fields 'model.trunk_cache' and 'model.trainable_stages' contradict: every backbone stage trains, "
            "so there is no frozen trunk to store; set model.trunk_cache=false or train fewer stages"
        )
