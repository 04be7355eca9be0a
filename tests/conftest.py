"""Data fixtures shared by the dataset, loader and protocol tests: small real image files written with PIL.

Tests never write into the repository: generated datasets go to a temporary ``CLML_DATA_DIR`` (set here, before any
test imports :mod:`clml_core.paths`, and inherited by the subprocesses tests start), and the session fails if any
file under the repository was created or changed while it ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_SKIP = {".git", ".venv", ".venv-lowest", ".pytest_cache", ".ruff_cache", "__pycache__"}
if not os.environ.get("CLML_DATA_DIR"):
    _DATA_DIR = tempfile.mkdtemp(prefix="clml-test-data-")
    os.environ["CLML_DATA_DIR"] = _DATA_DIR
else:
    _DATA_DIR = ""
_BEFORE = pytest.StashKey[dict]()


def _repository_files() -> dict[str, tuple[int, int]]:
    """path -> (size, mtime in ns) of every file under the repository, caches and .git left out."""
    files = {}
    for folder, subfolders, names in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if name not in _SKIP and not name.endswith(".egg-info")]
        for name in names:
            path = os.path.join(folder, name)
            stat = os.lstat(path)
            files[os.path.relpath(path, REPO)] = (stat.st_size, stat.st_mtime_ns)
    return files


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _repository_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if before is not None:
        after = _repository_files()
        changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
        if changed:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"tests wrote into the repository: {', '.join(changed[:20])}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _DATA_DIR:
        shutil.rmtree(_DATA_DIR, ignore_errors=True)


def pixels(seed: int, height: int = 12, width: int = 16) -> np.ndarray:
    """A (H, W, 3) uint8 random image; different seeds give different images."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def write_image() -> Callable[..., Path]:
    """Write ``pixels(seed)`` to ``path`` in the PIL ``mode`` and format implied by the suffix."""

    def write(path: Path, seed: int = 0, mode: str = "RGB", height: int = 12, width: int = 16) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels(seed, height, width)).convert(mode).save(path)
        return path

    return write
