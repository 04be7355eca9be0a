"""The multi-label dataset object shared by training, the image cache and the notebooks.

A :class:`MultiLabelDataset` holds, row by row, one image and two label matrices:

* ``labels`` (N, C) uint8: the full labels as far as they are known (a test split's ground truth, or the
  training labels before a missing-label protocol removed some).
* ``observed`` (N, C) uint8: what the learner is allowed to see after a protocol from
  :mod:`clml_core.data.protocols`. A 0 in ``observed`` means "not observed positive": it is either a true
  negative or a missing positive, which is exactly the ambiguity CLML is about.

Images come either from an in-memory/memory-mapped uint8 array (N, H, W, 3) or are decoded lazily from
``image_paths``. Decoding never substitutes a blank image: a missing, unreadable or truncated file raises an
error that names the file. EXIF orientation is not applied (the PIL/torchvision default, and what the CLML
authors' pipeline does), so the pixels are the stored pixels.
"""

from __future__ import annotations

import copy
import mmap
import operator
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

PathLike = str | Path
Transform = Callable[[torch.Tensor], torch.Tensor]

# PIL modes that `Image.convert("RGB")` maps to 8-bit RGB without losing range.
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class _MemmapLocation(NamedTuple):
    """Where a file-backed image memmap lives, enough to reopen it read-only."""

    filename: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


