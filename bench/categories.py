"""The development categories and the dataset folders (../shared/datasets, MVTec AD layout) that hold them, free
of hdm's imports like bench/timing.py, so that every bench names them from one table."""

from __future__ import annotations

import sys
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# category -> its dataset's folder under DATASETS, in the order the tables list them
FOLDERS = {"bottle": "mvtec_ad", "metal_plate": "mpdd", "magnetic_tile": "magnetic_tile", "brain_flair": "lgg_mri"}
CATEGORIES = tuple(FOLDERS)


def category_root(category: str, datasets: Path = DATASETS) -> Path:
    """The dataset root that holds `category`: what `DataSource.detect` and `hdm fit --data` take beside it."""
    return datasets / FOLDERS[category]


def data_root(category: str) -> Path:
    """`category_root`, or the bench stops with a line naming the missing folder."""
    root = category_root(category)
    if not (root / category).is_dir():
        sys.exit(f"bench: {root / category} not found")
    return root
