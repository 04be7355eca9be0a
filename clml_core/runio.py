"""Run folders: atomic writes, run provenance (git sha, versions) and the per-epoch metrics table."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import platform
import secrets
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clml_core.paths import PROJ_ROOT

_PACKAGES = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "matplotlib", "umap-learn", "papermill")


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class DiskFullError(OSError):
    """The disk (or quota) filled up while a run file was written; the file was left as it was before."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, keep_previous: str | Path | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The file gets the user's normal permissions (0666 less the umask). A reader sees the old content or the new,
    never a part. A failed write (a full disk, a kill) leaves ``path`` as it was and no temporary file behind.

    Args:
        path: the file to write.
        data: its new content.
        keep_previous: where the file's current content is kept once the new content is complete (a hard link,
            so ``path`` exists at every moment; a rename where the filesystem has no hard links).

    Raises:
        DiskFullError: no space or quota left; the message names the file and says nothing was lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        _write_new_file(tmp, data)
        if keep_previous is not None and path.exists():
            _keep(path, Path(keep_previous))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno in _DISK_FULL:
            before = "its previous content is intact" if path.exists() else "it was not created"
            raise DiskFullError(
                error.errno,
                f"no space left on the device while writing {path} ({len(data) / 1e6:.1f} MB); {before} and "
                "nothing already saved was lost; free some space and run again (--resume continues a run)",
            ) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_link(source: str | Path, path: str | Path) -> None:
    """Make ``path`` name the file ``source`` names, atomically (a hard link; a copy where links are not possible)."""
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.link(source, tmp)
    except OSError:
        atomic_write_bytes(path, source.read_bytes())
        return
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # rename does nothing when both names already link one file


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (0666 less the umask, not 0600 as mkstemp would) with ``data``, flushed to the disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _keep(path: Path, previous: Path) -> None:
    link = previous.parent / f".{previous.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)  # no hard links here: for a moment only ``previous`` exists
        return
    os.replace(link, previous)
    link.unlink(missing_ok=True)  # rename does nothing when both names already link one file (after a kill)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def atomic_write_json(path: str | Path, data: Any) -> None:
    """JSON with NaN/Inf written as null (strict JSON), atomically."""
    text = json.dumps(_finite_or_none(data), indent=2, default=_json_default)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: str | Path, *, keep_previous: str | Path | None = None) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue(), keep_previous=keep_previous)


def git_state(root: Path = PROJ_ROOT) -> dict[str, Any]:
    """The git sha of the code and whether the tree had uncommitted changes (None outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine and library builds that decide floating-point results: CPU model and count, torch's build
    configuration (BLAS, LAPACK, oneDNN/MKL-DNN, compiler flags), its parallel settings and the GPU, if any.

    Runs are bit-identical on one machine; across machines these are what to compare.
    """
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector ISA torch dispatches to
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_config": torch.__config__.show(),
        "torch_parallel": torch.__config__.parallel_info(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "mkl_available": torch.backends.mkl.is_available(),
        "numpy_config": _numpy_config(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": package_versions(),
    }


def _numpy_config() -> Any:
    """NumPy's build information (its BLAS/LAPACK), as a mapping where NumPy offers one."""
    try:
        return np.show_config(mode="dicts")  # NumPy >= 1.25
    except TypeError:
        return None


def run_info(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Provenance of a run: time, command line, host, git state, package versions, device."""
    info: dict[str, Any] = {
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "host": platform.node(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **git_state(),
        "versions": package_versions(),
    }
    if extra:
        info.update(extra)
    return info


def write_metrics_csv(path: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """Rewrite the whole metrics table atomically (it is small), columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