def binary_matrix(field: str, values: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a 0/1 matrix and return it as a read-only uint8 copy.

    Args:
        field: Name used in error messages (``"labels"``, ``"observed"``).
        values: Array-like of shape (N, C) with entries exactly 0 or 1 (bool, integer or float dtype).
        shape: Required shape, or None to accept any 2-D shape.

    Returns:
        (N, C) uint8 array, not writeable, so a dataset's labels cannot drift from what was validated.
    """
    array = np.asarray(values)
    if array.ndim != 2:
        raise ValueError(f"{field} must be a 2-D (N, C) array, got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{field} must have shape {shape}, got {array.shape}")
    if not (np.issubdtype(array.dtype, np.bool_) or np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"{field} must be numeric or boolean with values 0/1, got dtype {array.dtype}")
    bad = (array != 0) & (array != 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(f"{field}[{row}, {col}] = {array[row, col].item()}; every entry must be 0 or 1")
    out = array.astype(np.uint8, copy=True)
    out.flags.writeable = False
    return out


def _row_indices(indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Validate subset indices against a dataset of ``n`` rows.

    Args:
        indices: 1-D integer row indices (negative indices count from the end) or a boolean mask of length n.

    Returns:
        (M,) int64 array of non-negative row indices, in the given order.
    """
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
    if idx.dtype == np.bool_:
        if idx.shape[0] != n:
            raise ValueError(f"boolean indices must have length {n}, got {idx.shape[0]}")
        return np.flatnonzero(idx).astype(np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
    out_of_range = (idx < -n) | (idx >= n)
    if out_of_range.any():
        raise IndexError(f"index {idx[out_of_range][0]} out of range for a dataset of {n} images")
    return np.where(idx < 0, idx + n, idx).astype(np.int64)


def read_image(path: PathLike) -> torch.Tensor:
    """Decode an image file into an RGB uint8 tensor.

    Grayscale, palette (with or without transparency), CMYK, RGBA and 16-bit grayscale PNGs are converted to
    RGB; an alpha channel is dropped. The whole file is decoded here, so a truncated file fails now rather than
    producing a partly grey image (unless the caller has set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``).

    Args:
        path: Image file.

    Returns:
        (3, H, W) uint8 tensor.

    Raises:
        FileNotFoundError: The file does not exist.
        OSError: The file cannot be decoded (unknown format, truncated, corrupt); the message names the file.
        ValueError: The image mode has no lossless 8-bit interpretation (32-bit integer or float images).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in _SIXTEEN_BIT_MODES:
                # 16-bit grayscale -> 8 bit by dropping the low byte, then replicated to 3 channels.
                gray = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
                array = np.repeat(gray[:, :, None], 3, axis=2)
            elif mode in _EIGHT_BIT_MODES:
                if mode == "P" and "transparency" in img.info:
                    # Palette transparency must go through RGBA; PIL warns on a direct P -> RGB conversion.
                    img = img.convert("RGBA")
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)
            else:
                raise ValueError(
                    f"image {path} has PIL mode {mode!r}, which has no lossless 8-bit RGB reading; "
                    "convert it to an 8-bit format"
                )
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise OSError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _memmap_state(array: np.ndarray) -> np.ndarray | _MemmapLocation:
    """A file-backed read-only memmap as its location (so pickling does not copy it), anything else unchanged."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.filename:
        return _MemmapLocation(array.filename, array.dtype.str, array.shape, array.offset)
    return array


def _memmap_restore(state: np.ndarray | _MemmapLocation) -> np.ndarray:
    if isinstance(state, _MemmapLocation):
        return np.memmap(state.filename, dtype=state.dtype, mode="r", shape=state.shape, offset=state.offset)
    return state


class EncodedImages:
    """N JPEG-encoded images in one flat byte array: row i is ``data[offsets[i]:offsets[i + 1]]``.

    A quarter to a tenth of the bytes of the decoded (N, H, W, 3) array (see :mod:`clml_core.data.cache`).
    Decoding uses ``torchvision.io.decode_jpeg`` (libjpeg-turbo on the CPU; nvJPEG with ``device="cuda"``).

    Args:
        data: 1-D uint8 array (in memory or ``np.memmap``).
        offsets: (N + 1,) int64 non-decreasing offsets into ``data``, from 0 to ``len(data)``.
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        if data.ndim != 1 or data.dtype != np.uint8:
            raise ValueError(f"encoded image data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
        if offsets.ndim != 1 or offsets.shape[0] < 1 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"offsets must be a 1-D integer array of N + 1 entries, got {offsets.dtype}")
        if offsets[0] != 0 or offsets[-1] != data.shape[0] or (np.diff(offsets) <= 0).any():
            raise ValueError(f"offsets must rise strictly from 0 to len(data) = {data.shape[0]}")
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)

    def encoded(self, row: int) -> torch.Tensor:
        """Row ``row``'s JPEG bytes: a 1-D uint8 tensor (a copy, so it owns writable memory)."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return torch.from_numpy(np.array(self.data[start:end]))

    def decode(self, row: int) -> torch.Tensor:
        """Row ``row`` decoded on the CPU: (3, H, W) uint8."""
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(self.encoded(row), mode=ImageReadMode.RGB)

    def __getstate__(self) -> dict:
        return {"data": _memmap_state(self.data), "offsets": _memmap_state(self.offsets)}

    def __setstate__(self, state: dict) -> None:
        self.data, self.offsets = _memmap_restore(state["data"]), _memmap_restore(state["offsets"])


def decode_batch(images: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A batch as collated by :func:`collate`: a (B, 3, H, W) tensor, or B JPEG byte tensors decoded on ``device``
    (nvJPEG in one batched call on a GPU) into (B, 3, H, W) uint8; the images must share one size."""
    if isinstance(images, torch.Tensor):
        return images
    from torchvision.io import ImageReadMode, decode_jpeg

    return torch.stack(decode_jpeg(list(images), mode=ImageReadMode.RGB, device=device))


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor | list, torch.Tensor, ...]:
    """Stack a batch of ``(image, observed, index)`` items; JPEG byte items (see
    :meth:`MultiLabelDataset.with_encoded_items`) stay a list of 1-D uint8 tensors for :func:`decode_batch`; cached
    float features (see :mod:`clml_core.features`) are stacked."""
    images, observed, index = zip(*batch)
    if images[0].ndim == 1 and images[0].dtype == torch.uint8:
        return list(images), torch.stack(observed), torch.as_tensor(index)
    return torch.utils.data.default_collate(batch)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of every loader: workers leave SIGTERM and SIGINT to the main process, which stops the run
    cleanly (a scheduler signals the whole process group). Such workers must be stopped with
    :func:`shutdown_workers`: the interpreter's own SIGTERM at exit no longer reaches them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shutdown_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stop the persistent workers of ``loader`` now (a no-op without workers); the loader starts new ones when it is
    iterated again."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # the DataLoader's own shutdown: ask each worker to exit, then join it
    loader._iterator = None


def _class_names(classes: Sequence[str]) -> list[str]:
    """``classes`` as a list, checked to be at least one non-empty, unique string."""
    classes = list(classes)
    if not classes:
        raise ValueError("classes must name at least one class")
    for k, cls in enumerate(classes):
        if not isinstance(cls, str) or not cls:
            raise ValueError(f"classes[{k}] must be a non-empty string, got {cls!r}")
    if len(set(classes)) != len(classes):
        duplicates = sorted({c for c in classes if classes.count(c) > 1})
        raise ValueError(f"classes must be unique, duplicated: {duplicates}")
    return classes


def _path_list(image_paths: Sequence[PathLike] | None, n: int) -> list[Path] | None:
    """``image_paths`` as ``n`` Paths (None stays None), checked to be a sequence of one path per row."""
    if image_paths is None:
        return None
    if isinstance(image_paths, (str, Path)):
        raise ValueError("image_paths must be a sequence of paths, got a single path")
    paths = [Path(p) for p in image_paths]
    if len(paths) != n:
        raise ValueError(f"image_paths has {len(paths)} entries but labels has {n} rows")
    return paths


def _image_store(images: np.ndarray | EncodedImages | None, n: int) -> np.ndarray | EncodedImages | None:
    """``images`` itself (never copied; None stays None), checked to be ``n`` rows of (H, W, 3) uint8 or JPEGs."""
    if images is None:
        return None
    if isinstance(images, EncodedImages):
        if len(images) != n:
            raise ValueError(f"encoded images has {len(images)} rows but labels has {n} rows")
        return images
    if not isinstance(images, np.ndarray):
        raise ValueError(f"images must be a numpy array (or np.memmap), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must have dtype uint8, got {images.dtype}")
    if images.shape[0] != n:
        raise ValueError(f"images has {images.shape[0]} rows but labels has {n} rows")
    return images


class MultiLabelDataset(torch.utils.data.Dataset):
    """Images with full labels and observed (possibly incomplete) labels.

    ``dataset[i]`` returns ``(image, observed_labels, i)``: the image after ``transform`` (a uint8 (3, H, W)
    tensor when there is no transform), ``observed[i]`` as a float32 (C,) tensor, and the row index ``i``
    (so a training loop can look up the full labels or store per-image state).

    Args:
        classes: C class names, unique, in column order.
        labels: (N, C) full labels, entries 0/1 (any numeric or bool dtype; stored as uint8).
        image_paths: N image files in row order. May be None when ``images`` is given.
        images: Optional (N, H, W, 3) uint8 array (in memory or ``np.memmap``), or an :class:`EncodedImages`
            JPEG store. Used instead of decoding ``image_paths`` when given; it is never copied, also not by
            :meth:`subset`.
        observed: (N, C) observed labels, entries 0/1. Defaults to a copy of ``labels``.
        transform: Callable mapping a uint8 (3, H, W) tensor to a tensor (torchvision.transforms.v2 style).
        name: Free-form dataset name for logs and reprs.

    Raises:
        ValueError: A field has the wrong shape, length or values; the message names the field.
        TypeError: ``transform`` is not callable.
    """

    def __init__(
        self,
        classes: Sequence[str],
        labels: np.ndarray,
        image_paths: Sequence[PathLike] | None = None,
        images: np.ndarray | EncodedImages | None = None,
        observed: np.ndarray | None = None,
        transform: Transform | None = None,
        name: str = "",
    ) -> None:
        self.classes: list[str] = _class_names(classes)
        self.labels: np.ndarray = binary_matrix("labels", labels)
        n, c = self.labels.shape
        if c != len(self.classes):
            raise ValueError(f"labels has {c} columns but there are {len(self.classes)} classes")
        if image_paths is None and images is None:
            raise ValueError("give image_paths or images (or both); got neither")
        self.image_paths: list[Path] | None = _path_list(image_paths, n)
        self._images: np.ndarray | EncodedImages | None = _image_store(images, n)
        # Rows of `_images` backing this dataset's rows; None means row i is `_images[i]`.
        self._rows: np.ndarray | None = None
        self.encoded_items = False  # __getitem__ hands over JPEG bytes (see with_encoded_items)
        self.observed: np.ndarray = binary_matrix(
            "observed", self.labels if observed is None else observed, self.labels.shape
        )
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        self.transform: Transform | None = transform
        self.name: str = name

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    @property
    def images(self) -> np.ndarray | None:
        """(N, H, W, 3) uint8 image array, or None when images are decoded from files.

        For a :meth:`subset` of a memory-mapped array this gathers the rows into memory; iterate with
        :meth:`read_image` to avoid that.
        """
        if self._images is None or isinstance(self._images, EncodedImages):
            return None
        if self._rows is None:
            return self._images
        return self._images[self._rows]

    @property
    def has_image_array(self) -> bool:
        """Whether images come from an array or encoded store (in memory or a packed cache) rather than files."""
        return self._images is not None

    @property
    def has_encoded_images(self) -> bool:
        """Whether images come from a JPEG store (:class:`EncodedImages`)."""
        return isinstance(self._images, EncodedImages)

    def with_encoded_items(self) -> MultiLabelDataset:
        """A new dataset whose items carry their JPEG bytes (1-D uint8) instead of the decoded image, for decoding
        a whole batch on the device (:func:`decode_batch`). Needs a JPEG store and no transform."""
        if not self.has_encoded_images:
            raise ValueError(f"dataset {self.name!r} has no JPEG store to hand over; build a jpeg packed cache")
        if self.transform is not None:
            raise ValueError(f"dataset {self.name!r} has a transform, which needs decoded images")
        new = copy.copy(self)
        new.encoded_items = True
        return new

    def read_image(self, index: int) -> torch.Tensor:
        """Row ``index``'s image before the transform.

        Returns:
            (3, H, W) uint8 tensor.
        """
        i = self._check_index(index)
        if isinstance(self._images, EncodedImages):
            return self._images.decode(i if self._rows is None else int(self._rows[i]))
        if self._images is not None:
            row = i if self._rows is None else int(self._rows[i])
            # np.array copies out of a (read-only) memmap so the tensor owns writable memory.
            return torch.from_numpy(np.array(self._images[row].transpose(2, 0, 1), order="C"))
        assert self.image_paths is not None  # guaranteed by __init__
        return read_image(self.image_paths[i])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return ``(image, observed_labels, index)``.

        Returns:
            image: the transformed image, or a (3, H, W) uint8 tensor without a transform.
            observed_labels: (C,) float32 tensor of this row's observed labels.
            index: the non-negative row index.
        """
        i = self._check_index(index)
        if self.encoded_items:
            assert isinstance(self._images, EncodedImages)  # guaranteed by with_encoded_items
            row = i if self._rows is None else int(self._rows[i])
            return self._images.encoded(row), torch.from_numpy(self.observed[i].astype(np.float32)), i
        image = self.read_image(i)
        if self.transform is not None:
            image = self._transformed(image)
        return image, torch.from_numpy(self.observed[i].astype(np.float32)), i

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """The items of ``indices``, equal to ``[self[i] for i in indices]``; a DataLoader fetches a batch with it.

        Images held in an array (in memory or memory-mapped) are gathered with one read for the whole batch, which
        removes most of the per-image cost of a small image; other stores are read image by image.
        """
        rows = [self._check_index(i) for i in indices]
        if not isinstance(self._images, np.ndarray) or self.encoded_items or not rows:
            return [self[i] for i in rows]
        stored = rows if self._rows is None else self._rows[rows]
        # fancy indexing copies out of a (read-only) memmap: the items are writable views of one batch buffer.
        images = torch.from_numpy(np.ascontiguousarray(self._images[stored].transpose(0, 3, 1, 2))).unbind(0)
        if self.transform is not None:
            images = [self._transformed(image) for image in images]
        observed = torch.from_numpy(self.observed[rows].astype(np.float32)).unbind(0)
        return list(zip(images, observed, rows))

    def _transformed(self, image: torch.Tensor) -> torch.Tensor:
        image = self.transform(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"transform must return a torch.Tensor, got {type(image).__name__}")
        return image

    def with_observed(self, observed: np.ndarray) -> MultiLabelDataset:
        """A new dataset with the same images and labels and a different observed-label matrix.

        Args:
            observed: (N, C) 0/1 matrix.
        """
        new = copy.copy(self)
        new.observed = binary_matrix("observed", observed, self.labels.shape)
        return new

    def with_transform(self, transform: Transform | None) -> MultiLabelDataset:
        """A new dataset identical to this one except for the transform."""
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}")
        new = copy.copy(self)
        new.transform = transform
        return new

    def subset(self, indices: Sequence[int] | np.ndarray) -> MultiLabelDataset:
        """A new dataset made of the given rows, in the given order.

        The image array (if any) is shared, not copied, so subsets of a memory-mapped cache stay cheap.

        Args:
            indices: 1-D integer row indices or a boolean mask of length N.
        """
        idx = _row_indices(indices, len(self))
        new = copy.copy(self)
        new.labels = self.labels[idx]
        new.labels.flags.writeable = False
        new.observed = self.observed[idx]
        new.observed.flags.writeable = False
        if self.image_paths is not None:
            new.image_paths = [self.image_paths[i] for i in idx]
        if self._images is not None:
            new._rows = idx if self._rows is None else self._rows[idx]
        return new

    def _check_index(self, index: int) -> int:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for dataset {self.name!r} of {n} images")
        return i + n if i < 0 else i

    def __getstate__(self) -> dict:
        # A file-backed memmap travels as its location, so DataLoader workers started with "spawn"
        # (macOS, Windows) reopen the file instead of receiving a pickled copy of every image.
        state = self.__dict__.copy()
        if isinstance(self._images, np.ndarray):
            state["_images"] = _memmap_state(self._images)
        return state

    def __setstate__(self, state: dict) -> None:
        state["_images"] = _memmap_restore(state["_images"])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        source = (
            "JPEG store" if self.has_encoded_images else "images array" if self._images is not None else "image files"
        )
        n_pos, n_obs = int(self.labels.sum()), int(self.observed.sum())
        return (
            f"MultiLabelDataset(name={self.name!r}, images={len(self)}, classes={self.num_classes}, "
            f"positives={n_pos}, observed_positives={n_obs}, source={source})"
        )
