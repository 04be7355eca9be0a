"""A packed image cache: every image decoded once, resized, and stored in one memory-mappable uint8 array.

Decoding JPEGs with PIL every epoch is the bottleneck of a CPU (or small-GPU) run. The authors resize every
image to a square (``Resize((448, 448))``) before anything else, so nothing is lost by doing that resize
once: :func:`build_packed_cache` reads each image through the dataset (so a missing or corrupt file raises
the dataset's error, which names the file), resizes it to ``size x size`` with antialiased bilinear
interpolation, and writes the result into a ``.npy`` file of shape (N, size, size, 3) that
:meth:`PackedCache.open` memory-maps read-only. Training workers then share the page cache instead of
decoding.

Two formats. ``"raw"``: the (N, size, size, 3) uint8 array itself, no decoding at all when training, but
3 * size**2 bytes per image: COCO-2014 (123,287 images) at 448 px is 74 GB, more than a 64 GiB disk holds.
``"jpeg"``: each resized image re-encoded as a JPEG (``quality``, default 90) into one flat byte file
(``<file>``, memory-mapped) with an offsets array (``<file>.offsets.npy``); a tenth or less of the raw bytes
(``benchmarks/bench_loading.py`` measures both), decoded per item by libjpeg-turbo in the DataLoader workers,
or per batch on the GPU with nvJPEG (:func:`clml_core.data.dataset.decode_batch`). Either way a cache holds
one whole source split; protocols and train / validation carves index its rows.

A JSON sidecar (``<file>.json``) records a fingerprint of the source: every image path with its file size
and modification time, the target size and the format. The cache is reused while that fingerprint matches and rebuilt
otherwise. The array is written to a temporary file and moved into place with ``os.replace``, and the old
sidecar is removed first, so an interrupted build never leaves a cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from .dataset import EncodedImages, MultiLabelDataset, PathLike

CACHE_VERSION = 1
_CHUNK_PER_WORKER = 32  # images decoded per thread before the next chunk is queued


FORMATS = ("raw", "jpeg")


def source_fingerprint(image_paths: Sequence[PathLike], size: int, fmt: str = "raw", quality: int = 0) -> str:
    """SHA-256 over (path, file size, mtime in ns) of every image, in order, the target size and the format.

    Raises:
        FileNotFoundError: An image file does not exist; the message names it.
    """
    header = f"clml-packed-cache v{CACHE_VERSION} size={size} n={len(image_paths)}"
    if fmt != "raw":  # raw caches keep the fingerprint they always had
        header += f" format={fmt} quality={quality}"
    digest = hashlib.sha256(f"{header}\n".encode())
    digest.update(file_identities(image_paths))
    return digest.hexdigest()


def file_identities(paths: Sequence[PathLike]) -> bytes:
    """One line ``path<TAB>size<TAB>mtime_ns`` per file, in order: what a fingerprint of the files hashes.

    Raises:
        FileNotFoundError: A file does not exist; the message names it.
    """
    lines = []
    for path in paths:
        try:
            stat = os.stat(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"image file not found: {path}") from err
        lines.append(f"{os.fspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n")
    return "".join(lines).encode()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _offsets_file(path: Path) -> Path:
    return path.with_name(path.name + ".offsets.npy")


class PackedCache:
    """A read-only, memory-mapped packed cache and its source fingerprint.

    Attributes:
        path: The ``.npy`` array (raw) or the byte file (jpeg).
        images: (N, size, size, 3) uint8 ``np.memmap`` (raw) or an :class:`EncodedImages` store (jpeg).
        size: Image side in pixels.
        fingerprint: :func:`source_fingerprint` of the images it was built from.
        format: ``"raw"`` or ``"jpeg"``.
        quality: JPEG quality of a jpeg cache (0 for raw).
    """

    def __init__(
        self, path: Path, images: np.ndarray | EncodedImages, size: int, fingerprint: str, fmt: str, quality: int
    ) -> None:
        self.path = path
        self.images = images
        self.size = size
        self.fingerprint = fingerprint
        self.format = fmt
        self.quality = quality  # JPEG quality (0 for raw)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the image data (and offsets)."""
        return int(self.images.nbytes)

    @classmethod
    def open(cls, path: PathLike) -> PackedCache:
        """Memory-map an existing cache read-only.

        Raises:
            FileNotFoundError: The array or its sidecar is missing.
            ValueError: The sidecar is unreadable or does not describe the files (wrong shape or version).
        """
        path = Path(path)
        sidecar = _sidecar(path)
        for required in (path, sidecar):
            if not required.is_file():
                raise FileNotFoundError(f"packed cache file not found: {required}")
        try:
            meta = json.loads(sidecar.read_text())
            n, size, version, fingerprint = meta["n"], meta["size"], meta["version"], meta["fingerprint"]
            fmt, quality = meta.get("format", "raw"), meta.get("quality", 0)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{sidecar} is not a packed-cache sidecar: {err}") from err
        if version != CACHE_VERSION:
            raise ValueError(f"{sidecar} has cache version {version}, expected {CACHE_VERSION}; rebuild it")
        if fmt == "jpeg":
            try:
                offsets = np.load(_offsets_file(path), mmap_mode="r")
                images: np.ndarray | EncodedImages = EncodedImages(np.memmap(path, dtype=np.uint8, mode="r"), offsets)
            except (OSError, ValueError) as err:
                raise ValueError(f"{path} and {_offsets_file(path)} are not a readable JPEG store: {err}") from err
            if len(images) != n:
                raise ValueError(f"{path} holds {len(images)} JPEG images, but {sidecar} says {n}")
            return cls(path, images, size, fingerprint, fmt, quality)
        expected = (n, size, size, 3)
        try:
            images = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise ValueError(f"{path} is not a readable .npy array: {err}") from err
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(f"{path} holds {images.dtype} {images.shape}, but {sidecar} says uint8 {expected}")
        return cls(path, images, size, fingerprint, fmt, quality)

    def __len__(self) -> int:
        return len(self.images)

    def matches(self, dataset: MultiLabelDataset) -> bool:
        """Whether this cache was built from ``dataset``'s image files as they are now (same order)."""
        if dataset.image_paths is None or len(dataset) != len(self):
            return False
        return source_fingerprint(dataset.image_paths, self.size, self.format, self.quality) == self.fingerprint

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
        return f"PackedCache(path={str(self.path)!r}, images={len(self)}, size={self.size}, format={self.format!r})"


