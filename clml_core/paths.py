"""Project paths, resolved from this file so nothing depends on the working directory.

``CLML_DATA_DIR`` moves the data folder (generated datasets, packed caches) elsewhere, e.g. to a scratch disk;
the test suite points it at a temporary folder so tests never write into the repository.
"""

import os
from pathlib import Path

PROJ_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ["CLML_DATA_DIR"]) if os.environ.get("CLML_DATA_DIR") else PROJ_ROOT / "data"
RUNS_DIR = PROJ_ROOT / "runs"
FIGURES_DIR = PROJ_ROOT / "figures"
NOTEBOOKS_DIR = PROJ_ROOT / "notebooks"
