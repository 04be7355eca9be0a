"""A packed image cache: every image decoded once, resized, and stored in one memory-mappable uint8 array.

Decoding JPEGs with PIL every epoch is the bottleneck of a CPU (or small-GPU) run. The authors resize every
image to a square (``Resize((448, 448))``) before anything else, so nothing is lost by doing that resize
once: :func:`build_packed_cache` reads each image through the dataset (so a missing or corrupt file raises
the dataset's error, which names the file), resizes it to ``size x size`` with antialiased bilinear
interpolation, and writes the result into a ``.npy`` file of shape (N, size, size, 3) that
:meth:`PackedCache.open` memory-maps read-only. Training workers then share the page cache instead of
decoding.

A JSON sidecar (``<file>.json``) records a fingerprint of the source: every image path with its file size
and modification time, and the target size. The cache is reused while that fingerprint matches and rebuilt
otherwise. The array is written to a temporary file and moved into place with ``os.replace``, and the old
sidecar is removed first, so an interrupted build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .dataset import MultiLabelDataset, PathLike

CACHE_VERSION = 1
_CHUNK_PER_WORKER = 32  # images decoded per thread before the next chunk is queued


def source_fingerprint(image_paths: Sequence[PathLike], size: int) -> str:
    """SHA-256 over (path, file size, mtime in ns) of every image, in order, and the target size.

    Raises:
        FileNotFoundError: An image file does not exist; the message names it.
    """
    digest = hashlib.sha256(f"clml-packed-cache v{CACHE_VERSION} size={size} n={len(image_paths)}\n".encode())
    for path in image_paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"image file not found: {path}") from err
        digest.update(f"{os.fspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class PackedCache:
    """A read-only, memory-mapped (N, size, size, 3) uint8 image array and its source fingerprint.

    Attributes:
        path: The ``.npy`` file.
        images: (N, size, size, 3) uint8 ``np.memmap`` opened read-only.
        size: Image side in pixels.
        fingerprint: :func:`source_fingerprint` of the images it was built from.
    """

    def __init__(self, path: Path, images: np.ndarray, fingerprint: str) -> None:
        self.path = path
        self.images = images
        self.size = images.shape[1]
        self.fingerprint = fingerprint

    @classmethod
    def open(cls, path: PathLike) -> PackedCache:
        """Memory-map an existing cache read-only.

        Raises:
            FileNotFoundError: The array or its sidecar is missing.
            ValueError: The sidecar is unreadable or does not describe the array (wrong shape or version).
        """
        path = Path(path)
        sidecar = _sidecar(path)
        for required in (path, sidecar):
            if not required.is_file():
                raise FileNotFoundError(f"packed cache file not found: {required}")
        try:
            meta = json.loads(sidecar.read_text())
            expected = (meta["n"], meta["size"], meta["size"], 3)
            version, fingerprint = meta["version"], meta["fingerprint"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{sidecar} is not a packed-cache sidecar: {err}") from err
        if version != CACHE_VERSION:
            raise ValueError(f"{sidecar} has cache version {version}, expected {CACHE_VERSION}; rebuild it")
        try:
            images = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise ValueError(f"{path} is not a readable .npy array: {err}") from err
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(f"{path} holds {images.dtype} {images.shape}, but {sidecar} says uint8 {expected}")
        return cls(path, images, fingerprint)

    def __len__(self) -> int:
        return self.images.shape[0]

    def matches(self, dataset: MultiLabelDataset) -> bool:
        """Whether this cache was built from ``dataset``'s image files as they are now (same order)."""
        if dataset.image_paths is None or len(dataset) != len(self):
            return False
        return source_fingerprint(dataset.image_paths, self.size) == self.fingerprint

    def dataset(self, source: MultiLabelDataset) -> MultiLabelDataset:
        """``source`` with its images read from this cache instead of decoded from files.

        Classes, labels, observed labels, image paths, transform and name are kept.

        Raises:
            ValueError: The cache was not built from ``source``'s files as they are now.
        """
        if not self.matches(source):
            raise ValueError(
                f"packed cache {self.path} was not built from the {len(source)} image files of dataset "
                f"{source.name!r} as they are now; rebuild it with build_packed_cache"
            )
        return MultiLabelDataset(
            source.classes,
            source.labels,
            image_paths=source.image_paths,
            images=self.images,
            observed=source.observed,
            transform=source.transform,
            name=source.name,
        )

    def __repr__(self) -> str:
        return f"PackedCache(path={str(self.path)!r}, images={len(self)}, size={self.size})"


def _decode_resized(dataset: MultiLabelDataset, index: int, size: int) -> np.ndarray:
    """Row ``index`` of ``dataset`` decoded and resized: (size, size, 3) uint8."""
    image = dataset.read_image(index)  # (3, H, W) uint8; raises naming the file
    if image.shape[-2:] != (size, size):
        image = TF.resize(image, [size, size], antialias=True)
    return image.permute(1, 2, 0).numpy()


def build_packed_cache(
    dataset: MultiLabelDataset,
    size: int,
    path: PathLike,
    *,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> PackedCache:
    """Decode, resize and pack ``dataset``'s images into ``path``, or reuse the cache already there.

    Decoding runs in a thread pool (PIL's decoders and torch's resize release the GIL), which needs no copy of
    the dataset in worker processes; benchmarks/bench_loading.py prints the build rate with 1 and N threads.

    Args:
        dataset: Source with ``image_paths`` (its transform is not applied).
        size: Side of the stored square images, in pixels.
        path: Cache file, conventionally ``<name>_<size>.npy``; the sidecar is ``<path>.json``.
        workers: Decoding threads; defaults to the number of CPUs (at most 8). 0 or 1 decodes inline.
        force: Rebuild even if the sidecar matches.
        progress: Show a tqdm bar.

    Returns:
        The opened cache, rows in dataset order.

    Raises:
        ValueError: ``dataset`` has no image files, or ``size`` < 1.
        FileNotFoundError, OSError: An image is missing or cannot be decoded (raised by the dataset, naming
            the file); no cache is written.
    """
    path = Path(path)
    if dataset.image_paths is None:
        raise ValueError(f"dataset {dataset.name!r} has no image files to cache; its images are already an array")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    fingerprint = source_fingerprint(dataset.image_paths, size)
    sidecar = _sidecar(path)
    if not force and path.is_file() and sidecar.is_file():
        try:
            cache = PackedCache.open(path)
        except ValueError:
            cache = None  # unreadable or stale layout: rebuilt below
        if cache is not None and cache.fingerprint == fingerprint:
            return cache

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = len(dataset)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        with tqdm(total=n, desc=f"packing {dataset.name or 'images'} at {size}px", disable=not progress) as bar:
            if workers <= 1:
                for i in range(n):
                    out[i] = _decode_resized(dataset, i, size)
                    bar.update()
            else:
                pool = ThreadPoolExecutor(workers)
                try:
                    # Chunks bound the decoded images held in memory while they wait for their turn.
                    chunk = _CHUNK_PER_WORKER * workers
                    for start in range(0, n, chunk):
                        rows = range(start, min(n, start + chunk))
                        for i, image in zip(rows, pool.map(lambda j: _decode_resized(dataset, j, size), rows)):
                            out[i] = image
                            bar.update()
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)  # after an error, skip the queued images
        out.flush()
        del out
        sidecar.unlink(missing_ok=True)  # from here until the new sidecar exists the cache reads as invalid
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"version": CACHE_VERSION, "n": n, "size": size, "fingerprint": fingerprint, "source": dataset.name}
    tmp_meta = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, sidecar)
    return PackedCache.open(path)
