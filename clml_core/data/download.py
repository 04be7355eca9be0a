"""Download helpers for the public datasets: MS-COCO 2014/2017 and PASCAL VOC.

* COCO archives come from the official ``images.cocodataset.org`` URLs and are unpacked into the official
  layout that :func:`clml_core.data.load_coco` reads (``root/annotations``, ``root/train2014``, ...).
  Downloads go to ``<archive>.part`` and are renamed only when complete and checksummed; an interrupted
  download resumes from the partial file when the server honours HTTP range requests.
* VOC goes through ``torchvision.datasets.VOCDetection(download=True)``, which leaves ``root/VOCdevkit``
  as :func:`clml_core.data.load_voc` expects.

NUS-WIDE has no stable public image source; see :mod:`clml_core.data.nuswide`.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from .dataset import PathLike


class Archive(NamedTuple):
    """A downloadable archive and its published MD5."""

    url: str
    md5: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_COCO = "http://images.cocodataset.org"
# MD5s as published with the archives and used by torchvision/LAVIS/PaddleDetection download scripts.
COCO_ARCHIVES: dict[str, dict[str, Archive]] = {
    "2014": {
        "train": Archive(f"{_COCO}/zips/train2014.zip", "0da8c0bd3d6becc4dcb32757491aca88"),
        "val": Archive(f"{_COCO}/zips/val2014.zip", "a3d79f5ed8d289b7a7554ce06a5782b3"),
        "annotations": Archive(f"{_COCO}/annotations/annotations_trainval2014.zip", "0a379cfc70b0e71301e0f377548639bd"),
    },
    "2017": {
        "train": Archive(f"{_COCO}/zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
        "val": Archive(f"{_COCO}/zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
        "annotations": Archive(f"{_COCO}/annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c"),
    },
}


def coco_archives(year: str, splits: Sequence[str] = ("train", "val"), annotations: bool = True) -> list[Archive]:
    """The archives needed for the given COCO year and splits.

    Args:
        year: ``"2014"`` or ``"2017"``.
        splits: Any of ``"train"``, ``"val"``.
        annotations: Include the train/val annotation archive.
    """
    if year not in COCO_ARCHIVES:
        raise ValueError(f"COCO year must be one of {sorted(COCO_ARCHIVES)}, got {year!r}")
    table = COCO_ARCHIVES[year]
    for split in splits:
        if split not in ("train", "val"):
            raise ValueError(f"COCO split must be 'train' or 'val', got {split!r}")
    return [table[s] for s in splits] + ([table["annotations"]] if annotations else [])


def partial_path(dest: Path) -> Path:
    """Where an unfinished download of ``dest`` is kept: ``dest`` with ``.part`` appended."""
    return dest.with_name(dest.name + ".part")


def file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _body_start(url: str, response: Any, offset: int) -> int:
    """Where ``response``'s body starts in the file: ``offset`` if the server honoured the range request, else 0.

    Raises:
        OSError: The server answered the range request with another range.
    """
    if not (offset > 0 and response.status == 206):
        return 0  # the server sent the whole file
    content_range = response.headers.get("Content-Range", "")
    if not content_range.startswith(f"bytes {offset}-"):
        raise OSError(f"{url}: asked for bytes from {offset}, server sent range {content_range!r}")
    return offset


def _fetch_rest(url: str, part: Path, desc: str, chunk_size: int, progress: bool) -> int | None:
    """Append what ``part`` lacks of ``url`` to it (or rewrite it if the server sends the whole file).

    Returns:
        The full length of the file in bytes, or None if the server does not say.
    """
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        # 416: the partial file already holds every byte (interrupted before the rename).
        if err.code != 416 or not offset:
            raise
        return offset
    with response:
        start = _body_start(url, response, offset)
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with (
            part.open("ab" if start else "wb") as out,
            tqdm(total=total, initial=start, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar,
        ):
            for chunk in iter(lambda: response.read(chunk_size), b""):
                out.write(chunk)
                bar.update(len(chunk))
    return total


def _check_partial(url: str, part: Path, total: int | None, md5: str | None) -> None:
    """Check that ``part`` holds all ``total`` bytes and has the MD5 ``md5``; a mismatching file is deleted.

    Raises:
        OSError: ``part`` is short (it is kept, to resume) or its MD5 differs (it is deleted).
    """
    size = part.stat().st_size
    if total is not None and size != total:
        raise OSError(f"download of {url} stopped at {size} of {total} bytes; call again to resume")
    if md5 is not None:
        actual = file_md5(part)
        if actual != md5:
            part.unlink()
            raise OSError(f"MD5 of {url} is {actual}, expected {md5}; the partial file was deleted")


def download_url(
    url: str, dest: PathLike, *, md5: str | None = None, chunk_size: int = 1 << 20, progress: bool = True
) -> Path:
    """Download ``url`` to ``dest`` through a ``.part`` file, resuming a previous partial download.

    If ``dest`` already exists it is kept (and checked against ``md5`` when given). The partial file is
    renamed to ``dest`` only after the full length arrived and the MD5 matched; a mismatching download is
    deleted so the next call starts afresh.

    Args:
        url: Source URL (``http(s)://`` or ``file://``).
        dest: Target file.
        md5: Expected hex MD5, or None to skip the check.
        chunk_size: Bytes per read.
        progress: Show a tqdm progress bar.

    Returns:
        ``dest``.

    Raises:
        OSError: The transfer ended early, the server answered a range request inconsistently, or the MD5
            does not match.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is not None and file_md5(dest) != md5:
            raise OSError(f"{dest} exists but its MD5 is not {md5}; delete it to download again")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(dest)
    total = _fetch_rest(url, part, dest.name, chunk_size, progress)
    _check_partial(url, part, total, md5)
    part.replace(dest)
    return dest


def extraction_marker(archive: Path, dest_dir: Path) -> Path:
    """The file whose presence records that ``archive`` was fully extracted into ``dest_dir``."""
    return dest_dir / f".{archive.name}.extracted"


def extract_zip(archive: PathLike, dest_dir: PathLike, *, progress: bool = True) -> Path:
    """Extract a zip archive into ``dest_dir``, once.

    A marker file ``dest_dir/.{archive name}.extracted`` is written after the last member, so a completed
    extraction is skipped next time and an interrupted one is redone. Members whose path would leave
    ``dest_dir`` are refused.

    Returns:
        ``dest_dir``.

    Raises:
        ValueError: A member path escapes ``dest_dir``.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    marker = extraction_marker(archive, dest_dir)
    if marker.is_file():
        return dest_dir
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = dest_dir.resolve()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            target = (root / member.filename).resolve()
            if target != root and root not in target.parents:
                raise ValueError(f"{archive}: member {member.filename!r} would be extracted outside {dest_dir}")
        for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress):
            zf.extract(member, root)
    marker.touch()
    return dest_dir


def download_coco(
    root: PathLike,
    year: str = "2014",
    splits: Sequence[str] = ("train", "val"),
    *,
    annotations: bool = True,
    keep_archives: bool = False,
    progress: bool = True,
) -> Path:
    """Download and unpack COCO images and annotations into the official layout under ``root``.

    The 2014 train+val images are about 19 GB (plus as much again while the archives exist).

    Args:
        root: Target folder; afterwards ``load_coco(root, "train2014")`` works.
        year: ``"2014"`` (the CLML/SPLC benchmark) or ``"2017"``.
        splits: Any of ``"train"``, ``"val"``.
        annotations: Also fetch the train/val annotation archive.
        keep_archives: Keep the zip files after extraction.
        progress: Show progress bars.

    Returns:
        ``root``.
    """
    root = Path(root)
    for archive in coco_archives(year, splits, annotations):
        if extraction_marker(root / archive.filename, root).is_file():
            continue
        zip_path = download_url(archive.url, root / archive.filename, md5=archive.md5, progress=progress)
        extract_zip(zip_path, root, progress=progress)
        if not keep_archives:
            zip_path.unlink()
    return root


def download_voc(root: PathLike, year: str = "2007", image_set: str = "trainval") -> Path:
    """Download and unpack PASCAL VOC with torchvision, leaving ``root/VOCdevkit/VOC{year}``.

    Args:
        root: Target folder; afterwards ``load_voc(root, year, image_set)`` works.
        year: ``"2007"`` ... ``"2012"``.
        image_set: ``"train"``, ``"val"``, ``"trainval"`` or (2007 only) ``"test"``.

    Returns:
        The ``VOC{year}`` folder.
    """
    from torchvision.datasets import VOCDetection  # imported here: it adds seconds to `import clml_core.data`

    VOCDetection(root=str(root), year=year, image_set=image_set, download=True)
    return Path(root) / "VOCdevkit" / f"VOC{year}"