def _decode_resized(dataset: MultiLabelDataset, index: int, size: int) -> np.ndarray:
    """Row ``index`` of ``dataset`` decoded and resized: (size, size, 3) uint8."""
    image = dataset.read_image(index)  # (3, H, W) uint8; raises naming the file
    if image.shape[-2:] != (size, size):
        image = TF.resize(image, [size, size], antialias=True)
    return image.permute(1, 2, 0).numpy()


def _encoded_resized(dataset: MultiLabelDataset, index: int, size: int, quality: int) -> np.ndarray:
    """Row ``index`` decoded, resized and re-encoded as JPEG: 1-D uint8 bytes."""
    image = torch.from_numpy(_decode_resized(dataset, index, size)).permute(2, 0, 1)
    return encode_jpeg(image, quality=quality).numpy()


def _rows_in_order(pool: ThreadPoolExecutor | None, work, n: int, workers: int):
    """``work(i)`` for i in 0..n-1, in order; in chunks on the pool, which bound the results held in memory."""
    if pool is None:
        yield from (work(i) for i in range(n))
        return
    chunk = _CHUNK_PER_WORKER * workers
    for start in range(0, n, chunk):
        yield from pool.map(work, range(start, min(n, start + chunk)))


def _check_build_arguments(dataset: MultiLabelDataset, size: int, fmt: str, quality: int) -> None:
    """Raise a ValueError naming the argument of :func:`build_packed_cache` that cannot be packed."""
    if dataset.image_paths is None:
        raise ValueError(f"dataset {dataset.name!r} has no image files to cache; its images are already an array")
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if fmt not in FORMATS:
        raise ValueError(f"packed cache format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "jpeg" and not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")


def _reusable_cache(path: Path, fingerprint: str) -> PackedCache | None:
    """The cache at ``path`` if it opens and was built from the source with ``fingerprint``, else None."""
    if not (path.is_file() and _sidecar(path).is_file()):
        return None
    try:
        cache = PackedCache.open(path)
    except ValueError:
        return None  # unreadable or stale layout: rebuilt
    return cache if cache.fingerprint == fingerprint else None


def _write_raw(tmp: Path, rows: Iterator[np.ndarray], shape: tuple[int, int, int, int], bar: tqdm) -> None:
    """Write (size, size, 3) uint8 ``rows`` into a new .npy array of ``shape`` (N, size, size, 3) at ``tmp``."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    for i, image in enumerate(rows):
        out[i] = image
        bar.update()
    out.flush()  # the memmap closes when this function returns, before the file is moved


def _write_jpeg(tmp: Path, tmp_offsets: Path, rows: Iterator[np.ndarray], n: int, bar: tqdm) -> None:
    """Write ``n`` encoded ``rows`` (1-D uint8) back to back to ``tmp``, their (n + 1,) offsets to ``tmp_offsets``."""
    offsets = np.zeros(n + 1, dtype=np.int64)
    with tmp.open("wb") as handle:
        for i, encoded in enumerate(rows):
            handle.write(encoded.tobytes())
            offsets[i + 1] = offsets[i] + encoded.shape[0]
            bar.update()
    np.save(tmp_offsets, offsets)


def _pack(
    dataset: MultiLabelDataset, size: int, path: Path, fmt: str, quality: int, workers: int, progress: bool
) -> None:
    """Write the image data (and a jpeg cache's offsets) to temporary files and move them onto ``path``.

    The old sidecar is removed before the move, so until :func:`_write_sidecar` runs the cache reads as invalid; on
    an error the temporary files are removed and the images still queued are skipped.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_offsets = path.with_name(f".{path.name}.{os.getpid()}.offsets.tmp.npy")
    n = len(dataset)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        with tqdm(total=n, desc=f"packing {dataset.name or 'images'} at {size}px", disable=not progress) as bar:
            if fmt == "raw":
                decode = partial(_decode_resized, dataset, size=size)
                _write_raw(tmp, _rows_in_order(pool, decode, n, workers), (n, size, size, 3), bar)
            else:
                encode = partial(_encoded_resized, dataset, size=size, quality=quality)
                _write_jpeg(tmp, tmp_offsets, _rows_in_order(pool, encode, n, workers), n, bar)
        _sidecar(path).unlink(missing_ok=True)
        if fmt == "jpeg":
            os.replace(tmp_offsets, _offsets_file(path))
        os.replace(tmp, path)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error, skip the queued images
        tmp.unlink(missing_ok=True)
        tmp_offsets.unlink(missing_ok=True)


def _write_sidecar(path: Path, n: int, size: int, fingerprint: str, source: str, fmt: str, quality: int) -> None:
    """Write ``path``'s JSON sidecar through a temporary file, so it appears whole or not at all.

    A raw cache's sidecar has no format and quality keys, as before jpeg caches existed.
    """
    meta = {"version": CACHE_VERSION, "n": n, "size": size, "fingerprint": fingerprint, "source": source}
    if fmt == "jpeg":
        meta |= {"format": fmt, "quality": quality}
    sidecar = _sidecar(path)
    tmp_meta = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, sidecar)


def build_packed_cache(
    dataset: MultiLabelDataset,
    size: int,
    path: PathLike,
    *,
    fmt: str = "raw",
    quality: int = 90,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> PackedCache:
    """Decode, resize and pack ``dataset``'s images into ``path``, or reuse the cache already there.

    Decoding (and JPEG encoding) runs in a thread pool (PIL's decoders and torch's resize and JPEG codec release
    the GIL), which needs no copy of the dataset in worker processes; benchmarks/bench_loading.py prints the build
    rate.

    Args:
        dataset: Source with ``image_paths`` (its transform is not applied).
        size: Side of the stored square images, in pixels.
        path: Cache file, conventionally ``<split>-<size>px.npy`` (raw) or ``<split>-<size>px-q<quality>.jpegs``;
            the sidecar is ``<path>.json``, a jpeg cache's offsets ``<path>.offsets.npy``.
        fmt: ``"raw"`` (uint8 pixels) or ``"jpeg"`` (re-encoded at ``quality``); see the module docstring.
        quality: JPEG quality in [1, 100] of a jpeg cache.
        workers: Decoding threads; defaults to the number of CPUs (at most 8). 0 or 1 decodes inline.
        force: Rebuild even if the sidecar matches.
        progress: Show a tqdm bar.

    Returns:
        The opened cache, rows in dataset order.

    Raises:
        ValueError: ``dataset`` has no image files, ``size`` < 1, or an unknown format or quality.
        FileNotFoundError, OSError: An image is missing or cannot be decoded (raised by the dataset, naming
            the file); no cache is written.
    """
    path = Path(path)
    _check_build_arguments(dataset, size, fmt, quality)
    quality = quality if fmt == "jpeg" else 0
    fingerprint = source_fingerprint(dataset.image_paths, size, fmt, quality)
    cache = None if force else _reusable_cache(path, fingerprint)
    if cache is not None:
        return cache

    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    path.parent.mkdir(parents=True, exist_ok=True)
    _pack(dataset, size, path, fmt, quality, workers, progress)
    _write_sidecar(path, len(dataset), size, fingerprint, dataset.name, fmt, quality)
    return PackedCache.open(path)
